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
import json
import os
import random
from dataclasses import dataclass

from facenet import confine
from facenet.data import packfile
from facenet.errors import UserError

# The largest training image read (a face crop is ~10 KB): the loader and `facenet-cli pack` refuse bigger files.
MAX_IMAGE_BYTES = 32 << 20
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

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
    """Resolve ROOT to train / held-out samples. Raises UserError naming what is wrong.

    With `roots` (a queued job), ROOT, the lists, the manifest and every folder images come from must
    resolve inside them; each image is checked again when the loader opens it."""
    root = confine.check(root, roots, "--data")
    if not os.path.exists(root):
        raise UserError(f"--data {root}: no such directory")
    if not os.path.isdir(root):
        raise UserError(f"--data {root}: not a directory")
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
        raise UserError(f"--data {root}: found {split.num_classes} identity; classification needs at least 2")
    if not split.train:
        raise UserError(f"--data {root}: no training images found")
    return split


def load_for_training(root: str, holdout: float, seed: int, batch_size: int,
                      roots: confine.Roots | None = None) -> DatasetSplit:
    """load_dataset, plus the check that one global batch fits in the training split."""
    split = load_dataset(root, holdout, seed, roots)
    if len(split.train) < batch_size:
        raise UserError(f"--batch-size {batch_size}: larger than the training split ({len(split.train)} images)")
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
        raise UserError(f"--data {folder}: permission denied") from None


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
        raise UserError(f"--data {root}: no identity sub-folders with images "
                        f"(expected ROOT/<identity>/<image> or ROOT/train_list.txt)")
    return DatasetSplit(root, "folders", classes, train.done(), test.done())


def _from_lists(root: str, train_list: str, test_list: str, roots: confine.Roots | None) -> DatasetSplit:
    if not os.path.isfile(test_list):
        raise UserError(f"{test_list}: missing (train_list.txt is present; both lists are needed)")
    names: dict[int, str] = {}
    train = _read_list(root, train_list, names, roots)
    test = _read_list(root, test_list, names, roots)
    if not names:
        raise UserError(f"{train_list}: lists no images")
    n = max(names) + 1
    missing = [i for i in range(n) if i not in names]
    if missing:
        raise UserError(f"{train_list}: class indices must be 0..{n - 1}; {len(missing)} unused (first: {missing[0]})")
    unseen = sorted(set(test.labels.tolist()) - set(train.labels.tolist()))
    if unseen:
        raise UserError(f"{test_list}: class {unseen[0]} ({names[unseen[0]]}) has no training images")
    return DatasetSplit(root, "lists", [names[i] for i in range(n)], train, test)


def _read_list(root: str, path: str, names: dict[int, str], roots: confine.Roots | None) -> Samples:
    """Parse one list file; `names` maps class index -> identity name, shared across lists."""
    by_name = {v: k for k, v in names.items()}
    samples = SamplesBuilder(root)
    folders_seen: set[str] = set()
    text = confine.read_metadata(path, roots, "list file", 1 << 30).decode("utf-8", errors="replace")
    for lineno, raw in enumerate(io.StringIO(text, newline="\n"), 1):  # line by line, not a list of them all
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.isprintable() and not all(c.isprintable() or c in " \t" for c in line):
            # A NUL or control character cannot name a file; said here, once, not as a trainer crash.
            raise UserError(f"{path}:{lineno}: {line[:200]!r} holds a control character (NUL, escape, ...); "
                            "list lines are 'relative/path [class]'")
        parts = line.rsplit(None, 1)
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            rel, label = parts[0], int(parts[1])
        else:
            rel, label = line, None
        if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
            raise UserError(f"{path}:{lineno}: path {rel!r} must be relative to the dataset root")
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
        if label < 0:
            raise UserError(f"{path}:{lineno}: class index {label} is negative")
        names.setdefault(label, identity)
        by_name.setdefault(identity, label)
        samples.add(rel, label)
    return samples.done()


def _from_pack(root: str, roots: confine.Roots | None) -> DatasetSplit:
    """A pack's split: its lists, their images read from its shards (facenet/data/packfile.py)."""
    head = packfile.read_header(root, roots)
    names = dict(enumerate(str(c) for c in head["classes"]))
    shards = [s["name"] for s in head["shards"]]
    parts = {}
    for part in ("train", "test"):
        samples = _read_list(root, os.path.join(root, packfile.LISTS[part]), names, roots)
        samples.reader = packfile.PackedReader(root, shards, packfile.read_index(root, roots, part, len(samples)))
        parts[part] = samples
    if len(names) != len(head["classes"]):
        raise UserError(f"{root}: its lists name {len(names)} classes, its {packfile.PACK_FILE} {len(head['classes'])}")
    pairs_list = os.path.join(root, packfile.LISTS["pairs"])
    pair_images = None
    if os.path.isfile(pairs_list):
        rels = [line for line in confine.read_metadata(pairs_list, roots, "list file", 1 << 30).decode().split("\n")
                if line]
        if any(os.path.isabs(rel) or ".." in rel.split("/") for rel in rels):
            raise UserError(f"{pairs_list}: paths must be relative to the pack")
        pair_images = Samples.build(root, rels, range(len(rels)))
        pair_images.reader = packfile.PackedReader(root, shards, packfile.read_index(root, roots, "pairs", len(rels)))
    return DatasetSplit(root, "packed", [names[i] for i in range(len(names))], parts["train"], parts["test"],
                        head.get("manifest_hash"), pair_images)


def _manifest_hash(root: str, roots: confine.Roots | None) -> str | None:
    """The preprocessing manifest's content hash if present, else a hash of the list files."""
    manifest = os.path.join(root, "manifest.json")
    if os.path.isfile(manifest):
        try:
            value = json.loads(confine.read_metadata(manifest, roots, "manifest")).get("content_hash")
            if value:
                return str(value)
        except (OSError, ValueError, AttributeError):
            pass
    lists = [os.path.join(root, n) for n in ("train_list.txt", "test_list.txt")]
    if all(os.path.isfile(p) for p in lists):
        h = hashlib.sha256()
        for p in lists:
            h.update(confine.read_metadata(p, roots, "list file", 1 << 30))
        return "lists-sha256:" + h.hexdigest()[:16]
    return None
