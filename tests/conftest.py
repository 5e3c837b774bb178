"""Shared fixtures: real face photos, a real MLflow server process, helpers to run the trainer.

The sample set (8 real people x 40 loosely cropped photos, MTCNN-cropped) is
built once per machine into the cache (FACENET_CACHE, default
~/.cache/facenet-stack) from photos that scikit-image / insightface wheels
ship; tests copy what they need into their own tmp dirs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

# Side by side (pytest-xdist, below), each test process and what it starts computes on one thread unless told
# otherwise: N workers whose trainers each took every core spun against each other (OpenMP waits by spinning), as
# the launcher's own cpu_share keeps N ranks from doing. What a test sets for its own processes still wins.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

# Redis writes its append-only file with an fsync on every write: beside a docker build (the compose e2e's) such
# fsyncs stalled for over a second here, past what the tests' 6 s leases allow, and jobs of the service tests were
# requeued under them. The local stacks and Redis servers the tests start keep that file on tmpfs instead (a kill -9
# of Redis keeps it all the same; only a reboot would not), in one private folder for the session.
if "FACENET_STACK_REDIS_ROOT" not in os.environ and os.access("/dev/shm", os.W_OK):
    import atexit
    import shutil
    import tempfile

    os.environ["FACENET_STACK_REDIS_ROOT"] = tempfile.mkdtemp(prefix="facenet-test-redis-", dir="/dev/shm")
    atexit.register(shutil.rmtree, os.environ["FACENET_STACK_REDIS_ROOT"], True)

from facenet.samples import copy_subset  # noqa: E402
from facenet.fsutil import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_VERSION = "v2"


@pytest.fixture(scope="session")
def sample_root() -> str:
    """ROOT with raw/<identity>/*.jpg and prep/ (our preprocessing of it), cached per machine."""
    from facenet.samples import build_sample_dataset, cache_dir, cached

    return cached(os.path.join(cache_dir(), "test-data", SAMPLE_VERSION),
                  lambda root: build_sample_dataset(root, per_identity=40, identities=8, seed=0))


@pytest.fixture(scope="session")
def orl_faces() -> str:
    """The AT&T (ORL) faces, 40 real people x 10 distinct photos, preprocessed at 96 px: train/ holds 30
    people (train_list.txt, test_list.txt), test/ 10 others and test_pairs.txt pairs them. Cached per
    machine."""
    from facenet.samples import build_orl_dataset, cache_dir, cached

    root = cached(os.path.join(cache_dir(), "test-data", "orl-v1"),
                  lambda root: build_orl_dataset(root, train_people=30, image_size=96))
    return os.path.join(root, "prep")


@pytest.fixture(scope="session")
def sample_split(sample_root, tmp_path_factory) -> str:
    """The sample set as training and verification data: train/ holds 4 of the 8 people, test/ the other 4,
    and test_pairs.txt pairs those 4 (people training never sees)."""
    import shutil

    from facenet.verification.pairs import format_pairs, generate_pairs, identity_folders

    src = os.path.join(sample_root, "prep", "train")
    root = str(tmp_path_factory.mktemp("split"))
    people = sorted(os.listdir(src))
    trained = [p for p in people if p.startswith("t1_person")][:4]
    for person in people:
        shutil.copytree(os.path.join(src, person), os.path.join(root, "train" if person in trained else "test", person))
    pairs = generate_pairs(identity_folders(os.path.join(root, "test")), seed=0)
    with open(os.path.join(root, "test_pairs.txt"), "w", encoding="utf-8") as fh:
        fh.write(format_pairs(pairs, root))
    return root


@pytest.fixture(scope="session")
def sample_faces(sample_root) -> str:
    return os.path.join(sample_root, "prep", "train")  # 8 identity folders of ~40 crops


@pytest.fixture
def small_faces(sample_faces, tmp_path) -> str:
    """4 identities x 12 crops: enough for the mechanics (DDP, resume) in seconds."""
    return copy_subset(sample_faces, str(tmp_path / "small"), 4, 12)


@dataclass
class MlflowServer:
    uri: str
    port: int
    workdir: str
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        """`mlflow server` keeping its sqlite db, artifacts and log in the workdir, in a process group of its own
        (a stop takes its workers too), started as the stack starts it; returns once it answers."""
        from facenet.errors import UserError
        from services.stack.entrypoints import answers, mlflow_server_command

        os.makedirs(self.workdir, exist_ok=True)
        log_path = os.path.join(self.workdir, "mlflow.log")
        cmd, env = mlflow_server_command("127.0.0.1", self.port, f"sqlite:///{self.workdir}/mlflow.db",
                                         os.path.join(self.workdir, "artifacts"))
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         start_new_session=True, env={**os.environ, **env})
        deadline = time.time() + timeout
        while not answers("mlflow", base_url=self.uri, timeout=2):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise UserError(f"mlflow server did not come up (exit {self.proc.returncode}); see {log_path}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process (sqlite backend, served artifacts) on a free port."""
    workdir = str(tmp_path_factory.mktemp("mlflow"))
    port = free_port()
    server = MlflowServer(f"http://127.0.0.1:{port}", port, workdir)
    server.start()
    yield server
    server.stop()


# Tests train at 80 px unless they say otherwise: a quarter of the compute of 160 px crops (the model pools
# adaptively), which keeps the suite inside CI's time on 2 cores. 80 is near the smallest size the model takes (at
# 64 px its last block's 3 x 3 convolution meets a 2 x 2 map); a step at batch 16 took 0.35-0.39 s here, 0.44-0.49
# s at 96 px. Tests that prove a size (an ONNX input shape, a crop) name their own.
TEST_IMAGE_SIZE = ["--image-size", "80"]
TEST_SIZE = int(TEST_IMAGE_SIZE[1])


def train_cmd(*args: str) -> list[str]:
    sized = [] if "--image-size" in args else TEST_IMAGE_SIZE
    return [sys.executable, "-m", "facenet.train", *args, *sized]


def run_train(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(train_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_events(path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server started by the entrypoint compose uses (password from a 0600 redis.conf)."""
    from services.queue.registry import connect

    import pathlib
    import tempfile

    root = os.environ.get("FACENET_STACK_REDIS_ROOT")  # tmpfs, as for the stacks (above)
    data = pathlib.Path(tempfile.mkdtemp(prefix="redis-", dir=root)) if root else tmp_path_factory.mktemp("redis")
    port = free_port()
    env = {**os.environ, "FACENET_REDIS_PORT": str(port), "FACENET_REDIS_PASSWORD": "pw-test",
           "FACENET_REDIS_DATA": str(data)}
    proc = subprocess.Popen([sys.executable, "-m", "services.stack.entrypoints", "redis"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://:pw-test@127.0.0.1:{port}/0"
    deadline = time.time() + 20
    while True:
        try:
            connect(url, timeout=1).ping()
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.2)
    # The password is required, and is not on the command line.
    with pytest.raises(Exception):
        connect(f"redis://127.0.0.1:{port}/0", timeout=1).set("x", 1)
    assert "pw-test" not in " ".join(open(f"/proc/{proc.pid}/cmdline").read().split("\0"))
    assert os.stat(data / "redis.conf").st_mode & 0o077 == 0
    yield url
    proc.terminate()
    proc.wait(10)


# ---- disk accounting ----------------------------------------------------------------------------------------
# A CI run once died with a full disk (35 GiB free at the start, 1 at the low point). Each test's change of
# free space on the checkout's file system goes to build/test-disk.jsonl, and the session ends with the tests
# that took the most and the lowest point, so the next such run names its culprit.
_DISK: dict = {"rows": []}


def _free_bytes() -> int:
    st = os.statvfs(REPO)
    return st.f_bavail * st.f_frsize


def _cpu_seconds() -> float:
    """CPU time of this process and of the children it has reaped (with theirs): what a test's own processes cost
    (a trainer, a CLI, a worker its fixture stopped). A stack service handed to init is not counted."""
    import resource

    own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before, cpu = _free_bytes(), _cpu_seconds()
    yield
    after = _free_bytes()
    _DISK["rows"].append({"test": item.nodeid, "used_mib": round((before - after) / 2**20),
                          "free_gib": round(after / 2**30, 1), "cpu_s": round(_cpu_seconds() - cpu, 1)})


def _worker_id(config) -> str | None:
    """This process' name among pytest-xdist's workers (gw0, gw1, ...); None in the controller or a plain run."""
    return getattr(config, "workerinput", {}).get("workerid")


def _disk_file(worker: str | None) -> str:
    return os.path.join(REPO, "build", f"test-disk{'-' + worker if worker else ''}.jsonl")


def _host_cpu() -> tuple[float, float]:
    """(busy, all) jiffies of every core of the host since boot (/proc/stat's first line; iowait counts idle, a VM's
    steal time busy: the cores were not ours to use)."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total


# The host's CPU over the session, sampled every 5 s by the controller: whether the suite is bound by the cores
# (then only less work helps) or by waits on processes and services (then more side by side helps).
_HOST: dict = {"samples": []}


def _sample_host(stop, last: tuple[float, float]) -> None:
    """Each 5 s, the busy share of the cores since the sample before (`last`: the session's start)."""
    while not stop.wait(5):
        with contextlib.suppress(OSError, ValueError, IndexError):
            now = _host_cpu()
            if now[1] > last[1]:
                _HOST["samples"].append((now[0] - last[0]) / (now[1] - last[1]))
            last = now


def pytest_sessionstart(session):
    if _worker_id(session.config) is None:  # the controller (or a plain run): last session's files go
        import glob
        import threading

        for path in glob.glob(os.path.join(REPO, "build", "test-disk*.jsonl")):
            with contextlib.suppress(OSError):
                os.remove(path)
        with contextlib.suppress(OSError, ValueError, IndexError):
            _HOST.update(start=_host_cpu(), t0=time.monotonic(), stop=threading.Event())
            threading.Thread(target=_sample_host, args=(_HOST["stop"], _HOST["start"]), daemon=True,
                             name="host-cpu").start()


def _host_summary(terminalreporter) -> None:
    if "start" not in _HOST:
        return
    _HOST["stop"].set()
    with contextlib.suppress(OSError, ValueError, IndexError):
        busy, total = (b - a for a, b in zip(_HOST["start"], _host_cpu()))
        seconds = time.monotonic() - _HOST["t0"]
        cores = os.cpu_count() or 1
        samples = _HOST["samples"]
        half_idle = sum(s < 0.5 for s in samples) * 5
        terminalreporter.write_sep("=", f"host cpu: {100 * busy / max(total, 1):.0f}% busy over {seconds:.0f} s on "
                                        f"{cores} cores; {half_idle} s of it at least half idle")


def pytest_sessionfinish(session):
    worker = _worker_id(session.config)
    if worker is None or not _DISK["rows"]:
        return
    with contextlib.suppress(OSError):  # the worker's rows, for the controller's summary
        os.makedirs(os.path.join(REPO, "build"), exist_ok=True)
        with open(_disk_file(worker), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps({**r, "worker": worker}) + "\n" for r in _DISK["rows"])


def pytest_terminal_summary(terminalreporter):
    import glob

    _host_summary(terminalreporter)
    rows = list(_DISK["rows"])
    for path in glob.glob(os.path.join(REPO, "build", "test-disk-*.jsonl")):  # each worker's, under pytest-xdist
        with contextlib.suppress(OSError, ValueError), open(path, encoding="utf-8") as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    if not rows:
        return
    with contextlib.suppress(OSError):  # every worker's rows in one file
        os.makedirs(os.path.join(REPO, "build"), exist_ok=True)
        with open(_disk_file(None), "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    # Free space is the file system's, shared by the workers: each row is the change while that test ran.
    low = min(r["free_gib"] for r in rows)
    top = sorted(rows, key=lambda r: -r["used_mib"])[:8]
    terminalreporter.write_sep("=", f"disk: lowest free {low:.1f} GiB; tests that kept the most")
    for r in top:
        terminalreporter.write_line(f"{r['used_mib']:>8} MiB  {r['test']}  ({r['free_gib']} GiB free after)")
    # CPU is what a suite on 2 cores runs out of: the tests that cost the most of it (setup and teardown included;
    # a module fixture's processes count where they are reaped, often at the module's last test).
    terminalreporter.write_sep("=", f"cpu: {sum(r['cpu_s'] for r in rows):.0f} s in all; tests that used the most")
    for r in sorted(rows, key=lambda r: -r["cpu_s"])[:15]:
        terminalreporter.write_line(f"{r['cpu_s']:>8.1f} s  {r['test']}")


# ---- reclaiming a module's models -----------------------------------------------------------------------------
# Module- and session-scoped folders (a module's stack with its runs, the session's MLflow artifact store) live
# until the session ends; each trained model, checkpoint and export in them is ~90 MB, and a CI run kept 13 GB of
# them by 80% of the suite. When a module ends with no failure, the model files made during it under the
# session's basetemp are deleted (a failed module keeps everything to look at). A session-scoped fixture whose
# files must outlive the module that made them puts a `.keep-for-session` file in its folder.
MODEL_SUFFIXES = (".pt", ".pt2", ".onnx", ".ckpt", ".pth", ".safetensors")
_FAILED_MODULES: set[str] = set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if outcome.get_result().failed:
        _FAILED_MODULES.add(item.module.__name__)


def _reclaim_models(base: str, since: float) -> None:
    for folder, dirs, files in os.walk(base):
        if ".keep-for-session" in files:
            dirs[:] = []
            continue
        for name in files:
            path = os.path.join(folder, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if st.st_mtime >= since and (name.endswith(MODEL_SUFFIXES) or st.st_size > 16 << 20):
                with contextlib.suppress(OSError):
                    os.remove(path)


@pytest.fixture(scope="module", autouse=True)
def _reclaim_module_models(request, tmp_path_factory):
    since = time.time() - 1
    yield  # an autouse module fixture ends after the module's own fixtures (its stack is down by then)
    if request.module.__name__ not in _FAILED_MODULES:
        _reclaim_models(str(tmp_path_factory.getbasetemp()), since)


# ---- side by side (pytest-xdist) ---------------------------------------------------------------------------
# `make test` runs the suite in several worker processes (`-n`, Makefile: TEST_WORKERS): most tests wait on
# processes and services, and one at a time left the CPUs idle through those waits. A module whose tests share a
# module-scoped fixture (a stack, a trained model, a Redis, the compose project) is one unit, run on one worker in
# its own order (the scheduler below; xdist's own xdist_group marks no longer reach its scheduler under pytest 9);
# every other test is a unit of its own. Units are handed out in the order of LONG_FIRST, the longest first, so
# that no long one starts last and holds the session's end.
LONG_FIRST = ("test_compose_e2e", "test_chaos", "test_service", "test_losses", "test_train", "test_ascend",
              "test_verification", "test_fencing", "test_export", "test_hostile_files", "test_fast_path",
              "test_messages", "test_hostile_models", "test_scale")
# Modules that are one unit: a test run on another worker would set their module fixtures up a second time, and
# some of their tests build on the one before (the compose e2e's job). A module that shares a module-scoped fixture
# and is not named here fails collection, saying so; a Redis (redis_url) is cheap enough to start once per worker.
WHOLE_MODULES = {"test_compose_e2e", "test_service", "test_losses", "test_messages", "test_export",
                 "test_hostile_models", "test_hostile_packs", "test_hostile_input", "test_scale", "test_verification"}
CHEAP_MODULE_FIXTURES = {"redis_url"}


def _shares_module_fixture(item) -> str | None:
    for name, defs in item._fixtureinfo.name2fixturedefs.items():
        if defs and defs[-1].scope == "module" and not name.startswith("_") and name not in CHEAP_MODULE_FIXTURES:
            return name
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        shared = _shares_module_fixture(item)
        if shared and item.module.__name__ not in WHOLE_MODULES:
            raise pytest.UsageError(f"{item.nodeid}: its module shares the module-scoped fixture {shared!r}; add "
                                    f"{item.module.__name__!r} to WHOLE_MODULES in tests/conftest.py")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one process (TEST_WORKERS=0) keeps file order
        rank = {name: i for i, name in enumerate(LONG_FIRST)}
        items.sort(key=lambda it: rank.get(it.module.__name__, len(rank)))  # stable: a module keeps its own order


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") not in ("load", "loadscope"):  # --dist each, loadfile, ...: xdist's own
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WholeModules(LoadScopeScheduling):
        """LoadScopeScheduling whose unit is the module for WHOLE_MODULES and the test for the rest."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if os.path.splitext(os.path.basename(path))[0] in WHOLE_MODULES else nodeid

    return WholeModules(config, log)
