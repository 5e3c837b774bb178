"""One attempt at a train job, as a plain function the Celery task calls.

claim the job (or drop a duplicate message) -> lease N devices of this worker
-> create (or reuse) the job's MLflow run -> start `python -m facenet.train`
in its own process group (torchrun for N > 1) -> follow its events and log
into the registry and Celery state, heartbeat, watch for cancel -> record the
result. The trainer resumes from the job's checkpoint, so a later attempt of
a job whose worker died continues where the last checkpoint left it, in the
same MLflow run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable

import redis

from facenet.errors import UserError
from facenet.fsutil import atomic_write, remove_stale_temp_files
from facenet.spec import RESERVED_TAGS, TrainSpec
from facenet.runenv import worker_devices
from facenet.tracking import LOGIN_HINT, refused_login
from services.config import Settings, check_path_allowed
from services.procs import stop_group
from services.queue import gang, mlflow_runs
from services.queue.fence import LEASE_SAFETY, Fence
from services.queue.registry import CANCELLED, FAILED, RUNNING, SUCCEEDED, Registry
from services.queue.send import requeue_train
from services.queue.trainer import attempt_env, check_job_paths, job_output, pump_output, reap_attempt, start_trainer

class Lost(Exception):
    """This attempt no longer holds its job (its fence deadline passed, or another attempt took it): it stops and
    writes nothing more to the job's record, output folder or MLflow run."""


class Heartbeat(threading.Thread):
    """Renews the attempt's heartbeat and its device leases, moving its fence (services.queue.fence) on after each
    renewal that succeeded; sets `lost` (the attempt must stop at once) when another attempt took the job over, a
    lease is no longer this attempt's, or the fence deadline passed (then the fence has killed the trainer
    already). Each renewal is one registry call bounded by the registry's call timeout, never retried here."""

    def __init__(self, reg: Registry, job_id: str, token: str, node: str, devices: list[int], claimed_at: float):
        """`claimed_at`: the monotonic time the claim was sent (the fence holds from there)."""
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.reg, self.job_id, self.token, self.node, self.devices = reg, job_id, token, node, devices
        # Leases name the attempt, not just the job: attempt A of a job cleaning up after losing its
        # heartbeat must not drop (or renew) the leases attempt B of the same job holds.
        self.holder = f"{job_id}:{token}"
        self.leased: list[int] = []
        self.gang: list[tuple[str, list[int]]] = []  # a job over several nodes: (node, devices), this one first
        self.lost = threading.Event()  # set: stop the trainer at once, no grace (another attempt may hold the job)
        self.withdrawn = False  # a gang's other nodes were withdrawn (once)
        self.why = ""
        self.stopped = threading.Event()
        self.fence = Fence(LEASE_SAFETY * reg.ttl, claimed_at, job_id)
        self.fence.on_expiry(lambda: self._lose(f"could not renew its claim for {self.fence.hold:.0f} s (Redis "
                                                "away, stalled or cut off): its trainer was stopped"))

    def _lose(self, why: str) -> None:
        if not self.lost.is_set():
            self.why = why
            self.lost.set()

    def run(self) -> None:
        wait = max(0.5, self.reg.ttl / 6)
        while not self.stopped.wait(wait):
            if self.lost.is_set():
                return  # never take a claim back once the fence passed: the job may be another attempt's now
            try:
                self.renew()
                wait = max(0.5, self.reg.ttl / 6)
            except redis.RedisError as exc:  # away or slow: tried again soon; the fence runs out unless one gets through
                wait = 0.5
                self.why = f"Redis: {type(exc).__name__}"

    def renew(self) -> bool:
        """One renewal of the claim, the leases and a gang's assignments; True when all held (the fence moves
        on from when it was sent). Raises on a Redis error."""
        sent = time.monotonic()
        if not self.reg.heartbeat(self.job_id, self.token):
            self._lose("another attempt took the job over")
            return False
        if self.gang:  # before the leases: an assignment (what a follower fences on) never outlives its node's lease
            gang.renew_assignments(self.reg, self.holder, self.gang)
        held = ([(self.node, self.leased)] if self.leased else []) + self.gang[1:]
        if any(self.reg.renew_leases(node, devs, self.holder) < len(devs) for node, devs in held):
            self._lose("another attempt holds its device (its lease lapsed while Redis was away)")
            return False
        self.fence.renewed(sent)
        return True

    def confirm(self) -> bool:
        """Renew now and say whether this attempt still holds its job: asked right before a write that Redis cannot
        make conditional (the MLflow run, the output folder). A Redis error is tried again while the fence holds
        (a restart); False once it has passed."""
        if self.lost.is_set() or not self.fence.holds():
            return False
        return bool(_retrying(self.renew, self)) and self.fence.holds()

    def require(self) -> None:
        """Lost unless this attempt still holds its job (confirm)."""
        if not self.confirm():
            raise Lost(self.why or "its claim could not be confirmed (Redis not answering)")

    def stop(self) -> None:
        self.stopped.set()
        self.fence.close()


# A train message the claim refused (Registry.claim), and why, as the task's log line says it.
CLAIM_REFUSED = {"missing": "no such job", "done": "it ended", "busy": "another attempt holds it",
                 "unfit": "it is not a train job waiting for an attempt"}


def run_train_job(settings: Settings, reg: Registry, job_id: str, node: str,
                  report: Callable[[dict], None] = lambda progress: None) -> dict:
    """Run one attempt of train job `job_id` on worker `node`; returns what the Celery task returns."""
    token = uuid.uuid4().hex
    claimed_at = time.monotonic()
    state, attempts = reg.claim(job_id, token)
    if state in CLAIM_REFUSED:
        if state != "unfit":
            return {"job": job_id, "skipped": state}
        return {"job": job_id, "skipped": state,
                "why": reg.misfit(job_id, "train")[1] or "its state changed as it was claimed"}
    if state == "cancel":
        _cancel_before_start(settings, reg, job_id)
        return {"job": job_id, "status": CANCELLED}
    device_type, devices = worker_devices()
    beat = Heartbeat(reg, job_id, token, node, devices, claimed_at)
    try:
        job = reg.get(job_id)
        if attempts > settings.max_attempts:
            why = job.get("message") or "the worker running it died"
            _end_run(settings, beat, job, "FAILED")  # the lost attempt left it RUNNING
            reg.finish(job_id, FAILED, token, error=f"gave up after {attempts - 1} attempts: {why}")
            return {"job": job_id, "status": FAILED}
        beat.start()
        return _attempt(settings, reg, job, attempts, node, device_type, devices, beat, report)
    except UserError as exc:
        _end_run(settings, beat, reg.get(job_id), "FAILED")  # the run first, then the job
        reg.finish(job_id, FAILED, token, error=str(exc))
        return {"job": job_id, "status": FAILED, "error": str(exc)}
    except Lost as exc:  # another attempt owns the job now (or may): leave its record, folder and run alone
        print(f"job {job_id} attempt {attempts}: stopped, {exc}", file=sys.stderr)
        return {"job": job_id, "skipped": "taken over"}
    finally:
        beat.stop()
        reap_attempt(beat.holder)  # nothing of this attempt may run on a device it gives back
        if beat.gang[1:]:
            _withdraw(reg, beat)  # the other nodes' trainers first
            for other, devs in beat.gang[1:]:
                _retrying(lambda: reg.renew_leases(other, devs, beat.holder, drop=True))
        if beat.leased:
            _retrying(lambda: reg.renew_leases(node, beat.leased, beat.holder, drop=True))
        _retrying(lambda: reg.release(job_id, token))


# How long a gang's other trainers may take to end on their own after rank 0's ended well (they write nothing
# after it; a few seconds under load), before their parts are withdrawn (killed).
GANG_SETTLE_SECONDS = 10.0


def _withdraw(reg: Registry, beat: Heartbeat, settle: float = 0.0) -> None:
    """Take back a gang's other nodes' parts and wait until their trainers are gone (once per attempt)."""
    if not beat.withdrawn:
        _retrying(lambda: gang.withdraw(reg, beat.job_id, beat.holder, beat.gang, settle=settle))
        beat.withdrawn = True


def _end_run(settings: Settings, beat: Heartbeat, job: dict | None, status: str) -> None:
    """End the job's MLflow run with `status`, only while this attempt still holds the job (confirmed now)."""
    if beat.confirm():
        mlflow_runs.end_job_run(settings.mlflow_uri, job, status)


def _attempt(settings: Settings, reg: Registry, job: dict, attempts: int, node: str, device_type: str,
             devices: list[int], beat: Heartbeat, report: Callable[[dict], None]) -> dict:
    job_id = job["id"]
    spec = TrainSpec.from_dict(job["spec"])
    per_node = spec.npus_per_node
    if per_node > len(devices):
        raise UserError(f"--npus {spec.npus}: worker {node} has {len(devices)} {device_type} device(s)")
    data = check_path_allowed(spec.data, settings.data_roots, "--data")
    if not os.path.isdir(data):
        raise UserError(f"--data {data}: no such directory on worker {node}")
    output = job_output(settings, job_id)
    paths = {"data": data, **check_job_paths(spec, settings.data_roots, output)}

    got = _wait_for_devices(settings, reg, job_id, spec, node, devices, device_type, beat)
    if got is None:
        return {"job": job_id, "status": CANCELLED}
    resumed = attempts > 1
    # Before anything of the job is touched: the conditional write that says this attempt still holds it.
    if not _retrying(lambda: reg.update(
            job_id, beat.token, status=RUNNING, started=job.get("started") or time.time(), worker=node,
            host=socket.gethostname(), devices=got, output=output,
            nodes=[n for n, _ in beat.gang] if beat.gang else [node],
            message=f"attempt {attempts}: resuming after the previous worker was lost" if resumed else ""), beat):
        raise Lost("the job was taken over, or ended, while this attempt waited for its devices")
    run_id = job.get("mlflow_run_id") or _job_run(settings, reg, job, spec, device_type, data, output, beat)
    # What the service decides for the trainer, in one place (TrainSpec.placed); node 0's spec is written once,
    # each other node's (its own devices) once by gang.assign.
    spec = spec.placed(**paths, device=device_type, device_list=got if device_type in ("npu", "cuda") else None,
                       output=output, resume="auto", events=os.path.join(output, "events.jsonl"),
                       json_out=os.path.join(output, "summary.json"), mlflow_uri=settings.mlflow_uri, run_id=run_id,
                       experiment=job.get("experiment") or settings.experiment,
                       tags={**spec.tags, "job_id": job_id, "attempts": str(attempts)})
    spec_path = os.path.join(output, "spec.json")
    beat.require()  # the output folder is written from here on
    os.makedirs(output, exist_ok=True)
    endpoint = None
    if beat.gang:
        endpoint = gang.advertised_endpoint()
        if not gang.assign(reg, job_id, beat.holder, beat.gang, endpoint, spec, output, device_type,
                           job.get("task_id")):
            raise Lost("the job was taken over while its gang was assigned")
    with atomic_write(spec_path) as fh:
        fh.write(spec.to_json().encode())
    if os.path.exists(spec.json_out):
        os.remove(spec.json_out)  # a summary left by an earlier attempt must not pass for this one's

    env = attempt_env(settings, beat.holder, node, got, os.path.join(output, "heartbeat"),
                      rank=0 if endpoint else None, endpoint=endpoint)
    log_path = os.path.join(output, "train.log")
    events_at = os.path.getsize(spec.events) if os.path.exists(spec.events) else 0  # what earlier attempts wrote
    beat.require()
    log = open(log_path, "a", encoding="utf-8", buffering=1)
    try:
        proc = start_trainer(spec_path, env, output, beat.fence)
    except BaseException:
        log.close()
        raise
    follower = _Follower(reg, job_id, spec.events, proc, log, events_at)
    follower.start()
    _retrying(lambda: reg.update(job_id, beat.token, trainer_pid=proc.pid, trainer_started=time.time()), beat)
    outcome, detail = _watch(reg, job_id, proc, beat, follower, report, settings)
    reap_attempt(beat.holder)  # before another attempt may resume into the same output folder
    beat.fence.unguard(proc.pid)  # reaped: its group id may be reused by anyone
    if beat.gang[1:]:  # and the other nodes' parts too, before the job is given up or requeued
        _withdraw(reg, beat, GANG_SETTLE_SECONDS if outcome == "done" and proc.returncode == 0 else 0.0)
    follower.join(timeout=30)
    log.close()
    if outcome == "lost":  # another attempt owns the job now (or may); leave its record, folder and run alone
        raise Lost(beat.why)
    beat.require()
    remove_stale_temp_files(output)  # a checkpoint half-written by a trainer killed mid-save
    rc = proc.returncode
    if outcome == "done" and rc and not os.path.exists(spec.json_out) and not follower.user_error():
        # Killed by a signal from outside (the OOM killer, an operator), a rank that died, a crash, another
        # attempt's trainer still holding the folder (BUSY_EXIT): not the job's own input (that exits 2 with an
        # `error:` line and fails at once). Resume from the checkpoint.
        outcome = "killed" if rc < 0 else "crashed"
    if beat.confirm():
        _log_training_log(settings, run_id, log_path)
    if outcome == "cancelled":
        _end_run(settings, beat, reg.get(job_id), "KILLED")
        _retrying(lambda: reg.finish(job_id, CANCELLED, beat.token, message="cancelled while running; trainer "
                                     "stopped", trainer_pid=None), beat)
        return {"job": job_id, "status": CANCELLED}
    if outcome != "done":
        why = {"node lost": detail,
               "stalled": f"the trainer wrote nothing for {settings.trainer_stall_seconds} s (hung?; "
                          "FACENET_TRAINER_STALL_SECONDS)",
               "overtime": f"the job ran past FACENET_MAX_JOB_SECONDS ({settings.max_job_seconds} s)",
               "killed": f"the trainer was killed by signal {-(rc or 0)} (out of memory?)",
               "crashed": f"the trainer exited with code {rc}: {follower.error_line()}"}[outcome]
        return _stopped(settings, reg, job, attempts, beat, outcome, why)
    return _finished(settings, reg, job_id, spec.json_out, rc, follower.error_line(), beat)


def _stopped(settings: Settings, reg: Registry, job: dict, attempts: int, beat: Heartbeat, outcome: str,
             why: str) -> dict:
    """A trainer that did not finish (stalled, overtime, killed, crashed, a node lost): another attempt resumes
    from the last checkpoint while attempts are left (never past the job's time limit); else the job fails."""
    job_id = job["id"]
    if outcome != "overtime" and attempts < settings.max_attempts:
        # The same step drops this attempt's heartbeat, or the new message would find the job held and drop
        # itself. (False: a sweeper got there first because this heartbeat had lapsed; it sent the message.)
        # Only while it holds the job (the requeue is conditional on its token, like every write here).
        _retrying(lambda: requeue_train(reg, job, f"attempt {attempts} stopped: {why}; trying again",
                                        token=beat.token), beat)
        return {"job": job_id, "requeued": why}
    _end_run(settings, beat, reg.get(job_id), "FAILED")
    error = why if outcome == "overtime" else f"gave up after {attempts} attempt(s): {why}"
    _retrying(lambda: reg.finish(job_id, FAILED, beat.token, error=error, trainer_pid=None), beat)
    return {"job": job_id, "status": FAILED, "error": error}


def _finished(settings: Settings, reg: Registry, job_id: str, summary_path: str, rc: int | None,
              error_line: str | None, beat: Heartbeat) -> dict:
    """A trainer that exited by itself: SUCCEEDED with its summary's numbers, or FAILED with its error line.
    summary.json is written (atomically) when training is complete: a trainer killed after it succeeded."""
    summary = _read_json(summary_path)
    if summary is None:
        error = error_line or f"trainer exited with code {rc}"
        if rc is not None and rc < 0:
            error = f"trainer killed by signal {-rc}; {error}"
        _end_run(settings, beat, _retrying(lambda: reg.get(job_id), beat), "FAILED")
        _retrying(lambda: reg.finish(job_id, FAILED, beat.token, error=error, trainer_pid=None), beat)
        return {"job": job_id, "status": FAILED, "error": error}
    result = {k: summary.get(k) for k in ("fps", "acc1", "epochs", "world_size", "device", "precision",
                                          "e2e_seconds", "model", "checkpoint", "mlflow_run_id")}
    if not _retrying(lambda: reg.finish(job_id, SUCCEEDED, beat.token, result=result, trainer_pid=None,
                                        checkpoint=summary.get("checkpoint")), beat):
        # It lost the job before it could say so (a sweeper requeued it): the next attempt finds the last
        # checkpoint complete, has nothing to train, and ends the job with the same numbers.
        raise Lost("the job was requeued before its result could be recorded")
    return {"job": job_id, "status": SUCCEEDED, **{k: result[k] for k in ("fps", "acc1")}}


def _wait_for_devices(settings: Settings, reg: Registry, job_id: str, spec: TrainSpec, node: str, devices: list[int],
                      device_type: str, beat: Heartbeat) -> list[int] | None:
    """Lease this attempt's devices (a gang's on all its nodes at once, gang.py: it holds nothing while it
    waits), waiting without giving up the message: the job keeps its place and cancel still works. Returns
    node 0's devices, or None when the job was cancelled meanwhile."""
    per_node = spec.npus_per_node
    while True:
        if not beat.fence.holds() or beat.lost.is_set():  # no lease taken, nothing written for a claim it lost
            raise Lost(beat.why or "its claim lapsed while it waited for devices")
        if spec.nnodes == 1:
            got = _retrying(lambda: reg.lease(node, devices, spec.npus, beat.holder), beat)
            team = [(node, got)] if got else []
        else:
            team = _retrying(lambda: reg.gang_lease(gang.candidates(reg, node, devices, device_type, per_node),
                                                    per_node, spec.nnodes, beat.holder), beat)
        if team:
            beat.leased, beat.gang = team[0][1], team if spec.nnodes > 1 else []
            return team[0][1]
        if _retrying(lambda: reg.cancel_requested(job_id), beat):
            _cancel_before_start(settings, reg, job_id, beat)
            return None
        wanted = (f"{spec.npus} free {device_type} device(s) on {node}" if spec.nnodes == 1 else
                  f"{spec.nnodes} {device_type} workers with {per_node} free device(s) each, {node} among them")
        _retrying(lambda: reg.update(job_id, beat.token, message=f"waiting for {wanted}"), beat)
        time.sleep(1.0)


def _job_run(settings: Settings, reg: Registry, job: dict, spec: TrainSpec, device_type: str, data: str,
             output: str, beat: Heartbeat) -> str | None:
    """The job's MLflow run, created on its first attempt (none without a server), with the data set's manifest
    attached. MLflow restarting is no reason to fail a job: wait for it (the job keeps its devices and place)."""
    if not settings.mlflow_uri:
        return None
    job_id = job["id"]
    user_tags = {k: v for k, v in spec.tags.items() if k not in RESERVED_TAGS}
    tags = {**user_tags, "job_id": job_id, "npus": str(spec.npus), "device_type": device_type,
            "amp": str(spec.amp_enabled).lower(), "host": socket.gethostname()}
    name = f"{spec.default_run_name(device_type)}-{job_id}"
    experiment = job.get("experiment") or settings.experiment
    run_id, made = _while_mlflow_away(settings, reg, beat, lambda: mlflow_runs.find_or_create_run(
        settings.mlflow_uri, experiment, name, tags, job_id))
    if not _retrying(lambda: reg.update(job_id, beat.token, mlflow_run_id=run_id), beat):
        if made:  # a run made for a job that is another attempt's now: not left beside the job's own
            mlflow_runs.drop_if_not_oldest(settings.mlflow_uri, experiment, job_id, run_id)
        raise Lost("the job was taken over while its MLflow run was made")
    _while_mlflow_away(settings, reg, beat, lambda: _log_manifest(settings, run_id, data, output))
    return run_id


def _watch(reg: Registry, job_id: str, proc: subprocess.Popen, beat: Heartbeat, follower: "_Follower",
           report: Callable[[dict], None], settings: Settings) -> tuple[str, str]:
    """Follow the trainer until it exits: ('done', ''), ('cancelled', ''), ('lost', ''), ('stalled', '') (no
    output for the stall limit), ('overtime', '') (past the longest a job may run) or ('node lost', which)."""
    last_progress = None
    started_at = time.time()
    deadline = time.time() + settings.max_job_seconds
    while True:
        try:
            proc.wait(timeout=0.5)
            follower.poll_events()
            _retrying(lambda: _push_progress(reg, job_id, beat.token, follower, report, last_progress), beat)
            return ("lost" if beat.lost.is_set() else "done"), ""
        except subprocess.TimeoutExpired:
            pass
        follower.poll_events()
        if beat.lost.is_set():
            stop_group(proc, grace=0)  # another attempt may hold the job now: no grace
            return "lost", ""
        if beat.gang:
            gone = _retrying(lambda: gang.lost_nodes(reg, job_id, beat.holder, beat.gang, started_at), beat)
            if gone:
                stop_group(proc, grace=0)
                return "node lost", f"worker {', '.join(node for _, node in gone)} of the job's nodes was lost"
        if time.time() - follower.alive_at() > settings.trainer_stall_seconds:
            stop_group(proc)
            return "stalled", ""
        if time.time() > deadline:
            stop_group(proc)
            return "overtime", ""
        try:
            last_progress = _push_progress(reg, job_id, beat.token, follower, report, last_progress)
            if reg.cancel_requested(job_id):
                stop_group(proc)
                return "cancelled", ""
        except redis.RedisError:
            continue  # Redis restarting: training goes on; progress catches up when it is back


def _retrying(fn, beat: Heartbeat | None = None, seconds: float = 120.0):
    """Run a registry call, retrying while Redis is briefly away (a restart): results must not be lost. With
    `beat`, only while that attempt holds its job (its fence): past it the job may be another attempt's, and the
    call (conditional on the attempt's token) could only be refused; None then."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return fn()
        except redis.RedisError:
            if beat is not None and not beat.fence.holds():
                return None
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _push_progress(reg: Registry, job_id: str, token: str, follower: "_Follower", report, last):
    progress = dict(follower.progress)
    if progress and progress != last:
        fields = {"progress": progress}
        if follower.checkpoint:
            fields["checkpoint"] = follower.checkpoint
        reg.update(job_id, token, **fields)
        try:
            report(progress)
        except Exception:  # Flower's view is a mirror; never stop training for it
            pass
    return progress


class _Follower(threading.Thread):
    """Copies the trainer's output to train.log and the registry; parses events.jsonl into progress."""

    def __init__(self, reg: Registry, job_id: str, events_path: str, proc: subprocess.Popen, log, offset: int):
        """`offset`: the size of the events file before the trainer started (earlier attempts' events)."""
        super().__init__(daemon=True, name=f"follow-{job_id}")
        self.reg, self.job_id, self.events_path, self.proc, self.log = reg, job_id, events_path, proc, log
        self.progress: dict = {}
        self.checkpoint: str | None = None
        self._offset = offset
        self._partial = b""
        self._tail: list[str] = []
        self.last_activity = time.time()  # the last output line or event: a hung trainer writes neither

    def run(self) -> None:
        pump_output(self.proc, self.log, self.reg, self.job_id, on_line=self._saw)

    def _saw(self, line: str) -> None:
        self.last_activity = time.time()
        self._tail = (self._tail + [line])[-50:]

    def alive_at(self) -> float:
        """When the trainer last showed life: an output line, an event, or a beat of its loops."""
        try:
            beat = os.path.getmtime(os.path.join(os.path.dirname(self.events_path), "heartbeat"))
        except OSError:
            beat = 0.0
        return max(self.last_activity, beat)

    def user_error(self) -> str | None:
        """The trainer's own `error: ...` line: input it refused (a 2p job's torchrun adds noise after it)."""
        return next((ln.strip() for ln in reversed(self._tail) if ln.startswith("error:")), None)

    def error_line(self) -> str | None:
        """The trainer's `error:` line, else torchrun's word on a rank killed by a signal, else the last line
        naming an error, else the last line with words in it."""
        for wanted in (lambda ln: ln.startswith("error:"),
                       lambda ln: "traceback :" in ln and "Signal" in ln,
                       lambda ln: "Error:" in ln and "ChildFailedError" not in ln and "elastic" not in ln,
                       lambda ln: any(c.isalpha() for c in ln)):
            for line in reversed(self._tail):
                if wanted(line):
                    return line.strip()
        return None

    def poll_events(self) -> None:
        """Apply the events written since the last poll. The file only grows (the trainer appends, whatever the
        attempt); one that shrank was replaced by hand, and is read again from its start."""
        try:
            with open(self.events_path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size < self._offset:
                    self._offset, self._partial = 0, b""
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        if chunk:
            self.last_activity = time.time()
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                self._apply(event)

    def _apply(self, e: dict) -> None:
        p = self.progress
        kind = e.get("event")
        if kind == "start":
            p.update(epochs=e.get("epochs"), steps=e.get("steps_per_epoch"), epoch=e.get("start_epoch", 0), step=0)
        elif kind == "step":
            p.update(epoch=e.get("epoch"), step=e.get("step"), steps=e.get("steps"), loss=e.get("loss"),
                     fps=e.get("fps"), train_acc=e.get("train_acc"))
        elif kind == "epoch":
            p.update(epoch=e.get("epoch"), step=p.get("steps") or p.get("step"), loss=e.get("loss"),
                     fps=e.get("fps"), acc1=e.get("acc1"), lr=e.get("lr"), epochs_done=e.get("epoch"))
        elif kind == "checkpoint":
            self.checkpoint = e.get("path")
            p.update(checkpoint_epoch=e.get("epoch"))
        elif kind == "end":
            p.update(fps=e.get("fps"), acc1=e.get("acc1"), epochs_done=e.get("epochs"))


def _cancel_before_start(settings: Settings, reg: Registry, job_id: str, beat: Heartbeat | None = None) -> None:
    """Cancelled before its trainer started: by the claim itself (no attempt holds it; the claim refused it), or
    while attempt `beat` waited for devices (only while that attempt holds it)."""
    if beat is None:
        mlflow_runs.end_job_run(settings.mlflow_uri, reg.get(job_id), "KILLED")
        reg.finish(job_id, CANCELLED, message="cancelled before it started")
        return
    _end_run(settings, beat, reg.get(job_id), "KILLED")
    if not reg.finish(job_id, CANCELLED, beat.token, message="cancelled before it started"):
        raise Lost("the job was taken over while it was being cancelled")


def _while_mlflow_away(settings: Settings, reg: Registry, beat: Heartbeat, fn):
    """fn(), retried while the MLflow server does not answer (restarting), up to settings.mlflow_wait_seconds,
    and only while attempt `beat` holds its job (confirmed before each try: fn writes to the job's run)."""
    job_id = beat.job_id
    deadline = time.time() + settings.mlflow_wait_seconds
    while True:
        beat.require()
        try:
            mlflow_runs.check_reachable(settings.mlflow_uri)
            return fn()
        except UserError as exc:
            if "unreachable" not in str(exc) or time.time() > deadline:
                raise
            err = exc
        except Exception as exc:  # MlflowException, connection reset: the server went away mid-call
            if refused_login(exc):  # it answered, and said no: no wait mends a wrong login
                raise UserError(f"MLflow at {settings.mlflow_uri} refused the worker's login: {LOGIN_HINT}") \
                    from None
            if time.time() > deadline:
                raise UserError(f"MLflow at {settings.mlflow_uri}: {type(exc).__name__}: {exc}") from None
            err = exc
        _retrying(lambda: reg.update(job_id, beat.token, message=f"waiting for MLflow ({str(err)[:120]})"), beat)
        time.sleep(3.0)


def _log_manifest(settings: Settings, run_id: str, data: str, output: str) -> None:
    """Attach DATA/manifest.json to the run: read confined to the data roots (a manifest symlinked to a
    secret outside them is refused, not uploaded), from a copy in the job's output."""
    from facenet import confine

    path = os.path.join(data, "manifest.json")
    if not os.path.lexists(path):
        return
    blob = confine.read_metadata(path, confine.Roots(settings.data_roots), "manifest")
    copy = os.path.join(output, "dataset", "manifest.json")
    confine.write_bytes(copy, blob, None)
    mlflow_runs.log_file(settings.mlflow_uri, run_id, copy, "dataset")


def _log_training_log(settings: Settings, run_id: str | None, log_path: str) -> None:
    if settings.mlflow_uri and run_id:
        try:
            mlflow_runs.log_file(settings.mlflow_uri, run_id, log_path, "logs")
        except Exception as exc:
            print(f"training log not uploaded to MLflow: {type(exc).__name__}: {exc}", file=sys.stderr)


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (FileNotFoundError, ValueError):
        return None
