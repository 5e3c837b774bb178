"""Celery tasks: thin shells that take a job id, re-read the job, and call plain functions.

plan_dataset -> preprocess_shard x N -> finalize_dataset [-> train]   (fan-in in the registry)
train (on train.<device type>) -> services.supervisor.run_train_job

Tasks never import torch at module level (the prefork pool forks from a
parent that must not have started OpenMP threads) and never wait on other
tasks' results.
"""

from __future__ import annotations

import os
import time

from facenet.errors import UserError
from services.celery_app import PREPROCESS_QUEUE, app, train_queue
from services.config import check_path_allowed, load_settings
from services.registry import CANCELLED, FAILED, PREPROCESSING, QUEUED, SUCCEEDED, TERMINAL, Registry, connect


def registry():
    s = load_settings()
    return s, Registry(connect(s.redis_url), s.heartbeat_ttl)


def _fail(reg: Registry, job_id: str, exc: BaseException) -> dict:
    error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    reg.finish(job_id, FAILED, error=error)
    return {"job": job_id, "status": FAILED, "error": error}


def _job_to_work_on(reg: Registry, job_id: str, cancelled_while: str) -> tuple[dict | None, dict | None]:
    """(job, None) when there is work to do, else (None, what the task returns): a finished job's
    redelivered message is dropped, a cancel request ends the job here."""
    job = reg.get(job_id)
    if job is None or job["status"] in TERMINAL:
        return None, {"job": job_id, "skipped": "finished"}
    if reg.cancel_requested(job_id):
        reg.finish(job_id, CANCELLED, message=f"cancelled {cancelled_while}")
        return None, {"job": job_id, "status": CANCELLED}
    return job, None


def send_train(job: dict) -> str:
    res = app.send_task("facenet.train", args=[job["id"]], queue=train_queue(job["device_type"]))
    return res.id


class _Stage:
    """A preprocessing stage's heartbeat while its task runs (see Registry.stage_start)."""

    def __init__(self, reg: Registry, job_id: str, stage: str):
        import threading
        import uuid

        self.reg, self.job_id, self.stage, self.token = reg, job_id, stage, uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"stage-{stage}")

    def _beat(self) -> None:
        while not self._stop.wait(max(1.0, self.reg.ttl / 3)):
            try:
                self.reg.stage_beat(self.job_id, self.stage, self.token)
            except Exception:  # Redis restarting: the TTL covers a short gap
                continue

    def __enter__(self) -> "_Stage":
        self.reg.stage_start(self.job_id, self.stage, self.token)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.reg.stage_end(self.job_id, self.stage)  # no longer in flight, however it ended


def send_stage(job_id: str, stage: str) -> str:
    """Queue a preprocessing stage: 'plan', 'shard:<i>' or 'finalize'."""
    if stage.startswith("shard:"):
        return app.send_task("facenet.preprocess_shard", args=[job_id, int(stage.split(":", 1)[1])],
                             queue=PREPROCESS_QUEUE).id
    name = {"plan": "facenet.plan_dataset", "finalize": "facenet.finalize_dataset"}[stage]
    return app.send_task(name, args=[job_id], queue=PREPROCESS_QUEUE).id


_PLANS: dict[tuple[str, str], object] = {}


def _plan_of(job: dict):
    """The job's plan, read from OUT once per worker process (a VGGFace2 plan is ~200 MB of JSON, too
    big to travel in every shard's message), checked against the id the planner recorded."""
    from facenet.preprocess.plan import load_plan

    key = (job["preprocess_out"], job["plan_id"])
    if key not in _PLANS:
        plan = load_plan(job["preprocess_out"])
        if plan.plan_id != job["plan_id"]:
            raise UserError(f"{job['preprocess_out']}: its plan changed under this job (another job re-planned "
                            "the same output folder)")
        _PLANS.clear()
        _PLANS[key] = plan
    return _PLANS[key]


@app.task(name="facenet.plan_dataset", bind=True)
def plan_dataset(self, job_id: str) -> dict:
    """List RAW, write the plan into OUT, and queue one preprocess_shard per shard."""
    from facenet.preprocess.plan import Params, make_plan, save_plan
    from facenet.preprocess.run import check_same_crops

    s, reg = registry()
    job, done = _job_to_work_on(reg, job_id, "before preprocessing")
    if done:
        return done
    with _Stage(reg, job_id, "plan"):
        try:
            raw = check_path_allowed(job["preprocess_from"], s.data_roots, "--preprocess-from")
            out = check_path_allowed(job["preprocess_out"], s.data_roots, "preprocessing output")
            params = Params(**job["params"])
            plan = make_plan(raw, out, params)
            if not params.shard_size:
                plan = plan.with_shard_size(_preprocess_slots(reg))
            check_same_crops(plan)
            os.makedirs(plan.out, exist_ok=True)
            save_plan(plan)
        except Exception as exc:
            return _fail(reg, job_id, exc)
        reg.update(job_id, status=PREPROCESSING, shards=plan.num_shards, plan_id=plan.plan_id,
                   progress={"shards": plan.num_shards, "shards_done": 0, "images": len(plan.items)},
                   message=f"{len(plan.items)} images in {plan.num_shards} shards")
        for i in range(plan.num_shards):
            send_stage(job_id, f"shard:{i}")
    return {"job": job_id, "shards": plan.num_shards}


def _preprocess_slots(reg: Registry) -> int:
    return max(1, sum(w.get("concurrency", 1) for w in reg.workers() if PREPROCESS_QUEUE in w.get("queues", [])))


@app.task(name="facenet.preprocess_shard", bind=True)
def preprocess_shard(self, job_id: str, index: int) -> dict:
    """Crop one shard (finished crops are skipped, so a redelivered shard repeats no work); the last
    shard to finish queues finalize_dataset."""
    from facenet.preprocess.shard import run_shard

    s, reg = registry()
    job, done = _job_to_work_on(reg, job_id, "during preprocessing")
    if done:
        return done
    stage = f"shard:{index}"
    with _Stage(reg, job_id, stage):
        try:
            plan = _plan_of(job)
            rec = run_shard(plan, index, os.environ.get("FACENET_PREPROCESS_DEVICE", "cpu"))
        except Exception as exc:  # run_shard records bad images itself; this is a broken shard (disk full, ...)
            return _fail(reg, job_id, exc)
        n, last = reg.shard_done(job_id, index, plan.num_shards)
    progress = {**(job.get("progress") or {}), "shards_done": n}
    reg.update(job_id, progress=progress)
    self.update_state(state="PROGRESS", meta={"job": job_id, "shard": index, **progress})
    if last:
        send_stage(job_id, "finalize")
    return {"index": index, "images": len(rec["records"]), "faces": sum(1 for r in rec["records"] if "out" in r),
            "skipped": rec["skipped"]}


@app.task(name="facenet.finalize_dataset", bind=True)
def finalize_dataset(self, job_id: str) -> dict:
    """Write the lists and manifest; a train job then goes to its device queue."""
    from facenet.preprocess.finalize import finalize, manifest_totals

    s, reg = registry()
    job, done = _job_to_work_on(reg, job_id, "during preprocessing")
    if done:
        return done
    with _Stage(reg, job_id, "finalize"):
        try:
            plan = _plan_of(job)
            summary = {"out": plan.out, **manifest_totals(finalize(plan))}
        except Exception as exc:
            return _fail(reg, job_id, exc)
        if job["kind"] == "preprocess":
            reg.finish(job_id, SUCCEEDED, result=summary, message="")
        else:
            reg.update(job_id, status=QUEUED, dataset=summary, preprocessed=time.time(),
                       message=f"preprocessed: {summary['faces']} faces of {summary['images']} images")
            reg.update(job_id, task_id=send_train(job))
    return {"job": job_id, "status": SUCCEEDED if job["kind"] == "preprocess" else QUEUED, **summary}


@app.task(name="facenet.train", bind=True)
def train(self, job_id: str) -> dict:
    """One attempt at a train job (see services.supervisor)."""
    from services.supervisor import run_train_job

    s, reg = registry()

    def report(progress: dict) -> None:
        self.update_state(state="PROGRESS", meta={"job": job_id, **progress})

    return run_train_job(s, reg, job_id, self.request.hostname or "worker", report)
