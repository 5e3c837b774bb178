"""python -m facenet.bench [--out FILE]: run the benchmarks and write one JSON document."""

from __future__ import annotations

import argparse
import json
import os
import sys

from facenet.errors import UserError


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m facenet.bench", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="build/bench.json", help="where the JSON results go")
    p.add_argument("--data", help="face crops (ImageFolder) for the training benchmark; default: 8 real people "
                                  "x 40 photos built from photos that public wheels ship, MTCNN-cropped, cached")
    p.add_argument("--epochs", type=int, default=8, help="epochs for both loops")
    p.add_argument("--batch-size", type=int, default=32, help="batch size for both loops (use 512 on a GPU)")
    p.add_argument("--lr", type=float, default=0.001, help="Adam learning rate for both loops")
    p.add_argument("--workers", type=int, default=None,
                   help="data loader workers for both loops (default: the trainer's default for this host)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the reference loop has no NPU path)")
    p.add_argument("--only", default="train,preprocess", help="comma-separated benchmarks to run: train, preprocess "
                   "(the CPU pipeline against the seed's), detect (MTCNN photo by photo and batched on --device), "
                   "loader (the input path alone)")
    p.add_argument("--preprocess-workers", type=int, default=2, help="processes for both preprocessing runs")
    p.add_argument("--raw-per-identity", type=int, default=120,
                   help="raw photos per person (8 people) for the preprocessing benchmark")
    p.add_argument("--train-per-identity", type=int, default=40,
                   help="photos per person (8 people) in the default training data; a GPU at batch 512 wants "
                        "thousands (2500: 20,000 crops)")
    p.add_argument("--ceiling-steps", type=int, default=10, help="steps of the compute-only ceiling loop")
    p.add_argument("--compile", default="auto", choices=("off", "auto", "default", "reduce-overhead", "max-autotune"),
                   help="also train ours compiled in this mode (auto: on cuda only; off: never)")
    p.add_argument("--detect-batch", type=int, default=32, help="photos per call of the batched MTCNN (detect)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = get_args_parser()
    args = p.parse_args(argv)
    only = {name.strip() for name in args.only.split(",")}
    unknown = only - {"train", "preprocess", "detect", "loader"}
    if unknown:
        p.error(f"--only: unknown benchmark(s) {', '.join(sorted(unknown))}")

    from facenet.bench.train_bench import run_benchmark
    from facenet.data.loader import default_workers
    from facenet.samples import build_sample_dataset, cache_dir, make_raw_identities

    workers = default_workers(1) if args.workers is None else args.workers

    results = {}
    try:
        root = os.path.join(cache_dir(), "bench-data", "v2" if args.train_per_identity == 40
                            else f"v2-{args.train_per_identity}")
        data = args.data or os.path.join(build_sample_dataset(root, per_identity=args.train_per_identity,
                                                              workers=max(1, min(16, os.cpu_count() or 1))),
                                         "train")  # identity folders
        work = os.path.join(os.path.dirname(os.path.abspath(args.out)), "bench-work")
        if "preprocess" in only:
            from facenet.bench.preprocess_bench import run_benchmark as run_preprocess_benchmark

            # 960 raw photos (8 people x 120) by default: enough that process start-up does not dominate
            raw = os.path.join(cache_dir(), "bench-data", f"raw-{8 * args.raw_per_identity}")
            make_raw_identities(raw, per_identity=args.raw_per_identity)
            results["preprocess"] = run_preprocess_benchmark(raw, work, args.preprocess_workers)
        if "train" in only:
            results["train"] = run_benchmark(data, work, args.epochs, args.batch_size, args.lr, workers,
                                             device=args.device, ceiling_steps=args.ceiling_steps,
                                             compile_mode=args.compile)
        if "loader" in only:
            from facenet.bench.device_bench import loader_alone

            results["loader"] = loader_alone(data, args.batch_size, workers, args.device)
        if "detect" in only:
            from facenet.bench.device_bench import detect_bench

            raw = os.path.join(cache_dir(), "bench-data", f"raw-{8 * args.raw_per_identity}")
            make_raw_identities(raw, per_identity=args.raw_per_identity)
            results["detect"] = detect_bench(raw, args.device, args.detect_batch)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
    print(json.dumps(results, indent=2))
    _print_tables(results)
    print(f"written to {args.out}")
    return 0


def _print_tables(results: dict) -> None:
    """The headline lines and the GPU table, from the results."""
    if "preprocess" in results:
        pre = results["preprocess"]
        print(f"preprocess: ours {pre['ours']['img_per_s']:.1f} img/s vs seed shape {pre['reference']['img_per_s']:.1f} "
              f"img/s = {pre['ratio']:.2f}x; faces {pre['ours']['faces']} vs {pre['reference']['faces']}; "
              f"mean IoU {pre['mean_iou_vs_reference']:.3f}; vs the seed with threads pinned "
              f"{pre['ratio_vs_pinned_reference']:.2f}x")
    if "train" in results:
        train = results["train"]
        print(f"train: ours {train['ours']['img_per_s']:.1f} img/s vs reference {train['reference']['img_per_s']:.1f} "
              f"img/s = {train['ratio']:.2f}x; held-out Acc@1 ours {train['ours']['acc1']:.3f}, "
              f"reference {train['reference']['acc1']:.3f}; compute-only ceiling "
              f"{train['step_ceiling']['ratio']:.2f}x")
        rows = [("reference loop (fp32)", train["reference"]), ("ours eager", train["ours"]),
                ("ours compiled", train["ours_compiled"])]
        print(f"{'training':<24} {'img/s':>9} {'MFU':>7}")
        for name, r in rows:
            if r:
                print(f"{name:<24} {r.get('img_per_s_steady') or r['img_per_s']:>9.1f} {_pct(r.get('mfu')):>7}")
        ceiling = train["step_ceiling"]
        print(f"{'compute-only ceiling':<24} {ceiling['ours']:>9.1f} {_pct(ceiling['mfu']['ours']):>7}")
    if "loader" in results:
        print(f"{'loader alone':<24} {results['loader']['img_per_s']:>9.1f}")
    if "detect" in results:
        d = results["detect"]
        for key in ("facenet_pytorch_per_photo", "ours_per_photo", "ours_batched"):
            print(f"MTCNN {key:<26} {d[key]['photos_per_s']:>9.1f} photos/s  mean IoU vs CPU "
                  f"{d[key]['mean_iou_vs_cpu']}")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
