"""`runs`: training runs from MLflow, listed or compared."""

from __future__ import annotations

import click

from services.cli.common import echo_json, fail, fmt, table


@click.command()
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
    from services.queue import mlflow_runs
    from services.config import load_settings

    settings = load_settings()
    if run_refs and not compare:
        fail(UserError("RUN arguments go with --compare (runs --compare RUN RUN...)"))
    try:
        if not settings.mlflow_uri:
            raise UserError("no MLflow server known: start the stack or set FACENET_MLFLOW_URI")
        mlflow_runs.check_reachable(settings.mlflow_uri)
        if compare:
            from services.queue.compare import compare as compare_runs, format_table

            report = compare_runs(settings.mlflow_uri, list(run_refs), experiment or settings.experiment, plot)
        else:
            rows = mlflow_runs.list_runs(settings.mlflow_uri, experiment or settings.experiment, limit,
                                         browse_uri=settings.mlflow_browse_uri)
    except UserError as exc:
        fail(exc)
    if compare:
        if as_json:
            echo_json(report)
            return
        click.echo(format_table(report))
        if report["plot"]:
            click.echo(f"\nplot: {report['plot']}")
        click.echo(f"logged to run {report['logged_to']} (compare/)")
        return
    if as_json:
        echo_json(rows)
        return
    shown = [{"run": r["run_id"][:12], "job": r["tags"].get("job_id"), "npus": r["tags"].get("npus"),
              "device": r["tags"].get("device_type"), "amp": r["tags"].get("amp"), "epochs": r["params"].get("epochs"),
              "fps": fmt(r["metrics"].get("final_fps", r["metrics"].get("fps")), 1),
              "acc1": fmt(r["metrics"].get("final_acc1", r["metrics"].get("acc1")), 4), "status": r["status"],
              "name": r["name"]} for r in rows]
    table(shown, [("run", "RUN"), ("job", "JOB"), ("npus", "NPUS"), ("device", "DEVICE"), ("amp", "AMP"),
                   ("epochs", "EPOCHS"), ("fps", "FPS"), ("acc1", "ACC1"), ("status", "STATUS"), ("name", "NAME")])
