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

The file is written beside OUT and renamed into place once checked; a model that came from an MLflow run
(runs:/..., or a model file naming its run) gets it logged to that run under `export/`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile

import torch

from facenet.errors import UserError, first_line

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
            raise UserError(f"OUT {out}: name it .onnx or .pt2, or say --format onnx|pt2")
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose onnx or pt2")
    return fmt


def export(model_ref: str, out: str, fmt: str | None = None, opset: int = DEFAULT_OPSET,
           mlflow_uri: str | None = None, log: bool = True) -> dict:
    """Export MODEL to OUT; returns the summary `facenet-cli export --json` prints."""
    from facenet.evaluate import load_model, resolve_model

    fmt = format_for(out, fmt)
    if opset not in OPSETS:
        raise UserError(f"--opset {opset}: choose {OPSETS.start}..{OPSETS.stop - 1}")
    if model_ref.endswith(".onnx"):
        raise UserError(f"--model {model_ref}: already an ONNX model; export a model.pt, checkpoint or run")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UserError(f"OUT {out}: folder {parent} does not exist")
    if os.path.isdir(out):
        raise UserError(f"OUT {out}: is a folder; name the file to write")
    with tempfile.TemporaryDirectory(prefix="facenet-export-") as tmp:
        path, run_id = resolve_model(model_ref, mlflow_uri, tmp)
        loaded = load_model(path, run_id)
        net = loaded.model.eval()
        net.classify = False
        size = loaded.image_size
        meta = {"image_size": str(size), "classes": json.dumps(loaded.classes), "epoch": json.dumps(loaded.epoch),
                "mlflow_run_id": loaded.run_id or "", "source": os.path.basename(path),
                "torch": torch.__version__, **CONTRACT}
        example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        check = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
        partial = os.path.join(parent, f".{os.path.basename(out)}.partial-{os.getpid()}.{fmt}")  # torch wants .pt2
        try:
            if fmt == "onnx":
                checked_with = _write_onnx(net, example, partial, opset, meta)
            else:
                checked_with = _write_pt2(net, example, partial, meta)
            diff = _max_diff(net, check, partial, fmt)
            if not diff <= TOLERANCE:
                raise UserError(f"export {out}: {checked_with} gives embeddings {diff:.2e} away from PyTorch's "
                                f"(over {TOLERANCE}); nothing written")
            os.replace(partial, out)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
    summary = {"out": os.path.abspath(out), "format": fmt, "opset": opset if fmt == "onnx" else None,
               "bytes": os.path.getsize(out), "image_size": size, "dynamic_batch": [1, MAX_BATCH],
               **CONTRACT, "max_abs_diff": float(diff), "tolerance": TOLERANCE, "checked_with": checked_with,
               "source": path if not model_ref.startswith("runs:/") else model_ref, "mlflow_run_id": loaded.run_id}
    summary["logged_to_mlflow"], summary["mlflow_note"] = _log(out, loaded.run_id, mlflow_uri, log)
    return summary


def _write_onnx(net, example: torch.Tensor, path: str, opset: int, meta: dict) -> str:
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
    program.save(path, external_data=False)
    model = onnx.load(path)
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = "facenet." + key, value
    onnx.checker.check_model(model)
    onnx.save(model, path)
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)"


def _write_pt2(net, example: torch.Tensor, path: str, meta: dict) -> str:
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        program = torch.export.export(net, (example,), dynamic_shapes={"x": {0: batch}})
    except Exception as exc:  # torch.export's own errors, in one line
        raise UserError(f"pt2 export failed: {first_line(exc)}") from None
    torch.export.save(program, path, extra_files={"facenet.json": json.dumps(meta)})
    return f"torch.export.load (torch {torch.__version__})"


def _max_diff(net, x: torch.Tensor, path: str, fmt: str) -> float:
    from facenet.onnxrt import OnnxEmbedder

    other = OnnxEmbedder(path) if fmt == "onnx" else torch.export.load(path).module()
    with torch.inference_mode():
        return float((other(x) - net(x)).abs().max())


def _require_onnx():
    from facenet.onnxrt import require

    for module in ("onnxscript", "onnxruntime"):
        require(module, "export --format onnx")
    return require("onnx", "export --format onnx")


def _log(out: str, run_id: str | None, mlflow_uri: str | None, log: bool) -> tuple[str | None, str]:
    """Log OUT to the model's run under export/; (its artifact URI or None, what happened)."""
    if not run_id:
        return None, "not logged: the model names no MLflow run"
    if not log:
        return None, "not logged: --no-log"
    if not mlflow_uri:
        return None, f"not logged: no MLflow server configured for run {run_id} (--mlflow-uri)"
    try:
        from mlflow.tracking import MlflowClient

        from facenet.tracking import check_reachable

        check_reachable(mlflow_uri)
        MlflowClient(mlflow_uri).log_artifact(run_id, out, "export")
    except Exception as exc:  # the export stands; the log is reported, in one line
        return None, f"not logged to run {run_id}: {first_line(exc)}"
    uri = f"runs:/{run_id}/export/{os.path.basename(out)}"
    return uri, f"logged to {uri}"
