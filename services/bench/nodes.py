"""Scaling over nodes: the same training job on 1 node and on 2 nodes, through the queue, in one invocation.

`python -m services.bench.nodes [--epochs 4] [--out build/bench_nodes.json]` starts a private local stack with
two CPU device workers ("nodes", `stack up --device-workers 2`), each owning one device and half of this host's
cores (FACENET_CPU_THREADS), then runs on the sample data set, with the same global batch:

  1 node:  `submit-train --npus 1 --wait`  (one process on one node's cores)
  2 nodes: `submit-train --npus 2 --wait`  (a gang: torchrun --nnodes 2, one process on each node)

and reports each job's throughput (its images over its wall time, as MLflow gets it, and the median of its
epochs after the first), the scaling efficiency (2-node img/s over twice the 1-node img/s: 1.0 is perfect), the
time from submit to the trainer's start and to all ranks training (the job's first step: it completes only once
every rank has joined the rendezvous and given its gradients), and what each step sends between the nodes.

On one host the two nodes are not two machines: they share its memory bandwidth, the loopback "network" costs
the same cores that train, and Redis, MLflow and Flower run beside them. Expect below 1; on real nodes the
gradient all-reduce goes over the cluster network instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time

from facenet.runenv import cpu_share
from services.bench.jobs import private_stack, write_result


def _run(cli, common: list[str], npus: int) -> dict:
    """Submit one job and wait for it; its record, events and timings."""
    t0 = time.perf_counter()
    done = cli("submit-train", *common, "--npus", str(npus), "--device-type", "cpu", "--wait", "--json")
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"the {npus}-node job failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    job = json.loads(done.stdout)
    record = json.loads(cli("status", job["id"], "--json").stdout)
    events = []
    with open(os.path.join(record["output"], "events.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    steps = [e["time"] for e in events if e.get("event") == "step"]
    epochs = [e["fps"] for e in events if e.get("event") == "epoch" and e.get("fps")]
    result = record.get("result") or {}
    return {
        "job": record["id"], "nodes": record.get("nodes"), "world_size": result.get("world_size"),
        "fps": result.get("fps"), "epoch_fps": epochs,
        "steady_fps": round(statistics.median(epochs[1:] or epochs), 2) if epochs else None,
        "acc1": result.get("acc1"), "wall_seconds": round(wall, 2),
        "submit_to_trainer_start_seconds": round(record["trainer_started"] - record["created"], 3),
        "submit_to_all_ranks_training_seconds": round(min(steps) - record["created"], 3) if steps else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.bench.nodes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4, help="epochs of each job (4: about 5 minutes in all on 2 cores)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size, the same for both jobs")
    p.add_argument("--data", help="face crops to train on (default: the cached sample data set, 8 people)")
    p.add_argument("--image-size", type=int, default=96, help="crop side the trainer uses")
    p.add_argument("--out", default=os.path.join("build", "bench_nodes.json"), help="JSON result file")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 2:
        print("error: --epochs must be at least 1 and --batch-size at least 2 (one sample per node)", file=sys.stderr)
        return 2

    setup = private_stack(args.data, "facenet-bench-nodes-")
    if setup is None:
        return 2
    data, state, env, cli = setup
    up = cli("stack", "up", "--device-workers", "2", "--cpu-devices", "0")
    if up.returncode != 0:
        print(up.stdout + up.stderr, file=sys.stderr)
        return 1
    common = ["--data", data, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", "0.001",
              "--amp", "--experiment", "bench-nodes", "--image-size", str(args.image_size), "--log-every", "1",
              "--no-log-model", "--log-checkpoints", "none"]
    try:
        runs = {}
        for name, npus in (("1 node", 1), ("2 nodes", 2)):
            print(f"{name}: facenet-cli submit-train --npus {npus} ({args.epochs} epochs) ...", flush=True)
            runs[name] = _run(cli, common, npus)
            print(f"  {runs[name]['fps']} img/s, {runs[name]['wall_seconds']} s", flush=True)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        cli("stack", "down")
        shutil.rmtree(state, ignore_errors=True)
    from facenet.model import build_model

    params = sum(p.numel() for p in build_model(8, None).parameters() if p.requires_grad)
    one, two = runs["1 node"], runs["2 nodes"]
    result = {
        "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                 "threads_per_node": cpu_share(2)},
        "job": {"epochs": args.epochs, "batch_size": args.batch_size, "image_size": args.image_size, "data": data,
                "device": "cpu", "amp": "bf16"},
        "runs": runs,
        "scaling_efficiency": round(two["fps"] / (2 * one["fps"]), 4),
        "steady_scaling_efficiency": round(two["steady_fps"] / (2 * one["steady_fps"]), 4)
        if one["steady_fps"] and two["steady_fps"] else None,
        "speedup": round(two["fps"] / one["fps"], 4),
        "allreduce_bytes_per_step": params * 4,
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
