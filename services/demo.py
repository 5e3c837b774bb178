"""`make demo`: the main job on the embedded default (no Docker, no accelerator).

Builds a small raw data set from real face photos that public wheels ship,
MTCNN-crops it, starts a local MLflow server, trains on the CPU with bf16
AMP, and prints the MLflow run URL, FPS and held-out Acc@1. The queue path
(Redis, Celery workers, `submit-train --wait`) replaces the direct training
call once the service layer lands.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

from facenet.data.samples import build_sample_dataset, cache_dir
from facenet.errors import UserError
from services.entrypoints import free_port, start_mlflow_server


def start_mlflow(state_dir: str) -> tuple[subprocess.Popen, str]:
    port = int(os.environ.get("FACENET_MLFLOW_PORT") or free_port())
    return start_mlflow_server(state_dir, port), f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.demo", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--state-dir", default=os.path.join("build", "demo"), help="MLflow db, artifacts, run output")
    p.add_argument("--epochs", type=int, default=8, help="training epochs")
    p.add_argument("--keep-mlflow", action="store_true", help="leave the MLflow server running to browse the run")
    args = p.parse_args(argv)
    try:
        print("building the sample data set (8 real people x 40 raw photos -> MTCNN preprocessing; cached) ...",
              flush=True)
        faces = build_sample_dataset(os.path.join(cache_dir(), "demo-data", "v2"))
        proc, uri = start_mlflow(os.path.join(args.state_dir, "mlflow"))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"MLflow server: {uri}", flush=True)
    summary_path = os.path.join(args.state_dir, "summary.json")
    try:
        rc = subprocess.call([sys.executable, "-m", "facenet.train", "--data", faces, "--epochs", str(args.epochs),
                              "--batch-size", "32", "--lr", "0.001", "--amp", "--device", "cpu",
                              "--output", os.path.join(args.state_dir, "train"), "--json-out", summary_path,
                              "--mlflow-uri", uri, "--experiment", "facenet-demo", "--log-every", "4"])
        if rc == 0:
            with open(summary_path, encoding="utf-8") as fh:
                s = json.load(fh)
            print(f"\ndemo finished: {s['epochs']} epochs, {s['fps']:.1f} img/s ({s['precision']}), "
                  f"held-out Acc@1 {s['acc1']:.3f}")
            print(f"MLflow run: {uri}/#/experiments/{_experiment_id(uri, s['mlflow_run_id'])}/runs/{s['mlflow_run_id']}")
        if args.keep_mlflow and rc == 0:
            print(f"MLflow keeps running (pid {proc.pid}); stop it with: kill -- -{proc.pid}")
            return 0
        print("(the MLflow server stops now; run `python -m services.demo --keep-mlflow` to browse the run)")
        return rc
    finally:
        if not args.keep_mlflow and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)


def _experiment_id(uri: str, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_run(run_id).info.experiment_id


if __name__ == "__main__":
    sys.exit(main())
