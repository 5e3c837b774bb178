"""MLflow down mid-training: does training slow, and does every metric still arrive?

`python -m services.bench.outage [--epochs 30] [--outage 60] [--out build/bench_outage.json]` starts a
private local stack (free ports, its own state dir) and runs the same training twice on the sample data,
logging to the stack's MLflow server:
  baseline: MLflow up the whole time;
  outage:   the MLflow server is killed (kill -9) after the first epoch, left down for --outage seconds,
            then restarted (`facenet-cli stack up`; on a small host the new server's start-up competes
            with the trainer for the cores, so the epochs it overlaps are reported apart).
It reports each run's per-epoch img/s, the mean over the epochs trained entirely while MLflow was down
beside the same epochs of the baseline (their ratio), and whether the outage run's MLflow record is whole
after the return: every epoch's metrics, status FINISHED, no record lost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time


def _epochs(events_path: str) -> list[dict]:
    with open(events_path, encoding="utf-8") as fh:
        return [e for e in map(json.loads, fh) if e["event"] == "epoch"]


def _result(args, data: str, runs: dict, logged: list[int], status: str) -> dict:
    """The JSON result: throughput of the epochs trained while MLflow was down (and while it restarted, and
    after) beside the same epochs of the baseline run, and whether every epoch reached MLflow after all."""
    base, out_run = runs["baseline"], runs["outage"]
    base_fps = {e["epoch"]: e["fps"] for e in base["epochs"]}
    # Epochs trained entirely while the server was down, before its restart began: they started after the kill
    # and ended before `stack up` started a new server (whose start-up takes CPU from the trainer on a small host).
    during = [e for e in out_run["epochs"]
              if e["time"] - e["epoch_time"] >= out_run["down_at"] and e["time"] <= out_run["restart_at"]]
    restart = [e for e in out_run["epochs"]
               if e["time"] > out_run["restart_at"] and e["time"] - e["epoch_time"] < out_run["up_at"]]
    after = [e for e in out_run["epochs"] if e["time"] - e["epoch_time"] >= out_run["up_at"]]
    mean = lambda xs: round(statistics.fmean(xs), 2) if xs else None  # noqa: E731
    during_fps = mean([e["fps"] for e in during])
    base_same = mean([base_fps[e["epoch"]] for e in during])
    result = {
        "host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "job": {"epochs": args.epochs, "batch_size": args.batch_size, "image_size": args.image_size, "data": data,
                "device": "cpu", "amp": True},
        "outage_seconds": round(out_run["up_at"] - out_run["down_at"], 1),
        "server_restart_seconds": round(out_run["up_at"] - out_run["restart_at"], 1),
        "epochs_during_outage": [e["epoch"] for e in during],
        "epochs_during_server_restart": [e["epoch"] for e in restart],
        "fps": {"baseline_same_epochs": base_same, "during_outage": during_fps,
                "during_server_restart": mean([e["fps"] for e in restart]),
                "baseline_same_epochs_as_restart": mean([base_fps[e["epoch"]] for e in restart]),
                "outage_run_after_return": mean([e["fps"] for e in after]),
                "baseline_run": base["summary"]["fps"], "outage_run": out_run["summary"]["fps"]},
        "ratio_during_outage_to_baseline": round(during_fps / base_same, 4) if during_fps and base_same else None,
        "per_epoch_fps": {"baseline": [e["fps"] for e in base["epochs"]],
                          "outage": [e["fps"] for e in out_run["epochs"]]},
        "mlflow_after_return": {"epochs_logged": len(logged), "epochs": args.epochs,
                                "all_epochs": logged == list(range(1, args.epochs + 1)), "status": status,
                                "lost_records": out_run["summary"].get("mlflow_lost_records"),
                                "trainer_said_it_retried": out_run["retried"]},
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.bench.outage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20, help="epochs of each run (more than the outage lasts)")
    p.add_argument("--outage", type=float, default=60.0, help="seconds the MLflow server stays down")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size")
    p.add_argument("--image-size", type=int, default=96, help="crop side the trainer uses")
    p.add_argument("--data", help="face crops to train on (default: the cached sample data set, 8 people)")
    p.add_argument("--out", default=os.path.join("build", "bench_outage.json"), help="JSON result file")
    args = p.parse_args(argv)

    from services.bench.jobs import private_stack, write_result
    from services.procs import stop_group

    setup = private_stack(args.data, "facenet-bench-outage-")
    if setup is None:
        return 2
    data, state, env, cli = setup

    def stack() -> dict:
        with open(os.path.join(env["FACENET_STATE_DIR"], "stack.json"), encoding="utf-8") as fh:
            return json.load(fh)

    up = cli("stack", "up")
    if up.returncode != 0:
        print(up.stdout + up.stderr, file=sys.stderr)
        return 1
    runs: dict[str, dict] = {}
    try:
        uri = stack()["mlflow_uri"]
        for name in ("baseline", "outage"):
            out = os.path.join(state, "work", name)
            cmd = [sys.executable, "-m", "services.cli", "train", "--data", data, "--epochs", str(args.epochs),
                   "--batch-size", str(args.batch_size), "--lr", "0.001", "--amp", "--image-size", str(args.image_size),
                   "--device", "cpu", "--experiment", "bench-outage", "--no-log-model", "--log-checkpoints", "none",
                   "--mlflow-uri", uri, "--output", out, "--json-out", os.path.join(out, "summary.json")]
            print(f"{name}: facenet-cli train ({args.epochs} epochs) ...", flush=True)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            down_at = up_at = restart_at = None
            if name == "outage":
                events = os.path.join(out, "events.jsonl")
                while not (os.path.exists(events) and _epochs(events)):
                    if proc.poll() is not None:
                        break
                    time.sleep(0.2)
                if proc.poll() is None:
                    os.killpg(stack()["services"]["mlflow"]["pid"], signal.SIGKILL)
                    stop_group(stack()["services"]["mlflow"]["pid"], grace=1)
                    down_at = time.time()
                    print(f"  MLflow killed after epoch 1; down for {args.outage:.0f} s", flush=True)
                    while time.time() - down_at < args.outage and proc.poll() is None:
                        time.sleep(0.5)
                    restart_at = time.time()
                    restarted = cli("stack", "up")
                    up_at = time.time()
                    if restarted.returncode != 0:
                        print(restarted.stdout + restarted.stderr, file=sys.stderr)
                        return 1
                    print("  MLflow back", flush=True)
            output, _ = proc.communicate()
            if proc.returncode != 0:
                print(output[-3000:], file=sys.stderr)
                return 1
            with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
                summary = json.load(fh)
            runs[name] = {"summary": summary, "epochs": _epochs(os.path.join(out, "events.jsonl")),
                          "down_at": down_at, "up_at": up_at, "restart_at": restart_at, "retried": "retr" in output}
        from mlflow.tracking import MlflowClient

        from services.stack.local import use_mlflow_login

        use_mlflow_login(stack())
        client = MlflowClient(uri)
        run_id = runs["outage"]["summary"]["mlflow_run_id"]
        logged = sorted({m.step for m in client.get_metric_history(run_id, "fps")})
        status = client.get_run(run_id).info.status
    finally:
        cli("stack", "down")
        shutil.rmtree(state, ignore_errors=True)

    result = _result(args, data, runs, logged, status)
    write_result(args.out, result, {k: v for k, v in result.items() if k != "per_epoch_fps"})
    ok = result["mlflow_after_return"]["all_epochs"] and status == "FINISHED" and result["epochs_during_outage"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
