"""Items on our queues that are not our own task messages cannot stop a worker (security review, point 5).

A real Redis (the `redis_url` fixture), a real preprocessing worker started the way the stack starts it,
and each hostile shape pushed raw onto its queue with redis-py, as anyone holding the Redis password can.
Before the guard (services/queue/guard.py) the first of them ended the worker ("Unrecoverable error"), some
were restored on the way down to end it again at every start, a bz2 body was inflated before any check,
and a big message was copied into the log and the result backend; Celery's own tasks ran.
"""

from __future__ import annotations

import base64
import bz2
import copy
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import REPO, TEST_SIZE
from facenet.samples import copy_subset

pytestmark = pytest.mark.timeout(300)

MARKER = "HOSTILE-PAYLOAD-7f3a"  # fills the big items: none of it may reach the log or Redis
JOB = "0123456789ab"  # a well-formed job id no job has


def _start_worker(redis_url: str, tmp, name: str | None = None) -> tuple[subprocess.Popen, object]:
    """A preprocessing worker (`services.stack.entrypoints worker-preprocess`, as the stack starts it) in folder
    `tmp`, named `name` (else the stack's default, preprocess@<host>), once it says it is ready; (process, its log's
    path)."""
    (tmp / "data").mkdir(exist_ok=True)
    log_path = tmp / "worker.log"
    env = {**_env(redis_url, tmp), **({"FACENET_WORKER_NAME": name} if name else {})}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.stack.entrypoints", "worker-preprocess"],
                                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 90
    while " ready." not in log_path.read_text(errors="replace"):
        assert proc.poll() is None and time.time() < deadline, log_path.read_text(errors="replace")[-3000:]
        time.sleep(0.3)
    return proc, log_path


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:  # it died (what the tests would report)
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _env(redis_url: str, tmp_path) -> dict:
    return {**os.environ, "FACENET_REDIS_URL": redis_url, "FACENET_STATE_DIR": str(tmp_path / "state"),
            "FACENET_DATA_ROOTS": str(tmp_path / "data"), "FACENET_WORKER_CONCURRENCY": "1",
            "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def templates(redis_url, tmp_path_factory) -> dict:
    """Real messages our own senders write (services.queue.tasks), taken off their queues raw: what hostile items
    are made from, so the well-formed parts are exactly ours."""
    from services.queue.registry import connect

    env = _env(redis_url, tmp_path_factory.mktemp("templates"))
    code = ("from services.queue.send import send_stage, send_train\n"
            f"send_stage({JOB!r}, 'plan'); send_stage({JOB!r}, 'shard:3'); send_train({JOB!r}, 'cpu')\n")
    subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True, timeout=120)
    r = connect(redis_url)
    items = [json.loads(r.rpop(q)) for q in ("preprocess", "preprocess", "train.cpu")]
    assert not r.llen("preprocess") and not r.llen("train.cpu")
    return {m["headers"]["task"]: m for m in items}


@pytest.fixture(scope="module")
def worker(redis_url, tmp_path_factory, templates):
    """A preprocessing worker (`services.stack.entrypoints worker-preprocess`, as the stack starts it), its log."""
    tmp = tmp_path_factory.mktemp("worker")
    proc, log_path = _start_worker(redis_url, tmp)
    yield proc, log_path, tmp
    _stop(proc)


def variant(template: dict, *, task: str | None = None, args=None, body: bytes | None = None,
            headers: dict | None = None, **props) -> bytes:
    """A copy of a real message with fresh ids and the given parts changed, as Redis holds it."""
    msg = copy.deepcopy(template)
    task_id = str(uuid.uuid4())
    msg["headers"].update(id=task_id, root_id=task_id, **({"task": task} if task else {}), **(headers or {}))
    msg["properties"].update(correlation_id=task_id, delivery_tag=str(uuid.uuid4()), **props)
    if args is not None:
        body = json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()
    if body is not None:
        msg["body"] = base64.b64encode(body).decode()
    return json.dumps(msg).encode()


def hostile_items(t: dict) -> list[tuple[str, bytes, str]]:
    """(shape, raw item, what the log line says is wrong) for every shape the review found, and kin."""
    plan, shard = t["facenet.plan_dataset"], t["facenet.preprocess_shard"]
    inflates = bz2.compress(b"[" + b" " * (64 << 20) + b"]")  # 64 MB of JSON in a few hundred bytes
    linked = [{"task": "celery.backend_cleanup", "args": [], "kwargs": {}, "options": {}, "subtask_type": None,
               "immutable": False}]
    return [
        ("not JSON", b"this is not json!!!!", "not JSON"),
        ("JSON []", b"[]", "not a kombu envelope"),
        ('JSON {"a": 1}', b'{"a": 1}', "not a kombu envelope"),
        ("nested 100k deep", b"[" * 100_000, "not JSON (RecursionError)"),
        ("body []", variant(plan, body=b"[]"), "body is [], not [args, kwargs, embed]"),
        ('body {"a": 1}', variant(plan, body=b'{"a": 1}'), "not [args, kwargs, embed]"),
        ("bz2 body", variant(plan, body=inflates, headers={"compression": "application/x-bz2"}), "compressed"),
        ("3 MB", variant(plan, args=[MARKER * ((3 << 20) // len(MARKER))]), "larger than 1048576 bytes"),
        ("celery.chord_unlock", variant(plan, task="celery.chord_unlock", args=["x"]),
         "task 'celery.chord_unlock' is not one queue 'preprocess' carries"),
        ("celery.backend_cleanup", variant(plan, task="celery.backend_cleanup", args=[]),
         "task 'celery.backend_cleanup' is not one"),
        ("facenet.train on preprocess", variant(plan, task="facenet.train"), "task 'facenet.train' is not one"),
        ("600 KB job id", variant(plan, args=[MARKER * (600_000 // len(MARKER))]), "are not a job id"),
        ("traversal job id", variant(plan, args=["../../etc"]), "are not a job id"),
        ("job id and a newline", variant(plan, args=[JOB + "\n"]), "are not a job id"),
        ("object job id", variant(plan, args=[{"id": "abc"}]), "are not a job id"),
        ("shard index text", variant(shard, args=[JOB, "3"]), "are not a job id and a shard index"),
        ("shard index missing", variant(shard, args=[JOB]), "are not the task's 2"),
        ("kwargs", variant(plan, body=json.dumps([[JOB], {"x": 1}, {}]).encode()), "our tasks take none"),
        ("linked callback", variant(plan, body=json.dumps([[JOB], {}, {"callbacks": linked}]).encode()),
         "links other work"),
        ("eta", variant(plan, headers={"eta": "2999-01-01T00:00:00+00:00"}), "header 'eta'"),
        ("pickle", variant(plan).replace(b'"application/json"', b'"application/x-python-serialize"'),
         "not application/json"),
        ("routed to train.cpu", variant(plan, delivery_info={"exchange": "", "routing_key": "train.cpu"}),
         "does not route to 'preprocess'"),
        ("time limit lifted", variant(plan, headers={"timelimit": [1e300, 1e300]}), "past the task's own"),
    ]


def test_builtin_tasks_are_not_registered_on_a_worker(worker, redis_url):
    from celery import Celery

    replies = Celery(broker=redis_url).control.broadcast("registered", arguments={"builtins": True}, reply=True,
                                                         timeout=10)
    assert replies, "the worker did not answer"
    names = [n for reply in replies for tasks in reply.values() for n in tasks]
    assert {n.split()[0] for n in names} == {"facenet.plan_dataset", "facenet.preprocess_shard",
                                             "facenet.finalize_dataset", "facenet.train"}, names


def test_hostile_items_are_dropped_and_the_worker_serves_on(worker, redis_url, templates):
    from facenet.samples import make_raw_identities
    from services.queue.guard import MAX_MESSAGE_BYTES
    from services.queue.registry import connect

    proc, log_path, tmp = worker
    r = connect(redis_url)
    items = hostile_items(templates)
    ours = variant(templates["facenet.plan_dataset"], headers={"argsrepr": "['forged']"})  # a real task of ours
    t0 = time.time()
    for _, item, _ in items:
        r.lpush("preprocess", item)
    r.lpush("preprocess", ours)
    deadline = time.time() + 60
    while (r.llen("preprocess") or log_path.read_text(errors="replace").count("dropped a message") < len(items)) \
            and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    took = time.time() - t0
    log = log_path.read_text(errors="replace")
    assert proc.poll() is None, f"the worker died:\n{log[-3000:]}"
    assert r.llen("preprocess") == 0, "items are left on the queue"
    dropped = [line for line in log.splitlines() if "dropped a message" in line]
    assert len(dropped) == len(items), "\n".join(dropped)
    for (shape, item, reason), line in zip(items, dropped):  # BRPOP takes the oldest first: push order
        assert reason in line and f"queue 'preprocess' ({len(item)} bytes" in line, (shape, line)
        assert len(line) < 400, (shape, line[:400])
        if item.startswith(b'{"body"') and len(item) <= MAX_MESSAGE_BYTES:  # its task id, as Flower's sent event
            assert json.loads(item)["headers"]["id"] in line, (shape, line)
    # The well-formed message of ours ran (a job no one has: it says so and ends).
    task_id = json.loads(ours)["headers"]["id"]
    deadline, meta = time.time() + 30, {}
    while meta.get("status") not in ("SUCCESS", "FAILURE") and time.time() < deadline:
        time.sleep(0.2)
        meta = json.loads(r.get(f"celery-task-meta-{task_id}") or "{}")
    assert meta["status"] == "SUCCESS" and meta["result"] == {"job": JOB, "skipped": "finished"}, meta
    assert "args" not in meta and "name" not in meta  # results are not extended

    # The same worker process serves the next real job.
    raw, out = tmp / "data" / "raw", tmp / "data" / "faces"
    make_raw_identities(str(raw), per_identity=2, identities=2)
    job = subprocess.run([sys.executable, "-m", "services.cli", "submit-preprocess", str(raw), str(out), "--wait",
                          "--json"], env=_env(redis_url, tmp), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert job.returncode == 0 and json.loads(job.stdout)["status"] == "SUCCEEDED", job.stdout + job.stderr
    assert proc.poll() is None
    deadline = time.time() + 10  # finalize's message is acknowledged just after the job is recorded done
    while r.hlen("unacked") and time.time() < deadline:
        time.sleep(0.2)
    assert r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0, r.hgetall("unacked")

    # Nothing of the big items reached the log or Redis.
    log = log_path.read_text(errors="replace")
    assert MARKER * 3 not in log and len(log) < 200_000, len(log)  # a line shows at most 45 characters of a value
    for key in r.scan_iter(count=1000):
        assert (r.memory_usage(key) or 0) < 64 << 10, (key, r.memory_usage(key))
        kind = r.type(key)
        value = {b"string": lambda: r.get(key), b"hash": lambda: r.hgetall(key), b"list": lambda: r.lrange(key, 0, -1),
                 b"set": lambda: r.smembers(key), b"zset": lambda: r.zrange(key, 0, -1)}.get(kind, lambda: b"")()
        assert MARKER not in str(value), key
    print(f"{len(items)} hostile items dropped in {took:.1f} s")


def test_each_queue_takes_only_its_own_tasks(templates):
    """The same checks without a worker: what `check` lets through, for which queue, and what events show."""
    from services.queue.guard import check
    from services.queue.tasks import BadMessage

    train, plan = templates["facenet.train"], templates["facenet.plan_dataset"]
    for name, template in templates.items():
        queue = "train.cpu" if name == "facenet.train" else "preprocess"
        assert check(queue, variant(template))["headers"]["task"] == name
    with pytest.raises(BadMessage, match="task 'facenet.plan_dataset' is not one queue 'train.cpu' carries"):
        check("train.cpu", variant(plan, delivery_info={"exchange": "", "routing_key": "train.cpu"}))
    with pytest.raises(BadMessage, match="is not one queue 'unfit.cpu' carries"):
        check("unfit.cpu", variant(train, delivery_info={"exchange": "", "routing_key": "unfit.cpu"}))
    # A sender's argsrepr (what Flower would show) is replaced by the checked arguments.
    forged = check("train.cpu", variant(train, headers={"argsrepr": "['someone-else']", "kwargsrepr": "{'x': 1}"}))
    assert (forged["headers"]["argsrepr"], forged["headers"]["kwargsrepr"]) == (f"[{JOB!r}]", "{}")
    # kombu marks a message it restores (a worker died under it): still ours.
    restored = json.loads(variant(plan, headers={"redelivered": True}))
    restored["properties"]["delivery_info"]["redelivered"] = True
    assert check("preprocess", json.dumps(restored).encode())


def _pidbox_template(r, app) -> tuple[str, dict]:
    """(the pub/sub channel, the envelope) of a real `celery inspect ping` broadcast, caught as Redis carries it."""
    sub = r.pubsub()
    sub.psubscribe("*pidbox*")
    assert sub.get_message(timeout=5)["type"] == "psubscribe"
    app.control.ping(timeout=1)
    msg = sub.get_message(timeout=5)
    sub.close()
    assert msg and msg["type"] == "pmessage", msg
    return msg["channel"], json.loads(msg["data"])


def _broadcast_body(envelope: dict, body) -> bytes:
    e = copy.deepcopy(envelope)
    e["body"] = body if isinstance(body, str) else base64.b64encode(json.dumps(body).encode()).decode()
    return json.dumps(e).encode()


def test_hostile_broadcasts_are_dropped_and_the_worker_answers_on(worker, redis_url):
    """Remote-control broadcasts reach every worker at once over pub/sub: a body that is not base64, a payload
    nested 100k deep (RecursionError past kombu's own handler) and Celery's real commands that change a
    worker (shutdown, revoke/terminate, pool_shrink, rate_limit, time_limit) are dropped; read-only inspection
    still answers."""
    from celery import Celery

    from services.queue.registry import connect

    proc, log_path, _ = worker
    r, app = connect(redis_url), Celery(broker=redis_url)
    channel, ping = _pidbox_template(r, app)
    before = log_path.read_text(errors="replace").count("dropped a broadcast")
    r.publish(channel, _broadcast_body(ping, "a"))  # not base64: kombu raised building the Message
    r.publish(channel, _broadcast_body(ping, {"method": "shutdown", "arguments": {}}))
    r.publish(channel, b"[" * 100_000)
    app.control.shutdown()
    app.control.revoke(str(uuid.uuid4()), terminate=True)
    app.control.pool_shrink(1)
    app.control.rate_limit("facenet.plan_dataset", "1/h")
    app.control.time_limit("facenet.plan_dataset", soft=1, hard=2)
    deadline = time.time() + 30
    while log_path.read_text(errors="replace").count("dropped a broadcast") < before + 8 and time.time() < deadline:
        time.sleep(0.2)
    log = log_path.read_text(errors="replace")
    assert proc.poll() is None, f"the worker died:\n{log[-3000:]}"
    dropped = [line for line in log.splitlines() if "dropped a broadcast" in line][before:]
    assert len(dropped) == 8, "\n".join(dropped)
    text = "\n".join(dropped)
    assert "body is not base64 JSON" in text and "RecursionError" in text
    for method in ("shutdown", "revoke", "pool_shrink", "rate_limit", "time_limit"):
        assert f"control command '{method}' is not a read-only one" in text, method
    assert app.control.ping(timeout=5), "the worker no longer answers a ping"
    limits = app.control.inspect(timeout=5).stats()
    assert limits and proc.poll() is None


def test_forged_unacked_entries_are_dropped_when_a_worker_starts(worker, redis_url, tmp_path):
    """kombu restores the unacked hash at every worker start with a `loads` in no handler, inside a transaction
    that the error aborts: one forged entry ended every worker at every start. Now each bad entry is
    dropped (and one that decodes to a bad message is refused by the guard once it is back on the queue)."""
    from services.queue.registry import connect

    r = connect(redis_url)
    entries = {"junk": b"this is not json", "deep": b"[" * 100_000, "shape": b"[1, 2]",
               "not-a-message": json.dumps([{"body": 1}, "", "preprocess"]).encode()}
    for tag, value in entries.items():
        r.hset("unacked", tag, value)
        r.zadd("unacked_index", {tag: 0})  # long past the visibility timeout: restored at once
    # A name of its own: under the module worker's, this one's registration replaced that worker's, and its stop
    # left the module worker unlisted until its next heartbeat (10 s), when the next test submitted a job.
    proc, log_path = _start_worker(redis_url, tmp_path, name="preprocess-restorer@%h")
    try:
        deadline = time.time() + 30
        while (r.hlen("unacked") or r.llen("preprocess")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(1)
        logs = log_path.read_text(errors="replace") + worker[1].read_text(errors="replace")
        assert proc.poll() is None, f"the worker died at start:\n{logs[-3000:]}"
        assert r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0 and r.llen("preprocess") == 0
        for tag in ("junk", "deep", "shape"):
            assert f"dropped an unacked entry '{tag}'" in logs, tag
        assert "dropped a message on queue 'preprocess'" in logs and "not a kombu envelope" in logs
    finally:
        _stop(proc)


def test_the_kombu_methods_the_guard_copies_or_wraps_are_the_ones_it_was_written_against():
    """services/queue/guard.py copies kombu 5.7.0's Channel._brpop_read and _get (with its check added) and wraps
    _receive_one, _restore and QoS.restore_by_tag: a kombu whose methods changed must be read again before
    it is allowed (pyproject pins kombu 5.7.x), not trusted to match."""
    import hashlib
    import inspect

    from kombu.transport import redis as kombu_redis

    def digest(fn) -> str:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]

    assert {name: digest(getattr(kombu_redis.Channel, name)) for name in
            ("_brpop_read", "_get", "_receive_one", "_restore")} | \
        {"QoS.restore_by_tag": digest(kombu_redis.QoS.restore_by_tag)} == {
            "_brpop_read": "c42518699709f2df", "_get": "be26a9f1eb4cf8da", "_receive_one": "d59b8751d89757dc",
            "_restore": "92e63e38835b6592", "QoS.restore_by_tag": "58e161d81b6fe18d"}


def test_messages_queued_before_the_code_moved_still_run(worker, redis_url):
    """Task names are wire format: messages written by the version before services/ moved into rooms (commit
    5520208, `services.tasks.send_stage`, recorded in tests/fixtures/messages_before_rooms.json) are taken
    off the queue and run by today's worker. Both ask for a job no one has, which a task answers by
    skipping it: the result in the backend shows the task ran, under the name the old message gave."""
    from services.queue.registry import connect

    with open(os.path.join(REPO, "tests", "fixtures", "messages_before_rooms.json"), encoding="utf-8") as fh:
        old = json.load(fh)
    r = connect(redis_url)
    ids = {}
    for name, message in old.items():
        assert message["headers"]["task"] == name and json.loads(base64.b64decode(message["body"]))[0][0] == JOB
        r.delete(f"celery-task-meta-{message['headers']['id']}")
        r.lpush(message["properties"]["delivery_info"]["routing_key"], json.dumps(message))
        ids[name] = message["headers"]["id"]
    deadline = time.time() + 60
    results = {}
    while len(results) < len(ids) and time.time() < deadline:
        for name, task_id in ids.items():
            raw = r.get(f"celery-task-meta-{task_id}")
            if raw:
                results[name] = json.loads(raw)
        time.sleep(0.2)
    assert set(results) == set(ids), f"not run within 60 s: {set(ids) - set(results)}"
    for name, meta in results.items():
        assert meta["status"] == "SUCCESS", (name, meta)
        assert meta["result"]["job"] == JOB and meta["result"]["skipped"] == "finished", (name, meta)


# ---- well-formed messages of ours, for a job in the wrong state (issue: forged stage messages) ----------------------
# Before the stage checks (services.queue.registry: _FIT) a stage never looked at its job's state: a forged plan for a
# RUNNING train job failed it (KeyError 'preprocess_from') while its trainer ran on, a forged finalize while shards ran
# failed the job, a forged train during preprocessing trained on the crops made so far, and one for a preprocessing
# job ended in a KeyError traceback in the device worker.

@pytest.fixture(scope="module")
def device_worker(redis_url, worker, mlflow_server):
    """A CPU device worker with 2 devices (`worker-device`, as the stack starts it) beside the module's preprocessing
    worker, sharing its data root and state folder, its runs tracked by the session's MLflow server; (process, log,
    environment for the CLI)."""
    _, _, tmp = worker
    env = {**_env(redis_url, tmp), "FACENET_MLFLOW_URI": mlflow_server.uri, "FACENET_DEVICE_TYPE": "cpu",
           "FACENET_DEVICES": "0-1", "FACENET_WORKER_NAME": "cpu-forged@%h"}
    log_path = tmp / "device-worker.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.stack.entrypoints", "worker-device"], env=env,
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while " ready." not in log_path.read_text(errors="replace"):
        assert proc.poll() is None and time.time() < deadline, log_path.read_text(errors="replace")[-3000:]
        time.sleep(0.3)
    yield proc, log_path, env
    _stop(proc)
    _kill_trainers(str(tmp / "data"))


def _kill_trainers(data_root: str) -> list[int]:
    """Trainer processes of this module's jobs (their FACENET_DATA_ROOTS): killed; returns their pids."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "facenet.train" in " ".join(p.info["cmdline"] or []) and \
                    p.environ().get("FACENET_DATA_ROOTS") == data_root:
                p.kill()
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def test_stage_messages_for_a_job_in_the_wrong_state_are_dropped(worker, device_worker, redis_url, templates,
                                                                 sample_root, mlflow_server):
    """Real messages of our own tasks and arguments, pushed onto the real queues to be taken next, each for a job in a
    state its stage does not act in: a train message for a preprocessing job; a finalize while a job's shards run; a
    plan, a shard, a finalize and a train for a train job whose trainer runs; a train message for a train job still
    preprocessing. Each is dropped with one line in its worker's log naming the job and why, and changes nothing: the
    preprocessing job and the train job's preprocessing end with every photo, the running job runs on and `cancel`
    stops its trainer, its MLflow run KILLED."""
    from mlflow.tracking import MlflowClient

    from facenet.samples import make_raw_identities
    from services.queue.registry import Registry, connect

    preprocessing_worker, log_path, tmp = worker
    _, device_log, env = device_worker
    r = connect(redis_url)
    reg = Registry(r)
    data = tmp / "data"
    got_through: list[str] = []  # what a forged message did; empty when every one was dropped
    logged_before = (len(log_path.read_bytes()), len(device_log.read_bytes()))

    def cli(*args: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "services.cli", *args, "--json"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout)

    def forge(queue: str, task: str, *args) -> str:
        """Our own message for `task`, pushed where the queue's worker takes it next; its task id."""
        template = templates["facenet.train" if task == "facenet.train" else "facenet.plan_dataset"]
        item = variant(template, task=task, args=list(args))
        r.rpush(queue, item)
        return json.loads(item)["headers"]["id"]

    def result(task_id: str, seconds: float = 20) -> dict | None:
        deadline = time.time() + seconds
        while time.time() < deadline:
            meta = json.loads(r.get(f"celery-task-meta-{task_id}") or "{}")
            if meta.get("status") in ("SUCCESS", "FAILURE"):
                return meta["result"] if meta["status"] == "SUCCESS" else {"raised": str(meta["result"])[:200]}
            time.sleep(0.2)
        return None

    def expect_dropped(what: str, task_id: str, skipped: str) -> None:
        out = result(task_id)
        if not out or out.get("skipped") != skipped:
            got_through.append(f"{what}: {out or 'not answered within 20 s (still running?)'}")

    def wait(job_id: str, predicate, seconds: float = 180) -> dict:
        deadline = time.time() + seconds
        while time.time() < deadline:
            job = reg.get(job_id)
            if predicate(job) or job["status"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                return job
            time.sleep(0.1)
        return reg.get(job_id)

    def shards_pending(job: dict) -> bool:
        """Two shards or more not done: at most one runs (one worker process, prefetch 1), so one is still queued
        behind a message pushed now to be taken next. (With only the last one left, it may be running: a forged
        finalize taken after it finds every shard done, which is a finalize that fits.)"""
        return bool(job.get("plan_id")) and r.scard(reg.key(job["id"]) + ":shards") <= job["shards"] - 2

    def forged_into_a_planned_job(submit: list[str], train_what: str, finalize_what: str) -> str:
        """Submit with the preprocessing worker stopped (SIGSTOP to its process group), let it plan, and stop it
        again at once: the job is planned with at least 7 of its 9 shards pending. Then a train and a finalize
        message for it, the train message's drop read while the worker stays stopped (the job cannot leave
        preprocessing meanwhile), the finalize's once it runs again; returns the job id. (A shard of these small
        photos takes 30-100 ms and the plan is watched every millisecond; polling the job every 0.1 s after the
        submit returned once found all 9 shards done, 0.6 s in all.)"""
        group = preprocessing_worker.pid
        os.killpg(group, signal.SIGSTOP)
        try:
            job_id = cli(*submit)["id"]
        finally:
            os.killpg(group, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while not r.hget(reg.key(job_id), "plan_id") and time.monotonic() < deadline:
            time.sleep(0.001)
        os.killpg(group, signal.SIGSTOP)
        try:
            assert shards_pending(reg.get(job_id)), reg.get(job_id)
            train = forge("train.cpu", "facenet.train", job_id)
            finalize = forge("preprocess", "facenet.finalize_dataset", job_id)
            expect_dropped(train_what, train, "unfit")
        finally:
            os.killpg(group, signal.SIGCONT)
        expect_dropped(finalize_what, finalize, "unfit")
        return job_id

    # A preprocessing job: a train message for it, a finalize while its shards run.
    raw_p, raw_t2 = data / "forged-raw-p", data / "forged-raw-t2"
    for raw in (raw_p, raw_t2):  # 9 photos, 9 shards of one: a window of several shards to forge in
        make_raw_identities(str(raw), per_identity=3, identities=3)
    p = forged_into_a_planned_job(["submit-preprocess", str(raw_p), str(data / "forged-out-p"), "--shard-size", "1",
                                   "--image-size", str(TEST_SIZE)],
                                  "train for a preprocessing job", "finalize while its shards run")
    job = wait(p, lambda j: False)
    if job["status"] != "SUCCEEDED" or (job.get("result") or {}).get("images") != 9 or job.get("attempts"):
        got_through.append(f"preprocessing job {p} ended {job['status']} ({job.get('error')}), "
                           f"{job.get('attempts')} train attempt(s), result {job.get('result')}")

    # A train job with its trainer running: plan, shard, finalize and train messages for it.
    crops = copy_subset(os.path.join(sample_root, "prep", "train"), str(data / "forged-crops"), 4, 8)
    # Epochs enough to outlast every check below (it is cancelled at the end): 50 at 80 px ended on their own in
    # a CI run, and the job meant to wait behind it then ran.
    t = cli("submit-train", "--data", crops, "--npus", "1", "--epochs", "1000", "--batch-size", "8", "--image-size",
            str(TEST_SIZE), "--log-checkpoints", "none", "--no-log-model")["id"]
    job = wait(t, lambda j: j["status"] == "RUNNING" and j.get("trainer_pid"), 180)
    assert job["status"] == "RUNNING", job
    for what, task_id, skipped in [
            ("plan for a running job", forge("preprocess", "facenet.plan_dataset", t), "unfit"),
            ("shard for a running job", forge("preprocess", "facenet.preprocess_shard", t, 0), "unfit"),
            ("finalize for a running job", forge("preprocess", "facenet.finalize_dataset", t), "unfit"),
            ("train for a running job", forge("train.cpu", "facenet.train", t), "busy")]:
        expect_dropped(what, task_id, skipped)
    job = reg.get(t)
    if job["status"] != "RUNNING" or job.get("error") or job["attempts"] != 1:
        got_through.append(f"running job {t} is {job['status']} ({job.get('error')}) after {job['attempts']} "
                           "attempt(s)")

    # A train job still preprocessing (2 devices: its own attempt waits while the running job holds one).
    t2 = forged_into_a_planned_job(["submit-train", "--preprocess-from", str(raw_t2), "--data",
                                    str(data / "forged-out-t2"), "--npus", "2", "--shard-size", "1", "--epochs", "1",
                                    "--batch-size", "4", "--image-size", str(TEST_SIZE), "--log-checkpoints", "none"],
                                   "train during preprocessing", "finalize while its shards run (a train job)")
    # Claimed before its preprocessing ended: the forged train message acted. (Both drops took up to 20 s each, and the
    # last shards and finalize may have ended in them: then the job's own train message claims it, as it should, and
    # the wait below counts that one attempt.)
    job = reg.get(t2)
    if (job.get("attempts") or job.get("claimed") == "1") and not job.get("preprocessed"):
        got_through.append(f"train job {t2} was claimed while {job['status']} ({job.get('message')})")
    job = wait(t2, lambda j: j.get("preprocessed") and "waiting for 2 free" in (j.get("message") or ""), 120)
    if not job.get("preprocessed") or (job.get("dataset") or {}).get("images") != 9 or job["attempts"] != 1:
        got_through.append(f"train job {t2} is {job['status']} ({job.get('error') or job.get('message')}), "
                           f"{job['attempts']} attempt(s), data set {job.get('dataset')}")

    # `cancel` still stops both: the waiting attempt, and the running trainer (its run KILLED, not FINISHED).
    job = cli("cancel", t2)
    if job["status"] != "CANCELLED":
        got_through.append(f"cancel found job {t2} {job['status']} ({job.get('error')})")
    job = cli("cancel", t)
    run = MlflowClient(mlflow_server.uri).get_run(job["mlflow_run_id"]) if job.get("mlflow_run_id") else None
    if job["status"] != "CANCELLED" or run is None or run.info.status != "KILLED":
        got_through.append(f"cancel left job {t} {job['status']} ({job.get('error')}), its run "
                           f"{run.info.status if run else None}")
    left = _kill_trainers(str(data))  # the attempt reaps its trainer before it records the cancel
    if left:
        got_through.append(f"trainer process(es) {left} outlived their jobs")
    assert not got_through, "forged messages that acted:\n" + "\n".join(got_through)

    # One line each, naming the job and why, in the worker that took it.
    logs = "".join(path.read_bytes()[at:].decode(errors="replace")
                   for path, at in zip((log_path, device_log), logged_before))
    for line in (f"job {p}: train message dropped: it is a preprocess job, not a train job",
                 f"job {p}: finalize message dropped: only ",
                 f"job {t}: plan message dropped: it is RUNNING, not preprocessing",
                 f"job {t}: shard:0 message dropped: it is RUNNING, not preprocessing",
                 f"job {t}: finalize message dropped: it is RUNNING, not preprocessing",
                 f"job {t}: train message dropped: another attempt holds it",
                 f"job {t2}: train message dropped: ",
                 f"job {t2}: finalize message dropped: only "):
        assert line in logs, line
    assert "Traceback" not in logs
