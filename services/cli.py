"""`facenet-cli`: the command line users (and scripts) drive the stack with."""

from __future__ import annotations

import os
import sys

import click

from facenet.errors import one_line


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="facenet-stack")
def cli() -> None:
    """FaceNet Stack: train FaceNet on Ascend NPUs, NVIDIA GPUs or CPUs."""


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
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


@cli.command()
@click.argument("raw", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--workers", type=int, default=None, show_default="CPU cores",
              help="processes, each with its own MTCNN")
@click.option("--shard-size", type=int, default=0, show_default=True,
              help="images per shard, the unit of work a worker takes (0: auto, ~8 shards per worker, <= 256)")
@click.option("--image-size", type=int, default=160, show_default=True, help="side of the square face crop")
@click.option("--margin", type=int, default=0, show_default=True, help="margin around the face, in crop pixels")
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
def preprocess(raw, out, workers, shard_size, image_size, margin, device, detect_size, min_face_frac, holdout,
               seed, as_json) -> None:
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
                    min_face_frac=min_face_frac, holdout=holdout, seed=seed)
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



# ---- verification ------------------------------------------------------------------------------------

MODEL_HELP = ("a model file (OUTPUT/model.pt) or checkpoint, a training output folder, or an MLflow model URI "
              "runs:/<run id>/model")


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
        _fail(exc)
    finally:
        if bar is not None:
            bar.close()


@cli.command()
@click.option("--model", "model_ref", required=True, help=MODEL_HELP)
@click.option("--data", required=True, type=click.Path(), help="data root: a preprocessing OUT (its test_pairs.txt), "
              "an LFW folder (its pairs.txt), or a folder of identity folders (pairs generated from all of it)")
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
@click.option("--no-log", is_flag=True, help="do not log to the model's MLflow run")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON (with the ROC points)")
def evaluate(model_ref, data, pairs_file, distance, flip, device, batch_size, seed, plot, mlflow_uri, no_log,
             as_json) -> None:
    """Face verification by the LFW protocol: 10-fold accuracy (each fold's threshold chosen on the other
    folds), VAL@FAR=1e-3, ROC AUC and EER, on pairs of people the report says whether the model saw.

    For a model from an MLflow run (runs:/..., or a model file naming its run), the numbers (eval_*), the
    ROC curve and the report are logged to that run.
    """
    import json

    from facenet.evaluate import evaluate as run_evaluation, format_report

    report = _embedding_command(as_json, lambda progress: run_evaluation(
        model_ref, data, pairs_file, distance, flip, device, batch_size, mlflow_uri=_mlflow_uri(mlflow_uri),
        log=not no_log, plot=plot, seed=seed, progress=progress))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_report(report))


@cli.command()
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


@cli.command()
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
    from services.doctor import service_checks

    opts = checks.Options(device=device, npus=npus, probe_seconds=probe_seconds, probe_batch=probe_batch,
                          image_size=image_size)
    extra = [] if no_services else service_checks(load_settings())
    say = (lambda c: None) if as_json else (lambda c: click.echo(c.line()))
    report = checks.run(opts, extra, say)
    if as_json:
        _echo_json(report)
    else:
        click.echo(checks.format_report(report))
    sys.exit(0 if report["ok"] else 1)


# ---- the queue -----------------------------------------------------------------------------------

def _settings_and_registry():
    from services.config import load_settings
    from services.jobs import open_registry

    settings = load_settings()
    return settings, open_registry(settings)


def _fail(exc: Exception):
    """One line on stderr: exit 2 for a value or path refused before anything was queued, else 1."""
    from facenet.errors import InputError

    if isinstance(exc, InputError):
        click.echo(f"Error: {one_line(exc)}", err=True)
        sys.exit(2)
    raise click.ClickException(one_line(exc)) from None


def _echo_json(value) -> None:
    import json

    click.echo(json.dumps(value, indent=2, default=str))


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    if not rows:
        click.echo("(none)")
        return
    cells = [[("" if r.get(k) is None else str(r.get(k))) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(columns)]
    click.echo("  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)))
    for c in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def _when(ts) -> str | None:
    import datetime

    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else None


def _fmt(v, digits=3):
    return None if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else v)


class _Watcher:
    """`--wait` and `logs -f`: a progress bar over preprocessing shards, then training steps."""

    def __init__(self, show_log: bool):
        self.bar = None
        self.phase = None
        self.show_log = show_log
        self.last_status = None

    def _bar(self, phase: str, total: int, unit: str):
        from tqdm import tqdm

        if self.phase != phase or (self.bar is not None and self.bar.total != total):
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=total, unit=unit, desc=phase, file=sys.stderr, dynamic_ncols=True)
            self.phase = phase
        return self.bar

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            click.echo(line)

    def on_change(self, job: dict) -> None:
        if self.phase == "preprocess" and job["status"] != "PREPROCESSING":
            self.bar.n = self.bar.total  # the last shards finished between two polls
            self.bar.close()
            self.bar, self.phase = None, None
        if job["status"] != self.last_status:
            msg = f" ({job['message']})" if job.get("message") else ""
            self.write(f"job {job['id']}: {job['status']}{msg}")
            self.last_status = job["status"]
        p = job.get("progress") or {}
        if job["status"] == "PREPROCESSING" and p.get("shards"):
            bar = self._bar("preprocess", p["shards"], "shard")
            bar.n = p.get("shards_done") or 0
            bar.refresh()
        elif p.get("epochs") and p.get("steps"):
            bar = self._bar("train", p["epochs"] * p["steps"], "step")
            epoch, step = p.get("epoch") or 0, p.get("step") or 0
            bar.n = min(bar.total, max(0, (epoch - 1) * p["steps"] + step) if epoch else 0)
            bar.set_postfix({k: _fmt(p.get(k), 2 if k == "fps" else 4) for k in ("epoch", "loss", "fps", "acc1")
                             if p.get(k) is not None}, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _wait_and_report(reg, job: dict, show_log: bool, as_json: bool) -> None:
    from services.config import load_settings
    from services.jobs import exit_code, follow, view

    watcher = _Watcher(show_log)
    try:
        final = follow(reg, job["id"], on_change=(lambda j: None) if as_json else watcher.on_change,
                       on_log=watcher.write if show_log and not as_json else None)
    except KeyboardInterrupt:
        watcher.close()
        click.echo(f"\nstopped watching; the job goes on (facenet-cli cancel {job['id']} stops it)", err=True)
        sys.exit(130)
    watcher.close()
    if as_json:
        _echo_json({**view(final), "mlflow_url": _run_url(load_settings(), final.get("mlflow_run_id"))})
    else:
        _print_outcome(final)
    sys.exit(exit_code(final))


def _print_outcome(job: dict) -> None:
    from services.config import load_settings

    r = job.get("result") or {}
    if job["status"] == "SUCCEEDED" and job.get("kind") == "train":
        acc = "n/a" if r.get("acc1") is None else f"{r['acc1']:.4f}"
        click.echo(f"job {job['id']} SUCCEEDED: {r.get('epochs')} epochs, {r.get('fps', 0):.1f} img/s on "
                   f"{r.get('world_size')} {r.get('device')} process(es) ({r.get('precision')}), held-out Acc@1 {acc}")
    elif job["status"] == "SUCCEEDED":
        click.echo(f"job {job['id']} SUCCEEDED: {r.get('images')} images -> {r.get('faces')} faces, "
                   f"{r.get('rejects')} rejected; {r.get('out')}")
    else:
        click.echo(f"job {job['id']} {job['status']}: {job.get('error') or job.get('message') or ''}")
    url = _run_url(load_settings(), job.get("mlflow_run_id"))
    if url:
        click.echo(f"MLflow run: {url}")


def _run_url(settings, run_id: str | None) -> str | None:
    """The run's page at the address a user's browser reaches (FACENET_MLFLOW_PUBLIC_URI under compose)."""
    if not run_id or not settings.mlflow_uri:
        return None
    from services.mlflow_runs import run_url

    try:
        from services.mlflow_runs import client

        experiment = client(settings.mlflow_uri).get_run(run_id).info.experiment_id
    except Exception:  # the link is a convenience: an unreachable server still gets the run's id shown
        experiment = "0"
    return run_url(settings.mlflow_browse_uri, experiment, run_id)


def _submit_parser():
    from facenet.train.options import get_args_parser

    p = get_args_parser(prog="facenet-cli submit-train")
    p.description = ("Queue a training job (optionally preceded by MTCNN preprocessing of a raw data set). "
                     "Every training option of `facenet-cli train` applies; the service chooses --output, "
                     "--resume, --events, --json-out, --run-id and --mlflow-uri itself.")
    g = p.add_argument_group("queue")
    g.add_argument("--device-type", choices=["auto", "npu", "cuda", "cpu"], default=None,
                   help="training queue train.<type> (default: --device if given, else the best registered type)")
    g.add_argument("--preprocess-from", metavar="RAW",
                   help="MTCNN-crop RAW (VGGFace2 layout) into --data first, in shards on the preprocess queue")
    g.add_argument("--detect-size", type=int, default=640, help="preprocessing: detection image side")
    g.add_argument("--min-face-frac", type=float, default=0.1, help="preprocessing: smallest face / shorter side")
    g.add_argument("--shard-size", type=int, default=0, help="preprocessing: images per shard (0: auto)")
    g.add_argument("--wait", action="store_true", help="show progress until the job ends; exit non-zero if it fails")
    g.add_argument("--json", dest="as_json", action="store_true", help="print the job (or with --wait its end state) as JSON")
    return p


SERVICE_OWNED = ("output", "resume", "events", "json_out", "run_id", "mlflow_uri", "spec")


@cli.command("submit-train", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                               "help_option_names": []}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def submit_train(args: tuple[str, ...]) -> None:
    """Queue a training job: every `train` option plus --device-type, --preprocess-from, --wait, --json."""
    from facenet.errors import UserError
    from facenet.preprocess.plan import Params
    from facenet.spec import TrainSpec
    from facenet.train.options import get_args_parser
    from services.config import load_settings
    from services.jobs import check_train_submission, open_registry, submit_train as submit, view

    ns = _submit_parser().parse_args(list(args))
    defaults = vars(get_args_parser().parse_args(["--data", "x"]))
    from facenet.errors import InputError

    for name in SERVICE_OWNED:
        if getattr(ns, name, None) != defaults.get(name):
            _fail(InputError(f"--{name.replace('_', '-')}: chosen by the service for queued jobs; "
                             "use `facenet-cli train` to set it yourself"))
    if not ns.data:
        _fail(InputError("--data is required (the dataset root; with --preprocess-from, where the crops go)"))
    values = {k: v for k, v in vars(ns).items() if k in {f.name for f in __import__("dataclasses").fields(TrainSpec)}}
    values["tags"] = dict(values.get("tags") or [])
    if ns.npus_per_node is not None:
        values["npus"] = ns.npus_per_node * ns.nnodes
    if values.get("pretrained") in ("none", ""):
        values["pretrained"] = None
    device_type = ns.device_type or (ns.device if ns.device != "auto" else "auto")
    try:
        # Every value and path is checked before Redis is even asked: bad input queues nothing.
        spec = TrainSpec(**values)
        params = Params(image_size=ns.image_size, shard_size=ns.shard_size, detect_size=ns.detect_size,
                        min_face_frac=ns.min_face_frac, holdout=ns.holdout, seed=ns.seed)
        settings = load_settings()
        check_train_submission(settings, spec, device_type, ns.preprocess_from, params)
        reg = open_registry(settings)
        job = submit(settings, reg, spec, device_type, ns.preprocess_from, params, ns.experiment)
    except UserError as exc:
        _fail(exc)
    if not ns.wait:
        if ns.as_json:
            _echo_json(view(job))
        else:
            click.echo(f"job {job['id']} queued on train.{job['device_type']} ({job['npus']} device(s))"
                       + (" after preprocessing" if ns.preprocess_from else ""))
            click.echo(f"  facenet-cli status {job['id']}   |   facenet-cli logs -f {job['id']}")
        return
    if not ns.as_json:
        click.echo(f"job {job['id']} submitted; waiting (Ctrl-C stops watching, not the job)")
    _wait_and_report(reg, job, show_log=False, as_json=ns.as_json)


@cli.command("submit-preprocess")
@click.argument("raw")
@click.argument("out")
@click.option("--shard-size", type=int, default=0, show_default=True, help="images per shard (0: auto)")
@click.option("--image-size", type=int, default=160, show_default=True, help="side of the square face crop")
@click.option("--margin", type=int, default=0, show_default=True, help="margin around the face, in crop pixels")
@click.option("--detect-size", type=int, default=640, show_default=True, help="detection image side")
@click.option("--min-face-frac", type=float, default=0.1, show_default=True, help="smallest face / shorter side")
@click.option("--holdout", type=float, default=0.2, show_default=True, help="held-out fraction in test_list.txt")
@click.option("--seed", type=int, default=123456, show_default=True, help="seed of the held-out choice")
@click.option("--wait", is_flag=True, help="show progress until done; exit non-zero on failure")
@click.option("--json", "as_json", is_flag=True, help="print the job as JSON")
def submit_preprocess(raw, out, shard_size, image_size, margin, detect_size, min_face_frac, holdout, seed, wait,
                      as_json) -> None:
    """Queue MTCNN preprocessing of RAW into OUT, in shards on the preprocess queue."""
    from facenet.errors import UserError
    from facenet.preprocess.plan import Params
    from services.config import load_settings
    from services.jobs import check_preprocess_submission, open_registry, submit_preprocess as submit, view

    try:
        params = Params(image_size=image_size, margin=margin, shard_size=shard_size, detect_size=detect_size,
                        min_face_frac=min_face_frac, holdout=holdout, seed=seed)
        settings = load_settings()
        check_preprocess_submission(settings, raw, out, params)
        reg = open_registry(settings)
        job = submit(settings, reg, raw, out, params)
    except UserError as exc:
        _fail(exc)
    if wait:
        _wait_and_report(reg, job, show_log=False, as_json=as_json)
    elif as_json:
        _echo_json(view(job))
    else:
        click.echo(f"job {job['id']} queued on preprocess")


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="print the job as JSON")
def status(job_id, as_json) -> None:
    """One job: status, progress, MLflow run, error."""
    from facenet.errors import UserError
    from services.jobs import view

    try:
        settings, reg = _settings_and_registry()
        job = view(reg.find(job_id))
    except UserError as exc:
        _fail(exc)
    job["mlflow_url"] = _run_url(settings, job["mlflow_run_id"])
    if len(job["nodes"] or []) > 1:  # a gang: what each other node's agent last said of its trainer
        from services.gang import node_states

        job["node_states"] = node_states(reg, job["id"], job["nodes"])
    if job["status"] == "QUEUED":  # what keeps it waiting: workers of its type that failed their doctor check
        job["unfit_workers"] = {w["node"]: w["unfit"] for w in reg.workers()
                                if w.get("unfit") and w.get("unfit_type") == job.get("device_type")}
    if as_json:
        _echo_json(job)
        return
    p = job["progress"]
    click.echo(f"job {job['id']} ({job['kind']}): {job['status']}" + (f" - {job['message']}" if job["message"] else ""))
    click.echo(f"  created {_when(job['created'])}, started {_when(job['started'])}, finished {_when(job['finished'])}, "
               f"attempts {job['attempts']}")
    if job["kind"] == "train":
        click.echo(f"  {job['npus']} {job['device_type']} device(s) on {job['worker'] or '-'}; epoch {p['epoch']}/"
                   f"{p['epochs']} step {p['step']}/{p['steps']}; fps {_fmt(p['fps'], 1)}; loss {_fmt(p['loss'], 4)}; "
                   f"acc1 {_fmt(p['acc1'], 4)}")
        click.echo(f"  MLflow run {job['mlflow_url'] or job['mlflow_run_id'] or '-'}; "
                   f"checkpoint {job['checkpoint'] or '-'}")
        for n in job.get("node_states") or []:
            click.echo(f"  node {n['rank']}: {n['node']}" + (f", trainer {n['trainer']}" if n["rank"] else ""))
    for node, why in (job.get("unfit_workers") or {}).items():
        click.echo(f"  not on {node}: it failed its doctor check and takes no jobs ({why})")
    if job["error"]:
        click.echo(f"  error: {job['error']}")


@cli.command()
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines (with a progress bar) until the job ends")
def logs(job_id, follow) -> None:
    """The trainer's output of a job (the last 5000 lines are kept in Redis; all in OUTPUT/train.log)."""
    from facenet.errors import UserError

    try:
        _, reg = _settings_and_registry()
        job = reg.find(job_id)
    except UserError as exc:
        _fail(exc)
    if follow:
        _wait_and_report(reg, job, show_log=True, as_json=False)
    lines, _ = reg.read_log(job["id"])
    for line in lines:
        click.echo(line)


@cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="print the job as JSON")
def cancel(job_id, as_json) -> None:
    """Stop a job: a queued one at once, a running one by killing its trainer's process group."""
    from facenet.errors import UserError
    from services.jobs import cancel as do_cancel, view

    try:
        settings, reg = _settings_and_registry()
        job = do_cancel(reg, job_id, mlflow_uri=settings.mlflow_uri)
    except UserError as exc:
        _fail(exc)
    if as_json:
        _echo_json(view(job))
    else:
        click.echo(f"job {job['id']}: {job['status']}" + (f" ({job['message']})" if job.get("message") else ""))
    if job["status"] not in ("CANCELLED", "SUCCEEDED", "FAILED"):
        sys.exit(1)


@cli.command()
@click.option("--limit", type=int, default=50, show_default=True, help="newest jobs shown")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
def jobs(limit, as_json) -> None:
    """Recent jobs, newest first."""
    from facenet.errors import UserError
    from services.jobs import view

    try:
        _, reg = _settings_and_registry()
        rows = [view(j) for j in reg.jobs(limit)]
    except UserError as exc:
        _fail(exc)
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        r["created_at"] = _when(r["created"])
        r["epoch"] = f"{r['progress']['epoch'] or 0}/{r['progress']['epochs'] or '-'}"
        r["fps"] = _fmt(r["progress"]["fps"], 1)
        r["acc1"] = _fmt(r["progress"]["acc1"], 4)
        r["devices"] = f"{r['npus']} {r['device_type']}" if r["npus"] else ""
    _table(rows, [("id", "JOB"), ("kind", "KIND"), ("status", "STATUS"), ("devices", "DEVICES"), ("epoch", "EPOCH"),
                  ("fps", "FPS"), ("acc1", "ACC1"), ("created_at", "CREATED"), ("error", "ERROR")])


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
def workers(as_json) -> None:
    """Live workers: queues, devices and which job leases each device."""
    from facenet.errors import UserError

    try:
        _, reg = _settings_and_registry()
        rows = reg.workers()
        for w in rows:
            if w.get("devices") is not None:
                w["leases"] = {str(d): j for d, j in reg.leases(w["node"], w["devices"]).items()}
    except UserError as exc:
        _fail(exc)
    if as_json:
        _echo_json(rows)
        return
    for w in rows:
        w["queues_"] = ",".join(w.get("queues", []))
        if w.get("devices") is not None:
            busy = sum(1 for j in w["leases"].values() if j)
            w["devices_"] = f"{len(w['devices'])} {w['device_type']} ({busy} leased)"
        if w.get("unfit"):
            w["devices_"] = f"none: failed doctor ({w['unfit']})"
    _table(rows, [("node", "WORKER"), ("queues_", "QUEUES"), ("concurrency", "SLOTS"), ("devices_", "DEVICES"),
                  ("pid", "PID")])


@cli.command()
@click.argument("run_refs", nargs=-1, metavar="[RUN]...")
@click.option("--compare", is_flag=True, help="compare the RUNs (ids, prefixes as listed, or job ids) side by side")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="with --compare: also write the comparison PNG here (it is always logged to the newest run)")
@click.option("--experiment", default=None, help="MLflow experiment (default $FACENET_EXPERIMENT or facenet)")
@click.option("--limit", type=int, default=50, show_default=True, help="newest runs shown")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def runs(run_refs, compare, plot, experiment, limit, as_json) -> None:
    """Training runs from MLflow, to compare FPS and accuracy.

    With --compare RUN RUN...: a table of the params that differ, FPS, FPS per device, Acc@1 and
    verification numbers, and one PNG (FPS against device count; Acc@1 and verification accuracy per
    epoch), also logged to the newest of the runs as compare/*.png.
    """
    from facenet.errors import UserError
    from services import mlflow_runs
    from services.config import load_settings

    settings = load_settings()
    if run_refs and not compare:
        _fail(UserError("RUN arguments go with --compare (runs --compare RUN RUN...)"))
    try:
        if not settings.mlflow_uri:
            raise UserError("no MLflow server known: start the stack or set FACENET_MLFLOW_URI")
        mlflow_runs.check_reachable(settings.mlflow_uri)
        if compare:
            from services.compare import compare as compare_runs, format_table

            report = compare_runs(settings.mlflow_uri, list(run_refs), experiment or settings.experiment, plot)
        else:
            rows = mlflow_runs.list_runs(settings.mlflow_uri, experiment or settings.experiment, limit,
                                         browse_uri=settings.mlflow_browse_uri)
    except UserError as exc:
        _fail(exc)
    if compare:
        if as_json:
            _echo_json(report)
            return
        click.echo(format_table(report))
        if report["plot"]:
            click.echo(f"\nplot: {report['plot']}")
        click.echo(f"logged to run {report['logged_to']} (compare/)")
        return
    if as_json:
        _echo_json(rows)
        return
    table = [{"run": r["run_id"][:12], "job": r["tags"].get("job_id"), "npus": r["tags"].get("npus"),
              "device": r["tags"].get("device_type"), "amp": r["tags"].get("amp"), "epochs": r["params"].get("epochs"),
              "fps": _fmt(r["metrics"].get("final_fps", r["metrics"].get("fps")), 1),
              "acc1": _fmt(r["metrics"].get("final_acc1", r["metrics"].get("acc1")), 4), "status": r["status"],
              "name": r["name"]} for r in rows]
    _table(table, [("run", "RUN"), ("job", "JOB"), ("npus", "NPUS"), ("device", "DEVICE"), ("amp", "AMP"),
                   ("epochs", "EPOCHS"), ("fps", "FPS"), ("acc1", "ACC1"), ("status", "STATUS"), ("name", "NAME")])


@cli.group()
def stack() -> None:
    """The local stack (no Docker): Redis, MLflow, Flower, a preprocessing and a CPU worker."""


_state_dir_option = click.option("--state-dir", default=None, show_default="$FACENET_STATE_DIR or ~/.facenet/stack",
                                 help="where logs, pids, data and credentials live")


@stack.command("up")
@_state_dir_option
@click.option("--cpu-devices", default=None, show_default="0",
              help="CPU 'devices' the CPU worker owns (e.g. 0-1: two 1-process jobs at once, or one 2-process job)")
@click.option("--device-workers", type=int, default=None, show_default="1",
              help="CPU device workers to run, each a 'node' owning --cpu-devices (2: two nodes on this host)")
@click.option("--data-root", "data_roots", multiple=True, metavar="DIR",
              help="a folder jobs may read and write (repeat for more); the default is $FACENET_DATA_ROOTS, else "
                   "the roots of the last `stack up`, else ~/facenet-data (created). Never a folder that holds "
                   "the state folder")
@click.option("--json", "as_json", is_flag=True, help="print the services as JSON")
def stack_up(state_dir, cpu_devices, device_workers, data_roots, as_json) -> None:
    """Start what is not running yet (idempotent); print where everything is."""
    from facenet.errors import UserError
    from services import stack as local
    from services.config import default_state_dir

    state_dir = state_dir or default_state_dir()
    try:
        s = local.up(state_dir, cpu_devices, progress=(lambda m: None) if as_json else click.echo,
                     device_workers=device_workers, data_roots=list(data_roots) or None)
    except UserError as exc:
        _fail(exc)
    if as_json:
        _echo_json(local.status(state_dir))
        return
    click.echo(f"stack up ({state_dir}):")
    click.echo(f"  MLflow  {s['mlflow_uri']}  (user {s['mlflow_username']}, password MLFLOW_TRACKING_PASSWORD in "
               f"{state_dir}/secrets.env)")
    click.echo(f"  Flower  {s['flower_url']}  (user {s['flower_user']}, password in {state_dir}/secrets.env)")
    click.echo(f"  Redis   127.0.0.1:{s['ports']['redis']} (password in {state_dir}/secrets.env)")
    click.echo(f"  data roots (jobs read and write only beneath these): {', '.join(s['data_roots'])}")
    if os.path.abspath(state_dir) != default_state_dir():
        click.echo(f"  other commands find this stack with: export FACENET_STATE_DIR={state_dir}")


@stack.command("down")
@_state_dir_option
def stack_down(state_dir) -> None:
    """Stop exactly the processes `stack up` started (data, runs and credentials stay)."""
    from services import stack as local
    from services.config import default_state_dir

    stopped = local.down(state_dir or default_state_dir(), progress=click.echo)
    if not stopped:
        click.echo("nothing was running")


@stack.command("status")
@_state_dir_option
@click.option("--json", "as_json", is_flag=True, help="print a JSON list of services")
def stack_status(state_dir, as_json) -> None:
    """Each service: running or not, pid, URL."""
    from services import stack as local
    from services.config import default_state_dir

    rows = local.status(state_dir or default_state_dir())
    if as_json:
        _echo_json(rows)
        return
    for r in rows:
        r["state"] = "running" if r["running"] else "stopped"
    _table(rows, [("name", "SERVICE"), ("state", "STATE"), ("pid", "PID"), ("url", "URL"), ("log", "LOG")])
    if not any(r["running"] for r in rows):
        sys.exit(3)


def main() -> None:
    cli(prog_name="facenet-cli")


if __name__ == "__main__":
    main()
