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
on the images where both found a face. Then `per_photo_stages`: one process,
one thread, median ms per photo of each step of ours, with facenet-pytorch's
`MTCNN.detect` timed interleaved with our detector on the same images.
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


def _stage_times(raw: str, out: str, photos: int, repeats: int) -> dict:
    """In a one-thread worker: ms per photo of each step of shard._process (FaceCropper.find split
    into reduce, detect and crop), and facenet-pytorch's detector timed on the same reduced images."""
    import hashlib
    import io
    import statistics

    import numpy as np

    from facenet.fsutil import write_atomic
    from facenet.preprocess.faces import DetectorSettings, FaceCropper, central_largest, crop_face
    from facenet.images import load_rgb

    p = Params()
    paths = sorted(glob.glob(os.path.join(raw, "*", "*")))
    paths = paths[:: max(1, len(paths) // photos)][:photos]  # every identity, not the first one only
    cropper = FaceCropper(DetectorSettings(p.image_size, p.margin, p.detect_size, p.min_face_frac))
    mtcnn = cropper.mtcnn
    steps = ("decode", "reduce", "detect", "detect (facenet-pytorch MTCNN.detect)", "crop", "encode", "sha256",
             "write")
    ms = {k: [] for k in steps}
    identical = with_face = 0
    for rep in range(repeats + 1):  # the first pass warms up and is not counted
        for i, path in enumerate(paths):
            t0 = time.perf_counter()
            loaded = load_rgb(path, max_side=max(2000, 3 * p.detect_size))
            t1 = time.perf_counter()
            small, shrink = cropper.reduced(loaded.image)
            t2 = time.perf_counter()
            boxes, _ = cropper.detect(small)
            t3 = time.perf_counter()
            # facenet-pytorch's detector on the same image, interleaved so load changes hit both alike
            mtcnn.min_face_size = cropper.min_face(small)
            ref_boxes, _ = mtcnn.detect(small)
            t4 = time.perf_counter()
            if len(boxes) == 0:
                continue
            best = central_largest(boxes.astype(np.float64), small.size)
            box = tuple(float(v) / shrink for v in boxes[best])
            crop = crop_face(loaded.image, box, p.image_size, p.margin)
            t5 = time.perf_counter()
            buf = io.BytesIO()
            crop.save(buf, "JPEG", quality=95)
            data = buf.getvalue()
            t6 = time.perf_counter()
            hashlib.sha256(data).hexdigest()
            t7 = time.perf_counter()
            write_atomic(os.path.join(out, f"{i:04d}.jpg"), data)
            t8 = time.perf_counter()
            if rep == 0:
                with_face += 1
                identical += ref_boxes is not None and np.array_equal(boxes, ref_boxes)
                continue
            for k, v in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6, t8 - t7)):
                ms[k].append(v * 1e3)
    medians = {k: round(statistics.median(v), 3) for k, v in ms.items() if v}
    ref_key = "detect (facenet-pytorch MTCNN.detect)"
    return {"photos": len(paths), "repeats": repeats, "threads": 1, "median_ms_per_photo": medians,
            "ours_total_ms": round(sum(v for k, v in medians.items() if k != ref_key), 3),
            "detect_speedup_vs_facenet_pytorch": round(medians[ref_key] / medians["detect"], 3),
            "photos_with_a_face": with_face, "photos_with_boxes_identical_to_facenet_pytorch": identical}


def stage_breakdown(raw: str, work: str, photos: int = 120, repeats: int = 3) -> dict:
    """Where a photo's time goes in our pipeline (decode, detect, crop, encode, hash, atomic write),
    median ms on one thread in a fresh process, with facenet-pytorch's MTCNN.detect timed beside ours."""
    import shutil

    out = os.path.join(work, "stages")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    with mp.get_context("spawn").Pool(1, _pin_threads, (1,)) as pool:
        return pool.apply(_stage_times, (raw, out, photos, repeats))


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
        "per_photo_stages": stage_breakdown(raw, work),
        "goals": {"ratio >= 4": ratio >= 4, "no fewer faces": ours["faces"] >= ref["faces"],
                  "mean IoU >= 0.9": mean_iou >= 0.9},
    }
