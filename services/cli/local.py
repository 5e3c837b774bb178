"""Commands that run here and now, without the queue: train, preprocess, pack, evaluate, embed, doctor."""

from __future__ import annotations

import sys

import click

from facenet.errors import one_line
from services.cli.common import echo_json, fail


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                               "help_option_names": []},
             add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train(args: tuple[str, ...]) -> None:
    """Train here, now (no queue): every option of `python -m facenet.train` (see `train --help`)."""
    from facenet.tracking import resolve_uri
    from facenet.train.launch import main as train_main
    from services.config import use_stack_login_for

    uri = None
    for i, a in enumerate(args):  # the trainer's own parser reads the rest; only where it logs matters here
        if a == "--mlflow-uri" and i + 1 < len(args):
            uri = args[i + 1]
        elif a.startswith("--mlflow-uri="):
            uri = a.split("=", 1)[1]
    use_stack_login_for(resolve_uri(uri))  # where the trainer will log: the flag, else its environment
    sys.exit(train_main(list(args), prog="facenet-cli train"))


@click.command()
@click.argument("raw", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--workers", type=int, default=None, show_default="CPU cores",
              help="processes, each with its own MTCNN")
@click.option("--shard-size", type=int, default=0, show_default=True,
              help="images per shard, the unit of work a worker takes (0: auto, ~8 shards per worker, <= 256)")
@click.option("--image-size", type=int, default=160, show_default=True, help="side of the square face crop")
@click.option("--margin", type=int, default=0, show_default=True, help="margin around the face, in crop pixels")
@click.option("--align", is_flag=True, help="warp each face by its five MTCNN landmarks onto ArcFace's template "
              "(a similarity transform) instead of cropping its box")
@click.option("--device", type=click.Choice(["cpu", "cuda", "npu"]), default="cpu", show_default=True,
              help="where MTCNN runs")
@click.option("--detect-size", type=int, default=640, show_default=True,
              help="detect on a copy whose longer side is at most this (crops come from full resolution)")
@click.option("--min-face-frac", type=float, default=0.1, show_default=True,
              help="smallest face searched, as a fraction of the image's shorter side")
@click.option("--holdout", type=float, default=0.2, show_default=True,
              help="fraction of each training identity's faces listed in test_list.txt")
@click.option("--seed", type=int, default=123456, show_default=True, help="seed of the held-out choice")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def preprocess(raw, out, workers, shard_size, image_size, margin, align, device, detect_size, min_face_frac,
               holdout, seed, as_json) -> None:
    """MTCNN-crop a raw data set RAW into the training layout OUT (resumable; reruns skip finished work).

    RAW is VGGFace2-shaped (RAW/train/<identity>/*.jpg, RAW/test/<identity>/*.jpg) or one folder of
    identity sub-folders. OUT gets {train,test}/<identity>/<file> crops, train_list.txt,
    test_list.txt and manifest.json (counts, rejects with reasons, content hash).
    """
    import json

    from facenet.errors import UserError
    from facenet.fsutil import cpu_cores
    from facenet.preprocess import Params, run_local

    if workers is None:
        workers = cpu_cores()
    params = Params(image_size=image_size, margin=margin, shard_size=shard_size, detect_size=detect_size,
                    min_face_frac=min_face_frac, holdout=holdout, seed=seed, align=align)
    try:
        summary = run_local(raw, out, params, workers=workers, device=device, progress=not as_json)
    except UserError as exc:
        raise click.ClickException(one_line(exc)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["reject_reasons"].items()) or "none"
    click.echo(f"{summary['images']} images -> {summary['faces']} faces, {summary['rejects']} rejected ({reasons})")
    click.echo(f"processed {summary['processed']} in {summary['seconds']:.1f} s ({summary['img_per_s']:.1f} img/s) "
               f"with {summary['workers']} worker(s); {summary['skipped']} already done")
    click.echo(f"lists: {summary['train_list']} train / {summary['test_list']} held out over "
               f"{summary['classes']} identities; manifest {summary['manifest']}")



@click.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--data", required=True, type=click.Path(file_okay=False),
              help="the data root to pack: a preprocessing OUT (its lists) or a folder of identity folders")
@click.option("--shard-bytes", type=click.IntRange(1 << 20, 1 << 40), default=1 << 30, show_default="1 GiB",
              help="bytes per tar shard (a shard is closed after the image that passes this)")
@click.option("--holdout", type=float, default=0.2, show_default=True,
              help="for a folder tree without lists: fraction of each identity held out (frozen in the pack)")
@click.option("--seed", type=int, default=123456, show_default=True, help="seed of that held-out choice")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def pack(out, data, shard_bytes, holdout, seed, as_json) -> None:
    """Pack a data set into OUT: a few large tar shards, an index and the lists, for shared file systems.

    `train --data OUT` then reads each image with one read at a known offset (no open, no stat) with the
    same split, order and sampler as the folder; each image is checked against its sha256. A rerun over a
    finished pack of the same data set does nothing. See docs/datasets.md, "Packed data sets".
    """
    import json

    from facenet import confine
    from facenet.errors import UserError
    from facenet.pack import pack as pack_data

    try:
        summary = pack_data(data, out, shard_bytes, holdout, seed, confine.Roots.from_env(), progress=not as_json)
    except UserError as exc:
        fail(exc)  # a refused data set or pack is exit 2, as everywhere else
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    if summary.get("rebuilt"):
        click.echo(f"{summary['out']}: the pack there did not check out ({summary['rebuilt']}); packed again")
    if summary["skipped"]:
        click.echo(f"{summary['out']}: already a whole pack of this data set ({summary['manifest_hash']}); nothing to do")
        return
    click.echo(f"packed {summary['train']} train / {summary['test']} held-out / {summary['pairs']} pair images of "
               f"{summary['classes']} identities into {summary['shards']} shard(s), {summary['bytes'] / 2**20:.1f} MiB, "
               f"in {summary['seconds']:.1f} s ({summary['img_per_s']:.0f} img/s)")
    if summary["unreadable"]:
        click.echo(f"warning: {summary['unreadable']} image(s) could not be read and are packed as unreadable "
                   f"(named in {out}/pack.json)")


# ---- verification ------------------------------------------------------------------------------------

MODEL_HELP = ("a model file (OUTPUT/model.pt) or checkpoint, an exported .onnx model (the onnx extra), a training "
              "output folder, or an MLflow model URI runs:/<run id>/model")
RUN_ID_HELP = ("log to this MLflow run (32 hex digits) [default: the run the model was read from (runs:/...); "
               "a run a model file only names is not logged into]")


def _mlflow_uri(explicit: str | None) -> str | None:
    from services.config import load_settings, use_stack_login_for

    if explicit:
        use_stack_login_for(explicit)
        return explicit
    return load_settings().mlflow_uri


class _Bar:
    """A tqdm bar on stderr for `progress(done, total)` callbacks (the total is known only once the
    images are listed)."""

    def __init__(self, label: str):
        self.label, self.bar = label, None  # drawn at the first image: an error before then prints one line

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(desc=self.label, total=total, unit="img", file=sys.stderr, leave=False,
                            dynamic_ncols=True)
        self.bar.update(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _embedding_command(as_json: bool, run):
    """run(progress) with a progress bar on stderr (none with --json); a UserError is one line."""
    from facenet.errors import UserError

    bar = None if as_json else _Bar("embedding")
    try:
        return run(bar)
    except UserError as exc:
        fail(exc)
    finally:
        if bar is not None:
            bar.close()


@click.command()
@click.option("--model", "model_ref", required=True, help=MODEL_HELP)
@click.option("--data", type=click.Path(), help="data root: a preprocessing OUT (its test_pairs.txt), a pack, "
              "an LFW folder (its pairs.txt), or a folder of identity folders (pairs generated from all of it)")
@click.option("--bin", "bin_files", multiple=True, type=click.Path(dir_okay=False),
              help="an insightface verification set (lfw.bin, cfp_fp.bin, agedb_30.bin), instead of --data; "
                   "repeat for several (read without running pickle code)")
@click.option("--pairs", "pairs_file", type=click.Path(), default=None,
              help="a pairs file (ours or LFW's pairs.txt) with paths relative to --data [default: found in --data]")
@click.option("--distance", type=click.Choice(["euclidean", "cosine"]), default="euclidean", show_default=True,
              help="distance of L2-normalised embeddings")
@click.option("--flip", is_flag=True, help="add each image's mirror image's embedding (test-time flip)")
@click.option("--device", type=click.Choice(["auto", "npu", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="seed of generated pairs")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="write the ROC curve to this PNG")
@click.option("--mlflow-uri", default=None, help="MLflow server for runs:/ models and logging "
              "[default: FACENET_MLFLOW_URI, else the local stack's]")
@click.option("--run-id", default=None, help=RUN_ID_HELP)
@click.option("--no-log", is_flag=True, help="do not log to the model's MLflow run")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON (with the ROC points)")
def evaluate(model_ref, data, bin_files, pairs_file, distance, flip, device, batch_size, seed, plot, mlflow_uri,
             run_id, no_log, as_json) -> None:
    """Face verification by the LFW protocol: 10-fold accuracy (each fold's threshold chosen on the other
    folds), VAL@FAR=1e-3, ROC AUC and EER, on pairs of people the report says whether the model saw.

    For a model read from an MLflow run (runs:/...), or with --run-id, the numbers (eval_*), the ROC curve and
    the report are logged to that run; a run a model file only names is not logged into (it says so).
    """
    import json

    from facenet.evaluate import evaluate as run_evaluation, format_report

    if bool(data) == bool(bin_files):
        raise click.UsageError("name the pairs with --data ROOT or with --bin FILE (one or more), not both")
    if bin_files and (pairs_file or (plot and len(bin_files) > 1)):
        raise click.UsageError("--pairs goes with --data; --plot with one --bin at most")
    uri = _mlflow_uri(mlflow_uri)
    reports = [_embedding_command(as_json, lambda progress, one=one: run_evaluation(
        model_ref, data, pairs_file, distance, flip, device, batch_size, mlflow_uri=uri, log=not no_log, plot=plot,
        seed=seed, progress=progress, bin_file=one, run_id=run_id)) for one in (bin_files or [None])]
    if as_json:
        click.echo(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    else:
        click.echo("\n\n".join(format_report(r) for r in reports))


@click.command()
@click.option("--model", "model_ref", required=True, help=MODEL_HELP)
@click.argument("folder", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--flip", is_flag=True, help="add each image's mirror image's embedding")
@click.option("--device", type=click.Choice(["auto", "npu", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--mlflow-uri", default=None, help="MLflow server for runs:/ models")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def embed(model_ref, folder, out, flip, device, batch_size, mlflow_uri, as_json) -> None:
    """Embed every image below FOLDER (face crops, as preprocessing writes them) into OUT.npz (arrays
    paths, embeddings) or OUT.parquet (columns path, embedding): 512 floats per image, L2-normalised,
    paths relative to FOLDER. Unreadable images are left out and named."""
    import json

    from facenet.evaluate import embed_folder

    summary = _embedding_command(as_json, lambda progress: embed_folder(
        model_ref, folder, out, device, batch_size, flip, mlflow_uri=_mlflow_uri(mlflow_uri), progress=progress))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{summary['images']} embeddings ({summary['dim']}-d, {summary['image_size']} px, on {summary['device']}) "
               f"-> {summary['out']}")
    if summary["unreadable"]:
        click.echo(f"left out {len(summary['unreadable'])} unreadable image(s), e.g. {summary['unreadable'][0]}")


@click.command("export")
@click.argument("model_ref", metavar="MODEL")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["onnx", "pt2"]), default=None,
              help="onnx (onnxruntime, TensorRT; the onnx extra) or pt2 (torch.export) [default: OUT's suffix]")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (18..23)")
@click.option("--mlflow-uri", default=None, help="MLflow server for runs:/ models and logging "
              "[default: FACENET_MLFLOW_URI, else the local stack's]")
@click.option("--run-id", default=None, help=RUN_ID_HELP)
@click.option("--no-log", is_flag=True, help="do not log the file to the model's MLflow run")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def export_model(model_ref, out, fmt, opset, mlflow_uri, run_id, no_log, as_json) -> None:
    """Export MODEL (a model.pt or checkpoint, a training output folder, or runs:/<run id>/model) to OUT for
    serving: the embedding network (float32 RGB crops [batch, 3, S, S] standardised as (pixel - 127.5) / 128
    in, unit 512-d embeddings out), batch size dynamic. The file is checked before it is kept (onnxruntime or
    torch.export.load must match PyTorch within 1e-4), written whole or not at all, and logged under export/
    to the MLflow run the model was read from (runs:/...) or --run-id names. `embed` and `evaluate` take an
    .onnx file as --model."""
    from facenet.errors import UserError
    from facenet.export import export

    try:
        summary = export(model_ref, out, fmt, opset, _mlflow_uri(mlflow_uri), log=not no_log, run_id=run_id)
    except UserError as exc:
        fail(exc)
    if as_json:
        echo_json(summary)
        return
    opset_note = f", opset {summary['opset']}" if summary["opset"] else ""
    click.echo(f"{summary['format']}{opset_note}, {summary['image_size']} px, batch dynamic -> {summary['out']} "
               f"({summary['bytes'] / 2**20:.1f} MiB)")
    click.echo(f"checked with {summary['checked_with']}: max |difference| {summary['max_abs_diff']:.1e} "
               f"(tolerance {summary['tolerance']})")
    click.echo(summary["mlflow_note"])


@click.command()
@click.option("--device", type=click.Choice(["auto", "npu", "cuda", "cpu"]), default="auto", show_default=True,
              help="the device type to check (auto: what training would pick)")
@click.option("--npus", type=click.IntRange(1, 64), default=None,
              help="processes for the step and the all-reduce  [default: every visible device; 2 on a CPU]")
@click.option("--probe-seconds", type=click.FloatRange(0, 600), default=30.0, show_default=True,
              help="length of the throughput probe (0 skips it)")
@click.option("--probe-batch", type=click.IntRange(1, 4096), default=None,
              help="batch of the throughput probe  [default: the recipe's 512 per device; 32 on a CPU]")
@click.option("--image-size", type=click.IntRange(32, 1024), default=160, show_default=True)
@click.option("--no-services", is_flag=True, help="leave out the Redis and MLflow checks")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON (what to send us from a new host)")
def doctor(device, npus, probe_seconds, probe_batch, image_size, no_services, as_json) -> None:
    """Can this host train? Versions against TorchNPU's table, the chips and their health, one real AMP training
    step on every chip, an all-reduce over them with its bus bandwidth, NMS on the device, a throughput probe
    beside the seed's figure, Redis and MLflow. One PASS/WARN/FAIL/SKIP line per check, the fix under a FAIL;
    exit status 0 when the host can train, 1 when it cannot."""
    from facenet import doctor as checks
    from services.config import load_settings
    from services.queue.doctor import service_checks

    opts = checks.Options(device=device, npus=npus, probe_seconds=probe_seconds, probe_batch=probe_batch,
                          image_size=image_size)
    extra = [] if no_services else service_checks(load_settings())
    say = (lambda c: None) if as_json else (lambda c: click.echo(c.line()))
    report = checks.run(opts, extra, say)
    if as_json:
        echo_json(report)
    else:
        click.echo(checks.format_report(report))
    sys.exit(0 if report["ok"] else 1)
