"""What a worker does besides running tasks (Celery signals in its main process): register its capacity, sweep
for lost work, and run its part in other nodes' gangs.

One housekeeping thread, every third of the heartbeat TTL, writes the worker's capacity (node, device type,
device ids, queues, concurrency) with a TTL, so `submit-train` can refuse requests no live worker can ever
serve and a dead worker disappears from `facenet-cli workers`; every FACENET_SWEEP_SECONDS it runs the sweep
(services.queue.sweep). A device worker also starts its gang agent (services.queue.gang).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

from celery.signals import celeryd_init, worker_ready, worker_shutdown

from facenet.runenv import DEVICE_TYPE_ENV, worker_devices

from services.config import load_settings
from services.queue.registry import registry_for
from services.queue.sweep import sweep

_STATE: dict = {}


@celeryd_init.connect
def _remember_options(sender=None, instance=None, conf=None, options=None, **_):
    _STATE["node"] = sender
    _STATE["options"] = options or {}


@worker_ready.connect
def _start_housekeeping(sender=None, **_):
    node = _STATE.get("node") or getattr(sender, "hostname", socket.gethostname())
    options = _STATE.get("options", {})
    queues = options.get("queues") or []
    if isinstance(queues, str):
        queues = queues.split(",")
    # token: this process' registration, which only this process removes when it stops (two processes given the
    # same node name, a misconfiguration, each heartbeat the key; the one that stops first left the other unlisted).
    _STATE["token"] = uuid.uuid4().hex
    info = {"node": node, "host": socket.gethostname(), "pid": os.getpid(), "queues": list(queues),
            "concurrency": int(options.get("concurrency") or 1), "started": time.time(), "token": _STATE["token"]}
    from services.queue.doctor import UNFIT_ENV

    unfit = os.environ.get(UNFIT_ENV)  # its doctor failed (entrypoints.check_before_taking_jobs)
    if unfit:
        # Registered without capacity (no job, no gang part comes here), saying what failed and for which type.
        info.update(unfit=unfit, unfit_type=os.environ.get(DEVICE_TYPE_ENV, "cpu"))
    elif any(q.startswith("train.") for q in queues):
        device_type, devices = worker_devices()
        info.update(device_type=device_type, devices=devices)
    stop = threading.Event()
    _STATE["stop"] = stop
    threading.Thread(target=_housekeeping, args=(info, stop), daemon=True, name="facenet-housekeeping").start()
    if "device_type" in info:  # this worker's part in jobs over several nodes (services.queue.gang)
        from services.queue.gang import Agent

        Agent(node, stop).start()


@worker_shutdown.connect
def _stop_housekeeping(**_):
    stop = _STATE.get("stop")
    if stop is not None:
        stop.set()
        try:
            s = load_settings()
            registry_for(s).unregister_worker(_STATE.get("node", ""), _STATE.get("token", ""))
        except Exception:  # Redis gone too: the registration's TTL removes it
            pass


PRUNE_SECONDS = 600


def _housekeeping(info: dict, stop: threading.Event) -> None:
    s = load_settings()
    reg = registry_for(s)
    next_sweep = next_prune = 0.0
    last_other, warned = None, set()
    while not stop.is_set():
        # Each part on its own: a registration Redis refuses must not stop the sweeps, nor the reverse.
        try:
            other = reg.register_worker(info["node"], {**info, "heartbeat": time.time()})
            _warn_shared_name(info["node"], other, last_other, warned)
            last_other = other["token"] if other else None
        except Exception as exc:  # Redis restarting: keep trying; registrations come back with it
            print(f"facenet housekeeping: {type(exc).__name__}: {exc}", flush=True)
        try:
            if time.time() >= next_sweep:
                sweep(reg, s.max_attempts)
                next_sweep = time.time() + s.sweep_seconds
            if time.time() >= next_prune:
                reg.prune(s.job_history)
                next_prune = time.time() + PRUNE_SECONDS
        except Exception as exc:
            print(f"facenet housekeeping: {type(exc).__name__}: {exc}", flush=True)
        stop.wait(max(1.0, s.heartbeat_ttl / 3))


def _warn_shared_name(node: str, other: dict | None, last_token: str | None, warned: set) -> None:
    """One line when another live process registers under this worker's node name: its registration replaced by
    ours on two heartbeats in a row (a killed predecessor's is replaced once, then never written again). Once per
    other registrant, for at most 16 of them; what it wrote (anyone can write to Redis) is shown by repr."""
    if not other or other["token"] != last_token or other["token"] in warned or len(warned) >= 16:
        return
    warned.add(other["token"])
    print(f"facenet housekeeping: another worker (pid {other['pid']!r} on host {other['host']!r}) registers as node "
          f"{node!r} too; give each worker its own FACENET_WORKER_NAME. While both run `workers` lists one of them, "
          "and when one stops the other is unlisted until its next heartbeat.", flush=True)
