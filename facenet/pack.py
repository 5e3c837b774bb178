"""`facenet-cli pack OUT --data ROOT`: a data set's crops as a few large tar shards with an index.

The format is described in facenet/data/packfile.py (the reading side) and
docs/datasets.md. The split is the one `load_dataset(ROOT)` gives the trainer
(lists as written, or a folder tree's seeded hold-out), in the same order, so
a pack feeds every rank the samples the folder would. Deterministic: the
same data set packs to the same bytes (members carry no times or owners).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time

import numpy as np

from facenet import confine
from facenet.data import packfile
from facenet.data.dataset import MAX_IMAGE_BYTES, load_dataset
from facenet.errors import InputError, UserError
from facenet.verification.pairs import format_pairs, pairs_file_in, read_pairs

DEFAULT_SHARD_BYTES = 1 << 30
SHARD_NAME = "shard-{:06d}.tar"
UNREADABLE_NAMED = 100  # pack.json names this many unreadable images (and counts them all)


class _Hashing:
    """A file being written (a tar shard, a list), hashed as it is written (never read back to hash it)."""

    def __init__(self, fh):
        self.fh, self.sha = fh, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.fh.tell()


class _Shards:
    """Writes members into shard-NNNNNN.tar files of about `limit` bytes each; `add` gives (shard, offset)."""

    def __init__(self, out: str, limit: int, roots: confine.Roots | None):
        self.out, self.limit, self.roots = out, limit, roots
        self.done: list[dict] = []
        self._open = None

    def _start(self) -> None:
        name = SHARD_NAME.format(len(self.done))
        ctx = confine.confined_write(os.path.join(self.out, name), self.roots, "pack shard")
        fh = ctx.__enter__()
        hashing = _Hashing(fh)
        self._open = (name, ctx, hashing, tarfile.open(fileobj=hashing, mode="w", format=tarfile.PAX_FORMAT))

    def add(self, rel: str, data: bytes) -> tuple[int, int]:
        if self._open is None:
            self._start()
        tar = self._open[3]
        info = tarfile.TarInfo(rel)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))
        # addfile leaves the data padded to whole 512-byte blocks at the end: it starts that far back.
        at = (len(self.done), tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
        tar.members.clear()  # the index keeps what is needed; 3M TarInfo objects would not be bounded
        if tar.offset >= self.limit:
            self.close()
        return at

    def close(self) -> None:
        if self._open is None:
            return
        name, ctx, hashing, tar = self._open
        tar.close()
        size = hashing.tell()
        ctx.__exit__(None, None, None)
        self.done.append({"name": name, "bytes": size, "sha256": hashing.sha.hexdigest()})
        self._open = None


def pack(data: str, out: str, shard_bytes: int = DEFAULT_SHARD_BYTES, holdout: float = 0.2, seed: int = 123456,
         roots: confine.Roots | None = None, progress: bool = True) -> dict:
    """Pack data root DATA into OUT; returns the summary (pack.json says the rest). A rerun over a finished
    pack of the same data set checks every file of it against pack.json's sha256 and does nothing when all
    match, else packs again (`rebuilt` says why); OUT must otherwise be new, empty or an earlier pack."""
    if not 1 << 20 <= shard_bytes <= 1 << 40:
        raise UserError(f"--shard-bytes {shard_bytes}: must be between 1 MiB and 1 TiB")
    t0 = time.perf_counter()
    split = load_dataset(data, holdout, seed, roots)
    if split.layout == "packed":
        raise UserError(f"--data {data}: is a pack already")
    root = split.root
    out = confine.check(out, roots, "OUT")
    if out == root or out.startswith(root + os.sep) or root.startswith(out + os.sep):
        raise UserError(f"{out}: the pack and the data set {root} must not hold one another")
    done, rebuilt = _finished(out, split.manifest_hash, roots)
    if done is not None:
        return {**done, "skipped": True, "rebuilt": None, "seconds": round(time.perf_counter() - t0, 3)}
    _check_out(out, roots)
    pairs_path = pairs_file_in(root)
    pairs = read_pairs(pairs_path, root, roots, "verification pairs") if pairs_path else None
    sources = {"train": split.train, "test": split.test}
    if pairs is not None:
        sources["pairs"] = [(path, -1) for path in pairs.images()]
    _check_packable(root, sources)
    # An earlier pack's header goes first (a cut-short rerun is no pack), and its pair lists (this one may have none).
    for name in (packfile.PACK_FILE, packfile.LISTS["pairs"], packfile.PAIRS_FILE):
        confine.remove(out, name, roots, "OUT")
    total = sum(len(v) for v in sources.values())
    confine.ensure_dir(out, roots, "OUT")
    shards = _Shards(out, shard_bytes, roots)
    index: dict[str, np.ndarray] = {}
    lists: dict[str, str] = {}
    unreadable = {"count": 0, "named": []}
    bar = _progress(total, progress)
    try:
        for part, samples in sources.items():
            index.update(_pack_part(part, samples, root, out, shards, roots, unreadable, bar, lists))
    finally:
        bar.close()
    shards.close()
    _remove_other_shards(out, {s["name"] for s in shards.done}, roots)
    if pairs is not None:
        text = format_pairs(pairs.pairs, root).encode()
        confine.write_bytes(os.path.join(out, packfile.PAIRS_FILE), text, roots, "pack list")
        lists[packfile.PAIRS_FILE] = hashlib.sha256(text).hexdigest()
    buf = io.BytesIO()
    np.savez(buf, **index)
    confine.write_bytes(os.path.join(out, packfile.INDEX_FILE), buf.getvalue(), roots, "pack index")
    header = {"format": packfile.PACK_FORMAT, "version": packfile.PACK_VERSION, "source": root,
              "source_layout": split.layout, "manifest_hash": split.manifest_hash,
              "split": "as listed" if split.layout == "lists" else {"holdout": holdout, "seed": seed},
              "classes": split.classes, "counts": {part: len(sources.get(part, ())) for part in packfile.LISTS},
              "bytes": sum(s["bytes"] for s in shards.done), "shards": shards.done,
              "index_sha256": hashlib.sha256(buf.getbuffer()).hexdigest(), "lists": lists,
              "unreadable": unreadable["count"], "unreadable_named": unreadable["named"]}
    text = (json.dumps(header, indent=1) + "\n").encode()
    if len(text) > packfile.MAX_HEADER_BYTES:  # the reader would refuse it: say so now, with what to change
        raise InputError(f"{out}: its {packfile.PACK_FILE} would be {len(text)} bytes, more than the "
                         f"{packfile.MAX_HEADER_BYTES} a pack's reader accepts ({len(shards.done)} shards, "
                         f"{len(split.classes)} classes); pack again with a larger --shard-bytes")
    confine.write_bytes(os.path.join(out, packfile.PACK_FILE), text, roots, "pack header")  # last: the pack is whole
    seconds = time.perf_counter() - t0
    return {**_summary(out, header), "skipped": False, "rebuilt": rebuilt, "seconds": round(seconds, 3),
            "img_per_s": round(total / seconds, 1) if seconds > 0 else 0.0}


def _check_packable(root: str, sources: dict) -> None:
    """What a pack cannot hold, said before anything is written: more images than an index may hold, a
    file name that is not UTF-8 (the lists are UTF-8 text; the folder loader reads such a name, a pack's
    list could not say it)."""
    total = sum(len(v) for v in sources.values())
    if total > packfile.MAX_INDEX_ENTRIES:
        raise InputError(f"--data {root}: {total} images, more than the {packfile.MAX_INDEX_ENTRIES} a pack may "
                         "index (facenet/data/packfile.py)")
    for samples in (sources["train"], sources["test"]):
        k = samples.first_not_utf8()
        if k is not None:
            raise InputError(f"{samples[k][0]}: its name is not UTF-8, and a pack's lists are UTF-8 text; rename "
                             "it (or train on the folder)")


def _pack_part(part: str, samples, root: str, out: str, shards: _Shards, roots, unreadable: dict,
               bar, lists: dict[str, str]) -> dict[str, np.ndarray]:
    """One list's images into the shards, its list file written as they go (its sha256 into `lists`): nothing
    per image is kept but its index entry (a list of 2.5M lines and a dict of what was packed were ~1 GB at
    VGGFace2's size)."""
    entries = np.zeros(len(samples), dtype=packfile.ENTRY)
    with confine.confined_write(os.path.join(out, packfile.LISTS[part]), roots, "pack list") as fh:
        hashing = _Hashing(fh)
        for k, (path, label) in enumerate(samples):
            rel = os.path.relpath(path, root)
            entries[k] = _add(shards, root, rel, roots, unreadable)
            hashing.write(f"{rel}\n".encode() if part == "pairs" else f"{rel} {label}\n".encode())
            bar.update(1)
    lists[packfile.LISTS[part]] = hashing.sha.hexdigest()
    return {f"{part}_{name}": entries[name] for name in packfile.INDEX_FIELDS}


def _add(shards: _Shards, root: str, rel: str, roots, unreadable: dict) -> tuple[int, int, int, np.ndarray]:
    """One image into the shards: its index entry, or size -1 (counted, the first ones named in pack.json)
    when it cannot be read, which the loader then treats as the folder loader treats an unreadable file."""
    try:
        data = confine.read_bytes(os.path.join(root, rel), roots, "image", MAX_IMAGE_BYTES)
    except (OSError, confine.Refused) as exc:
        unreadable["count"] += 1
        if len(unreadable["named"]) < UNREADABLE_NAMED:
            unreadable["named"].append({"path": rel, "reason": f"{type(exc).__name__}: {exc}"[:200]})
        return -1, 0, -1, np.zeros(32, dtype=np.uint8)
    shard, offset = shards.add(rel, data)
    return shard, offset, len(data), np.frombuffer(hashlib.sha256(data).digest(), dtype=np.uint8)


def _finished(out: str, manifest_hash: str | None, roots) -> tuple[dict | None, str | None]:
    """(the summary of a whole pack of this same data set in OUT, None), or (None, why the pack in OUT is
    packed again: a file of it is not the one its pack.json records), or (None, None): no pack of it."""
    if manifest_hash is None or not packfile.is_pack(out):
        return None, None
    try:
        header = packfile.read_header(out, roots)
    except UserError as exc:
        return None, f"{packfile.PACK_FILE} is not a readable pack header ({exc})"
    if header["manifest_hash"] != manifest_hash:
        return None, None
    wrong = _spoiled(out, header, roots)
    return (None, wrong) if wrong else (_summary(out, header), None)


def _spoiled(out: str, header: dict, roots) -> str | None:
    """The first file of a pack whose bytes are not the ones its pack.json records, or a list it does not
    record (None: all are as packed). Each is hashed whole, shards too: reading a pack once costs less than
    packing it, which reads and hashes every image and writes every byte."""
    expected = {packfile.INDEX_FILE: header["index_sha256"], **header["lists"],
                **{s["name"]: s["sha256"] for s in header["shards"]}}
    for name in (*packfile.LISTS.values(), packfile.PAIRS_FILE):
        if name not in expected and os.path.exists(os.path.join(out, name)):
            return f"{name} is not one {packfile.PACK_FILE} records"
    for name, sha256 in expected.items():
        try:
            if confine.sha256_file(os.path.join(out, name), roots, "pack file") != sha256:
                return f"{name} is not the file {packfile.PACK_FILE} records (its sha256 differs)"
        except FileNotFoundError:
            return f"{name} is missing"
    return None


def _check_out(out: str, roots) -> None:
    """OUT is new, empty, or holds only a pack's files (an earlier or unfinished pack, rewritten)."""
    if not os.path.isdir(out):
        return
    ours = set(packfile.LISTS.values()) | {packfile.PACK_FILE, packfile.INDEX_FILE, "test_pairs.txt"}
    other = [name for name, _ in confine.scandir(out, roots, "OUT")
             if name not in ours and not (name.startswith("shard-") and name.endswith(".tar"))
             and ".tmp-" not in name]
    if other:
        raise UserError(f"{out}: holds {len(other)} files that are not a pack's (first: {sorted(other)[0]}); "
                        "pack into a new or empty folder")


def _remove_other_shards(out: str, keep: set[str], roots) -> None:
    """An earlier pack's shards that this one does not name (it had more)."""
    for name, kind in confine.scandir(out, roots, "OUT"):
        if kind == "file" and name.startswith("shard-") and name.endswith(".tar") and name not in keep:
            confine.remove(out, name, roots, "OUT")


def _summary(out: str, header: dict) -> dict:
    return {"out": out, "source": header["source"], "manifest_hash": header["manifest_hash"],
            "shards": len(header["shards"]), "bytes": header["bytes"], **header["counts"],
            "classes": len(header["classes"]), "unreadable": header["unreadable"]}


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="pack", disable=not enabled, file=sys.stderr, dynamic_ncols=True)
