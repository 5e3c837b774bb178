"""Planning: the raw image list, split into shards that any worker can run from the plan alone.

The plan is a JSON file in OUT/.preprocess/ holding the parameters and the
sorted list of (split, identity, file). A shard is a pure function of (plan,
index): items [index * shard_size, (index + 1) * shard_size). Its id (a
hash of parameters and list) names the shard records, so a changed raw tree
or changed settings never reuse stale records (finished crops on disk are
still reused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

from facenet.errors import UserError
from facenet.fsutil import write_atomic

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

    def validate(self) -> None:
        if self.image_size < 32:
            raise UserError(f"--image-size {self.image_size}: must be at least 32")
        if not 0 <= self.margin < self.image_size:
            raise UserError(f"--margin {self.margin}: must be in [0, image size)")
        if self.shard_size < 0:
            raise UserError(f"--shard-size {self.shard_size}: must be at least 1 (or 0 for auto)")
        if self.detect_size < 64:
            raise UserError(f"--detect-size {self.detect_size}: must be at least 64")
        if not 0 < self.min_face_frac < 1:
            raise UserError(f"--min-face-frac {self.min_face_frac}: must be in (0, 1)")
        if not 0 <= self.holdout < 1:
            raise UserError(f"--holdout {self.holdout}: must be in [0, 1)")


@dataclass
class Plan:
    raw: str
    out: str
    params: Params
    items: list[tuple[str, str, str]]  # (split, identity, file name)
    layout: str  # "vggface2" (RAW/{train,test}/<id>) or "folders" (RAW/<id>)

    @property
    def plan_id(self) -> str:
        h = hashlib.sha256(json.dumps([dataclasses.asdict(self.params), self.items]).encode())
        return h.hexdigest()[:16]

    def with_shard_size(self, workers: int) -> "Plan":
        """Resolve shard_size 0 (auto): about 8 shards per worker, 8..256 images each, so small jobs
        spread over all workers and big ones stay at 256-image units of work."""
        if self.params.shard_size:
            return self
        size = min(256, max(8, -(-len(self.items) // (8 * max(1, workers)))))
        return dataclasses.replace(self, params=dataclasses.replace(self.params, shard_size=size))

    @property
    def num_shards(self) -> int:
        return -(-len(self.items) // self.params.shard_size) if self.params.shard_size else 0

    def shard_items(self, index: int) -> list[tuple[str, str, str]]:
        if not self.params.shard_size:
            raise ValueError("shard size not resolved (call with_shard_size first)")
        if not 0 <= index < self.num_shards:
            raise UserError(f"shard {index}: the plan has shards 0..{self.num_shards - 1}")
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

    def to_json(self) -> str:
        return json.dumps({"raw": self.raw, "out": self.out, "params": dataclasses.asdict(self.params),
                           "layout": self.layout, "items": self.items, "plan_id": self.plan_id})

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        return cls(d["raw"], d["out"], Params(**d["params"]), [tuple(i) for i in d["items"]], d["layout"])


def state_dir(out: str) -> str:
    return os.path.join(out, STATE_DIR)


def make_plan(raw: str, out: str, params: Params) -> Plan:
    """List RAW (VGGFace2 layout or identity folders) into a plan. Raises UserError on a bad RAW."""
    params.validate()
    raw = os.path.abspath(os.path.expanduser(raw))
    out = os.path.abspath(os.path.expanduser(out))
    if not os.path.isdir(raw):
        raise UserError(f"{raw}: no such directory (the raw data set)")
    if out == raw or out.startswith(raw + os.sep):
        raise UserError(f"{out}: the output must not be inside the raw data set {raw}")
    splits = [s for s in ("train", "test") if os.path.isdir(os.path.join(raw, s))]
    items: list[tuple[str, str, str]] = []
    if splits:
        layout = "vggface2"
        for split in splits:
            items += [(split, ident, name) for ident, name in _list_identities(os.path.join(raw, split))]
    else:
        layout = "folders"
        items = [("train", ident, name) for ident, name in _list_identities(raw)]
    if not items:
        raise UserError(f"{raw}: no images found (expected RAW/<identity>/<image> or RAW/train/<identity>/<image>)")
    return Plan(raw, out, params, items, layout)


def _list_identities(folder: str) -> list[tuple[str, str]]:
    found = []
    for ident in sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".")):
        for entry in sorted(os.scandir(os.path.join(folder, ident)), key=lambda e: e.name):
            # Every file with an image name is planned; what it really holds is decided (and
            # rejected with a reason if need be) when the shard reads it.
            if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(RAW_EXTENSIONS):
                found.append((ident, entry.name))
    return found


def save_plan(plan: Plan) -> str:
    """Write OUT/.preprocess/plan.json atomically (identical content from concurrent planners)."""
    path = os.path.join(state_dir(plan.out), "plan.json")
    write_atomic(path, plan.to_json().encode())
    return path


def load_plan(out: str) -> Plan:
    path = os.path.join(state_dir(os.path.abspath(out)), "plan.json")
    try:
        with open(path, encoding="utf-8") as fh:
            return Plan.from_json(fh.read())
    except FileNotFoundError:
        raise UserError(f"{path}: no preprocessing plan (run the planner first)") from None
