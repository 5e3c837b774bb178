"""Running a whole preprocessing job locally: plan, shards in N processes, finalize."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

from facenet import confine
from facenet.fsutil import cpu_cores, remove_stale_temp_files
from facenet.preprocess.finalize import finalize, manifest_totals
from facenet.preprocess.plan import Params, Plan, load_plan, make_plan, save_plan
from facenet.preprocess.shard import load_shard_record, run_shard

_PLAN: Plan | None = None
_DEVICE = "cpu"
_ROOTS: confine.Roots | None = None


def _init_worker(plan_header: str, device: str, threads: int, roots: list[str] | None) -> None:
    """A pool process: the plan's header only (each shard reads its own items from the saved plan)."""
    import torch

    global _PLAN, _DEVICE, _ROOTS
    torch.set_num_threads(threads)
    _ROOTS = None if roots is None else confine.Roots(roots)
    _PLAN, _DEVICE = Plan.from_json(plan_header, _ROOTS), device


def _shard_task(index: int) -> dict:
    rec = run_shard(_PLAN, index, _DEVICE, _ROOTS)
    return {"index": index, "images": len(rec["records"]), "skipped": rec["skipped"],
            "faces": sum(1 for r in rec["records"] if "out" in r)}


def run_local(raw: str, out: str, params: Params, workers: int = 1, device: str = "cpu",
              progress: bool = True) -> dict:
    """Preprocess RAW into OUT with `workers` processes; returns the summary (also see manifest.json)."""
    from facenet.errors import UserError

    if not 1 <= workers <= 256:
        raise UserError(f"--workers {workers}: must be in [1, 256]")
    if device != "cpu":
        from facenet.devices import resolve_device_type

        resolve_device_type(device)  # loads torch_npu / checks CUDA, or one line saying why not
    t0 = time.perf_counter()
    roots = confine.Roots.from_env()  # FACENET_DATA_ROOTS confines this command too when it is set
    plan = make_plan(raw, out, params, roots).with_shard_size(workers)
    check_same_crops(plan, roots)
    confine.ensure_dir(plan.out, roots, "OUT")
    save_plan(plan, roots)
    stale = remove_stale_temp_files(plan.out)
    # Finished shards are skipped here, before any worker (and its MTCNN) is started.
    pending = [i for i in range(plan.num_shards) if load_shard_record(plan, i, roots) is None]
    root_list = None if roots is None else roots.roots
    skipped = plan.count - sum(plan.shard_len(i) for i in pending)
    processed = 0
    workers = max(1, min(workers, len(pending)))
    threads = max(1, cpu_cores() // workers)
    pool = None
    header = plan.to_json()
    if workers == 1:
        _init_worker(header, device, threads, root_list)
        results = map(_shard_task, pending)
    else:
        # spawn, not fork: a caller that already ran torch (the queue worker, the benchmark) has an
        # OpenMP pool that a forked child deadlocks on. Each worker builds its own MTCNN on first use.
        pool = mp.get_context("spawn").Pool(workers, _init_worker, (header, device, threads, root_list))
        results = pool.imap_unordered(_shard_task, pending)
    bar = _progress(plan.count, progress)
    bar.update(skipped)
    try:
        for res in results:
            if res["skipped"]:
                skipped += res["images"]
            else:
                processed += res["images"]
            bar.update(res["images"])
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    manifest = finalize(plan, roots)
    seconds = time.perf_counter() - t0
    return {
        "raw": plan.raw, "out": plan.out, "layout": plan.layout, **manifest_totals(manifest),
        "processed": processed, "skipped": skipped, "stale_temp_files_removed": stale,
        "shards": plan.num_shards, "shard_size": plan.params.shard_size, "workers": workers, "device": device,
        "seconds": round(seconds, 3), "img_per_s": round(processed / seconds, 3) if seconds > 0 else 0.0,
        "manifest": os.path.join(plan.out, "manifest.json"),
    }


# Settings that change the crops themselves: a rerun may not mix them (reused crops would disagree).
CROP_SETTINGS = ("image_size", "margin", "detect_size", "min_face_frac", "align")


def check_same_crops(plan: Plan, roots: confine.Roots | None = None) -> None:
    from facenet.errors import UserError

    try:
        previous = load_plan(plan.out, roots)
    except UserError:
        return  # a new OUT
    if previous.raw != plan.raw:
        raise UserError(f"{plan.out} holds crops of {previous.raw}, not {plan.raw}; use another output folder")
    for name in CROP_SETTINGS:
        old, new = getattr(previous.params, name), getattr(plan.params, name)
        if old != new:
            asked, was = f"--{name.replace('_', '-')} {new}", old
            if name == "align":
                asked, was = ("--align" if v else "box crops (no --align)" for v in (new, old))
            raise UserError(f"{asked}: {plan.out} was preprocessed with {was}; "
                            "use another output folder (or delete it) to change how faces are cropped")


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="preprocess", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)
