"""The service end to end, with real processes: `facenet-cli stack up` starts a real Redis, MLflow
server, Flower and Celery workers; jobs go through the queue to a real trainer process.

Heartbeats are shortened (FACENET_HEARTBEAT_TTL=6) so a killed worker's job comes back in seconds.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

from conftest import TEST_IMAGE_SIZE
from facenet.fsutil import free_port

pytestmark = pytest.mark.timeout(600)
# Gang jobs run two trainers on two loaded cores: no final MLflow model export or checkpoint upload (~20 s each).
CHEAP_RUN = ("--no-log-model", "--log-checkpoints", "none")


class Stack:
    def __init__(self, root: str, env: dict):
        self.root, self.env = root, env
        self.state_dir = env["FACENET_STATE_DIR"]

    def cli(self, *args: str, timeout: float = 300, check: bool = False, env: dict | None = None):
        if args and args[0] == "submit-train" and "--image-size" not in args:
            args = (*args, *TEST_IMAGE_SIZE)
        proc = subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env={**self.env, **(env or {})})
        if check and proc.returncode != 0:
            raise AssertionError(f"facenet-cli {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def json(self, *args: str, timeout: float = 300, env: dict | None = None):
        return json.loads(self.cli(*args, "--json", timeout=timeout, check=True, env=env).stdout)

    @property
    def description(self) -> dict:
        with open(os.path.join(self.state_dir, "stack.json"), encoding="utf-8") as fh:
            return json.load(fh)

    def mlflow(self):
        from mlflow.tracking import MlflowClient

        d = self.description  # the stack's MLflow asks for its generated login; MLflow's client reads these
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = \
            d["mlflow_username"], d["mlflow_password"]
        return MlflowClient(d["mlflow_uri"])

    def wait_for(self, job_id: str, predicate, timeout: float = 240, what: str = "condition") -> dict:
        """Poll `status --json`'s view of the job in this process: a CLI process every 0.5 s took most of
        a core from the trainers on a 2-core host (the CLI itself is tested everywhere else)."""
        from services.queue.jobs import view

        reg, deadline, job = _registry(self), time.time() + timeout, None
        while time.time() < deadline:
            try:
                job = view(reg.find(job_id))
            except Exception:  # Redis restarting under the test
                time.sleep(0.5)
                continue
            if predicate(job):
                return job
            if job["status"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                raise AssertionError(f"job ended {job['status']} before {what}: {job}")
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}: {job}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, sample_root):
    root = str(tmp_path_factory.mktemp("svc"))
    # The state folder (secrets, stores) beside the data root, never inside it (stack up refuses that).
    env = {**os.environ, "FACENET_STATE_DIR": str(tmp_path_factory.mktemp("svc-state")),
           "FACENET_REDIS_PORT": str(free_port()), "FACENET_MLFLOW_PORT": str(free_port()),
           "FACENET_FLOWER_PORT": str(free_port()), "FACENET_HEARTBEAT_TTL": "6", "FACENET_SWEEP_SECONDS": "2",
           "FACENET_SYSTEM_METRICS_INTERVAL": "1", "FACENET_DATA_ROOTS": os.pathsep.join([root, sample_root]),
           "FACENET_MAX_ATTEMPTS": "2", "FACENET_TRAINER_STALL_SECONDS": "30"}
    for k in ("FACENET_REDIS_URL", "FACENET_MLFLOW_URI", "MLFLOW_TRACKING_URI", "FACENET_RUNS_DIR",
              "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    s = Stack(root, env)
    up = s.cli("stack", "up", timeout=240)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield s
    finally:
        s.cli("stack", "down", timeout=120)
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # set by Stack.mlflow for this stack
            os.environ.pop(k, None)


def test_stack_status_lists_every_service(stack):
    services = stack.json("stack", "status")
    assert [x["name"] for x in services] == ["redis", "mlflow", "flower", "worker-preprocess", "worker-cpu"]
    for x in services:
        assert x["running"] and psutil.pid_exists(x["pid"]), x
    assert services[1]["url"] == stack.description["mlflow_uri"]
    # Secrets are generated per stack and private.
    assert os.stat(os.path.join(stack.state_dir, "secrets.env")).st_mode & 0o077 == 0
    assert os.stat(os.path.join(stack.state_dir, "stack.json")).st_mode & 0o077 == 0
    workers = stack.json("workers")
    assert {w["node"].split("@")[0] for w in workers} == {"cpu", "preprocess"}


def test_preprocess_then_train_through_the_queue(stack):
    from facenet.samples import make_raw_identities

    raw = os.path.join(stack.root, "raw")
    make_raw_identities(raw, per_identity=10, identities=4)
    faces = os.path.join(stack.root, "faces")
    proc = stack.cli("submit-train", "--preprocess-from", raw, "--data", faces, "--epochs", "2", "--batch-size", "16",
                     "--amp", "--log-every", "1", "--loss", "arcface", "--wait", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = json.loads(proc.stdout)
    assert job["status"] == "SUCCEEDED" and job["attempts"] == 1
    assert job["dataset"]["faces"] == 40 and job["dataset"]["classes"] == 4
    assert job["progress"]["epoch"] == 2 and job["progress"]["fps"] > 0 and job["progress"]["acc1"] is not None
    assert os.path.exists(os.path.join(faces, "manifest.json"))

    listed = stack.json("jobs")
    assert listed[0]["id"] == job["id"] and {"id", "status", "created"} <= set(listed[0])

    # MLflow: one run for the job with params, per-epoch metrics, system metrics, the log, manifest and model.
    runs = [r for r in stack.json("runs") if r["tags"].get("job_id") == job["id"]]
    assert len(runs) == 1
    run = runs[0]
    assert run["run_id"] == job["mlflow_run_id"] and run["status"] == "FINISHED"
    assert run["name"] == f"1p-cpu-bs16-O2-{job['id']}"
    assert run["params"]["epochs"] == "2" and run["tags"]["device_type"] == "cpu" and run["tags"]["npus"] == "1"
    assert run["params"]["loss"] == "arcface"  # the losses go through the queue like every other option
    assert {"fps", "acc1", "loss", "lr"} <= set(run["metrics"])
    assert any(k.startswith("system/") for k in run["metrics"]), sorted(run["metrics"])
    client = stack.mlflow()
    assert [m.step for m in client.get_metric_history(run["run_id"], "acc1")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"logs", "dataset", "final", "checkpoints"} <= artifacts, artifacts
    exp = client.get_experiment(run["experiment_id"])
    assert exp.name == "facenet" and exp.tags["mlflow.experimentKind"] == "custom_model_development"

    # Flower saw the tasks (its HTTP API, with the stack's basic-auth credentials).
    d = stack.description
    auth = base64.b64encode(f"{d['flower_user']}:{d['flower_password']}".encode()).decode()
    req = urllib.request.Request(f"{d['flower_url']}/api/tasks?limit=200", headers={"Authorization": f"Basic {auth}"})
    deadline = time.time() + 30
    while True:
        with urllib.request.urlopen(req, timeout=10) as r:
            tasks = json.load(r)
        train_tasks = [t for t in tasks.values() if t.get("name") == "facenet.train" and job["id"] in str(t.get("args"))]
        if train_tasks and train_tasks[0]["state"] == "SUCCESS" or time.time() > deadline:
            break
        time.sleep(1)
    assert train_tasks and train_tasks[0]["state"] == "SUCCESS", tasks
    assert sum(1 for t in tasks.values() if t.get("name") == "facenet.preprocess_shard") >= 1
    unauth = urllib.request.Request(f"{d['flower_url']}/api/tasks")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(unauth, timeout=10)
    assert err.value.code == 401


def _trainer_processes(output_dir: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "facenet.train" in cmd and output_dir in cmd:
            found.append(p)
    return found


def test_cancel_stops_the_trainer_and_kills_the_run(stack, sample_root):
    """Cancel kills the trainer and marks the run KILLED. Meanwhile a second job wanting the stack's one CPU
    device waits: it never has a trainer while the first one's lives, and starts only after the cancel."""
    from facenet.samples import copy_subset

    # 4 people x 12 crops: a trainer running within seconds; 30 epochs keep it running.
    faces = copy_subset(os.path.join(sample_root, "prep", "train"), os.path.join(stack.root, "small-cancel"), 4, 12)
    job = stack.json("submit-train", "--data", faces, "--epochs", "30", "--batch-size", "8", "--log-every", "1")
    second = stack.json("submit-train", "--data", faces, "--epochs", "1", "--batch-size", "8")
    reg = _registry(stack)
    samples = 0

    def first_trains(j):
        nonlocal samples  # every look at the first job also looks at the second
        other = reg.get(second["id"])
        assert other["status"] == "QUEUED" and not other.get("trainer_pid"), other
        samples += 1
        return (j["progress"]["epoch"] or 0) >= 1 and j["progress"]["step"]

    job = stack.wait_for(job["id"], first_trains, what="training to start")
    assert _trainer_processes(job["output"]) and samples >= 2
    cancelled = stack.json("cancel", job["id"])
    assert cancelled["status"] == "CANCELLED"
    deadline = time.time() + 15  # bound: the supervisor kills the group at once; 15 s covers a loaded host
    while _trainer_processes(job["output"]) and time.time() < deadline:
        time.sleep(0.3)
    assert not _trainer_processes(job["output"])
    run = stack.mlflow().get_run(job["mlflow_run_id"])
    assert run.info.status == "KILLED"
    # The device went to the waiting job only after the first one ended (the registry's own timestamps).
    done = stack.wait_for(second["id"], lambda j: j["status"] == "SUCCEEDED", timeout=240, what="the second job")
    first = stack.json("status", job["id"])
    assert first["trainer_started"] < first["finished"] <= done["started"] < done["trainer_started"], (first, done)
    # The device is free again.
    worker = next(w for w in stack.json("workers") if w["node"].startswith("cpu@"))
    assert not any(worker["leases"].values())


def test_killed_worker_job_resumes_in_the_same_run(stack, sample_root):
    faces = os.path.join(sample_root, "prep")
    job = stack.json("submit-train", "--data", faces, "--epochs", "4", "--batch-size", "32", "--amp")
    job = stack.wait_for(job["id"], lambda j: j["checkpoint"] and (j["progress"].get("checkpoint_epoch") or 0) >= 1,
                         what="a first checkpoint")
    assert os.path.exists(job["checkpoint"])
    first_task = _registry(stack).get(job["id"])["task_id"]
    worker = stack.description["services"]["worker-cpu"]
    os.killpg(worker["pid"], signal.SIGKILL)  # the whole worker: main process and pool children
    deadline = time.time() + 10  # the orphaned trainer notices its supervisor is gone
    while _trainer_processes(job["output"]) and time.time() < deadline:
        time.sleep(0.3)
    assert not _trainer_processes(job["output"]), "trainer outlived its killed worker"
    restarted = stack.cli("stack", "up", timeout=240)
    assert restarted.returncode == 0, restarted.stderr
    assert stack.description["services"]["worker-cpu"]["pid"] != worker["pid"]

    assert stack.cli("status", job["id"]).returncode == 0  # the human form works mid-flight too
    final = stack.wait_for(job["id"], lambda j: j["status"] == "SUCCEEDED", timeout=300, what="the job to finish")
    assert final["attempts"] == 2 and final["mlflow_run_id"] == job["mlflow_run_id"]
    with open(os.path.join(job["output"], "train.log"), encoding="utf-8") as fh:
        log = fh.read()
    assert "resumed from" in log and "epoch(s) done" in log
    client = stack.mlflow()
    run = client.get_run(job["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "acc1")]
    assert sorted(set(steps)) == [1, 2, 3, 4], steps
    runs = [r for r in stack.json("runs") if r["tags"].get("job_id") == job["id"]]
    assert len(runs) == 1
    # Flower tells the truth: the lost attempt's task failed (worker lost, naming the job), the new one ran.
    second_task = _registry(stack).get(job["id"])["task_id"]
    assert second_task != first_task
    deadline = time.time() + 30
    while True:
        old, new = _flower(stack, f"/api/task/info/{first_task}"), _flower(stack, f"/api/task/info/{second_task}")
        if old.get("state") == "FAILURE" and new.get("state") == "SUCCESS" or time.time() > deadline:
            break
        time.sleep(1)
    assert old["state"] == "FAILURE" and "WorkerLostError" in old["exception"] and job["id"] in old["exception"], old
    assert new["state"] == "SUCCESS", new

    # The dead worker's own message is still unacknowledged in Redis; after the visibility timeout kombu puts
    # it back on the queue. Do exactly that now (kombu's restore_by_tag): a live worker takes it, finds the job
    # finished and drops it; no trainer starts, the job and its run stay as they are.
    from kombu import Connection

    with Connection(stack.description["redis_url"]) as conn:
        channel = conn.default_channel
        unacked = channel.client.hgetall(channel.unacked_key)
        tags = [tag for tag, body in unacked.items() if first_task.encode() in body]
        assert len(tags) == 1, f"the killed worker's message is not waiting unacknowledged: {unacked}"
        channel.qos.restore_by_tag(tags[0])
    log_path = os.path.join(stack.state_dir, "logs", "worker-cpu.log")
    dropped = f"Task facenet.train[{first_task}] succeeded"
    deadline = time.time() + 60  # bound: an idle worker takes a message within a second or two
    while True:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            line = next((x for x in fh if dropped in x), None)
        if line or time.time() > deadline:
            break
        time.sleep(0.5)
    assert line and "'skipped': 'done'" in line, f"the redelivered message was not dropped:\n{line}"
    after = _registry(stack).get(job["id"])
    assert after["status"] == "SUCCEEDED" and int(after["attempts"]) == 2
    assert float(after["trainer_started"]) == final["trainer_started"] and not _trainer_processes(job["output"])
    assert len([r for r in stack.json("runs") if r["tags"].get("job_id") == job["id"]]) == 1


def _registry(stack):
    from services.queue.registry import Registry, connect

    return Registry(connect(stack.description["redis_url"]))


def _flower(stack, path: str, auth: bool = True):
    d = stack.description
    headers = {"Authorization": "Basic " + base64.b64encode(f"{d['flower_user']}:{d['flower_password']}".encode())
               .decode()} if auth else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(d["flower_url"] + path, headers=headers), timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as exc:
        return {"http_status": exc.code}


def test_request_no_worker_can_serve_is_refused(stack, sample_root):
    proc = stack.cli("submit-train", "--data", os.path.join(sample_root, "prep"), "--npus", "4", "--batch-size", "32")
    assert proc.returncode != 0
    assert "--npus 4" in proc.stderr and "cpu@" in proc.stderr and "Traceback" not in proc.stderr
    proc = stack.cli("submit-train", "--data", os.path.join(sample_root, "prep"), "--device-type", "npu")
    assert proc.returncode != 0 and "no registered npu worker" in proc.stderr
    assert all(j["npus"] != 4 and j["device_type"] != "npu" for j in stack.json("jobs"))  # no job was created


def test_paths_outside_the_data_roots_are_refused(stack, tmp_path_factory):
    outside = str(tmp_path_factory.mktemp("outside-roots"))
    proc = stack.cli("submit-train", "--data", outside)
    assert proc.returncode == 2 and "outside the data roots" in proc.stderr


def test_unreachable_redis_and_mlflow_are_one_line_errors(stack):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    for args in (["jobs"], ["status", "abc"], ["submit-train", "--data", stack.root], ["workers"]):
        proc = stack.cli(*args, env={"FACENET_REDIS_URL": dead})
        assert proc.returncode == 1, proc
        assert "Redis at" in proc.stderr and "unreachable" in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    proc = stack.cli("runs", env={"FACENET_MLFLOW_URI": f"http://127.0.0.1:{free_port()}"})
    assert proc.returncode == 1 and "MLflow at" in proc.stderr and "Traceback" not in proc.stderr
    proc = stack.cli("status", "nosuchjob")
    assert proc.returncode == 1 and "no job 'nosuchjob'" in proc.stderr


def test_submit_preprocess_alone_and_a_failing_job(stack):
    from facenet.samples import make_raw_identities

    raw = os.path.join(stack.root, "raw-small")
    make_raw_identities(raw, per_identity=4, identities=2)
    with open(os.path.join(raw, sorted(os.listdir(raw))[0], "broken.jpg"), "wb") as fh:
        fh.write(b"not a jpeg at all")
    out = os.path.join(stack.root, "faces-small")
    proc = stack.cli("submit-preprocess", raw, out, "--align", "--wait", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = json.loads(proc.stdout)
    assert job["status"] == "SUCCEEDED" and job["kind"] == "preprocess"
    assert job["result"]["images"] == 9 and job["result"]["faces"] == 8 and job["result"]["rejects"] == 1
    assert os.path.exists(os.path.join(out, "train_list.txt"))
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as fh:
        assert json.load(fh)["params"]["align"] is True  # the queued job's workers warped by the landmarks

    # A dataset with no images: the trainer's one-line error becomes the job's error, --wait exits 1.
    empty = os.path.join(stack.root, "empty-dataset")
    os.makedirs(empty, exist_ok=True)
    proc = stack.cli("submit-train", "--data", empty, "--wait")
    assert proc.returncode == 1
    assert "FAILED" in proc.stdout and empty in proc.stdout, proc.stdout
    failed = stack.json("jobs")[0]
    assert failed["status"] == "FAILED" and failed["error"]
    assert stack.mlflow().get_run(failed["mlflow_run_id"]).info.status == "FAILED"
    logs = stack.cli("logs", failed["id"], check=True).stdout
    assert failed["error"] in logs


def _inspect(stack, method: str, timeout: int = 10, args: str = "") -> dict:
    """`celery inspect METHOD` asked of the live workers (a process of its own, with the stack's environment):
    {node: answer}."""
    code = ("import json; from services.queue.app import app; "
            f"print(json.dumps(app.control.inspect(timeout={timeout}).{method}({args}) or {{}}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=stack.env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _shards_done(reg, job_id: str) -> int:
    return int(reg.r.hget(reg.key(job_id), "shards_done") or 0)


def test_killed_preprocessing_worker_loses_no_shard(stack):
    """kill -9 of the preprocessing worker mid-shard: the job still ends with exactly what an undisturbed run of
    the same RAW writes (every crop, byte for byte, both lists and the manifest)."""
    from facenet.samples import make_raw_identities

    raw = os.path.join(stack.root, "raw-kill")
    make_raw_identities(raw, per_identity=12, identities=8)
    out = os.path.join(stack.root, "faces-kill")
    job = stack.json("submit-preprocess", raw, out, "--shard-size", "2")
    reg = _registry(stack)
    deadline = time.time() + 120
    while _shards_done(reg, job["id"]) < 3:
        assert time.time() < deadline and reg.get(job["id"])["status"] == "PREPROCESSING", reg.get(job["id"])
        time.sleep(0.05)
    worker = stack.description["services"]["worker-preprocess"]
    os.killpg(worker["pid"], signal.SIGKILL)  # mid-shard: its message stays unacknowledged for days
    assert reg.get(job["id"])["status"] == "PREPROCESSING"
    assert stack.cli("stack", "up", timeout=240).returncode == 0
    final = stack.wait_for(job["id"], lambda j: j["status"] == "SUCCEEDED", timeout=300,
                           what="preprocessing to finish after the worker was killed")
    assert final["result"]["images"] == 96 and final["result"]["faces"] + final["result"]["rejects"] == 96
    logs = ""
    for name in ("worker-preprocess", "worker-cpu"):  # any live worker's sweep may win
        with open(os.path.join(stack.state_dir, "logs", f"{name}.log"), encoding="utf-8") as fh:
            logs += fh.read()
    assert f"job {job['id']} shard:" in logs  # the sweep sent the lost shard again

    # An undisturbed run of the same RAW with the same settings, on this host, outside the queue.
    ref = os.path.join(stack.root, "faces-kill-ref")
    proc = stack.cli("preprocess", raw, ref, "--shard-size", "2", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]

    def files(root):  # hidden ones (the job's own .preprocess state, temp files) aside
        found = (os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
        return sorted(rel for rel in found if not any(part.startswith(".") for part in rel.split(os.sep)))

    crops = files(ref)
    assert len([f for f in crops if f.startswith(("train/", "test/"))]) == final["result"]["faces"] > 80
    assert {"train_list.txt", "test_list.txt", "manifest.json"} <= set(crops)
    assert files(out) == crops
    for rel in crops:
        with open(os.path.join(out, rel), "rb") as a, open(os.path.join(ref, rel), "rb") as b:
            assert a.read() == b.read(), rel


def test_cancel_during_preprocessing_stops_the_shards(stack):
    """Cancel while shards run: `--wait` exits 1 saying CANCELLED; the shards running at that moment may finish
    theirs, but none starts after: once they are done no shard finishes and no crop appears over a further wait,
    the queued shard messages are dropped, no worker executes anything of the job, and no training starts."""
    from facenet.samples import make_raw_identities

    raw = os.path.join(stack.root, "raw-cancel")
    make_raw_identities(raw, per_identity=12, identities=8)
    faces = os.path.join(stack.root, "faces-cancel")
    t0 = time.time()
    waiting = subprocess.Popen([sys.executable, "-m", "services.cli", "submit-train", "--preprocess-from", raw,
                                "--data", faces, "--shard-size", "2", "--epochs", "1", *TEST_IMAGE_SIZE, "--wait"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=stack.env)
    reg = _registry(stack)
    deadline, job_id = time.time() + 120, None
    while job_id is None or not _shards_done(reg, job_id):
        assert time.time() < deadline and waiting.poll() is None, waiting.stderr.read() if waiting.poll() else ""
        newest = stack.json("jobs")[0] if job_id is None else None
        if newest and newest["created"] >= t0 - 1:
            job_id = newest["id"]
        time.sleep(0.1)
    cancelled = stack.json("cancel", job_id)
    assert cancelled["status"] == "CANCELLED" and "preprocessing" in cancelled["message"]
    at_cancel = _shards_done(reg, job_id)
    # --wait ends with the job, exit status 1 (bound: it polls every 0.5 s)
    stdout, stderr = waiting.communicate(timeout=30)
    assert waiting.returncode == 1 and f"job {job_id} CANCELLED" in stdout, stdout + stderr
    # The shards running at the cancel end (bound: a shard of 2 photos takes ~1 s here; 30 s for a loaded host),
    # and every queued shard message is taken and dropped.
    deadline = time.time() + 30
    while reg.r.scard(reg.key(job_id) + ":started") or reg.r.llen("preprocess"):
        assert time.time() < deadline, (reg.r.smembers(reg.key(job_id) + ":started"), reg.r.llen("preprocess"))
        time.sleep(0.2)
    settled = _shards_done(reg, job_id)
    crops = sum(len(fs) for _, _, fs in os.walk(os.path.join(faces, "train")))
    from facenet.fsutil import cpu_cores

    concurrency = int(stack.env.get("FACENET_WORKER_CONCURRENCY") or cpu_cores())  # the preprocessing pool
    assert settled <= at_cancel + concurrency < 48, (at_cancel, settled)  # 96 photos = 48 shards
    assert not any(job_id in json.dumps(tasks) for tasks in _inspect(stack, "active", timeout=5).values())
    time.sleep(4)  # long enough for several more shards, had anything kept going
    assert _shards_done(reg, job_id) == settled
    assert sum(len(fs) for _, _, fs in os.walk(os.path.join(faces, "train"))) == crops
    final = stack.json("status", job_id)
    assert final["status"] == "CANCELLED" and final["mlflow_run_id"] is None and final["trainer_started"] is None


# Run in a process of its own with the stack's environment: it reads the job id from stdin, sends shard 0's
# message a second time the moment the first delivery starts (both preprocessing pool slots then crop the same
# shard at once), then, once the job trains, runs the train task a second time while the attempt is live.
_DELIVER_TWICE = """
import json, sys, time
from services.queue.send import send_stage
from services.queue.tasks import registry, train
s, reg = registry()
job_id = sys.stdin.readline().strip()
k = reg.key(job_id)
deadline = time.time() + 120
while not reg.r.sismember(k + ":started", "shard:0"):
    assert time.time() < deadline, reg.get(job_id)
    time.sleep(0.005)
send_stage(job_id, "shard:0", reg)
while not reg.r.hget(k, "trainer_pid"):
    assert time.time() < deadline + 240, reg.get(job_id)
    time.sleep(0.05)
print(json.dumps(train.apply(args=[job_id]).get()), flush=True)
"""


def test_a_message_delivered_twice_at_once_gives_one_result(stack):
    """The same shard message and the same train message delivered a second time while the first delivery
    runs (a broker redelivering early): the two runs of the shard overlap on the preprocessing pool's two slots
    and write the same files; the second train delivery meets the live attempt. One result: finalize and
    training run once, one attempt, one MLflow run; every crop is whole (its bytes hash to what the shard
    record says), and no temp file is left."""
    import glob
    import hashlib

    from facenet.samples import make_raw_identities
    from facenet.fsutil import cpu_cores

    if int(stack.env.get("FACENET_WORKER_CONCURRENCY") or cpu_cores()) < 2:
        pytest.skip("the preprocessing pool has one slot here: two deliveries cannot run at once")
    raw = os.path.join(stack.root, "raw-twice")
    make_raw_identities(raw, per_identity=12, identities=4)  # 48 photos in one shard: seconds of MTCNN
    faces = os.path.join(stack.root, "faces-twice")
    helper = subprocess.Popen([sys.executable, "-c", _DELIVER_TWICE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=stack.env)
    job = stack.json("submit-train", "--preprocess-from", raw, "--data", faces, "--shard-size", "100",
                     "--epochs", "1", "--batch-size", "16")
    helper.stdin.write(job["id"] + "\n")
    helper.stdin.close()
    final = stack.wait_for(job["id"], lambda j: j["status"] == "SUCCEEDED", timeout=300, what="the job")
    second_train = helper.stdout.read()
    assert helper.wait(timeout=60) == 0, helper.stderr.read()[-3000:]

    reg = _registry(stack)
    deliveries = reg.r.hgetall(reg.key(job["id"]) + ":deliveries")
    assert deliveries == {"plan": "1", "shard:0": "2", "finalize": "1"}, deliveries  # both shard runs started
    assert json.loads(second_train) == {"job": job["id"], "skipped": "busy"}
    assert final["attempts"] == 1 and final["dataset"]["images"] == 48
    assert len([r for r in stack.json("runs") if r["tags"].get("job_id") == job["id"]]) == 1
    [record_path] = glob.glob(os.path.join(faces, ".preprocess", "shards", "*", "000000.json"))
    with open(record_path, encoding="utf-8") as fh:
        records = [r for r in json.load(fh)["records"] if "out" in r]
    assert len(records) == final["dataset"]["faces"] > 40
    for r in records:
        with open(os.path.join(faces, r["out"]), "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == r["sha256"], r["out"]
    assert not [f for _, _, fs in os.walk(faces) for f in fs if ".tmp-" in f]


def test_a_data_set_that_vanishes_mid_run_fails_the_job_saying_so(stack, sample_root):
    """Poison job: the data set is deleted while the job trains. The job fails at once (another attempt would
    find nothing either) with a line that says the data vanished and names a file; its run is FAILED, its
    device free, and the worker serves on."""
    import shutil

    from facenet.samples import copy_subset

    faces = copy_subset(os.path.join(sample_root, "prep", "train"), os.path.join(stack.root, "vanishing"), 4, 12)
    job = stack.json("submit-train", "--data", faces, "--epochs", "30", "--batch-size", "8", "--log-every", "1")
    stack.wait_for(job["id"], lambda j: j["progress"].get("step"), what="training to start")
    shutil.rmtree(faces)
    final = stack.wait_for(job["id"], lambda j: j["status"] == "FAILED", timeout=120, what="the job to fail")
    assert final["error"].startswith("error: the data set vanished during training: " + faces), final["error"]
    assert "Restore or remount the data" in final["error"] and final["attempts"] == 1
    assert stack.mlflow().get_run(final["mlflow_run_id"]).info.status == "FAILED"
    assert not _trainer_processes(final["output"])
    worker = next(w for w in stack.json("workers") if w["node"].startswith("cpu@"))
    assert not any(worker["leases"].values())


def test_messages_that_are_not_json_or_not_ours_are_never_run(stack, tmp_path):
    """Pickle is accepted nowhere: a pickled message whose unpickling would run a command is refused before
    it is decoded; unknown tasks and wrong argument types are logged and dropped; the worker keeps serving."""
    import pickle
    import uuid

    from kombu import Connection

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    def publish(body, task: str, serializer: str = "json"):
        task_id = uuid.uuid4().hex
        with Connection(stack.description["redis_url"]) as conn:
            conn.Producer().publish(body, routing_key="preprocess", exchange="", serializer=serializer,
                                    headers={"task": task, "id": task_id, "lang": "py"})
        return task_id

    assert pickle.dumps(Evil())  # the payload really would run the command if unpickled
    publish(((Evil(),), {}, {}), "facenet.plan_dataset", serializer="pickle")
    publish((["x"], {}, {}), "facenet.no_such_task")
    bad_args = publish(([{"id": "abc"}], {}, {}), "facenet.plan_dataset")
    traversal = publish((["../../etc"], {}, {}), "facenet.finalize_dataset")
    reg = _registry(stack)
    deadline = time.time() + 60
    log_path = os.path.join(stack.state_dir, "logs", "worker-preprocess.log")
    while time.time() < deadline:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            log = fh.read()
        if all(s in log for s in ("x-python-serialize", "facenet.no_such_task", bad_args, traversal)):
            break
        time.sleep(0.5)
    assert "content 'application/x-python-serialize' in 'binary', not application/json" in log, log[-3000:]
    assert "task 'facenet.no_such_task' is not one queue 'preprocess' carries" in log  # services.queue.guard
    assert "are not a job id" in log
    assert not marker.exists()
    assert reg.r.llen("preprocess") == 0  # dropped, not left to loop
    # The worker still serves: a real job goes through.
    from facenet.samples import make_raw_identities

    raw = os.path.join(stack.root, "raw-after-hostile")
    make_raw_identities(raw, per_identity=2, identities=2)
    proc = stack.cli("submit-preprocess", raw, os.path.join(stack.root, "faces-after-hostile"), "--wait", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["status"] == "SUCCEEDED", proc.stdout + proc.stderr


def test_a_shard_that_kills_its_worker_every_time_fails_the_job(stack):
    """Celery gives a message whose worker process died back to the queue (reject on worker lost); without a
    bound a shard that is killed every time (out of memory) would be redelivered forever."""
    from facenet.samples import make_raw_identities

    raw = os.path.join(stack.root, "raw-poison")
    make_raw_identities(raw, per_identity=40, identities=4)  # one shard of 160 photos: seconds of MTCNN
    job = stack.json("submit-preprocess", raw, os.path.join(stack.root, "faces-poison"), "--shard-size", "200")
    reg = _registry(stack)
    worker = psutil.Process(stack.description["services"]["worker-preprocess"]["pid"])
    kills, deadline = 0, time.time() + 240
    while reg.get(job["id"])["status"] not in ("FAILED", "SUCCEEDED") and time.time() < deadline:
        if reg.r.sismember(reg.key(job["id"]) + ":started", "shard:0"):
            for child in worker.children():  # the pool process running the shard, as the OOM killer would
                child.kill()
            kills += 1
            time.sleep(1.0)
        time.sleep(0.05)
    final = reg.get(job["id"])
    assert final["status"] == "FAILED", final
    assert "shard:0 was started 3 times and never finished" in final["error"], final["error"]
    assert kills >= 2
    assert worker.is_running()  # the worker itself keeps serving


def test_a_hung_trainer_is_stopped_and_the_job_fails_after_its_attempts(stack, sample_root):
    """Two real faults, FACENET_MAX_ATTEMPTS=2: attempt 1's trainer stops writing anything (SIGSTOP: a real
    hang, no heartbeat of its own) and is stopped after FACENET_TRAINER_STALL_SECONDS (30 here: a live trainer
    shows life every 2 s, its final MLflow upload included) and retried; during attempt 2 the whole device
    worker is killed (kill -9). The sweep finds the job's heartbeat gone and, the bound reached, the job fails
    naming the lost worker; no trainer is left, and the restarted worker serves on."""
    faces = os.path.join(sample_root, "prep")
    job = stack.json("submit-train", "--data", faces, "--epochs", "50", "--batch-size", "32")
    reg = _registry(stack)
    stopped, killed_worker = set(), None
    deadline = time.time() + 420
    while time.time() < deadline:
        record = reg.get(job["id"])
        if record["status"] in ("FAILED", "SUCCEEDED", "CANCELLED"):
            break
        pid = int(record.get("trainer_pid") or 0)
        if pid and record["status"] == "RUNNING" and not stopped:
            try:
                for p in [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True):
                    p.suspend()
                stopped.add(pid)
            except psutil.NoSuchProcess:
                pass
        elif pid and record["status"] == "RUNNING" and pid not in stopped and killed_worker is None:
            worker = stack.description["services"]["worker-cpu"]
            os.killpg(worker["pid"], signal.SIGKILL)
            killed_worker = (worker["pid"], pid)
            restarted = stack.cli("stack", "up", timeout=240)
            assert restarted.returncode == 0, restarted.stderr
        time.sleep(0.5)
    final = stack.json("status", job["id"])
    assert final["status"] == "FAILED", final
    assert killed_worker and final["error"].startswith("gave up after 2 attempts: worker cpu@"), final["error"]
    assert final["error"].endswith("was lost during attempt 2"), final["error"]
    with open(os.path.join(stack.state_dir, "logs", "worker-cpu.log"), encoding="utf-8", errors="replace") as fh:
        returned = [line for line in fh if f"'job': '{job['id']}'" in line and "'requeued'" in line]
    assert len(returned) == 1 and "the trainer wrote nothing for 30 s" in returned[0], returned  # attempt 1
    pids = stopped | {killed_worker[1]}
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    assert stack.mlflow().get_run(final["mlflow_run_id"]).info.status == "FAILED"
    worker = next(w for w in stack.json("workers") if w["node"].startswith("cpu@"))
    assert not any(worker["leases"].values())


def test_secrets_appear_in_no_command_line_log_record_or_run(stack):
    import glob

    d = stack.description
    with open(os.path.join(stack.state_dir, "secrets.env"), encoding="utf-8") as fh:
        secrets = [line.split("=", 1)[1].strip() for line in fh if "PASSWORD" in line]
    assert secrets and all(len(s) > 12 for s in secrets)
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        assert not any(s in cmdline for s in secrets), cmdline[:300]
    reg = _registry(stack)
    for key in reg.r.scan_iter("facenet:job:*"):
        if reg.r.type(key) == "hash":
            assert not any(s in json.dumps(reg.r.hgetall(key)) for s in secrets), key
    for path in glob.glob(os.path.join(stack.state_dir, "logs", "*.log")) + \
            glob.glob(os.path.join(stack.state_dir, "runs", "*", "*.log")):
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        assert not any(s in text for s in secrets), path
    client = stack.mlflow()
    for run in client.search_runs([client.get_experiment_by_name("facenet").experiment_id], max_results=500):
        blob = json.dumps({**run.data.params, **run.data.tags})
        assert not any(s in blob for s in secrets), run.info.run_id
    # Flower's UI and API need its credentials.
    assert _flower(stack, "/api/workers", auth=False) == {"http_status": 401}
    assert isinstance(_flower(stack, "/api/workers"), dict) and d["flower_password"] in secrets


def test_the_live_workers_take_json_only_late_acks_one_at_a_time(stack):
    """What the README promises of the queue, read from the running workers (celery inspect conf), not
    from our source: JSON only, late acks, prefetch 1, reject-on-worker-lost, a visibility timeout longer
    than the longest job."""
    confs = _inspect(stack, "conf", args="with_defaults=True")
    assert len(confs) >= 2 and any(n.startswith("preprocess@") for n in confs) and any(n.startswith("cpu@") for n in confs)
    for node, conf in confs.items():
        assert conf["accept_content"] == ["json"] and conf["result_accept_content"] == ["json"], node
        assert conf["task_serializer"] == conf["result_serializer"] == conf["event_serializer"] == "json", node
        assert conf["task_acks_late"] is True and conf["task_reject_on_worker_lost"] is True, node
        assert conf["worker_prefetch_multiplier"] == 1, node
        vt = conf["broker_transport_options"]["visibility_timeout"]
        assert vt == 7 * 24 * 3600 + 3600, node  # FACENET_MAX_JOB_SECONDS (a week) + an hour
        assert conf["result_backend_transport_options"]["visibility_timeout"] == vt, node


def test_the_local_stack_listens_on_loopback_only(stack):
    services = stack.json("stack", "status")
    pids = {s["pid"] for s in services if s.get("pid")}
    assert len(pids) >= 5, services
    procs = []
    for pid in pids:
        parent = psutil.Process(pid)
        procs += [parent] + parent.children(recursive=True)
    listening = [(p.pid, c.laddr) for p in procs for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 3, listening  # Redis, MLflow, Flower at least
    assert all(addr.ip == "127.0.0.1" for _, addr in listening), listening


def test_jobs_over_two_nodes_run_as_gangs_take_turns_survive_a_lost_node_and_cancel(stack, sample_root):
    """`stack up --device-workers 2` adds a second CPU device worker (a second "node", each owning device 0), so
    `submit-train --npus 2` needs both: a job leases one device on each at once and runs as torchrun --nnodes 2
    (node 0 where its task ran, node 1 started by the other worker's agent).

    Two such jobs submitted at once: each worker's task may lead one, but a gang leases both devices at once or
    nothing, so one job trains while the other waits holding nothing, then the other runs (no deadlock; no
    device leased to both: sampled all along). During the first, the follower node's whole worker is killed
    (kill -9): the leader's ranks do not hang (a peer's death ends the collective), the job is queued again,
    waits for the restarted worker and resumes from its checkpoint in the same MLflow run. The other job shows
    both nodes' output in its log, `status --json` names its nodes in rank order, and Flower shows node 1's part
    as a task of its own. Then a third job is cancelled mid-training: every node's trainer stops."""
    from facenet.samples import copy_subset

    more = stack.cli("stack", "up", "--device-workers", "2", timeout=240, check=True)
    assert "started worker-cpu2" in more.stdout and "started redis" not in more.stdout, more.stdout
    workers = {w["node"].split("@")[0]: w for w in stack.json("workers")}
    assert {"cpu", "cpu2", "preprocess"} == set(workers) and workers["cpu2"]["devices"] == workers["cpu"]["devices"]
    nodes = [w["node"] for w in workers.values() if w["node"].startswith("cpu")]
    faces = copy_subset(os.path.join(sample_root, "prep", "train"), os.path.join(stack.root, "gangs"), 4, 10)
    first = stack.json("submit-train", "--data", faces, "--npus", "2", "--epochs", "3", "--batch-size", "8",
                       *CHEAP_RUN)
    second = stack.json("submit-train", "--data", faces, "--npus", "2", "--epochs", "1", "--batch-size", "8",
                        "--log-every", "1", *CHEAP_RUN)
    reg = _registry(stack)
    holders_seen, killed, deadline = [], None, time.time() + 500
    while time.time() < deadline:
        jobs = {j: reg.get(j) for j in (first["id"], second["id"])}
        if all(j["status"] in ("SUCCEEDED", "FAILED", "CANCELLED") for j in jobs.values()):
            break
        keys = [k for node in nodes for k in reg.lease_keys(node, [0])]
        held = dict(zip(nodes, reg.r.mget(keys)))  # one read of both: a snapshot, not two moments
        holders = {h.split(":")[0] for h in held.values() if h}
        assert len(holders) <= 1, held  # one gang at a time: never a device each
        if len(holders) == 1:
            assert all(held.values()), held  # a gang holds both devices or none
        holders_seen.append(frozenset(holders))
        j = jobs[first["id"]]
        running = j if j["status"] == "RUNNING" and 1 <= ((j.get("progress") or {}).get("checkpoint_epoch") or 0) < 2 \
            else None
        if killed is None and running and running.get("nodes") and len(running["nodes"]) == 2:
            follower = running["nodes"][1]
            name = "worker-cpu2" if follower.startswith("cpu2@") else "worker-cpu"
            pid = stack.description["services"][name]["pid"]
            os.killpg(pid, signal.SIGKILL)
            killed = (running["id"], follower, time.time())
            time.sleep(3)
            assert stack.cli("stack", "up", timeout=240).returncode == 0
        time.sleep(0.3)
    ends = {j: stack.json("status", j) for j in (first["id"], second["id"])}
    assert all(e["status"] == "SUCCEEDED" for e in ends.values()), ends
    assert killed, "no gang job ran with a checkpoint to kill it at"
    hit = ends[killed[0]]
    assert hit["attempts"] == 2, hit
    runs = [r for r in stack.json("runs") if r["tags"].get("job_id") == killed[0]]
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED"
    steps = sorted({m.step for m in stack.mlflow().get_metric_history(hit["mlflow_run_id"], "acc1")})
    assert steps == [1, 2, 3], steps
    assert {first["id"], second["id"]} <= {j for h in holders_seen for j in h}  # each gang held both devices

    calm = ends[second["id"]]  # never disturbed while it trained (its waiting attempt may have been on the killed
    assert calm["attempts"] <= 2 and calm["result"]["world_size"] == 2 and calm["result"]["acc1"] is not None  # worker)
    assert sorted(calm["nodes"]) == sorted(nodes) and calm["nodes"][0] == calm["worker"]
    log = stack.cli("logs", second["id"], check=True).stdout
    assert "as node 0 of 2" in log and "[node 1] launching 1 processes (cpu) as node 1 of 2" in log, log[-3000:]
    assert os.path.exists(os.path.join(calm["output"], "train.node1.log"))
    runs = [r for r in stack.json("runs") if r["tags"].get("job_id") == second["id"]]
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED"
    # Flower: node 1's part of each attempt is a task on the follower's worker, child of the job's train task.
    parts = _node_tasks(stack, {first["id"]: 2, second["id"]: 1})
    calm_part = parts[second["id"]][0]
    assert calm_part["state"] == "SUCCESS" and calm_part["worker"] == calm["nodes"][1], calm_part
    assert calm_part["parent_id"] == reg.get(second["id"])["task_id"], calm_part
    # The lost node's part ended too (not STARTED forever): failed, said by the leader for the dead worker, or
    # revoked, when the restarted worker had picked the dying attempt's part up again before it was withdrawn.
    lost = [t for t in parts[first["id"]] if t["state"] != "SUCCESS"]
    assert len(lost) == 1 and lost[0]["worker"] == killed[1], parts[first["id"]]
    assert lost[0]["state"] == "REVOKED" or "was lost" in lost[0]["exception"], lost
    _no_leases_left(stack)

    # Cancel stops every node: no process of the job is left on either, both devices come free.
    third = stack.json("submit-train", "--data", faces, "--npus", "2", "--epochs", "30", "--batch-size", "8",
                       "--log-every", "1", *CHEAP_RUN)
    stack.wait_for(third["id"], lambda j: j["status"] == "RUNNING" and (j.get("progress") or {}).get("step"),
                   timeout=240, what="the third gang job to train")  # a step: both nodes are in the collective
    ranks = {p.environ().get("FACENET_ATTEMPT", "").partition("#")[2] for p in _job_processes(third["id"])}
    assert {"", "node1"} <= ranks, ranks  # node 0's trainer and node 1's
    shown = stack.json("status", third["id"])["node_states"]
    assert [(n["rank"], n["node"]) for n in shown] == list(enumerate(reg.get(third["id"])["nodes"]))
    assert shown[1]["trainer"] == "running" and psutil.pid_exists(shown[1]["pid"]), shown
    assert "node 1: " in stack.cli("status", third["id"], check=True).stdout
    assert stack.json("cancel", third["id"])["status"] == "CANCELLED"
    deadline = time.time() + 40  # bound: node 0 at once, node 1 once its assignment is withdrawn (30 s at most)
    while _job_processes(third["id"]) and time.time() < deadline:
        time.sleep(0.3)
    assert not _job_processes(third["id"]), [(p.pid, p.cmdline()[:4]) for p in _job_processes(third["id"])]
    assert stack.mlflow().get_run(reg.get(third["id"])["mlflow_run_id"]).info.status == "KILLED"
    assert _node_tasks(stack, {third["id"]: 1})[third["id"]][0]["state"] == "REVOKED"
    _no_leases_left(stack)


def _job_processes(job_id: str) -> list[psutil.Process]:
    """Live processes of any attempt of the job, on any node (FACENET_ATTEMPT = <job>:<token>[#node<R>])."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FACENET_ATTEMPT", "").startswith(job_id + ":") and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def _node_tasks(stack, wanted: dict[str, int]) -> dict[str, list[dict]]:
    """Flower's facenet.train_node tasks of each job, once each has as many as wanted, all ended (bound 30 s)."""
    deadline = time.time() + 30
    while True:
        tasks = _flower(stack, "/api/tasks?limit=500&taskname=facenet.train_node")
        parts = {job: [t for t in tasks.values() if job in str(t.get("args"))] for job in wanted}
        done = all(len(parts[j]) == n and all(t["state"] in ("SUCCESS", "FAILURE", "REVOKED") for t in parts[j])
                   for j, n in wanted.items())
        if done or time.time() > deadline:
            assert done, tasks
            return parts
        time.sleep(1)


def _no_leases_left(stack) -> None:
    """Every worker's devices free again (bound: node 0 gives the gang's leases back once the other nodes'
    trainers have exited, which they do with the job: 30 s on a loaded host)."""
    deadline = time.time() + 30
    while True:
        held = [w for w in stack.json("workers") if any((w.get("leases") or {}).values())]
        if not held or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not held, held


# ---- the second security review (README, Security): each attack against the running stack ----------------

def _status_of(url: str, auth: tuple[str, str] | None = None) -> int:
    headers = {"Authorization": "Basic " + base64.b64encode(":".join(auth).encode()).decode()} if auth else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_anonymous_mlflow_and_flower_metrics_are_refused(stack):
    """Loopback is open to every user of the host: MLflow's REST API and UI, and Flower's /metrics, ask for the
    stack's generated logins (was: MLflow open to anyone, /metrics answered without credentials)."""
    d = stack.description
    search = d["mlflow_uri"] + "/api/2.0/mlflow/experiments/search?max_results=5"
    assert _status_of(search) == 401
    assert _status_of(d["mlflow_uri"] + "/") == 401
    assert _status_of(search, (d["mlflow_username"], "wrong-password")) == 401
    assert _status_of(search, (d["mlflow_username"], d["mlflow_password"])) == 200
    assert _status_of(d["flower_url"] + "/metrics") == 401
    assert _status_of(d["flower_url"] + "/metrics", (d["flower_user"], d["flower_password"])) == 200
    with open(os.path.join(stack.state_dir, "secrets.env"), encoding="utf-8") as fh:
        assert f"MLFLOW_TRACKING_PASSWORD={d['mlflow_password']}\n" in fh.read()


def _said_anywhere(stack, job: dict, needles: list[str]) -> list[str]:
    """Which of `needles` the job's record and log in Redis, the task results, its files on disk, the
    stack's logs or any MLflow artifact hold. Bytes are searched as they are (decoding the artifacts, a
    few hundred MB of earlier tests' models, took a minute per call)."""
    import glob

    reg = _registry(stack)
    texts = [str(reg.r.hgetall(f"facenet:job:{job['id']}"))] + \
        [str(line) for line in reg.r.lrange(f"facenet:job:{job['id']}:log", 0, -1)] + \
        [str(reg.r.get(key)) for key in reg.r.scan_iter("celery-task-meta-*")]
    wanted = [n.encode() for n in needles]
    found = {n for n in wanted if n in "\n".join(texts).encode()}
    for path in glob.glob(os.path.join(stack.state_dir, "runs", job["id"], "**"), recursive=True) + \
            glob.glob(os.path.join(stack.state_dir, "logs", "*.log")) + \
            glob.glob(os.path.join(stack.state_dir, "mlflow", "artifacts", "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                blob = fh.read()  # one file at a time: the models are ~100 MB each
            found |= {n for n in wanted if n in blob}
    return [n.decode() for n in wanted if n in found]


@pytest.mark.parametrize("how", ["symlink to the state folder", "symlink inside the roots", "hard link"])
def test_a_manifest_that_names_a_secret_reaches_no_one(stack, sample_root, how):
    """DATA/manifest.json as a link to the stack's own secrets.env (or to a secret kept inside the data root):
    the manifest is uploaded to MLflow and quoted in logs, so the job must refuse it and nothing of the
    secret may reach MLflow, Redis, the logs or the job's error (was: the Redis and Flower passwords served
    by MLflow)."""
    from facenet.samples import copy_subset

    tag = how.replace(" ", "-")
    data = copy_subset(os.path.join(sample_root, "prep", "train"), os.path.join(stack.root, f"leak-{tag}"), 2, 4)
    secrets_env = os.path.join(stack.state_dir, "secrets.env")
    marker = "MARKER-" + os.urandom(8).hex()
    private = os.path.join(stack.root, f"private-{tag}.env")
    with open(private, "w", encoding="utf-8") as fh:
        fh.write(f"TOKEN={marker}\n")
    if how == "symlink to the state folder":
        os.symlink(secrets_env, os.path.join(data, "manifest.json"))
    elif how == "symlink inside the roots":
        os.symlink(private, os.path.join(data, "manifest.json"))
    else:
        os.link(private, os.path.join(data, "manifest.json"))  # the same file by another name, as seen by resolve()
    job = stack.json("submit-train", "--data", data, "--epochs", "1", "--batch-size", "4", *CHEAP_RUN)
    job = _wait_end(stack, job["id"])
    assert job["status"] == "FAILED", job
    assert "manifest" in job["error"] and ("symbolic link" in job["error"] or "hard links" in job["error"]), job
    with open(secrets_env, encoding="utf-8") as fh:
        secrets = [line.split("=", 1)[1].strip() for line in fh if "=" in line and not line.startswith("#")]
    assert _said_anywhere(stack, job, [marker, *[s for s in secrets if len(s) > 12]]) == []


def _wait_end(stack, job_id: str, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = stack.json("status", job_id)
        if job["status"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not end in {timeout} s")


def test_the_worker_decides_where_a_job_writes(stack, sample_root, tmp_path_factory):
    """The submitting client's FACENET_RUNS_DIR (or anyone writing the job record) does not choose where the
    worker writes checkpoints and logs; a relative --audit-samples lands under the job's own output (was: a
    282 MB checkpoint written where the client said, and a literal runs/<job>/audit shared by every job)."""
    from facenet.samples import copy_subset

    data = copy_subset(os.path.join(sample_root, "prep", "train"), os.path.join(stack.root, "where"), 2, 6)
    elsewhere = str(tmp_path_factory.mktemp("client-runs"))
    job = stack.json("submit-train", "--data", data, "--epochs", "1", "--batch-size", "4", "--audit-samples", "audit",
                     *CHEAP_RUN, env={"FACENET_RUNS_DIR": elsewhere})
    _registry(stack).update(job["id"], output=os.path.join(elsewhere, "planted"))  # a record rewritten in Redis
    job = _wait_end(stack, job["id"])
    assert job["status"] == "SUCCEEDED", job
    mine = os.path.join(stack.state_dir, "runs", job["id"])
    assert os.path.isfile(os.path.join(mine, "summary.json")) and os.path.isfile(os.path.join(mine, "train.log"))
    assert os.listdir(elsewhere) == []  # neither the client's runs folder nor the planted one got a byte
    stored = _registry(stack).get(job["id"])["spec"]
    assert stored["audit_samples"] == "audit" and "<job>" not in json.dumps(stored)
    assert os.listdir(os.path.join(mine, "audit")), "the audit samples go under the job's own output"


def test_a_wrong_mlflow_login_is_one_line_at_once(stack, sample_root, tmp_path_factory):
    """A trainer (or a worker) whose MLflow login is wrong fails at once saying so (was: a 401 counted as the
    server being away, so an attempt waited FACENET_MLFLOW_WAIT_SECONDS, 10 minutes, and chaos lost jobs)."""
    from facenet.samples import copy_subset

    data = copy_subset(os.path.join(sample_root, "prep", "train"), os.path.join(stack.root, "login"), 2, 4)
    out = str(tmp_path_factory.mktemp("wrong-login"))
    t0 = time.time()
    proc = stack.cli("train", "--data", data, "--epochs", "1", "--batch-size", "4", "--device", "cpu", *CHEAP_RUN,
                     *TEST_IMAGE_SIZE, "--mlflow-uri", stack.description["mlflow_uri"], "--output", out,
                     env={"MLFLOW_TRACKING_USERNAME": "facenet", "MLFLOW_TRACKING_PASSWORD": "not-the-password"},
                     timeout=120)
    took = time.time() - t0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(errors) == 1 and "refused our login" in errors[0] and "MLFLOW_TRACKING_PASSWORD" in errors[0], errors
    assert took < 60, f"{took:.0f} s: it waited for a login that no wait mends"


def test_stack_up_refuses_data_roots_that_hold_its_secrets(stack, tmp_path_factory):
    """The stack's state folder is never inside a data root, whatever roots are asked for (was: the default
    roots were the home folder and the temp dir, which hold it)."""
    parent = os.path.dirname(stack.state_dir)
    for roots in ([parent], [stack.state_dir], [os.path.join(stack.state_dir, "runs")]):
        proc = stack.cli("stack", "up", *[a for r in roots for a in ("--data-root", r)], timeout=60)
        assert proc.returncode == 2, proc
        assert "state folder" in proc.stderr and "Traceback" not in proc.stderr
    proc = stack.cli("stack", "up", env={"FACENET_DATA_ROOTS": parent}, timeout=60)
    assert proc.returncode == 2 and "holds the stack's state folder" in proc.stderr
    assert stack.description["data_roots"] == stack.env["FACENET_DATA_ROOTS"].split(os.pathsep)
    up = stack.cli("stack", "up", timeout=120)
    assert up.returncode == 0 and "data roots (jobs read and write only beneath these)" in up.stdout


def test_stack_down_stops_exactly_what_stack_up_started(stack):
    """Last in this module. `stack down` ends every process `stack up` started (each service and its children:
    pool processes, MLflow's workers) and nothing else: not a look-alike with the same command line, not a
    process that got a recorded pid after a reboot (a stale stack.json). First `stack up --device-workers 2`
    adds a second CPU device worker (a second "node"), which `down` stops with the rest."""
    more = stack.cli("stack", "up", "--device-workers", "2", timeout=240, check=True)  # started earlier, or now
    assert "started redis" not in more.stdout, more.stdout
    assert [(x["name"], x["running"]) for x in stack.json("stack", "status")][-2:] == \
        [("worker-cpu", True), ("worker-cpu2", True)]
    started = []
    for service in stack.json("stack", "status"):
        parent = psutil.Process(service["pid"])
        started += [parent] + parent.children(recursive=True)
    assert len(started) >= 7, started  # 6 services, and the workers' pool processes at least
    look_alike = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "services.stack.entrypoints",
                                   "redis"], start_new_session=True)
    try:
        down = stack.cli("stack", "down", timeout=120, check=True)
        assert all(f"stopped {name}" in down.stdout
                   for name in ("redis", "mlflow", "flower", "worker-cpu", "worker-cpu2")), down.stdout
        deadline = time.time() + 10  # bound: SIGKILL of each group follows its grace period
        while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started) and time.time() < deadline:
            time.sleep(0.2)
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, [(p.pid, p.cmdline()[:4]) for p in left]
        assert look_alike.poll() is None, "stack down killed a process it did not start"
        assert not any(s["running"] for s in stack.json("stack", "status"))
        # A stale record naming a pid that now belongs to someone else (its start time differs) is not stopped.
        path = os.path.join(stack.state_dir, "stack.json")
        described = stack.description
        described["services"]["redis"] = {"pid": look_alike.pid, "create_time": 1.0}
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(described, fh)
        stack.cli("stack", "down", timeout=60, check=True)
        time.sleep(0.5)
        assert look_alike.poll() is None, "stack down killed a process by a stale pid"
    finally:
        look_alike.kill()
        look_alike.wait()
