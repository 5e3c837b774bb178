"""The Celery app: Redis broker and result backend, JSON only, configured for long jobs.

Workers start it with `celery -A services.queue.app worker ...` (see
services/stack/entrypoints.py); the CLI uses it to send tasks. Importing it does
not import torch.
"""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import celeryd_init
from kombu import Queue

from services.config import DEVICE_TYPES, load_settings
from services.queue.names import FINALIZE_TASK, PLAN_TASK, PREPROCESS_QUEUE, SHARD_TASK, TRANSPORT, train_queue
from services.queue.registry import CLIENT_CALL_SECONDS

_CLIENT_SOCKET = {"socket_timeout": CLIENT_CALL_SECONDS, "socket_connect_timeout": 5}


def make_app() -> Celery:
    s = load_settings()
    app = Celery("facenet", broker=s.redis_url, backend=s.redis_url, include=["services.queue.tasks", "services.queue.worker"])
    # A message is acknowledged only when its task ends (acks_late), one at a time (prefetch 1), and
    # put back if the worker process dies under it (reject_on_worker_lost). A whole worker that dies
    # leaves its message unacknowledged until the visibility timeout, which must exceed the longest job
    # or long jobs run twice; Celery reads it in three places, so it is set in all three. The job
    # registry's heartbeats bring a lost job back long before that (services/queue/registry.py).
    vt = s.visibility_timeout
    app.conf.update(
        task_serializer="json", result_serializer="json", event_serializer="json",
        accept_content=["json"], result_accept_content=["json"],
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        # A client (the CLI; not a worker) waits CLIENT_CALL_SECONDS for a reply from the broker and
        # the result backend, as for the registry: kombu's default is no timeout, so a publish to a Redis that stops
        # answering hung for ever. Workers keep Celery's own (_guard_task_queues below).
        broker_transport_options={"visibility_timeout": vt, **_CLIENT_SOCKET},
        result_backend_transport_options={"visibility_timeout": vt},
        redis_socket_timeout=CLIENT_CALL_SECONDS, redis_socket_connect_timeout=5,
        visibility_timeout=vt,
        task_queues=[Queue(PREPROCESS_QUEUE)] + [Queue(train_queue(t)) for t in DEVICE_TYPES],
        task_default_queue=PREPROCESS_QUEUE,
        # Flower shows tasks from these events (their args are the argsrepr services.queue.guard sets from the checked
        # arguments); STARTED and custom PROGRESS states show running work. Results are not extended: nothing
        # reads a task's name or arguments back from the result backend, which would store them whole.
        worker_send_task_events=True, task_send_sent_event=True, task_track_started=True, result_extended=False,
        result_expires=30 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        # A CLI must not hang on a broker that is down: the CLI checks Redis first, this bounds the rest.
        task_publish_retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        worker_hijack_root_logger=False, worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Each preprocessing stage (plan, one shard, finalize) is stopped past FACENET_STAGE_TIME_LIMIT (soft: the
        # task fails its job with the reason; hard a minute later). Training has no Celery limit: its attempt
        # watches the trainer itself (FACENET_MAX_JOB_SECONDS). Annotations set these on the tasks as they bind.
        task_annotations={name: {"soft_time_limit": s.stage_time_limit, "time_limit": s.stage_time_limit + 60}
                          for name in (PLAN_TASK, SHARD_TASK, FINALIZE_TASK)},
    )
    from services.queue.doctor import UNFIT_ENV

    unfit = os.environ.get(UNFIT_ENV)
    if unfit:  # Flower shows it in the worker's Config tab (`inspect conf`)
        app.conf.facenet_unfit = unfit
    app.on_after_finalize.connect(_without_builtin_tasks)
    return app


def _without_builtin_tasks(sender: Celery, **_) -> None:
    """Celery registers its own tasks (celery.chord_unlock, celery.backend_cleanup, celery.chain, ...) in every
    app; a message naming one would run it. Ours never use them (no canvas, no chords, no beat)."""
    for name in [n for n in sender.tasks if n.startswith("celery.")]:
        sender.tasks.unregister(name)


@celeryd_init.connect
def _guard_task_queues(conf=None, **_) -> None:
    """A worker pops its task queues through services.queue.guard, which drops anything that is not one of our
    tasks for that queue. Only workers: the transport's import path becomes the broker URL's scheme, which
    Flower's broker view cannot parse, and nothing else consumes a task queue."""
    conf.broker_transport = TRANSPORT
    conf.broker_transport_options = {k: v for k, v in conf.broker_transport_options.items() if k not in _CLIENT_SOCKET}
    conf.redis_socket_timeout, conf.redis_socket_connect_timeout = 120.0, None  # Celery's defaults


app = make_app()
