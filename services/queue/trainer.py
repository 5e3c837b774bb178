"""The trainer process toolkit, shared by an attempt's node 0 (services.queue.attempt) and a gang's other nodes
(services.queue.gang): the trainer's environment, starting `python -m facenet.train` in a process group of its
own, copying its output, killing what of an attempt outlived it, and where a job writes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Callable

from facenet.errors import UserError
from facenet.spec import TrainSpec
from facenet.runenv import (ATTEMPT_ENV, CPU_THREADS_ENV, FENCE_ENV, HEARTBEAT_ENV, LEASE_ENV, MLFLOW_CONNECT_ENV,
                            NODE_RANK_ENV, RDZV_ENDPOINT_ENV, WATCH_PID_ENV, cpu_share, worker_devices)
from services.config import Settings, check_path_allowed
from services.queue.registry import JOB_ID, Registry


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
    devices it holds (readable from outside), its liveness file and, in a gang, its node rank and node 0's rendezvous endpoint."""
    env = trainer_env(os.environ, settings.data_roots)
    env.update({"PYTHONUNBUFFERED": "1", WATCH_PID_ENV: str(os.getpid()), ATTEMPT_ENV: holder,
                MLFLOW_CONNECT_ENV: str(settings.mlflow_wait_seconds), HEARTBEAT_ENV: heartbeat,
                LEASE_ENV: f"{node}:{','.join(map(str, devices))}"})
    if endpoint:
        env.update({NODE_RANK_ENV: str(rank), RDZV_ENDPOINT_ENV: endpoint})
    device_type, owned = worker_devices()
    if device_type == "cpu":
        # Each CPU "device" is a share of the cores; N processes must not each take all of them. Several
        # workers on one host (local "nodes") are given their share: FACENET_CPU_THREADS.
        env["OMP_NUM_THREADS"] = os.environ.get(CPU_THREADS_ENV) or str(cpu_share(len(owned)))
    return env


def start_trainer(spec_path: str, env: dict, cwd: str, fence) -> subprocess.Popen:
    """`python -m facenet.train --spec SPEC` in a process group of its own (torchrun and every rank in it), its
    output one pipe of lines, fenced by `fence` (services.queue.fence.Fence): it gets the deadline pipe, and is
    killed by the fence's watchdog when the deadline passes."""
    read_end, value = fence.channel()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "facenet.train", "--spec", spec_path], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**env, FENCE_ENV: value},
                                cwd=cwd, text=True, bufsize=1, start_new_session=True, pass_fds=(read_end,))
    finally:
        os.close(read_end)  # the trainer's copy is the one that counts
    fence.guard(proc.pid)
    return proc


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
    --verify-pairs and --verify-bin must lie in the data roots (refused before anything says whether they exist),
    --audit-samples in them or, relative, beneath the job's output folder `output`. Returns {field: path}
    for `dataclasses.replace` on the worker's copy of the spec (the stored spec keeps what the user wrote)."""
    paths = {}
    if spec.pretrained not in (None, "", "none", "auto"):
        paths["pretrained"] = check_path_allowed(spec.pretrained, data_roots, "--pretrained")
    if spec.verify_pairs:
        paths["verify_pairs"] = check_path_allowed(spec.verify_pairs, data_roots, "--verify-pairs")
    if spec.verify_bin:
        paths["verify_bin"] = [check_path_allowed(p, data_roots, "--verify-bin") for p in spec.verify_bin]
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
