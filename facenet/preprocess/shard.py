"""Running one shard: read, detect, crop, write atomically, record. Idempotent and crash-safe.

A finished shard leaves OUT/.preprocess/shards/<plan id>/<index>.json with
one record per image (the crop's path and sha256, or a reject reason). Rerun
or redelivered, a finished shard is skipped whole; a shard cut short reuses
every crop already on disk (a crop only ever appears by rename, so one that
exists is complete) and detects the rest. Nothing a bad file does ends the
shard: it becomes a reject record.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from typing import TYPE_CHECKING

from facenet import confine
from facenet.images import conversion_of, load_rgb
from facenet.preprocess.plan import Plan, state_dir

if TYPE_CHECKING:
    from facenet.preprocess.faces import DetectorSettings, FaceCropper

# The detector (and torch) load on first use: finalize and the shard checks read records only, and torch's
# import alone is ~860 MB of RSS, more than finalize needs at VGGFace2's size.
_CROPPERS: "dict[DetectorSettings, FaceCropper]" = {}


def cropper_for(plan: Plan, device: str) -> FaceCropper:
    """The process's MTCNN for these settings, built on first use and kept (never one per image)."""
    from facenet.preprocess.faces import DetectorSettings, FaceCropper

    p = plan.params
    settings = DetectorSettings(p.image_size, p.margin, p.detect_size, p.min_face_frac, device=device, align=p.align)
    if settings not in _CROPPERS:
        if device != "cpu":  # a fresh worker process: register torch_npu / check CUDA first
            from facenet.devices import resolve_device_type

            resolve_device_type(device)
        _CROPPERS[settings] = FaceCropper(settings)
    return _CROPPERS[settings]


def shard_record_path(plan: Plan, index: int) -> str:
    return os.path.join(state_dir(plan.out), "shards", plan.plan_id, f"{index:06d}.json")


def load_shard_record(plan: Plan, index: int, roots: confine.Roots | None = None) -> dict | None:
    try:
        return json.loads(confine.read_text(shard_record_path(plan, index), roots, "shard record"))
    except (FileNotFoundError, ValueError):
        return None


# Photos per detector call on an accelerator (PNet stacks same-size photos, RNet/ONet take every candidate of
# the call): each photo alone is a few hundred tiny launches there. On the CPU one photo at a time is as fast.
DEVICE_BATCH = 32


def run_shard(plan: Plan, index: int, device: str = "cpu", roots: confine.Roots | None = None,
              batch: int | None = None) -> dict:
    """Process shard `index` of `plan`; returns its record (also written to disk). With `roots` (a queued
    job) every raw file, crop and record is read and written inside them. `batch` photos go through the
    detector at once (default 1 on the CPU, DEVICE_BATCH on an accelerator, decoded ahead by threads); the
    crops are the same either way."""
    done = load_shard_record(plan, index, roots)
    if done is not None:
        return {**done, "skipped": True}
    batch = batch or (1 if device == "cpu" else DEVICE_BATCH)
    t0 = time.perf_counter()
    cropper = None
    records: list[dict | None] = []
    todo = []  # (position in records, item, rel, target) of photos to detect
    for item in plan.shard_items(index):
        rel = plan.out_rel(item)
        target = os.path.join(plan.out, rel)
        digest = _reusable(target, roots)
        if digest:
            record = {"item": list(item), "out": rel, "sha256": digest, "reused": True}
            converted = conversion_of(plan.raw_path(item), roots)
            if converted:
                record["converted"] = converted
            records.append(record)
            continue
        cropper = cropper or cropper_for(plan, device)
        if batch == 1:
            records.append(_finish(plan, item, rel, target, _load(plan, item, roots), cropper, roots))
        else:
            todo.append((len(records), item, rel, target))
            records.append(None)
    if todo:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="decode") as pool:
            for at in range(0, len(todo), batch):
                chunk = todo[at:at + batch]
                loaded = list(pool.map(lambda job: _load(plan, job[1], roots), chunk))
                for (pos, item, rel, target), face_of in zip(chunk, _detect_many(cropper, loaded)):
                    records[pos] = _finish(plan, item, rel, target, face_of, cropper, roots)
    for rec in records:  # counted in the manifest: a hard link may name a file outside the roots (README)
        links = _links(plan.raw_path(tuple(rec["item"])))
        if links > 1:
            rec["links"] = links
    record = {"plan_id": plan.plan_id, "index": index, "records": records,
              "seconds": round(time.perf_counter() - t0, 3), "pid": os.getpid()}
    confine.write_bytes(shard_record_path(plan, index), json.dumps(record).encode(), roots, "shard record")
    return {**record, "skipped": False}


def _links(path: str) -> int:
    try:
        return os.lstat(path).st_nlink
    except OSError:
        return 1


def _load(plan: Plan, item, roots: confine.Roots | None):
    return load_rgb(plan.raw_path(item), max_side=max(2000, 3 * plan.params.detect_size), roots=roots)


def _detect_many(cropper: FaceCropper, loaded: list) -> list:
    """Per photo: (loaded, its face or None), or (loaded, the exception) when detection failed. One detector
    call for the chunk; if that call fails, photo by photo, so one odd photo fails alone."""
    good = [k for k, one in enumerate(loaded) if not one.reject]
    try:
        faces = dict(zip(good, cropper.find_batch([loaded[k].image for k in good], [loaded[k].scale for k in good])))
    except Exception:
        faces = {}
        for k in good:
            try:
                faces[k] = cropper.find(loaded[k].image, loaded[k].scale)
            except Exception as exc:
                faces[k] = exc
    return [(one, faces.get(k)) for k, one in enumerate(loaded)]


def _reusable(target: str, roots: confine.Roots | None) -> str | None:
    """The sha256 of a finished crop at `target`, or None when there is none to reuse. A crop only ever
    appears by rename, so a regular file there is complete; anything else (a symlink, a FIFO) is not ours
    and is replaced by the new crop's rename."""
    try:
        return confine.sha256_file(target, roots, "crop")
    except (FileNotFoundError, confine.Refused):
        return None
    except OSError as exc:
        if exc.errno in (20, 40):  # ENOTDIR, ELOOP
            return None
        raise


def _finish(plan: Plan, item, rel: str, target: str, loaded, cropper: FaceCropper,
            roots: confine.Roots | None) -> dict:
    """One photo's record: `loaded` is load_rgb's result, or (that result, its face, None or the detector's
    exception) when detection already ran in a batch."""
    base = {"item": list(item)}
    if isinstance(loaded, tuple):
        loaded, face = loaded
    elif loaded.reject:
        face = None
    else:
        try:
            face = cropper.find(loaded.image, loaded.scale)
        except Exception as exc:  # a detector failure on one odd image must not end the shard
            face = exc
    if loaded.reject:
        return {**base, "reject": loaded.reject}
    if isinstance(face, Exception):
        return {**base, "reject": f"detector error ({type(face).__name__}: {str(face)[:100]})"}
    if face is None:
        return {**base, "reject": "no face found"}
    buf = io.BytesIO()
    if rel.lower().endswith((".jpg", ".jpeg")):
        face.crop.save(buf, "JPEG", quality=95)
    else:
        face.crop.save(buf, "PNG")
    data = buf.getvalue()
    confine.write_bytes(target, data, roots, "crop")
    out = {**base, "out": rel, "sha256": hashlib.sha256(data).hexdigest(),
           "box": [round(v, 2) for v in face.box], "prob": round(face.prob, 5)}
    if loaded.converted:
        out["converted"] = loaded.converted
    return out
