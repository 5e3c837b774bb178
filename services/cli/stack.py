"""`stack up|down|status`: the local stack (no Docker)."""

from __future__ import annotations

import os
import sys

import click

from services.cli.common import echo_json, fail, table


@click.group()
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
    from services.stack import local
    from services.config import default_state_dir

    state_dir = state_dir or default_state_dir()
    try:
        s = local.up(state_dir, cpu_devices, progress=(lambda m: None) if as_json else click.echo,
                     device_workers=device_workers, data_roots=list(data_roots) or None)
    except UserError as exc:
        fail(exc)
    if as_json:
        echo_json(local.status(state_dir))
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
    from services.stack import local
    from services.config import default_state_dir

    stopped = local.down(state_dir or default_state_dir(), progress=click.echo)
    if not stopped:
        click.echo("nothing was running")


@stack.command("status")
@_state_dir_option
@click.option("--json", "as_json", is_flag=True, help="print a JSON list of services")
def stack_status(state_dir, as_json) -> None:
    """Each service: running or not, pid, URL."""
    from services.stack import local
    from services.config import default_state_dir

    rows = local.status(state_dir or default_state_dir())
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        r["state"] = "running" if r["running"] else "stopped"
    table(rows, [("name", "SERVICE"), ("state", "STATE"), ("pid", "PID"), ("url", "URL"), ("log", "LOG")])
    if not any(r["running"] for r in rows):
        sys.exit(3)
