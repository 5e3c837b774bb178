"""The dataset contract: which images train, which are held out, and their labels.

Two layouts are accepted (README, "Dataset format"):

* ROOT with `train_list.txt` and `test_list.txt` (what preprocessing writes).
  Each line is `<path relative to ROOT> <class index>`; blank lines and lines
  starting with `#` are ignored; a line with only a path takes its class from
  the path's parent folder. The test list holds held-out images of the
  training identities, so Acc@1 is measured on images the model never saw.
* A folder of identity sub-folders (ImageFolder), or ROOT/train/ holding them:
  each identity's images are split by a seeded shuffle, `holdout` (20%, as
  the ModelZoo recipe) held out. The split is a pure function of (files, seed).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
from dataclasses import dataclass

from facenet import confine
from facenet.data import packfile
from facenet.data.packfile import MAX_CLASSES
from facenet.errors import InputError, clipped

# The largest training image read (a face crop is ~10 KB): the loader and `facenet-cli pack` refuse bigger files.
MAX_IMAGE_BYTES = 32 << 20
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
# A manifest names every rejected photo with its reason (VGGFace2's are a few MB); what read_metadata
# allowed any file a job quotes before there was a bound of its own.
MAX_MANIFEST_BYTES = 256 << 20
# A list line's class: ASCII digits, checked against MAX_CLASSES as text (a 5000-digit one made int() raise,
# 10^12 made the check for unused classes walk 10^12 integers).
_LABEL = re.compile(r"-?[0-9]+")

Sample = tuple[str, int]  # (absolute path, class index)


class Samples:
    """A sequence of (path, label) samples held in three numpy arrays: the paths (relative to `base`) as one
    UTF-8 blob, where each ends, and the labels. Loader worker processes are forked with the dataset; a Python
    list of 3M tuples there is copied page by page as the workers touch its reference counts (0.5 GiB a
    worker at VGGFace2's size), arrays never are. Indexing makes the (path, label) tuple on the fly. Made by
    SamplesBuilder (or `build`)."""

    def __init__(self, base: str, blob, ends, labels):
        self.base, self._blob, self._ends, self.labels = base, blob, ends, labels

    @staticmethod
    def build(base: str, rels, labels) -> "Samples":
        builder = SamplesBuilder(base)
        for rel, label in zip(rels, labels, strict=True):
            builder.add(rel, label)
        return builder.done()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def rel(self, index: int) -> str:
        start = int(self._ends[index - 1]) if index else 0
        return self._blob[start:int(self._ends[index])].tobytes().decode("utf-8", "surrogateescape")

    def __getitem__(self, index: int) -> Sample:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        index %= len(self)
        rel = self.rel(index)
        return (os.path.join(self.base, rel) if self.base else rel), int(self.labels[index])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        try:
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        except TypeError:
            return NotImplemented

    def __repr__(self) -> str:
        return f"Samples({len(self)} under {self.base or '/'})"

    reader = None  # a packfile.PackedReader when the images lie in a pack's shards, not in files

    def first_not_utf8(self) -> int | None:
        """The first sample whose path is not UTF-8 (a file name listed from a folder with other bytes in it,
        kept as surrogate escapes), else None."""
        try:
            self._blob.tobytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            import numpy as np

            return int(np.searchsorted(self._ends, exc.start, side="right"))
        return None

    def select(self, paths: list[str]) -> "Samples | None":
        """These paths as Samples (labels: their positions in `paths`), read as these are read; None when a
        path is not one of these samples (then it is read as a file)."""
        import numpy as np

        where = {path: k for k, (path, _) in enumerate(self)}
        if not all(path in where for path in paths):
            return None
        picked = np.array([where[path] for path in paths], dtype=np.int64)
        sub = Samples.build(self.base, [self.rel(int(k)) for k in picked], range(len(paths)))
        sub.reader = self.reader.subset(picked) if self.reader is not None else None
        return sub


class SamplesBuilder:
    """Samples added one at a time, kept as bytes and machine integers as they come: no Python object per
    sample is ever alive at once (a list of 2.5M path strings and labels was 0.8 GB at VGGFace2's size)."""

    def __init__(self, base: str):
        from array import array

        self.base, self.blob, self.ends, self.labels = base, bytearray(), array("q"), array("q")

    def add(self, rel: str, label: int) -> None:
        self.blob += rel.encode("utf-8", "surrogateescape")
        self.ends.append(len(self.blob))
        self.labels.append(label)

    def __len__(self) -> int:
        return len(self.labels)

    def done(self) -> Samples:
        import numpy as np

        return Samples(self.base, np.frombuffer(self.blob, dtype=np.uint8),
                                   np.frombuffer(self.ends, dtype=np.int64), np.frombuffer(self.labels, dtype=np.int64))


@dataclass
class DatasetSplit:
    root: str
    layout: str  # "lists", "folders" or "packed"
    classes: list[str]
    train: Samples
    test: Samples
    manifest_hash: str | None = None
    pair_images: Samples | None = None  # a pack's verification images (read from its shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        return (f"{self.layout} dataset at {self.root}: {self.num_classes} identities, "
                f"{len(self.train)} training images, {len(self.test)} held out")


def load_dataset(root: str, holdout: float = 0.2, seed: int = 123456,
                 roots: confine.Roots | None = None) -> DatasetSplit:
    """Resolve ROOT to train / held-out samples. Raises InputError (a UserError: one line, exit 2) naming what
    is wrong.

    With `roots` (a queued job), ROOT, the lists, the manifest and every folder images come from must
    resolve inside them; each image is checked again when the loader opens it."""
    root = confine.check(root, roots, "--data")
    if not os.path.exists(root):
        raise InputError(f"--data {root}: no such directory")
    if not os.path.isdir(root):
        raise InputError(f"--data {root}: not a directory")
    train_list = os.path.join(root, "train_list.txt")
    if packfile.is_pack(root):  # a pack holds its split as it was made (facenet/pack.py)
        split = _from_pack(root, roots)
    elif os.path.isfile(train_list):
        split = _from_lists(root, train_list, os.path.join(root, "test_list.txt"), roots)
    else:
        # The seed's tree (ROOT/train/<identity>, ROOT/test/<identity>) without lists: train on ROOT/train.
        train_dir = os.path.join(root, "train")
        folder = train_dir if os.path.isdir(train_dir) and identity_dirs(train_dir, roots) else root
        split = _from_folders(root, folder, holdout, seed, roots)
    if split.layout != "packed":
        split.manifest_hash = _manifest_hash(root, roots)
    if split.num_classes < 2:
        raise InputError(f"--data {root}: found {split.num_classes} identity; classification needs at least 2")
    if split.num_classes > MAX_CLASSES:
        raise InputError(f"--data {root}: {split.num_classes} identities, more than the {MAX_CLASSES} a classifier "
                         "head here can hold (facenet/data/packfile.py, MAX_CLASSES)")
    if not split.train:
        raise InputError(f"--data {root}: no training images found")
    return split


def load_for_training(root: str, holdout: float, seed: int, batch_size: int,
                      roots: confine.Roots | None = None) -> DatasetSplit:
    """load_dataset, plus the check that one global batch fits in the training split."""
    split = load_dataset(root, holdout, seed, roots)
    if len(split.train) < batch_size:
        raise InputError(f"--batch-size {batch_size}: larger than the training split ({len(split.train)} images)")
    return split


def identity_dirs(folder: str, roots: confine.Roots | None = None) -> list[str]:
    """The identity sub-folders of `folder` (hidden ones skipped), sorted. With `roots`, listed through the
    folder's own descriptor (see facenet/confine.py)."""
    try:
        if roots is not None:
            # A link is listed so that the check of each folder refuses it by name (never silently dropped).
            return sorted(n for n, kind in confine.scandir(folder, roots, "--data")
                          if (kind == "dir" or kind == "link" and os.path.isdir(os.path.join(folder, n)))
                          and not n.startswith("."))
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except PermissionError:
        raise InputError(f"--data {folder}: permission denied") from None


def list_images(folder: str, roots: confine.Roots | None = None) -> list[str]:
    """The image file names in `folder`, sorted (with `roots`: listed by the folder's descriptor; a symlinked
    image is listed, then refused where the loader opens it and counted as unreadable)."""
    if roots is not None:
        return sorted(n for n, kind in confine.scandir(folder, roots, "identity folder")
                      if kind in ("file", "link") and n.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(e.name for e in os.scandir(folder)
                  if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))


def _from_folders(root: str, folder: str, holdout: float, seed: int, roots: confine.Roots | None) -> DatasetSplit:
    classes: list[str] = []
    train, test = SamplesBuilder(folder), SamplesBuilder(folder)
    for name in identity_dirs(folder, roots):
        confine.check(os.path.join(folder, name), roots, "identity folder")
        files = list_images(os.path.join(folder, name), roots)
        if not files:
            continue
        label = len(classes)
        classes.append(name)
        # Per-identity seeded shuffle: adding an identity never moves another's split.
        rng = random.Random(f"{seed}:{name}")
        rng.shuffle(files)
        n_test = int(round(len(files) * holdout)) if len(files) > 1 else 0
        for builder, part in ((test, files[:n_test]), (train, files[n_test:])):
            for f in part:
                builder.add(f"{name}/{f}", label)
    if not classes:
        raise InputError(f"--data {root}: no identity sub-folders with images "
                        f"(expected ROOT/<identity>/<image> or ROOT/train_list.txt)")
    return DatasetSplit(root, "folders", classes, train.done(), test.done())


def _from_lists(root: str, train_list: str, test_list: str, roots: confine.Roots | None) -> DatasetSplit:
    if not os.path.isfile(test_list):
        raise InputError(f"{test_list}: missing (train_list.txt is present; both lists are needed)")
    names: dict[int, str] = {}
    train = _read_list(root, train_list, names, roots)
    test = _read_list(root, test_list, names, roots)
    if not names:
        raise InputError(f"{train_list}: lists no images")
    n = max(names) + 1
    missing = [i for i in range(n) if i not in names]
    if missing:
        raise InputError(f"{train_list}: class indices must be 0..{n - 1}; {len(missing)} unused (first: {missing[0]})")
    unseen = sorted(set(test.labels.tolist()) - set(train.labels.tolist()))
    if unseen:
        raise InputError(f"{test_list}: class {unseen[0]} ({names[unseen[0]]}) has no training images")
    return DatasetSplit(root, "lists", [names[i] for i in range(n)], train, test)


def _read_list(root: str, path: str, names: dict[int, str], roots: confine.Roots | None,
               sha256: str | None = None) -> Samples:
    """Parse one list file; `names` maps class index -> identity name, shared across lists. `sha256`: what a
    pack's header records for it (a list swapped for one of the same length would relabel its images)."""
    by_name = {v: k for k, v in names.items()}
    samples = SamplesBuilder(root)
    folders_seen: set[str] = set()
    data = confine.read_metadata(path, roots, "list file", 1 << 30)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise InputError(f"{confine.shown(path)}: the pack is corrupt: its sha256 is not the one "
                         f"{packfile.PACK_FILE} records (changed since it was packed; pack the data set again)")
    text = data.decode("utf-8", errors="replace")
    for lineno, raw in enumerate(io.StringIO(text, newline="\n"), 1):  # line by line, not a list of them all
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.isprintable() and not all(c.isprintable() or c in " \t" for c in line):
            # A NUL or control character cannot name a file; said here, once, not as a trainer crash.
            raise InputError(f"{path}:{lineno}: {line[:200]!r} holds a control character (NUL, escape, ...); "
                            "list lines are 'relative/path [class]'")
        parts = line.rsplit(None, 1)
        if len(parts) == 2 and _LABEL.fullmatch(parts[1]):
            rel, label = parts[0], _label(path, lineno, parts[1])
        else:
            rel, label = line, None
        if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
            raise InputError(f"{path}:{lineno}: path {rel!r} must be relative to the dataset root")
        folder = os.path.dirname(rel)
        if roots is not None and folder not in folders_seen:  # once per folder; each file again at open
            folders_seen.add(folder)
            try:
                roots.check(os.path.join(root, folder), "folder")
            except confine.Refused as exc:
                raise confine.Refused(f"{path}:{lineno}: {exc}") from None
        identity = os.path.basename(os.path.dirname(rel)) or rel
        if label is None:
            label = by_name.setdefault(identity, len(by_name))
        names.setdefault(label, identity)
        by_name.setdefault(identity, label)
        samples.add(rel, label)
    return samples.done()


def _label(path: str, lineno: int, text: str) -> int:
    """A list line's class index, refused in one line (the text clipped) unless it is one of MAX_CLASSES."""
    if text.startswith("-"):
        raise InputError(f"{path}:{lineno}: class index {clipped(text, 24)} is negative")
    if len(text) > len(str(MAX_CLASSES)) or int(text) >= MAX_CLASSES:
        raise InputError(f"{path}:{lineno}: class index {clipped(text, 24)} ({len(text)} digits) is past "
                         f"{MAX_CLASSES - 1}: at most {MAX_CLASSES} classes (a classifier head's bound, "
                         "facenet/data/packfile.py)")
    return int(text)


def _from_pack(root: str, roots: confine.Roots | None) -> DatasetSplit:
    """A pack's split: its lists, their images read from its shards (facenet/data/packfile.py). Its lists
    must use every class pack.json names and no other: the head is sized by the classes trained."""
    head = packfile.read_header(root, roots)
    names = dict(enumerate(head["classes"]))
    parts = {part: _read_list(root, os.path.join(root, packfile.LISTS[part]), names, roots,
                              head["lists"].get(packfile.LISTS[part]))
             for part in ("train", "test")}
    pair_images = _pair_images(root, roots)
    if pair_images is not None:
        parts["pairs"] = pair_images
    header = confine.shown(os.path.join(root, packfile.PACK_FILE))
    for part, listed in head["counts"].items():
        found = len(parts[part]) if part in parts else 0
        if found != listed:
            raise InputError(f"{header}: counts {listed} {part} images; {packfile.LISTS[part]} lists {found} "
                             "(the pack is corrupt)")
    _check_pack_classes(header, len(head["classes"]), parts["train"], parts["test"])
    index = packfile.read_index(root, roots, head, {part: len(samples) for part, samples in parts.items()})
    shards = [s["name"] for s in head["shards"]]
    for part, samples in parts.items():
        samples.reader = packfile.PackedReader(root, shards, index[part])
    return DatasetSplit(root, "packed", list(head["classes"]), parts["train"], parts["test"],
                        head.get("manifest_hash"), pair_images)


def _check_pack_classes(header: str, named: int, train: Samples, test: Samples) -> None:
    """The classes a pack's lists use are 0..named-1, every one (pack.json naming 200k classes for lists
    that use 8 trained a 200k-way head: 3.5 GB at its peak, a 509 MB model)."""
    import numpy as np

    used = np.union1d(np.unique(train.labels), np.unique(test.labels))
    if used.size != named or (used.size and int(used[-1]) != named - 1):
        raise InputError(f"{header}: names {named} classes; its lists use {used.size} (labels "
                         f"{int(used[0]) if used.size else '-'}..{int(used[-1]) if used.size else '-'}): "
                         "the pack is corrupt (a classifier head is sized by the classes trained)")
    unseen = np.setdiff1d(np.unique(test.labels), np.unique(train.labels))
    if unseen.size:
        raise InputError(f"{header}: class {int(unseen[0])} has held-out images and no training images")


def _pair_images(root: str, roots: confine.Roots | None) -> Samples | None:
    """A pack's pair_images.txt (one path a line, UTF-8 as `pack` writes it), or None when it has none."""
    pairs_list = os.path.join(root, packfile.LISTS["pairs"])
    if not os.path.isfile(pairs_list):
        return None
    data = confine.read_metadata(pairs_list, roots, "list file", 1 << 30)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{confine.shown(pairs_list)}:{line}: not UTF-8 text (byte {exc.start} is "
                         f"{data[exc.start]:#04x}); `pack` writes UTF-8, so the pack is corrupt") from None
    rels = [line for line in text.split("\n") if line]
    if any(os.path.isabs(rel) or ".." in rel.split("/") for rel in rels):
        raise InputError(f"{confine.shown(pairs_list)}: paths must be relative to the pack")
    return Samples.build(root, rels, range(len(rels)))


def _manifest_hash(root: str, roots: confine.Roots | None) -> str | None:
    """The preprocessing manifest's content hash if present, else a hash of the list files."""
    manifest = os.path.join(root, "manifest.json")
    if os.path.isfile(manifest):
        try:
            value = packfile.read_json(manifest, roots, "manifest", MAX_MANIFEST_BYTES)
        except OSError:
            value = {}  # unreadable (permissions): identified by its lists, as a data set without one
        if not isinstance(value, dict) or not isinstance(value.get("content_hash", ""), str):
            raise InputError(f"{confine.shown(manifest)}: not a preprocessing manifest (a JSON object whose "
                             "content_hash is text)")
        if value.get("content_hash"):
            return value["content_hash"]
    lists = [os.path.join(root, n) for n in ("train_list.txt", "test_list.txt")]
    if all(os.path.isfile(p) for p in lists):
        h = hashlib.sha256()
        for p in lists:
            h.update(confine.read_metadata(p, roots, "list file", 1 << 30))
        return "lists-sha256:" + h.hexdigest()[:16]
    return None
