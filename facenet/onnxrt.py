"""An exported ONNX model (`facenet-cli export --format onnx`) as a `--model` for `embed` and `evaluate`.

The model takes what our evaluation feeds InceptionResnetV1: float32 RGB crops, NCHW, standardised as
(pixel - 127.5) / 128 (facenet-pytorch's `fixed_image_standardization`), any batch size, and gives float32
unit-length 512-d embeddings. `export` writes that contract into the file's metadata (`facenet.*` keys);
a file without them is still used when its one input is [batch, 3, S, S] float and its one output
[batch, 512] float.

The file is read once, by us, as a regular file of at most MAX_BYTES; a tensor anywhere in it (an initializer,
a sparse one, a node attribute, a subgraph, a function) whose data lies in another file is refused before
onnxruntime sees it, and onnxruntime is given the bytes we checked, never the path. (Measured here: onnxruntime
1.20.1 and 1.23.2 read whatever path a file names, ../, absolute or through a symlink, and 1.23.2 crashes on
the `*/_ORT_MEM_ADDR_/*` tag; 1.24.1, the `onnx` extra's floor, refuses those (microsoft/onnxruntime#26776)
but 1.32.0 still reads a hard link beside the model.) The declared crop side is held to --image-size's bounds
and every output batch to [batch, 512] float32, whatever the file declares.

onnx and onnxruntime are the optional `onnx` extra (about 120 MB installed): everything else runs without
them, and a command that needs them says so in one line.
"""

from __future__ import annotations

import importlib
import json
import os
import re

import numpy as np
import torch

from facenet import confine
from facenet.errors import InputError, UserError, first_line
from facenet.spec import BOUNDS

EXTRA = "onnx"
META_PREFIX = "facenet."
EMBEDDING_DIM = 512
# protobuf cannot hold a model over 2 GiB in one file, and ours is ~90 MB: the same cap as a model.pt.
MAX_BYTES = 2 << 30
# A model's crop side is what every image is resized to (3 x S x S float32 each, a batch at once): the bounds
# of --image-size (facenet/spec.py), so a model file cannot ask for what the flag may not (16384 px: 3 GiB
# an image).
IMAGE_SIZES = BOUNDS["image_size"]


def require(module: str, what: str):
    """`module` imported, or a one-line UserError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the '{EXTRA}' extra ({module} is not installed): "
                        f"pip install 'facenet-stack[{EXTRA}]'") from None


def read_model(path: str, what: str = "--model") -> bytes:
    """The bytes of ONNX file `path` (a link the user made is followed; a FIFO or device is refused, not read),
    checked by `check_self_contained`; UserError in one line naming the file otherwise."""
    where = f"{what} {confine.shown(path)}"
    require("onnx", where)
    try:
        with os.fdopen(confine.open_regular(os.path.realpath(path), None, what), "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_BYTES:
                raise InputError(f"{where}: {size >> 20} MiB, more than an ONNX file holds ({MAX_BYTES >> 20} MiB)")
            data = fh.read(size + 1)  # what it holds now (read(MAX_BYTES) would reserve 2 GiB first)
    except OSError as exc:
        raise InputError(f"{where}: {exc.strerror or exc}") from None
    if len(data) > size:
        raise InputError(f"{where}: grew while it was read; read it when it is written")
    check_self_contained(data, where)
    return data


def check_self_contained(data: bytes, where: str) -> None:
    """InputError (`where`: the flag and file) unless `data` parses as an ONNX model holding all its tensors."""
    onnx = require("onnx", where)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError, or its recursion limit on a deep nesting
        raise InputError(f"{where}: not a readable ONNX model ({first_line(exc)})") from None
    external = external_tensor(model)
    if external is not None:
        raise InputError(f"{where}: tensor {external} keeps its data in another file; only self-contained "
                         "models are read (export writes one)")


def external_tensor(message) -> str | None:
    """The name and location of the first tensor anywhere in an ONNX message (graphs, subgraphs, node
    attributes, sparse tensors, functions, training info) whose data lies outside the file, or None.
    Every message field is walked, so a tensor in a place this code never heard of is found too."""
    from onnx import TensorProto

    stack = [message]
    while stack:
        msg = stack.pop()
        if isinstance(msg, TensorProto) and (msg.data_location == TensorProto.EXTERNAL or len(msg.external_data)):
            where = next((e.value for e in msg.external_data if e.key == "location"), "")
            return f"{msg.name[:80]!r} (location {where[:200]!r})"
        for field, value in msg.ListFields():
            if field.type != field.TYPE_MESSAGE:
                continue
            if hasattr(value, "ListFields"):  # one message
                stack.append(value)
            else:  # a repeated field of them
                stack.extend(value)
    return None


class OnnxEmbedder(torch.nn.Module):
    """An onnxruntime session behind the interface `embed_paths` uses: `classify` (always False), eval/train
    (no-ops), and `__call__(x)` -> embeddings on x's device. The session runs on onnxruntime's CPU provider
    (the batch is copied there and back whatever --device is). `data`: the file's bytes when they are at hand
    (export checks what it is about to write); checked the same way."""

    classify = False

    def __init__(self, path: str, data: bytes | None = None, what: str = "--model"):
        super().__init__()
        where = f"{what} {confine.shown(path)}"
        ort = require("onnxruntime", where)
        if data is None:
            data = read_model(path, what)
        else:
            check_self_contained(data, where)
        try:
            options = ort.SessionOptions()
            # Bytes are parsed as ONNX only: onnxruntime also runs its own ORT (flatbuffer) format from bytes,
            # which the external-data check above does not read (onnxruntime's session_options_config_keys.h).
            options.add_session_config_entry("session.load_model_format", "ONNX")
            self.session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own classes for a corrupt or foreign file
            raise InputError(f"{where}: not a readable ONNX model ({first_line(exc)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise InputError(f"{where}: an embedding model has one input and one output; this one has "
                             f"{len(inputs)} and {len(outputs)}")
        shape, out_shape = inputs[0].shape, outputs[0].shape
        if inputs[0].type != "tensor(float)" or outputs[0].type != "tensor(float)" or len(shape) != 4 \
                or shape[1] != 3 or not isinstance(shape[2], int) or shape[2] != shape[3] or len(out_shape) != 2 \
                or out_shape[1] != EMBEDDING_DIM:
            raise InputError(f"{where}: not a face embedding model (input {inputs[0].type} {shape}, output "
                             f"{outputs[0].type} {out_shape}; expected float [batch, 3, S, S] -> [batch, 512])")
        lo, hi = IMAGE_SIZES
        if not lo <= shape[2] <= hi:
            raise InputError(f"{where}: its input is {shape[2]} x {shape[2]} px; a crop side must be in {lo}..{hi} "
                             "(the bounds of --image-size)")
        self.where, self.input_name, self.image_size = where, inputs[0].name, int(shape[2])
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().float().cpu().numpy())
        try:
            (out,) = self.session.run(None, {self.input_name: batch})
        except Exception as exc:  # onnxruntime's own classes: a fixed batch size, an operator failing at run time
            raise InputError(f"{self.where}: onnxruntime failed on a batch of {len(batch)} ({first_line(exc)})") \
                from None
        # What the file declares is not what it must give: the output is checked on every batch.
        if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (len(batch), EMBEDDING_DIM):
            raise InputError(f"{self.where}: gave {getattr(out, 'dtype', type(out).__name__)} "
                             f"{tuple(getattr(out, 'shape', ()))} for a batch of {len(batch)} crops; an embedding "
                             f"model gives float32 ({len(batch)}, {EMBEDDING_DIM})")
        return torch.from_numpy(out).to(x.device)


def load_onnx(path: str) -> tuple[OnnxEmbedder, dict]:
    """(the embedder, what its metadata says: image_size, classes, mlflow_run_id, epoch)."""
    net = OnnxEmbedder(path)
    meta = {k[len(META_PREFIX):]: v for k, v in net.metadata.items() if k.startswith(META_PREFIX)}
    try:
        classes = json.loads(meta.get("classes", "[]"))
        epoch = json.loads(meta.get("epoch", "null"))
    except ValueError:
        raise InputError(f"{net.where}: its facenet.classes / facenet.epoch metadata is not JSON") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) \
            or not (epoch is None or (isinstance(epoch, int) and not isinstance(epoch, bool))):
        raise InputError(f"{net.where}: its facenet.classes must be a list of names and facenet.epoch a number")
    run_id = meta.get("mlflow_run_id") or None
    if run_id is not None and not re.fullmatch(r"[0-9a-f]{32}", run_id):
        raise InputError(f"{net.where}: its facenet.mlflow_run_id {run_id[:40]!r} is not an MLflow run id")
    return net, {"image_size": net.image_size, "classes": classes, "mlflow_run_id": run_id, "epoch": epoch}
