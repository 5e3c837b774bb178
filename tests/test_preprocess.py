"""MTCNN preprocessing on real face photos, with one bad file of every kind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

EXPECTED_REJECTS = {
    "train/{id0}/bomb.png": "decompression bomb (1600000000 pixels)",
    "train/{id0}/empty.jpg": "not an image",
    "train/{id0}/noface.jpg": "no face found",
    "train/{id0}/notes.jpg": "not an image",
}
CONVERTED = ("cmyk.jpg", "gray.png", "deep16.png", "alpha.png", "palette.gif", "huge.jpg")


def _photos_with_faces(sample_root, identity, n):
    """Raw photos of `identity` whose MTCNN crop exists in the sample set (so a face is findable)."""
    faces = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(sample_root, "prep", "train", identity))}
    raw = sorted(f for f in os.listdir(os.path.join(sample_root, "raw", identity)) if os.path.splitext(f)[0] in faces)
    return [os.path.join(sample_root, "raw", identity, f) for f in raw[:n]]


def _bomb_png(path, side=40000):
    """A PNG whose header claims side x side pixels: refused from the header, never decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
                 + chunk(b"IEND", b""))


@pytest.fixture
def raw_tree(sample_root, tmp_path):
    """RAW/train: 4 identities x 6 photos (+ 11 odd files in the first), RAW/test: 2 identities x 4."""
    idents = sorted(os.listdir(os.path.join(sample_root, "raw")))
    raw = tmp_path / "raw"
    for split, names, n in (("train", idents[:4], 6), ("test", idents[4:6], 4)):
        for ident in names:
            os.makedirs(raw / split / ident)
            for src in _photos_with_faces(sample_root, ident, n):
                shutil.copy(src, raw / split / ident / os.path.basename(src))
    id0 = idents[0]
    folder = raw / "train" / id0
    face_src = _photos_with_faces(sample_root, id0, 7)[6]  # a 7th photo, not among the six above
    face = Image.open(face_src).convert("RGB")
    data = open(face_src, "rb").read()
    (folder / "truncated.jpg").write_bytes(data[: len(data) * 2 // 5])
    (folder / "notes.jpg").write_text("this is a text file with an image's name\n")
    (folder / "empty.jpg").write_bytes(b"")
    face.convert("CMYK").save(folder / "cmyk.jpg", "JPEG", quality=95)
    face.convert("L").save(folder / "gray.png")
    arr16 = (np.asarray(face.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(arr16).save(folder / "deep16.png")
    rgba = face.convert("RGBA")
    rgba.putalpha(255)
    rgba.save(folder / "alpha.png")
    face.convert("P", palette=Image.ADAPTIVE).save(folder / "palette.gif")
    face.resize((4000, 4000), Image.BICUBIC).save(folder / "huge.jpg", "JPEG", quality=90)
    _bomb_png(folder / "bomb.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (240, 240, 3), dtype=np.uint8)).filter(
        __import__("PIL.ImageFilter", fromlist=["x"]).GaussianBlur(6)).save(folder / "noface.jpg")
    return raw, id0


def preprocess_cmd(raw, out, *extra):
    return [sys.executable, "-m", "services.cli", "preprocess", str(raw), str(out), *extra]


def run_preprocess(raw, out, *extra):
    res = subprocess.run(preprocess_cmd(raw, out, "--json", *extra), capture_output=True, text=True, cwd=REPO,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def _all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_layout_lists_manifest_and_rejects_are_exact(raw_tree, tmp_path):
    raw, id0 = raw_tree
    out = tmp_path / "out"
    summary = run_preprocess(raw, out, "--workers", "2", "--shard-size", "5")
    manifest = json.loads((out / "manifest.json").read_text())
    truncated = [r for r in manifest["rejects"] if r["path"].endswith("truncated.jpg")]
    expected = {k.format(id0=id0): v for k, v in EXPECTED_REJECTS.items()}
    got = {r["path"]: r["reason"] for r in manifest["rejects"] if not r["path"].endswith("truncated.jpg")}
    assert got == expected
    assert len(truncated) == 1 and truncated[0]["reason"].startswith("corrupt or truncated")

    # train: 4 x 6 photos + 11 odd files, of which 6 convert to faces and 5 are rejects; test: 2 x 4
    assert manifest["splits"] == {"train": {"identities": 4, "images": 35, "faces": 30, "rejects": 5},
                                  "test": {"identities": 2, "images": 8, "faces": 8, "rejects": 0}}
    assert summary["images"] == 43 and summary["faces"] == 38 and summary["rejects"] == 5
    assert manifest["reject_reasons"] == {"corrupt or truncated": 1, "decompression bomb": 1, "no face found": 1,
                                          "not an image": 2}
    assert sum(manifest["converted"].values()) == 5  # cmyk, gray, deep16, alpha, palette (huge is RGB already)

    files = _all_files(out / "train") + _all_files(out / "test")
    crops = [f for f in files if not f.startswith(".")]
    assert len(crops) == 38
    for split in ("train", "test"):
        for rel in _all_files(out / split):
            with Image.open(out / split / rel) as im:
                assert im.size == (160, 160) and im.mode == "RGB"
    assert (out / "train" / id0 / "palette.png").exists()  # non-JPEG/PNG formats become PNG crops
    assert (out / "train" / id0 / "huge.jpg").exists()

    train = (out / "train_list.txt").read_text().splitlines()
    test = (out / "test_list.txt").read_text().splitlines()
    # 30 train faces; held out: round(0.2 x 12) = 2 of the first identity, round(0.2 x 6) = 1 of each other
    assert len(test) == 5 and len(train) == 25
    assert manifest["lists"] == {"classes": 4, "train_list": 25, "test_list": 5, "test_pairs": 0}
    assert not (out / "test_pairs.txt").exists()  # 2 test people: too few for two folds of pairs
    paths = [line.rsplit(" ", 1)[0] for line in train + test]
    assert len(set(paths)) == 30 and all(p.startswith("train/") for p in paths)
    assert all((out / p).is_file() for p in paths)

    # the trainer reads this layout as it is
    from facenet.data.dataset import load_dataset

    split = load_dataset(str(out))
    assert split.layout == "lists" and split.num_classes == 4 and len(split.test) == 5
    assert split.manifest_hash == manifest["content_hash"]

    # a rerun repeats no work and writes the same bytes
    again = run_preprocess(raw, out, "--workers", "2", "--shard-size", "5")
    assert again["processed"] == 0 and again["skipped"] == 43
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # crops made with other settings, or of another RAW, are never mixed into this output: each crop setting
    # and the RAW are refused in one line, before anything is written
    other_raw = tmp_path / "other-raw"
    shutil.copytree(raw, other_raw)
    refusals = [(["--image-size", "112"], f"--image-size 112: {out} was preprocessed with 160"),
                (["--margin", "8"], f"--margin 8: {out} was preprocessed with 0"),
                (["--detect-size", "320"], f"--detect-size 320: {out} was preprocessed with 640"),
                (["--min-face-frac", "0.2"], f"--min-face-frac 0.2: {out} was preprocessed with 0.1"),
                (["--align"], f"--align: {out} was preprocessed with box crops (no --align)"),
                ([], f"{out} holds crops of {raw}, not {other_raw}; use another output folder")]
    before = {rel: (out / rel).read_bytes() for rel in _all_files(out)}
    for extra, message in refusals:
        source = other_raw if not extra else raw
        res = subprocess.run(preprocess_cmd(source, out, *extra), capture_output=True, text=True, cwd=REPO, timeout=120)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert {rel: (out / rel).read_bytes() for rel in _all_files(out)} == before


def test_sigkill_midway_then_rerun_equals_an_uninterrupted_run(raw_tree, tmp_path):
    raw, _ = raw_tree
    ref = tmp_path / "ref"
    run_preprocess(raw, ref, "--workers", "1", "--shard-size", "2")

    out = tmp_path / "out"
    proc = subprocess.Popen(preprocess_cmd(raw, out, "--workers", "1", "--shard-size", "2", "--json"), cwd=REPO,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len([f for f in _all_files(out / "train") if not os.path.basename(f).startswith(".")]
              if (out / "train").exists() else []) < 8:
        assert proc.poll() is None, "finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    for rel in _all_files(out / "train"):
        if ".tmp-" in rel:
            continue  # a killed writer's hidden temp file: never a crop, removed by the rerun
        with Image.open(out / "train" / rel) as im:
            im.load()  # every crop that exists is complete
            assert im.size == (160, 160)

    summary = run_preprocess(raw, out, "--workers", "1", "--shard-size", "2")
    assert summary["skipped"] > 0 and summary["processed"] < 43
    assert not [f for f in _all_files(out) if ".tmp-" in f]
    assert (out / "train_list.txt").read_bytes() == (ref / "train_list.txt").read_bytes()
    assert (out / "test_list.txt").read_bytes() == (ref / "test_list.txt").read_bytes()
    assert json.loads((out / "manifest.json").read_text()) == json.loads((ref / "manifest.json").read_text())
    crops = [f for f in _all_files(ref) if not f.startswith(".") and "/" in f]
    assert crops == [f for f in _all_files(out) if not f.startswith(".") and "/" in f]
    for rel in crops:
        assert (out / rel).read_bytes() == (ref / rel).read_bytes(), rel


def test_two_runs_at_once_corrupt_nothing(raw_tree, tmp_path):
    raw, _ = raw_tree
    ref = tmp_path / "ref"
    run_preprocess(raw, ref, "--workers", "1", "--shard-size", "3")
    out = tmp_path / "out"
    procs = [subprocess.Popen(preprocess_cmd(raw, out, "--workers", "1", "--shard-size", "3", "--json"), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    summaries = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        summaries.append(json.loads(stdout))
    # They really ran at once: each processed shards itself (the same shard order, started together), and
    # between them every image was processed or found done.
    assert all(s["processed"] > 0 for s in summaries), summaries
    assert all(s["processed"] + s["skipped"] == s["images"] for s in summaries), summaries
    assert json.loads((out / "manifest.json").read_text()) == json.loads((ref / "manifest.json").read_text())
    assert not [f for f in _all_files(out) if ".tmp-" in f]
    for rel in (f for f in _all_files(ref) if not f.startswith(".")):
        assert (out / rel).read_bytes() == (ref / rel).read_bytes(), rel


def test_bad_raw_root_is_one_line(tmp_path):
    res = subprocess.run(preprocess_cmd(tmp_path / "missing", tmp_path / "out"), capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip() == f"Error: {tmp_path / 'missing'}: no such directory (the raw data set)"
    (tmp_path / "empty").mkdir()
    res = subprocess.run(preprocess_cmd(tmp_path / "empty", tmp_path / "out"), capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode == 1 and "no images found" in res.stderr


def test_our_detector_finds_facenet_pytorchs_boxes_bit_for_bit(sample_root):
    """detect.py reimplements MTCNN's resampling (one integral image); the boxes must not move."""
    import glob

    import numpy as np
    from PIL import Image

    from facenet.preprocess.faces import DetectorSettings, FaceCropper

    cropper = FaceCropper(DetectorSettings())
    paths = sorted(glob.glob(os.path.join(sample_root, "raw", "*", "*.jpg")))[::16]
    assert len(paths) >= 16
    compared = 0
    for path in paths:
        small, _ = cropper.reduced(Image.open(path).convert("RGB"))
        ours, probs = cropper.detect(small)
        cropper.mtcnn.min_face_size = cropper.min_face(small)
        ref, ref_probs = cropper.mtcnn.detect(small)
        if ref is None:
            assert len(ours) == 0, path
            continue
        assert np.array_equal(ours, ref.astype(np.float32)), path
        assert np.allclose(probs, np.asarray(ref_probs, dtype=np.float32)), path
        compared += 1
    assert compared >= len(paths) - 1
    tiny = Image.new("RGB", (15, 15), (128, 128, 128))  # smaller than the smallest face: no face, no error
    assert len(cropper.detect(tiny)[0]) == 0
