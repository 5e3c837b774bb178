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

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable

from facenet.errors import UserError
from facenet.fsutil import remove_stale_temp_files
from facenet.spec import RESERVED_TAGS, TrainSpec
from facenet.tracking import LOGIN_HINT, refused_login
from services import mlflow_runs
from services.config import Settings, check_path_allowed, parse_devices
from services.registry import CANCELLED, FAILED, JOB_ID, RUNNING, SUCCEEDED, Registry

# The trainer polls this pid and kills its own process group when it is gone, so a worker killed
# outright (kill -9, a container stopping) never leaves an orphan trainer holding devices.
WATCH_PID_ENV = "FACENET_WATCH_PID"
# What a trainer holds, readable from outside (the chaos suite checks no device is held twice at once).
ATTEMPT_ENV = "FACENET_ATTEMPT"  # <job id>:<attempt token>
LEASE_ENV = "FACENET_LEASE"  # <node>:<device>,<device>
KILL_GRACE_SECONDS = 10
LEASE_SAFETY = 0.6
# How long an attempt (and its trainer, at start) waits for an MLflow server that does not answer.
MLFLOW_WAIT_SECONDS = int(os.environ.get("FACENET_MLFLOW_WAIT_SECONDS", "600"))

# The trainer gets these from the worker's environment and nothing else: not the Redis URL (with its
# password), Flower's or Postgres' credentials. MLflow's client credentials it needs to log its run.
TRAINER_ENV_NAMES = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "TZ", "TMPDIR", "TERM", "VIRTUAL_ENV",
                     "LD_LIBRARY_PATH", "LD_PRELOAD", "CONDA_PREFIX", "HOSTNAME")
TRAINER_ENV_PREFIXES = ("LC_", "PYTHON", "TORCH", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "CUDA_", "NVIDIA_", "NCCL_",
                        "GLOO_", "ASCEND_", "HCCL_", "ACL_", "TOOLCHAIN_", "ATB_", "ASDOPS_", "MLFLOW_", "FACENET_")
TRAINER_ENV_SECRETS = ("FACENET_REDIS_URL", "FACENET_REDIS_PASSWORD", "FACENET_FLOWER_URL", "FLOWER_BASIC_AUTH")


def trainer_env(environ, data_roots: list[str]) -> dict:
    """The trainer's environment: the allowed names of the worker's, with the data roots it is confined to."""
    env = {k: v for k, v in environ.items()
           if (k in TRAINER_ENV_NAMES or k.startswith(TRAINER_ENV_PREFIXES)) and k not in TRAINER_ENV_SECRETS
           and ("PASSWORD" not in k or k == "MLFLOW_TRACKING_PASSWORD")}
    env["FACENET_DATA_ROOTS"] = os.pathsep.join(data_roots)
    return env


def attempt_env(settings: Settings, holder: str, node: str, devices: list[int], heartbeat: str,
                rank: int | None = None, endpoint: str | None = None) -> dict:
    """The environment of one attempt's trainer on this worker (node 0's, or another node's part of a gang):
    trainer_env, and what ties the trainer to the attempt: the worker's pid it watches, the attempt and the
    devices it holds (readable from outside), its liveness file and, in a gang, its node rank and node 0's
    rendezvous endpoint."""
    env = trainer_env(os.environ, settings.data_roots)
    env.update({"PYTHONUNBUFFERED": "1", WATCH_PID_ENV: str(os.getpid()), ATTEMPT_ENV: holder,
                "FACENET_MLFLOW_CONNECT_SECONDS": str(MLFLOW_WAIT_SECONDS), "FACENET_TRAINER_HEARTBEAT": heartbeat,
                LEASE_ENV: f"{node}:{','.join(map(str, devices))}"})
    if endpoint:
        env.update({"FACENET_NODE_RANK": str(rank), "FACENET_RDZV_ENDPOINT": endpoint})
    device_type, owned = worker_devices()
    if device_type == "cpu":
        # Each CPU "device" is a share of the cores; N processes must not each take all of them. Several
        # workers on one host (local "nodes") are given their share: FACENET_CPU_THREADS.
        env["OMP_NUM_THREADS"] = os.environ.get("FACENET_CPU_THREADS") or \
            str(max(1, (os.cpu_count() or 1) // max(1, len(owned))))
    return env


def start_trainer(spec_path: str, env: dict, cwd: str) -> subprocess.Popen:
    """`python -m facenet.train --spec SPEC` in a process group of its own (torchrun and every rank in it), its
    output one pipe of lines."""
    return subprocess.Popen([sys.executable, "-m", "facenet.train", "--spec", spec_path], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd, text=True,
                            bufsize=1, start_new_session=True)


def pump_output(proc: subprocess.Popen, log, reg: Registry, job_id: str, prefix: str = "",
                on_line: Callable[[str], None] = lambda line: None) -> None:
    """Copy a trainer's output lines to its log file, and in batches (prefixed) to the job's log in Redis, which
    `logs -f` shows, until the trainer closes it. The file keeps every line; Redis holds a convenience copy."""
    pending: list[str] = []
    last_push = time.time()

    def push() -> None:
        try:
            reg.append_log(job_id, pending)
        except Exception:  # Redis away: the file has the lines
            pass

    for line in proc.stdout:
        line = line.rstrip("\n")
        on_line(line)
        log.write(line + "\n")
        pending.append(prefix + line)
        if time.time() - last_push > 0.5 or len(pending) > 200:
            push()
            pending, last_push = [], time.time()
    push()


def check_job_paths(spec: TrainSpec, data_roots: list[str], output: str) -> dict:
    """The spec's own paths besides --data, checked and resolved without touching the spec: --pretrained and
    --verify-pairs must lie in the data roots (refused before anything says whether they exist),
    --audit-samples in them or, relative, beneath the job's output folder `output`. Returns {field: path}
    for `dataclasses.replace` on the worker's copy of the spec (the stored spec keeps what the user wrote)."""
    paths = {}
    if spec.pretrained not in (None, "", "none", "auto"):
        paths["pretrained"] = check_path_allowed(spec.pretrained, data_roots, "--pretrained")
    if spec.verify_pairs:
        paths["verify_pairs"] = check_path_allowed(spec.verify_pairs, data_roots, "--verify-pairs")
    if spec.audit_samples:
        if os.path.isabs(spec.audit_samples):
            paths["audit_samples"] = check_path_allowed(spec.audit_samples, data_roots, "--audit-samples")
        else:
            paths["audit_samples"] = check_path_allowed(os.path.join(output, spec.audit_samples), [output],
                                                        "--audit-samples")
    return paths


def job_output(settings: Settings, job_id: str) -> str:
    """Where a job writes: this worker's own runs folder and the job id, whatever the job record says (the
    submitting client's FACENET_RUNS_DIR, or anyone who can write to Redis, must not choose it)."""
    if not JOB_ID.fullmatch(job_id or ""):
        raise UserError(f"job id {job_id!r}: not one of ours")
    return os.path.join(settings.runs_dir, job_id)


def worker_devices() -> tuple[str, list[int]]:
    """This worker's device type and the device ids it owns (FACENET_DEVICE_TYPE, FACENET_DEVICES)."""
    device_type = os.environ.get("FACENET_DEVICE_TYPE", "cpu")
    return device_type, parse_devices(os.environ.get("FACENET_DEVICES", "0"))


class Heartbeat(threading.Thread):
    """Renews the attempt's heartbeat and its device leases; sets `lost` (the attempt must stop at once)
    when another attempt took the job over or a lease is no longer this attempt's."""

    def __init__(self, reg: Registry, job_id: str, token: str, node: str, devices: list[int]):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.reg, self.job_id, self.token, self.node, self.devices = reg, job_id, token, node, devices
        # Leases name the attempt, not just the job: attempt A of a job cleaning up after losing its
        # heartbeat must not drop (or renew) the leases attempt B of the same job holds.
        self.holder = f"{job_id}:{token}"
        self.leased: list[int] = []
        self.gang: list[tuple[str, list[int]]] = []  # a job over several nodes: (node, devices), this one first
        self.lost = threading.Event()
        # Stop at once, no grace: the lease could not be renewed in time, or another attempt holds it now.
        self.stop_now = False
        self.why = ""
        self.stopped = threading.Event()
        self.renewed_at = time.monotonic()

    def run(self) -> None:
        while not self.stopped.wait(max(0.5, self.reg.ttl / 6)):
            try:
                if not self.reg.heartbeat(self.job_id, self.token):
                    self.why = "another attempt took the job over"
                    self.lost.set()
                held = [(self.node, self.leased)] if self.leased else []
                held += self.gang[1:]
                if any(self.reg.renew_leases(node, devs, self.holder) < len(devs) for node, devs in held):
                    self.why = "another attempt holds its device (its lease lapsed while Redis was away)"
                    self.stop_now = True  # the other holder may be training there already
                    self.lost.set()
                else:
                    self.renewed_at = time.monotonic()
                if self.gang:
                    from services import gang

                    gang.renew_assignments(self.reg, self.holder, self.gang)
            except Exception:  # Redis briefly away: the next beat retries
                pass
            # A lease not renewed for most of its TTL may expire and pass to another job: stop the trainer
            # before that can happen, so no device is ever used by two jobs at once (Redis restarts shorter
            # than LEASE_SAFETY x TTL are ridden out).
            if self.leased and time.monotonic() - self.renewed_at > LEASE_SAFETY * self.reg.ttl:
                self.why = f"could not renew its device lease for {LEASE_SAFETY * self.reg.ttl:.0f} s (Redis away)"
                self.stop_now = True
                self.lost.set()

    def stop(self) -> None:
        self.stopped.set()


def run_train_job(settings: Settings, reg: Registry, job_id: str, node: str,
                  report: Callable[[dict], None] = lambda progress: None) -> dict:
    """Run one attempt of train job `job_id` on worker `node`; returns what the Celery task returns."""
    token = uuid.uuid4().hex
    state, attempts = reg.claim(job_id, token)
    if state in ("missing", "done", "busy"):
        return {"job": job_id, "skipped": state}
    if state == "cancel":
        _cancel_before_start(settings, reg, job_id)
        return {"job": job_id, "status": CANCELLED}
    job = reg.get(job_id)
    if attempts > settings.max_attempts:
        why = job.get("message") or "the worker running it died"
        mlflow_runs.end_job_run(settings.mlflow_uri, job, "FAILED")  # the lost attempt left it RUNNING
        reg.finish(job_id, FAILED, error=f"gave up after {attempts - 1} attempts: {why}")
        reg.release(job_id, token)
        return {"job": job_id, "status": FAILED}
    device_type, devices = worker_devices()
    beat = Heartbeat(reg, job_id, token, node, devices)
    beat.start()
    try:
        return _attempt(settings, reg, job, attempts, node, device_type, devices, beat, report)
    except UserError as exc:
        mlflow_runs.end_job_run(settings.mlflow_uri, reg.get(job_id), "FAILED")  # the run first, then the job
        reg.finish(job_id, FAILED, error=str(exc))
        return {"job": job_id, "status": FAILED, "error": str(exc)}
    finally:
        beat.stop()
        reap_attempt(beat.holder)  # nothing of this attempt may run on a device it gives back
        if beat.gang[1:]:
            from services import gang

            _retrying(lambda: gang.withdraw(reg, job_id, beat.holder, beat.gang))  # the other nodes' trainers first
            for other, devs in beat.gang[1:]:
                _retrying(lambda: reg.renew_leases(other, devs, beat.holder, drop=True))
        if beat.leased:
            _retrying(lambda: reg.renew_leases(node, beat.leased, beat.holder, drop=True))
        _retrying(lambda: reg.release(job_id, token))


def _attempt(settings: Settings, reg: Registry, job: dict, attempts: int, node: str, device_type: str,
             devices: list[int], beat: Heartbeat, report: Callable[[dict], None]) -> dict:
    job_id = job["id"]
    spec = TrainSpec.from_dict(job["spec"])
    per_node = spec.npus_per_node
    if per_node > len(devices):
        raise UserError(f"--npus {spec.npus}: worker {node} has {len(devices)} {device_type} device(s)")
    spec.data = check_path_allowed(spec.data, settings.data_roots, "--data")
    if not os.path.isdir(spec.data):
        raise UserError(f"--data {spec.data}: no such directory on worker {node}")
    output = job_output(settings, job_id)
    spec = dataclasses.replace(spec, **check_job_paths(spec, settings.data_roots, output))

    # Wait for devices without giving up the message: the job keeps its place, cancel still works.
    # A job over several nodes waits for its whole gang at once (gang.py): it holds nothing while it waits.
    from services import gang as gangs

    while True:
        if spec.nnodes == 1:
            got = _retrying(lambda: reg.lease(node, devices, spec.npus, beat.holder))
            team = [(node, got)] if got else []
        else:
            team = _retrying(lambda: reg.gang_lease(gangs.candidates(reg, node, devices, device_type, per_node),
                                                    per_node, spec.nnodes, beat.holder))
        if team:
            got, beat.leased, beat.gang = team[0][1], team[0][1], team if spec.nnodes > 1 else []
            break
        if _retrying(lambda: reg.cancel_requested(job_id)):
            _cancel_before_start(settings, reg, job_id)
            return {"job": job_id, "status": CANCELLED}
        wanted = (f"{spec.npus} free {device_type} device(s) on {node}" if spec.nnodes == 1 else
                  f"{spec.nnodes} {device_type} workers with {per_node} free device(s) each, {node} among them")
        _retrying(lambda: reg.update(job_id, message=f"waiting for {wanted}"))
        time.sleep(1.0)

    os.makedirs(output, exist_ok=True)
    resumed = attempts > 1
    reg.update(job_id, status=RUNNING, started=job.get("started") or time.time(), worker=node,
               host=socket.gethostname(), devices=got, output=output,
               nodes=[n for n, _ in beat.gang] if beat.gang else [node],
               message=f"attempt {attempts}: resuming after the previous worker was lost" if resumed else "")
    run_id = job.get("mlflow_run_id")
    if settings.mlflow_uri and not run_id:
        user_tags = {k: v for k, v in spec.tags.items() if k not in RESERVED_TAGS}
        tags = {**user_tags, "job_id": job_id, "npus": str(spec.npus), "device_type": device_type,
                "amp": str(spec.amp_enabled).lower(), "host": socket.gethostname()}
        name = mlflow_runs.run_name(spec.npus, device_type, spec.batch_size, spec.amp_enabled, spec.opt_level, job_id)
        # MLflow restarting is no reason to fail a job: wait for it (the job keeps its devices and place).
        run_id = _while_mlflow_away(settings, reg, job_id, lambda: mlflow_runs.find_or_create_run(
            settings.mlflow_uri, job.get("experiment") or settings.experiment, name, tags, job_id))
        reg.update(job_id, mlflow_run_id=run_id)
        _while_mlflow_away(settings, reg, job_id, lambda: _log_manifest(settings, run_id, spec.data, output))

    spec.device = device_type
    spec.device_list = got if device_type in ("npu", "cuda") else None
    spec.output = output
    spec.resume = "auto"
    spec.events = os.path.join(output, "events.jsonl")
    spec.json_out = os.path.join(output, "summary.json")
    spec.mlflow_uri = settings.mlflow_uri
    spec.run_id = run_id
    spec.experiment = job.get("experiment") or settings.experiment
    spec.tags = {**spec.tags, "job_id": job_id, "attempts": str(attempts)}
    spec_path = os.path.join(output, "spec.json")
    endpoint = None
    if beat.gang:
        endpoint = gangs.advertised_endpoint()
        gangs.assign(reg, job_id, beat.holder, beat.gang, endpoint, TrainSpec.from_dict(spec.to_dict()), output,
                     device_type, job.get("task_id"))
    with open(spec_path, "w", encoding="utf-8") as fh:
        fh.write(spec.to_json())
    if os.path.exists(spec.json_out):
        os.remove(spec.json_out)  # a summary left by an earlier attempt must not pass for this one's

    env = attempt_env(settings, beat.holder, node, got, os.path.join(output, "heartbeat"),
                      rank=0 if endpoint else None, endpoint=endpoint)
    log_path = os.path.join(output, "train.log")
    log = open(log_path, "a", encoding="utf-8", buffering=1)
    proc = start_trainer(spec_path, env, output)
    reg.update(job_id, trainer_pid=proc.pid, trainer_started=time.time())
    follower = _Follower(reg, job_id, spec.events, proc, log)
    follower.start()
    outcome = _watch(reg, job_id, proc, beat, follower, report, settings)
    reap_attempt(beat.holder)  # before another attempt may resume into the same output folder
    follower.join(timeout=30)
    log.close()
    remove_stale_temp_files(output)  # a checkpoint half-written by a trainer killed mid-save

    if outcome == "lost":  # another attempt owns the job now (or its leases lapsed); leave its record alone
        print(f"job {job_id} attempt {attempts}: stopped, {beat.why}", file=sys.stderr)
        return {"job": job_id, "skipped": "taken over"}
    rc = proc.returncode
    if outcome == "done" and rc and not os.path.exists(spec.json_out) and not follower.user_error():
        # Killed by a signal from outside (the OOM killer, an operator), a rank that died, a crash: not the
        # job's own input (that exits 2 with an `error:` line and fails at once). Resume from the checkpoint.
        outcome = "killed" if rc < 0 else "crashed"
    if outcome in ("stalled", "overtime", "killed", "crashed", "node lost"):
        why = {"node lost": getattr(follower, "node_lost", "a node of the job was lost"),
               "stalled": f"the trainer wrote nothing for {settings.trainer_stall_seconds} s (hung?; "
                          "FACENET_TRAINER_STALL_SECONDS)",
               "overtime": f"the job ran past FACENET_MAX_JOB_SECONDS ({settings.max_job_seconds} s)",
               "killed": f"the trainer was killed by signal {-(rc or 0)} (out of memory?)",
               "crashed": f"the trainer exited with code {rc}: {follower.error_line()}"}[outcome]
        _log_training_log(settings, run_id, log_path)
        if outcome != "overtime" and attempts < settings.max_attempts:
            # Another attempt resumes from the last checkpoint. The same step drops this attempt's heartbeat,
            # or the new message would find the job held and drop itself. (False: a sweeper got there first
            # because this heartbeat had lapsed; it sent the message.)
            from services.tasks import requeue_train

            requeue_train(reg, job, f"attempt {attempts} stopped: {why}; trying again", holder=beat.token)
            return {"job": job_id, "requeued": why}
        mlflow_runs.end_job_run(settings.mlflow_uri, reg.get(job_id), "FAILED")
        error = why if outcome == "overtime" else f"gave up after {attempts} attempt(s): {why}"
        _retrying(lambda: reg.finish(job_id, FAILED, error=error, trainer_pid=None))
        return {"job": job_id, "status": FAILED, "error": error}
    if outcome == "cancelled":
        mlflow_runs.end_job_run(settings.mlflow_uri, reg.get(job_id), "KILLED")
        _log_training_log(settings, run_id, log_path)
        _retrying(lambda: reg.finish(job_id, CANCELLED, message="cancelled while running; trainer stopped",
                                     trainer_pid=None))
        return {"job": job_id, "status": CANCELLED}
    # summary.json is written (atomically) when training is complete: a trainer killed after it succeeded.
    summary = _read_json(spec.json_out)
    _log_training_log(settings, run_id, log_path)
    if summary is None:
        error = follower.error_line() or f"trainer exited with code {rc}"
        if rc is not None and rc < 0:
            error = f"trainer killed by signal {-rc}; {error}"
        mlflow_runs.end_job_run(settings.mlflow_uri, _retrying(lambda: reg.get(job_id)), "FAILED")
        _retrying(lambda: reg.finish(job_id, FAILED, error=error, trainer_pid=None))
        return {"job": job_id, "status": FAILED, "error": error}
    result = {k: summary.get(k) for k in ("fps", "acc1", "epochs", "world_size", "device", "precision",
                                          "e2e_seconds", "model", "checkpoint", "mlflow_run_id")}
    _retrying(lambda: reg.finish(job_id, SUCCEEDED, result=result, trainer_pid=None,
                                 checkpoint=summary.get("checkpoint")))
    return {"job": job_id, "status": SUCCEEDED, **{k: result[k] for k in ("fps", "acc1")}}


def _watch(reg: Registry, job_id: str, proc: subprocess.Popen, beat: Heartbeat, follower: "_Follower",
           report: Callable[[dict], None], settings: Settings) -> str:
    """Follow the trainer until it exits; 'done', 'cancelled', 'lost', 'stalled' (no output for the stall
    limit) or 'overtime' (past the longest a job may run)."""
    import redis

    last_progress = None
    started_at = time.time()
    deadline = time.time() + settings.max_job_seconds
    while True:
        try:
            proc.wait(timeout=0.5)
            follower.poll_events()
            _retrying(lambda: _push_progress(reg, job_id, follower, report, last_progress))
            return "done"
        except subprocess.TimeoutExpired:
            pass
        follower.poll_events()
        if beat.lost.is_set():
            _stop_group(proc, grace=0 if beat.stop_now else KILL_GRACE_SECONDS)
            return "lost"
        if beat.gang:
            from services import gang

            gone = _retrying(lambda: gang.lost_nodes(reg, job_id, beat.holder, beat.gang, started_at))
            if gone:
                follower.node_lost = f"worker {', '.join(node for _, node in gone)} of the job's nodes was lost"
                _stop_group(proc, grace=0)
                return "node lost"
        if time.time() - follower.alive_at() > settings.trainer_stall_seconds:
            _stop_group(proc)
            return "stalled"
        if time.time() > deadline:
            _stop_group(proc)
            return "overtime"
        try:
            last_progress = _push_progress(reg, job_id, follower, report, last_progress)
            if reg.cancel_requested(job_id):
                _stop_group(proc)
                return "cancelled"
        except redis.RedisError:
            continue  # Redis restarting: training goes on; progress catches up when it is back


def _retrying(fn, seconds: float = 120.0):
    """Run a registry write, retrying while Redis is briefly away (a restart): results must not be lost."""
    import redis

    deadline = time.time() + seconds
    while True:
        try:
            return fn()
        except redis.RedisError:
            if time.time() > deadline:
                raise
            time.sleep(1.0)


def _push_progress(reg: Registry, job_id: str, follower: "_Follower", report, last):
    progress = dict(follower.progress)
    if progress and progress != last:
        fields = {"progress": progress}
        if follower.checkpoint:
            fields["checkpoint"] = follower.checkpoint
        reg.update(job_id, **fields)
        try:
            report(progress)
        except Exception:  # Flower's view is a mirror; never stop training for it
            pass
    return progress


def _stop_group(proc: subprocess.Popen, grace: float = KILL_GRACE_SECONDS) -> None:
    """SIGTERM the trainer's whole process group (torchrun and every rank), SIGKILL after a grace period
    (at once with grace 0)."""
    steps = ((signal.SIGTERM, grace), (signal.SIGKILL, 30)) if grace else ((signal.SIGKILL, 30),)
    for sig, wait in steps:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # ranks that outlived their parent share the group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def attempt_processes(holder: str) -> list:
    """Live processes carrying this attempt's ATTEMPT_ENV: the trainer, torchrun's ranks (sessions of their
    own), DataLoader workers, whatever else they started. Zombies are dead and left out."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(ATTEMPT_ENV) == holder \
                    and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:  # gone, or another user's
            continue
    return found


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # a zombie uses no device
    except psutil.Error:
        return False


def reap_attempt(holder: str, timeout: float = 30.0) -> list[int]:
    """SIGKILL every process of the attempt that outlived the trainer's process group and wait (bounded) until
    they are gone; returns their pids. Its leases are given back only after this: a stray rank or DataLoader
    worker must not go on using a device another job has leased."""
    import psutil

    strays = attempt_processes(holder)
    for p in strays:
        try:
            p.kill()
        except psutil.Error:
            pass
    if strays:
        deadline, alive = time.monotonic() + timeout, strays
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in alive if _running(p)]
        print(f"attempt {holder}: killed {len(strays)} process(es) that outlived the trainer"
              + (f"; {len(alive)} still there after {timeout:.0f} s" if alive else ""), file=sys.stderr, flush=True)
    return [p.pid for p in strays]


class _Follower(threading.Thread):
    """Copies the trainer's output to train.log and the registry; parses events.jsonl into progress."""

    def __init__(self, reg: Registry, job_id: str, events_path: str, proc: subprocess.Popen, log):
        super().__init__(daemon=True, name=f"follow-{job_id}")
        self.reg, self.job_id, self.events_path, self.proc, self.log = reg, job_id, events_path, proc, log
        self.progress: dict = {}
        self.checkpoint: str | None = None
        self._offset = os.path.getsize(events_path) if os.path.exists(events_path) else 0
        self._partial = ""
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
        try:
            with open(self.events_path, encoding="utf-8") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk.encode("utf-8"))
        if chunk:
            self.last_activity = time.time()
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
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


def _cancel_before_start(settings: Settings, reg: Registry, job_id: str) -> None:
    mlflow_runs.end_job_run(settings.mlflow_uri, reg.get(job_id), "KILLED")
    reg.finish(job_id, CANCELLED, message="cancelled before it started")


def _while_mlflow_away(settings: Settings, reg: Registry, job_id: str, fn):
    """fn(), retried while the MLflow server does not answer (restarting), up to MLFLOW_WAIT_SECONDS."""
    deadline = time.time() + MLFLOW_WAIT_SECONDS
    while True:
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
        _retrying(lambda: reg.update(job_id, message=f"waiting for MLflow ({str(err)[:120]})"))
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
