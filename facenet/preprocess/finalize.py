"""Finalizing: shard records -> train_list.txt, test_list.txt, test_pairs.txt (when RAW has a test/
split) and manifest.json.

Deterministic: the same records give byte-identical files (no timestamps),
so a rerun or a second finalizer rewrites the same content.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter, defaultdict

from facenet.errors import UserError
from facenet import confine
from facenet.preprocess.plan import Plan
from facenet.preprocess.shard import load_shard_record
from facenet.verification.pairs import format_pairs, generate_pairs

MANIFEST_VERSION = 1


def collect_records(plan: Plan, roots: confine.Roots | None = None) -> list[dict]:
    records, missing = [], []
    for index in range(plan.num_shards):
        rec = load_shard_record(plan, index, roots)
        if rec is None:
            missing.append(index)
        else:
            records += rec["records"]
    if missing:
        raise UserError(f"{len(missing)} of {plan.num_shards} shards are not finished (first: {missing[0]}); "
                        "run them before finalizing")
    return records


def finalize(plan: Plan, roots: confine.Roots | None = None) -> dict:
    """Write the lists and the manifest for a fully processed plan; returns the manifest."""
    records = collect_records(plan, roots)
    p = plan.params
    faces_by_identity: dict[str, list[str]] = defaultdict(list)
    test_faces: dict[str, list[str]] = defaultdict(list)  # RAW/test/ people: verification pairs, never trained on
    splits = {s: Counter() for s in sorted({r["item"][0] for r in records})}
    identities = {s: set() for s in splits}
    rejects, reasons, converted = [], Counter(), Counter()
    for r in records:
        split, identity, _ = r["item"]
        splits[split]["images"] += 1
        identities[split].add(identity)
        if "reject" in r:
            splits[split]["rejects"] += 1
            rejects.append({"path": "/".join(r["item"]), "reason": r["reject"]})
            reasons[r["reject"].split(" (")[0]] += 1
            continue
        splits[split]["faces"] += 1
        if r.get("converted"):
            converted[r["converted"]] += 1
        if split == "train":
            faces_by_identity[identity].append(r["out"])
        else:
            test_faces[identity].append(os.path.join(plan.out, r["out"]))
    for path, reason in plan.refused:  # never planned (symlinks leaving the roots, unlistable names)
        rejects.append({"path": path, "reason": reason})
        reasons[reason] += 1

    classes = sorted(i for i, files in faces_by_identity.items() if files)
    train_lines, test_lines = [], []
    for label, identity in enumerate(classes):
        files = sorted(faces_by_identity[identity])
        random.Random(f"{p.seed}:{identity}").shuffle(files)  # per identity: stable when others change
        n_test = int(round(len(files) * p.holdout)) if len(files) > 1 else 0
        test_lines += [f"{f} {label}" for f in files[:n_test]]
        train_lines += [f"{f} {label}" for f in files[n_test:]]
    train_text = "".join(line + "\n" for line in sorted(train_lines))
    test_text = "".join(line + "\n" for line in sorted(test_lines))

    # Pairs over the people of RAW/test/ (VGGFace2's test identities), whom no list names: verification
    # on people the model never saw. No file when there are none (or too few to pair).
    pairs = generate_pairs(test_faces, seed=p.seed)
    pairs_text = format_pairs(pairs, plan.out) if pairs else ""

    content = hashlib.sha256()
    for r in sorted((r for r in records if "out" in r), key=lambda r: r["out"]):
        content.update(f"{r['out']} {r['sha256']}\n".encode())
    content.update(train_text.encode())
    content.update(test_text.encode())
    content.update(pairs_text.encode())  # nothing when there are no pairs: such outputs keep their hash

    manifest = {
        "version": MANIFEST_VERSION,
        "raw": plan.raw,
        "layout": plan.layout,
        # What the output is, not how it was scheduled: no shard size, plan id or timings.
        "params": {k: getattr(p, k) for k in ("image_size", "margin", "detect_size", "min_face_frac", "holdout",
                                               "seed")},
        "splits": {s: {"identities": len(identities[s]), "images": c["images"], "faces": c["faces"],
                       "rejects": c["rejects"]} for s, c in splits.items()},
        "lists": {"classes": len(classes), "train_list": len(train_lines), "test_list": len(test_lines),
                  "test_pairs": len(pairs)},
        "reject_reasons": dict(sorted(reasons.items())),
        "converted": dict(sorted(converted.items())),
        "refused": len(plan.refused),
        # Raw photos with more than one name: allowed (hard-linked copies of a data set are common), but a
        # hard link cannot be told from its target, which may lie outside the data roots (README, Security).
        "hard_linked": sum(1 for r in records if r.get("links", 1) > 1),
        "rejects": sorted(rejects, key=lambda r: r["path"]),
        "content_hash": "sha256:" + content.hexdigest(),
    }
    outputs = [("train_list.txt", train_text.encode()), ("test_list.txt", test_text.encode())]
    if pairs:
        outputs.append(("test_pairs.txt", pairs_text.encode()))
    outputs.append(("manifest.json", (json.dumps(manifest, indent=2) + "\n").encode()))  # last: says all is there
    for name, data in outputs:
        confine.write_bytes(os.path.join(plan.out, name), data, roots, "preprocessing output")
    return manifest


def manifest_totals(manifest: dict) -> dict:
    """A manifest's counts over both splits, its lists and hash: the summary users and the queue see."""
    splits = manifest["splits"].values()
    return {"images": sum(s["images"] for s in splits), "faces": sum(s["faces"] for s in splits),
            "rejects": sum(s["rejects"] for s in splits), "reject_reasons": manifest["reject_reasons"],
            "train_list": manifest["lists"]["train_list"], "test_list": manifest["lists"]["test_list"],
            "classes": manifest["lists"]["classes"], "test_pairs": manifest["lists"].get("test_pairs", 0),
            "content_hash": manifest["content_hash"]}
