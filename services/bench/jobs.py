"""Queue overhead: the same training job run directly and through the queue, in one invocation.

`python -m services.bench.jobs [--epochs 20] [--out build/bench_queue.json]` starts a private local
stack (free ports, its own state dir), then runs, on the sample data set:
  direct: `facenet-cli train --data D ... --mlflow-uri <stack MLflow>` (wall time of the command)
  queue:  `facenet-cli submit-train --data D ... --wait` (wall time of the command)
and reports both, their ratio, and the time from submit until the trainer process started (from the
job record: created -> trainer_started). Both log to the same MLflow server, so the difference is
what the queue adds: sending, a worker taking the message, leasing, creating the run, following.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time


def private_stack(data_arg: str | None, prefix: str):
    """For a benchmark's own local stack: (the data to train on: --data or the cached sample set, a fresh
    temporary folder, the environment of a stack on free ports, a `facenet-cli` runner in that environment);
    None (said on stderr) when --data is no folder. The temporary folder holds the stack's state in `stack/`
    and the benchmark's outputs in `work/`; the stack is confined to `work/` and the data, never to a folder
    that holds its own state (secrets)."""
    from facenet.samples import build_sample_dataset, cache_dir
    from facenet.fsutil import free_port

    data = os.path.abspath(data_arg) if data_arg else build_sample_dataset(os.path.join(cache_dir(), "demo-data", "v2"))
    if not os.path.isdir(data):
        print(f"error: --data {data_arg}: no such directory", file=sys.stderr)
        return None
    state = tempfile.mkdtemp(prefix=prefix)
    os.makedirs(os.path.join(state, "work"))
    env = {**os.environ, "FACENET_STATE_DIR": os.path.join(state, "stack"), "FACENET_REDIS_PORT": str(free_port()),
           "FACENET_MLFLOW_PORT": str(free_port()), "FACENET_FLOWER_PORT": str(free_port()),
           "FACENET_DATA_ROOTS": os.pathsep.join([os.path.join(state, "work"), data])}
    for k in ("FACENET_REDIS_URL", "FACENET_MLFLOW_URI", "MLFLOW_TRACKING_URI", "FACENET_RUNS_DIR",
              "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # another stack's login would win over its own
        env.pop(k, None)

    def cli(*a: str, capture: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", *a], env=env, text=True, capture_output=capture)

    return data, state, env, cli


def write_result(path: str, result: dict, shown: dict | None = None) -> None:
    """A benchmark's JSON to `path` (its folder made), and `shown` (default: all of it) on stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result if shown is None else shown, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.bench.jobs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20, help="epochs of the job (20: about 2 minutes on 2 cores)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size")
    p.add_argument("--data", help="face crops to train on (default: the cached sample data set, 8 people)")
    p.add_argument("--image-size", type=int, default=160, help="crop side the trainer uses")
    p.add_argument("--no-artifacts", action="store_true",
                   help="both runs skip the MLflow model and checkpoint uploads (~20 s each on 2 cores)")
    p.add_argument("--out", default=os.path.join("build", "bench_queue.json"), help="JSON result file")
    args = p.parse_args(argv)

    setup = private_stack(args.data, "facenet-bench-queue-")
    if setup is None:
        return 2
    data, state, env, cli = setup

    up = cli("stack", "up")
    if up.returncode != 0:
        print(up.stdout + up.stderr, file=sys.stderr)
        return 1
    try:
        stack = json.load(open(os.path.join(env["FACENET_STATE_DIR"], "stack.json"), encoding="utf-8"))
        common = ["--data", data, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", "0.001",
                  "--amp", "--experiment", "bench-queue", "--image-size", str(args.image_size)]
        if args.no_artifacts:
            common += ["--no-log-model", "--log-checkpoints", "none"]
        print(f"direct: facenet-cli train ({args.epochs} epochs) ...", flush=True)
        t0 = time.perf_counter()
        direct = cli("train", *common, "--device", "cpu", "--output", os.path.join(state, "work", "direct"),
                     "--json-out", os.path.join(state, "work", "direct.json"), "--mlflow-uri", stack["mlflow_uri"])
        direct_s = time.perf_counter() - t0
        if direct.returncode != 0:
            print(direct.stdout[-3000:] + direct.stderr[-3000:], file=sys.stderr)
            return 1
        print(f"  {direct_s:.1f} s", flush=True)
        print("queue: facenet-cli submit-train --wait ...", flush=True)
        t0 = time.perf_counter()
        queued = cli("submit-train", *common, "--device-type", "cpu", "--wait", "--json")
        queue_s = time.perf_counter() - t0
        if queued.returncode != 0:
            print(queued.stdout[-3000:] + queued.stderr[-3000:], file=sys.stderr)
            return 1
        job = json.loads(queued.stdout)
        record = json.loads(cli("status", job["id"], "--json").stdout)
        print(f"  {queue_s:.1f} s", flush=True)
        with open(os.path.join(state, "work", "direct.json"), encoding="utf-8") as fh:
            direct_summary = json.load(fh)
    finally:
        cli("stack", "down")
        shutil.rmtree(state, ignore_errors=True)  # two runs' checkpoints and MLflow artifacts: ~1 GB
    result = {
        "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "job": {"epochs": args.epochs, "batch_size": args.batch_size, "image_size": args.image_size, "data": data,
                "device": "cpu", "amp": "bf16", "artifacts": not args.no_artifacts},
        "direct_seconds": round(direct_s, 2), "queue_seconds": round(queue_s, 2),
        "ratio": round(queue_s / direct_s, 4), "overhead_percent": round(100 * (queue_s / direct_s - 1), 2),
        "submit_to_trainer_start_seconds": round(record["trainer_started"] - record["created"], 3),
        "fps": {"direct": direct_summary["fps"], "queue": (record.get("result") or {}).get("fps")},
        "goal": {"overhead_percent_max": 10, "submit_to_trainer_start_seconds_max": 3},
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
