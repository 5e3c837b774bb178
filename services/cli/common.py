"""What every command family shares: one-line failures, JSON and table output, time and number formats."""

from __future__ import annotations

import sys

import click

from facenet.errors import one_line


def settings_and_registry():
    from services.config import load_settings
    from services.queue.jobs import open_registry

    settings = load_settings()
    return settings, open_registry(settings)


def fail(exc: Exception):
    """One line on stderr: exit 2 for a value or path refused before anything was queued, else 1."""
    from facenet.errors import InputError

    if isinstance(exc, InputError):
        click.echo(f"Error: {one_line(exc)}", err=True)
        sys.exit(2)
    raise click.ClickException(one_line(exc)) from None


def echo_json(value) -> None:
    import json

    click.echo(json.dumps(value, indent=2, default=str))


def table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    if not rows:
        click.echo("(none)")
        return
    cells = [[("" if r.get(k) is None else str(r.get(k))) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(columns)]
    click.echo("  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)))
    for c in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def when(ts) -> str | None:
    import datetime

    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else None


def fmt(v, digits=3):
    return None if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else v)
