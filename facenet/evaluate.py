"""Verification of a trained model by the LFW protocol: `facenet-cli evaluate` and training's per-epoch check.

MODEL is one of our model files (`OUTPUT/model.pt`) or checkpoints (`OUTPUT/checkpoint.pt`), an exported
ONNX model (`facenet-cli export`; the `onnx` extra runs it), a training output folder (its model.pt, else its
checkpoint), or an MLflow model URI `runs:/<run id>/model` (the run's
`final/model.pt` artifact, else its checkpoint). The report says where the pairs came from and how many of
their people the model was trained on. Its metrics (`eval_*`), a ROC curve PNG and the report JSON are logged
to a run only when the model was read from that run's artifacts (`runs:/<run id>/...`) or the user names the
run (`--run-id`): the run a model file's own metadata names is shown, never logged into (anyone can write
any run id into a file).

What a model file declares is checked before it is used: its crop side against --image-size's bounds, its
weights for NaN and inf, and the embeddings it gives for NaN and inf (one line naming the file, never a
silently wrong accuracy).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from facenet import weights
from facenet.confine import shown
from facenet.errors import InputError, UserError, first_line
from facenet.spec import BOUNDS, MIN_IMAGE_SIZE
from facenet.verification import metrics as vm
from facenet.verification.embed import distances, embed_paths
from facenet.verification.binset import set_name
from facenet.verification.pairs import DEFAULT_FOLDS, PairSet, find_pairs

FAR_TARGET = 1e-3
RUN_ID = re.compile(r"[0-9a-f]{32}")
RUNS_URI = re.compile(r"runs:/([0-9a-f]{32})(/.*)?")
# The crop side an InceptionResnetV1 model file's spec may declare: from the smallest input the network takes
# to --image-size's cap (facenet/spec.py), since every image is resized to it (16384 px: 3 GiB an image).
IMAGE_SIZES = (MIN_IMAGE_SIZE, BOUNDS["image_size"][1])


@dataclass
class LoadedModel:
    model: torch.nn.Module
    path: str
    image_size: int
    classes: list[str]  # the identities it was trained on (empty when the file does not say)
    run_id: str | None  # the run it was read from (runs:/...) or the user named (--run-id): results go there
    epoch: int | None
    named_run_id: str | None = None  # the run the file's own metadata names: shown, never logged into


def run_of(model_ref: str) -> str | None:
    """The run a `runs:/<run id>/...` MODEL is read from (None for a file)."""
    m = RUNS_URI.fullmatch(model_ref)
    return m.group(1) if m else None


def check_run_id(run_id: str | None, flag: str = "--run-id") -> str | None:
    """`run_id` as given (None stays None), or a one-line InputError when it is not an MLflow run id."""
    if run_id is not None and not RUN_ID.fullmatch(run_id):
        raise InputError(f"{flag} {shown(run_id[:80])}: not an MLflow run id (32 hex digits)")
    return run_id


def log_target(source_run: str | None, named_run: str | None) -> str | None:
    """The run results may be logged to: the run the model was read from, else the run the user named
    (`named_run`, --run-id, checked); InputError when they differ."""
    check_run_id(named_run)
    if source_run and named_run and source_run != named_run:
        raise InputError(f"--run-id {named_run}: the model was read from run {source_run}; name that run or none")
    return source_run or named_run


def not_logged_note(loaded: LoadedModel) -> str | None:
    """What to say when a model file names a run it was not read from (None when it names none)."""
    if loaded.run_id or not loaded.named_run_id:
        return None
    return (f"not logged: the model file names MLflow run {loaded.named_run_id} but was not read from it "
            f"(--model runs:/{loaded.named_run_id}/model, or --run-id {loaded.named_run_id}, logs there)")


# ---- the model ---------------------------------------------------------------------------------------------
def resolve_model(ref: str, mlflow_uri: str | None, workdir: str) -> tuple[str, str | None]:
    """(model file, MLflow run id it came from or None) for MODEL (see the module docstring)."""
    m = RUNS_URI.fullmatch(ref)
    if m:
        return _download_from_run(m.group(1), mlflow_uri, workdir), m.group(1)
    if ref.startswith(("runs:", "models:", "mlflow-artifacts:")):
        raise InputError(f"--model {shown(ref)}: only runs:/<32-hex run id>/model MLflow URIs are understood")
    if os.path.isdir(ref):
        for name in ("model.pt", "checkpoint.pt"):
            if os.path.isfile(os.path.join(ref, name)):
                return os.path.join(ref, name), None
        raise InputError(f"--model {shown(ref)}: no model.pt or checkpoint.pt in this folder (is it a training "
                         "output?)")
    if not os.path.exists(ref):
        raise InputError(f"--model {shown(ref)}: no such file or folder")
    return ref, None


def _download_from_run(run_id: str, mlflow_uri: str | None, workdir: str) -> str:
    if not mlflow_uri:
        raise UserError(f"--model runs:/{run_id}: no MLflow server configured (--mlflow-uri, FACENET_MLFLOW_URI "
                        "or a local stack)")
    from mlflow.tracking import MlflowClient

    from facenet.tracking import check_reachable

    check_reachable(mlflow_uri)
    client = MlflowClient(mlflow_uri)
    try:
        client.get_run(run_id)
    except Exception as exc:
        raise UserError(f"--model runs:/{run_id}: no such run at {mlflow_uri} ({first_line(exc)})") from None
    for artifact in ("final/model.pt", "checkpoints/checkpoint.pt"):
        try:
            return client.download_artifacts(run_id, artifact, workdir)
        except Exception:
            continue
    raise UserError(f"--model runs:/{run_id}: the run has no final/model.pt or checkpoints/checkpoint.pt artifact "
                    "(did it finish, or log checkpoints?)")


def load_model(path: str, run_id: str | None = None) -> LoadedModel:
    """Build InceptionResnetV1's embedding network from one of our model files or checkpoints (tensors only: no
    pickle), or open an exported ONNX model (`.onnx`, facenet.onnxrt) behind the same interface. `run_id`: the
    run it was read from, or the user named; the run the file names goes to `named_run_id`."""
    if path.endswith(".onnx"):
        from facenet.onnxrt import load_onnx

        net, meta = load_onnx(path)
        return LoadedModel(net, path, meta["image_size"], meta["classes"], run_id, meta["epoch"], meta["mlflow_run_id"])
    where = f"--model {shown(path)}"
    obj = weights.load(path, None, "--model")
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise InputError(f"{where}: not a facenet model or checkpoint (no 'model' state dict)")
    state = {re.sub(r"^(module\.|_orig_mod\.)+", "", str(k)): v for k, v in obj["model"].items()}
    if "logits.weight" not in state:
        raise InputError(f"{where}: not InceptionResnetV1 weights (no logits.weight)")
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    image_size, classes, epoch, named = (spec.get("image_size", 160), obj.get("classes") or [],
                                         obj.get("epoch", spec.get("epochs")), obj.get("mlflow_run_id"))
    lo, hi = IMAGE_SIZES
    if not _is_int(image_size) or not lo <= image_size <= hi:
        raise InputError(f"{where}: its spec's image_size {shown(str(image_size)[:40])} is not a crop side in "
                         f"{lo}..{hi} (the bounds of --image-size)")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise InputError(f"{where}: its classes are not a list of names")
    if not (epoch is None or _is_int(epoch)):
        raise InputError(f"{where}: its epoch {shown(str(epoch)[:40])} is not a number")
    if not (named is None or (isinstance(named, str) and RUN_ID.fullmatch(named))):
        raise InputError(f"{where}: its mlflow_run_id {shown(str(named)[:40])} is not an MLflow run id")
    # The classifier is not what is evaluated or exported, and its size is whatever the file says (a
    # stride-0 tensor of 2^40 rows is 94 MB on disk): it is left out, the embedding network built alone.
    state = {k: v for k, v in state.items() if not k.startswith("logits.")}
    from facenet_pytorch import InceptionResnetV1

    model = InceptionResnetV1(classify=False)
    try:
        model.load_state_dict(state)  # shapes checked here, before any is computed on
    except RuntimeError as exc:
        raise InputError(f"{where}: not InceptionResnetV1 weights ({first_line(exc)})") from None
    bad = next((k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())),
               None)
    if bad is not None:
        raise InputError(f"{where}: its weight {shown(bad)} holds NaN or inf (did the training diverge?)")
    return LoadedModel(model, path, image_size, classes, run_id, epoch, named)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_finite(embeddings: np.ndarray, paths: list[str], unreadable, model_ref: str) -> None:
    """A one-line InputError when the model gave NaN or inf for a readable image (its rows would score as
    anything, silently)."""
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        skip = set(unreadable)
        bad_paths = [p for p, b in zip(paths, bad) if b and p not in skip]
        if bad_paths:
            raise InputError(f"--model {shown(model_ref)}: gave NaN or inf embeddings for {len(bad_paths)} of "
                             f"{len(paths)} images, e.g. {shown(bad_paths[0])}; its outputs cannot be scored")


# ---- verification ------------------------------------------------------------------------------------------
def score_pairs(pairs: PairSet, images: list[str], embeddings: np.ndarray, unreadable, metric: str = "euclidean",
                far_target: float = FAR_TARGET) -> tuple[dict, np.ndarray, np.ndarray]:
    """The LFW protocol's numbers for `pairs` from the embeddings of `images` (rows in that order). Pairs with
    an unreadable image are dropped and counted (`dropped_pairs`, `unreadable`), never silently. For a .bin's
    pairs (`pairs.insightface`, 10 or more kept), also the accuracy as insightface computes it
    (`accuracy_insightface`, ..., metrics.insightface_accuracy) on the pairs kept, in file order. Returns
    (numbers, distances, same-person flags) of the pairs kept. Used by `evaluate` and by training."""
    bad = set(unreadable)
    kept = [p for p in pairs.pairs if p.a not in bad and p.b not in bad]
    if not kept:
        raise UserError(f"no pair left to verify: {len(bad)} unreadable image(s), e.g. {min(bad) if bad else '?'}")
    index = {img: i for i, img in enumerate(images)}
    a, b = embeddings[[index[p.a] for p in kept]], embeddings[[index[p.b] for p in kept]]
    d = distances(a, b, metric)
    same = np.array([p.same for p in kept])
    out = vm.verification_metrics(d, same, [p.fold for p in kept], far_target)
    if pairs.insightface and len(kept) >= DEFAULT_FOLDS:
        out.update(vm.insightface_accuracy(a, b, same, DEFAULT_FOLDS))
    out.update({"dropped_pairs": len(pairs.pairs) - len(kept), "unreadable": sorted(bad)})
    return out, d, same


def verify(model: torch.nn.Module, pairs: PairSet, device: torch.device, image_size: int, metric: str = "euclidean",
           flip: bool = False, batch_size: int = 128, workers: int = 0, channels_last: bool = False,
           autocast=contextlib.nullcontext, far_target: float = FAR_TARGET, progress=None, source=None,
           model_ref: str | None = None) -> dict:
    """Embed every image of `pairs` once and score the pairs (`score_pairs`), with the ROC points. `source`: a
    pack's pair images, read from its shards. NaN or inf embeddings are an InputError naming `model_ref`."""
    images = pairs.images()
    emb, bad = embed_paths(model, images, device, image_size, batch_size, flip, workers, channels_last,
                           autocast, progress=progress, source=source)
    check_finite(emb, images, bad, model_ref or "")
    out, d, same = score_pairs(pairs, images, emb, bad, metric, far_target)
    fpr, tpr, _ = vm.roc(d, same)
    out.update({"metric": metric, "flip": flip, "images": len(images), "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}})
    return out


def evaluate(model_ref: str, data: str, pairs_file: str | None = None, metric: str = "euclidean",
             flip: bool = False, device_type: str = "auto", batch_size: int = 128, workers: int = 0,
             mlflow_uri: str | None = None, log: bool = True, plot: str | None = None, seed: int = 0,
             progress=None, bin_file: str | None = None, run_id: str | None = None) -> dict:
    """`facenet-cli evaluate`: the report as a dict (see `format_report`); logs to the MLflow run the model was
    read from (runs:/...), or to `run_id` (--run-id), when `log` is set; writes the ROC curve to `plot` when
    given. With `bin_file` (an
    insightface verification set, facenet/verification/binset.py) its pairs are scored instead of DATA's,
    and logged as eval_<set>_* (eval_lfw_verify_acc for lfw.bin)."""
    if metric not in ("euclidean", "cosine"):
        raise InputError(f"--distance {shown(metric)}: choose euclidean or cosine")
    _check_batch_size(batch_size)
    log_target(run_of(model_ref), run_id)  # a bad or contradicting --run-id before anything is read
    if bin_file:
        from facenet.verification.binset import load_set

        data = os.path.abspath(bin_file)
        pairs, source = load_set(data)
    else:
        data = os.path.abspath(data)
        pairs, source = _pairs_of(data, pairs_file, seed)
    with tempfile.TemporaryDirectory(prefix="facenet-eval-") as tmp:
        loaded, device, path, source_run = _prepare(model_ref, device_type, mlflow_uri, tmp, run_id)
        result = verify(loaded.model, pairs, device.torch_device, loaded.image_size, metric, flip, batch_size,
                        workers, device.channels_last, progress=progress, source=source, model_ref=model_ref)
        people = set() if bin_file else pairs.people()  # a .bin names no one
        seen = people & set(loaded.classes)
        report = {"model": model_ref,
                  "model_file": path if not source_run else f"runs:/{source_run}/" + os.path.relpath(path, tmp),
                  "mlflow_run_id": loaded.run_id, "model_names_run": loaded.named_run_id, "epoch": loaded.epoch,
                  "image_size": loaded.image_size,
                  "device": device.type, "data": data, "pairs_source": pairs.source,
                  "identities": None if bin_file else len(people),
                  "identities_seen_in_training": len(seen) if loaded.classes and not bin_file else None,
                  "set": set_name(bin_file) if bin_file else None, **result}
        png = plot or os.path.join(tmp, "roc.png")
        plot_roc(report, png)
        report["roc_png"] = plot
        if loaded.run_id:
            report["logged_to_mlflow"] = _log_to_run(report, png, mlflow_uri) if log else None
        else:
            report["logged_to_mlflow"] = not_logged_note(loaded)
    return report


def _pairs_of(data: str, pairs_file: str | None, seed: int):
    """(the pairs, the pack's pair images or None): a pack's own test_pairs.txt is read from its shards."""
    from facenet.data import packfile

    if pairs_file or not packfile.is_pack(data):
        return find_pairs(data, pairs_file and os.path.abspath(pairs_file), seed), None
    from facenet.data.dataset import load_dataset
    from facenet.verification.pairs import read_pairs

    source = load_dataset(data).pair_images
    if source is None:
        raise UserError(f"--data {data}: this pack holds no verification pairs (its data set had no test_pairs.txt); "
                        "name a pairs file with --pairs")
    return read_pairs(os.path.join(data, "test_pairs.txt"), data, None, "verification pairs",
                      {p for p, _ in source}), source


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1 or batch_size > 4096:
        raise InputError(f"--batch-size {batch_size}: must be in 1..4096")


def _prepare(model_ref: str, device_type: str, mlflow_uri: str | None, tmp: str, run_id: str | None = None):
    """(the model loaded onto the device, the device, its file, the run it was read from); `run_id`: the run the
    user named (--run-id), where results go when the model was not read from a run."""
    from facenet import devices

    device = devices.setup_device(devices.resolve_device_type(device_type), 0, None)
    path, source_run = resolve_model(model_ref, mlflow_uri, tmp)
    loaded = load_model(path, log_target(source_run, run_id))
    loaded.model.to(device.torch_device)
    if device.channels_last:
        loaded.model.to(memory_format=torch.channels_last)
    return loaded, device, path, source_run


def embed_folder(model_ref: str, folder: str, out: str, device_type: str = "auto", batch_size: int = 128,
                 flip: bool = False, workers: int = 0, mlflow_uri: str | None = None, progress=None) -> dict:
    """`facenet-cli embed`: every image below FOLDER -> OUT (.npz or .parquet) with its path relative to
    FOLDER; returns a summary. Unreadable images are left out and named, never written as zeros."""
    from facenet.verification.embed import images_under, write_embeddings

    if not out.endswith((".npz", ".parquet")):
        raise InputError(f"OUT {shown(out)}: name it .npz or .parquet")
    if not os.path.isdir(folder):
        raise InputError(f"FOLDER {shown(folder)}: no such directory")
    _check_batch_size(batch_size)
    folder = os.path.abspath(folder)
    paths = images_under(folder)
    if not paths:
        raise UserError(f"FOLDER {folder}: no images in it")
    with tempfile.TemporaryDirectory(prefix="facenet-embed-") as tmp:
        loaded, device, _, _ = _prepare(model_ref, device_type, mlflow_uri, tmp)
        emb, bad = embed_paths(loaded.model, paths, device.torch_device, loaded.image_size, batch_size, flip,
                               workers, device.channels_last, progress=progress)
    check_finite(emb, paths, bad, model_ref)
    bad_set = set(bad)
    keep = [i for i, p in enumerate(paths) if p not in bad_set]
    rel = [os.path.relpath(paths[i], folder) for i in keep]
    meta = {"model": model_ref, "folder": folder, "image_size": loaded.image_size, "flip": flip,
            "mlflow_run_id": loaded.run_id or loaded.named_run_id, "epoch": loaded.epoch}
    write_embeddings(out, rel, emb[keep], meta)
    return {"out": os.path.abspath(out), "images": len(keep), "dim": int(emb.shape[1]), "unreadable": sorted(bad_set),
            "device": device.type, **{k: meta[k] for k in ("image_size", "flip", "mlflow_run_id")}}


def _log_to_run(report: dict, png: str, mlflow_uri: str | None) -> str:
    """Log the numbers (eval_*), the ROC PNG and the report to the model's run; say what happened."""
    run_id = report["mlflow_run_id"]
    if not mlflow_uri:
        return f"not logged: no MLflow server configured for run {run_id}"
    try:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        from facenet.tracking import check_reachable

        check_reachable(mlflow_uri)
        client = MlflowClient(mlflow_uri)
        now, step = int(time.time() * 1000), int(report["epoch"] or 0)
        prefix, folder = ("eval_", "evaluation") if not report.get("set") else \
            (f"eval_{report['set']}_", f"evaluation/{report['set']}")
        client.log_batch(run_id, metrics=[Metric(prefix + k, float(v), now, step) for k, v in logged_metrics(report).items()])
        client.log_artifact(run_id, png, folder)
        client.log_text(run_id, json.dumps({k: v for k, v in report.items() if k != "roc"}, indent=2),
                        f"{folder}/report.json")
    except UserError as exc:
        return f"not logged to run {run_id}: {exc}"
    except Exception as exc:
        return f"not logged to run {run_id}: {first_line(exc, 200)}"
    return f"logged to MLflow run {run_id} ({prefix}* metrics, {folder}/roc.png)"


def logged_metrics(result: dict) -> dict[str, float]:
    """The verification numbers under the names MLflow shows (training logs the same at every epoch); for a
    .bin, verify_acc_insightface too (its accuracy as insightface computes it)."""
    if result["far_target"] != FAR_TARGET:
        raise ValueError(f"logged as val_far_1e-3 but measured at FAR {result['far_target']}")
    out = {"verify_acc": result["accuracy"], "val_far_1e-3": result["val"], "auc": result["auc"], "eer": result["eer"]}
    if result.get("accuracy_insightface") is not None:
        out["verify_acc_insightface"] = result["accuracy_insightface"]
    return out


# ---- output ------------------------------------------------------------------------------------------------
def format_report(r: dict) -> str:
    seen = r.get("identities_seen_in_training")
    seen_text = "unknown (the model file names no classes)" if seen is None else \
        (f"{seen} of them seen in training" if seen else "none of them seen in training")
    lines = [
        f"model     {r['model']} (epoch {r['epoch'] if r['epoch'] is not None else '?'}, {r['image_size']} px, on {r['device']})",
        f"pairs     {r['pairs_source']}",
        f"people    {r['identities']}: {seen_text}" if r["identities"] is not None else
        "people    not named by the set (an insightface .bin)",
        f"scored    {r['pairs']} pairs ({r['same_pairs']} same, {r['different_pairs']} different), {r['folds']} folds, "
        f"{r['metric']} distance{', flipped images added' if r['flip'] else ''}",
    ]
    if r["dropped_pairs"]:
        lines.append(f"dropped   {r['dropped_pairs']} pairs with unreadable images, e.g. {r['unreadable'][0]}")
    lines += [
        "",
        f"  {'accuracy':<14}{r['accuracy']:.4f} +- {r['accuracy_std']:.4f}   (threshold {r['threshold']:.4f}, "
        "chosen on the other folds)",
    ]
    if r.get("accuracy_insightface") is not None:
        lines.append(f"  {'insightface':<14}{r['accuracy_insightface']:.4f} +- {r['accuracy_insightface_std']:.4f}   "
                     "(accuracy as arcface_torch computes it: squared distance, grid 0.00..3.99)")
    lines += [
        f"  {'VAL@FAR=' + format(r['far_target'], 'g'):<14}{r['val']:.4f} +- {r['val_std']:.4f}   (FAR {r['far']:.4f})",
        f"  {'ROC AUC':<14}{r['auc']:.4f}",
        f"  {'EER':<14}{r['eer']:.4f}",
    ]
    if r.get("roc_png"):
        lines.append(f"\nROC curve: {r['roc_png']}")
    if r.get("logged_to_mlflow"):
        lines.append(r["logged_to_mlflow"])
    return "\n".join(lines)


def plot_roc(report: dict, path: str, size_px: int = 600) -> str:
    """The ROC curve (log false-accept rate) as a size_px x size_px PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr = np.array(report["roc"]["fpr"]), np.array(report["roc"]["tpr"])
    fig, ax = plt.subplots(figsize=(size_px / 100, size_px / 100), dpi=100)
    try:
        ax.plot(np.maximum(fpr, 1e-4), tpr, lw=2, label=f"AUC {report['auc']:.4f}, EER {report['eer']:.4f}")
        ax.set_xscale("log")
        ax.set_xlim(1e-4, 1.0)
        ax.set_ylim(0.0, 1.01)
        ax.set_xlabel("false accept rate")
        ax.set_ylabel("true accept rate")
        ax.set_title(f"verification: acc {report['accuracy']:.4f}, {report['pairs']} pairs", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
