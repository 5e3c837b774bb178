"""Commands of the queue: submit a job, watch it, cancel it, list jobs and workers."""

from __future__ import annotations

import sys

import click

from services.cli.common import echo_json, fail, fmt, settings_and_registry, table, when


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
            bar.set_postfix({k: fmt(p.get(k), 2 if k == "fps" else 4) for k in ("epoch", "loss", "fps", "acc1")
                             if p.get(k) is not None}, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _wait_and_report(reg, job: dict, show_log: bool, as_json: bool) -> None:
    from services.config import load_settings
    from services.queue.jobs import exit_code, follow, view

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
        echo_json({**view(final), "mlflow_url": _run_url(load_settings(), final.get("mlflow_run_id"))})
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
    from services.queue.mlflow_runs import run_url

    try:
        from services.queue.mlflow_runs import client

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
    g.add_argument("--align", action="store_true", help="preprocessing: warp faces by their five landmarks onto "
                   "ArcFace's template instead of cropping their boxes")
    g.add_argument("--shard-size", type=int, default=0, help="preprocessing: images per shard (0: auto)")
    g.add_argument("--wait", action="store_true", help="show progress until the job ends; exit non-zero if it fails")
    g.add_argument("--json", dest="as_json", action="store_true", help="print the job (or with --wait its end state) as JSON")
    return p


@click.command("submit-train", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                               "help_option_names": []}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def submit_train(args: tuple[str, ...]) -> None:
    """Queue a training job: every `train` option plus --device-type, --preprocess-from, --wait, --json."""
    from facenet.errors import InputError, UserError
    from facenet.preprocess.plan import Params
    from facenet.spec import SERVICE_OWNED
    from facenet.train.options import get_args_parser, spec_from_namespace
    from services.config import load_settings
    from services.queue.jobs import check_train_submission, open_registry, submit_train as submit, view

    ns = _submit_parser().parse_args(list(args))
    defaults = vars(get_args_parser().parse_args(["--data", "x"]))
    for name in (*SERVICE_OWNED, "spec"):  # --spec FILE would replace every flag, the service's too
        if getattr(ns, name, None) != defaults.get(name):
            fail(InputError(f"--{name.replace('_', '-')}: chosen by the service for queued jobs; "
                            "use `facenet-cli train` to set it yourself"))
    if not ns.data:
        fail(InputError("--data is required (the dataset root; with --preprocess-from, where the crops go)"))
    device_type = ns.device_type or (ns.device if ns.device != "auto" else "auto")
    try:
        # Every value and path is checked before Redis is even asked: bad input queues nothing.
        spec = spec_from_namespace(ns, list(args))
        params = Params(image_size=ns.image_size, shard_size=ns.shard_size, detect_size=ns.detect_size,
                        min_face_frac=ns.min_face_frac, holdout=ns.holdout, seed=ns.seed, align=ns.align)
        settings = load_settings()
        submission = check_train_submission(settings, spec, device_type, ns.preprocess_from, params, ns.experiment)
        reg = open_registry(settings)
        job = submit(settings, reg, submission)
    except UserError as exc:
        fail(exc)
    if not ns.wait:
        if ns.as_json:
            echo_json(view(job))
        else:
            click.echo(f"job {job['id']} queued on train.{job['device_type']} ({job['npus']} device(s))"
                       + (" after preprocessing" if ns.preprocess_from else ""))
            click.echo(f"  facenet-cli status {job['id']}   |   facenet-cli logs -f {job['id']}")
        return
    if not ns.as_json:
        click.echo(f"job {job['id']} submitted; waiting (Ctrl-C stops watching, not the job)")
    _wait_and_report(reg, job, show_log=False, as_json=ns.as_json)


@click.command("submit-preprocess")
@click.argument("raw")
@click.argument("out")
@click.option("--shard-size", type=int, default=0, show_default=True, help="images per shard (0: auto)")
@click.option("--image-size", type=int, default=160, show_default=True, help="side of the square face crop")
@click.option("--margin", type=int, default=0, show_default=True, help="margin around the face, in crop pixels")
@click.option("--detect-size", type=int, default=640, show_default=True, help="detection image side")
@click.option("--min-face-frac", type=float, default=0.1, show_default=True, help="smallest face / shorter side")
@click.option("--align", is_flag=True, help="warp faces by their five landmarks onto ArcFace's template")
@click.option("--holdout", type=float, default=0.2, show_default=True, help="held-out fraction in test_list.txt")
@click.option("--seed", type=int, default=123456, show_default=True, help="seed of the held-out choice")
@click.option("--wait", is_flag=True, help="show progress until done; exit non-zero on failure")
@click.option("--json", "as_json", is_flag=True, help="print the job as JSON")
def submit_preprocess(raw, out, shard_size, image_size, margin, detect_size, min_face_frac, align, holdout, seed,
                      wait, as_json) -> None:
    """Queue MTCNN preprocessing of RAW into OUT, in shards on the preprocess queue."""
    from facenet.errors import UserError
    from facenet.preprocess.plan import Params
    from services.config import load_settings
    from services.queue.jobs import check_preprocess_submission, open_registry, submit_preprocess as submit, view

    try:
        params = Params(image_size=image_size, margin=margin, shard_size=shard_size, detect_size=detect_size,
                        min_face_frac=min_face_frac, holdout=holdout, seed=seed, align=align)
        settings = load_settings()
        submission = check_preprocess_submission(settings, raw, out, params)
        reg = open_registry(settings)
        job = submit(settings, reg, submission)
    except UserError as exc:
        fail(exc)
    if wait:
        _wait_and_report(reg, job, show_log=False, as_json=as_json)
    elif as_json:
        echo_json(view(job))
    else:
        click.echo(f"job {job['id']} queued on preprocess")


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="print the job as JSON")
def status(job_id, as_json) -> None:
    """One job: status, progress, MLflow run, error."""
    from facenet.errors import UserError
    from services.queue.jobs import view

    try:
        settings, reg = settings_and_registry()
        job = view(reg.find(job_id))
    except UserError as exc:
        fail(exc)
    job["mlflow_url"] = _run_url(settings, job["mlflow_run_id"])
    if len(job["nodes"] or []) > 1:  # a gang: what each other node's agent last said of its trainer
        from services.queue.gang import node_states

        job["node_states"] = node_states(reg, job["id"], job["nodes"])
    if job["status"] == "QUEUED":  # what keeps it waiting: workers of its type that failed their doctor check
        job["unfit_workers"] = {w["node"]: w["unfit"] for w in reg.workers()
                                if w.get("unfit") and w.get("unfit_type") == job.get("device_type")}
    if as_json:
        echo_json(job)
        return
    p = job["progress"]
    click.echo(f"job {job['id']} ({job['kind']}): {job['status']}" + (f" - {job['message']}" if job["message"] else ""))
    click.echo(f"  created {when(job['created'])}, started {when(job['started'])}, finished {when(job['finished'])}, "
               f"attempts {job['attempts']}")
    if job["kind"] == "train":
        click.echo(f"  {job['npus']} {job['device_type']} device(s) on {job['worker'] or '-'}; epoch {p['epoch']}/"
                   f"{p['epochs']} step {p['step']}/{p['steps']}; fps {fmt(p['fps'], 1)}; loss {fmt(p['loss'], 4)}; "
                   f"acc1 {fmt(p['acc1'], 4)}")
        click.echo(f"  MLflow run {job['mlflow_url'] or job['mlflow_run_id'] or '-'}; "
                   f"checkpoint {job['checkpoint'] or '-'}")
        for n in job.get("node_states") or []:
            click.echo(f"  node {n['rank']}: {n['node']}" + (f", trainer {n['trainer']}" if n["rank"] else ""))
    for node, why in (job.get("unfit_workers") or {}).items():
        click.echo(f"  not on {node}: it failed its doctor check and takes no jobs ({why})")
    if job["error"]:
        click.echo(f"  error: {job['error']}")


@click.command()
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines (with a progress bar) until the job ends")
def logs(job_id, follow) -> None:
    """The trainer's output of a job (the last 5000 lines are kept in Redis; all in OUTPUT/train.log)."""
    from facenet.errors import UserError

    try:
        _, reg = settings_and_registry()
        job = reg.find(job_id)
    except UserError as exc:
        fail(exc)
    if follow:
        _wait_and_report(reg, job, show_log=True, as_json=False)
    lines, _ = reg.read_log(job["id"])
    for line in lines:
        click.echo(line)


@click.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="print the job as JSON")
def cancel(job_id, as_json) -> None:
    """Stop a job: a queued one at once, a running one by killing its trainer's process group."""
    from facenet.errors import UserError
    from services.queue.jobs import cancel as do_cancel, view

    try:
        settings, reg = settings_and_registry()
        job = do_cancel(reg, job_id, mlflow_uri=settings.mlflow_uri)
    except UserError as exc:
        fail(exc)
    if as_json:
        echo_json(view(job))
    else:
        click.echo(f"job {job['id']}: {job['status']}" + (f" ({job['message']})" if job.get("message") else ""))
    if job["status"] not in ("CANCELLED", "SUCCEEDED", "FAILED"):
        sys.exit(1)


@click.command()
@click.option("--limit", type=int, default=50, show_default=True, help="newest jobs shown")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
def jobs(limit, as_json) -> None:
    """Recent jobs, newest first."""
    from facenet.errors import UserError
    from services.queue.jobs import view

    try:
        _, reg = settings_and_registry()
        rows = [view(j) for j in reg.jobs(limit)]
    except UserError as exc:
        fail(exc)
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        r["created_at"] = when(r["created"])
        r["epoch"] = f"{r['progress']['epoch'] or 0}/{r['progress']['epochs'] or '-'}"
        r["fps"] = fmt(r["progress"]["fps"], 1)
        r["acc1"] = fmt(r["progress"]["acc1"], 4)
        r["devices"] = f"{r['npus']} {r['device_type']}" if r["npus"] else ""
    table(rows, [("id", "JOB"), ("kind", "KIND"), ("status", "STATUS"), ("devices", "DEVICES"), ("epoch", "EPOCH"),
                  ("fps", "FPS"), ("acc1", "ACC1"), ("created_at", "CREATED"), ("error", "ERROR")])


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
def workers(as_json) -> None:
    """Live workers: queues, devices and which job leases each device."""
    from facenet.errors import UserError

    try:
        _, reg = settings_and_registry()
        rows = reg.workers()
        for w in rows:
            if w.get("devices") is not None:
                w["leases"] = {str(d): j for d, j in reg.leases(w["node"], w["devices"]).items()}
    except UserError as exc:
        fail(exc)
    if as_json:
        echo_json(rows)
        return
    for w in rows:
        w["queues_"] = ",".join(w.get("queues", []))
        if w.get("devices") is not None:
            busy = sum(1 for j in w["leases"].values() if j)
            w["devices_"] = f"{len(w['devices'])} {w['device_type']} ({busy} leased)"
        if w.get("unfit"):
            w["devices_"] = f"none: failed doctor ({w['unfit']})"
    table(rows, [("node", "WORKER"), ("queues_", "QUEUES"), ("concurrency", "SLOTS"), ("devices_", "DEVICES"),
                  ("pid", "PID")])
