"""The commands each service runs, in one place.

The local stack, the tests and (later) the compose services all start their
processes from these builders, so what the tests exercise is what runs in
production.
"""

from __future__ import annotations

import os
import sys


def mlflow_server_command(host: str, port: int, backend_store_uri: str, artifacts_destination: str,
                          workers: int | None = None, allowed_hosts: str | None = None) -> list[str]:
    """`mlflow server` with served artifacts (clients upload through the server, no shared disk)."""
    workers = workers or int(os.environ.get("FACENET_MLFLOW_WORKERS", "2"))
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--host", host, "--port", str(port),
           "--backend-store-uri", backend_store_uri,
           "--serve-artifacts", "--artifacts-destination", artifacts_destination,
           "--workers", str(workers)]
    if allowed_hosts:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, proc, timeout: float, log_path: str) -> None:
    """Poll `url` until it answers 200; raise UserError naming the log if `proc` dies or time runs out."""
    import time
    import urllib.request

    from facenet.errors import UserError

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{' '.join(proc.args[:4])} exited with code {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise UserError(f"{url} did not answer within {timeout:.0f} s; see {log_path}")
