"""Celery tasks: thin shells that take a job id, re-read the job, and call plain functions.

plan_dataset -> chord(preprocess_shard x N) -> finalize_dataset [-> train]
train (on train.<device type>) -> services.supervisor.run_train_job

Tasks never import torch at module level (the prefork pool forks from a
parent that must not have started OpenMP threads) and never wait on other
tasks' results.
"""

from __future__ import annotations

import os
import time

from celery import chord

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


@app.task(name="facenet.plan_dataset", bind=True)
def plan_dataset(self, job_id: str) -> dict:
    """List RAW, write the plan into OUT, and fan out one preprocess_shard per shard."""
    from facenet.preprocess.plan import Params, make_plan, save_plan
    from facenet.preprocess.run import check_same_crops

    s, reg = registry()
    job, done = _job_to_work_on(reg, job_id, "before preprocessing")
    if done:
        return done
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
    reg.update(job_id, status=PREPROCESSING, shards=plan.num_shards, shards_done=0,
               progress={"shards": plan.num_shards, "shards_done": 0, "images": len(plan.items)},
               message=f"{len(plan.items)} images in {plan.num_shards} shards")
    plan_json = plan.to_json()
    chord([preprocess_shard.s(job_id, plan_json, i).set(queue=PREPROCESS_QUEUE) for i in range(plan.num_shards)],
          finalize_dataset.s(job_id, plan_json).set(queue=PREPROCESS_QUEUE)).apply_async()
    return {"job": job_id, "shards": plan.num_shards}


def _preprocess_slots(reg: Registry) -> int:
    return max(1, sum(w.get("concurrency", 1) for w in reg.workers() if PREPROCESS_QUEUE in w.get("queues", [])))


@app.task(name="facenet.preprocess_shard", bind=True)
def preprocess_shard(self, job_id: str, plan_json: str, index: int) -> dict:
    """Crop one shard (finished crops are skipped, so a redelivered shard repeats no work)."""
    from facenet.preprocess.plan import Plan
    from facenet.preprocess.shard import run_shard

    s, reg = registry()
    if reg.cancel_requested(job_id):
        return {"index": index, "cancelled": True}
    try:
        rec = run_shard(Plan.from_json(plan_json), index, os.environ.get("FACENET_PREPROCESS_DEVICE", "cpu"))
    except Exception as exc:  # run_shard records bad images itself; this is a broken shard (disk full, ...)
        _fail(reg, job_id, exc)
        raise
    done = reg.r.hincrby(reg.key(job_id), "shards_done", 1)
    job = reg.get(job_id)
    progress = {**(job.get("progress") or {}), "shards_done": done}
    reg.update(job_id, progress=progress)
    self.update_state(state="PROGRESS", meta={"job": job_id, "shard": index, **progress})
    return {"index": index, "images": len(rec["records"]), "faces": sum(1 for r in rec["records"] if "out" in r),
            "skipped": rec["skipped"]}


@app.task(name="facenet.finalize_dataset", bind=True)
def finalize_dataset(self, results: list, job_id: str, plan_json: str) -> dict:
    """Write the lists and manifest; a train job then goes to its device queue."""
    from facenet.preprocess.finalize import finalize, manifest_totals
    from facenet.preprocess.plan import Plan

    s, reg = registry()
    job, done = _job_to_work_on(reg, job_id, "during preprocessing")
    if done:
        return done
    try:
        plan = Plan.from_json(plan_json)
        manifest = finalize(plan)
    except Exception as exc:
        return _fail(reg, job_id, exc)
    summary = {"out": plan.out, **manifest_totals(manifest)}
    if job["kind"] == "preprocess":
        reg.finish(job_id, SUCCEEDED, result=summary, message="")
        return {"job": job_id, "status": SUCCEEDED, **summary}
    reg.update(job_id, status=QUEUED, dataset=summary, preprocessed=time.time(),
               message=f"preprocessed: {summary['faces']} faces of {summary['images']} images")
    reg.update(job_id, task_id=send_train(job))
    return {"job": job_id, "status": QUEUED, **summary}


@app.task(name="facenet.train", bind=True)
def train(self, job_id: str) -> dict:
    """One attempt at a train job (see services.supervisor)."""
    from services.supervisor import run_train_job

    s, reg = registry()

    def report(progress: dict) -> None:
        self.update_state(state="PROGRESS", meta={"job": job_id, **progress})

    return run_train_job(s, reg, job_id, self.request.hostname or "worker", report)
