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
from typing import Iterator

from facenet.errors import UserError
from facenet import confine
from facenet.preprocess.plan import Plan
from facenet.preprocess.shard import load_shard_record
from facenet.verification.pairs import format_pairs, generate_pairs

MANIFEST_VERSION = 1


def iter_records(plan: Plan, roots: confine.Roots | None = None) -> Iterator[dict]:
    """Every shard's records in plan order, one shard read at a time; after the last, UserError naming the
    first unfinished shard if any was (finalize writes nothing then)."""
    missing = []
    for index in range(plan.num_shards):
        rec = load_shard_record(plan, index, roots)
        if rec is None:
            missing.append(index)
        elif not missing:
            yield from rec["records"]
    if missing:
        raise UserError(f"{len(missing)} of {plan.num_shards} shards are not finished (first: {missing[0]}); "
                        "run them before finalizing")


class _Tally:
    """What finalize keeps of the records while they stream past: counts, rejects, and per crop only its path
    and 32-byte hash (about 130 bytes a photo, where the records were ~1 KiB), never the records."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.splits: dict[str, Counter] = {}
        self.identities: dict[str, set] = defaultdict(set)
        self.rejects: list[dict] = []
        self.reasons, self.converted = Counter(), Counter()
        self.hard_linked = 0
        self.train_faces: dict[str, list[str]] = defaultdict(list)
        self.test_faces: dict[str, list[str]] = defaultdict(list)  # RAW/test/ people: verification pairs only
        self.outs: list[str] = []
        self.hashes = bytearray()

    def add(self, r: dict) -> None:
        split, identity, _ = r["item"]
        counts = self.splits.setdefault(split, Counter())
        counts["images"] += 1
        self.identities[split].add(identity)
        if r.get("links", 1) > 1:
            self.hard_linked += 1
        if "reject" in r:
            counts["rejects"] += 1
            self.rejects.append({"path": "/".join(r["item"]), "reason": r["reject"]})
            self.reasons[r["reject"].split(" (")[0]] += 1
            return
        counts["faces"] += 1
        if r.get("converted"):
            self.converted[r["converted"]] += 1
        self.outs.append(r["out"])
        self.hashes += bytes.fromhex(r["sha256"])
        if split == "train":
            self.train_faces[identity].append(r["out"])
        else:
            self.test_faces[identity].append(os.path.join(self.plan.out, r["out"]))

    def content_lines(self) -> Iterator[bytes]:
        """`<crop> <sha256>` per crop, sorted by crop path."""
        for k in sorted(range(len(self.outs)), key=self.outs.__getitem__):
            yield f"{self.outs[k]} {self.hashes[32 * k:32 * k + 32].hex()}\n".encode()


def _lists(tally: _Tally, p) -> tuple[list[str], bytes, bytes, int, int]:
    """(classes, train_list.txt, test_list.txt, train lines, test lines): each person's crops shuffled by a
    seed of their own (stable when others change), `holdout` of them held out."""
    classes = sorted(i for i, files in tally.train_faces.items() if files)
    train_lines, test_lines = [], []
    for label, identity in enumerate(classes):
        files = sorted(tally.train_faces.pop(identity))
        random.Random(f"{p.seed}:{identity}").shuffle(files)
        n_test = int(round(len(files) * p.holdout)) if len(files) > 1 else 0
        test_lines += [f"{f} {label}\n" for f in files[:n_test]]
        train_lines += [f"{f} {label}\n" for f in files[n_test:]]
    n_train, n_test = len(train_lines), len(test_lines)
    train_lines.sort()
    train_text = "".join(train_lines).encode()
    del train_lines
    test_lines.sort()
    return classes, train_text, "".join(test_lines).encode(), n_train, n_test


def finalize(plan: Plan, roots: confine.Roots | None = None) -> dict:
    """Write the lists and the manifest for a fully processed plan; returns the manifest. The shard records
    stream past once (see _Tally): at VGGFace2's 3.3M photos, holding them all was 5.3 GB."""
    p = plan.params
    tally = _Tally(plan)
    for r in iter_records(plan, roots):
        tally.add(r)
    for path, reason in plan.refused:  # never planned (symlinks leaving the roots, unlistable names)
        tally.rejects.append({"path": path, "reason": reason})
        tally.reasons[reason] += 1
    classes, train_text, test_text, n_train, n_test = _lists(tally, p)

    # Pairs over the people of RAW/test/ (VGGFace2's test identities), whom no list names: verification
    # on people the model never saw. No file when there are none (or too few to pair).
    pairs = generate_pairs(tally.test_faces, seed=p.seed)
    pairs_text = format_pairs(pairs, plan.out).encode() if pairs else b""

    content = hashlib.sha256()
    for line in tally.content_lines():
        content.update(line)
    content.update(train_text)
    content.update(test_text)
    content.update(pairs_text)  # nothing when there are no pairs: such outputs keep their hash

    manifest = {
        "version": MANIFEST_VERSION,
        "raw": plan.raw,
        "layout": plan.layout,
        # What the output is, not how it was scheduled: no shard size, plan id or timings.
        "params": {k: getattr(p, k) for k in ("image_size", "margin", "detect_size", "min_face_frac", "holdout",
                                               "seed", "align")},
        "splits": {s: {"identities": len(tally.identities[s]), "images": c["images"], "faces": c["faces"],
                       "rejects": c["rejects"]} for s, c in sorted(tally.splits.items())},
        "lists": {"classes": len(classes), "train_list": n_train, "test_list": n_test, "test_pairs": len(pairs)},
        "reject_reasons": dict(sorted(tally.reasons.items())),
        "converted": dict(sorted(tally.converted.items())),
        "refused": len(plan.refused),
        # Raw photos with more than one name: allowed (hard-linked copies of a data set are common), but a
        # hard link cannot be told from its target, which may lie outside the data roots (README, Security).
        "hard_linked": tally.hard_linked,
        "rejects": sorted(tally.rejects, key=lambda r: r["path"]),
        "content_hash": "sha256:" + content.hexdigest(),
    }
    outputs = [("train_list.txt", train_text), ("test_list.txt", test_text)]
    if pairs:
        outputs.append(("test_pairs.txt", pairs_text))
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
