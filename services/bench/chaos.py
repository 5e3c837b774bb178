"""Chaos run: jobs through a real local stack while its processes are killed, then check nothing broke.

python -m services.bench.chaos --seed S --jobs N --out build/chaos.json

Starts a private stack (`facenet-cli stack up` on free loopback ports) plus a second preprocessing and a
second CPU device worker (2 "devices" each), references one undisturbed preprocessing of the raw set,
submits N jobs at once (`--preprocess-from`, 1p and 2p mixed; one of them a poison job whose
--pretrained file is garbage), and meanwhile, at seeded random times, SIGKILLs a device worker, a
preprocessing worker, a trainer process or Redis, and stops MLflow for a while; each is brought back
(`stack up`, or the extra workers restarted). Every ~0.3 s it reads FACENET_LEASE / FACENET_ATTEMPT
from every trainer process, to catch one device held by two attempts at once.

When every job has ended it checks: every real job SUCCEEDED and the poison FAILED naming --pretrained,
no job lost, at most one MLflow run per job, each epoch's metrics in it, crops equal to the reference,
no double lease, no trainer process, lease key or temp file left. Writes the figures as JSON to --out;
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
from services.procs import stop_group, wait_ended
from services.queue.registry import TERMINAL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAULT_KINDS = ("device_worker", "preprocess_worker", "trainer", "redis", "mlflow")
# Variables of the caller that would point the stack (or its workers) somewhere else.
FOREIGN_ENV = ("FACENET_REDIS_URL", "FACENET_MLFLOW_URI", "MLFLOW_TRACKING_URI", "FACENET_RUNS_DIR",
               "FACENET_DEVICES", "FACENET_DEVICE_TYPE", "FACENET_WORKER_NAME", "FACENET_CPU_DEVICES",
               # another stack's MLflow login would win over this stack's own (401 on every call)
               "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
EXTRA_WORKERS = {
    "preprocess2": ("worker-preprocess", {"FACENET_WORKER_NAME": "preprocess2@%h", "FACENET_WORKER_CONCURRENCY": "1"}),
    "cpu2": ("worker-device", {"FACENET_WORKER_NAME": "cpu2@%h", "FACENET_DEVICE_TYPE": "cpu",
                               "FACENET_DEVICES": "0-1"}),
}


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.bench.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the fault schedule (default: 0)")
    p.add_argument("--jobs", type=int, default=4, help="jobs submitted at once, the poison one included (default: 4)")
    p.add_argument("--faults", type=int, default=None, help="faults injected at most (default: 2 per job)")
    p.add_argument("--kinds", default=",".join(FAULT_KINDS),
                   help=f"fault kinds to inject, comma-separated (default: {','.join(FAULT_KINDS)})")
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
    return p


def sample_root(given: str | None) -> str:
    if given:
        return given
    from facenet.samples import build_sample_dataset, cache_dir

    root = os.path.join(cache_dir(), "test-data", "v2")
    if not os.path.exists(os.path.join(root, ".complete")):
        build_sample_dataset(root, per_identity=40, identities=8, seed=0)
        open(os.path.join(root, ".complete"), "w").close()
    return root


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
        self.faults = {k: 0 for k in FAULT_KINDS}
        self.fault_log: list[dict] = []
        self.samples = 0
        self.trainers_seen: set[int] = set()
        self.trainers_without_env: set[int] = set()
        self.attempts_seen: set[str] = set()
        self.double: dict[tuple, dict] = {}
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

    def start_extra(self, name: str) -> None:
        """Worker `name` of EXTRA_WORKERS with the environment the stack gives its own workers."""
        s = self.stack
        entry, own = EXTRA_WORKERS[name]
        env = {**self.env, "FACENET_STATE_DIR": s["state_dir"], "FACENET_REDIS_URL": s["redis_url"],
               "FACENET_MLFLOW_URI": s["mlflow_uri"], "FACENET_RUNS_DIR": s["runs_dir"],
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
            for (node, dev), attempts in holders.items():
                if len(attempts) > 1:
                    key = (node, dev, frozenset(attempts))
                    seen = self.double.setdefault(key, {"node": node, "device": dev, "attempts": sorted(attempts),
                                                        "first_seen": round(time.time() - self.t0, 1),
                                                        "processes": procs[(node, dev)]})
                    seen["last_seen"] = round(time.time() - self.t0, 1)

    # ---- faults -------------------------------------------------------------------------------------
    def fault_plan(self, n: int) -> list[str]:
        """Every kind once (when n allows) in seeded order, then seeded picks; MLflow outages are long, so
        only the first pass has one."""
        kinds = [k for k in FAULT_KINDS if k in self.args.kinds.split(",")]
        plan = kinds[:]
        self.rng.shuffle(plan)
        plan = plan[:n]
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
        raise ValueError(kind)

    def repair(self) -> None:
        """`stack up` starts what of the stack is not running; the extra workers are restarted here."""
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
        a = self.args
        procs = []
        for i in range(a.jobs):
            poison = i == a.jobs - 1
            out = os.path.join(self.data_root, f"out{i}")
            npus = 1 + i % 2
            args = ["submit-train", "--preprocess-from", raws[i], "--data", out, "--epochs", str(a.epochs),
                    "--batch-size", "8", "--npus", str(npus), "--log-checkpoints", "none", "--json",
                    "--image-size", str(a.image_size),
                    "--pretrained", self.poison_file if poison else "none"]
            procs.append(({"npus": npus, "poison": poison, "out": out},
                          subprocess.Popen([sys.executable, "-m", "services.cli", *args], env=self.env, cwd=REPO,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        jobs = []
        for info, proc in procs:
            stdout, stderr = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"submit-train failed ({proc.returncode}): {stderr.strip()}")
            jobs.append({"id": json.loads(stdout)["id"], **info})
        return jobs

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
        for name in EXTRA_WORKERS:
            self.start_extra(name)
        sampler = threading.Thread(target=self.sample_leases, daemon=True, name="lease-sampler")
        sampler.start()
        jobs = self.submit(raws)
        log("submitted " + ", ".join(f"{j['id']} ({j['npus']}p{' poison' if j['poison'] else ''})" for j in jobs))

        plan = self.fault_plan(a.faults if a.faults is not None else 2 * a.jobs)
        t_jobs = time.time()
        deadline = t_jobs + a.timeout
        next_fault = time.time() + self.rng.uniform(*a.fault_gap)
        repair_at = None
        states: dict = {}
        ended_at = None
        while time.time() < deadline:
            now = time.time()
            if repair_at is not None and now >= repair_at:
                self.repair()
                repair_at = None
                next_fault = time.time() + self.rng.uniform(*a.fault_gap)
            got = self.job_states(jobs)
            if got is not None:
                states = got
                if all(s is None or s["status"] in TERMINAL for s in states.values()):
                    ended_at = time.time()
                    break
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
        out["all_ended"] = all_ended
        return out

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
                "lease_check": check, "lease_samples": self.samples, "attempts_seen": len(self.attempts_seen),
                "trainer_processes_seen": len(self.trainers_seen)}

    def teardown(self) -> None:
        self.stop_sampling.set()
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
    if r["lease_check"] != "ok":
        bad.append(f"lease check {r['lease_check']}")
    for key in ("leftover_processes", "leftover_leases", "leftover_temp_files", "missing_epoch_metrics"):
        if r[key]:
            bad.append(f"{len(r[key])} {key.replace('_', ' ')}")
    if not all(r["crops_equal"].values()):
        bad.append(f"crops differ from the reference: {[k for k, v in r['crops_equal'].items() if not v]}")
    return bad


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.jobs < 2:
        print("error: --jobs must be at least 2 (one of them is the poison job)", file=sys.stderr)
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
              f"faults {report['faults']}, {report['double_leases']} double leases, {report['seconds']:.0f} s: "
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
