"""An exported ONNX model (`facenet-cli export --format onnx`) as a `--model` for `embed` and `evaluate`.

The model takes what our evaluation feeds InceptionResnetV1: float32 RGB crops, NCHW, standardised as
(pixel - 127.5) / 128 (facenet-pytorch's `fixed_image_standardization`), any batch size, and gives float32
unit-length 512-d embeddings. `export` writes that contract into the file's metadata (`facenet.*` keys);
a file without them is still used when its one input is [batch, 3, S, S] float and its one output
[batch, 512].

onnx and onnxruntime are the optional `onnx` extra (about 120 MB installed): everything else runs without
them, and a command that needs them says so in one line.
"""

from __future__ import annotations

import importlib
import json
import re

import numpy as np
import torch

from facenet.errors import UserError, first_line

EXTRA = "onnx"
META_PREFIX = "facenet."


def require(module: str, what: str):
    """`module` imported, or a one-line UserError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the '{EXTRA}' extra ({module} is not installed): "
                        f"pip install 'facenet-stack[{EXTRA}]'") from None


class OnnxEmbedder(torch.nn.Module):
    """An onnxruntime session behind the interface `embed_paths` uses: `classify` (always False), eval/train
    (no-ops), and `__call__(x)` -> embeddings on x's device. The session runs on onnxruntime's CPU provider
    (the batch is copied there and back whatever --device is)."""

    classify = False

    def __init__(self, path: str):
        super().__init__()
        ort = require("onnxruntime", f"--model {path}")
        try:
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own classes for a corrupt or foreign file
            raise UserError(f"--model {path}: not a readable ONNX model ({first_line(exc)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise UserError(f"--model {path}: an embedding model has one input and one output; this one has "
                            f"{len(inputs)} and {len(outputs)}")
        shape, out_shape = inputs[0].shape, outputs[0].shape
        if inputs[0].type != "tensor(float)" or len(shape) != 4 or shape[1] != 3 or not isinstance(shape[2], int) \
                or shape[2] != shape[3] or len(out_shape) != 2 or out_shape[1] != 512:
            raise UserError(f"--model {path}: not a face embedding model (input {inputs[0].type} {shape}, output "
                            f"{out_shape}; expected float [batch, 3, S, S] -> [batch, 512])")
        self.input_name, self.image_size = inputs[0].name, int(shape[2])
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().float().cpu().numpy())
        (out,) = self.session.run(None, {self.input_name: batch})
        return torch.from_numpy(out).to(x.device)


def load_onnx(path: str) -> tuple[OnnxEmbedder, dict]:
    """(the embedder, what its metadata says: image_size, classes, mlflow_run_id, epoch)."""
    net = OnnxEmbedder(path)
    meta = {k[len(META_PREFIX):]: v for k, v in net.metadata.items() if k.startswith(META_PREFIX)}
    try:
        classes = json.loads(meta.get("classes", "[]"))
        epoch = json.loads(meta.get("epoch", "null"))
    except ValueError:
        raise UserError(f"--model {path}: its facenet.classes / facenet.epoch metadata is not JSON") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) \
            or not (epoch is None or isinstance(epoch, int)):
        raise UserError(f"--model {path}: its facenet.classes must be a list of names and facenet.epoch a number")
    run_id = meta.get("mlflow_run_id") or None
    if run_id is not None and not re.fullmatch(r"[0-9a-f]{32}", run_id):
        raise UserError(f"--model {path}: its facenet.mlflow_run_id {run_id[:40]!r} is not an MLflow run id")
    return net, {"image_size": net.image_size, "classes": classes, "mlflow_run_id": run_id, "epoch": epoch}
