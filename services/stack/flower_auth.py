"""Flower as the stack runs it: Celery's `flower` command with /metrics behind the same login as its pages.

Flower 2.2.0 serves /metrics without asking for credentials (flower/views/monitor.py: `Metrics.get` is not
`@web.authenticated`, unlike every page and API handler), and those metrics name every worker, queue and
task. Here the handler is wrapped before Celery's command line starts Flower in this process, so a
request without FLOWER_BASIC_AUTH's credentials gets 401 (BaseHandler.get_current_user raises it).
/healthcheck stays open: it says only "OK".

    python -m services.stack.flower_auth -A services.queue.app flower --port=5555 ...
"""

from __future__ import annotations

import sys


def require_login_for_metrics() -> None:
    from flower.views import monitor
    from tornado import web

    if not getattr(monitor.Metrics.get, "_facenet_login", False):
        monitor.Metrics.get = web.authenticated(monitor.Metrics.get)
        monitor.Metrics.get._facenet_login = True


def main() -> None:
    require_login_for_metrics()
    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", *sys.argv[1:]]
    sys.exit(celery_main())


if __name__ == "__main__":
    main()
