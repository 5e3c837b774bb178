"""How data preparation scales with the number of photos N, on a synthetic VGGFace2-layout tree.

    python -m facenet.bench.scale --photos 2k,10k,100k,1M,3.31M --out build/bench_scale.json

Per N, a tree RAW/{train,test}/<id>/<file>.jpg is built (about 362 photos a person and 5% of people in
test/, as VGGFace2's 3.31M photos of 9,131 people, 500 in test/), beside OUT/ holding what preprocessing
would have written there (a crop per photo, none for the ~1% it rejects). Every file is a hard link of one
small real JPEG, so a tree of millions of photos costs directory entries only. Then each stage (plan, the
shard records, the checks before detection, one queued shard rerun, finalize, the dataset, both samplers,
a loader epoch, verification pairs and their metrics) runs in a fresh spawned process, calling the library
as the CLI and workers do, so each stage's peak RSS (VmHWM) is its own; the RSS right after the stage's
imports is reported beside it. Per stage, the fitted exponent is the least-squares slope of log(seconds)
against log(N) over the sizes run (null with one size). JSON out; a table on stderr as it goes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter

# VGGFace2: 3.31M photos of 9,131 people, 500 of them in test/.
VGGFACE2_PHOTOS, VGGFACE2_PEOPLE, VGGFACE2_TEST_PEOPLE = 3_310_000, 9_131, 500
SHARD_SIZE = 256  # what the queue's plans use at scale (Params.with_shard_size caps auto sizes there)
REJECT_EVERY = 100  # ~1% of photos "no face found"
LOADER_BATCH = 256
LOADER_CAP_ABOVE = 100_000  # above this many photos the loader epoch stops after LOADER_CAP_BATCHES
LOADER_CAP_BATCHES = 2_000
MAX_PAIRS = 600_000  # at VGGFace2's size (see pairs_for)
SEED = 123456
GOAL_SECONDS, GOAL_RSS_MIB = 300, 1536

# The modules each stage's process imports before its baseline RSS is read (those its library calls need).
STAGE_IMPORTS = {
    "plan": ["facenet.preprocess.plan"],
    "shard_records": ["facenet.preprocess.plan", "facenet.preprocess.shard"],
    "shard_checks": ["facenet.preprocess.plan", "facenet.preprocess.shard"],
    "one_queued_shard": ["facenet.preprocess.plan", "facenet.preprocess.shard"],
    "finalize": ["facenet.preprocess.plan", "facenet.preprocess.finalize"],
    "load_dataset": ["facenet.data.dataset"],
    "train_sampler": ["facenet.data.dataset", "facenet.data.loader"],
    "identity_sampler": ["facenet.data.dataset", "facenet.data.loader"],
    "loader_epoch": ["facenet.data.dataset", "facenet.data.loader", "psutil"],
    "pairs_metrics": ["facenet.verification.pairs", "facenet.verification.metrics", "numpy"],
}
STAGES = list(STAGE_IMPORTS)


# ---- sizes and the synthetic tree -------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """`2k`, `100k`, `1M`, `3.31M`, `5000` -> photos."""
    t = text.strip()
    scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:].lower(), 1)
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a size (like 2k, 100k, 1M, 3.31M or 5000)") from None
    n = int(round(value * scale))
    if n < 1000:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 1000 photos (a few people in each split)")
    return n


def parse_sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


MIN_PEOPLE, MIN_TEST_PEOPLE = 40, 4


def people_for(photos: int, people_per_1k: float) -> tuple[int, int]:
    """(people, of whom in test/): VGGFace2's ratios, with at least 4 test people (pairs need 2 folds of 2)
    and 40 people in all, so that below ~15k photos the test split stays near a tenth of the photos (fewer
    photos a person instead); at least 2 photos a person."""
    people = min(photos // 2, max(MIN_PEOPLE, round(photos * people_per_1k / 1000)))
    test = max(MIN_TEST_PEOPLE, round(people * VGGFACE2_TEST_PEOPLE / VGGFACE2_PEOPLE))
    return people, test


def pairs_for(photos: int) -> int:
    """max_pairs for generate_pairs: 600,000 at VGGFace2's size, in proportion below it, never under LFW's
    6,000. A fixed 600,000 on a small tree exhausts each fold's distinct pairs, and generate_pairs then spends
    its 20 draws per wanted pair (28.7 s at 2k photos for 187k pairs): a cost of the small tree, not of N."""
    return max(6_000, min(MAX_PAIRS, round(MAX_PAIRS * photos / VGGFACE2_PHOTOS)))


def photo_counts(photos: int, people: int, seed: int = SEED) -> list[int]:
    """Photos of each person, summing to `photos`: seeded, from 0.25x to 1.75x the mean (VGGFace2's run from
    about 0.25x to 2.3x its mean of 362), at least 2 each."""
    rng = random.Random(f"{seed}:counts")
    weights = [rng.uniform(0.25, 1.75) for _ in range(people)]
    total = sum(weights)
    counts = [max(2, int(photos * w / total)) for w in weights]
    k = 0
    while sum(counts) != photos:
        step = 1 if sum(counts) < photos else -1
        if step > 0 or counts[k % people] > 2:
            counts[k % people] += step
        k += 1
    return counts


def is_reject(position: int, tree: dict) -> bool:
    """Photo `position` (in plan order) is one preprocessing rejected: no crop in OUT, a reject record.
    The queued shard has none, so rerunning it reuses every crop and never starts the detector."""
    return position % REJECT_EVERY == REJECT_EVERY // 2 and position // tree["shard_size"] != tree["queued_shard"]


def _seed_jpeg(path: str) -> bytes:
    """One real 160x160 JPEG (a gradient) that every photo and crop of the tree is a hard link of."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, 160, dtype=np.float32)
    rgb = np.stack([ramp[None, :].repeat(160, 0), ramp[:, None].repeat(160, 1),
                    np.full((160, 160), 128, np.float32)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path, "JPEG", quality=90)
    with open(path, "rb") as fh:
        return fh.read()


class _Linker:
    """os.link of one file, over as many copies of it as the file system's link limit asks (ext4: 65,000)."""

    def __init__(self, folder: str, data: bytes):
        self.folder, self.data, self.copies, self.links = folder, data, 0, 0
        self.source = self._copy()

    def _copy(self) -> str:
        path = os.path.join(self.folder, f"seed-{self.copies}.jpg")
        with open(path, "wb") as fh:
            fh.write(self.data)
        self.copies += 1
        return path

    def link(self, path: str) -> None:
        try:
            os.link(self.source, path)
        except OSError as exc:
            if exc.errno != 31:  # EMLINK
                raise
            self.source = self._copy()
            os.link(self.source, path)
        self.links += 1


def build_tree(folder: str, photos: int, people_per_1k: float) -> dict:
    """RAW and OUT for `photos` photos under `folder` (see the module docstring); returns the tree's facts."""
    import hashlib

    t0 = time.perf_counter()
    people, n_test = people_for(photos, people_per_1k)
    counts = photo_counts(photos, people)
    test_at = {min(people - 1, int((k + 0.5) * people / n_test)) for k in range(n_test)}
    tree = {"root": folder, "raw": os.path.join(folder, "raw"), "out": os.path.join(folder, "out"),
            "photos": photos, "people": people, "train_people": people - len(test_at), "test_people": len(test_at),
            "shard_size": SHARD_SIZE, "queued_shard": -(-photos // SHARD_SIZE) // 2, "seed": SEED}
    seeds = os.path.join(folder, "seed")
    os.makedirs(seeds)
    data = _seed_jpeg(os.path.join(seeds, "seed.jpg"))
    tree["sha256"] = hashlib.sha256(data).hexdigest()
    linker = _Linker(seeds, data)
    width = max(4, len(str(max(counts))))
    position, photos_of = 0, Counter()
    for split in ("train", "test"):  # plan order: train then test, each sorted by identity then file name
        for person in range(people):
            if (person in test_at) != (split == "test"):
                continue
            rel = os.path.join(split, f"n{person + 1:06d}")
            os.makedirs(os.path.join(tree["raw"], rel))
            os.makedirs(os.path.join(tree["out"], rel))
            for k in range(counts[person]):
                name = os.path.join(rel, f"{k + 1:0{width}d}_01.jpg")
                linker.link(os.path.join(tree["raw"], name))
                if not is_reject(position, tree):
                    linker.link(os.path.join(tree["out"], name))
                photos_of[split] += 1
                position += 1
    tree["split_photos"] = dict(photos_of)
    tree["build"] = {"seconds": round(time.perf_counter() - t0, 3), "links": linker.links,
                     "seed_copies": linker.copies, "train_photos": photos_of["train"],
                     "test_photos": photos_of["test"], "people": people, "test_people": len(test_at)}
    return tree


# ---- memory ----------------------------------------------------------------------------------------------
def _status_mib(field: str) -> float:
    """A kB field of this process's /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"/proc/self/status has no {field}")


def private_mib(pid: int) -> dict:
    """A process's private memory (Private_Clean + Private_Dirty of /proc/<pid>/smaps_rollup) and RSS, MiB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    return {"pid": pid, "private_mib": round((fields["Private_Clean"] + fields["Private_Dirty"]) / 1024, 1),
            "private_dirty_mib": round(fields["Private_Dirty"] / 1024, 1), "rss_mib": round(fields["Rss"] / 1024, 1)}


# ---- the stages (each in its own process: see run_stage) -------------------------------------------------
def _plan(tree: dict):
    from facenet.preprocess.plan import Params, make_plan, save_plan

    t0 = time.perf_counter()
    plan = make_plan(tree["raw"], tree["out"], Params(shard_size=tree["shard_size"]))
    save_plan(plan)
    return time.perf_counter() - t0, {"items": plan.count, "shards": plan.num_shards, "plan_id": plan.plan_id}


def _shard_records(tree: dict):
    """The record run_shard writes for each shard, written directly: the crops are already in OUT."""
    from facenet import confine
    from facenet.preprocess.plan import load_plan
    from facenet.preprocess.shard import shard_record_path

    t0 = time.perf_counter()
    plan = load_plan(tree["out"])
    size, counts = plan.params.shard_size, Counter()
    for i in range(plan.num_shards):
        records = []
        for j, item in enumerate(plan.shard_items(i)):
            if is_reject(i * size + j, tree):
                records.append({"item": list(item), "reject": "no face found"})
                counts[item[0] + "_rejects"] += 1
            else:
                records.append({"item": list(item), "out": plan.out_rel(item), "sha256": tree["sha256"],
                                "reused": True})
            counts[item[0] + "_records"] += 1
        record = {"plan_id": plan.plan_id, "index": i, "records": records, "seconds": 0, "pid": 0}
        confine.write_bytes(shard_record_path(plan, i), json.dumps(record).encode(), None, "shard record")
    info = {"shards": plan.num_shards}
    for split in ("train", "test"):
        info[f"{split}_records"] = counts[f"{split}_records"]
        info[f"{split}_rejects"] = counts[f"{split}_rejects"]
    return time.perf_counter() - t0, info


def _shard_checks(tree: dict):
    """What run_local does before it starts any detector: which shards have no record yet."""
    from facenet.preprocess.plan import load_plan
    from facenet.preprocess.shard import load_shard_record

    t0 = time.perf_counter()
    plan = load_plan(tree["out"])
    pending = [i for i in range(plan.num_shards) if load_shard_record(plan, i) is None]
    return time.perf_counter() - t0, {"shards": plan.num_shards, "pending": len(pending)}


def _one_queued_shard(tree: dict):
    """One shard rerun as a worker runs it (its record gone, its crops there): the per-shard cost of a job."""
    from facenet.preprocess.plan import load_plan
    from facenet.preprocess.shard import load_shard_record, run_shard, shard_record_path

    index = tree["queued_shard"]
    before = load_plan(tree["out"])
    previous = load_shard_record(before, index)
    os.unlink(shard_record_path(before, index))
    t0 = time.perf_counter()
    plan = load_plan(tree["out"])
    record = run_shard(plan, index, "cpu")
    seconds = time.perf_counter() - t0
    records = record["records"]
    return seconds, {"shard": index, "shards": plan.num_shards, "records_before": len(previous["records"]),
                     "records": len(records), "same_count": len(records) == len(previous["records"]),
                     "reused": sum(1 for r in records if r.get("reused")),
                     "rejects": sum(1 for r in records if "reject" in r), "skipped": record["skipped"],
                     "estimated_all_shards_seconds": round(seconds * plan.num_shards, 3)}


def _finalize(tree: dict):
    from facenet.preprocess.finalize import finalize
    from facenet.preprocess.plan import load_plan

    t0 = time.perf_counter()
    manifest = finalize(load_plan(tree["out"]))
    return time.perf_counter() - t0, {**manifest["lists"], "splits": manifest["splits"],
                                      "rejects": len(manifest["rejects"]), "hard_linked": manifest["hard_linked"]}


def _split(tree: dict):
    """The dataset as a trainer loads it (set-up of the stages after load_dataset, not timed there)."""
    from facenet.data.dataset import load_dataset

    t0 = time.perf_counter()
    split = load_dataset(tree["out"])
    return split, {"setup_seconds": round(time.perf_counter() - t0, 3), "setup_rss_mib": _status_mib("VmRSS")}


def _load_dataset(tree: dict):
    from facenet.data.dataset import load_dataset

    t0 = time.perf_counter()
    split = load_dataset(tree["out"])
    return time.perf_counter() - t0, {"train": len(split.train), "test": len(split.test),
                                      "classes": split.num_classes, "layout": split.layout}


def _epoch_facts(indices: list[int], n: int, batch: int) -> dict:
    return {"indices": len(indices), "batches": len(indices) // batch, "multiple_of_batch": len(indices) % batch == 0,
            "covered_all": set(indices) == set(range(n))}


def _train_sampler(tree: dict):
    from facenet.data.loader import TrainSampler

    split, info = _split(tree)
    n = len(split.train)
    t0 = time.perf_counter()
    sampler = TrainSampler(n, 0, 1, 64, tree["seed"])
    t1 = time.perf_counter()
    indices = list(iter(sampler))
    t2 = time.perf_counter()
    return t2 - t0, {**info, "train": n, "init_seconds": round(t1 - t0, 4), "epoch_seconds": round(t2 - t1, 4),
                     **_epoch_facts(indices, n, 64)}


def _identity_sampler(tree: dict):
    from facenet.data.loader import IdentityBatchSampler

    split, info = _split(tree)
    n = len(split.train)
    t0 = time.perf_counter()
    sampler = IdentityBatchSampler(split.train.labels, 0, 1, 64, 4, tree["seed"])
    t1 = time.perf_counter()
    indices = list(iter(sampler))
    t2 = time.perf_counter()
    return t2 - t0, {**info, "train": n, "people": len(sampler.by_label), "init_seconds": round(t1 - t0, 4),
                     "epoch_seconds": round(t2 - t1, 4), **_epoch_facts(indices, n, 64)}


def _constant_images(samples, image_size: int):
    """FaceImages indexing its samples as training does, with the decode replaced by a constant image: the
    loader's own cost (sampler, workers, collate, the samples in each worker), not libjpeg's."""
    import torch

    from facenet.data.loader import FaceImages

    class ConstantFaceImages(FaceImages):
        def __getitem__(self, index: int):
            path, label = self.samples[index % len(self.samples)]
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8), label, [], path

    return ConstantFaceImages(samples, image_size)


def _loader_epoch(tree: dict):
    """One epoch of the training loader (2 workers, forked as the trainer's are) over constant images, with
    the workers' private memory read at its end, before they are stopped."""
    import psutil

    from facenet.data.loader import TrainSampler, _loader

    split, info = _split(tree)
    capped = tree["photos"] > LOADER_CAP_ABOVE
    dataset = _constant_images(split.train, 160)
    loader = _loader(dataset, TrainSampler(len(dataset), 0, 1, LOADER_BATCH, tree["seed"]), LOADER_BATCH,
                     workers=2, pin_memory=False, drop_last=True)
    # The trainer's loader forks its workers (Linux's default start method); in this spawned process the
    # default is spawn, which would copy the samples into each worker instead of sharing them.
    loader.multiprocessing_context = "fork"
    t0 = time.perf_counter()
    it = iter(loader)
    batches = images = 0
    first = None
    for batch in it:
        first = first if first is not None else time.perf_counter() - t0
        batches += 1
        images += len(batch.labels)
        if capped and batches >= LOADER_CAP_BATCHES:
            break
    seconds = time.perf_counter() - t0
    workers = [private_mib(p.pid) for p in psutil.Process().children()]
    del it, loader
    return seconds, {**info, "train": len(split.train), "batch": LOADER_BATCH, "batches": batches,
                     "epoch_batches": len(split.train) // LOADER_BATCH + bool(len(split.train) % LOADER_BATCH),
                     "images": images, "img_per_s": round(images / seconds, 1) if seconds > 0 else None,
                     "first_batch_seconds": round(first or 0.0, 3), "capped": capped,
                     "cap": f"first {LOADER_CAP_BATCHES} batches above {LOADER_CAP_ABOVE} photos",
                     "workers": workers, "workers_private_mib": round(sum(w["private_mib"] for w in workers), 1),
                     # set by hand only; collate stacks a worker's batch in shared memory, not the worker's heap
                     "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}


def _pairs_metrics(tree: dict):
    """Pairs over the test people (their crops, listed as find_pairs lists them), then the LFW protocol's
    numbers on seeded random distances for them."""
    import numpy as np

    from facenet.verification.metrics import verification_metrics
    from facenet.verification.pairs import generate_pairs, identity_folders

    t0 = time.perf_counter()
    by_identity = identity_folders(os.path.join(tree["out"], "test"))
    t1 = time.perf_counter()
    max_pairs = pairs_for(tree["photos"])
    pairs = generate_pairs(by_identity, seed=0, max_pairs=max_pairs)
    t2 = time.perf_counter()
    distances = np.random.default_rng(0).uniform(0.0, 2.0, len(pairs))
    metrics = verification_metrics(distances, [p.same for p in pairs], [p.fold for p in pairs])
    t3 = time.perf_counter()
    return t3 - t0, {"test_people": len(by_identity), "test_photos": sum(map(len, by_identity.values())),
                     "max_pairs": max_pairs, "pairs": len(pairs), "same_pairs": metrics["same_pairs"],
                     "folds": metrics["folds"], "list_seconds": round(t1 - t0, 3),
                     "pairs_seconds": round(t2 - t1, 3), "metrics_seconds": round(t3 - t2, 3)}


STAGE_FUNCS = {"plan": _plan, "shard_records": _shard_records, "shard_checks": _shard_checks,
               "one_queued_shard": _one_queued_shard, "finalize": _finalize, "load_dataset": _load_dataset,
               "train_sampler": _train_sampler, "identity_sampler": _identity_sampler,
               "loader_epoch": _loader_epoch, "pairs_metrics": _pairs_metrics}


def stage_child(stage: str, tree: dict) -> dict:
    """Run in a fresh spawned process: the stage's imports, its baseline RSS, the stage, its peak RSS."""
    for module in STAGE_IMPORTS[stage]:
        importlib.import_module(module)
    baseline, import_peak = _status_mib("VmRSS"), _status_mib("VmHWM")
    seconds, info = STAGE_FUNCS[stage](tree)
    return {"seconds": round(seconds, 6), "peak_rss_mib": _status_mib("VmHWM"), "baseline_rss_mib": baseline,
            "import_peak_rss_mib": import_peak, **info}


def run_stage(stage: str, tree: dict) -> dict:
    """`stage` for one tree in a process of its own (spawn: nothing of this one's memory comes along)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        result = pool.submit(stage_child, stage, tree).result()
    return {**result, "process_seconds": round(time.perf_counter() - t0, 3)}


# ---- the report ------------------------------------------------------------------------------------------
def exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(seconds) on log(photos); None with fewer than two sizes. A time of 0
    (below the clock's resolution) counts as a microsecond."""
    if len({n for n, _ in points}) < 2:
        return None
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(max(s, 1e-6)) for _, s in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs), 3)


def exponents(runs: list[dict], last: int | None = None) -> dict:
    """Each stage's exponent over the sizes run, or over the `last` largest of them (fixed costs, like a
    process's first torch call, flatten the slope at small sizes)."""
    runs = sorted(runs, key=lambda r: r["photos"])[-last if last else 0:]
    names = ["build", *STAGES]
    return {s: exponent([(r["photos"], r["stages"][s]["seconds"]) for r in runs if s in r["stages"]]) for s in names}


def goal(runs: list[dict]) -> dict:
    """The targets at the largest size: plan + finalize + identity sampler under 5 minutes, every stage's
    process under 1.5 GB (the loader's workers, separate processes, beside it)."""
    last = max(runs, key=lambda r: r["photos"])["stages"]
    seconds = round(sum(last[s]["seconds"] for s in ("plan", "finalize", "identity_sampler")), 3)
    peak = max(last[s]["peak_rss_mib"] for s in STAGES)
    return {"plan_finalize_sampler_seconds": seconds, "under_5_min": seconds < GOAL_SECONDS,
            "max_peak_rss_mib": peak, "max_peak_stage": max(STAGES, key=lambda s: last[s]["peak_rss_mib"]),
            "under_1_5_gb": peak < GOAL_RSS_MIB,
            "loader_workers_private_mib": last["loader_epoch"]["workers_private_mib"]}


def host() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
        with open("/proc/meminfo", encoding="ascii") as fh:
            kib = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
    except (OSError, StopIteration):
        kib = 0
    return {"cpu": model, "cpu_count": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "memory_gib": round(kib / 2**20, 1), "python": sys.version.split()[0]}


_SHOWN = ("items", "shards", "pending", "records", "train_list", "test_list", "test_pairs", "train", "test",
          "batches", "img_per_s", "covered_all", "pairs", "links", "estimated_all_shards_seconds")


def table_row(photos: int, stage: str, r: dict) -> str:
    facts = " ".join(f"{k}={r[k]}" for k in _SHOWN if k in r)
    base = f"{r['baseline_rss_mib']:>8.0f}" if "baseline_rss_mib" in r else f"{'':>8}"
    return f"{photos:>9} {stage:<17} {r['seconds']:>9.3f} {r['peak_rss_mib']:>9.0f} {base}  {facts}"


def measure(photos: int, work: str, people_per_1k: float, keep: bool) -> dict:
    """Build one tree, run every stage on it in turn, each in its own process."""
    t0 = time.perf_counter()
    folder = os.path.join(work, f"n{photos}")
    shutil.rmtree(folder, ignore_errors=True)
    tree = build_tree(folder, photos, people_per_1k)
    build = {**tree.pop("build"), "peak_rss_mib": _status_mib("VmHWM"), "process": "parent (its peak so far)"}
    print(table_row(photos, "build", build), file=sys.stderr, flush=True)
    stages = {"build": build}
    try:
        for stage in STAGES:
            stages[stage] = run_stage(stage, tree)
            print(table_row(photos, stage, stages[stage]), file=sys.stderr, flush=True)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    return {"photos": photos, "people": tree["people"], "train_people": tree["train_people"],
            "test_people": tree["test_people"], "split_photos": tree["split_photos"],
            "seconds": round(time.perf_counter() - t0, 3), "stages": stages}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m facenet.bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=parse_sizes, default=[2000],
                   help="comma-separated sizes, e.g. 2k,10k,100k,1M,3.31M (default 2k)")
    p.add_argument("--work", help="where the trees are built, and kept (default: a temporary folder under build/, "
                                  "removed after)")
    p.add_argument("--out", default="build/bench_scale.json", help="the JSON report (default build/bench_scale.json)")
    p.add_argument("--people-per-1k", type=float, default=round(1000 * VGGFACE2_PEOPLE / VGGFACE2_PHOTOS, 4),
                   help="people per 1,000 photos (default VGGFace2's, 2.7586: 362 photos a person; "
                        f"at least {MIN_PEOPLE} people, {MIN_TEST_PEOPLE} of them in test/)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not args.photos:
        get_args_parser().error("--photos: no sizes")
    if args.people_per_1k <= 0:
        get_args_parser().error(f"--people-per-1k {args.people_per_1k}: must be positive")
    keep = args.work is not None
    if keep:
        os.makedirs(args.work, exist_ok=True)
        work = args.work
    else:
        os.makedirs("build", exist_ok=True)
        work = tempfile.mkdtemp(prefix="bench-scale-", dir="build")
    print(f"{'photos':>9} {'stage':<17} {'seconds':>9} {'peak MiB':>9} {'base MiB':>8}", file=sys.stderr)
    try:
        runs = [measure(n, work, args.people_per_1k, keep) for n in sorted(set(args.photos))]
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "scale", "host": host(), "sizes": [r["photos"] for r in runs],
              "method": "each stage in a fresh spawned process; peak_rss_mib is its VmHWM at the stage's end, "
                        "baseline_rss_mib its VmRSS after the stage's imports; exponents: slope of log(seconds) "
                        "on log(photos), least squares over the sizes",
              "shard_size": SHARD_SIZE, "people_per_1k": args.people_per_1k, "exponents": exponents(runs),
              "exponents_largest_two": exponents(runs, last=2),
              "goal": goal(runs), "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
    print("exponents: " + ", ".join(f"{s} {e}" for s, e in report["exponents"].items()), file=sys.stderr)
    print(f"goal: {report['goal']}", file=sys.stderr)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
