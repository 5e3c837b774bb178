"""The client side of the queue: submit, look up, follow and cancel jobs (what `facenet-cli` calls)."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from typing import Callable

from facenet.confine import shown
from facenet.errors import InputError, UserError
from facenet.spec import NPU_MAX_PER_NODE, RESERVED_TAGS, TrainSpec, check_npu_count
from services.config import DEVICE_TYPES, Settings, check_path_allowed
from services.queue.registry import (CANCELLED, FAILED, PREPROCESSING, QUEUED, TERMINAL, Registry, registry_for,
                                     unreachable)


def open_registry(settings: Settings) -> Registry:
    """A registry on a Redis that answers, or UserError in one line naming the URL."""
    import redis

    reg = registry_for(settings, timeout=3, client=True)
    try:
        reg.r.ping()
    except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError, redis.ResponseError, OSError) as exc:
        raise unreachable(settings.redis_display, exc) from None
    return reg


def capacities(reg: Registry) -> list[dict]:
    return [w for w in reg.workers() if w.get("device_type")]


def pick_device_type(reg: Registry, requested: str, npus: int, nnodes: int = 1) -> str:
    """`requested`, or for 'auto' the best registered type (npu, then cuda, then cpu); refuses a request
    no registered workers can ever serve (npus / nnodes devices on each of nnodes workers), listing what is
    registered."""
    workers = capacities(reg)
    listing = ", ".join([f"{w['node']}: {len(w['devices'])} {w['device_type']}" for w in workers] +
                        [f"{w['node']}: no devices, it failed its doctor check ({w['unfit']})"
                         for w in reg.workers() if w.get("unfit")]) or "none registered"
    if requested == "auto":
        present = [t for t in DEVICE_TYPES if any(w["device_type"] == t for w in workers)]
        if not present:
            raise UserError(f"no device worker is registered (workers: {listing}); start one "
                            "(`facenet-cli stack up`, or `make up`)")
        fitting = [t for t in present if sum(len(w["devices"]) >= npus // nnodes for w in workers
                                             if w["device_type"] == t) >= nnodes]
        requested = (fitting or present)[0]
    if requested not in DEVICE_TYPES:
        raise InputError(f"--device-type {requested}: choose one of auto, {', '.join(DEVICE_TYPES)}")
    check_npu_count(requested, npus, nnodes)
    per_node = npus // nnodes
    able = sum(len(w["devices"]) >= per_node for w in workers if w["device_type"] == requested)
    if able < nnodes:
        if nnodes == 1:
            raise UserError(f"--npus {npus}: no registered {requested} worker has {npus} device(s) "
                            f"(capacities: {listing})")
        raise UserError(f"--npus {npus} over --nnodes {nnodes}: {able} registered {requested} worker(s) have "
                        f"{per_node} device(s), {nnodes} are needed (capacities: {listing})")
    return requested


def nodes_needed(reg: Registry, device_type: str, npus: int) -> int:
    """How many workers a job of `npus` devices spans when no one worker has that many: npus / the most any
    worker of the type (auto: of the first type with enough such workers) has, when that divides; else 1
    (and pick_device_type says why it cannot run)."""
    workers = capacities(reg)
    if any(len(w["devices"]) >= npus for w in workers if device_type in ("auto", w["device_type"])):
        return 1
    for t in (DEVICE_TYPES if device_type == "auto" else (device_type,)):
        sizes = [len(w["devices"]) for w in workers if w["device_type"] == t]
        most = max(sizes, default=0)
        if most and npus % most == 0 and sum(n >= most for n in sizes) >= npus // most:
            return npus // most
    return 1


def _check_local_path(path: str, settings: Settings, what: str) -> str:
    path = check_path_allowed(path, settings.data_roots, what)
    # The local stack shares this filesystem: say now what the worker would say later.
    if settings.from_stack_file and not os.path.isdir(path):
        raise InputError(f"{what} {shown(path)}: no such directory")
    return path


def check_job_spec(spec: TrainSpec, settings: Settings) -> None:
    """What a queued job may not ask for, checked before anything is queued: tags the service sets,
    paths outside the data roots."""
    reserved = sorted(k for k in spec.tags if k in RESERVED_TAGS or k.startswith("mlflow."))
    if reserved:
        raise InputError(f"--tag {reserved[0]}: set by the service on every run; choose another key")
    from services.queue.trainer import check_job_paths

    check_job_paths(spec, settings.data_roots, os.path.join(settings.runs_dir, "job"))  # checks; changes nothing


@dataclasses.dataclass(frozen=True)
class TrainSubmission:
    """A train submission every check passed: the spec as the client gave it, and the request's values
    resolved (--data, --preprocess-from). What `submit_train` queues; nothing checks it twice."""
    spec: TrainSpec
    device_type: str
    data: str
    raw: str | None = None
    params: object | None = None
    experiment: str | None = None


@dataclasses.dataclass(frozen=True)
class PreprocessSubmission:
    raw: str
    out: str
    params: object


def check_train_submission(settings: Settings, spec: TrainSpec, device_type: str = "auto",
                           preprocess_from: str | None = None, params=None,
                           experiment: str | None = None) -> TrainSubmission:
    """Every check of a train submission that needs no Redis: values, the device count, tags, paths. The CLI
    runs it before it connects, so bad input queues nothing and names itself even with Redis down."""
    spec.validate()
    if params is not None:
        params.validate()
    if spec.nnodes > 1 or spec.npus <= NPU_MAX_PER_NODE:  # more: nodes are counted at submit
        check_npu_count(device_type, spec.npus, spec.nnodes)
    check_job_spec(spec, settings)
    if preprocess_from:
        data = check_path_allowed(spec.data, settings.data_roots, "--data")
        raw = _check_local_path(preprocess_from, settings, "--preprocess-from")
    else:
        data, raw = _check_local_path(spec.data, settings, "--data"), None
    return TrainSubmission(spec, device_type, data, raw, params, experiment)


def check_preprocess_submission(settings: Settings, raw: str, out: str, params) -> PreprocessSubmission:
    """The preprocessing counterpart of `check_train_submission`: RAW and OUT resolved."""
    params.validate()
    return PreprocessSubmission(_check_local_path(raw, settings, "RAW"),
                                check_path_allowed(out, settings.data_roots, "OUT"), params)


# A submission is a few Redis calls and one message, and Redis can stall for seconds under it (an fsync-always AOF
# on a busy disk: a docker build beside the stack held one for over a second here). Every step may be repeated:
# the job id and its first message's id are chosen here, the record names that message before it is sent (one
# Lua step that writes only a record not there yet), and a message sent twice finds the job taken by its first copy. So a step whose reply does not come is
# tried again until SUBMIT_SECONDS have passed. A client that gives up (or dies) after the record was written
# loses nothing either: the sweep sends a queued job's named message again when no queue holds it.
SUBMIT_SECONDS = 30.0


def _steps(what: str, seconds: float = SUBMIT_SECONDS) -> Callable:
    """`step(fn)`: fn(), again on a Redis timeout or lost connection until `seconds` have passed (local monotonic
    time), then UserError in one line."""
    import redis
    from kombu.exceptions import OperationalError

    deadline = time.monotonic() + seconds

    def step(fn: Callable):
        while True:
            try:
                return fn()
            except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
                cause = exc.__cause__ or exc.__context__ if isinstance(exc, OperationalError) else exc
                if isinstance(cause, redis.AuthenticationError) or not isinstance(
                        cause, (redis.ConnectionError, redis.TimeoutError, OSError)):
                    raise UserError(f"Redis refused {what}: {type(cause or exc).__name__}: {cause or exc}") from None
                if time.monotonic() >= deadline:
                    raise UserError(f"Redis stopped answering while {what} ({type(exc).__name__}, for {seconds:.0f} "
                                    "s); `facenet-cli jobs` shows whether it was queued (a recorded job is sent "
                                    "by the workers' sweep, not lost)") from None
                time.sleep(0.5)
    return step


def _preprocess_worker_registered(reg: Registry) -> bool:
    return any("preprocess" in w.get("queues", []) for w in reg.workers())


def submit_train(settings: Settings, reg: Registry, sub: TrainSubmission) -> dict:
    """Create the job record of a checked submission and queue its first task; returns the job. What the
    record's spec says is what the client asked, with --data resolved, the device type picked and the node
    count a request larger than one worker needs; the worker decides the rest (TrainSpec.placed)."""
    step = _steps("queueing the job")
    spec = sub.spec
    if spec.nnodes == 1:  # --npus 16 on workers of 8 devices: a gang of 2
        spec = dataclasses.replace(spec, nnodes=step(lambda: nodes_needed(reg, sub.device_type, spec.npus)))
    device_type = step(lambda: pick_device_type(reg, sub.device_type, spec.npus, spec.nnodes))
    from services.queue import mlflow_runs

    mlflow_runs.check_reachable(settings.mlflow_uri)
    job_id, task_id = reg.new_id(), str(uuid.uuid4())
    fields = {"device_type": device_type, "npus": spec.npus, "experiment": sub.experiment or settings.experiment,
              "output": os.path.join(settings.runs_dir, job_id), "task_id": task_id}
    tasks = None
    if sub.raw:
        if not step(lambda: _preprocess_worker_registered(reg)):
            raise UserError("--preprocess-from: no preprocessing worker is registered")
        fields["preprocess_from"], fields["preprocess_out"] = sub.raw, sub.data
        fields["params"] = dataclasses.asdict(sub.params or _default_params())
        fields["status"], fields["message"], tasks = PREPROCESSING, "planning shards", {"plan": task_id}
    fields["spec"] = dataclasses.replace(spec, data=sub.data, device=device_type).to_dict()
    step(lambda: reg.create("train", fields, job_id=job_id, tasks=tasks))
    from services.queue.send import send_stage, send_train

    if sub.raw:
        step(lambda: send_stage(job_id, "plan", task_id=task_id))
    else:
        step(lambda: send_train(job_id, device_type, task_id=task_id))
    step(lambda: reg.update(job_id, submitted=time.time()))
    return step(lambda: reg.get(job_id))


def submit_preprocess(settings: Settings, reg: Registry, sub: PreprocessSubmission) -> dict:
    step = _steps("queueing the job")
    if not step(lambda: _preprocess_worker_registered(reg)):
        raise UserError("no preprocessing worker is registered; start one (`facenet-cli stack up`, or `make up`)")
    job_id, task_id = reg.new_id(), str(uuid.uuid4())
    fields = {"preprocess_from": sub.raw, "preprocess_out": sub.out, "params": dataclasses.asdict(sub.params),
              "status": PREPROCESSING, "message": "planning shards", "task_id": task_id}
    step(lambda: reg.create("preprocess", fields, job_id=job_id, tasks={"plan": task_id}))
    from services.queue.send import send_stage

    step(lambda: send_stage(job_id, "plan", task_id=task_id))
    step(lambda: reg.update(job_id, submitted=time.time()))
    return step(lambda: reg.get(job_id))


def _default_params():
    from facenet.preprocess.plan import Params

    return Params()


def cancel(reg: Registry, job_id: str, wait: float = 60.0, mlflow_uri: str | None = None) -> dict:
    """Ask the job to stop; a job no worker holds is cancelled at once. Returns the job as it ends up."""
    from services.queue import mlflow_runs

    job = reg.find(job_id)
    if job["status"] in TERMINAL:
        return job
    reg.request_cancel(job["id"])
    if job["status"] in (QUEUED, PREPROCESSING) and not reg.alive(job["id"]):
        # No training attempt holds it: mark it now. Its queued messages are dropped when a worker takes
        # them, and shards already running finish their shard (finished crops are reused by a rerun).
        # A job queued again after a lost attempt has a run already: no worker will end it.
        mlflow_runs.end_job_run(mlflow_uri, job, "KILLED")
        reg.finish(job["id"], CANCELLED, message=f"cancelled while {job['status'].lower()}")
        return reg.get(job["id"])
    deadline = time.time() + wait
    while time.time() < deadline:  # a running trainer: its supervisor stops the process group
        job = reg.get(job["id"])
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.3)
    return reg.get(job["id"])


PROGRESS_KEYS = ("epoch", "epochs", "step", "steps", "fps", "loss", "acc1")


def view(job: dict) -> dict:
    """The JSON shape scripts rely on (`status --json`)."""
    progress = job.get("progress") or {}
    return {
        "id": job["id"], "kind": job.get("kind"), "status": job["status"], "created": job.get("created"),
        "started": job.get("started"), "trainer_started": job.get("trainer_started"),
        "finished": job.get("finished"), "attempts": job.get("attempts", 0),
        "device_type": job.get("device_type"), "npus": job.get("npus"), "worker": job.get("worker"),
        "progress": {**{k: progress.get(k) for k in PROGRESS_KEYS},
                     **{k: v for k, v in progress.items() if k not in PROGRESS_KEYS}},
        "mlflow_run_id": job.get("mlflow_run_id"), "checkpoint": job.get("checkpoint"), "output": job.get("output"),
        "message": job.get("message"), "error": job.get("error"), "result": job.get("result"),
        "dataset": job.get("dataset"), "nodes": job.get("nodes"),
    }


def follow(reg: Registry, job_id: str, on_change: Callable[[dict], None], on_log: Callable[[str], None] | None = None,
           interval: float = 0.5) -> dict:
    """Poll the job until it ends, calling on_change with each new state and on_log with new log lines."""
    seen_log = 0
    last = None
    while True:
        job = reg.get(job_id)
        if job is None:
            raise UserError(f"job {job_id} disappeared from the registry")
        if on_log is not None:
            lines, seen_log = reg.read_log(job_id, seen_log)
            for line in lines:
                on_log(line)
        state = (job["status"], job.get("message"), str(job.get("progress")))
        if state != last:
            on_change(job)
            last = state
        if job["status"] in TERMINAL:
            return job
        time.sleep(interval)


def exit_code(job: dict) -> int:
    return 0 if job["status"] not in (FAILED, CANCELLED) else 1
