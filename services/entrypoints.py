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


def start_mlflow_server(workdir: str, port: int, host: str = "127.0.0.1", timeout: float = 90):
    """Start `mlflow server` keeping its sqlite db, artifacts and log in WORKDIR; return it once healthy.

    Its own process group, so a stop takes its gunicorn/uvicorn workers too. Raises UserError
    (naming the log) if it exits or does not answer in time; a server that never came up is killed.
    """
    import signal
    import subprocess

    from facenet.errors import UserError

    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, "mlflow.log")
    cmd = mlflow_server_command(host, port, f"sqlite:///{workdir}/mlflow.db", os.path.join(workdir, "artifacts"))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    try:
        wait_until_healthy(f"http://{host}:{port}/health", proc, timeout, log_path)
    except UserError:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        raise
    return proc
