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

Flower shows each other node's part as a task of its own, `facenet.train_node` (args: job, rank; parent: the
job's train task) on that node's worker: received and started when its trainer starts, then SUCCESS, FAILURE
(its trainer failed, or the leader found the node lost) or REVOKED (the leader withdrew it: the job ended,
was cancelled, or another node was lost).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import uuid

from facenet.fsutil import free_port
from facenet.runenv import NODE_ADDRESS_ENV
from services.procs import stop_group
from services.queue.events import send_task_events
from services.queue.fence import LEASE_SAFETY, Fence
from services.queue.names import NODE_TASK
from services.queue.registry import PREFIX, Registry, registry_for
from services.queue.trainer import attempt_env, job_output, pump_output, reap_attempt, start_trainer

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
    host = os.environ.get(NODE_ADDRESS_ENV) or socket.gethostbyname(socket.gethostname())
    return f"{host}:{free_port()}"


def node_part(holder: str, rank: int) -> str:
    """Node `rank`'s part of the attempt whose lease holder is `holder`: what its trainer's processes carry
    (ATTEMPT_ENV), what is reaped when it ends, what Flower knows it by."""
    return f"{holder}#node{rank}"


def node_task_id(holder: str, rank: int) -> str:
    """The id Flower knows node `rank`'s part of attempt `holder` by (the same from the agent and the leader)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"facenet:{node_part(holder, rank)}"))


def assign(reg: Registry, job_id: str, holder: str, gang, endpoint: str, spec, output: str,
           device_type: str, task_id: str | None = None) -> bool:
    """Write each follower's spec (node 0's, placed on its own devices) and assignment; False (stop: the job is no
    longer this attempt's) when an assignment was refused because attempt `holder` lost its claim."""
    from facenet.fsutil import atomic_write

    for rank, (node, devices) in enumerate(gang[1:], 1):
        spec_path = os.path.join(output, f"spec.node{rank}.json")
        with atomic_write(spec_path) as fh:
            fh.write(spec.placed(device_list=devices if device_type in ("npu", "cuda") else None).to_json().encode())
        if not reg.assignment("set", assignment_key(node), holder, json.dumps({
                "job": job_id, "holder": holder, "rank": rank, "nnodes": len(gang), "endpoint": endpoint,
                "spec": spec_path, "output": output, "devices": devices, "device_type": device_type,
                "task": task_id})):
            return False
    return True


def renew_assignments(reg: Registry, holder: str, gang) -> None:
    for node, _ in gang[1:]:
        reg.assignment("renew", assignment_key(node), holder)


def node_said(reg: Registry, job_id: str, rank: int) -> dict:
    """What node `rank`'s agent last wrote of its part of the job ({} when nothing): holder, pid, alive, rc."""
    raw = reg.r.get(node_key(job_id, rank))
    return json.loads(raw) if raw else {}


def lost_nodes(reg: Registry, job_id: str, holder: str, gang, started_at: float) -> list[tuple[int, str]]:
    """(rank, node) of the followers whose agent no longer beats for this attempt (their worker died), after a
    start-up grace."""
    if time.time() - started_at < 3 * reg.ttl:
        return []
    lost = []
    for rank, (node, _) in enumerate(gang[1:], 1):
        if node_said(reg, job_id, rank).get("holder") != holder:
            lost.append((rank, node))
    return lost


def node_states(reg: Registry, job_id: str, nodes: list[str]) -> list[dict]:
    """What `status` shows of a gang's nodes, rank order: node 0 is the job's own record; every other node what
    its agent last said (`trainer`: running, exited N, or unknown when no agent speaks for it)."""
    states = [{"rank": 0, "node": nodes[0], "trainer": "node 0 (the job's status)"}]
    for rank, node in enumerate(nodes[1:], 1):
        said = node_said(reg, job_id, rank)
        trainer = ("running" if said.get("alive") else f"exited {said.get('rc')}") if said else "unknown"
        states.append({"rank": rank, "node": node, "trainer": trainer, "pid": said.get("pid")})
    return states


def withdraw(reg: Registry, job_id: str, holder: str, gang, timeout: float = 30.0, settle: float = 0.0) -> None:
    """Take back the followers' assignments and wait (bounded) until their trainers are gone: only then may
    their devices be leased to anyone else. A part whose agent did not say it ended (its worker died) is
    reported failed to Flower on that worker's behalf. `settle`: after a leader's trainer ended well, how long
    the followers' trainers (which end a moment after rank 0's) may end on their own before the assignments
    are dropped; a drop kills a trainer still running, which Flower would show as REVOKED, not SUCCESS."""
    def wait_until_parts_end(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and any(
                (said := node_said(reg, job_id, rank)).get("holder") == holder and said.get("alive")
                for rank in range(1, len(gang))):
            time.sleep(0.3)

    wait_until_parts_end(settle)
    for node, _ in gang[1:]:
        reg.assignment("drop", assignment_key(node), holder)
    wait_until_parts_end(timeout)
    for rank, (node, _) in enumerate(gang[1:], 1):
        state = node_said(reg, job_id, rank)
        if state.get("holder") != holder or state.get("alive"):
            send_task_events(node, ("task-failed", {
                "uuid": node_task_id(holder, rank), "traceback": "",
                "exception": f"WorkerLostError('worker {node} (node {rank} of job {job_id}) was lost')"}))


class Agent(threading.Thread):
    """A device worker's part in other nodes' gangs (see the module docstring).

    Its part is fenced like an attempt (services.queue.fence): it acts for a job only while its last round trip
    that read the job's assignment and wrote its own node record went through, and never past the point where the
    assignment (renewed by the leader with the node's device leases) could expire. Its trainer dies by that
    deadline whatever Redis, the link or the leader does."""

    def __init__(self, node: str, stop: threading.Event, settings=None, reg: Registry | None = None):
        """`settings`/`reg`: the worker's (default: load_settings() and its registry, when the thread starts)."""
        super().__init__(daemon=True, name="facenet-gang-agent")
        self.node, self.stop = node, stop
        self.current: dict | None = None  # the assignment being run
        self.proc: subprocess.Popen | None = None
        self.fence: Fence | None = None  # the running part's
        self.done_for: str | None = None  # the holder whose part already ran to its end
        self.started_at = 0.0
        self.settings, self.reg = settings, reg

    def run(self) -> None:
        from services.config import load_settings

        if self.settings is None:
            self.settings = load_settings()
        if self.reg is None:
            self.reg = registry_for(self.settings)
        while not self.stop.wait(0.5):
            try:
                self._tick(self.settings)
            except Exception as exc:  # Redis restarting or stalled: the next tick retries; the fence runs out
                print(f"facenet gang agent: {type(exc).__name__}: {exc}", flush=True)
        self._stop_trainer("its worker stopped")

    def _tick(self, settings) -> None:
        sent = time.monotonic()
        pipe = self.reg.r.pipeline(transaction=False)
        pipe.get(assignment_key(self.node))
        pipe.pttl(assignment_key(self.node))
        raw, ttl_ms = pipe.execute()
        wanted = json.loads(raw) if raw else None
        if self.current and (not wanted or wanted["holder"] != self.current["holder"]):
            self._stop_trainer()  # the leader withdrew it, died, or a newer attempt took over
        if wanted and not self.current and wanted["holder"] != self.done_for:
            self._start(wanted, settings, sent, ttl_ms)
        if self.current:
            rc = self.proc.poll()
            self._say(rc, ended=rc is not None)
            if rc is None:
                self.fence.renewed(sent, self._hold(ttl_ms))
            else:
                self._exited(rc)
                self.fence.close()
                self.done_for, self.current, self.proc, self.fence = self.current["holder"], None, None, None

    def _hold(self, ttl_ms: int) -> float:
        """How long one round trip lets the part act: the attempt's share of the TTL, and never up to the moment
        its assignment (and the node's device leases, renewed with it) could expire, less the same margin."""
        ttl = self.reg.ttl
        left = ttl_ms / 1000 if ttl_ms and ttl_ms > 0 else 0.0
        return max(0.0, min(LEASE_SAFETY * ttl, left - (1 - LEASE_SAFETY) * ttl))

    def _say(self, rc: int | None, ended: bool) -> None:
        """Write this node's record of its part (node_said): alive while the trainer runs, beat by beat; the last
        word (alive false, its exit code) outlives the leader's wrap-up: it tells withdraw() the part ended."""
        a = self.current
        self.reg.r.set(node_key(a["job"], a["rank"]), json.dumps(
            {"holder": a["holder"], "pid": self.proc.pid, "alive": not ended, "rc": rc, "node": self.node}),
            ex=3600 if ended else self.reg.ttl)

    def _exited(self, rc: int) -> None:
        a = self.current
        self._report(("task-succeeded", {"result": repr({"job": a["job"], "rank": a["rank"], "rc": 0}),
                                         "runtime": time.time() - self.started_at}) if rc == 0 else
                     ("task-failed", {"exception": f"node {a['rank']}'s trainer exited with code {rc}",
                                      "traceback": ""}))

    def _start(self, a: dict, settings, sent: float, ttl_ms: int) -> None:
        # The follower's own runs folder (shared with the leader's), never a folder the assignment names.
        a = {**a, "output": job_output(settings, a["job"])}
        a["spec"] = os.path.join(a["output"], f"spec.node{int(a['rank'])}.json")
        env = attempt_env(settings, node_part(a["holder"], a["rank"]), self.node, a["devices"],
                          os.path.join(a["output"], f"heartbeat.node{a['rank']}"), a["rank"], a["endpoint"])
        fence = Fence(self._hold(ttl_ms), sent, f"{a['job']}-node{a['rank']}")
        if not fence.holds():
            fence.close()
            return  # the assignment is about to expire: not started (the next tick sees what replaced it)
        log = None
        try:
            log = open(os.path.join(a["output"], f"train.node{a['rank']}.log"), "a", encoding="utf-8", buffering=1)
            self.proc = start_trainer(a["spec"], env, a["output"], fence)
        except BaseException:  # no process (out of pids, memory): nothing of this try may outlive it
            fence.close()
            if log is not None:
                log.close()
            raise
        self.fence, self.current, self.started_at = fence, a, time.time()

        def copy() -> None:
            try:
                pump_output(self.proc, log, self.reg, a["job"], prefix=f"[node {a['rank']}] ")
            finally:
                log.close()

        threading.Thread(target=copy, daemon=True, name=f"gang-log-{a['job']}").start()
        self._report(("task-received", {"name": NODE_TASK, "args": repr([a["job"], a["rank"]]),
                                        "kwargs": "{}", "retries": 0, "eta": None, "parent_id": a.get("task"),
                                        "root_id": a.get("task")}),
                     ("task-started", {}))  # the dispatcher adds its own pid field
        print(f"facenet gang agent: node {a['rank']} of job {a['job']} started (pid {self.proc.pid})", flush=True)

    def _report(self, *events: tuple[str, dict]) -> None:
        task = node_task_id(self.current["holder"], self.current["rank"])
        send_task_events(self.node, *((kind, {"uuid": task, **fields}) for kind, fields in events))

    def _stop_trainer(self, why: str | None = None) -> None:
        """Kill the node's trainer (and whatever of its attempt outlived it): withdrawn by the leader (Flower:
        REVOKED), or `why` (FAILURE)."""
        a = self.current
        if self.proc is not None and a is not None:
            if self.proc.poll() is None:
                stop_group(self.proc, grace=0)
                self._report(("task-failed", {"exception": f"node {a['rank']}: {why}", "traceback": ""})
                             if why else ("task-revoked", {"terminated": True, "signum": 9, "expired": False}))
            else:  # it had ended on its own since the last tick
                self._exited(self.proc.returncode)
            reap_attempt(node_part(a["holder"], a["rank"]))
            try:  # said ended: withdraw() need not speak for this node
                self._say(self.proc.returncode, ended=True)
            except Exception:  # Redis away: withdraw() says it for this node
                pass
        if self.fence is not None:
            self.fence.close()
        self.current, self.proc, self.fence = None, None, None
