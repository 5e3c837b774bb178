"""The service side of `facenet-cli doctor`: are the stack's Redis and MLflow reachable from here, and the check a
device worker runs on itself before it takes jobs (FACENET_WORKER_DOCTOR=1, set by compose for Ascend workers).

The device checks themselves are facenet.doctor's; a worker that fails them still registers, without capacity and
with the reason (`unfit`), so `status`, `workers` and submit say why it takes no jobs, and Flower shows the reason
in the worker's configuration (its `facenet_unfit` setting)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from facenet.doctor import FAIL, PASS, Check
from services.config import Settings

WORKER_DOCTOR_ENV = "FACENET_WORKER_DOCTOR"  # 1: a device worker runs doctor on its own devices before it starts
DOCTOR_ARGS_ENV = "FACENET_DOCTOR_ARGS"  # extra doctor flags for that run (e.g. --probe-seconds 10)
UNFIT_ENV = "FACENET_UNFIT"  # the failed checks, handed from the entrypoint to the worker it starts
WORKER_DOCTOR_TIMEOUT = 330  # doctor's own bound is 5 minutes; compose's healthcheck waits 360 s


def service_checks(settings: Settings) -> list[tuple[str, callable]]:
    """(name, check) for the stack's Redis and MLflow, as the queue's clients reach them."""

    def redis_check() -> Check:
        from services.queue.registry import connect

        try:
            connect(settings.redis_url, timeout=3).ping()
        except Exception as exc:
            return Check("redis", FAIL, f"{settings.redis_display} does not answer ({type(exc).__name__}: {exc})",
                         fix="`facenet-cli stack up` (local), `make up` (compose), or point FACENET_REDIS_URL at it")
        return Check("redis", PASS, f"{settings.redis_display} answers")

    def mlflow_check() -> Check:
        from facenet.errors import UserError
        from facenet.tracking import check_reachable

        if not settings.mlflow_uri:
            return Check("mlflow", FAIL, "no MLflow server is configured",
                         fix="`facenet-cli stack up`, `make up`, or set FACENET_MLFLOW_URI")
        try:
            check_reachable(settings.mlflow_uri)
        except UserError as exc:
            return Check("mlflow", FAIL, str(exc), fix="start it, or point FACENET_MLFLOW_URI at yours")
        return Check("mlflow", PASS, f"{settings.mlflow_uri} answers /health")

    return [("redis", redis_check), ("mlflow", mlflow_check)]


def worker_self_check(device_type: str, devices: list[int]) -> str | None:
    """Run `facenet-cli doctor` on this worker's devices (a process of its own, as an operator would) when
    FACENET_WORKER_DOCTOR=1; None when it passed or is off, else one line naming what failed. The full report
    goes to this process' output (the container's log)."""
    if os.environ.get(WORKER_DOCTOR_ENV, "0") != "1":
        return None
    npus = "2" if device_type == "cpu" else str(len(devices))
    cmd = [sys.executable, "-m", "services.cli", "doctor", "--device", device_type, "--npus", npus, "--json",
           *os.environ.get(DOCTOR_ARGS_ENV, "").split()]
    print(f"facenet worker: checking this host first: {' '.join(cmd[2:])}", flush=True)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_DOCTOR_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"doctor did not finish in {WORKER_DOCTOR_TIMEOUT} s"
    sys.stdout.write(res.stdout)
    sys.stdout.write(res.stderr)
    try:
        report = json.loads(res.stdout)
    except json.JSONDecodeError:
        tail = (res.stderr or res.stdout).strip().splitlines()
        return f"doctor exited {res.returncode}: {tail[-1] if tail else 'no output'}"
    if report.get("ok"):
        print("facenet worker: doctor passed; taking jobs", flush=True)
        return None
    from facenet.doctor import summary_of_failures

    return summary_of_failures(report) or f"doctor exited {res.returncode}"
