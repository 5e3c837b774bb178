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
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    reasons = ", ".join(f"{k}: {v}" for k, v in summary["reject_reasons"].items()) or "none"
    click.echo(f"{summary['images']} images -> {summary['faces']} faces, {summary['rejects']} rejected ({reasons})")
    click.echo(f"processed {summary['processed']} in {summary['seconds']:.1f} s ({summary['img_per_s']:.1f} img/s) "
               f"with {summary['workers']} worker(s); {summary['skipped']} already done")
    click.echo(f"lists: {summary['train_list']} train / {summary['test_list']} held out over "
               f"{summary['classes']} identities; manifest {summary['manifest']}")


def main() -> None:
    cli(prog_name="facenet-cli")


if __name__ == "__main__":
    main()
