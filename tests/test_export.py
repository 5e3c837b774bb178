"""`facenet-cli export` and ONNX files as --model, on what is refused: each in one line, naming the file or
value, and nothing half-written left behind. (The export of a trained model, checked against PyTorch on real
crops and served by embed and evaluate, is in test_losses: it reuses that module's trained runs.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from test_hostile_models import cli_many, refusal


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("model") / "model.pt")
    torch.save({"model": InceptionResnetV1(classify=True, num_classes=4).state_dict(), "classes": list("abcd"),
                "spec": {"image_size": 96}, "epoch": 1, "mlflow_run_id": None}, path)
    return path


def test_export_refuses_bad_requests_in_one_line(model_file, tmp_path):
    r = cli_many(["export", model_file, tmp_path / "face.bin"], ["export", model_file, tmp_path / "no" / "face.onnx"],
                 ["export", model_file, tmp_path / "face.onnx", "--opset", "9"],
                 ["export", tmp_path / "missing.pt", tmp_path / "face.onnx"])
    assert [refusal(r[0], "face.bin", "name it .onnx or .pt2"), refusal(r[1], "does not exist"),
            refusal(r[2], "--opset 9", "18..23"), refusal(r[3], "missing.pt", "no such file")] == [None] * 4, r
    # Without the extra: one line naming it (exit 1: the host lacks it, the request is fine), and no file.
    (without,) = cli_many(["export", model_file, tmp_path / "face.onnx"], prelude="sys.modules['onnxruntime'] = None")
    assert refusal(without, "needs the 'onnx' extra", "pip install 'facenet-stack[onnx]'", code=1) is None, without
    assert os.listdir(tmp_path) == []


def test_an_onnx_file_that_is_not_a_face_embedder_is_refused_as_a_model(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path / "crops" / "someone"
    folder.mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (64, 64), (90, 120, 150)).save(folder / "a.jpg")
    wrong = tmp_path / "identity.onnx"  # a valid ONNX model, but [1, 3] -> [1, 3]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph), wrong)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(os.urandom(4096))
    def embed(model):
        return ["embed", "--model", model, tmp_path / "crops", tmp_path / "e.npz", "--device", "cpu"]

    r = cli_many(embed(wrong), embed(garbage))
    assert [refusal(r[0], "identity.onnx", "not a face embedding model"),
            refusal(r[1], "garbage.onnx", "not a readable ONNX model")] == [None, None], r
    (without,) = cli_many(embed(garbage), prelude="sys.modules['onnxruntime'] = None")
    assert refusal(without, "needs the 'onnx' extra", code=1) is None, without
    assert not (tmp_path / "e.npz").exists()


# Runs `python ARGS...` once told to, in this same process (exec keeps the pid): the test knows the pid the
# export will have before it starts, as another user watching /proc would.
EXEC_WHEN_TOLD = "import os, sys; sys.stdin.read(1); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"


def test_pt2_export_writes_its_own_file_past_planted_links_and_logs_into_no_run_the_file_names(
        model_file, mlflow_server, tmp_path):
    """Another user plants links for the pid export will have, under its old temp name
    (`.face.pt2.partial-<pid>.pt2`) and atomic_write's (`.face.pt2.tmp-<pid>`), to a file of ours; the model
    file names an MLflow run it did not come from. The export writes its own file, leaves ours alone, logs
    nothing into that run (it says so), and the file loads back with a dynamic batch."""
    import json

    client = mlflow_server.client()
    run = client.create_run(client.create_experiment("export-foreign-model")).info.run_id
    foreign = tmp_path / "foreign.pt"
    torch.save({**torch.load(model_file, weights_only=True), "mlflow_run_id": run}, foreign)
    shared, victim = tmp_path / "shared", tmp_path / "victim.conf"
    shared.mkdir()
    victim.write_bytes(b"root's own file\n")
    out = shared / "face.pt2"
    proc = subprocess.Popen([sys.executable, "-c", EXEC_WHEN_TOLD, "-m", "services.cli", "export", str(foreign),
                             str(out), "--json", "--mlflow-uri", mlflow_server.uri], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    planted = [f".face.pt2.partial-{proc.pid}.pt2", f".face.pt2.tmp-{proc.pid}"]
    for name in planted:
        os.symlink(victim, shared / name)
    stdout, stderr = proc.communicate("go", timeout=300)
    problems = []
    if victim.read_bytes() != b"root's own file\n":
        problems.append(f"the linked file was overwritten ({victim.stat().st_size} bytes now)")
    if out.is_symlink():
        problems.append(f"OUT is the planted link to {os.readlink(out)}")
    logged = [a.path for a in client.list_artifacts(run, "export")]
    if logged:
        problems.append(f"logged into the run the file names: {logged}")
    if proc.returncode != 0:
        problems.append(f"exit {proc.returncode}: {stderr[-1500:]}")
    assert problems == [], problems
    summary = json.loads(stdout)
    assert summary["format"] == "pt2" and summary["image_size"] == 96 and summary["max_abs_diff"] <= 1e-4
    assert summary["mlflow_run_id"] is None and summary["model_names_run"] == run
    assert summary["mlflow_note"].startswith(f"not logged: the model file names MLflow run {run} but was not read")
    program = torch.export.load(str(out)).module()
    for n in (1, 5):
        got = program(torch.randn(n, 3, 96, 96))
        assert got.shape == (n, 512) and torch.allclose(got.norm(dim=1), torch.ones(n), atol=1e-4)
    # Our temp file had a name of its own (a random part no one can plant for); the planted links are left
    # as they were, unfollowed.
    assert sorted(os.listdir(shared)) == sorted(["face.pt2", *planted])
    assert all(os.readlink(shared / name) == str(victim) for name in planted)
