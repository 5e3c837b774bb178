"""The sweep: every FACENET_SWEEP_SECONDS each worker's housekeeping thread (services.queue.worker) looks for
work whose worker was lost and sends it again, counting attempts:
- train jobs claimed by an attempt whose heartbeat expired (its worker was killed); exactly one sweeper wins
  each job (send.requeue_train), and the dead worker's own message, redelivered hours later, finds the job
  finished or held and is dropped;
- preprocessing stages (plan, a shard, finalize) whose task stopped heartbeating, or whose message a killed
  worker had taken but not started;
- queued train jobs whose message is gone (Redis lost it, or a killed worker holds it unacknowledged).
"""

from __future__ import annotations

from services.queue.events import report_lost_task
from services.queue.names import PREPROCESS_QUEUE, train_queue
from services.queue.registry import FAILED, PREPROCESSING, QUEUED, TERMINAL, Registry
from services.queue.send import requeue_train, send_stage, send_train
from services.queue.tasks import stage_never_finished


def sweep(reg: Registry, max_attempts: int = 3) -> list[str]:
    """Queue again every claimed job, and every preprocessing stage, whose task stopped heartbeating;
    returns what was requeued."""
    requeued = []
    jobs = reg.jobs_by_id(reg.active_ids())  # every job not ended, however old (one read serves both loops)
    for job in jobs:
        if job["status"] != PREPROCESSING:
            continue
        lost_messages = _reserved_and_lost(reg, job)
        for stage in reg.stalled_stages(job["id"]) + lost_messages:
            lost = reg.r.hincrby(reg.key(job["id"]) + ":resends", stage, 1)
            old_task = reg.r.hget(reg.key(job["id"]) + ":tasks", stage)
            never_sent = stage == "plan" and stage in lost_messages
            if lost > max_attempts:
                error = (f"preprocessing plan: sent {lost} times and never planned, its message lost again (is Redis "
                         "losing writes? see its log); submit the job again" if never_sent
                         else stage_never_finished(stage, lost))
                reg.finish(job["id"], FAILED, when="preprocessing", error=error)
                break
            why = "its message was lost" if never_sent else "its worker was lost"
            if old_task:
                report_lost_task(old_task, job["id"], f"preprocessing {stage}: {why}")
            send_stage(job["id"], stage, reg)
            print(f"facenet sweep: job {job['id']} {stage} {'sent again' if never_sent else 'requeued'} ({why})",
                  flush=True)
            requeued.append(f"{job['id']}:{stage}")
    for job in jobs:  # queued train jobs whose message is gone (Redis killed within its AOF fsync second)
        if _queued_and_lost(reg, job):
            reg.update(job["id"], task_id=send_train(job["id"], job["device_type"]))
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


_QUEUED_SUSPECTS: dict[str, str] = {}


def _queued_and_lost(reg: Registry, job: dict) -> bool:
    """A QUEUED train job no attempt holds whose message is not in its queue, two sweeps in a row: Redis lost
    it (one run with appendfsync everysec loses up to a second of writes to a kill -9), or a worker killed
    before it started the task holds it (kombu's `unacked`, for the visibility timeout: days). A live worker starts
    what it takes within milliseconds; a duplicate sent by mistake is harmless (its claim finds the job
    held or done)."""
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
    """Stages whose message is gone: nothing is queued, nothing of the job runs, yet shards are missing (a killed
    worker had taken their message but not started it), or the job was never planned although its plan's message
    was named (its submitter lost Redis, or died, between writing the job and sending the message). Sent again
    only when two sweeps in a row see the same gap (a live worker holds a message it took for milliseconds, not
    for a whole sweep interval)."""
    total = int(reg.r.hget(reg.key(job["id"]), "shards") or 0)
    planless = not total and not job.get("plan_id") and reg.r.hexists(reg.key(job["id"]) + ":tasks", "plan")
    if not (total or planless) or reg.r.llen(PREPROCESS_QUEUE) or reg.r.scard(reg.key(job["id"]) + ":started"):
        _SUSPECTS.pop(job["id"], None)
        return []
    done = {int(i) for i in reg.r.smembers(reg.key(job["id"]) + ":shards")}
    # Every shard done but the job still preprocessing: finalize's message was the one lost.
    missing = (frozenset({"plan"}) if planless else
               frozenset(f"shard:{i}" for i in range(total) if i not in done) or frozenset({"finalize"}))
    previous = _SUSPECTS.get(job["id"])
    _SUSPECTS[job["id"]] = missing
    return sorted(missing) if missing and missing == previous else []
