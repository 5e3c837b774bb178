"""Planning: the raw image list, split into shards that any worker can run from the plan alone.

The plan is OUT/.preprocess/plan.json, a header holding the parameters, the
byte offset and hash of each shard's items, and plan-<id>.items beside it,
the sorted list of (split, identity, file) one per line. A shard is a pure
function of (plan, index): items [index * shard_size, (index + 1) *
shard_size), read alone from the items file by whichever worker runs it. The
plan's id (a hash of the header, which covers every item through the shard
hashes) names the shard records, so a changed raw tree or changed settings
never reuse stale records (finished crops on disk are still reused).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass

from facenet import confine
from facenet.errors import InputError, UserError

STATE_DIR = ".preprocess"
RAW_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


@dataclass(frozen=True)
class Params:
    image_size: int = 160
    margin: int = 0
    shard_size: int = 0  # 0: auto (run_local sizes shards to keep every worker busy; at most 256)
    detect_size: int = 640
    min_face_frac: float = 0.1
    holdout: float = 0.2
    seed: int = 123456
    align: bool = False  # --align: five-point similarity warp (facenet/preprocess/align.py) instead of the box

    def as_dict(self) -> dict:
        """The params as plans store and hash them: `align` only when set, so a plan that never aligned reads
        and hashes as it did before the setting existed (its id, and a job's shard records, stay valid)."""
        d = dataclasses.asdict(self)
        if not d["align"]:
            del d["align"]
        return d

    def validate(self) -> None:
        """InputError naming the first bad value (types too: a queued job's params come from JSON)."""
        for name, want in (("image_size", int), ("margin", int), ("shard_size", int), ("detect_size", int),
                           ("min_face_frac", float), ("holdout", float), ("seed", int)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float) if want is float else int):
                raise InputError(f"--{name.replace('_', '-')} {value!r}: must be {'a number' if want is float else 'an integer'}")
        if not isinstance(self.align, bool):
            raise InputError(f"--align {self.align!r}: must be true or false")
        if not 32 <= self.image_size <= 1024:
            raise InputError(f"--image-size {self.image_size}: must be in [32, 1024]")
        if not 0 <= self.margin < self.image_size:
            raise InputError(f"--margin {self.margin}: must be in [0, image size)")
        if not 0 <= self.shard_size <= 100_000:
            raise InputError(f"--shard-size {self.shard_size}: must be in [1, 100000] (or 0 for auto)")
        if not 64 <= self.detect_size <= 4096:
            raise InputError(f"--detect-size {self.detect_size}: must be in [64, 4096]")
        if not 0 < self.min_face_frac < 1:
            raise InputError(f"--min-face-frac {self.min_face_frac}: must be in (0, 1)")
        if not 0 <= self.holdout < 1:
            raise InputError(f"--holdout {self.holdout}: must be in [0, 1)")
        if not 0 <= self.seed < 2**32:
            raise InputError(f"--seed {self.seed}: must be in [0, 2^32)")


PLAN_VERSION = 2


@dataclass
class Plan:
    """What to preprocess. The planner holds `items` in memory; a plan read back from OUT (a worker, finalize)
    holds only its header, and each shard's items are read from the items file when that shard runs (see
    `save_plan`): at VGGFace2's 3.3M items every process holding them all was 1.15 GiB and 24 s each."""

    raw: str
    out: str
    params: Params
    items: list[tuple[str, str, str]] | None  # (split, identity, file name); None in a plan read from OUT
    layout: str  # "vggface2" (RAW/{train,test}/<id>) or "folders" (RAW/<id>)
    # Entries of RAW not planned, with the reason (symbolic links leaving the data roots); the manifest
    # counts them with the rejects.
    refused: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    stored: "_StoredItems | None" = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def count(self) -> int:
        return len(self.items) if self.items is not None else self.stored.count

    @functools.cached_property
    def _layout(self) -> tuple[list[int], list[str]]:
        """(where each shard's lines start in the items file, and the end; each shard's hash), from one pass
        over the items. The plan's id covers every item through the hashes, and a shard read back is checked
        against its own."""
        if self.stored is not None:
            return self.stored.offsets, self.stored.hashes
        offsets, hashes = [0], []
        for i in range(self.num_shards):
            data = _encode(self.shard_items(i))
            offsets.append(offsets[-1] + len(data))
            hashes.append(hashlib.sha256(data).hexdigest()[:32])
        return offsets, hashes

    @property
    def shard_hashes(self) -> list[str]:
        return self._layout[1]

    @functools.cached_property
    def plan_id(self) -> str:
        """A hash of everything the plan says, its folders included: a job records it at planning, and a
        plan file that was changed afterwards (whoever can write OUT) no longer matches. Computed once per
        Plan object from the header (the items enter by their shards' hashes), so reading it costs the
        same at 3.3M items as at 300; a plan is never changed in place (with_shard_size makes a new one)."""
        if not self.params.shard_size:
            raise ValueError("shard size not resolved (call with_shard_size first)")
        h = hashlib.sha256(json.dumps([PLAN_VERSION, self.raw, self.out, self.params.as_dict(), self.layout,
                                       self.count, self.refused, self.shard_hashes]).encode())
        return h.hexdigest()[:16]

    def with_shard_size(self, workers: int) -> "Plan":
        """Resolve shard_size 0 (auto): about 8 shards per worker, 8..256 images each, so small jobs
        spread over all workers and big ones stay at 256-image units of work."""
        if self.params.shard_size:
            return self
        size = min(256, max(8, -(-self.count // (8 * max(1, workers)))))
        return dataclasses.replace(self, params=dataclasses.replace(self.params, shard_size=size))

    @property
    def num_shards(self) -> int:
        return -(-self.count // self.params.shard_size) if self.params.shard_size else 0

    def shard_len(self, index: int) -> int:
        size = self.params.shard_size
        return max(0, min(size, self.count - index * size))

    def shard_items(self, index: int) -> list[tuple[str, str, str]]:
        if not self.params.shard_size:
            raise ValueError("shard size not resolved (call with_shard_size first)")
        if not 0 <= index < self.num_shards:
            raise UserError(f"shard {index}: the plan has shards 0..{self.num_shards - 1}")
        if self.items is None:
            return self.stored.read(index, self.shard_len(index))
        size = self.params.shard_size
        return self.items[index * size:(index + 1) * size]

    def raw_path(self, item: tuple[str, str, str]) -> str:
        split, identity, name = item
        return os.path.join(self.raw, split, identity, name) if self.layout == "vggface2" \
            else os.path.join(self.raw, identity, name)

    @staticmethod
    def out_rel(item: tuple[str, str, str]) -> str:
        """The crop keeps the raw file's name (as the seed), as PNG where the raw format is not JPEG/PNG."""
        split, identity, name = item
        stem, ext = os.path.splitext(name)
        if ext.lower() not in (".jpg", ".jpeg", ".png"):
            name = stem + ".png"
        return f"{split}/{identity}/{name}"

    @property
    def items_name(self) -> str:
        return f"plan-{self.plan_id}.items"

    def to_json(self) -> str:
        """The header: everything but the items, which lie in `items_name` beside it, one per line."""
        offsets = self._layout[0]
        return json.dumps({"version": PLAN_VERSION, "raw": self.raw, "out": self.out,
                           "params": self.params.as_dict(), "layout": self.layout, "count": self.count,
                           "refused": self.refused, "items_file": self.items_name, "offsets": offsets,
                           "shard_hashes": self.shard_hashes, "plan_id": self.plan_id})

    @classmethod
    def from_json(cls, text: str, roots: confine.Roots | None = None) -> "Plan":
        """Parse and check a plan's header; each shard's items are checked (plain names, no `..`, no `/`, the
        shard's hash) when they are read. A plan written before version 2 holds its items inline and keeps
        the id it had, so a job planned before an upgrade finds its shard records."""
        try:
            d = json.loads(text)
            if "items" in d:
                return _legacy_plan(d)
            params = Params(**d["params"])
            stored = _StoredItems(os.path.join(state_dir(d["out"]), d["items_file"]), int(d["count"]),
                                  [int(o) for o in d["offsets"]], [str(h) for h in d["shard_hashes"]], roots)
            plan = cls(d["raw"], d["out"], params, None, d["layout"], [tuple(r) for r in d.get("refused", [])],
                       stored)
            ok = (d["version"] == PLAN_VERSION and plan.layout in ("vggface2", "folders") and params.shard_size > 0
                  and _plain_name(d["items_file"]) and len(stored.offsets) == plan.num_shards + 1
                  and len(stored.hashes) == plan.num_shards and d["items_file"] == plan.items_name)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"preprocessing plan is corrupt ({type(exc).__name__}: {exc})") from None
        if not ok:
            raise UserError("preprocessing plan is corrupt (its header does not add up)")
        return plan


@dataclass
class _StoredItems:
    """A saved plan's items file: shard i is bytes offsets[i]:offsets[i + 1], one `split TAB identity TAB name`
    line per item (names are printable, so hold no tab or line break)."""

    path: str
    count: int
    offsets: list[int]
    hashes: list[str]
    roots: confine.Roots | None

    def read(self, index: int, length: int) -> list[tuple[str, str, str]]:
        start, end = self.offsets[index], self.offsets[index + 1]
        data = confine.read_range(self.path, self.roots, "preprocessing plan", start, end - start)
        if hashlib.sha256(data).hexdigest()[:32] != self.hashes[index]:
            raise UserError(f"{self.path}: shard {index}'s items do not match the plan (the file was changed)")
        items = [tuple(line.split("\t")) for line in data.decode("utf-8").split("\n")[:-1]]
        if len(items) != length or not all(_plain_item(item) for item in items):
            raise UserError("preprocessing plan is corrupt (an item is not split/identity/file)")
        return items


def _encode(items) -> bytes:
    return "".join(f"{s}\t{i}\t{n}\n" for s, i, n in items).encode()


def _plain_item(item) -> bool:
    return len(item) == 3 and item[0] in ("train", "test") and all(_plain_name(part) for part in item)


def _legacy_plan(d: dict) -> Plan:
    """A version-1 plan (items inline in plan.json), with the id version 1 gave it."""
    plan = Plan(d["raw"], d["out"], Params(**d["params"]), [tuple(i) for i in d["items"]], d["layout"],
                [tuple(r) for r in d.get("refused", [])])
    if plan.layout not in ("vggface2", "folders") or not all(_plain_item(item) for item in plan.items):
        raise UserError("preprocessing plan is corrupt (an item is not split/identity/file)")
    plan.__dict__["plan_id"] = hashlib.sha256(json.dumps(
        [plan.raw, plan.out, plan.params.as_dict(), plan.layout, d["items"], d.get("refused", [])]).encode()).hexdigest()[:16]
    return plan


def _plain_name(part) -> bool:
    return isinstance(part, str) and part not in ("", ".", "..") and "/" not in part and "\0" not in part


def state_dir(out: str) -> str:
    return os.path.join(out, STATE_DIR)


def make_plan(raw: str, out: str, params: Params, roots: confine.Roots | None = None) -> Plan:
    """List RAW (VGGFace2 layout or identity folders) into a plan. Raises UserError on a bad RAW.

    With `roots`, RAW and OUT must resolve inside them, and symbolic links in RAW that leave them are
    refused (recorded in the plan, counted in the manifest)."""
    params.validate()
    raw = confine.check(raw, roots, "RAW")
    out = confine.check(out, roots, "OUT")
    if not os.path.isdir(raw):
        raise UserError(f"{raw}: no such directory (the raw data set)")
    if out == raw or out.startswith(raw + os.sep):
        raise UserError(f"{out}: the output must not be inside the raw data set {raw}")
    splits = [s for s in ("train", "test") if _is_dir(os.path.join(raw, s), roots)]
    items: list[tuple[str, str, str]] = []
    refused: list[tuple[str, str]] = []
    if splits:
        layout = "vggface2"
        for split in splits:
            items += [(split, ident, name)
                      for ident, name in _list_identities(os.path.join(raw, split), roots, refused, split + "/")]
    else:
        layout = "folders"
        items = [("train", ident, name) for ident, name in _list_identities(raw, roots, refused, "")]
    if not items:
        raise UserError(f"{raw}: no images found (expected RAW/<identity>/<image> or RAW/train/<identity>/<image>)"
                        + (f"; {len(refused)} entries refused (first: {refused[0][0]}: {refused[0][1]})"
                           if refused else ""))
    return Plan(raw, out, params, items, layout, refused)


UNLISTABLE = "name holds a line break or control character"


def _listable(name: str) -> bool:
    """A name the list files can hold (one path per line; spaces and unicode are fine)."""
    return name.isprintable()


def _is_dir(path: str, roots: confine.Roots | None) -> bool:
    if roots is None:
        return os.path.isdir(path)
    return os.path.isdir(path) and not os.path.islink(path)


def _link_reason(path: str, roots: confine.Roots | None) -> str:
    inside = roots is None or roots.contains(os.path.realpath(path))
    return f"symbolic link ({confine.LINKS_NOTE})" if inside else "symbolic link outside the data roots"


def _list_identities(folder: str, roots: confine.Roots | None, refused: list, prefix: str) -> list[tuple[str, str]]:
    """(identity, file) of every image name beneath `folder`. Confined, the folders are listed through their
    own descriptors and no symbolic link is followed (each one is refused, with where it points)."""
    found = []
    entries = confine.scandir(folder, roots, "RAW") if roots is not None else \
        [(e.name, "dir" if e.is_dir() else "other") for e in os.scandir(folder)]
    for ident, kind in sorted(entries):
        if ident.startswith(".") or kind not in ("dir", "link"):
            continue
        path = os.path.join(folder, ident)
        if kind == "link" and not os.path.isdir(path):
            continue
        if not _listable(ident):
            refused.append((prefix + repr(ident)[1:-1], UNLISTABLE))
            continue
        if kind == "link":
            refused.append((prefix + ident, _link_reason(path, roots)))
            continue
        files = confine.scandir(path, roots, "identity folder") if roots is not None else \
            [(e.name, "file" if e.is_file() else "other") for e in os.scandir(path)]
        for name, fkind in sorted(files):
            # Every file with an image name is planned; what it really holds is decided (and
            # rejected with a reason if need be) when the shard reads it, confined again there.
            if fkind not in ("file", "link") or name.startswith(".") or not name.lower().endswith(RAW_EXTENSIONS):
                continue
            if not _listable(name):
                refused.append((f"{prefix}{ident}/{repr(name)[1:-1]}", UNLISTABLE))
                continue
            if fkind == "link":
                if os.path.isfile(os.path.join(path, name)):
                    refused.append((f"{prefix}{ident}/{name}", _link_reason(os.path.join(path, name), roots)))
                continue
            found.append((ident, name))
    return found


def save_plan(plan: Plan, roots: confine.Roots | None = None) -> str:
    """Write the items file, then OUT/.preprocess/plan.json, each atomically (identical content from concurrent
    planners). The items file is named by the plan's id, so a planner of other items never rewrites the one
    a running job reads; those of earlier plans are removed."""
    folder = state_dir(plan.out)
    with confine.confined_write(os.path.join(folder, plan.items_name), roots, "preprocessing state") as fh:
        for index in range(plan.num_shards):  # shard by shard: the whole list as one string was 200 MB more
            fh.write(_encode(plan.shard_items(index)))
    path = os.path.join(folder, "plan.json")
    confine.write_bytes(path, plan.to_json().encode(), roots, "preprocessing state")
    for name, kind in confine.scandir(folder, roots, "preprocessing state"):
        if kind == "file" and name.startswith("plan-") and name.endswith(".items") and name != plan.items_name:
            confine.remove(folder, name, roots, "preprocessing state")
    return path


def load_plan(out: str, roots: confine.Roots | None = None) -> Plan:
    """The plan saved in OUT: its header, and its items read shard by shard (confined by `roots`)."""
    path = os.path.join(state_dir(os.path.abspath(out)), "plan.json")
    try:
        return Plan.from_json(confine.read_text(path, roots, "preprocessing plan"), roots)
    except FileNotFoundError:
        raise UserError(f"{path}: no preprocessing plan (run the planner first)") from None
