"""Jobs over several nodes: the gang's leader assigns, each other node's worker runs its part.

The worker whose train task claims a job with --nnodes N > 1 is the gang's leader, node 0. It leases K
devices on each of N workers of the job's device type at once (Registry.gang_lease: all or none, so a
waiting gang holds nothing and two gangs cannot deadlock), then writes each other node's assignment:

  gang:<node>           JSON {job, holder, rank, nnodes, endpoint, spec, output, devices, device_type};
                        TTL = heartbeat TTL, renewed by the leader's heartbeat (a dead leader's assignment
                        expires, and its followers stop)
  job:<id>:node:<rank>  JSON {holder, pid, alive, rc} written by that node's agent, TTL = heartbeat TTL

Every device worker runs an agent thread in its main process (not a Celery task: a worker's task slot may be
busy with another job, which would deadlock a gang). The agent starts the node's own `python -m
facenet.train` (torchrun --nnodes N --node-rank R at the leader's endpoint), beats for it, copies its output
to OUTPUT/train.node<R>.log and the job's log, and kills it when its assignment goes or changes hands.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

from services.registry import PREFIX, Registry

NODE_ADDRESS_ENV = "FACENET_NODE_ADDRESS"  # the address other nodes reach this worker's rendezvous at


def assignment_key(node: str) -> str:
    return f"{PREFIX}gang:{node}"


def node_key(job_id: str, rank: int) -> str:
    return f"{PREFIX}job:{job_id}:node:{rank}"


def candidates(reg: Registry, node: str, devices: list[int], device_type: str, per_node: int):
    """The leader's own worker first, then every other live worker of the type with enough devices, by name."""
    others = sorted((w["node"], w["devices"]) for w in reg.workers()
                    if w.get("device_type") == device_type and w["node"] != node
                    and len(w.get("devices") or []) >= per_node)
    return [(node, devices)] + others


def advertised_endpoint() -> str:
    """HOST:PORT where node 0's rendezvous listens: FACENET_NODE_ADDRESS (hosts with several interfaces),
    else this host's name resolved, and a free port."""
    from services.entrypoints import free_port

    host = os.environ.get(NODE_ADDRESS_ENV) or socket.gethostbyname(socket.gethostname())
    return f"{host}:{free_port()}"


def assign(reg: Registry, job_id: str, holder: str, gang, endpoint: str, spec, output: str,
           device_type: str) -> None:
    """Write each follower's spec (its own devices) and assignment."""
    from facenet.fsutil import atomic_write

    for rank, (node, devices) in enumerate(gang[1:], 1):
        spec.device_list = devices if device_type in ("npu", "cuda") else None
        spec_path = os.path.join(output, f"spec.node{rank}.json")
        with atomic_write(spec_path) as fh:
            fh.write(spec.to_json().encode())
        reg.r.set(assignment_key(node), json.dumps({
            "job": job_id, "holder": holder, "rank": rank, "nnodes": len(gang), "endpoint": endpoint,
            "spec": spec_path, "output": output, "devices": devices, "device_type": device_type}), ex=reg.ttl)


def renew_assignments(reg: Registry, holder: str, gang) -> None:
    for node, _ in gang[1:]:
        raw = reg.r.get(assignment_key(node))
        if raw and json.loads(raw).get("holder") == holder:
            reg.r.expire(assignment_key(node), reg.ttl)


def lost_nodes(reg: Registry, job_id: str, holder: str, gang, started_at: float) -> list[str]:
    """Followers whose agent no longer beats for this attempt (their worker died), after a start-up grace."""
    if time.time() - started_at < 3 * reg.ttl:
        return []
    lost = []
    for rank, (node, _) in enumerate(gang[1:], 1):
        raw = reg.r.get(node_key(job_id, rank))
        state = json.loads(raw) if raw else None
        if not state or state.get("holder") != holder:
            lost.append(node)
    return lost


def withdraw(reg: Registry, job_id: str, holder: str, gang, timeout: float = 30.0) -> None:
    """Take back the followers' assignments and wait (bounded) until their trainers are gone: only then may
    their devices be leased to anyone else."""
    for node, _ in gang[1:]:
        raw = reg.r.get(assignment_key(node))
        if raw and json.loads(raw).get("holder") == holder:
            reg.r.delete(assignment_key(node))
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = [reg.r.get(node_key(job_id, rank)) for rank in range(1, len(gang))]
        if not any(s and json.loads(s).get("holder") == holder and json.loads(s).get("alive") for s in states):
            return
        time.sleep(0.3)


class Agent(threading.Thread):
    """A device worker's part in other nodes' gangs (see the module docstring)."""

    def __init__(self, node: str, stop: threading.Event):
        super().__init__(daemon=True, name="facenet-gang-agent")
        self.node, self.stop = node, stop
        self.current: dict | None = None  # the assignment being run
        self.proc: subprocess.Popen | None = None
        self.done_for: str | None = None  # the holder whose part already ran to its end

    def run(self) -> None:
        from services.config import load_settings
        from services.registry import connect

        s = load_settings()
        reg = Registry(connect(s.redis_url), s.heartbeat_ttl)
        while not self.stop.wait(0.5):
            try:
                self._tick(reg, s)
            except Exception as exc:  # Redis restarting: the next tick retries
                print(f"facenet gang agent: {type(exc).__name__}: {exc}", flush=True)
        self._stop_trainer()

    def _tick(self, reg: Registry, settings) -> None:
        raw = reg.r.get(assignment_key(self.node))
        wanted = json.loads(raw) if raw else None
        if self.current and (not wanted or wanted["holder"] != self.current["holder"]):
            self._stop_trainer()  # the leader withdrew it, died, or a newer attempt took over
        if wanted and not self.current and wanted["holder"] != self.done_for:
            self._start(wanted, settings)
        if self.current:
            rc = self.proc.poll()
            a = self.current
            reg.r.set(node_key(a["job"], a["rank"]), json.dumps(
                {"holder": a["holder"], "pid": self.proc.pid, "alive": rc is None, "rc": rc, "node": self.node}),
                ex=reg.ttl)
            if rc is not None:
                self.done_for, self.current, self.proc = a["holder"], None, None

    def _start(self, a: dict, settings) -> None:
        from services.supervisor import ATTEMPT_ENV, LEASE_ENV, WATCH_PID_ENV, trainer_env

        env = trainer_env(os.environ, settings.data_roots)
        env.update({"PYTHONUNBUFFERED": "1", WATCH_PID_ENV: str(os.getpid()),
                    ATTEMPT_ENV: f"{a['holder']}#node{a['rank']}", "FACENET_NODE_RANK": str(a["rank"]),
                    "FACENET_RDZV_ENDPOINT": a["endpoint"], LEASE_ENV: f"{self.node}:{','.join(map(str, a['devices']))}",
                    "FACENET_TRAINER_HEARTBEAT": os.path.join(a["output"], f"heartbeat.node{a['rank']}")})
        if a["device_type"] == "cpu":
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, len(a["devices"]))))
        log = open(os.path.join(a["output"], f"train.node{a['rank']}.log"), "a", encoding="utf-8", buffering=1)
        self.proc = subprocess.Popen([sys.executable, "-m", "facenet.train", "--spec", a["spec"]],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=a["output"], text=True, bufsize=1, start_new_session=True)
        self.current = a
        threading.Thread(target=_copy_output, args=(self.proc, log, a), daemon=True,
                         name=f"gang-log-{a['job']}").start()
        print(f"facenet gang agent: node {a['rank']} of job {a['job']} started (pid {self.proc.pid})", flush=True)

    def _stop_trainer(self) -> None:
        from services.supervisor import _stop_group, reap_attempt

        if self.proc is not None and self.current is not None:
            if self.proc.poll() is None:
                _stop_group(self.proc, grace=0)
            reap_attempt(f"{self.current['holder']}#node{self.current['rank']}")
        self.current, self.proc = None, None


def _copy_output(proc: subprocess.Popen, log, a: dict) -> None:
    """The node's output into OUTPUT/train.node<R>.log and, prefixed, the job's log (what `logs -f` shows)."""
    from services.config import load_settings
    from services.registry import connect

    s = load_settings()
    reg = Registry(connect(s.redis_url), s.heartbeat_ttl)
    pending, last = [], time.time()
    for line in proc.stdout:
        line = line.rstrip("\n")
        log.write(line + "\n")
        pending.append(f"[node {a['rank']}] {line}")
        if time.time() - last > 0.5 or len(pending) > 200:
            try:
                reg.append_log(a["job"], pending)
            except Exception:
                pass
            pending, last = [], time.time()
    try:
        reg.append_log(a["job"], pending)
    except Exception:
        pass
    log.close()
