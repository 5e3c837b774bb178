"""`facenet-cli`: the command line users (and scripts) drive the stack with."""

from __future__ import annotations

import sys

import click


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
    from facenet.train.launch import main as train_main

    sys.exit(train_main(list(args), prog="facenet-cli train"))


def main() -> None:
    cli(prog_name="facenet-cli")


if __name__ == "__main__":
    main()
