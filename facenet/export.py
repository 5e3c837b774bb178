"""`facenet-cli export MODEL OUT --format onnx|pt2`: a trained model as a file a serving stack takes.

What is exported is the embedding network that `embed` and `evaluate` run: InceptionResnetV1 in eval mode
without its classifier, float32 RGB crops NCHW standardised as (pixel - 127.5) / 128 in, unit-length 512-d
embeddings out, the batch dimension dynamic (1 to 65536) and the crop side fixed at the model's.

- onnx: torch.onnx's exporter (torch.export underneath), opset 18 by default (onnxruntime >= 1.14 and
  TensorRT >= 8.6 parse it), weights inside the one file, the contract and the model's classes, run and
  epoch in its metadata (`facenet.*`). Checked before it is kept: onnxruntime's outputs on a batch of three
  crops must match PyTorch's within 1e-4. Needs the `onnx` extra.
- pt2: a torch.export program (`torch.export.load(OUT).module()`), the same metadata as `facenet.json`
  inside the archive, checked the same way.

Nothing is written until the file is checked: it is made and checked in memory, then written to OUT through
facenet.fsutil.atomic_write (a hidden temp file beside OUT created with O_EXCL | O_NOFOLLOW, a planted link
removed and never followed, renamed into place), so a link planted under a predictable name cannot make it
write elsewhere, and OUT is our own file. An OUT that cannot be replaced (read-only, immutable, not a regular
file, in a folder we cannot write) is refused in one line before the export starts. The file is logged to an
MLflow run under `export/` only when the model was read from that run (runs:/...) or the user names it
(--run-id); a model file's own metadata naming a run is not enough (anyone can write a run id into a file).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import tempfile

import torch

from facenet.confine import shown
from facenet.errors import InputError, UserError, first_line, unwritable

FORMATS = ("onnx", "pt2")
DEFAULT_OPSET = 18
OPSETS = range(18, 24)
TOLERANCE = 1e-4
MAX_BATCH = 65536
CONTRACT = {"input": "float32 RGB crops [batch, 3, S, S], (pixel - 127.5) / 128",
            "output": "float32 unit-length embeddings [batch, 512]"}


def format_for(out: str, fmt: str | None) -> str:
    """--format, or the one OUT's suffix names."""
    if fmt is None:
        fmt = next((f for f in FORMATS if out.endswith("." + f)), None)
        if fmt is None:
            raise InputError(f"OUT {shown(out)}: name it .onnx or .pt2, or say --format onnx|pt2")
    if fmt not in FORMATS:
        raise InputError(f"--format {shown(fmt)}: choose onnx or pt2")
    return fmt


def export(model_ref: str, out: str, fmt: str | None = None, opset: int = DEFAULT_OPSET,
           mlflow_uri: str | None = None, log: bool = True, run_id: str | None = None) -> dict:
    """Export MODEL to OUT; returns the summary `facenet-cli export --json` prints. `run_id`: the run the user
    names (--run-id) to log the file to when the model was not read from one."""
    from facenet.evaluate import load_model, log_target, resolve_model, run_of

    fmt = format_for(out, fmt)
    if opset not in OPSETS:
        raise InputError(f"--opset {opset}: choose {OPSETS.start}..{OPSETS.stop - 1}")
    log_target(run_of(model_ref), run_id)  # a bad or contradicting --run-id before anything is read
    if model_ref.endswith(".onnx"):
        raise InputError(f"--model {shown(model_ref)}: already an ONNX model; export a model.pt, checkpoint or run")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise InputError(f"OUT {shown(out)}: folder {shown(parent)} does not exist")
    if os.path.isdir(out):
        raise InputError(f"OUT {shown(out)}: is a folder; name the file to write")
    check_replaceable(out)
    with tempfile.TemporaryDirectory(prefix="facenet-export-") as tmp:
        path, source_run = resolve_model(model_ref, mlflow_uri, tmp)
        loaded = load_model(path, log_target(source_run, run_id))
        net = loaded.model.eval()
        net.classify = False
        size = loaded.image_size
        meta = {"image_size": str(size), "classes": json.dumps(loaded.classes), "epoch": json.dumps(loaded.epoch),
                "mlflow_run_id": loaded.run_id or loaded.named_run_id or "", "source": os.path.basename(path),
                "torch": torch.__version__, **CONTRACT}
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        check = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
        if fmt == "onnx":
            data, checked_with = _onnx_bytes(net, example, opset, meta)
        else:
            data, checked_with = _pt2_bytes(net, example, meta)
        diff = _max_diff(net, check, data, fmt, out)
        if not diff <= TOLERANCE:
            raise UserError(f"export {out}: {checked_with} gives embeddings {diff:.2e} away from PyTorch's "
                            f"(over {TOLERANCE}); nothing written")
    _write(out, data)
    summary = {"out": os.path.abspath(out), "format": fmt, "opset": opset if fmt == "onnx" else None,
               "bytes": len(data), "image_size": size, "dynamic_batch": [1, MAX_BATCH],
               **CONTRACT, "max_abs_diff": float(diff), "tolerance": TOLERANCE, "checked_with": checked_with,
               "source": path if not model_ref.startswith("runs:/") else model_ref, "mlflow_run_id": loaded.run_id,
               "model_names_run": loaded.named_run_id}
    summary["logged_to_mlflow"], summary["mlflow_note"] = _log(out, data, loaded, mlflow_uri, log)
    return summary


def check_replaceable(out: str) -> None:
    """A one-line InputError, before any work, when OUT could not be replaced: an existing OUT that is not a
    regular file (a device, a FIFO), read-only (its mode says keep it) or immutable, or a folder we cannot
    create a file in. (A symlink OUT is replaced itself, never followed.)"""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISLNK(st.st_mode):
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"OUT {shown(out)}: exists and is not a regular file; name a new file")
        if not st.st_mode & 0o222:
            raise InputError(f"OUT {shown(out)}: exists and is read-only (mode {stat.S_IMODE(st.st_mode):04o}); "
                             "remove it or make it writable to replace it")
        try:  # chattr +i or +a: refused even to root; opened without truncating, nothing is changed
            os.close(os.open(out, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC))
        except OSError as exc:
            raise InputError(f"OUT {shown(out)}: cannot be replaced ({exc.strerror or exc})") from None
    folder = os.path.dirname(os.path.abspath(out))
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.probe-", dir=folder)
    except OSError as exc:
        raise InputError(f"OUT {shown(out)}: cannot write in its folder {shown(folder)} "
                         f"({exc.strerror or exc})") from None
    os.close(fd)
    os.remove(probe)


def _write(out: str, data: bytes) -> None:
    """`data` to OUT through one exclusive temp file renamed into place (fsutil.atomic_write); an OSError is
    one line naming OUT, and no temp file is left."""
    from facenet.fsutil import write_atomic

    try:
        write_atomic(out, data)
    except OSError as exc:
        raise unwritable(exc, out, "OUT") from None


def _onnx_bytes(net, example: torch.Tensor, opset: int, meta: dict) -> tuple[bytes, str]:
    """The model as one self-contained ONNX file's bytes (weights inside, metadata added, onnx's checker
    passed), and what will check it."""
    onnx = _require_onnx()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    chatter = io.StringIO()  # the exporter prints its progress; --json output stays JSON
    try:
        with contextlib.redirect_stdout(chatter):
            program = torch.onnx.export(net, (example,), None, dynamo=True, opset_version=opset,
                                        input_names=["crops"], output_names=["embedding"],
                                        dynamic_shapes={"x": {0: batch}}, verify=False, report=False)
    except Exception as exc:  # the exporter's own errors: say which step, in one line
        raise UserError(f"ONNX export failed: {first_line(exc)}") from None
    model = program.model_proto  # the initializers inside (ONNXProgram.save would go external past 2 GB)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = "facenet." + key, value
    onnx.checker.check_model(model)
    import onnxruntime

    return model.SerializeToString(), f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)"


def _pt2_bytes(net, example: torch.Tensor, meta: dict) -> tuple[bytes, str]:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        program = torch.export.export(net, (example,), dynamic_shapes={"x": {0: batch}})
    except Exception as exc:  # torch.export's own errors, in one line
        raise UserError(f"pt2 export failed: {first_line(exc)}") from None
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={"facenet.json": json.dumps(meta)})
    return buffer.getvalue(), f"torch.export.load (torch {torch.__version__})"


def _max_diff(net, x: torch.Tensor, data: bytes, fmt: str, out: str) -> float:
    """The largest difference between PyTorch's embeddings of `x` and those of the file's bytes, read back as
    a server would read them (for ONNX through facenet.onnxrt, external data refused as for any --model)."""
    from facenet.onnxrt import OnnxEmbedder

    if fmt == "onnx":
        other = OnnxEmbedder(out, data, "OUT")
    else:
        other = torch.export.load(io.BytesIO(data)).module()
    with torch.inference_mode():
        return float((other(x) - net(x)).abs().max())


def _require_onnx():
    from facenet.onnxrt import require

    for module in ("onnxscript", "onnxruntime"):
        require(module, "export --format onnx")
    return require("onnx", "export --format onnx")


def _log(out: str, data: bytes, loaded, mlflow_uri: str | None, log: bool) -> tuple[str | None, str]:
    """Log the exported bytes under export/ (named as OUT) to the run the model was read from or the user
    named; (its artifact URI or None, what happened). The bytes go from a private temp folder, not from OUT's
    path: in a folder others can write, OUT could be swapped for a link to another file after it was written."""
    from facenet.evaluate import not_logged_note

    run_id = loaded.run_id
    if not run_id:
        return None, not_logged_note(loaded) or "not logged: the model names no MLflow run"
    if not log:
        return None, "not logged: --no-log"
    if not mlflow_uri:
        return None, f"not logged: no MLflow server configured for run {run_id} (--mlflow-uri)"
    try:
        from mlflow.tracking import MlflowClient

        from facenet.tracking import check_reachable

        check_reachable(mlflow_uri)
        with tempfile.TemporaryDirectory(prefix="facenet-export-") as private:  # mode 0700, ours alone
            copy = os.path.join(private, os.path.basename(out))
            with open(copy, "xb") as fh:
                fh.write(data)
            MlflowClient(mlflow_uri).log_artifact(run_id, copy, "export")
    except Exception as exc:  # the export stands; the log is reported, in one line
        return None, f"not logged to run {run_id}: {first_line(exc)}"
    uri = f"runs:/{run_id}/export/{os.path.basename(out)}"
    return uri, f"logged to {uri}"
