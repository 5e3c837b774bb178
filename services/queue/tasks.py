"""Celery tasks: thin shells that take a job id, re-read the job, and call plain functions.

plan_dataset -> preprocess_shard x N -> finalize_dataset [-> train]   (fan-in in the registry)
train (on train.<device type>) -> services.queue.attempt.run_train_job

Each stage acts only in the job state that calls for it (services.queue.registry: _FIT), checked in the same step as
its transition; a message that does not fit (forged, or from the past) is dropped with one log line (`dropped`).

Tasks never import torch at module level (the prefork pool forks from a
parent that must not have started OpenMP threads) and never wait on other
tasks' results.
"""

from __future__ import annotations

import logging
import os
import time
import uuid

from facenet import confine
from facenet.errors import UserError, clipped
from services.config import check_path_allowed, load_settings
from services.queue.app import app
from services.queue.names import FINALIZE_TASK, PLAN_TASK, PREPROCESS_QUEUE, SHARD_TASK, TRAIN_TASK
from services.queue.registry import CANCELLED, FAILED, JOB_ID, QUEUED, SUCCEEDED, Registry, registry_for
from services.queue.send import send_stage, send_train


def registry():
    s = load_settings()
    return s, registry_for(s)


log = logging.getLogger(__name__)


class BadMessage(Exception):
    """A task message whose arguments are not what its task takes: logged and dropped, never run."""


def _check_args(job_id, index=0) -> None:
    if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise BadMessage(f"job id {job_id!r} is not a job id")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 10_000_000:
        raise BadMessage(f"shard index {index!r} is not a shard index")


def stage_never_finished(stage: str, starts: int) -> str:
    """The reason a job fails with when one of its stages keeps losing its worker: said the same way whether
    the stage's next start (Celery redelivers it) or the sweep (its heartbeat stopped) counted past the bound."""
    return (f"preprocessing {stage} was started {starts} times and never finished: its worker process died "
            "each time (killed for memory?); see the preprocessing worker's log")


def dropped(job_id: str, stage: str, why: str) -> None:
    """The one line a worker logs for a message it does not act on: its job is not in the state the stage acts in
    (a forged message of the right shape, or one from the past: a redelivery of work done, a job that ended)."""
    log.warning("facenet: job %s: %s message dropped: %s", job_id, stage, why)


# What a stage's task returns for a message it drops, by Registry.stage_enter's verdict (the words are the ones
# tasks returned before the check moved into the registry).
_SKIPPED = {"gone": "finished", "again": {"plan": "planned", "shard": "finished", "finalize": "finalized"},
            "unfit": "unfit"}


def _enter(reg: Registry, s, job_id: str, stage: str, index: int = 0) -> tuple[str | None, dict | None]:
    """Start `stage` of job `job_id` when the job is in the state that calls for it (the check and the start are one
    step in the registry): (the stage's token, None); else (None, what the task returns), with one log line for a
    dropped message, the job ended for a cancel, or failed when the stage was started past the bound (a stage whose
    worker process dies every time, e.g. killed for memory, is redelivered by Celery forever)."""
    token = uuid.uuid4().hex
    name = f"shard:{index}" if stage == "shard" else stage
    verdict, why, starts = reg.stage_enter(job_id, stage, token, index)
    out = {"job": job_id, **({"index": index} if stage == "shard" else {})}
    if verdict == "cancel":
        reg.finish(job_id, CANCELLED, when="preprocessing",
                   message=f"cancelled {'before' if stage == 'plan' else 'during'} preprocessing")
        return None, {**out, "status": CANCELLED}
    if verdict != "ok":
        dropped(job_id, name, why)
        skipped = _SKIPPED[verdict]
        return None, {**out, "skipped": skipped if isinstance(skipped, str) else skipped[stage],
                      **({"why": why} if verdict == "unfit" else {})}
    if starts > s.max_attempts:
        reg.stage_end(job_id, name)
        return None, _fail(reg, job_id, UserError(stage_never_finished(name, starts)))
    return token, None


def _fail(reg: Registry, job_id: str, exc: BaseException) -> dict:
    """Fail the job with `exc` said in one line (a UserError as it is, a time limit naming the setting), only while it
    is still preprocessing: a stage never ends a job that has moved on (a trainer may hold it)."""
    from celery.exceptions import SoftTimeLimitExceeded

    if isinstance(exc, SoftTimeLimitExceeded):
        error = (f"a preprocessing stage ran past its time limit ({load_settings().stage_time_limit} s, "
                 "FACENET_STAGE_TIME_LIMIT)")
    else:
        error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    if reg.finish(job_id, FAILED, when="preprocessing", error=error):
        return {"job": job_id, "status": FAILED, "error": error}
    why = reg.misfit(job_id, "preprocessing")[1] or "its state changed"
    log.warning("facenet: job %s: a preprocessing stage failed (%s) but did not fail the job: %s", job_id,
                clipped(error, 200), why)
    return {"job": job_id, "skipped": "unfit", "why": why, "error": error}


class _Stage:
    """A started preprocessing stage's heartbeat while its task runs (see Registry.stage_enter); the stage is no
    longer in flight once it ends, however it ends."""

    def __init__(self, reg: Registry, job_id: str, stage: str, token: str):
        import threading

        self.reg, self.job_id, self.stage, self.token = reg, job_id, stage, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"stage-{stage}")

    def _beat(self) -> None:
        while not self._stop.wait(max(1.0, self.reg.ttl / 3)):
            try:
                self.reg.stage_beat(self.job_id, self.stage, self.token)
            except Exception:  # Redis restarting: the TTL covers a short gap
                continue

    def __enter__(self) -> "_Stage":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.reg.stage_end(self.job_id, self.stage)


_PLANS: dict[tuple[str, str], object] = {}


def _plan_of(job: dict, roots):
    """The job's plan header, read from OUT once per worker process and checked against the id the planner
    recorded; each shard reads its own items from the plan's items file (a VGGFace2 plan is ~200 MB, which
    every pool process held a copy of)."""
    from facenet.preprocess.plan import load_plan

    key = (job["preprocess_out"], job["plan_id"])
    if key not in _PLANS:
        plan = load_plan(job["preprocess_out"], roots)
        # The plan file lies in OUT, which others may write: it must be the one this job's planner wrote
        # (its id hashes RAW, OUT, the parameters and every item) and name this job's folders.
        if plan.plan_id != job["plan_id"] or plan.raw != job["preprocess_from"] or plan.out != job["preprocess_out"]:
            raise UserError(f"{job['preprocess_out']}: its plan changed under this job (another job re-planned "
                            "the same output folder, or the file was edited)")
        _PLANS.clear()
        _PLANS[key] = plan
    return _PLANS[key]


@app.task(name=PLAN_TASK, bind=True)
def plan_dataset(self, job_id: str) -> dict:
    """List RAW, write the plan into OUT, and queue one preprocess_shard per shard."""
    from facenet.preprocess.plan import Params, make_plan, save_plan
    from facenet.preprocess.run import check_same_crops

    _check_args(job_id)
    s, reg = registry()
    token, done = _enter(reg, s, job_id, "plan")
    if done:
        return done
    with _Stage(reg, job_id, "plan", token):
        try:
            job = reg.get(job_id)
            roots = confine.Roots(s.data_roots)
            if check_path_allowed(job["preprocess_from"], s.data_roots, "--preprocess-from") != job["preprocess_from"]:
                raise UserError(f"--preprocess-from {job['preprocess_from']}: now resolves elsewhere (a symbolic "
                                "link changed since submit)")
            params = Params(**job["params"])
            plan = make_plan(job["preprocess_from"], job["preprocess_out"], params, roots)
            if not params.shard_size:
                plan = plan.with_shard_size(_preprocess_slots(reg))
            check_same_crops(plan, roots)
            confine.ensure_dir(plan.out, roots, "preprocessing output")
            save_plan(plan, roots)
        except Exception as exc:
            return _fail(reg, job_id, exc)
        # Planned once: a second delivery that planned too (or a cancel meanwhile) sends no shards.
        if not reg.update(job_id, when="plan", shards=plan.num_shards, plan_id=plan.plan_id,
                          progress={"shards": plan.num_shards, "shards_done": 0, "images": plan.count},
                          message=f"{plan.count} images in {plan.num_shards} shards"):
            why = reg.misfit(job_id, "plan")[1] or "its state changed"
            dropped(job_id, "plan", why)
            return {"job": job_id, "skipped": "planned", "why": why}
        for i in range(plan.num_shards):
            send_stage(job_id, f"shard:{i}", reg)
    return {"job": job_id, "shards": plan.num_shards}


def _preprocess_slots(reg: Registry) -> int:
    return max(1, sum(w.get("concurrency", 1) for w in reg.workers() if PREPROCESS_QUEUE in w.get("queues", [])))


@app.task(name=SHARD_TASK, bind=True)
def preprocess_shard(self, job_id: str, index: int) -> dict:
    """Crop one shard (finished crops are skipped, so a redelivered shard repeats no work); the last
    shard to finish queues finalize_dataset."""
    from facenet.preprocess.shard import run_shard

    _check_args(job_id, index)
    s, reg = registry()
    stage = f"shard:{index}"
    token, done = _enter(reg, s, job_id, "shard", index)
    if done:
        return done
    with _Stage(reg, job_id, stage, token):
        try:
            job = reg.get(job_id)
            roots = confine.Roots(s.data_roots)
            plan = _plan_of(job, roots)
            rec = run_shard(plan, index, os.environ.get("FACENET_PREPROCESS_DEVICE", "cpu"), roots)
        except Exception as exc:  # run_shard records bad images itself; this is a broken shard (disk full, ...)
            return _fail(reg, job_id, exc)
        n, last = reg.shard_done(job_id, index, plan.num_shards)
    progress = {**(job.get("progress") or {}), "shards_done": n}
    reg.update(job_id, when="preprocessing", progress=progress)  # not over a trainer's progress (a late twin)
    self.update_state(state="PROGRESS", meta={"job": job_id, "shard": index, **progress})
    if last:
        send_stage(job_id, "finalize", reg)
    return {"index": index, "images": len(rec["records"]), "faces": sum(1 for r in rec["records"] if "out" in r),
            "skipped": rec["skipped"]}


@app.task(name=FINALIZE_TASK, bind=True)
def finalize_dataset(self, job_id: str) -> dict:
    """Write the lists and manifest; a train job then goes to its device queue."""
    from facenet.preprocess.finalize import finalize, manifest_totals

    _check_args(job_id)
    s, reg = registry()
    token, done = _enter(reg, s, job_id, "finalize")
    if done:
        return done
    with _Stage(reg, job_id, "finalize", token):
        try:
            job = reg.get(job_id)
            roots = confine.Roots(s.data_roots)
            plan = _plan_of(job, roots)
            summary = {"out": plan.out, **manifest_totals(finalize(plan, roots))}
        except Exception as exc:
            return _fail(reg, job_id, exc)
        # Once: a twin delivery that finalized too (or a cancel meanwhile) neither ends the job nor sends training.
        if job["kind"] == "preprocess":
            done = reg.finish(job_id, SUCCEEDED, when="finalize", result=summary, message="")
        else:
            done = reg.update(job_id, when="finalize", status=QUEUED, dataset=summary, preprocessed=time.time(),
                              message=f"preprocessed: {summary['faces']} faces of {summary['images']} images")
            if done:
                reg.update(job_id, task_id=send_train(job["id"], job["device_type"]))
        if not done:
            why = reg.misfit(job_id, "finalize")[1] or "its state changed"
            dropped(job_id, "finalize", why)
            return {"job": job_id, "skipped": "finalized", "why": why}
    return {"job": job_id, "status": SUCCEEDED if job["kind"] == "preprocess" else QUEUED, **summary}


@app.task(name=TRAIN_TASK, bind=True)
def train(self, job_id: str) -> dict:
    """One attempt at a train job (see services.queue.attempt)."""
    from services.queue.attempt import CLAIM_REFUSED, run_train_job

    _check_args(job_id)
    s, reg = registry()

    def report(progress: dict) -> None:
        self.update_state(state="PROGRESS", meta={"job": job_id, **progress})

    out = run_train_job(s, reg, job_id, self.request.hostname or "worker", report)
    if out.get("skipped") in CLAIM_REFUSED:
        dropped(job_id, "train", out.get("why") or CLAIM_REFUSED[out["skipped"]])
    return out
