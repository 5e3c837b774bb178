"""Verification pairs: read LFW's `pairs.txt`, read and write ours, or generate them.

Our format (`OUT/test_pairs.txt`, written by preprocessing; README, "Verification pairs"):

    # facenet-stack pairs v1: <path a> <path b> <1 same | 0 different> <fold>
    test/n000001/0001_01.jpg test/n000001/0002_01.jpg 1 0
    test/n000001/0001_01.jpg test/n000009/0011_01.jpg 0 0

Paths are relative to the data root. LFW's format (`10 300`, then per fold 300
lines `name n1 n2` for the same person and 300 lines `name1 n1 name2 n2` for
two people, image `name/name_%04d.jpg`) is read as published; the images are
looked for under ROOT/name, ROOT/train/name and ROOT/test/name, with any image
extension (our preprocessing may have written a `.png`).

Generated pairs are a pure function of (identity folders, seed): identities are
dealt to folds so that no person appears in two folds (as in LFW, whose folds
hold disjoint people), and each fold gets as many same-person as
different-person pairs.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from facenet import confine
from facenet.data.dataset import IMAGE_EXTENSIONS, identity_dirs, list_images
from facenet.errors import UserError

HEADER = "# facenet-stack pairs v1: <path a> <path b> <1 same | 0 different> <fold>"
DEFAULT_FOLDS = 10
DEFAULT_PAIRS = 6000  # LFW's count


@dataclass(frozen=True)
class Pair:
    a: str  # absolute paths
    b: str
    same: bool
    fold: int


@dataclass
class PairSet:
    pairs: list[Pair]
    source: str  # where they came from, for the report
    # An insightface .bin's pairs in file order: scored by insightface's own procedure too (evaluate.score_pairs).
    insightface: bool = False

    def images(self) -> list[str]:
        """Every image the pairs name, once, sorted."""
        return sorted({img for p in self.pairs for img in (p.a, p.b)})

    def people(self) -> set[str]:
        """The identities in the pairs (by folder name), for "did the model see these people?"."""
        return {identity_of(img) for img in self.images()}


def identity_of(path: str) -> str:
    return os.path.basename(os.path.dirname(path))


# ---- reading ---------------------------------------------------------------------------------------------
def read_pairs(path: str, root: str, roots: confine.Roots | None = None, what: str = "--pairs",
               present: set[str] | None = None) -> PairSet:
    """Read a pairs file in our format or LFW's (told apart by the first line). Every image it names
    must exist (be one of `present`, a pack's images, when given); the error names the first missing one
    and the line. `what`: the option named in errors."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path}: no such file")
    text = confine.read_metadata(path, roots, what, 64 << 20).decode("utf-8", errors="replace")
    lines = [ln for ln in text.splitlines()]
    first = next((ln for ln in lines if ln.strip()), "")
    if first.startswith("# facenet-stack pairs"):
        pairs = _read_ours(path, root, lines, what)
    elif first.split() and all(tok.isdigit() for tok in first.split()) and len(first.split()) <= 2:
        pairs = _read_lfw(path, root, lines, what)
    else:
        raise UserError(f"{what} {path}: line 1 is neither our header ({HEADER!r}) nor LFW's "
                        f"('<folds> <pairs per fold>'): {first[:80]!r}")
    if not pairs:
        raise UserError(f"{what} {path}: no pairs in it")
    for p in pairs:
        for image in (p.a, p.b):
            if not (image in present if present is not None else os.path.isfile(image)):
                raise UserError(f"{what} {path}: {image} does not exist" + (" in the pack" if present else ""))
    if len({p.fold for p in pairs}) < 2:
        raise UserError(f"{what} {path}: every pair is in one fold; the LFW protocol needs 2 or more (each fold's "
                        "threshold is chosen on the others)")
    return PairSet(pairs, f"{path} ({len(pairs)} pairs)")


def _read_ours(path: str, root: str, lines: list[str], what: str) -> list[Pair]:
    pairs = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 4 or parts[2] not in ("0", "1") or not parts[3].isdigit():
            raise UserError(f"{what} {path}:{n}: expected '<path a> <path b> <0|1> <fold>', got {line[:80]!r}")
        a, b = (_inside(root, rel, f"{what} {path}:{n}") for rel in parts[:2])
        pairs.append(Pair(a, b, parts[2] == "1", int(parts[3])))
    return pairs


def _read_lfw(path: str, root: str, lines: list[str], what: str) -> list[Pair]:
    header = lines[0].split()
    body = [(n, ln.split()) for n, ln in enumerate(lines[1:], 2) if ln.strip()]
    if len(header) == 2:  # "10 300": 10 folds of 300 same-person lines then 300 different-person lines
        folds, per = int(header[0]), int(header[1])
        if len(body) != folds * 2 * per:
            raise UserError(f"{what} {path}: the header promises {folds} x 2 x {per} pairs, "
                            f"the file has {len(body)} lines")
        fold_of = [i // (2 * per) for i in range(len(body))]
    else:  # pairsDevTest.txt style, "500": one set; spread each class evenly over 10 folds
        fold_of = _spread([len(parts) == 3 for _, parts in body], DEFAULT_FOLDS)
    pairs = []
    for (n, parts), fold in zip(body, fold_of):
        try:
            if len(parts) == 3:
                a, b = _lfw_image(root, parts[0], int(parts[1])), _lfw_image(root, parts[0], int(parts[2]))
            elif len(parts) == 4:
                a, b = _lfw_image(root, parts[0], int(parts[1])), _lfw_image(root, parts[2], int(parts[3]))
            else:
                raise ValueError
        except ValueError:
            raise UserError(f"{what} {path}:{n}: expected 'name n1 n2' or 'name1 n1 name2 n2', "
                            f"got {' '.join(parts)[:80]!r}") from None
        except FileNotFoundError as exc:
            raise UserError(f"{what} {path}:{n}: {exc.args[0]}") from None
        pairs.append(Pair(a, b, len(parts) == 3, fold))
    return pairs


def _spread(same: list[bool], folds: int) -> list[int]:
    out, seen = [], {True: 0, False: 0}
    totals = {True: sum(same), False: len(same) - sum(same)}
    for s in same:
        out.append(seen[s] * folds // max(totals[s], 1))
        seen[s] += 1
    return out


def _lfw_image(root: str, name: str, number: int) -> str:
    stem = f"{name}_{number:04d}"
    for folder in (os.path.join(root, name), os.path.join(root, "train", name), os.path.join(root, "test", name)):
        for ext in IMAGE_EXTENSIONS:
            candidate = os.path.join(folder, stem + ext)
            if os.path.isfile(candidate):
                return candidate
    raise FileNotFoundError(f"no image {stem}.* under {root}/{name}, {root}/train/{name} or {root}/test/{name}")


def _inside(root: str, rel: str, where: str) -> str:
    if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
        raise UserError(f"{where}: {rel!r} must be a path relative to the data root")
    return os.path.join(root, rel)


# ---- generating and writing --------------------------------------------------------------------------------
def generate_pairs(images_by_identity: dict[str, list[str]], seed: int = 0, folds: int = DEFAULT_FOLDS,
                   max_pairs: int = DEFAULT_PAIRS) -> list[Pair]:
    """Balanced, seeded pairs over disjoint folds of identities (see the module docstring). Fewer folds
    when there are too few people; an empty list when no fold can have both kinds of pair."""
    usable = {i: sorted(p) for i, p in images_by_identity.items() if p}
    people = sorted(usable)
    random.Random(f"{seed}:people").shuffle(people)
    # A fold needs 2 people for a different-person pair and one person with 2 images for a same one.
    folds = max(0, min(folds, len(people) // 2))
    while folds >= 2:
        groups = [people[k::folds] for k in range(folds)]
        if all(any(len(usable[i]) > 1 for i in g) and len(g) >= 2 for g in groups):
            break
        folds -= 1
    if folds < 2:
        return []
    per_fold = max(1, max_pairs // (2 * folds))
    pairs: list[Pair] = []
    for k, group in enumerate(groups):
        rng = random.Random(f"{seed}:fold:{k}")
        same = _unique_draws(rng, per_fold, lambda: _same_pair(rng, group, usable))
        diff = _unique_draws(rng, len(same), lambda: _different_pair(rng, group, usable))
        same = same[:len(diff)]  # balanced, even when a small fold runs out of distinct pairs
        pairs += [Pair(a, b, True, k) for a, b in same] + [Pair(a, b, False, k) for a, b in diff]
    return pairs


def _same_pair(rng: random.Random, group: list[str], usable: dict[str, list[str]]):
    person = rng.choice([i for i in group if len(usable[i]) > 1])
    a, b = rng.sample(usable[person], 2)
    return tuple(sorted((a, b)))


def _different_pair(rng: random.Random, group: list[str], usable: dict[str, list[str]]):
    p, q = rng.sample(group, 2)
    return tuple(sorted((rng.choice(usable[p]), rng.choice(usable[q]))))


def _unique_draws(rng: random.Random, wanted: int, draw) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    tries = 0
    while len(seen) < wanted and tries < wanted * 20:
        seen.setdefault(draw(), None)
        tries += 1
    return list(seen)


def identity_folders(folder: str, roots: confine.Roots | None = None) -> dict[str, list[str]]:
    """{identity: [image paths]} for a folder of identity folders, listed as training lists them."""
    out: dict[str, list[str]] = {}
    for name in identity_dirs(folder, roots):
        sub = os.path.join(folder, name)
        confine.check(sub, roots, "an identity folder")
        out[name] = [os.path.join(sub, f) for f in list_images(sub, roots)]
    return out


def format_pairs(pairs: list[Pair], root: str) -> str:
    """Our format, paths relative to `root`, sorted within each fold: byte-identical for the same pairs."""
    rows = sorted(pairs, key=lambda p: (p.fold, not p.same, p.a, p.b))
    return HEADER + "\n" + "".join(f"{os.path.relpath(p.a, root)} {os.path.relpath(p.b, root)} "
                                   f"{int(p.same)} {p.fold}\n" for p in rows)


# ---- finding the pairs for a data root -----------------------------------------------------------------------
def pairs_file_in(root: str) -> str | None:
    """ROOT/test_pairs.txt (preprocessing's), else LFW's ROOT/pairs.txt, else None."""
    return next((os.path.join(root, n) for n in ("test_pairs.txt", "pairs.txt")
                 if os.path.isfile(os.path.join(root, n))), None)


def find_pairs(root: str, pairs_file: str | None = None, seed: int = 0,
               roots: confine.Roots | None = None) -> PairSet:
    """The pairs to verify on for data root ROOT, in this order: `pairs_file`; ROOT/test_pairs.txt
    (preprocessing's, over identities held out of training); LFW's ROOT/pairs.txt; pairs generated from
    ROOT/test/ when it holds identity folders; else pairs generated from all of ROOT (a plain folder of
    identity folders)."""
    if not os.path.isdir(root):
        raise UserError(f"--data {root}: no such directory")
    if pairs_file:
        return read_pairs(pairs_file, root, roots)
    found = pairs_file_in(root)
    if found:
        return read_pairs(found, root, roots)
    test = os.path.join(root, "test")
    by_identity = identity_folders(test, roots) if os.path.isdir(test) else {}
    folder = test if by_identity else root
    by_identity = by_identity or identity_folders(root, roots)
    pairs = generate_pairs(by_identity, seed)
    if not pairs:
        with_two = sum(1 for v in by_identity.values() if len(v) > 1)
        raise UserError(f"--data {root}: no verification pairs: no pairs file (test_pairs.txt, pairs.txt or "
                        f"--pairs) and {folder} holds {len(by_identity)} identity folder(s), {with_two} with 2+ "
                        "images (at least 4 people, 2 with 2+ images, are needed to generate pairs)")
    folds = len({p.fold for p in pairs})
    return PairSet(pairs, f"{len(pairs)} pairs generated (seed {seed}, {folds} folds) from the "
                          f"{len(by_identity)} identity folders of {folder}")
