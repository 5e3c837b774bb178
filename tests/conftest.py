"""Shared fixtures: real face photos, a real MLflow server process, helpers to run the trainer.

The sample set (8 real people x 40 loosely cropped photos, MTCNN-cropped) is
built once per machine into the cache (FACENET_CACHE, default
~/.cache/facenet-stack) from photos that scikit-image / insightface wheels
ship; tests copy what they need into their own tmp dirs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from facenet.samples import copy_subset
from facenet.fsutil import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_VERSION = "v2"


@pytest.fixture(scope="session")
def sample_root() -> str:
    """ROOT with raw/<identity>/*.jpg and prep/ (our preprocessing of it), cached per machine."""
    from facenet.samples import build_sample_dataset, cache_dir

    root = os.path.join(cache_dir(), "test-data", SAMPLE_VERSION)
    done = os.path.join(root, ".complete")
    if not os.path.exists(done):
        build_sample_dataset(root, per_identity=40, identities=8, seed=0)
        open(done, "w").close()
    return root


@pytest.fixture(scope="session")
def orl_faces() -> str:
    """The AT&T (ORL) faces, 40 real people x 10 distinct photos, preprocessed at 96 px: train/ holds 30
    people (train_list.txt, test_list.txt), test/ 10 others and test_pairs.txt pairs them. Cached per
    machine."""
    from facenet.samples import build_orl_dataset, cache_dir

    root = os.path.join(cache_dir(), "test-data", "orl-v1")
    done = os.path.join(root, ".complete")
    if not os.path.exists(done):
        build_orl_dataset(root, train_people=30, image_size=96)
        open(done, "w").close()
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


# Tests train at 96 px unless they say otherwise: a third of the compute of 160 px crops (the model pools
# adaptively), which keeps the suite inside CI's time on 2 cores without AVX-512 (3.4 s vs 1.1 s a step).
TEST_IMAGE_SIZE = ["--image-size", "96"]


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

    data = tmp_path_factory.mktemp("redis")
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
