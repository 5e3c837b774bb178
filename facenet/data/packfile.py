"""Packed data sets, the reading side: a few large tar shards and an index, for shared file systems.

VGGFace2 as 3.3M small files costs a metadata round trip per image on NFS or
Lustre; a pack is `facenet-cli pack OUT --data ROOT` (facenet/pack.py) and
holds (docs/datasets.md, "Packed data sets"):

    OUT/pack.json         format, version, classes, shards (name, bytes, sha256), counts, the source's
                          manifest hash; written last
    OUT/train_list.txt    the source's split as it was loaded, `<path> <class>` per line, in the
    OUT/test_list.txt     order the samplers index (so a pack feeds each rank what the folder feeds)
    OUT/pair_images.txt   the images the source's test_pairs.txt names (people never trained on)
    OUT/test_pairs.txt    those pairs, as in the source
    OUT/index.npz         per list, arrays of shard, offset, size and sha256 of each image's bytes
    OUT/shard-000000.tar  plain ustar files: each image a member named by its path (`tar tf` lists
    ...                   them, `tar xf` gives the folder tree back, byte for byte)

A sample is read with one pread at its offset in an already open shard and
checked against its sha256; an image that could not be packed (size -1) or
whose bytes do not match is a bad image, named and replaced as a bad file is.
The index is read with numpy's loader, pickles refused.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from facenet import confine
from facenet.errors import UserError

PACK_FORMAT = "facenet-pack"
PACK_VERSION = 1
PACK_FILE = "pack.json"
INDEX_FILE = "index.npz"
LISTS = {"train": "train_list.txt", "test": "test_list.txt", "pairs": "pair_images.txt"}
INDEX_FIELDS = ("shard", "offset", "size", "sha256")


def is_pack(root: str) -> bool:
    return os.path.isfile(os.path.join(root, PACK_FILE))


def read_header(root: str, roots: confine.Roots | None) -> dict:
    """pack.json, checked: UserError naming the file when it is not a pack this version reads."""
    path = os.path.join(root, PACK_FILE)
    try:
        head = json.loads(confine.read_metadata(path, roots, "pack header"))
        ok = (head["format"] == PACK_FORMAT and isinstance(head["classes"], list)
              and all(isinstance(s["name"], str) and _plain(s["name"]) for s in head["shards"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a readable pack ({type(exc).__name__}: {exc})") from None
    if not ok:
        raise UserError(f"{path}: not a {PACK_FORMAT} header")
    if head.get("version") != PACK_VERSION:
        raise UserError(f"{path}: pack version {head.get('version')!r}; this version reads {PACK_VERSION}")
    return head


def _plain(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def read_index(root: str, roots: confine.Roots | None, part: str, count: int) -> dict[str, np.ndarray]:
    """The index arrays of one list (`train`, `test`, `pairs`), checked against the list's length."""
    path = os.path.join(root, INDEX_FILE)
    import io

    try:
        with np.load(io.BytesIO(confine.read_metadata(path, roots, "pack index", 1 << 31)), allow_pickle=False) as z:
            arrays = {name: z[f"{part}_{name}"] for name in INDEX_FIELDS}
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if any(a.shape[0] != count for a in arrays.values()) or arrays["sha256"].shape[1:] != (32,):
        raise UserError(f"{path}: the {part} index does not match {LISTS[part]} ({count} lines)")
    return arrays


class PackedReader:
    """Reads one list's images out of the shards: the arrays of `read_index`, and the shard files, opened
    once per process (a forked loader worker opens its own) and read with pread, so workers never share an
    offset."""

    def __init__(self, root: str, shards: list[str], index: dict[str, np.ndarray]):
        self.root, self.shards = root, shards
        self.shard, self.offset, self.size = index["shard"], index["offset"], index["size"]
        self.sha256 = index["sha256"]
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}

    def _fd(self, shard: int, roots: confine.Roots | None) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptors are the parent's
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            if not 0 <= shard < len(self.shards):
                raise ValueError(f"shard {shard}: the pack has {len(self.shards)}")
            path = os.path.join(self.root, self.shards[shard])
            self._fds[shard] = confine.open_regular(path, roots, "pack shard")
        return self._fds[shard]

    def read(self, index: int, path: str, roots: confine.Roots | None, max_bytes: int) -> bytes:
        size = int(self.size[index])
        if size < 0:
            raise ValueError(f"{path}: could not be read when the pack was made (see pack.json)")
        if size > max_bytes:
            raise ValueError(f"{path}: {size} bytes, more than {max_bytes}")
        data = os.pread(self._fd(int(self.shard[index]), roots), size, int(self.offset[index]))
        if len(data) != size or hashlib.sha256(data).digest() != self.sha256[index].tobytes():
            raise ValueError(f"{path}: its bytes in {self.shards[int(self.shard[index])]} do not match the pack's "
                             "sha256 (the shard was changed or cut short)")
        return data

    def subset(self, picked: np.ndarray) -> "PackedReader":
        return PackedReader(self.root, self.shards, {"shard": self.shard[picked], "offset": self.offset[picked],
                                                     "size": self.size[picked], "sha256": self.sha256[picked]})

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
