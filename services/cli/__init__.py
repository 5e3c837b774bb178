"""`facenet-cli`: the command line users (and scripts) drive the stack with. One module per command family,
each registered here: local (train, preprocess, pack, evaluate, embed, export, doctor), jobs (submit-*, status, logs, cancel,
jobs, workers), runs, stack."""

from __future__ import annotations

import click

from services.cli import jobs, local, runs, stack


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="facenet-stack")
def cli() -> None:
    """FaceNet Stack: train FaceNet on Ascend NPUs, NVIDIA GPUs or CPUs."""


for command in (local.train, local.preprocess, local.pack, local.evaluate, local.embed, local.export_model,
                local.doctor, jobs.submit_train, jobs.submit_preprocess, jobs.status, jobs.logs, jobs.cancel, jobs.jobs,
                jobs.workers, runs.runs, stack.stack):
    cli.add_command(command)


def main() -> None:
    import sys

    try:
        cli(prog_name="facenet-cli")
    except Exception as exc:  # noqa: BLE001 - only Redis' own faults become a line; the rest is a bug to see
        redis = sys.modules.get("redis")
        if redis is None or not isinstance(exc, redis.RedisError):
            raise
        # Each command opens Redis with a one-line refusal; this is Redis going away in the middle of one.
        from facenet.errors import one_line

        what = "stopped answering" if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) else "failed"
        print(f"Error: Redis {what} during the command ({type(exc).__name__}: {one_line(exc)}); "
              "it may not have finished: try it again, or see `facenet-cli jobs`", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
