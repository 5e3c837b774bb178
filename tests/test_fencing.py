"""Self-fencing against faults that are not kills: a Redis that accepts and never answers (a real redis-server
behind services/bench/proxy.py, frozen), an attempt that lost its claim while it waited, a trainer whose worker
lives but cannot renew, a gang node cut off from Redis. Never two trainers of one job at once, nothing written by
an attempt that no longer holds its job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest
import redis

from conftest import REPO, read_json, train_cmd
from facenet.runenv import ATTEMPT_ENV, FENCE_ENV, WATCH_PID_ENV
from facenet.spec import TrainSpec
from facenet.train import sole
from services.bench.proxy import Proxy
from services.config import Settings
from services.queue.attempt import Heartbeat, run_train_job
from services.queue.fence import LEASE_SAFETY, Fence
from services.queue.registry import QUEUED, call_timeout, registry_at
from services.queue.trainer import attempt_processes

pytestmark = pytest.mark.timeout(300)
TTL = 6


def _proxy(redis_url: str) -> Proxy:
    from urllib.parse import urlsplit

    u = urlsplit(redis_url)
    return Proxy(u.hostname, u.port)


@pytest.fixture
def direct(redis_url):
    """The registry as a sweeper that still reaches Redis sees it."""
    reg = registry_at(redis_url, heartbeat_ttl=TTL)
    reg.r.flushdb()
    return reg


@pytest.fixture
def cut_off(redis_url):
    """(a proxy in front of the same Redis, the registry of an attempt behind it)."""
    proxy = _proxy(redis_url)
    yield proxy, registry_at(proxy.url_for(redis_url), heartbeat_ttl=TTL)
    proxy.close()


def _job(reg, data: str = "/nonexistent") -> str:
    spec = TrainSpec(data=data, epochs=1, device="cpu")
    return reg.create("train", {"spec": spec.to_dict(), "device_type": "cpu", "npus": 1})


def test_a_stalled_redis_fences_an_attempt_before_its_heartbeat_can_expire(direct, cut_off):
    """The issue's reproduction: TTL 6, a socket that accepts and never answers. The attempt gave up after 31.1 s
    (every client waited 30 s per call, retried by redis-py); its design says 0.6 x TTL = 3.6 s after the last
    renewal that went through, while the key it holds still lives in Redis."""
    proxy, reg = cut_off
    job = _job(direct)
    claimed_at = time.monotonic()
    assert reg.claim(job, "attempt-a") == ("ok", 1)
    beat = Heartbeat(reg, job, "attempt-a", "node-a", [0], claimed_at)
    beat.start()
    try:
        time.sleep(2.5)  # a few renewals go through
        assert not beat.lost.is_set()
        last_renewal = beat.fence.deadline - beat.fence.hold
        assert last_renewal > claimed_at + 0.5
        proxy.freeze()
        assert beat.lost.wait(TTL * 2), "the attempt never gave up its claim"
        gave_up = time.monotonic()
        last_renewal = beat.fence.deadline - beat.fence.hold
        key_left = direct.r.pttl(direct.key(job) + ":hb") / 1000
        assert gave_up - last_renewal <= LEASE_SAFETY * TTL + 0.5, (gave_up - last_renewal, beat.why)
        assert key_left > 1.0, f"the claim expired in Redis {-key_left:.1f} s before the attempt stopped"
        assert "could not renew its claim" in beat.why
        assert not beat.fence.holds() and not beat.confirm()

        # One registry call through the frozen link fails after the call timeout, not after 30 s (x retries).
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            reg.r.get("facenet:anything")
        assert time.monotonic() - started < call_timeout(TTL) + 0.5
    finally:
        proxy.heal()
        beat.stop()
    # Once fenced it never renews again, so the key runs out (beats the frozen link held back may still land late and
    # renew it once: a resumed server reads what was sent) and the sweeper's requeue wins; the stale attempt's later
    # writes are refused by Redis itself.
    gone_by = time.monotonic() + key_left + TTL + 2
    while direct.r.get(direct.key(job) + ":hb") is not None:
        assert time.monotonic() < gone_by, "the fenced attempt's claim was still renewed"
        time.sleep(0.2)
    assert direct.requeue(job, "its worker was lost")
    assert not reg.heartbeat(job, "attempt-a")  # not taken back: the job is QUEUED again
    assert not reg.update(job, "attempt-a", status="RUNNING", worker="node-a")
    assert direct.get(job)["status"] == QUEUED and direct.get(job).get("worker") is None


def test_an_attempt_that_lost_its_claim_while_waiting_for_devices_starts_nothing(direct, cut_off, tmp_path):
    """Attempt A waits for a device another job holds; Redis stalls for A longer than the TTL; a sweeper requeues
    the job and attempt B claims it; the device frees up and the link heals. A must write nothing: not the job's
    status, worker or devices, no spec.json, no trainer."""
    proxy, reg = cut_off
    data = tmp_path / "data"
    (data / "person").mkdir(parents=True)
    settings = Settings(state_dir=str(tmp_path / "state"), redis_url="unused", mlflow_uri=None, flower_url=None,
                        data_roots=[str(tmp_path)], runs_dir=str(tmp_path / "runs"), heartbeat_ttl=TTL)
    job = _job(direct, str(data))
    assert direct.lease("node-a", [0], 1, "other-job:x") == [0]
    holding = threading.Event()
    holding.set()

    def other_job() -> None:  # the job that holds the device, renewing its lease directly
        while holding.is_set():
            direct.renew_leases("node-a", [0], "other-job:x")
            time.sleep(0.5)
        direct.renew_leases("node-a", [0], "other-job:x", drop=True)

    threading.Thread(target=other_job, daemon=True).start()
    result: dict = {}
    attempt = threading.Thread(target=lambda: result.update(run_train_job(settings, reg, job, "node-a")), daemon=True)
    attempt.start()
    deadline = time.time() + 30
    while "waiting for 1 free cpu" not in (direct.get(job).get("message") or ""):
        assert time.time() < deadline and attempt.is_alive(), (result, direct.get(job))
        time.sleep(0.2)
    proxy.freeze()
    while direct.alive(job):  # A's claim lapses in Redis
        time.sleep(0.2)
    assert direct.requeue(job, "its worker was lost")  # a sweeper that still reaches Redis
    assert direct.claim(job, "attempt-b") == ("ok", 2)
    holding.clear()  # the device is free now
    time.sleep(1.5)
    proxy.heal()
    attempt.join(30)
    assert not attempt.is_alive()
    assert result == {"job": job, "skipped": "taken over"}, result
    record = direct.get(job)
    assert record["status"] == QUEUED and record.get("worker") is None and record.get("devices") is None, record
    assert direct.r.get(direct.key(job) + ":hb") == "attempt-b"
    assert not os.path.exists(os.path.join(settings.runs_dir, job, "spec.json"))
    assert direct.leases("node-a", [0]) == {0: None}  # A took no lease, or gave it back


def _trainer_args(faces: str, out, epochs: int = 3) -> list[str]:
    return train_cmd("--data", faces, "--npus", "2", "--device", "cpu", "--epochs", str(epochs), "--batch-size",
                     "4", "--log-every", "1", "--workers", "0", "--output", str(out), "--json-out",
                     str(out / "summary.json"), "--pretrained", "none", "--no-log-model")


def test_a_trainer_fences_itself_at_its_deadline_though_its_worker_lives(small_faces, tmp_path):
    """A 2-process trainer whose attempt stops renewing (its worker alive, its Redis cut off) kills itself, torchrun
    and both ranks, by the deadline it was last given through its fence pipe; not before. Then a retry into the
    same folder without a checkpoint: the events file keeps the first run's lines (a follower reading on from where
    it was sees the retry's), and the summary replaces the path atomically (a hard link to it is left alone)."""
    out = tmp_path / "out"
    holder = "fencetest:0"
    fence = Fence(hold_seconds=3.0, sent_at=time.monotonic(), name="test")
    read_end, value = fence.channel()
    # Its supervisor (this process) stays alive all along, as a worker cut off from Redis does.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", FENCE_ENV: value, ATTEMPT_ENV: holder, WATCH_PID_ENV: str(os.getpid())}
    log = open(tmp_path / "fenced.log", "wb")
    proc = subprocess.Popen(_trainer_args(small_faces, out), cwd=REPO, env=env, pass_fds=(read_end,),
                            start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    os.close(read_end)
    events = out / "events.jsonl"
    try:
        first = fence.deadline
        deadline = time.time() + 240
        while not (events.exists() and '"event": "step"' in events.read_text()):
            assert proc.poll() is None and time.time() < deadline, \
                "the trainer died before its first step:\n" + (tmp_path / "fenced.log").read_text()[-3000:]
            fence.renewed(time.monotonic())
            time.sleep(0.5)
        assert fence.deadline > first + 1  # renewals reached it: it outlived the deadline it started with
        last = fence.deadline
        while time.monotonic() < last - 0.7:
            assert proc.poll() is None, "the trainer stopped before its deadline"
            time.sleep(0.1)
        assert len(attempt_processes(holder)) >= 3  # launcher, torchrun and two ranks (DataLoader-free)
        proc.wait(timeout=10)
        gone_by = time.monotonic()
        while attempt_processes(holder) and time.monotonic() < last + 5:
            time.sleep(0.1)
        assert not attempt_processes(holder), "a rank outlived its fenced trainer"
        assert time.monotonic() - last < 2.5 and gone_by - last < 2.0
        assert proc.returncode == -9  # the trainer's own watchdog: nobody else signalled it
    finally:
        fence.close()
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    fenced_lines = events.read_text().splitlines()
    journal = sole.journal(str(out))
    got = [r for r in journal if r["event"] == "got"]
    # Both ranks took their lock; a rank SIGKILLed says no more (one whose peer died may raise and say "dropped").
    assert sorted(r["rank"] for r in got) == [0, 1] and all(r["waited"] == 0 for r in got), journal
    assert {r["event"] for r in journal} <= {"got", "dropped"}

    # The retry: no checkpoint to resume (the attempt was stopped before one, or it was lost).
    if (out / "checkpoint.pt").exists():
        os.remove(out / "checkpoint.pt")
    sentinel = tmp_path / "sentinel.json"
    sentinel.write_text('{"left": "alone"}')
    os.link(sentinel, out / "summary.json")
    res = subprocess.run(_trainer_args(small_faces, out, epochs=1), cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = events.read_text().splitlines()
    assert lines[:len(fenced_lines)] == fenced_lines, "the retry cut the events file back"
    retry = [json.loads(line) for line in lines[len(fenced_lines):]]
    assert retry[0]["event"] == "start" and retry[-1]["event"] == "end"
    assert json.loads(sentinel.read_text()) == {"left": "alone"}
    assert read_json(out / "summary.json")["epochs"] == 1
    # Each rank took and dropped its lock without waiting: the fenced trainer had gone.
    after = sole.journal(str(out))[len(journal):]
    assert sorted((r["event"], r["rank"]) for r in after) == [("dropped", 0), ("dropped", 1), ("got", 0), ("got", 1)]
    assert all(r.get("waited", 0) == 0 for r in after)


def test_a_second_trainer_of_one_folder_waits_then_gives_up_without_writing(small_faces, tmp_path):
    """Two trainers must never write one output folder: while another process holds rank 0's lock, a trainer waits
    (journaled), then exits with BUSY_EXIT (the queue retries it later), having written nothing there."""
    out = tmp_path / "out"
    os.makedirs(out)
    with sole.sole_trainer(str(out), 0):
        res = subprocess.run(train_cmd("--data", small_faces, "--epochs", "1", "--batch-size", "8", "--output", str(out),
                                       "--pretrained", "none"), cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "FACENET_TRAINER_LOCK_WAIT": "1"})
    assert res.returncode == sole.BUSY_EXIT, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("busy: ") and "trainer.rank0.lock" in res.stderr
    assert sorted(os.listdir(out)) == ["trainer.rank0.lock", "trainers.jsonl"]


def test_a_lock_that_is_not_a_plain_file_or_a_folder_that_cannot_be_written_is_one_line(small_faces, tmp_path):
    """The lock is taken before anything else is written: a folder it cannot make, or a lock path someone planted
    (a hard link to another file, which would be truncated through; a FIFO), is one `error:` line and exit 2 (the
    job fails with the reason at once), never a traceback the queue would retry."""
    args = ["--data", small_faces, "--epochs", "1", "--batch-size", "8", "--pretrained", "none"]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = subprocess.run(train_cmd(*args, "--output", str(blocker / "out")), cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"error: cannot write {blocker / 'out' / 'trainer.rank0.lock'}: Not a directory (a path from --output)"]
    for plant in ("link", "fifo"):
        out = tmp_path / plant
        out.mkdir()
        if plant == "link":
            os.link(blocker, out / "trainer.rank0.lock")
        else:
            os.mkfifo(out / "trainer.rank0.lock")
        res = subprocess.run(train_cmd(*args, "--output", str(out)), cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]
        assert "trainer.rank0.lock: not a regular file of its own" in res.stderr
        assert sorted(os.listdir(out)) == ["trainer.rank0.lock"]
    assert blocker.read_text() == "x"


def test_a_gang_node_cut_off_from_redis_stops_its_trainer_by_its_own_deadline(direct, cut_off, small_faces, tmp_path):
    """A gang's node 1 runs its part while the leader (which still reaches Redis) keeps renewing its assignment.
    Its link to Redis freezes: its trainer must die by the node's own deadline, while the assignment it served is
    still alive in Redis (so nothing of the leader's view had expired yet)."""
    from services.queue import gang

    proxy, reg = cut_off
    runs = tmp_path / "runs"
    settings = Settings(state_dir=str(tmp_path / "state"), redis_url="unused", mlflow_uri=None, flower_url=None,
                        data_roots=[str(tmp_path)], runs_dir=str(runs), heartbeat_ttl=TTL)
    job = "0123456789ab"
    output = runs / job
    output.mkdir(parents=True)
    # A part that waits at node 0's rendezvous, which nobody serves: a trainer that lives until it is stopped.
    spec = TrainSpec(data=small_faces, npus=2, nnodes=2, device="cpu", output=str(output), pretrained=None,
                     batch_size=8)
    (output / "spec.node1.json").write_text(spec.to_json())
    holder = f"{job}:leader"
    assignment = {"job": job, "holder": holder, "rank": 1, "nnodes": 2, "endpoint": "127.0.0.1:1",
                  "spec": "ignored", "output": "ignored", "devices": [0], "device_type": "cpu", "task": None}
    direct.r.set(gang.assignment_key("node-b"), json.dumps(assignment), ex=TTL)
    stop = threading.Event()
    agent = gang.Agent("node-b", stop, settings, reg)
    agent.start()
    try:
        deadline = time.time() + 30
        while not attempt_processes(gang.node_part(holder, 1)):
            assert time.time() < deadline, "node 1's trainer did not start"
            direct.r.expire(gang.assignment_key("node-b"), TTL)  # the leader's heartbeat
            time.sleep(0.3)
        time.sleep(1.5)
        fence, proc = agent.fence, agent.proc
        proxy.freeze()
        frozen = time.monotonic()
        while attempt_processes(gang.node_part(holder, 1)):
            direct.r.expire(gang.assignment_key("node-b"), TTL)
            assert time.monotonic() < frozen + LEASE_SAFETY * TTL + 2, "node 1's trainer outlived its deadline"
            time.sleep(0.1)
        died = time.monotonic()
        assert fence.deadline - 0.3 < died < fence.deadline + 1.5, (died - fence.deadline, fence.deadline - frozen)
        assert proc.wait(5) == -9  # fenced (a rendezvous that failed by itself would exit 1)
        assert direct.r.pttl(gang.assignment_key("node-b")) > 2000  # the leader's view: the part is still assigned
    finally:
        proxy.heal()
        stop.set()
        agent.join(15)
