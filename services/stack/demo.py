"""`make demo`: the main job on the embedded default (no Docker, no accelerator), through the queue.

1. `facenet-cli stack up`: Redis, MLflow, Flower, a preprocessing worker and a CPU device worker as
   local processes (state in $FACENET_STATE_DIR, default ~/.facenet/stack);
2. a small raw data set (8 real people x 40 loosely cropped photos) made from the face photos that
   the scikit-image and insightface wheels ship (fetched once with `pip download --no-deps`);
3. `facenet-cli submit-train --preprocess-from RAW --data FACES --amp --wait`: MTCNN preprocessing in
   shards on the preprocess queue, then CPU bf16 training on train.cpu, logged to MLflow;
4. prints the MLflow run URL, FPS and held-out Acc@1, and leaves the stack up to browse
   (`facenet-cli stack down` stops it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from facenet.errors import UserError


def main(argv: list[str] | None = None) -> int:
    from services.config import default_state_dir

    p = argparse.ArgumentParser(prog="python -m services.stack.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--state-dir", default=default_state_dir(), help="the local stack's state (default %(default)s)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (default %(default)s)")
    p.add_argument("--down", action="store_true", help="stop the stack at the end")
    args = p.parse_args(argv)
    state_dir = os.path.abspath(args.state_dir)
    env = {**os.environ, "FACENET_STATE_DIR": state_dir}

    def cli(*cli_args: str, capture: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", *cli_args], env=env, text=True,
                              capture_output=capture)

    print(f"== 1/3 local stack ({state_dir})", flush=True)
    if cli("stack", "up", "--state-dir", state_dir).returncode != 0:
        return 2
    print("\n== 2/3 raw photos of 8 real people (from the scikit-image / insightface wheels; cached)", flush=True)
    from facenet.samples import make_raw_identities

    # In the stack's first data root (default ~/facenet-data): jobs read only beneath the roots, and the
    # state folder (credentials, stores) is never one of them.
    data_root = json.load(open(os.path.join(state_dir, "stack.json"), encoding="utf-8"))["data_roots"][0]
    raw = os.path.join(data_root, "demo-raw")
    faces = os.path.join(data_root, "demo-faces")
    try:
        counts = make_raw_identities(raw, per_identity=40, identities=8)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{sum(counts.values())} raw photos in {raw}", flush=True)
    print("\n== 3/3 submit-train --preprocess-from RAW --wait (MTCNN shards, then CPU bf16 training)", flush=True)
    rc = cli("submit-train", "--preprocess-from", raw, "--data", faces, "--epochs", str(args.epochs),
             "--batch-size", "32", "--lr", "0.001", "--amp", "--device-type", "cpu", "--log-every", "4",
             "--wait").returncode
    stack = json.load(open(os.path.join(state_dir, "stack.json"), encoding="utf-8"))
    if args.down:
        cli("stack", "down", "--state-dir", state_dir)
    else:
        print(f"\nThe stack keeps running: MLflow {stack['mlflow_uri']} (user {stack['mlflow_username']}), Flower "
              f"{stack['flower_url']} (user {stack['flower_user']}); passwords in {state_dir}/secrets.env.")
        print("Compare runs with `facenet-cli runs`; stop everything with `facenet-cli stack down`.")
    return rc


if __name__ == "__main__":
    sys.exit(main())
