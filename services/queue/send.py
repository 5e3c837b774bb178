"""Sending the queue's messages: a train job to its device queue, a preprocessing stage to the preprocess
queue, and a train job's next attempt (exactly one of the callers that race to requeue it sends it). Used by
the task shells, an attempt that gives up, the sweep and the client."""

from __future__ import annotations

from services.queue.app import app
from services.queue.names import FINALIZE_TASK, PLAN_TASK, PREPROCESS_QUEUE, SHARD_TASK, TRAIN_TASK, train_queue
from services.queue.registry import Registry


def send_train(job_id: str, device_type: str, task_id: str | None = None) -> str:
    """Queue an attempt at train job `job_id` on its device type's queue; returns the message's task id (`task_id`
    when given: the id the job's record already names)."""
    return app.send_task(TRAIN_TASK, args=[job_id], queue=train_queue(device_type), task_id=task_id).id


def requeue_train(reg: Registry, job: dict, message: str, token: str = "") -> bool:
    """Queue train job `job` again for its next attempt (which resumes from the checkpoint): called by the
    attempt that gives it up (`token`: its attempt token) and by sweepers that find its heartbeat gone. Exactly
    one caller moves it back to QUEUED and sends the one new message; False for the others."""
    if not reg.requeue(job["id"], message, token):
        return False
    reg.update(job["id"], task_id=send_train(job["id"], job["device_type"]))
    return True


def send_stage(job_id: str, stage: str, reg: Registry | None = None, task_id: str | None = None) -> str:
    """Queue a preprocessing stage: 'plan', 'shard:<i>' or 'finalize' (its task id is recorded, so the
    sweep can report it failed if its worker dies; `task_id`: an id chosen before, already recorded)."""
    if stage.startswith("shard:"):
        task_id = app.send_task(SHARD_TASK, args=[job_id, int(stage.split(":", 1)[1])],
                                queue=PREPROCESS_QUEUE, task_id=task_id).id
    else:
        name = {"plan": PLAN_TASK, "finalize": FINALIZE_TASK}[stage]
        task_id = app.send_task(name, args=[job_id], queue=PREPROCESS_QUEUE, task_id=task_id).id
    if reg is not None:
        reg.r.hset(reg.key(job_id) + ":tasks", stage, task_id)
    return task_id
