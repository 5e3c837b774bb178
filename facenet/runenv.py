"""The trainer's environment, defined once for both sides: what a queue worker sets on the trainer it starts
(services.queue.trainer) and what the trainer reads (facenet.train). Also the one parser of device lists and
the one share of the host's cores. Torch-free: the CLI, the worker and the entrypoints import it."""

from __future__ import annotations

import os

from facenet.errors import UserError
from facenet.fsutil import cpu_cores

# Set by a worker on its trainer ---------------------------------------------------------------------------
# The worker's pid: the trainer kills its own process group when it is gone, so a worker killed outright
# (kill -9, a container stopping) never leaves an orphan trainer holding devices while the job resumes elsewhere.
WATCH_PID_ENV = "FACENET_WATCH_PID"
# What a trainer holds, readable from outside (the chaos suite checks no device is held twice at once):
ATTEMPT_ENV = "FACENET_ATTEMPT"  # the attempt's lease holder, <job id>:<attempt token>; a gang's node R adds #node<R>
LEASE_ENV = "FACENET_LEASE"  # <node>:<device>,<device>
HEARTBEAT_ENV = "FACENET_TRAINER_HEARTBEAT"  # a file the trainer's loops touch: the worker's stall detector reads it
# <fd>:<deadline>: a pipe from the attempt carrying each new deadline (CLOCK_MONOTONIC seconds, one per line) and
# the one at start. Past its deadline the trainer kills itself, whatever its worker does (services/queue/fence.py).
FENCE_ENV = "FACENET_FENCE"
MLFLOW_CONNECT_ENV = "FACENET_MLFLOW_CONNECT_SECONDS"  # how long the trainer waits for MLflow at start
MLFLOW_CONNECT_DEFAULT = 15.0  # by hand; a worker hands its own wait (FACENET_MLFLOW_WAIT_SECONDS) down
# A job over several nodes: this node's rank and node 0's rendezvous endpoint (HOST:PORT).
NODE_RANK_ENV = "FACENET_NODE_RANK"
RDZV_ENDPOINT_ENV = "FACENET_RDZV_ENDPOINT"
# The address other nodes reach this node at (a host with several NICs): the rendezvous a leading node
# advertises, and the NIC the collective library binds (devices.collective_env).
NODE_ADDRESS_ENV = "FACENET_NODE_ADDRESS"

# Set on a worker (compose, the local stack) --------------------------------------------------------------
DEVICE_TYPE_ENV = "FACENET_DEVICE_TYPE"
DEVICES_ENV = "FACENET_DEVICES"
# The threads of one CPU device when several workers share a host (local "nodes"); default: cpu_share.
CPU_THREADS_ENV = "FACENET_CPU_THREADS"

# Set by hand ----------------------------------------------------------------------------------------------
# How many processes the ModelZoo scripts start (scripts/*.sh).
NPROC_ENV = "FACENET_NPROC"
# Seconds a trainer waits for another trainer of its output folder and rank to go (facenet/train/sole.py).
TRAINER_LOCK_WAIT_ENV = "FACENET_TRAINER_LOCK_WAIT"


def parse_devices(text: str) -> list[int]:
    """'0-7' or '0,2,4' or '0-1,4' -> device ids (UserError naming the value otherwise)."""
    ids: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                ids.extend(range(lo, hi + 1))
            else:
                ids.append(int(part))
    except ValueError:
        raise UserError(f"{DEVICES_ENV}={text!r}: expected ids like 0-7 or 0,1,2") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise UserError(f"{DEVICES_ENV}={text!r}: expected distinct non-negative ids like 0-7")
    return ids


def worker_devices(environ=None) -> tuple[str, list[int]]:
    """A worker's device type and the device ids it owns (FACENET_DEVICE_TYPE, FACENET_DEVICES)."""
    environ = os.environ if environ is None else environ
    return environ.get(DEVICE_TYPE_ENV, "cpu"), parse_devices(environ.get(DEVICES_ENV, "0"))


def cpu_share(parts: int) -> int:
    """Threads for one of `parts` processes sharing the cores this process may run on (its affinity mask):
    N CPU processes that each took every core would thrash."""
    return max(1, cpu_cores() // max(1, parts))


def mlflow_connect_seconds(environ=None) -> float:
    environ = os.environ if environ is None else environ
    return float(environ.get(MLFLOW_CONNECT_ENV) or MLFLOW_CONNECT_DEFAULT)
