"""Job registry, device leases and attempt limits against a real Redis (started by the entrypoint compose uses)."""

from __future__ import annotations

import json
import time

import pytest

from services.queue.registry import CANCELLED, FAILED, QUEUED, Registry, connect


@pytest.fixture
def reg(redis_url):
    client = connect(redis_url)
    client.flushdb()
    return Registry(client, heartbeat_ttl=2)


def test_an_8_device_worker_runs_one_8p_job_or_eight_1p_jobs(reg):
    devices = list(range(8))
    assert reg.lease("npu@a", devices, 8, "big") == devices
    assert reg.lease("npu@a", devices, 1, "small") == []  # all or none, never shared
    assert reg.renew_leases("npu@a", devices, "big", drop=True) == 8
    got = [reg.lease("npu@a", devices, 1, f"job{i}") for i in range(8)]
    assert sorted(d for g in got for d in g) == devices
    assert reg.lease("npu@a", devices, 1, "ninth") == []
    assert reg.lease("npu@a", devices, 2, "wide") == []
    assert reg.lease("npu@b", devices, 8, "other-node") == devices  # leases are per worker node


def test_a_crashed_workers_leases_free_themselves(reg):
    assert reg.lease("npu@a", [0, 1], 2, "crashed") == [0, 1]
    assert reg.lease("npu@a", [0, 1], 1, "next") == []
    time.sleep(2.5)  # nobody renewed them
    assert reg.lease("npu@a", [0, 1], 2, "next") == [0, 1]


def test_claims_drop_duplicates_and_finished_jobs(reg):
    job = reg.create("train", {"spec": {}, "device_type": "cpu", "npus": 1})
    assert reg.claim(job, "attempt-1") == ("ok", 1)
    assert reg.claim(job, "attempt-2") == ("busy", 0)  # a duplicate message while the first attempt lives
    assert not reg.requeue(job, "lost")  # alive: nothing to requeue
    assert not reg.requeue(job, "lost", token="attempt-2")  # nor for anyone but its holder
    time.sleep(2.5)  # attempt 1's heartbeat expired (its worker died)
    assert reg.requeue(job, "worker lost")
    assert not reg.requeue(job, "worker lost")  # exactly one sweeper wins
    assert reg.get(job)["status"] == QUEUED
    assert reg.claim(job, "attempt-2") == ("ok", 2)
    assert not reg.heartbeat(job, "attempt-1")  # a stale attempt learns it was taken over
    reg.finish(job, CANCELLED)
    assert reg.claim(job, "attempt-3") == ("done", 0)
    assert reg.claim("nosuchjob", "x") == ("missing", 0)


def test_an_attempt_gives_its_job_back_once_and_its_heartbeat_with_it(reg):
    job = reg.create("train", {"spec": {}, "device_type": "cpu", "npus": 1})
    assert reg.claim(job, "attempt-1") == ("ok", 1)
    reg.update(job, status="RUNNING", trainer_pid=1234)
    assert reg.requeue(job, "attempt 1 stopped: hung; trying again", token="attempt-1")
    record = reg.get(job)
    assert (record["status"], record["claimed"], record.get("trainer_pid")) == (QUEUED, "0", None)
    assert not reg.alive(job)  # the next message finds the job free, not held
    assert not reg.requeue(job, "worker lost")  # a sweeper racing it finds nothing left to do
    assert reg.claim(job, "attempt-2") == ("ok", 2)


def test_a_job_that_keeps_killing_workers_fails_after_max_attempts(reg, redis_url, tmp_path):
    from services.config import Settings
    from services.queue.attempt import run_train_job

    settings = Settings(state_dir=str(tmp_path), redis_url=redis_url, mlflow_uri=None, flower_url=None,
                        runs_dir=str(tmp_path / "runs"), max_attempts=2, heartbeat_ttl=2)
    job = reg.create("train", {"spec": {"data": str(tmp_path)}, "device_type": "cpu", "npus": 1})
    for attempt in (1, 2):  # each attempt's worker dies: claimed, then the heartbeat stops
        assert reg.claim(job, f"dead-{attempt}") == ("ok", attempt)
        time.sleep(2.5)
        assert reg.requeue(job, f"worker w{attempt} was lost during attempt {attempt}")
    out = run_train_job(settings, reg, job, "cpu@test")
    final = reg.get(job)
    assert out["status"] == FAILED and final["status"] == FAILED
    assert final["error"] == "gave up after 2 attempts: worker w2 was lost during attempt 2"


def test_logs_keep_the_tail_and_a_reader_position(reg):
    job = reg.create("train", {})
    reg.append_log(job, [f"line {i}" for i in range(10)])
    lines, pos = reg.read_log(job)
    assert lines[0] == "line 0" and pos == 10
    reg.append_log(job, ["line 10"])
    assert reg.read_log(job, pos) == (["line 10"], 11)
    # The README's promise: Redis keeps the last 5000 lines; a reader's position still counts every line.
    reg.append_log(job, [f"line {i}" for i in range(11, 6011)])
    lines, pos = reg.read_log(job)
    assert len(lines) == 5000 and lines[0] == "line 1011" and lines[-1] == "line 6010" and pos == 6011
    assert reg.r.llen(reg.key(job) + ":log") == 5000
    assert reg.read_log(job, 6009) == (["line 6009", "line 6010"], 6011)


def test_job_ids_resolve_by_unique_prefix(reg):
    job = reg.create("train", {})
    assert reg.find(job[:6])["id"] == job
    from facenet.errors import UserError

    with pytest.raises(UserError, match="no job"):
        reg.find("zzzz")


def test_cancelling_a_job_queued_again_after_a_lost_attempt_kills_its_run(reg, mlflow_server):
    """A job requeued after its worker died is QUEUED with an MLflow run and no attempt holding it: `cancel`
    marks it CANCELLED at once, and must end that run too (no worker will: its message is dropped)."""
    from services.queue import jobs, mlflow_runs

    job = reg.create("train", {"spec": {"data": "/tmp"}, "device_type": "cpu", "npus": 1})
    run_id, made = mlflow_runs.find_or_create_run(mlflow_server.uri, "test-cancel", f"1p-cpu-{job}", {"job_id": job},
                                                  job)
    assert made
    assert reg.claim(job, "dead-1") == ("ok", 1)
    reg.update(job, mlflow_run_id=run_id)
    time.sleep(2.5)  # attempt 1's heartbeat expired (its worker died)
    assert reg.requeue(job, "worker w1 was lost during attempt 1")
    assert reg.get(job)["status"] == QUEUED
    assert jobs.cancel(reg, job, mlflow_uri=mlflow_server.uri)["status"] == CANCELLED
    assert mlflow_runs.client(mlflow_server.uri).get_run(run_id).info.status == "KILLED"


def test_two_attempts_that_both_made_a_run_settle_on_the_oldest(reg, mlflow_server):
    """Attempt A (cut off from Redis, its create delivered late) and attempt B both found no run and made one: the
    oldest run with the job's tag is the job's run, B's own newer one is deleted, and a later attempt finds A's."""
    from services.queue import mlflow_runs

    job = reg.create("train", {})
    first, made = mlflow_runs.find_or_create_run(mlflow_server.uri, "test-settle", "a", {"job_id": job}, job)
    c = mlflow_runs.client(mlflow_server.uri)
    time.sleep(0.01)  # start times in ms
    second = c.create_run(mlflow_runs.experiment_id(c, "test-settle"), tags={"job_id": job}).info.run_id
    mlflow_runs.drop_if_not_oldest(mlflow_server.uri, "test-settle", job, second)
    assert c.get_run(second).info.lifecycle_stage == "deleted"
    mlflow_runs.drop_if_not_oldest(mlflow_server.uri, "test-settle", job, first)  # the oldest stays
    assert c.get_run(first).info.lifecycle_stage == "active"
    assert mlflow_runs.find_or_create_run(mlflow_server.uri, "test-settle", "c", {"job_id": job}, job) == (first, False)


def test_a_gang_takes_devices_on_several_workers_all_at_once_or_none(reg):
    """Jobs over several nodes lease a gang: K devices on each of N workers, the leader's own among them, in
    one step. A gang that does not fit holds nothing, so two gang jobs never each hold half of what both want
    (no deadlock), and a device is never leased twice."""
    w1, w2, w3 = ("cpu@one", [0]), ("cpu@two", [0]), ("cpu@three", [0, 1])
    # Job A's leader runs on one, job B's on two; each wants both 1-device workers.
    a = reg.gang_lease([w1, w2], 1, 2, "A:t1")
    assert a == [("cpu@one", [0]), ("cpu@two", [0])]
    assert reg.gang_lease([w2, w1], 1, 2, "B:t1") == []  # B waits, holding nothing
    assert reg.leases("cpu@one", [0]) == {0: "A:t1"} and reg.leases("cpu@two", [0]) == {0: "A:t1"}
    for node, devices in a:
        assert reg.renew_leases(node, devices, "A:t1", drop=True) == 1
    assert reg.gang_lease([w2, w1], 1, 2, "B:t1") == [("cpu@two", [0]), ("cpu@one", [0])]  # leader first
    for node, devices in (w1, w2):
        reg.renew_leases(node, devices, "B:t1", drop=True)
    # A single-node job holds worker two's device: a gang of two 1-device workers does not fit, and the
    # leader's device stays free (no partial lease). With a third worker of 2 free devices it fits there.
    assert reg.lease("cpu@two", [0], 1, "single:t") == [0]
    assert reg.gang_lease([w1, w2], 1, 2, "A:t2") == []
    assert reg.leases("cpu@one", [0]) == {0: None}
    assert reg.gang_lease([w1, w2, w3], 1, 2, "A:t2") == [("cpu@one", [0]), ("cpu@three", [0])]
    # The leader's own worker must be in the gang: no gang without it, even if others would fit.
    assert reg.gang_lease([w2, w3], 1, 1, "C:t") == []
    assert reg.gang_lease([w3, w1], 2, 1, "C:t") == []  # three has one device left, one is A's


def test_a_stopping_worker_removes_its_own_registration_only(reg):
    """Two processes given one node name (a second worker started by hand, a test's) take turns writing its key; the
    one that stops first removed the other's registration too, and for up to a heartbeat no worker of the queue was
    listed (`submit-preprocess` refused: "no preprocessing worker is registered"). Now only the registrant's token
    removes it; a value that is not a registration (anything can write to Redis) is left alone."""
    first = {"node": "preprocess@h", "pid": 1, "queues": ["preprocess"], "token": "first"}
    assert reg.register_worker("preprocess@h", first) is None
    assert reg.register_worker("preprocess@h", first) is None  # its own heartbeat
    # The second says whose registration it replaced (its housekeeping warns of the shared name), in text.
    assert reg.register_worker("preprocess@h", {"node": "preprocess@h", "pid": 2, "queues": ["preprocess"],
                                                "token": "second"}) == {"token": "first", "pid": "1", "host": ""}
    assert reg.unregister_worker("preprocess@h", "first") is False
    assert reg.workers() == [{"node": "preprocess@h", "pid": 2, "queues": ["preprocess"]}]  # the token is not shown
    assert reg.unregister_worker("preprocess@h", "second") is True and reg.workers() == []
    reg.r.set("facenet:worker:odd@h", "not json")
    reg.r.set("facenet:worker:odder@h", b"\xff not text")
    reg.r.set("facenet:worker:deep@h", "[" * 100_000 + "]" * 100_000)
    reg.r.set("facenet:worker:nameless@h", '{"queues": ["preprocess"]}')
    reg.register_worker("real@h", {"node": "real@h", "queues": ["preprocess"], "token": "t"})
    for junk in ("not json", b"\xff not text", "[" * 100_000 + "]" * 100_000, '{"token": 1}', "x" * 100_000):
        reg.r.set("facenet:worker:junk@h", junk)
        assert reg.register_worker("junk@h", {"node": "junk@h", "token": "t"}) is None, junk[:10]
        assert json.loads(reg.r.get("facenet:worker:junk@h"))["token"] == "t"  # written over all the same
    # A key of another type (SET ... GET refuses it: the worker stayed unlisted, its sweeps stopped) is replaced.
    for kind, make in (("hash", lambda k: reg.r.hset(k, "x", "y")), ("list", lambda k: reg.r.rpush(k, "x"))):
        reg.r.delete("facenet:worker:junk@h")
        make("facenet:worker:junk@h")
        assert reg.register_worker("junk@h", {"node": "junk@h", "token": "t"}) is None, kind
        assert json.loads(reg.r.get("facenet:worker:junk@h"))["token"] == "t" and reg.r.ttl("facenet:worker:junk@h") > 0
    # What another registrant wrote comes back cut to 64 characters, and only as text.
    reg.r.set("facenet:worker:junk@h", json.dumps({"token": "k" * 1000, "pid": {"a": 1}, "host": "h\n" * 100}))
    other = reg.register_worker("junk@h", {"node": "junk@h", "token": "t"})
    assert other == {"token": "k" * 64, "pid": "", "host": ("h\n" * 32)}, other
    reg.r.delete("facenet:worker:junk@h")
    assert reg.unregister_worker("odd@h", "") is False and reg.r.exists("facenet:worker:odd@h")
    assert reg.unregister_worker("odder@h", "") is False and reg.r.exists("facenet:worker:odder@h")
    # Neither is listed, and listing the workers still works (every submit and `workers` lists them).
    assert [w["node"] for w in reg.workers()] == ["real@h"]


def test_a_shared_node_name_is_warned_of_once_and_a_killed_predecessor_never(capsys):
    """The housekeeping's warning (services.queue.worker): another registrant replaced on two heartbeats in a row is
    a live process under our name, said once, what it wrote shown by repr; a predecessor killed and restarted
    within the TTL is replaced once and never written again, which is no warning."""
    from services.queue.worker import _warn_shared_name

    warned: set = set()
    dead = {"token": "old", "pid": "7", "host": "h"}
    _warn_shared_name("preprocess@h", dead, None, warned)  # our first heartbeat replaces our killed predecessor
    _warn_shared_name("preprocess@h", None, "old", warned)  # and then only our own
    assert capsys.readouterr().out == ""
    live = {"token": "live", "pid": "8", "host": "h\n[ERROR] forged"}
    _warn_shared_name("preprocess@h", live, None, warned)
    assert capsys.readouterr().out == ""
    for _ in range(3):
        _warn_shared_name("preprocess@h", live, "live", warned)
    out = capsys.readouterr().out
    assert out.count("another worker") == 1 and "'h\\n[ERROR] forged'" in out and out.count("\n") == 1, out
    for k in range(40):  # at most 16 registrants are remembered
        _warn_shared_name("preprocess@h", {"token": f"t{k}", "pid": "", "host": ""}, f"t{k}", warned)
    assert len(warned) == 16 and capsys.readouterr().out.count("another worker") == 15


def test_a_submission_rides_out_a_stalled_redis_and_writes_its_job_once(redis_url):
    """A real stall: the Redis process stopped (SIGSTOP) for longer than a call may wait. Each step of a submission
    is tried again until its deadline, the record (chosen id, named message) lands once; a longer stall is one line."""
    import os
    import signal
    import threading

    from facenet.errors import UserError
    from services.queue.jobs import _steps

    client = connect(redis_url, call_seconds=0.3)
    client.flushdb()
    reg, pid = Registry(client, heartbeat_ttl=2), int(client.info("server")["process_id"])

    def stall(seconds):
        os.kill(pid, signal.SIGSTOP)
        timer = threading.Timer(seconds, os.kill, (pid, signal.SIGCONT))
        timer.start()
        return timer

    stall(1.5)
    step = _steps("queueing the job", seconds=10)
    fields = {"device_type": "cpu", "npus": 1, "task_id": "t-1", "spec": {}}
    started = time.monotonic()
    job_id = step(lambda: reg.create("train", fields, job_id="j-stalled"))
    assert job_id == "j-stalled" and time.monotonic() - started >= 1.4  # it waited the stall out
    step(lambda: reg.create("train", fields, job_id="j-stalled"))  # a step repeated: still one job
    assert reg.r.zrange("facenet:jobs", 0, -1) == ["j-stalled"] and reg.get(job_id)["task_id"] == "t-1"
    # A write repeated after the job moved on (claimed, then cancelled) undoes nothing; another job's id is refused.
    assert reg.claim(job_id, "attempt-1") == ("ok", 1)
    reg.finish(job_id, CANCELLED)
    step(lambda: reg.create("train", fields, job_id="j-stalled"))
    assert reg.get(job_id)["status"] == CANCELLED and reg.get(job_id)["attempts"] == 1
    assert job_id not in reg.active_ids()
    with pytest.raises(UserError, match="job id j-stalled is taken by another job"):
        reg.create("train", {**fields, "task_id": "t-2"}, job_id="j-stalled")
    timer = stall(2.5)
    with pytest.raises(UserError) as out:
        _steps("queueing the job", seconds=1)(lambda: reg.get(job_id))
    assert "Redis stopped answering while queueing the job (TimeoutError, for 1 s)" in str(out.value)
    assert "\n" not in str(out.value)
    timer.join()


def test_a_job_whose_submitter_died_before_sending_is_sent_by_the_sweep(redis_url):
    """What a client killed (or cut off) between writing its job and sending the message leaves: a train job and a
    preprocessing job whose records name a message no queue holds. Two sweeps in a row send each (nothing is stuck
    QUEUED for ever), each message's id recorded; a third sweep sends nothing more while the messages wait."""
    import os
    import subprocess
    import sys

    client = connect(redis_url)
    client.flushdb()
    reg = Registry(client, heartbeat_ttl=2)
    reg.create("train", {"spec": {}, "device_type": "cpu", "npus": 1, "task_id": "t-train"}, job_id="j-train")
    reg.create("preprocess", {"status": "PREPROCESSING", "preprocess_from": "/raw", "task_id": "t-plan"},
               job_id="j-plan", tasks={"plan": "t-plan"})
    code = ("from services.queue.registry import Registry, connect\nfrom services.queue.sweep import sweep\n"
            f"reg = Registry(connect({redis_url!r}), 2)\nprint(sweep(reg)); print(sweep(reg)); print(sweep(reg))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "FACENET_REDIS_URL": redis_url})
    assert out.returncode == 0, out.stderr[-2000:]
    assert [line for line in out.stdout.split("\n") if line.startswith("[")] == \
        ["[]", "['j-plan:plan', 'j-train']", "[]"], out.stdout
    assert "job j-plan plan sent again (its message was lost)" in out.stdout
    queued = [json.loads(m) for m in client.lrange("train.cpu", 0, -1)]
    assert [m["headers"]["id"] for m in queued] == [reg.get("j-train")["task_id"]] != ["t-train"]
    plans = [json.loads(m) for m in client.lrange("preprocess", 0, -1)]
    assert len(plans) == 1 and plans[0]["headers"]["task"] == "facenet.plan_dataset"
    # The plan's message lost again, past the bound: the job fails saying so, not "killed for memory?".
    client.delete("preprocess")
    code = ("from services.queue.registry import Registry, connect\nfrom services.queue.sweep import sweep\n"
            f"reg = Registry(connect({redis_url!r}), 2)\nprint(sweep(reg, 1)); print(sweep(reg, 1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "FACENET_REDIS_URL": redis_url})
    assert out.returncode == 0, out.stderr[-2000:]
    failed = reg.get("j-plan")
    assert failed["status"] == FAILED and "never planned, its message lost again" in failed["error"], failed
    assert "killed for memory" not in failed["error"] and client.llen("preprocess") == 0


def test_the_local_stacks_redis_folder_under_a_root_is_private_and_checked_on_every_up(tmp_path, monkeypatch):
    """FACENET_STACK_REDIS_ROOT (services.stack.local._redis_dir): the stack's folder is made 0700 under a private
    root; a root others can write, a folder someone made first (not private), a link, or a root gone after a reboot
    are each one line; the folder recorded in stack.json is checked again, not trusted."""
    import os

    from facenet.errors import UserError
    from services.stack.local import _redis_dir

    state, root = str(tmp_path / "state"), tmp_path / "root"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("FACENET_STACK_REDIS_ROOT", str(root))
    leaf = _redis_dir(state, None)
    assert os.path.dirname(leaf) == str(root) and os.stat(leaf).st_mode & 0o777 == 0o700
    assert _redis_dir(state, leaf) == leaf  # the next up: the same folder
    monkeypatch.delenv("FACENET_STACK_REDIS_ROOT")
    assert _redis_dir(state, leaf) == leaf  # recorded: kept (and checked) without the variable
    assert _redis_dir(state, None) == os.path.join(state, "redis")
    os.chmod(leaf, 0o755)  # as a stranger's mkdir would leave it
    with pytest.raises(UserError, match="must be yours, not a link, and private"):
        _redis_dir(state, leaf)
    os.rmdir(leaf)
    os.symlink(str(tmp_path), leaf)
    with pytest.raises(UserError, match="must be yours, not a link, and private"):
        _redis_dir(state, leaf)
    os.chmod(root, 0o777)
    with pytest.raises(UserError, match="no one else can write"):
        _redis_dir(state, leaf)
    monkeypatch.setenv("FACENET_STACK_REDIS_ROOT", str(tmp_path / "gone"))
    with pytest.raises(UserError, match="no such folder"):
        _redis_dir(state, None)
