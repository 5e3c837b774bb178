"""Preprocessing benchmark: the seed's shape against our shard engine, same images, same N.

Reference = the ModelZoo `mtcnn_process.py` shape: `Pool(N).map` over the
images, each call building a new `MTCNN(image_size=160, margin=0)` with
facenet-pytorch's defaults and running it once (detect, select the largest
face, extract and save). It reads RGB with PIL rather than the seed's BGR
`cv2.imread` (a bug, not a speed trick), so both find the same faces and
the boxes can be compared. Ours = `run_local` with N workers (planning,
shards, lists and manifest included).

Reported: img/s of both (wall time over the same images), the ratio, faces
found by each, and the mean IoU of our boxes against the reference's boxes
on the images where both found a face.
"""

from __future__ import annotations

import glob
import json
import multiprocessing as mp
import os
import time

from facenet.fsutil import cpu_cores
from facenet.preprocess.faces import iou
from facenet.preprocess.plan import Params
from facenet.preprocess.run import run_local


def _seed_one(task: tuple[str, str]):
    from facenet_pytorch import MTCNN
    from PIL import Image

    path, save_path = task
    mtcnn = MTCNN(image_size=160, margin=0, device="cpu")  # the seed: a new detector for every image
    img = Image.open(path).convert("RGB")
    boxes, probs, points = mtcnn.detect(img, landmarks=True)
    boxes, probs, points = mtcnn.select_boxes(boxes, probs, points, img, method=mtcnn.selection_method)
    if boxes is None:
        return path, None
    mtcnn.extract(img, boxes, save_path)
    return path, [float(v) for v in boxes[0]]


def _pin_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def reference_run(raw: str, out: str, workers: int, pin_threads: bool = False) -> dict:
    """pin_threads=False is the seed as written (each process uses torch's default, all cores);
    True gives each process cores/N threads, as ours does, so the ratio is not won by oversubscription."""
    paths = sorted(glob.glob(os.path.join(raw, "*", "*")))
    tasks = [(p, os.path.join(out, os.path.relpath(p, raw))) for p in paths]
    threads = max(1, cpu_cores() // workers)
    init = (_pin_threads, (threads,)) if pin_threads else (None, ())
    t0 = time.perf_counter()
    # The seed's multiprocessing.Pool; spawned like ours (this process already ran torch, and a
    # forked child would deadlock on its OpenMP pool), so both pay the same start-up.
    with mp.get_context("spawn").Pool(workers, *init) as pool:
        results = pool.map(_seed_one, tasks)
    seconds = time.perf_counter() - t0
    boxes = dict(results)
    return {"images": len(paths), "faces": sum(b is not None for b in boxes.values()), "seconds": seconds,
            "img_per_s": len(paths) / seconds, "boxes": boxes}


def ours_run(raw: str, out: str, workers: int) -> dict:
    summary = run_local(raw, out, Params(), workers=workers, progress=False)
    boxes = {}
    for rec_file in glob.glob(os.path.join(out, ".preprocess", "shards", "*", "*.json")):
        with open(rec_file, encoding="utf-8") as fh:
            for r in json.load(fh)["records"]:
                split, identity, name = r["item"]
                boxes[os.path.join(raw, identity, name)] = r.get("box")
    return {"images": summary["images"], "faces": summary["faces"], "seconds": summary["seconds"],
            "img_per_s": summary["images"] / summary["seconds"], "boxes": boxes}


def run_benchmark(raw: str, work: str, workers: int = 2) -> dict:
    import shutil

    for sub in ("reference", "reference-pinned", "ours"):
        shutil.rmtree(os.path.join(work, sub), ignore_errors=True)
    ref = reference_run(raw, os.path.join(work, "reference"), workers)
    pinned = reference_run(raw, os.path.join(work, "reference-pinned"), workers, pin_threads=True)
    ours = ours_run(raw, os.path.join(work, "ours"), workers)
    both = [p for p, b in ref["boxes"].items() if b is not None and ours["boxes"].get(p) is not None]
    ious = [iou(ref["boxes"][p], ours["boxes"][p]) for p in both]
    only_ref = sorted(p for p, b in ref["boxes"].items() if b is not None and ours["boxes"].get(p) is None)
    ratio = ours["img_per_s"] / ref["img_per_s"]
    mean_iou = sum(ious) / len(ious) if ious else 0.0
    return {
        "benchmark": "preprocess",
        "what": "img/s = images / wall seconds, same images, same number of processes",
        "config": {"workers": workers, "images": ref["images"], "raw": raw, "ours": Params().__dict__},
        "reference": {k: v for k, v in ref.items() if k != "boxes"},
        "ours": {k: v for k, v in ours.items() if k != "boxes"},
        "ratio": ratio,
        "reference_threads_pinned": {k: v for k, v in pinned.items() if k != "boxes"},
        "ratio_vs_pinned_reference": ours["img_per_s"] / pinned["img_per_s"],
        "mean_iou_vs_reference": mean_iou,
        "min_iou_vs_reference": min(ious) if ious else 0.0,
        "faces_only_reference_found": only_ref[:20],
        "goals": {"ratio >= 4": ratio >= 4, "no fewer faces": ours["faces"] >= ref["faces"],
                  "mean IoU >= 0.9": mean_iou >= 0.9},
    }
