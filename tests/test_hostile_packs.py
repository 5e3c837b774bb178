"""Hostile packs and lists: each test builds the real hostile file (an index.npz that inflates, a 0-d or a
10^12-element member, a 100k-deep pack.json or manifest.json, a 5000-digit label, a pack.json naming 200k
classes, a shard cut short, a replaced index) and reads it the way a trainer, `evaluate` or a `pack` rerun
does. Each must be one line naming the file (or a rebuilt pack), in bounded memory, never a traceback."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

from conftest import REPO, run_train

IDENTITIES, PER_IDENTITY = 4, 3


def _png(seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _lists_data(root) -> str:
    """A preprocessing OUT in small: train/<id>/*.png with train_list.txt and test_list.txt, and test/ with
    four other people paired in test_pairs.txt."""
    from facenet.verification.pairs import format_pairs, generate_pairs, identity_folders

    root = str(root)
    train, test = [], []
    for k in range(IDENTITIES):
        os.makedirs(os.path.join(root, "train", f"id{k}"))
        for j in range(PER_IDENTITY):
            rel = f"train/id{k}/{j}.png"
            with open(os.path.join(root, rel), "wb") as fh:
                fh.write(_png(k * 10 + j))
            (test if j == 0 else train).append(f"{rel} {k}\n")
    for k in range(4):  # two folds of two people: the fewest generate_pairs pairs
        os.makedirs(os.path.join(root, "test", f"other{k}"))
        for j in range(2):
            with open(os.path.join(root, "test", f"other{k}", f"{j}.png"), "wb") as fh:
                fh.write(_png(100 + k * 10 + j))
    with open(os.path.join(root, "train_list.txt"), "w") as fh:
        fh.write("".join(train))
    with open(os.path.join(root, "test_list.txt"), "w") as fh:
        fh.write("".join(test))
    pairs = generate_pairs(identity_folders(os.path.join(root, "test")), seed=0)
    with open(os.path.join(root, "test_pairs.txt"), "w") as fh:
        fh.write(format_pairs(pairs, root))
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    return _lists_data(tmp_path_factory.mktemp("source"))


@pytest.fixture(scope="module")
def good_pack(source, tmp_path_factory) -> str:
    from facenet.pack import pack

    out = str(tmp_path_factory.mktemp("packs") / "good")
    pack(source, out, progress=False)
    return out


@pytest.fixture
def a_pack(good_pack, tmp_path) -> str:
    """A copy of the good pack for one test to spoil."""
    out = str(tmp_path / "pack")
    shutil.copytree(good_pack, out)
    return out


def _header(pack: str) -> dict:
    with open(os.path.join(pack, "pack.json")) as fh:
        return json.load(fh)


def _rewrite_header(pack: str, head: dict) -> None:
    with open(os.path.join(pack, "pack.json"), "w") as fh:
        json.dump(head, fh)


def _replace_index(pack: str, data: bytes) -> None:
    """index.npz replaced by `data`, and pack.json made to agree (as one who can write the one can the other):
    what is refused must be refused for what the index holds, not for a hash."""
    with open(os.path.join(pack, "index.npz"), "wb") as fh:
        fh.write(data)
    head = _header(pack)
    head["index_sha256"] = hashlib.sha256(data).hexdigest()
    _rewrite_header(pack, head)


def _index_arrays(pack: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(pack, "index.npz"), allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy_header(shape: tuple, descr: str = "<i4") -> bytes:
    from numpy.lib import format as npformat

    buf = io.BytesIO()
    npformat.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _index_with(pack: str, member: str, header: bytes, zeros: int = 0, level: int | None = None) -> bytes:
    """The pack's index with `member` replaced by `header` and `zeros` bytes of data, deflated at `level`
    (None: stored, as np.savez writes). Streamed: the test never holds the inflated bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED if level is None else zipfile.ZIP_DEFLATED,
                         compresslevel=level) as out:
        for name, array in _index_arrays(pack).items():
            if name != member:
                npy = io.BytesIO()
                np.lib.format.write_array(npy, array, allow_pickle=False)
                out.writestr(zipfile.ZipInfo(name + ".npy"), npy.getvalue())  # stored, as np.savez writes
        with out.open(member + ".npy", "w", force_zip64=True) as fh:
            fh.write(header)
            chunk = bytes(1 << 20)
            for start in range(0, zeros, len(chunk)):
                fh.write(chunk[:min(len(chunk), zeros - start)])
    return buf.getvalue()


LOAD = """
import json, resource, sys
from facenet.data.dataset import load_dataset
from facenet.errors import UserError
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # an old trainer's 8 TB wish fails, not the host
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    split = load_dataset(sys.argv[1])
    said = {"ok": split.describe()}
except UserError as exc:
    said = {"error": str(exc), "kind": type(exc).__name__}
except BaseException as exc:
    said = {"crash": type(exc).__name__, "error": str(exc)[:300]}
said["grew_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(said))
"""


def _load_elsewhere(pack: str, timeout: float = 120) -> dict:
    """load_dataset(pack) in a process of its own: what it said and how much its peak RSS grew (MiB)."""
    r = subprocess.run([sys.executable, "-c", LOAD, pack], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _refused(pack_or_root: str, *named: str) -> str:
    """load_dataset's UserError (what the trainer and the CLI print as one line): one line naming each of
    `named`."""
    from facenet.data.dataset import load_dataset
    from facenet.errors import UserError

    with pytest.raises(UserError) as caught:
        load_dataset(pack_or_root)
    said = str(caught.value)
    assert "\n" not in said and all(n in said for n in named), said
    return said


# ---- item 3: the index is read from its headers before anything is allocated ----------------------------

def test_an_index_that_inflates_is_refused_before_it_is_inflated(a_pack):
    """200 KB of deflated zeros that np.load inflated to 200 MB (the issue's 2.3 MB to 2.3 GB): small enough
    for the bound on the index's size, refused by the member's header."""
    bomb = _index_with(a_pack, "train_shard", _npy_header((50 << 20,)), zeros=200 << 20, level=9)
    assert len(bomb) < 250 << 10
    _replace_index(a_pack, bomb)
    said = _load_elsewhere(a_pack)
    assert "crash" not in said and "error" in said, said
    assert "index.npz" in said["error"] and "train_shard is compressed" in said["error"], said
    assert f"would be {(200 << 20) + len(_npy_header((50 << 20,)))})" in said["error"], said
    assert said["grew_mib"] < 40, said  # was 200+: numpy inflated every byte before the row check


@pytest.mark.parametrize("shape,data", [
    ((10 ** 12,), 0),  # numpy asked for 3.64 TiB: _ArrayMemoryError, a traceback
    ((), 8),  # a 0-d array of its one int64: `shape[0]`, IndexError, a traceback
], ids=["10^12 elements", "0-d"])
def test_an_index_member_of_the_wrong_shape_is_one_line(a_pack, shape, data):
    count = len(_index_arrays(a_pack)["train_offset"])
    _replace_index(a_pack, _index_with(a_pack, "train_offset", _npy_header(shape, "<i8"), zeros=data))
    _refused(a_pack, "index.npz", "train_offset", f"shape {shape}", f"train_list.txt ({count} lines)")


@pytest.mark.parametrize("how", ["shard cut short", "offsets rewritten"])
def test_offsets_past_a_shards_end_say_the_pack_is_corrupt_naming_shard_and_offset(a_pack, tmp_path, how):
    """Was: read, every such image a bad one; a whole batch of them made the trainer say 'the data set
    vanished during training: ... no longer exists' (a packed path never existed as a file)."""
    arrays = _index_arrays(a_pack)
    shard = _header(a_pack)["shards"][0]["name"]
    if how == "shard cut short":
        with open(os.path.join(a_pack, shard), "r+b") as fh:
            fh.truncate(1024)
        offset = int(arrays["train_offset"][np.argmax(arrays["train_offset"] + arrays["train_size"] > 1024)])
    else:
        offset = 1 << 40
        arrays["train_offset"][:] = offset  # the pairs' images stay readable: training reaches its batches
        _replace_index(a_pack, _npz(arrays))
    _refused(a_pack, "corrupt", shard, f"offset {offset}")
    if how == "shard cut short":
        return  # the trainer once is enough: it loads as load_dataset does
    r = run_train("--data", a_pack, "--output", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4",
                  "--device", "cpu", env={"MLFLOW_TRACKING_URI": ""}, timeout=300)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "corrupt" in errors[0] and shard in errors[0] and f"offset {offset}" in errors[0], errors
    assert "vanished" not in errors[0], errors


def test_an_index_replaced_behind_pack_json_is_refused_by_its_sha256(a_pack):
    """Was: loaded; its entries then pointed at other images, each a 'bad image' read and hashed in vain."""
    arrays = _index_arrays(a_pack)
    arrays["train_offset"] = arrays["train_offset"][::-1].copy()
    with open(os.path.join(a_pack, "index.npz"), "wb") as fh:
        fh.write(_npz(arrays))
    _refused(a_pack, "index.npz", "corrupt", "sha256", "pack.json")


# ---- item 4: the head is sized by the classes the lists use ----------------------------------------------

def test_a_pack_json_naming_more_classes_than_the_lists_use_is_refused(a_pack):
    """200k names in pack.json, 4 used: the trainer built a 200k-way head (3.5 GB peak, a 509 MB model)."""
    head = _header(a_pack)
    head["classes"] = head["classes"] + [f"ghost{k}" for k in range(200_000 - len(head["classes"]))]
    _rewrite_header(a_pack, head)
    _refused(a_pack, "pack.json", "200000", str(IDENTITIES))


# ---- item 13: labels, JSON, text ---------------------------------------------------------------------------

@pytest.mark.parametrize("where,label", [("lists", "9" * 5000), ("lists", "-" + "9" * 5000), ("pack", "9" * 5000),
                                         ("lists", "1" + "0" * 12)])
def test_a_huge_label_is_one_line_naming_file_and_line(source, good_pack, tmp_path, label, where):
    """A 5000-digit label was int()'s ValueError (a traceback; a queued trainer exiting 1 is retried as a
    crash); 10^12 made the check of unused classes walk 10^12 integers (out of memory). Now a label is
    checked as text against MAX_CLASSES (2^21), which the message names."""
    root = str(tmp_path / "data")
    shutil.copytree(source if where == "lists" else good_pack, root)
    with open(os.path.join(root, "train_list.txt"), "a") as fh:
        fh.write(f"train/id0/1.png {label}\n")
    if where == "pack":  # who can write the list can write pack.json: the label itself must be refused
        head = _header(root)
        with open(os.path.join(root, "train_list.txt"), "rb") as fh:
            head["lists"]["train_list.txt"] = hashlib.sha256(fh.read()).hexdigest()
        _rewrite_header(root, head)
    said = _load_elsewhere(root, timeout=60)
    assert "crash" not in said and "train_list.txt:" in said["error"], said
    assert "\n" not in said["error"] and len(said["error"]) < 400, said
    assert "negative" in said["error"] if label.startswith("-") else str(1 << 21) in said["error"], said


def test_a_trainer_given_a_5000_digit_label_fails_once_with_one_line(source, tmp_path):
    """What the queue sees: exit 2 and one `error:` line (a job failure, not a crash to retry)."""
    root = str(tmp_path / "data")
    shutil.copytree(source, root)
    with open(os.path.join(root, "test_list.txt"), "a") as fh:
        fh.write("train/id1/0.png " + "7" * 5000 + "\n")
    r = run_train("--data", root, "--output", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4",
                  "--device", "cpu", env={"MLFLOW_TRACKING_URI": ""}, timeout=300)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "test_list.txt:" in errors[0] and "7" * 5000 not in errors[0]


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_a_deeply_nested_pack_json_is_one_line_and_a_pack_rerun_rebuilds(source, a_pack):
    from facenet.pack import pack

    good = open(os.path.join(a_pack, "index.npz"), "rb").read()
    with open(os.path.join(a_pack, "pack.json"), "wb") as fh:
        fh.write(b'{"format": "facenet-pack", "classes": ' + _deep(100_000) + b"}")
    _refused(a_pack, "pack.json", "deep")
    summary = pack(source, a_pack, progress=False)  # was: RecursionError out of the check for a finished pack
    assert not summary["skipped"] and open(os.path.join(a_pack, "index.npz"), "rb").read() == good


def test_a_deeply_nested_manifest_is_one_line(tmp_path):
    root = _lists_data(tmp_path / "data")
    with open(os.path.join(root, "manifest.json"), "wb") as fh:
        fh.write(b'{"content_hash": ' + _deep(100_000) + b"}")
    _refused(root, "manifest.json", "deep")


@pytest.mark.parametrize("change", [{"classes": [["a list"], "id1", "id2", "id3"]}, {"counts": {"train": True}},
                                    {"shards": [{"name": "shard-000000.tar", "bytes": -1, "sha256": "0" * 64}]}],
                         ids=["a class that is a list", "a count that is true", "a shard of -1 bytes"])
def test_a_pack_json_of_the_wrong_types_is_one_line(a_pack, change):
    """Was: read, the list class named "['a list']", a count of True: checked against the schema `pack` writes."""
    _rewrite_header(a_pack, {**_header(a_pack), **change})
    _refused(a_pack, "pack.json", "'" + next(iter(change)) + "'")


def test_a_pair_images_list_that_is_not_utf8_is_one_line(a_pack):
    with open(os.path.join(a_pack, "pair_images.txt"), "ab") as fh:
        fh.write(b"test/other0/\xff\xfe.png\n")
    _refused(a_pack, "pair_images.txt", "UTF-8")


def test_pack_refuses_a_file_name_that_is_not_utf8_in_one_line(tmp_path):
    """Was: UnicodeEncodeError writing the pack's list (a traceback), the pack left without its header."""
    root = str(tmp_path / "data")
    for k in range(2):
        os.makedirs(os.path.join(root, f"id{k}"))
        for j in range(3):
            with open(os.path.join(root, f"id{k}", f"{j}.png"), "wb") as fh:
                fh.write(_png(k * 10 + j))
    os.rename(os.path.join(root, "id1", "2.png"), os.fsencode(os.path.join(root, "id1")) + b"/\xff.png")
    r = subprocess.run([sys.executable, "-m", "services.cli", "pack", str(tmp_path / "out"), "--data", root],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    assert "\\udcff.png" in lines[0] and "UTF-8" in lines[0], lines


# ---- a pack rerun verifies what it finds ----------------------------------------------------------------------

@pytest.mark.parametrize("spoil", ["index replaced", "list replaced", "shard byte changed"])
def test_a_pack_rerun_verifies_the_pack_it_finds_and_rebuilds_it(source, a_pack, spoil):
    """Was: 'already a whole pack of this data set; nothing to do' over whatever the folder held."""
    from facenet.pack import pack

    before = {name: open(os.path.join(a_pack, name), "rb").read() for name in os.listdir(a_pack)}
    if spoil == "index replaced":
        arrays = _index_arrays(a_pack)
        arrays["train_offset"] = arrays["train_offset"][::-1].copy()
        with open(os.path.join(a_pack, "index.npz"), "wb") as fh:
            fh.write(_npz(arrays))
    elif spoil == "list replaced":
        with open(os.path.join(a_pack, "train_list.txt"), "ab") as fh:
            fh.write(b"# mine\n")
    else:
        shard = os.path.join(a_pack, _header(a_pack)["shards"][0]["name"])
        with open(shard, "r+b") as fh:
            fh.seek(700)
            byte = fh.read(1)
            fh.seek(700)
            fh.write(bytes([byte[0] ^ 1]))
    summary = pack(source, a_pack, progress=False)
    assert not summary["skipped"] and summary["rebuilt"], summary
    assert {name: open(os.path.join(a_pack, name), "rb").read() for name in os.listdir(a_pack)} == before
    assert pack(source, a_pack, progress=False)["skipped"]  # and a whole one is still left alone


def test_a_whole_batch_of_a_pack_unreadable_mid_training_blames_the_shards_not_a_vanished_data_set(a_pack):
    """A pack's images are no files of their own (os.path.exists is False for every one), so a batch of them
    unreadable mid-training (a shard rewritten after the trainer loaded the pack) once said 'the data set
    vanished during training'. It names the pack and its shards now."""
    from facenet.data.dataset import load_dataset
    from facenet.train.engine import _unreadable_batch

    split = load_dataset(a_pack, 0.2, 0)
    assert split.layout == "packed"
    example = split.train[0][0]
    message = str(_unreadable_batch([example], split))
    assert "vanished" not in message and a_pack in message and "shards" in message, message


# ---- the review's finds: an index that grows while hashed, a decoy zip64 locator, a relabelled list ------------

_JUNK_ENTRY = struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0) + b"j"


def _members(pack: str) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(os.path.join(pack, "index.npz")) as z:
        return [(info.filename, z.read(info)) for info in z.infolist()]


def test_an_index_appended_to_while_it_is_hashed_is_refused(a_pack, monkeypatch):
    """Whoever owns a pack appends a zip directory of a million entries to index.npz once the size check has
    passed (here: at the first hashed chunk, where an inotify read event would put it), pack.json holding the
    hash of the grown file. The old reader hashed and parsed to the file's new end: +319 MiB for 4 people."""
    from facenet.data import packfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in _members(a_pack):
            z.writestr(zipfile.ZipInfo(name), data)
        z.writestr(zipfile.ZipInfo("pad"), b"\0" * 64 + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, 100, 0, 0))
    data = buf.getvalue()
    cd_size, cd_off = struct.unpack("<II", data[-22:][12:20])
    directory = data[cd_off:cd_off + cd_size] + _JUNK_ENTRY * 200_000
    final = data[:cd_off] + directory + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, len(directory),
                                                    cd_off, 0)
    _replace_index(a_pack, final)
    with open(os.path.join(a_pack, "index.npz"), "r+b") as fh:
        fh.truncate(cd_off)  # what the size check sees
    real = hashlib.sha256

    class Racing:  # the append lands while the index is hashed
        def __init__(self):
            self.h, self.done = real(), False

        def update(self, chunk):
            if not self.done:
                self.done = True
                with open(os.path.join(a_pack, "index.npz"), "ab") as fh:
                    fh.write(final[cd_off:])
            self.h.update(chunk)

        def hexdigest(self):
            return self.h.hexdigest()

    monkeypatch.setattr(packfile, "hashlib", types.SimpleNamespace(sha256=Racing))
    _refused(a_pack, "index.npz")


def test_a_zip64_locator_pointing_at_a_decoy_is_refused(a_pack):
    """A small decoy zip64 record where the locator points, and the record zipfile really reads (just before
    the locator) naming a directory of 200 KB, past the 64 KiB bound: the old check read the decoy."""
    fake = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, 1, 1, 100, 0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(zipfile.ZipInfo("pad"), fake)
        for name, data in _members(a_pack):
            z.writestr(zipfile.ZipInfo(name), data)
    data = buf.getvalue()
    cd_size, cd_off = struct.unpack("<II", data[-22:][12:20])
    directory = data[cd_off:cd_off + cd_size] + _JUNK_ENTRY * ((200 << 10) // len(_JUNK_ENTRY))
    count = len(_members(a_pack)) + 1 + (200 << 10) // len(_JUNK_ENTRY)
    z64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(directory), cd_off)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, data.index(b"PK\x06\x06"), 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 100, 0xFFFFFFFF, 0)
    _replace_index(a_pack, data[:cd_off] + directory + z64 + locator + end)
    _refused(a_pack, "index.npz", "zip64")


def test_a_list_relabelled_behind_pack_json_is_refused_by_its_sha256(a_pack):
    """train_list.txt with two lines' labels swapped: the same length and classes, other labels on the images
    (pack.json records each list's sha256; the old loader never checked it)."""
    path = os.path.join(a_pack, "train_list.txt")
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    first = next(i for i, line in enumerate(lines) if line.rsplit(None, 1)[-1] != lines[0].rsplit(None, 1)[-1])
    a, b = lines[0].rsplit(None, 1), lines[first].rsplit(None, 1)
    lines[0], lines[first] = f"{a[0]} {b[1]}", f"{b[0]} {a[1]}"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    _refused(a_pack, "train_list.txt", "sha256")


def test_pack_refuses_to_write_a_header_its_reader_would_refuse(source, tmp_path, monkeypatch):
    """A pack.json past MAX_HEADER_BYTES (WebFace42M's class names with small shards) is said at pack time,
    naming --shard-bytes, not left for every later load to refuse."""
    from facenet.data import packfile
    from facenet.errors import InputError
    from facenet.pack import pack

    monkeypatch.setattr(packfile, "MAX_HEADER_BYTES", 200)
    with pytest.raises(InputError, match="--shard-bytes"):
        pack(source, str(tmp_path / "out"), progress=False)
