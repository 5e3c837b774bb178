"""Hostile values on the command line and in spec files: one line naming the value, exit status 2, and
nothing queued. Redis here is a closed port, so a command that got as far as queueing would fail with
another message (exit 1): every refusal below happens before the queue is touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from facenet.fsutil import free_port

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("roots")
    (root / "data").mkdir()
    (root / "with space é").mkdir()
    os.symlink("/etc", root / "escape")
    return {**os.environ, "FACENET_DATA_ROOTS": str(root), "FACENET_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "FACENET_STATE_DIR": str(root / "state"), "ROOT": str(root)}


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def refused(proc, needle: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], (needle, lines[0])


CASES = [
    (["--epochs", "0"], "--epochs 0"), (["--epochs", "-5"], "--epochs -5"), (["--epochs", "1e9"], "1e9"),
    (["--epochs", "10000000"], "--epochs 10000000"), (["--lr", "nan"], "--lr nan"), (["--lr", "-1"], "--lr -1"),
    (["--lr", "1e400"], "--lr inf"), (["--batch-size", "0"], "--batch-size 0"),
    (["--batch-size", "99999999999"], "--batch-size 99999999999"), (["--workers", "4096"], "--workers 4096"),
    (["--image-size", "60000"], "--image-size 60000"), (["--holdout", "nan"], "--holdout nan"),
    (["--npus", "0"], "--npus 0"), (["--npus", "3", "--device-type", "npu", "--batch-size", "64"], "--batch-size 64"),
    (["--npus", "18", "--nnodes", "2", "--device-type", "npu", "--batch-size", "72"], "1 to 8 NPUs on each"),
    (["--no-such-option", "1"], "--no-such-option"), (["--tag", "job_id=mine"], "--tag job_id"),
    (["--tag", "mlflow.user=x"], "--tag mlflow.user"), (["--shard-size", "-3"], "--shard-size -3"),
    (["--detect-size", "100000"], "--detect-size 100000"), (["--output", "/tmp/x"], "--output"),
]


@pytest.mark.parametrize("args,needle", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_values_are_refused_before_anything_is_queued(env, args, needle):
    refused(cli(env, "submit-train", "--data", os.path.join(env["ROOT"], "data"), *args), needle)


@pytest.mark.parametrize("path", ["/etc", "{root}/../../etc", "{root}/escape", "{root}/escape/passwd",
                                  "/tmp/with space/é", "/nope/line\nbreak", "{root}/data/../../.."])
def test_paths_outside_the_roots_are_refused(env, path):
    path = path.format(root=env["ROOT"])
    proc = cli(env, "submit-train", "--data", path)
    refused(proc, "outside the data roots")
    proc = cli(env, "submit-train", "--data", os.path.join(env["ROOT"], "data"), "--preprocess-from", path)
    refused(proc, "--preprocess-from")
    refused(cli(env, "submit-preprocess", path, os.path.join(env["ROOT"], "out")), "RAW")
    refused(cli(env, "submit-train", "--data", os.path.join(env["ROOT"], "data"), "--pretrained",
                path + "/w.pt"), "--pretrained")


def test_names_with_spaces_and_unicode_inside_a_root_are_accepted(env):
    proc = cli(env, "submit-train", "--data", os.path.join(env["ROOT"], "with space é"))
    assert proc.returncode == 1 and "Redis at" in proc.stderr  # got past every check, to the (closed) queue


def test_empty_data_roots_refuse_everything(env):
    proc = cli({**env, "FACENET_DATA_ROOTS": ""}, "submit-train", "--data", os.path.join(env["ROOT"], "data"))
    refused(proc, "no data roots are configured")


def test_a_spec_file_that_is_not_json_or_has_wrong_types(env, tmp_path):
    cases = {"not json {": "not valid JSON", "[1, 2]": "must be a JSON object",
             json.dumps({"data": "/x", "epochs": "ten"}): "'epochs': 'ten' is not an integer",
             json.dumps({"data": "/x", "lr": "fast"}): "'lr': 'fast' is not a number",
             json.dumps({"data": "/x", "bogus": 1}): "unknown training option(s): bogus",
             json.dumps({"data": "/x", "npus": True}): "'npus': True is not an integer"}
    for text, needle in cases.items():
        spec = tmp_path / "spec.json"
        spec.write_text(text)
        proc = subprocess.run([sys.executable, "-m", "facenet.train", "--spec", str(spec)], capture_output=True,
                              text=True, timeout=120, env=env)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, (text, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
