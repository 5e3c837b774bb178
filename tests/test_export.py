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


def cli(*args: str, prelude: str = "pass") -> subprocess.CompletedProcess:
    code = f"import sys; {prelude}; from services.cli import main; sys.argv = ['facenet-cli', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def refused(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode in (1, 2), (res.returncode, res.stdout, res.stderr[-2000:])
    assert "Traceback" not in res.stderr and len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1, res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("model") / "model.pt")
    torch.save({"model": InceptionResnetV1(classify=True, num_classes=4).state_dict(), "classes": list("abcd"),
                "spec": {"image_size": 96}, "epoch": 1, "mlflow_run_id": None}, path)
    return path


def test_export_refuses_bad_requests_in_one_line(model_file, tmp_path):
    refused(cli("export", model_file, str(tmp_path / "face.bin")), "face.bin", "name it .onnx or .pt2")
    refused(cli("export", model_file, str(tmp_path / "no" / "face.onnx")), "does not exist")
    refused(cli("export", model_file, str(tmp_path / "face.onnx"), "--opset", "9"), "--opset 9", "18..23")
    refused(cli("export", str(tmp_path / "missing.pt"), str(tmp_path / "face.onnx")), "missing.pt", "no such file")
    # Without the extra: one line naming it, and no file.
    refused(cli("export", model_file, str(tmp_path / "face.onnx"), prelude="sys.modules['onnxruntime'] = None"),
            "needs the 'onnx' extra", "pip install 'facenet-stack[onnx]'")
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
    refused(cli("embed", "--model", str(wrong), str(tmp_path / "crops"), str(tmp_path / "e.npz"), "--device", "cpu"),
            "identity.onnx", "not a face embedding model")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(os.urandom(4096))
    refused(cli("embed", "--model", str(garbage), str(tmp_path / "crops"), str(tmp_path / "e.npz"), "--device", "cpu"),
            "garbage.onnx", "not a readable ONNX model")
    refused(cli("embed", "--model", str(garbage), str(tmp_path / "crops"), str(tmp_path / "e.npz"), "--device", "cpu",
                prelude="sys.modules['onnxruntime'] = None"), "needs the 'onnx' extra")
    assert not (tmp_path / "e.npz").exists()


def test_pt2_export_loads_back_with_a_dynamic_batch(model_file, tmp_path):
    import json

    res = cli("export", model_file, str(tmp_path / "face.pt2"), "--json", "--no-log")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["format"] == "pt2" and summary["image_size"] == 96 and summary["max_abs_diff"] <= 1e-4
    assert summary["mlflow_note"] == "not logged: the model names no MLflow run"
    program = torch.export.load(str(tmp_path / "face.pt2")).module()
    for n in (1, 5):
        out = program(torch.randn(n, 3, 96, 96))
        assert out.shape == (n, 512) and torch.allclose(out.norm(dim=1), torch.ones(n), atol=1e-4)
    assert sorted(os.listdir(tmp_path)) == ["face.pt2"]  # no partial file left beside it
