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
import json
import os
import random
from dataclasses import dataclass

from facenet import confine
from facenet.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

Sample = tuple[str, int]  # (absolute path, class index)


@dataclass
class DatasetSplit:
    root: str
    layout: str  # "lists" or "folders"
    classes: list[str]
    train: list[Sample]
    test: list[Sample]
    manifest_hash: str | None = None

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
    if os.path.isfile(train_list):
        split = _from_lists(root, train_list, os.path.join(root, "test_list.txt"), roots)
    else:
        # The seed's tree (ROOT/train/<identity>, ROOT/test/<identity>) without lists: train on ROOT/train.
        train_dir = os.path.join(root, "train")
        folder = train_dir if os.path.isdir(train_dir) and identity_dirs(train_dir, roots) else root
        split = _from_folders(root, folder, holdout, seed, roots)
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
    classes, train, test = [], [], []
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
        paths = [os.path.join(folder, name, f) for f in files]
        test += [(p, label) for p in paths[:n_test]]
        train += [(p, label) for p in paths[n_test:]]
    if not classes:
        raise UserError(f"--data {root}: no identity sub-folders with images "
                        f"(expected ROOT/<identity>/<image> or ROOT/train_list.txt)")
    return DatasetSplit(root, "folders", classes, train, test)


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
    train_labels = {label for _, label in train}
    unseen = sorted({label for _, label in test} - train_labels)
    if unseen:
        raise UserError(f"{test_list}: class {unseen[0]} ({names[unseen[0]]}) has no training images")
    return DatasetSplit(root, "lists", [names[i] for i in range(n)], train, test)


def _read_list(root: str, path: str, names: dict[int, str], roots: confine.Roots | None) -> list[Sample]:
    """Parse one list file; `names` maps class index -> identity name, shared across lists."""
    by_name = {v: k for k, v in names.items()}
    samples = []
    folders_seen: set[str] = set()
    text = confine.read_metadata(path, roots, "list file", 1 << 30).decode("utf-8", errors="replace")
    for lineno, raw in enumerate(text.split("\n"), 1):
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
        samples.append((os.path.join(root, rel), label))
    return samples


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
