"""What a worker does besides running tasks: register its capacity, and sweep for lost jobs.

Both run in one thread of the worker's main process, every third of the
heartbeat TTL:
- the worker's capacity (node, device type, device ids, queues, concurrency)
  is written with a TTL, so `submit-train` can refuse requests no live worker
  can ever serve, and a dead worker disappears from `facenet-cli workers`;
- every FACENET_SWEEP_SECONDS, jobs claimed by an attempt whose heartbeat
  expired (its worker was killed) go back to their queue, counting attempts;
  so do preprocessing stages (plan, a shard, finalize) whose task stopped
  heartbeating.
  Exactly one sweeper wins each job (tasks.requeue_train); the dead
  worker's own message, redelivered hours later, finds the job finished or
  held and is dropped.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from celery.signals import celeryd_init, worker_ready, worker_shutdown

from services.config import load_settings
from services.registry import Registry, connect

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
    info = {"node": node, "host": socket.gethostname(), "pid": os.getpid(), "queues": list(queues),
            "concurrency": int(options.get("concurrency") or 1), "started": time.time()}
    from services.doctor import UNFIT_ENV

    unfit = os.environ.get(UNFIT_ENV)  # its doctor failed (entrypoints.check_before_taking_jobs)
    if unfit:
        # Registered without capacity (no job, no gang part comes here), saying what failed and for which type.
        info.update(unfit=unfit, unfit_type=os.environ.get("FACENET_DEVICE_TYPE", "cpu"))
    elif any(q.startswith("train.") for q in queues):
        from services.supervisor import worker_devices

        device_type, devices = worker_devices()
        info.update(device_type=device_type, devices=devices)
    stop = threading.Event()
    _STATE["stop"] = stop
    threading.Thread(target=_housekeeping, args=(info, stop), daemon=True, name="facenet-housekeeping").start()
    if "device_type" in info:  # this worker's part in jobs over several nodes (services.gang)
        from services.gang import Agent

        Agent(node, stop).start()


@worker_shutdown.connect
def _stop_housekeeping(**_):
    stop = _STATE.get("stop")
    if stop is not None:
        stop.set()
        try:
            s = load_settings()
            Registry(connect(s.redis_url), s.heartbeat_ttl).unregister_worker(_STATE.get("node", ""))
        except Exception:  # Redis gone too: the registration's TTL removes it
            pass


PRUNE_SECONDS = 600


def _housekeeping(info: dict, stop: threading.Event) -> None:
    s = load_settings()
    reg = Registry(connect(s.redis_url), s.heartbeat_ttl, s.job_retention_seconds)
    next_sweep = next_prune = 0.0
    while not stop.is_set():
        try:
            reg.register_worker(info["node"], {**info, "heartbeat": time.time()})
            if time.time() >= next_sweep:
                sweep(reg, s.max_attempts)
                next_sweep = time.time() + s.sweep_seconds
            if time.time() >= next_prune:
                reg.prune(s.job_history)
                next_prune = time.time() + PRUNE_SECONDS
        except Exception as exc:  # Redis restarting: keep trying; registrations come back with it
            print(f"facenet housekeeping: {type(exc).__name__}: {exc}", flush=True)
        stop.wait(max(1.0, s.heartbeat_ttl / 3))


def sweep(reg: Registry, max_attempts: int = 3) -> list[str]:
    """Queue again every claimed job, and every preprocessing stage, whose task stopped heartbeating;
    returns what was requeued."""
    from services.registry import FAILED, PREPROCESSING, TERMINAL
    from services.tasks import requeue_train, send_stage, send_train, stage_never_finished

    requeued = []
    jobs = reg.jobs_by_id(reg.active_ids())  # every job not ended, however old (one read serves both loops)
    for job in jobs:
        if job["status"] != PREPROCESSING:
            continue
        for stage in reg.stalled_stages(job["id"]) + _reserved_and_lost(reg, job):
            lost = reg.r.hincrby(reg.key(job["id"]) + ":resends", stage, 1)
            old_task = reg.r.hget(reg.key(job["id"]) + ":tasks", stage)
            if lost > max_attempts:
                reg.finish(job["id"], FAILED, error=stage_never_finished(stage, lost))
                break
            if old_task:
                report_lost_task(old_task, job["id"], f"preprocessing {stage}: its worker was lost")
            send_stage(job["id"], stage, reg)
            print(f"facenet sweep: job {job['id']} {stage} requeued (its worker was lost)", flush=True)
            requeued.append(f"{job['id']}:{stage}")
    for job in jobs:  # queued train jobs whose message is gone (Redis killed within its AOF fsync second)
        if _queued_and_lost(reg, job):
            reg.update(job["id"], task_id=send_train(job))
            print(f"facenet sweep: job {job['id']} sent again (its queued message was lost)", flush=True)
            requeued.append(job["id"])
    for job in jobs:  # train jobs an attempt claimed and that have not ended
        if job.get("claimed") != "1" or job["status"] in TERMINAL or job.get("kind") != "train" \
                or reg.alive(job["id"]):
            continue
        where = f"worker {job['worker']}" if job.get("worker") else "its worker"
        why = f"{where} was lost during attempt {job.get('attempts')}"
        if requeue_train(reg, job, why):
            if job.get("task_id"):
                report_lost_task(job["task_id"], job["id"], why, job.get("worker"))
            print(f"facenet sweep: job {job['id']} requeued ({where} lost)", flush=True)
            requeued.append(job["id"])
    return requeued


def report_lost_task(task_id: str, job_id: str, why: str, node: str | None = None) -> None:
    """Tell Flower (task events) and the result backend that a task whose worker died has failed, on
    the dead worker's behalf: otherwise it shows STARTED forever beside the attempt that replaced it."""
    from celery.exceptions import WorkerLostError

    from services.celery_app import app

    exc = WorkerLostError(f"{why} (job {job_id}); the job was sent again")
    try:
        app.backend.mark_as_failure(task_id, exc)
    except Exception as err:  # Flower's view is a mirror: the job itself is already requeued
        print(f"facenet sweep: could not report task {task_id} as lost: {type(err).__name__}: {err}", flush=True)
    send_task_events(node or "facenet-sweep", ("task-failed", {"uuid": task_id, "exception": repr(exc),
                                                               "traceback": ""}))


def send_task_events(hostname: str, *events: tuple[str, dict]) -> None:
    """Celery task events (type, fields) sent as worker `hostname`: what Flower shows of work that is no Celery
    task of its own (a node's part of a gang) or whose worker cannot say it any more (a dead worker's task).
    Flower is a mirror: a failure to send is said on stdout and never stops the work."""
    from services.celery_app import app

    try:
        with app.connection_for_write() as conn:
            dispatcher = app.events.Dispatcher(conn, hostname=hostname, enabled=True)
            for kind, fields in events:
                dispatcher.send(kind, **fields)
            dispatcher.close()
    except Exception as err:
        print(f"facenet: could not send {', '.join(k for k, _ in events)} to Flower: {type(err).__name__}: {err}",
              flush=True)


_QUEUED_SUSPECTS: dict[str, str] = {}


def _queued_and_lost(reg: Registry, job: dict) -> bool:
    """A QUEUED train job no attempt holds whose message is not in its queue, two sweeps in a row: Redis lost
    it (one run with appendfsync everysec loses up to a second of writes to a kill -9), or a worker killed
    before it started the task holds it (kombu's `unacked`, for the visibility timeout: days). A live worker starts
    what it takes within milliseconds; a duplicate sent by mistake is harmless (its claim finds the job
    held or done)."""
    from services.celery_app import train_queue
    from services.registry import QUEUED

    task_id = job.get("task_id")
    if job["status"] != QUEUED or job.get("kind") != "train" or job.get("claimed") == "1" or not task_id \
            or reg.alive(job["id"]):
        _QUEUED_SUSPECTS.pop(job["id"], None)
        return False
    if any(task_id in m for m in reg.r.lrange(train_queue(job["device_type"]), 0, -1)):
        _QUEUED_SUSPECTS.pop(job["id"], None)
        return False
    previous, _QUEUED_SUSPECTS[job["id"]] = _QUEUED_SUSPECTS.get(job["id"]), task_id
    return previous == task_id


_SUSPECTS: dict[str, frozenset] = {}


def _reserved_and_lost(reg: Registry, job: dict) -> list[str]:
    """Shards whose message a killed worker had taken but not started: nothing is queued, nothing of
    the job runs, yet shards are missing. Sent again only when two sweeps in a row see the same gap
    (a live worker holds a message it took for milliseconds, not for a whole sweep interval)."""
    from services.celery_app import PREPROCESS_QUEUE

    total = int(reg.r.hget(reg.key(job["id"]), "shards") or 0)
    if not total or reg.r.llen(PREPROCESS_QUEUE) or reg.r.scard(reg.key(job["id"]) + ":started"):
        _SUSPECTS.pop(job["id"], None)
        return []
    done = {int(i) for i in reg.r.smembers(reg.key(job["id"]) + ":shards")}
    # Every shard done but the job still preprocessing: finalize's message was the one lost.
    missing = frozenset(f"shard:{i}" for i in range(total) if i not in done) or frozenset({"finalize"})
    previous = _SUSPECTS.get(job["id"])
    _SUSPECTS[job["id"]] = missing
    return sorted(missing) if missing and missing == previous else []
