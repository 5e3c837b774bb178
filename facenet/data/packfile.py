"""Packed data sets, the reading side: a few large tar shards and an index, for shared file systems.

VGGFace2 as 3.3M small files costs a metadata round trip per image on NFS or
Lustre; a pack is `facenet-cli pack OUT --data ROOT` (facenet/pack.py) and
holds (docs/datasets.md, "Packed data sets"):

    OUT/pack.json         format, version, classes, shards (name, bytes, sha256), counts, the source's
                          manifest hash, the sha256 of the index and of each list; written last
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

Everything a pack holds is checked before it is used, since a pack is a file
anyone with the folder can rewrite: pack.json against its schema and bounds
(size, JSON depth, classes); the index by its zip directory and each member's
npy header (stored, not deflated; the dtype, shape and byte count the lists
call for) before one array is allocated, then against pack.json's sha256 and
every entry against the shard it names (no offset past a shard's end).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import zipfile

import numpy as np

from facenet import confine
from facenet.errors import InputError, clipped, first_line

PACK_FORMAT = "facenet-pack"
PACK_VERSION = 2  # 2: pack.json records the sha256 of index.npz and of each list (a rerun verifies the pack)
PACK_FILE = "pack.json"
INDEX_FILE = "index.npz"
LISTS = {"train": "train_list.txt", "test": "test_list.txt", "pairs": "pair_images.txt"}
PAIRS_FILE = "test_pairs.txt"
ENTRY = np.dtype([("shard", np.int32), ("offset", np.int64), ("size", np.int64), ("sha256", np.uint8, 32)])
INDEX_FIELDS = ENTRY.names

# The classes one data set may have: the classifier head is C x 512 fp32, replicated on every rank and
# trained with Adam (weights, gradients and two moments: 4 copies), so C = 2^21 is 4 GiB of weights and
# 16 GiB of training state per device (Adam, the recipe's default), a quarter of an Ascend 910B's 64 GB.
# It holds WebFace42M (2,059,906 identities), the largest cleaned public face set; more needs a head sharded
# over ranks, which this trainer does not have. A list's class index is checked against it as text.
MAX_CLASSES = 1 << 21
# Images in one pack, over its three lists: WebFace42M's 42.5M fit. An entry costs 52 bytes of index in
# memory (3.5 GB at the bound), in every rank that loads it.
MAX_INDEX_ENTRIES = 1 << 26
# pack.json holds the class names: WebFace42M's 2,059,906 (~10 characters each) take ~30 MB of it, VGGFace2's
# 9,131 100 KB. json makes objects of what it parses (64 MiB of `{},` is 1.5 GB of dicts), so no more is read:
# 64 MiB, where 256 MiB (the bound of any file a job quotes) let 4x that through. Its JSON nests 3 deep (the header,
# `shards`, one shard), manifest.json 3 (the manifest, `rejects`, one reject); 16 leaves room for fields to
# come. json's own recursion stops near 1000 levels with a RecursionError (a 100k-deep file was a traceback).
MAX_HEADER_BYTES = 64 << 20
MAX_JSON_DEPTH = 16
# What np.savez writes beside the arrays: a local header and a central directory entry per member (under
# 200 bytes) and the npy header (numpy reads at most 10,000 bytes of it); a zip's central directory of the
# 12 members a pack has is under 2 KB, and zipfile makes an object per entry it lists, so more is refused.
MEMBER_OVERHEAD = 16 << 10
MAX_DIRECTORY_BYTES = 64 << 10
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_pack(root: str) -> bool:
    return os.path.isfile(os.path.join(root, PACK_FILE))


# ---- JSON files a data set holds (pack.json, manifest.json) ---------------------------------------------

def json_depth(value) -> int:
    """How deep a parsed JSON value's arrays and objects nest (0 for a scalar); iterative, any depth."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)
                        if isinstance(child, (list, dict)))
    return deepest


def read_json(path: str, roots: confine.Roots | None, what: str, max_bytes: int = MAX_HEADER_BYTES) -> object:
    """A JSON file of a data set (pack.json, manifest.json): confined, at most `max_bytes` of UTF-8 nested at
    most MAX_JSON_DEPTH deep. InputError naming the file otherwise (never a RecursionError)."""
    data = confine.read_metadata(path, roots, what, max_bytes)
    where = confine.shown(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x})") from None
    try:
        value = json.loads(text)
    except ValueError as exc:  # JSONDecodeError; an integer of more than 4300 digits
        raise InputError(f"{where}: not valid JSON ({first_line(exc)})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deep for the parser; {MAX_JSON_DEPTH} levels are allowed") from None
    depth = json_depth(value)
    if depth > MAX_JSON_DEPTH:
        raise InputError(f"{where}: JSON nested {depth} deep, more than the {MAX_JSON_DEPTH} levels allowed")
    return value


# ---- pack.json ------------------------------------------------------------------------------------------

def read_header(root: str, roots: confine.Roots | None) -> dict:
    """pack.json, checked against the schema this version writes: InputError naming the file and the first
    value that is not."""
    path = os.path.join(root, PACK_FILE)
    head = read_json(path, roots, "pack header")
    where = confine.shown(path)
    if not isinstance(head, dict) or head.get("format") != PACK_FORMAT:
        raise InputError(f"{where}: not a {PACK_FORMAT} header")
    if head.get("version") != PACK_VERSION:
        raise InputError(f"{where}: pack version {clipped(head.get('version'))}; this version reads {PACK_VERSION} "
                         "(pack the data set again with facenet-cli pack)")
    wrong = _header_fault(head)
    if wrong:
        raise InputError(f"{where}: {wrong}")
    return head


def _header_fault(head: dict) -> str | None:
    """What in a pack.json of this version is not as `pack` writes it (None: nothing)."""
    classes, shards, counts, lists = head.get("classes"), head.get("shards"), head.get("counts"), head.get("lists")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "'classes' must be a list of names"
    if len(classes) > MAX_CLASSES:
        return f"{len(classes)} classes, more than the {MAX_CLASSES} a classifier head here can hold"
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and _plain(s["name"])
            and _count(s.get("bytes")) and isinstance(s.get("sha256"), str) and _SHA256.fullmatch(s["sha256"])
            for s in shards):
        return "'shards' must list {name, bytes, sha256} of files in the pack's folder"
    if not isinstance(counts, dict) or set(counts) != set(LISTS) or not all(_count(n) for n in counts.values()):
        return f"'counts' must give a count for each of {', '.join(LISTS)}"
    if sum(counts.values()) > MAX_INDEX_ENTRIES:
        return f"{sum(counts.values())} images, more than the {MAX_INDEX_ENTRIES} a pack may index"
    if not isinstance(head.get("index_sha256"), str) or not _SHA256.fullmatch(head["index_sha256"]):
        return "'index_sha256' must be the sha256 of index.npz"
    if not isinstance(lists, dict) or not all(isinstance(v, str) and _SHA256.fullmatch(v) for v in lists.values()) \
            or not set(lists) <= set(LISTS.values()) | {PAIRS_FILE}:
        return "'lists' must give the sha256 of each list file"
    if not (head.get("manifest_hash") is None or isinstance(head["manifest_hash"], str)) \
            or not isinstance(head.get("source"), str) or not _count(head.get("unreadable")) \
            or not _count(head.get("bytes")):
        return "'source', 'manifest_hash', 'unreadable' and 'bytes' must be text, text, a count and a count"
    return None


def _count(value) -> bool:
    return type(value) is int and 0 <= value < 1 << 62


def _plain(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


# ---- index.npz -----------------------------------------------------------------------------------------

def read_index(root: str, roots: confine.Roots | None, head: dict,
               counts: dict[str, int]) -> dict[str, dict[str, np.ndarray]]:
    """The index arrays of the lists in `counts` ({"train": lines, ...}), each checked before it is read:
    the file's size against what that many entries take, pack.json's sha256, the zip's directory, and each
    member's npy header (stored, the dtype and shape ENTRY and the list's length call for); then every entry
    against the shard it names, as the shard is now. InputError naming the file and the first fault."""
    path = os.path.join(root, INDEX_FILE)
    where = confine.shown(path)
    if sum(counts.values()) > MAX_INDEX_ENTRIES:
        raise InputError(f"{where}: the lists hold {sum(counts.values())} images, more than the "
                         f"{MAX_INDEX_ENTRIES} a pack may index")
    members = {f"{part}_{name}": (part, (count, *ENTRY[name].shape), ENTRY[name].base)
               for part, count in counts.items() for name in INDEX_FIELDS}
    largest = sum(ENTRY.itemsize * n for n in counts.values()) + MEMBER_OVERHEAD * len(members) + MAX_DIRECTORY_BYTES
    fd = confine.open_regular(path, roots, "pack index", single_link=roots is not None)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > largest:
            raise InputError(f"{where}: {size} bytes; the index of the lists' {sum(counts.values())} images "
                             f"takes at most {largest}")
        before = os.fstat(fh.fileno())
        sha, left = hashlib.sha256(), size
        while left > 0:  # exactly the bytes fstat counted: what is appended meanwhile is neither hashed nor read
            chunk = fh.read(min(left, 1 << 20))
            if not chunk:
                break
            sha.update(chunk)
            left -= len(chunk)
        after = os.fstat(fh.fileno())
        if left or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise InputError(f"{where}: changed while it was read; if a pack is being written there, wait for it")
        if sha.hexdigest() != head["index_sha256"]:
            raise InputError(f"{where}: the pack is corrupt: its sha256 is not the one {PACK_FILE} records "
                             "(changed or replaced since it was packed; pack the data set again)")
        try:
            _check_directory(fh, size)
            with zipfile.ZipFile(_Upto(fh, size)) as zf:
                arrays = {name: _read_member(zf, name, *how) for name, how in members.items()}
        except _Fault as exc:
            raise InputError(f"{where}: {exc}") from None
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError) as exc:
            raise InputError(f"{where}: not a readable index ({type(exc).__name__}: {first_line(exc)})") from None
    shards = [s["name"] for s in head["shards"]]
    ends = _shard_sizes(root, roots, shards)
    index = {part: {name: arrays[f"{part}_{name}"] for name in INDEX_FIELDS} for part in counts}
    for part, entries in index.items():
        _check_entries(where, part, entries, shards, ends)
    return index


class _Upto:
    """The first `size` bytes of an open file, as zipfile reads a file (seek, tell, read): its end is where
    the checks found it, whatever is appended to the file later."""

    def __init__(self, fh, size: int):
        self.fh, self.size, self.pos = fh, size, 0

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = min(max(base + offset, 0), self.size)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        self.fh.seek(self.pos)
        data = self.fh.read(n)
        self.pos += len(data)
        return data


class _Fault(Exception):
    """What is wrong with the index, in words (made a one-line InputError naming the file)."""


def _check_directory(fh, size: int) -> None:
    """The zip's central directory is small: zipfile makes an object of every entry it lists before it is
    asked for one, so a 100 MB index of empty members would be a million objects. Read from the end record
    that np.savez writes (no archive comment), and its zip64 record when it has one, as zipfile reads them."""
    if size < 22:
        raise _Fault(f"{size} bytes: not a zip archive")
    fh.seek(size - 22)
    end = fh.read(22)
    if end[:4] != b"PK\x05\x06" or end[20:22] != b"\0\0":
        raise _Fault("not a zip archive as np.savez writes one (its end record is not its last 22 bytes)")
    directory = struct.unpack("<I", end[12:16])[0]
    if size >= 42:
        fh.seek(size - 42)
        locator = fh.read(20)
        if locator[:4] == b"PK\x06\x07":
            # zipfile reads the zip64 record just before its locator, whatever offset the locator gives: a
            # locator pointing at a small decoy elsewhere would let the real record name a large directory.
            if size < 98 or struct.unpack("<Q", locator[8:16])[0] != size - 98:
                raise _Fault("its zip64 locator does not point at the record before it")
            fh.seek(size - 98)
            record = fh.read(56)
            if len(record) < 56 or record[:4] != b"PK\x06\x06":
                raise _Fault("its zip64 end record is missing")
            directory = max(directory, struct.unpack("<Q", record[40:48])[0])
    if directory > MAX_DIRECTORY_BYTES:
        raise _Fault(f"a zip directory of {directory} bytes, more than the {MAX_DIRECTORY_BYTES} its "
                     f"{len(LISTS) * len(INDEX_FIELDS)} members need")
    fh.seek(0)


def _read_member(zf: zipfile.ZipFile, name: str, part: str, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """One array of the index, its npy header read and checked before anything is allocated; it is stored
    (np.savez never deflates), so it takes on disk what it takes in memory."""
    try:
        info = zf.getinfo(name + ".npy")
    except KeyError:
        raise _Fault(f"has no {name}") from None
    data_bytes = int(np.prod(shape)) * dtype.itemsize
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
        raise _Fault(f"{name} is compressed or encrypted ({info.compress_size} bytes that would be "
                     f"{info.file_size}); np.savez stores an index as it is")
    with zf.open(info) as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0,
                    (3, 0): np.lib.format.read_array_header_2_0}.get(version)  # 3.0: 2.0 with a UTF-8 header
            if read is None:
                raise ValueError(f"npy format version {version}")
            got_shape, fortran, got_dtype = read(fh)
        except ValueError as exc:  # not npy, an unknown version, a header that is not a dict of a shape and a dtype
            raise _Fault(f"{name} is not an npy array ({first_line(exc)})") from None
        if got_dtype != dtype or got_shape != shape or fortran:
            raise _Fault(f"{name} holds {clipped(got_dtype)} of shape {clipped(got_shape)}"
                         f"{' (Fortran order)' if fortran else ''}; {LISTS[part]} ({shape[0]} lines) calls for "
                         f"{dtype} of shape {shape}")
        if info.file_size != fh.tell() + data_bytes:
            raise _Fault(f"{name} holds {info.file_size - fh.tell()} bytes of data; shape {shape} is {data_bytes}")
        array = np.empty(shape, dtype=dtype)
        view = memoryview(array.reshape(-1).view(np.uint8))
        done = 0
        while done < data_bytes:
            chunk = fh.read(min(1 << 20, data_bytes - done))
            if not chunk:
                raise _Fault(f"{name} ends after {done} of its {data_bytes} bytes")
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
    return array


def _check_entries(where: str, part: str, index: dict[str, np.ndarray], shards: list[str], ends: list[int]) -> None:
    """Every entry of one list's index points inside a shard the pack has, as the shard is now: InputError
    naming the shard and the offset of the first that does not (a shard cut short, an index rewritten)."""
    shard, offset, size = index["shard"], index["offset"], index["size"]
    known = (shard >= 0) & (shard < len(shards))
    end = np.asarray(ends + [0], dtype=np.int64)[np.where(known, shard, len(shards))]  # [-1]: naming no shard
    bad = (size < -1) | (size >= 0) & (~known | (offset < 0) | (offset > end) | (size > end - offset))
    if not bad.any():
        return
    k = int(np.argmax(bad))
    said = f"{where}: the pack is corrupt: entry {k} of {LISTS[part]}"
    if size[k] < -1:
        raise InputError(f"{said} has size {int(size[k])}")
    if not known[k]:
        raise InputError(f"{said} names shard {int(shard[k])}; {PACK_FILE} lists {len(shards)}")
    raise InputError(f"{said} lies at {shards[shard[k]]} offset {int(offset[k])} (+{int(size[k])} bytes), past "
                     f"the shard's end ({ends[shard[k]]} bytes)")


def _shard_sizes(root: str, roots: confine.Roots | None, names: list[str]) -> list[int]:
    sizes = []
    for name in names:
        path = os.path.join(root, name)
        try:
            fd = confine.open_regular(path, roots, "pack shard")
        except FileNotFoundError:
            raise InputError(f"{confine.shown(path)}: missing; {PACK_FILE} lists it (the pack is not whole)") from None
        try:
            sizes.append(os.fstat(fd).st_size)
        finally:
            os.close(fd)
    return sizes


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
