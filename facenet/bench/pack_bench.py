"""The loader alone, from files and from a pack, in one process: what `facenet-cli pack` buys.

The sample crops (8 real people, from photos public wheels ship) are copied into a data root of
`--images` distinct files (real files, not links, so the file system holds each one), packed, and
read three ways per source: the bytes only (what the storage does: open + read per file, or one
pread per image in an open shard), the loader's epoch (decode to uint8 tensors, the trainer's
TrainSampler order) in-process, and with `--workers` loader processes. `--cold` drops the page
cache before each pass (root only), which is where a shared file system's metadata cost shows.

    python -m facenet.bench.pack_bench --images 20000 --out build/bench_pack.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time


def _data_root(work: str, images: int) -> str:
    """A lists-layout root of `images` distinct crop files (the sample crops, copied round-robin)."""
    from facenet.samples import build_sample_dataset, cache_dir, cached

    sample = cached(os.path.join(cache_dir(), "bench-data", "sample-v2"),
                    lambda root: build_sample_dataset(root, per_identity=40, identities=8, seed=0))
    src = os.path.join(sample, "prep", "train")
    crops = [(person, name) for person in sorted(os.listdir(src)) for name in sorted(os.listdir(os.path.join(src, person)))]
    root = os.path.join(work, "files")
    lines = []
    people = sorted({p for p, _ in crops})
    for k in range(images):
        person, name = crops[k % len(crops)]
        rel = f"train/{person}/{k:07d}_{name}"
        os.makedirs(os.path.join(root, "train", person), exist_ok=True)
        shutil.copyfile(os.path.join(src, person, name), os.path.join(root, rel))
        lines.append(f"{rel} {people.index(person)}\n")
    held = lines[::5]
    with open(os.path.join(root, "train_list.txt"), "w") as fh:
        fh.writelines(line for k, line in enumerate(lines) if k % 5)
    with open(os.path.join(root, "test_list.txt"), "w") as fh:
        fh.writelines(held)
    return root


def _drop_caches(cold: bool) -> bool:
    if not cold:
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def _bytes_only(split) -> float:
    """img/s of reading each training image's bytes, in the sampler's order."""
    from facenet import confine
    from facenet.data.loader import MAX_FILE_BYTES

    samples, reader = split.train, split.train.reader
    t0 = time.perf_counter()
    for k in range(len(samples)):
        path, _ = samples[k]
        if reader is not None:
            reader.read(k, path, None, MAX_FILE_BYTES)
        else:
            confine.read_bytes(path, None, "image", MAX_FILE_BYTES)
    return len(samples) / (time.perf_counter() - t0)


def _epoch(split, workers: int, batch: int = 64) -> float:
    from facenet.data import loader

    dl = loader.train_loader(split.train, batch, 0, 1, 123456, workers, 160, False, False)
    dl.sampler.set_epoch(0)
    t0, n = time.perf_counter(), 0
    for b in dl:
        n += len(b.labels)
    seconds = time.perf_counter() - t0
    del dl
    return n / seconds


def run(images: int, workers: int, work: str, cold: bool, repeats: int) -> dict:
    from facenet.data.dataset import load_dataset
    from facenet.pack import pack

    t0 = time.perf_counter()
    root = _data_root(work, images)
    built = time.perf_counter() - t0
    summary = pack(root, os.path.join(work, "packed"), progress=False)
    sources = {"files": load_dataset(root), "packed": load_dataset(os.path.join(work, "packed"))}
    out = {"images": images, "train_images": len(sources["files"].train), "build_seconds": round(built, 1),
           "pack": {k: summary[k] for k in ("seconds", "img_per_s", "shards", "bytes")}, "passes": {}}
    for how, fn in (("bytes_only", _bytes_only), ("epoch_in_process", lambda s: _epoch(s, 0)),
                    (f"epoch_{workers}_workers", lambda s: _epoch(s, workers))):
        row = {}
        for name, split in sources.items():
            rates = []
            for _ in range(repeats):
                dropped = _drop_caches(cold)
                rates.append(fn(split))
            row[name] = round(max(rates), 1)
            row["cache_dropped"] = dropped if cold else False
        row["packed_vs_files"] = round(row["packed"] / row["files"], 3)
        out["passes"][how] = row
        print(f"{how:>20}: files {row['files']:9.1f} img/s   packed {row['packed']:9.1f} img/s   "
              f"x{row['packed_vs_files']}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m facenet.bench.pack_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="passes per measurement (the best is kept)")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each pass (needs root)")
    p.add_argument("--work", default=None, help="scratch folder (default: under build/, removed after)")
    p.add_argument("--out", default="build/bench_pack.json")
    args = p.parse_args(argv)
    work = args.work or os.path.join("build", f"bench-pack-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    try:
        result = {"benchmark": "pack", "cpu_cores": len(os.sched_getaffinity(0)),
                  **run(args.images, args.workers, work, args.cold, args.repeats)}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
