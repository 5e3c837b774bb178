"""Chaos run: jobs through a real local stack while its processes are killed, then check nothing broke.

python -m services.bench.chaos --seed S --jobs N --out build/chaos.json

Starts a private stack (`facenet-cli stack up` on free loopback ports) plus a second preprocessing worker and
two more CPU device workers (2 "devices" each), which reach Redis and MLflow through a proxy
(services/bench/proxy.py) while the stack's own workers reach them directly; references one undisturbed preprocessing of the raw set,
submits N jobs at once (`--preprocess-from`, 1p and 2p mixed; one of them a poison job whose
--pretrained file is garbage), and meanwhile, at seeded random times, SIGKILLs a device worker, a
preprocessing worker, a trainer process or Redis, stops MLflow for a while, and partitions the extra workers:
their Redis link frozen (accepts, never answers), slowed, or half its connections cut, and their MLflow link
frozen, each for longer than the heartbeat TTL, so that the stack's own workers (which still reach Redis) sweep
and requeue what the cut-off ones hold. Each fault is undone (`stack up`, the extra workers restarted, the link
healed). It also forges one well-formed message of each stage of ours (plan, shard, finalize, train) for a job in
a state that stage does not act in (a plan and a shard for a job that trains, a finalize while its shards run, a train
while it preprocesses), at a seeded time, each taken next off its queue. When every job has ended while a planned
fault kind or a forged message has not landed (no trainer to hit, no job preprocessing), it submits another ordinary
job and goes on (--extra-jobs at most; verified like the others). Every ~0.3 s it reads FACENET_LEASE /
FACENET_ATTEMPT from every trainer process, to catch one device held by two attempts at once, and two attempts of one
job alive at once.

When every job has ended it checks: every real job SUCCEEDED and the poison FAILED naming --pretrained,
no job lost, at most one MLflow run per job, each epoch's metrics in it, crops equal to the reference,
no double lease, never two trainers of one job alive at once (the process samples, and each job's own
trainers.jsonl, where a trainer that had to wait for its folder's lock says so: an observer that does not
trust the registry), no trainer process, lease key or temp file left, every forged message answered by a drop.
Writes the figures as JSON to --out;
exit 0 when all hold, else 1. The stack and the extra workers are always torn down.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil

from facenet.samples import copy_subset
from facenet.fsutil import free_port
from facenet.runenv import ATTEMPT_ENV, LEASE_ENV
from facenet.train import sole
from services.bench.proxy import Proxy
from services.procs import stop_group, wait_ended
from services.queue.registry import TERMINAL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILL_KINDS = ("device_worker", "preprocess_worker", "trainer", "redis", "mlflow")
# Faults of the extra workers' links, each lasting longer than the heartbeat TTL (--partition seconds).
PARTITION_KINDS = ("redis_freeze", "redis_slow", "redis_cut", "mlflow_freeze")
FAULT_KINDS = KILL_KINDS + PARTITION_KINDS
# Faults while which nothing is forged: Redis away or the links to it cut (a message popped on a cut link is lost).
REDIS_FAULTS = ("redis", "redis_freeze", "redis_slow", "redis_cut")
# Forged messages: our own task, a real job id, for a job in a state the stage does not act in. kind -> (task, the
# state it is sent in, the seconds after the submit within which its earliest time is drawn).
FORGED = {"plan": ("facenet.plan_dataset", "training", (0.0, 60.0)),
          "shard": ("facenet.preprocess_shard", "training", (0.0, 60.0)),
          "finalize": ("facenet.finalize_dataset", "shards running", (0.0, 8.0)),
          "train": ("facenet.train", "preprocessing", (0.0, 8.0))}
# Variables of the caller that would point the stack (or its workers) somewhere else.
FOREIGN_ENV = ("FACENET_REDIS_URL", "FACENET_MLFLOW_URI", "MLFLOW_TRACKING_URI", "FACENET_RUNS_DIR",
               "FACENET_DEVICES", "FACENET_DEVICE_TYPE", "FACENET_WORKER_NAME", "FACENET_CPU_DEVICES",
               # another stack's MLflow login would win over this stack's own (401 on every call)
               "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# name: (entrypoint, its own environment, whether it reaches Redis and MLflow through the proxies). Two of the
# three device workers are behind the proxies, so that most of the time some job trains behind them (a partition
# waits for one); the stack's own worker reaches Redis directly, sweeps, and takes what is requeued. Every device
# worker has 2 devices: a 2p job's message taken by a 1-device worker fails the job (a known gap, not chaos').
EXTRA_WORKERS = {
    "preprocess2": ("worker-preprocess", {"FACENET_WORKER_NAME": "preprocess2@%h", "FACENET_WORKER_CONCURRENCY": "1"},
                    True),
    "cpu2": ("worker-device", {"FACENET_WORKER_NAME": "cpu2@%h", "FACENET_DEVICE_TYPE": "cpu",
                               "FACENET_DEVICES": "0-1"}, True),
    "cpu3": ("worker-device", {"FACENET_WORKER_NAME": "cpu3@%h", "FACENET_DEVICE_TYPE": "cpu",
                               "FACENET_DEVICES": "0-1"}, True),
}


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


PROXIED_NODES = tuple(f"{name}@" for name, (entry, _, proxied) in EXTRA_WORKERS.items()
                      if proxied and entry == "worker-device")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.bench.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule (default: 0)")
    p.add_argument("--jobs", type=int, default=4, help="jobs submitted at once, the poison one included (default: 4)")
    p.add_argument("--faults", type=int, default=None,
                   help="faults injected at most (default: 2 per job, and at least one of each kind)")
    p.add_argument("--kinds", default=",".join(FAULT_KINDS),
                   help=f"fault kinds to inject, comma-separated (default: {','.join(FAULT_KINDS)})")
    p.add_argument("--forge", default=",".join(FORGED),
                   help=f"forged message kinds to send, comma-separated, '' for none (default: {','.join(FORGED)})")
    p.add_argument("--extra-jobs", type=int, default=2,
                   help="ordinary jobs submitted at most when every job ended before every planned fault kind and "
                        "forged message landed (default: 2)")
    p.add_argument("--timeout", type=float, default=600, help="seconds the jobs may take in all (default: 600)")
    p.add_argument("--out", default="build/chaos.json", help="where the JSON report goes (default: build/chaos.json)")
    p.add_argument("--workdir", default=None, help="state (state/) and the jobs' data (data/) go here (default: a new temp dir, removed "
                   "after a run whose invariants held)")
    p.add_argument("--sample-root", default=None, help="ROOT with raw/<identity>/*.jpg (default: the test cache "
                   "~/.cache/facenet-stack/test-data/v2, built when missing)")
    p.add_argument("--identities", type=int, default=4, help="identities in each job's raw set (default: 4)")
    p.add_argument("--per-identity", type=int, default=6, help="photos per identity (default: 6)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per job (default: 2)")
    p.add_argument("--image-size", type=int, default=96, help="crop and training size (default: 96, a third of "
                   "160's compute: the faults matter here, not the faces)")
    p.add_argument("--fault-gap", type=float, nargs=2, default=(3.0, 10.0), metavar=("MIN", "MAX"),
                   help="seconds between faults, drawn uniformly (default: 3 10)")
    p.add_argument("--mlflow-outage", type=float, nargs=2, default=(20.0, 40.0), metavar=("MIN", "MAX"),
                   help="seconds MLflow stays down, drawn uniformly (default: 20 40)")
    p.add_argument("--partition", type=float, nargs=2, default=(12.0, 20.0), metavar=("MIN", "MAX"),
                   help="seconds a link stays frozen, slow or cut, drawn uniformly: past the TTL of 6 s, a sweep, a "
                        "new attempt's claim and its trainer's start (default: 12 20)")
    p.add_argument("--slow-delay", type=float, nargs=2, default=(0.3, 1.5), metavar=("MIN", "MAX"),
                   help="seconds each chunk is held on a slow link, drawn uniformly per fault (default: 0.3 1.5)")
    return p


def sample_root(given: str | None) -> str:
    if given:
        return given
    from facenet.samples import build_sample_dataset, cache_dir, cached

    return cached(os.path.join(cache_dir(), "test-data", "v2"),
                  lambda root: build_sample_dataset(root, per_identity=40, identities=8, seed=0))


class Chaos:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.own_root = args.workdir is None
        self.root = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="facenet-chaos-"))
        os.makedirs(self.root, exist_ok=True)
        self.state_dir = os.path.join(self.root, "state")
        # The jobs' data and outputs: a root beside the state folder, never one that holds it (its secrets).
        self.data_root = os.path.join(self.root, "data")
        os.makedirs(self.data_root, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
        # FACENET_CPU_DEVICES gives the stack's CPU worker 2 devices; the concurrency of 1 is for its
        # preprocessing worker (2 cores here, and the trainers need them).
        self.env = {**env, "FACENET_STATE_DIR": self.state_dir, "FACENET_REDIS_PORT": str(free_port()),
                    "FACENET_MLFLOW_PORT": str(free_port()), "FACENET_FLOWER_PORT": str(free_port()),
                    "FACENET_HEARTBEAT_TTL": "6", "FACENET_SWEEP_SECONDS": "2",
                    # A job may be hit by several faults; the attempt bound itself is tested elsewhere.
                    "FACENET_MAX_ATTEMPTS": "8", "FACENET_DATA_ROOTS": self.data_root,
                    "FACENET_CPU_DEVICES": "0-1", "FACENET_WORKER_CONCURRENCY": "1"}
        self.extra: dict[str, subprocess.Popen] = {}
        self.proxies: dict[str, Proxy] = {}  # the extra workers' links: "redis", "mlflow"
        self.faults = {k: 0 for k in FAULT_KINDS}
        self.fault_log: list[dict] = []
        # Its own stream: the fault schedule of a seed stays what it was before messages were forged.
        self.forge_rng = random.Random(f"{args.seed}:forged")
        self.forged: list[dict] = []
        # Forged finalize messages that a worker took only after every shard of their job had ended (the shards in
        # flight both ended while the message waited for a worker): they did the real finalize's work, on the whole
        # set, and the real one was dropped. Each is checked (crops equal to the reference) and forged again.
        self.forged_late: list[dict] = []
        self._celery = None
        self.extra_jobs = 0
        self.samples = 0
        self.trainers_seen: set[int] = set()
        self.trainers_without_env: set[int] = set()
        self.attempts_seen: set[str] = set()
        self.double: dict[tuple, dict] = {}
        self.two_trainers: dict[tuple, dict] = {}  # (job, attempts): two attempts' trainers of one job alive at once
        self.stop_sampling = threading.Event()
        self._registry = None

    # ---- the stack ---------------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env=self.env, cwd=REPO)

    def stack_up(self) -> None:
        proc = self.cli("stack", "up", timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"stack up failed ({proc.returncode}): {proc.stdout}{proc.stderr}")

    @property
    def stack(self) -> dict:
        with open(os.path.join(self.state_dir, "stack.json"), encoding="utf-8") as fh:
            return json.load(fh)

    def registry(self):
        """A registry on the stack's Redis (it reconnects by itself after a restart)."""
        from services.queue.registry import registry_at

        if self._registry is None:
            self._registry = registry_at(self.stack["redis_url"], heartbeat_ttl=6, timeout=2)
        return self._registry

    def start_proxies(self) -> None:
        """The extra workers' links to Redis and MLflow (their upstream ports stay when `stack up` restarts them)."""
        from urllib.parse import urlsplit

        for name in ("redis", "mlflow"):
            u = urlsplit(self.stack[f"{name}_url" if name == "redis" else "mlflow_uri"])
            self.proxies[name] = Proxy(u.hostname, u.port, seed=self.rng.randrange(1 << 30))

    def start_extra(self, name: str) -> None:
        """Worker `name` of EXTRA_WORKERS with the environment the stack gives its own workers, its Redis and MLflow
        reached through the proxies where it says so (so that a partition cuts it off while others sweep)."""
        s = self.stack
        entry, own, proxied = EXTRA_WORKERS[name]
        redis_url, mlflow_uri = s["redis_url"], s["mlflow_uri"]
        if proxied:
            redis_url, mlflow_uri = self.proxies["redis"].url_for(redis_url), self.proxies["mlflow"].url_for(mlflow_uri)
        env = {**self.env, "FACENET_STATE_DIR": s["state_dir"], "FACENET_REDIS_URL": redis_url,
               "FACENET_MLFLOW_URI": mlflow_uri, "FACENET_RUNS_DIR": s["runs_dir"],
               "FACENET_DATA_ROOTS": os.pathsep.join(s["data_roots"]), **own}
        with open(os.path.join(self.state_dir, "logs", f"worker-{name}.log"), "ab") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "services.stack.entrypoints", entry], env=env,
                                    cwd=self.state_dir, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.extra[name] = proc
        deadline = time.time() + 120
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker {name} exited with {proc.returncode}; see {self.state_dir}/logs")
            try:
                if any(w.get("pid") == proc.pid for w in self.registry().workers()):
                    return
            except Exception:  # Redis restarting
                pass
            time.sleep(0.5)
        raise RuntimeError(f"worker {name} did not register within 120 s")

    # ---- trainers and their leases ------------------------------------------------------------------
    def trainers(self) -> list[psutil.Process]:
        """Trainer processes of this stack (others on the machine have other data roots)."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if "facenet.train" not in " ".join(p.info["cmdline"] or []):
                    continue
                if p.environ().get("FACENET_DATA_ROOTS") == self.data_root and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def sample_leases(self) -> None:
        while not self.stop_sampling.wait(0.3):
            holders: dict[tuple[str, str], set[str]] = {}
            procs: dict[tuple[str, str], list[dict]] = {}
            for p in self.trainers():
                try:
                    env = p.environ()
                except psutil.Error:
                    continue
                self.trainers_seen.add(p.pid)
                lease, attempt = env.get(LEASE_ENV), env.get(ATTEMPT_ENV)
                if not lease or not attempt:
                    self.trainers_without_env.add(p.pid)
                    continue
                self.attempts_seen.add(attempt)
                node, _, devs = lease.rpartition(":")
                try:  # what the process is, for the report: a rank, a DataLoader worker, torchrun, dying?
                    who = {"pid": p.pid, "ppid": p.ppid(), "status": p.status(), "attempt": attempt,
                           "cmdline": " ".join(p.cmdline())[-120:]}
                except psutil.Error:
                    who = {"pid": p.pid, "attempt": attempt}
                for dev in devs.split(","):
                    holders.setdefault((node, dev), set()).add(attempt)
                    procs.setdefault((node, dev), []).append(who)
            self.samples += 1
            by_job: dict[str, set[str]] = {}
            for attempts in holders.values():
                for attempt in attempts:  # <job id>:<token>[#node<R>]
                    by_job.setdefault(attempt.split(":", 1)[0], set()).add(attempt.split("#", 1)[0])
            for job, attempts in by_job.items():
                if len(attempts) > 1:
                    seen = self.two_trainers.setdefault((job, frozenset(attempts)), {
                        "job": job, "attempts": sorted(attempts), "first_seen": round(time.time() - self.t0, 1)})
                    seen["last_seen"] = round(time.time() - self.t0, 1)
            for (node, dev), attempts in holders.items():
                if len(attempts) > 1:
                    key = (node, dev, frozenset(attempts))
                    seen = self.double.setdefault(key, {"node": node, "device": dev, "attempts": sorted(attempts),
                                                        "first_seen": round(time.time() - self.t0, 1),
                                                        "processes": procs[(node, dev)]})
                    seen["last_seen"] = round(time.time() - self.t0, 1)

    # ---- faults -------------------------------------------------------------------------------------
    def fault_plan(self, n: int) -> list[str]:
        """Every kind once (when n allows), the partitions first (each waits for a trainer behind the proxy, and
        a kill that has something to hit goes meanwhile), each group in seeded order, then seeded picks; MLflow
        outages are long, so only the first pass has one."""
        wanted = self.args.kinds.split(",")
        partitions = [k for k in PARTITION_KINDS if k in wanted]
        kills = [k for k in KILL_KINDS if k in wanted]
        self.rng.shuffle(partitions)
        self.rng.shuffle(kills)
        plan = (partitions + kills)[:n]
        kinds = partitions + kills
        others = [k for k in kinds if k != "mlflow"] or kinds
        return plan + [self.rng.choice(others) for _ in range(n - len(plan))] if kinds else []

    def inject(self, kind: str) -> tuple[bool, float | None, str]:
        """Do fault `kind`; (done, seconds until its repair, what was hit). Not done: nothing to hit now."""
        s = self.stack
        if kind in ("device_worker", "preprocess_worker"):
            stack_name, extra = ("worker-cpu", "cpu2") if kind == "device_worker" else ("worker-preprocess",
                                                                                       "preprocess2")
            target = self.rng.choice([stack_name, extra])
            pid = self.extra[extra].pid if target == extra else s["services"].get(stack_name, {}).get("pid")
            if not pid or not psutil.pid_exists(pid):
                return False, None, target
            os.kill(pid, signal.SIGKILL)  # the main process; its pool children die with it (pdeathsig)
            wait_ended(pid, 30.0)
            return True, self.rng.uniform(2, 6), f"{target} pid {pid}"
        if kind == "trainer":
            found = sorted(self.trainers(), key=lambda p: p.pid)
            if not found:
                return False, None, "no trainer"
            p = self.rng.choice(found)
            try:
                what = f"trainer pid {p.pid} ({p.environ().get('FACENET_ATTEMPT', '?')})"
                p.kill()
            except psutil.Error:
                return False, None, "trainer gone"
            return True, None, what
        if kind == "redis":
            pid = s["services"]["redis"]["pid"]
            os.kill(pid, signal.SIGKILL)
            wait_ended(pid, 30.0)
            return True, self.rng.uniform(1, 4), f"redis pid {pid}"
        if kind == "mlflow":
            pid = s["services"]["mlflow"]["pid"]
            os.killpg(pid, signal.SIGKILL)
            wait_ended(pid, 30.0)
            return True, self.rng.uniform(*self.args.mlflow_outage), f"mlflow pgid {pid}"
        if kind in PARTITION_KINDS:
            # Only while a job trains behind the link: the case where a sweeper that still reaches Redis requeues
            # a job whose trainer is alive and cut off.
            behind = [p for p in self.trainers() if _environ(p).get(LEASE_ENV, "").startswith(PROXIED_NODES)]
            if not behind:
                return False, None, "no trainer behind the proxy"
            link, how = kind.split("_")
            proxy, seconds = self.proxies[link], self.rng.uniform(*self.args.partition)
            if how == "freeze":
                proxy.freeze()
                what = f"{link} link of the extra workers frozen for {seconds:.1f} s"
            elif how == "slow":
                delay = self.rng.uniform(*self.args.slow_delay)
                proxy.slow(delay)
                what = f"{link} link of the extra workers slowed by {delay:.2f} s a chunk for {seconds:.1f} s"
            else:
                what = f"{link} link of the extra workers: {proxy.cut()} connection(s) reset, half the new ones " \
                       f"for {seconds:.1f} s"
            return True, seconds, what
        raise ValueError(kind)

    def repair(self, kind: str | None = None) -> None:
        """Links healed; after any other fault (`kind`; None: whatever there was) `stack up` starts what of the
        stack is not running and the extra workers are restarted here."""
        for proxy in self.proxies.values():
            proxy.heal()
        if kind in PARTITION_KINDS:
            return  # nothing was stopped
        self.stack_up()
        for name, proc in list(self.extra.items()):
            if proc.poll() is not None:
                self.start_extra(name)

    # ---- the run ------------------------------------------------------------------------------------
    def prepare(self) -> list[str]:
        """One raw set per job, the reference crops of it and the poison file; returns the raw sets."""
        a = self.args
        src = os.path.join(sample_root(a.sample_root), "raw")
        raws = [copy_subset(src, os.path.join(self.data_root, f"raw{i}"), a.identities, a.per_identity) for i in range(a.jobs)]
        self.reference = os.path.join(self.data_root, "reference")
        proc = self.cli("preprocess", raws[0], self.reference, "--workers", "1", "--image-size",
                        str(self.args.image_size), "--json", timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"reference preprocessing failed: {proc.stdout}{proc.stderr}")
        self.reference_hash = json.loads(proc.stdout)["content_hash"]
        self.poison_file = os.path.join(self.data_root, "poison.pt")
        with open(self.poison_file, "wb") as fh:
            fh.write(b"these are not weights\x00\xff" * 64)
        return raws

    def submit(self, raws: list[str]) -> list[dict]:
        """All jobs at once; the last one is the poison. Returns [{id, npus, poison, out}]."""
        procs = [self._submit(i, raw, poison=i == len(raws) - 1) for i, raw in enumerate(raws)]
        return [self._submitted(info, proc) for info, proc in procs]

    def submit_extra(self, i: int) -> dict:
        """One more ordinary job (job number `i`, a copy of the same raw set): for faults or forged messages that had
        nothing to hit before the jobs ended."""
        a = self.args
        src = os.path.join(sample_root(a.sample_root), "raw")
        raw = os.path.join(self.data_root, f"raw{i}")
        if not os.path.isdir(raw):  # a submit that failed made it already
            copy_subset(src, raw, a.identities, a.per_identity)
        return self._submitted(*self._submit(i, raw, poison=False))

    def _submit(self, i: int, raw: str, poison: bool) -> tuple[dict, subprocess.Popen]:
        a = self.args
        out = os.path.join(self.data_root, f"out{i}")
        npus = 1 + i % 2
        args = ["submit-train", "--preprocess-from", raw, "--data", out, "--epochs", str(a.epochs),
                "--batch-size", "8", "--npus", str(npus), "--log-checkpoints", "none", "--json",
                "--image-size", str(a.image_size),
                "--pretrained", self.poison_file if poison else "none"]
        return ({"npus": npus, "poison": poison, "out": out},
                subprocess.Popen([sys.executable, "-m", "services.cli", *args], env=self.env, cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))

    @staticmethod
    def _submitted(info: dict, proc: subprocess.Popen) -> dict:
        stdout, stderr = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"submit-train failed ({proc.returncode}): {stderr.strip()}")
        return {"id": json.loads(stdout)["id"], **info}

    def job_states(self, jobs: list[dict]) -> dict[str, dict | None] | None:
        """Each job's record (None when it vanished), or None while Redis is away."""
        import redis

        try:
            reg = self.registry()
            return {j["id"]: reg.get(j["id"]) for j in jobs}
        except (redis.RedisError, OSError):
            return None

    def run(self) -> dict:
        a = self.args
        self.t0 = time.time()
        raws = self.prepare()
        log(f"reference crops in {time.time() - self.t0:.0f} s ({self.reference_hash[:19]}); starting the stack "
            f"in {self.state_dir}")
        self.stack_up()
        self.start_proxies()
        for name in EXTRA_WORKERS:
            self.start_extra(name)
        sampler = threading.Thread(target=self.sample_leases, daemon=True, name="lease-sampler")
        sampler.start()
        jobs = self.submit(raws)
        log("submitted " + ", ".join(f"{j['id']} ({j['npus']}p{' poison' if j['poison'] else ''})" for j in jobs))

        plan = self.fault_plan(a.faults if a.faults is not None else max(2 * a.jobs, len(a.kinds.split(","))))
        t_jobs = time.time()
        forge_at = {kind: t_jobs + self.forge_rng.uniform(*FORGED[kind][2]) for kind in a.forge.split(",") if kind}
        deadline = t_jobs + a.timeout
        next_fault = time.time() + self.rng.uniform(*a.fault_gap)
        repair_at = None
        states: dict = {}
        ended_at = None
        while time.time() < deadline:
            now = time.time()
            if repair_at is not None and now >= repair_at:
                self.repair(self.fault_log[-1]["kind"])
                repair_at = None
                next_fault = time.time() + self.rng.uniform(*a.fault_gap)
            got = self.job_states(jobs)
            if got is not None:
                states = got
                if all(s is None or s["status"] in TERMINAL for s in states.values()):
                    self.check_late(forge_at)
                    if not self.unlanded(plan, forge_at, deadline):
                        ended_at = time.time()
                        break
                    if repair_at is None:  # the stack whole again first: a submit asks Redis, MLflow and workers
                        self.submit_more(jobs, self.unlanded(plan, forge_at, deadline))
                    time.sleep(0.5)
                    continue
                redis_away = repair_at is not None and self.fault_log[-1]["kind"] in REDIS_FAULTS
                if not redis_away:
                    self.check_late(forge_at)
                    self.forge_due(forge_at, states)
            if plan and repair_at is None and now >= next_fault:
                # The first kind with something to hit (a trainer fault waits for a trainer).
                for kind in list(plan):
                    done, repair_in, what = self.inject(kind)
                    if done:
                        plan.remove(kind)
                        self.faults[kind] += 1
                        self.fault_log.append({"t": round(now - self.t0, 1), "kind": kind, "target": what})
                        log(f"fault {kind}: {what}")
                        if repair_in is not None:
                            repair_at = time.time() + repair_in
                        break
                next_fault = time.time() + self.rng.uniform(*a.fault_gap)
            time.sleep(0.5)
        if repair_at is not None:
            self.repair()
        jobs_seconds = (ended_at or time.time()) - t_jobs
        log(f"jobs {'ended' if ended_at else 'did not all end'} after {jobs_seconds:.0f} s; checking")
        self.repair()  # everything up for the checks (MLflow, Redis)
        report = self.verify(jobs, states, ended_at is not None)
        report["jobs_seconds"] = round(jobs_seconds, 1)
        self.stop_sampling.set()
        sampler.join(timeout=5)
        report.update(self.lease_report())
        report["seconds"] = round(time.time() - self.t0, 1)
        return report

    def unlanded(self, plan: list[str], forge_at: dict, deadline: float) -> list[str]:
        """Planned fault kinds that have not landed once (a partition waits for a trainer behind the proxy; a slow
        host ends its jobs sooner) and forged messages not sent (no job in their state), while another ordinary job
        may still be submitted for them (--extra-jobs, with time left for it); else []."""
        if self.extra_jobs >= self.args.extra_jobs or deadline - time.time() < 150:
            return []
        return sorted({k for k in plan if not self.faults[k]} | set(forge_at))

    def submit_more(self, jobs: list[dict], unlanded: list[str]) -> None:
        """Every job ended before `unlanded` landed: one more ordinary job, the run goes on."""
        try:
            job = self.submit_extra(len(jobs))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:  # a worker not registered again yet: next round
            log(f"extra job not submitted yet: {exc}")
            return
        jobs.append(job)
        self.extra_jobs += 1
        log(f"every job ended before {', '.join(unlanded)} landed: submitted {job['id']} ({job['npus']}p)")

    def forge_due(self, forge_at: dict, states: dict) -> None:
        """Send each forged message whose time has come, once there is a job in the state it is forged for."""
        for kind, at in sorted(forge_at.items(), key=lambda kv: kv[1]):
            if time.time() < at:
                continue
            target = self.forge_target(kind, states)
            if target is None:
                continue
            task, state, _ = FORGED[kind]
            args = [target, 0] if kind == "shard" else [target]
            try:
                task_id = self.send_first(task, args, "train.cpu" if kind == "train" else "preprocess")
            except Exception as exc:  # Redis restarting: the next round sends it
                log(f"forged {kind} not sent yet: {type(exc).__name__}")
                continue
            del forge_at[kind]
            self.forged.append({"t": round(time.time() - self.t0, 1), "kind": kind, "job": target, "state": state,
                                "status": states[target]["status"], "task_id": task_id})
            log(f"forged {kind} for job {target} ({state}): task {task_id}")

    def check_late(self, forge_at: dict) -> None:
        """A forged finalize a worker took only after its job's last shard had ended (the message waits for a free
        worker; two shards in flight may end within the same second) finalizes the whole set, as the real one would,
        and the real one is dropped: not a message acting on a job in the wrong state, but not the drop this run must
        show either. Such a message is moved to `forged_late` (verified: it acted on every crop) and a finalize is
        forged again, at most 3 times."""
        import redis

        for f in list(self.forged):
            if f["kind"] != "finalize" or f.get("checked"):
                continue
            try:
                meta = json.loads(self.registry().r.get(f"celery-task-meta-{f['task_id']}") or "{}")
            except (redis.RedisError, OSError):
                return
            if meta.get("status") not in ("SUCCESS", "FAILURE"):
                continue
            f["checked"] = True
            result = meta.get("result")
            if (isinstance(result, dict) and "skipped" not in result and len(self.forged_late) < 3
                    and result.get("content_hash") == self.reference_hash):
                self.forged.remove(f)
                self.forged_late.append({**f, "result": result})
                forge_at["finalize"] = time.time()
                log(f"forged finalize for job {f['job']} was taken after the job's last shard ended: it finalized "
                    "the whole set (the reference's crops); forging another")

    def forge_target(self, kind: str, states: dict) -> str | None:
        """A job in the state `kind` is forged for, drawn from the seeded stream; None when there is none. A finalize or
        a train message is sent only while at least 2 of the job's shards are unfinished: taken next off its queue, it
        meets the job still preprocessing whichever shard ends first."""
        if FORGED[kind][1] == "training":
            found = [j for j, rec in states.items() if rec and rec["status"] == "RUNNING"]
        else:
            r = self.registry().r
            found = []
            for j, rec in states.items():
                if not rec or rec["status"] != "PREPROCESSING":
                    continue
                planned = bool(rec.get("plan_id")) and rec.get("shards")
                pending = rec["shards"] - r.scard(f"facenet:job:{j}:shards") if planned else None
                if pending is not None and pending >= 2 or pending is None and kind == "train":
                    found.append(j)
        return self.forge_rng.choice(sorted(found)) if found else None

    def send_first(self, task: str, args: list, queue: str) -> str:
        """Send our task `task` with `args` to `queue` as any client of the stack's Redis can (Celery's own sender, no
        eta, no options), then move it to the end of the queue its workers take next; returns its task id."""
        from celery import Celery

        if self._celery is None:
            url = self.stack["redis_url"]
            self._celery = Celery(broker=url, backend=url)
        task_id = self._celery.send_task(task, args=args, queue=queue).id
        self.registry().r.eval(_TO_FRONT, 1, queue, task_id)
        return task_id

    def forged_report(self) -> dict:
        """What each forged message's task returned (the result backend): dropped when it skipped its job."""
        r = self.registry().r
        deadline = time.time() + 30  # answered in milliseconds; a worker restarting takes longer
        for f in self.forged:
            while True:
                meta = json.loads(r.get(f"celery-task-meta-{f['task_id']}") or "{}")
                if meta.get("status") in ("SUCCESS", "FAILURE") or time.time() > deadline:
                    break
                time.sleep(0.5)
            f["result"] = meta.get("result") if meta else None
            f["dropped"] = (meta.get("status") == "SUCCESS" and isinstance(f["result"], dict)
                            and "skipped" in f["result"])
        forged = {k: sum(f["kind"] == k for f in self.forged) for k in FORGED}
        return {"forged": forged, "forged_log": self.forged, "forged_late": self.forged_late,
                "forged_dropped": {k: all(f["dropped"] for f in self.forged if f["kind"] == k) and n > 0
                                   for k, n in forged.items()}}

    # ---- the checks ---------------------------------------------------------------------------------
    def verify(self, jobs: list[dict], states: dict, all_ended: bool) -> dict:
        from mlflow.entities import ViewType
        from mlflow.tracking import MlflowClient

        from services.stack.local import use_mlflow_login

        states = self.job_states(jobs) or states
        time.sleep(10)  # grace: trainers of ended jobs stop, the sampler keeps watching meanwhile
        leftover_processes = []
        for p in self.trainers():
            try:
                leftover_processes.append({"pid": p.pid, "cmdline": " ".join(p.cmdline()),
                                           "attempt": p.environ().get(ATTEMPT_ENV)})
            except psutil.Error:  # it stopped just now
                continue
        time.sleep(6)  # + the heartbeat TTL: a lease nobody renews has expired by now
        leftover_leases = sorted(self.registry().r.scan_iter("facenet:lease:*"))

        use_mlflow_login(self.stack)
        client = MlflowClient(self.stack["mlflow_uri"])
        experiment = client.get_experiment_by_name("facenet")
        out = {"jobs": [], "succeeded": [], "failed": [], "lost_jobs": [], "runs_per_job": {},
               "missing_epoch_metrics": [], "crops_equal": {}, "poison_ok": False}
        for j in jobs:
            rec = states.get(j["id"])
            status = rec["status"] if rec else "VANISHED"
            out["jobs"].append({"id": j["id"], "npus": j["npus"], "poison": j["poison"], "status": status,
                                "attempts": rec.get("attempts") if rec else None,
                                "error": rec.get("error") if rec else None,
                                "mlflow_run_id": rec.get("mlflow_run_id") if rec else None})
            if status not in TERMINAL:
                out["lost_jobs"].append(j["id"])
            elif status == "SUCCEEDED":
                out["succeeded"].append(j["id"])
            else:
                out["failed"].append({"id": j["id"], "reason": rec.get("error") or rec.get("message")})
            if j["poison"]:
                out["poison_ok"] = status == "FAILED" and "--pretrained" in ((rec or {}).get("error") or "")
            runs = client.search_runs([experiment.experiment_id], f"tags.job_id = '{j['id']}'",
                                      run_view_type=ViewType.ALL) if experiment else []
            out["runs_per_job"][j["id"]] = len(runs)
            if status == "SUCCEEDED":
                steps = {m.step for r in runs for m in client.get_metric_history(r.info.run_id, "loss")}
                if not set(range(1, self.args.epochs + 1)) <= steps:
                    out["missing_epoch_metrics"].append({"id": j["id"], "loss_steps": sorted(steps)})
                out["crops_equal"][j["id"]] = self.content_hash(j["out"]) == self.reference_hash
        out["runs_per_job_max"] = max(out["runs_per_job"].values(), default=0)
        out["faults"] = self.faults
        out["fault_log"] = self.fault_log
        out["leftover_processes"] = leftover_processes
        out["leftover_leases"] = leftover_leases
        temp_dirs = [j["out"] for j in jobs] + [self.stack["runs_dir"]]
        out["leftover_temp_files"] = sorted(os.path.join(d, f) for top in temp_dirs for d, _, files in os.walk(top)
                                            for f in files if ".tmp-" in f)
        out.update(self.journals(jobs))
        out.update(self.forged_report())
        out["extra_jobs"] = self.extra_jobs
        out["all_ended"] = all_ended
        return out

    def journals(self, jobs: list[dict]) -> dict:
        """What each job's trainers said of their output folder's lock (facenet/train/sole.py): how many took it,
        and every one that had to wait for another trainer of the same job still alive."""
        taken, waits = 0, []
        for j in jobs:
            for record in sole.journal(os.path.join(self.stack["runs_dir"], j["id"])):
                taken += record.get("event") == "got"
                if record.get("event") == "busy" or record.get("event") == "got" and record.get("waited"):
                    waits.append({"job": j["id"], **record})
        return {"trainer_locks_taken": taken, "trainer_lock_waits": waits}

    @staticmethod
    def content_hash(out: str) -> str | None:
        try:
            with open(os.path.join(out, "manifest.json"), encoding="utf-8") as fh:
                return json.load(fh).get("content_hash")
        except (OSError, ValueError):
            return None

    def lease_report(self) -> dict:
        # The check needs the variables the supervisor puts on every trainer; without them it is unknown.
        if not self.trainers_seen:
            check = "unknown: no trainer process ran"
        elif not self.attempts_seen:
            check = "unknown: no trainer carried FACENET_LEASE/FACENET_ATTEMPT"
        elif self.trainers_without_env:
            check = f"partial: {len(self.trainers_without_env)} trainer process(es) without FACENET_LEASE/ATTEMPT"
        else:
            check = "ok"
        return {"double_leases": len(self.double), "double_lease_detail": list(self.double.values()),
                "two_trainers_of_a_job": list(self.two_trainers.values()),
                "lease_check": check, "lease_samples": self.samples, "attempts_seen": len(self.attempts_seen),
                "trainer_processes_seen": len(self.trainers_seen)}

    def teardown(self) -> None:
        self.stop_sampling.set()
        for proxy in self.proxies.values():
            proxy.close()
        for proc in self.extra.values():
            if proc.poll() is None:
                stop_group(proc.pid)
            proc.wait()
        if os.path.exists(os.path.join(self.state_dir, "stack.json")):
            self.cli("stack", "down", timeout=180)
        for p in self.trainers():  # a leftover has been reported; it must not outlive the run
            try:
                p.kill()
            except psutil.Error:
                pass


# Move the item of queue KEYS[1] that carries task id ARGV[1] to the end workers pop (BRPOP) next.
_TO_FRONT = """
for _, item in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if string.find(item, ARGV[1], 1, true) then
    redis.call('LREM', KEYS[1], 1, item)
    redis.call('RPUSH', KEYS[1], item)
    return 1
  end
end
return 0
"""


def _environ(p: psutil.Process) -> dict:
    try:
        return p.environ()
    except psutil.Error:
        return {}


def violations(r: dict) -> list[str]:
    """The invariants that do not hold, one phrase each."""
    real = [j for j in r["jobs"] if not j["poison"]]
    bad = [f"job {j['id']} {j['status']}: {j['error']}" for j in real if j["status"] != "SUCCEEDED"]
    if not r["poison_ok"]:
        poison = next(j for j in r["jobs"] if j["poison"])
        bad.append(f"poison job {poison['id']} {poison['status']} ({poison['error']}), not FAILED on --pretrained")
    if r["lost_jobs"]:
        bad.append(f"lost jobs {r['lost_jobs']}")
    if r["runs_per_job_max"] > 1:
        bad.append(f"up to {r['runs_per_job_max']} MLflow runs for one job")
    if r["double_leases"]:
        bad.append(f"{r['double_leases']} double lease(s)")
    if r["two_trainers_of_a_job"]:
        bad.append(f"two trainers of one job alive at once: {r['two_trainers_of_a_job']}")
    if r["trainer_lock_waits"]:
        bad.append(f"{len(r['trainer_lock_waits'])} trainer(s) found another trainer of their job still in its folder")
    if r["lease_check"] != "ok":
        bad.append(f"lease check {r['lease_check']}")
    for key in ("leftover_processes", "leftover_leases", "leftover_temp_files", "missing_epoch_metrics"):
        if r[key]:
            bad.append(f"{len(r[key])} {key.replace('_', ' ')}")
    acted = [f"{f['kind']} for job {f['job']} ({f['state']}): {f['result']}" for f in r["forged_log"]
             if not f["dropped"]]
    if acted:
        bad.append(f"forged messages not dropped: {acted}")
    if not all(r["crops_equal"].values()):
        bad.append(f"crops differ from the reference: {[k for k, v in r['crops_equal'].items() if not v]}")
    return bad


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.jobs < 2:
        print("error: --jobs must be at least 2 (one of them is the poison job)", file=sys.stderr)
        return 2
    forge = set(filter(None, args.forge.split(","))) - set(FORGED)
    if forge:
        print(f"error: --forge {','.join(sorted(forge))}: choose from {','.join(FORGED)}", file=sys.stderr)
        return 2
    unknown = set(args.kinds.split(",")) - set(FAULT_KINDS)
    if unknown:
        print(f"error: --kinds {','.join(sorted(unknown))}: choose from {','.join(FAULT_KINDS)}", file=sys.stderr)
        return 2
    chaos = Chaos(args)
    report, error = None, None
    try:
        report = chaos.run()
    except Exception as exc:  # the run itself broke (a stack that would not start): still tear down, say why
        error = f"{type(exc).__name__}: {exc}"
    finally:
        chaos.teardown()
    if report is None:
        report = {"error": error, "seconds": round(time.time() - chaos.t0, 1) if hasattr(chaos, "t0") else 0}
        bad = [error]
    else:
        bad = violations(report)
    report.update(seed=args.seed, ok=not bad, violations=bad, workdir=chaos.root)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, default=str)
    if report.get("jobs"):
        real = [j for j in report["jobs"] if not j["poison"]]
        poison = "failed on --pretrained" if report["poison_ok"] else "did not fail on --pretrained"
        print(f"chaos seed {args.seed}: {len(report['succeeded'])}/{len(real)} real jobs succeeded, poison {poison}, "
              f"faults {report['faults']}, forged {report['forged']} (all dropped: "
              f"{all(f['dropped'] for f in report['forged_log'])}), {report['extra_jobs']} extra job(s), "
              f"{report['double_leases']} double leases, "
              f"{len(report['two_trainers_of_a_job'])} times two trainers of a job, {report['trainer_locks_taken']} "
              f"trainer locks taken and {len(report['trainer_lock_waits'])} waited for, {report['seconds']:.0f} s: "
              + ("OK" if not bad else "FAILED: " + "; ".join(bad)))
    else:
        print(f"chaos seed {args.seed}: FAILED: {error}")
    if not bad and chaos.own_root:
        shutil.rmtree(chaos.root, ignore_errors=True)
    elif bad:
        print(f"state, logs and runs kept in {chaos.root}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
