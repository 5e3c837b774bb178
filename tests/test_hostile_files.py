"""Hostile files where the trainer, preprocessing and evaluation read them (security issue 22): animated
images among training crops and raw photos, spec files that are not specs, and a FIFO given as a model.
Real files, real FIFOs and real processes; the numbers that matter (peak memory, seconds) are measured."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, read_events, read_json, train_cmd

pytestmark = pytest.mark.timeout(600)


# ---- hostile images --------------------------------------------------------------------------------------
def gif_bomb(path, frames: int = 200, side: int = 2048) -> int:
    """A GIF of `frames` frames on a side x side canvas, each frame a 1 x 1 patch: 3 KB on disk, and
    frames x side x side x 3 bytes (2.5 GB) to a decoder that returns every frame as a full canvas."""
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", side, side, 0xF0, 0, 0) + b"\x00\x00\x00\xff\xff\xff")
    for i in range(frames):
        # image descriptor (1 x 1 at x = i), LZW minimum code size 2, one sub-block: clear, index 0, end
        out += b"\x2c" + struct.pack("<HHHHB", i % side, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    out += b"\x3b"
    with open(path, "wb") as fh:
        fh.write(out)
    return len(out)


def two_frames(face: Image.Image) -> list[Image.Image]:
    return [face, face.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]


def save_animated(face: Image.Image, path, fmt: str) -> None:
    first, second = two_frames(face)
    first.save(path, fmt, save_all=True, append_images=[second])


def _run_measured(cmd: list[str], timeout: float) -> tuple[int, str, str, float]:
    """(exit status, stdout, stderr, peak RSS in MiB) of one process and the children it waited for, from
    its own wait4 rusage (RUSAGE_CHILDREN would hold the largest child this test process ever had)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=REPO,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read().decode(), err.read().decode(), usage.ru_maxrss / 1024


def test_an_animated_gif_bomb_and_a_two_frame_gif_among_the_crops_are_skipped(small_faces, tmp_path):
    """Was: decode_image returned all 200 frames ([200, 3, 2048, 2048], ~4 GB peak) and an ordinary two-frame
    GIF crashed collate; the job failed. Now both are bad images: replaced, counted and named."""
    ident = sorted(os.listdir(small_faces))[0]
    folder = os.path.join(small_faces, ident)
    assert gif_bomb(os.path.join(folder, "bomb.gif")) <= 3072
    with Image.open(os.path.join(folder, sorted(os.listdir(folder))[0])) as face:
        save_animated(face.convert("RGB"), os.path.join(folder, "wink.gif"), "GIF")
    out = tmp_path / "run"
    # holdout 0: both GIFs are training images, met in epoch 1; one loader worker, as on a bigger host
    cmd = train_cmd("--data", small_faces, "--epochs", "1", "--batch-size", "8", "--holdout", "0", "--workers", "1",
                    "--pretrained", "none", "--no-log-model", "--output", str(out), "--json-out",
                    str(out / "summary.json"))
    t0 = time.time()
    rc, stdout, stderr, peak_mib = _run_measured(cmd, timeout=540)
    seconds = time.time() - t0
    print(f"trainer with a GIF bomb among its crops: exit {rc}, peak RSS {peak_mib:.0f} MiB, {seconds:.1f} s")
    assert rc == 0, stderr[-3000:]
    summary = read_json(out / "summary.json")
    assert summary["bad_images"] == 2 and summary["epochs"] == 1
    assert "skipped 2 unreadable image(s)" in stdout and "bomb.gif" in stdout and "wink.gif" in stdout
    epochs = [e for e in read_events(out / "events.jsonl") if e["event"] == "epoch"]
    assert epochs and epochs[-1]["bad_images"] == 2
    assert peak_mib < 2500, f"peak RSS {peak_mib:.0f} MiB"  # was ~4000 (and exit 1)


def test_the_loader_decodes_still_images_only_and_always_to_one_rgb_image(tmp_path, sample_faces):
    from facenet.data.loader import decode

    ident = sorted(os.listdir(sample_faces))[0]
    src = os.path.join(sample_faces, ident, sorted(os.listdir(os.path.join(sample_faces, ident)))[0])
    face = Image.open(src).convert("RGB")
    gif_bomb(tmp_path / "bomb.gif")
    for name, fmt in (("wink.gif", "GIF"), ("wink.png", "PNG"), ("wink.webp", "WEBP"), ("pages.tiff", "TIFF")):
        save_animated(face, tmp_path / name, fmt)
    t0 = time.time()
    for name in ("bomb.gif", "wink.gif", "wink.png", "wink.webp", "pages.tiff"):
        with pytest.raises(ValueError, match=r"animated .*only still images are read"):
            decode(str(tmp_path / name), 96)
    assert time.time() - t0 < 2  # refused from headers: nothing decoded
    first, second = two_frames(face)
    first.save(tmp_path / "phone.jpg", "MPO", save_all=True, append_images=[second])  # a phone's JPEG
    for name, fmt in (("still.gif", "GIF"), ("still.webp", "WEBP"), ("still.tiff", "TIFF"), ("still.bmp", "BMP")):
        face.save(tmp_path / name, fmt)
    arr16 = np.asarray(face.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(arr16).save(tmp_path / "deep16.png")
    with Image.open(tmp_path / "phone.jpg") as mpo:
        assert mpo.format == "MPO" and mpo.n_frames == 2
    for name in ("phone.jpg", "still.gif", "still.webp", "still.tiff", "still.bmp", "deep16.png"):
        img = decode(str(tmp_path / name), 96)
        assert img.shape == (3, 96, 96) and img.dtype == torch.uint8, (name, img.shape, img.dtype)
    # the first frame, unflipped: a still GIF reads as the same picture through PIL as the JPEG crop does
    mean_gif = decode(str(tmp_path / "still.gif"), 96).float().mean()
    mean_jpg = decode(src, 96).float().mean()
    assert abs(float(mean_gif - mean_jpg)) < 8


# ---- preprocessing --------------------------------------------------------------------------------------
def _photos_with_faces(sample_root, identity, n):
    faces = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(sample_root, "prep", "train", identity))}
    raw = sorted(f for f in os.listdir(os.path.join(sample_root, "raw", identity)) if os.path.splitext(f)[0] in faces)
    return [os.path.join(sample_root, "raw", identity, f) for f in raw[:n]]


def test_preprocessing_rejects_animated_images_with_the_reason_and_keeps_going(sample_root, tmp_path):
    idents = sorted(os.listdir(os.path.join(sample_root, "raw")))[:2]
    raw = tmp_path / "raw"
    for ident in idents:
        os.makedirs(raw / "train" / ident)
        for src in _photos_with_faces(sample_root, ident, 3):
            shutil.copy(src, raw / "train" / ident / os.path.basename(src))
    folder = raw / "train" / idents[0]
    face = Image.open(_photos_with_faces(sample_root, idents[0], 4)[3]).convert("RGB")
    gif_bomb(folder / "bomb.gif")
    save_animated(face, folder / "apng.png", "PNG")
    save_animated(face, folder / "anim.webp", "WEBP")
    save_animated(face, folder / "pages.tiff", "TIFF")
    face.save(folder / "still_gif.gif", "GIF")
    face.save(folder / "still_webp.webp", "WEBP")
    face.save(folder / "still_tiff.tiff", "TIFF")
    first, second = two_frames(face)
    first.save(folder / "phone.jpg", "MPO", save_all=True, append_images=[second])
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "services.cli", "preprocess", str(raw), str(tmp_path / "out"),
                          "--json", "--workers", "1"], capture_output=True, text=True, cwd=REPO, timeout=540)
    print(f"preprocessing 6 photos + 8 odd files: {time.time() - t0:.1f} s")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    got = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in manifest["rejects"]}
    assert got == {"bomb.gif": "animated image (2 or more frames); only still images are read",
                   "apng.png": "animated image (2 frames); only still images are read",
                   "anim.webp": "animated image (2 frames); only still images are read",
                   "pages.tiff": "animated image (2 or more frames); only still images are read"}, got
    assert manifest["reject_reasons"] == {"animated image": 4}
    crops = set(os.listdir(tmp_path / "out" / "train" / idents[0]))
    for stem in ("still_gif", "still_webp", "still_tiff", "phone"):  # still images, an MPO among them, still work
        assert any(c.startswith(stem + ".") for c in crops), (stem, crops)
    assert manifest["splits"]["train"] == {"identities": 2, "images": 14, "faces": 10, "rejects": 4}


def test_load_rgb_refuses_an_animated_file_from_its_header(tmp_path):
    from facenet.images import load_rgb

    assert gif_bomb(tmp_path / "bomb.gif", frames=20_000, side=4096) < 310_000  # 300 KB: 1 TB of frames
    t0 = time.time()
    loaded = load_rgb(str(tmp_path / "bomb.gif"))
    assert loaded.reject == "animated image (2 or more frames); only still images are read"
    assert time.time() - t0 < 1  # no walk over its 20 000 frames, no pixel decoded


# ---- spec files -----------------------------------------------------------------------------------------
X = '"data": "/nonexistent"'
SPEC_CASES = {  # file content -> what the one error line says
    "[1, 2]": "must be a JSON object, not a list",
    '"data"': "must be a JSON object, not a string",
    "": "not valid JSON",
    '{"data": {"a": 1}}': "'data': {'a': 1} is not a string",
    "{" + X + ', "optimizer": {"x": [1]}}': "'optimizer': {'x': [1]} is not a string",
    "{" + X + ', "epochs": 1' + "0" * 4000 + "}": "--epochs (an integer of about 4001 digits): must be in",
    "{" + X + ', "epochs": 1' + "0" * 5000 + "}": "Exceeds the limit (4300 digits)",
    "{" + X + ', "lr": 1' + "0" * 400 + "}": "'lr': (an integer of about 401 digits) is too large for a number",
    "{" + X + ', "arcface_margin": 1' + "0" * 400 + "}": "'arcface_margin': (an integer of about 401 digits)",
    "{" + X + ', "lr": NaN}': "--lr nan: must be a positive number",
    "{" + X + ', "holdout": Infinity}': "--holdout inf: must be in [0, 1)",
    "{" + X + ', "dropout": -Infinity}': "--dropout -inf: must be in [0, 1)",
    "{" + X + ', "epochs": NaN}': "'epochs': nan is not an integer",
    "{" + X + ', "seed": 1e400}': "'seed': inf is not an integer",
    "{" + X + ', "device_list": [0.5]}': "'device_list': 0.5 in [0.5] is not an integer",
    "{" + X + ', "device_list": [true]}': "'device_list': True in [True] is not an integer",
    "{" + X + ', "device_list": [[1]]}': "'device_list': [1] in [[1]] is not an integer",
    "{" + X + ', "device_list": [1' + "0" * 30 + "]}": "device ids are integers in [0, 4095]",
    "{" + X + ', "lr_steps": [1.5]}': "'lr_steps': 1.5 in [1.5] is not an integer",
    "{" + X + ', "image_size": 32}': "--image-size 32: must be at least 75",
    "[" * 100_000 + "]" * 100_000: "nested too deeply",
    '{"data": "/x\\u0000y"}': "holds a NUL",
    '{"data": "/x\\ud800"}': "holds a NUL or an unpaired surrogate",
    '{"data": "' + "a" * 100_000 + '"}': "is longer than 4096 characters",
    "{" + X + ', "optimizer": "a\\nb"}': "--optimizer a\\nb: choose one of adam, sgd",
    "{" + X + ', "a\\nb": 1}': "unknown training option(s): a\\nb",
    json.dumps({"data": "/x", **{f"k{i:05}": i for i in range(10_000)}}): "k00009 and 9990 more",
    "{" + X + ', "tags": {"k": {"a": [1, 2]}}}': "tags are KEY=VALUE strings",
    "{}": "training spec has no 'data'",
}
WRONG = {str: 1, int: "1", float: "x", bool: 1, list: {"a": 1}, dict: [1]}


def _one_error_line(rc: int, stderr: str, needle: str, what) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in stderr, (what, rc, stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (what, needle, lines[:3])
    assert len(lines[0]) < 400, (what, lines[0][:500])  # never a megabyte value echoed back
    return lines[0]


def _spec_in_process(path, capsys) -> tuple[int, str]:
    from facenet.train.launch import main

    rc = main(["--spec", str(path)])
    return rc, capsys.readouterr().err


def _wrong_types() -> dict[str, str]:
    from facenet.spec import FIELD_TYPES

    cases = {}
    for field, kind in FIELD_TYPES.items():
        wrong = {"data": 1} if field == "data" else {"data": "/nonexistent", field: WRONG[kind]}
        cases[json.dumps(wrong)] = f"training spec field {field!r}: {WRONG[kind]!r} is not"
    return cases


ALL_SPEC_CASES = list({**SPEC_CASES, **_wrong_types()}.items())


@pytest.mark.parametrize("text,needle", ALL_SPEC_CASES, ids=[t[:40] for t, _ in ALL_SPEC_CASES])
def test_every_hostile_spec_file_is_one_error_line_and_exit_2(tmp_path, capsys, text, needle):
    """The trainer's own entry (`python -m facenet.train --spec FILE` is this `main`), in this process: a
    hundred interpreter starts would take ten minutes on 2 cores. The test below runs real processes."""
    path = tmp_path / "spec.json"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    rc, err = _spec_in_process(path, capsys)
    _one_error_line(rc, err, needle, text[:80])


def test_hostile_spec_files_in_real_processes(tmp_path):
    cases = {"list.json": ("[1, 2]", "must be a JSON object"),
             "half.json": ("{" + X + ', "device_list": [0.5]}', "'device_list': 0.5 in [0.5] is not an integer"),
             "huge.json": ("{" + X + ', "lr": 1' + "0" * 400 + "}", "is too large for a number"),
             "deep.json": ("[" * 100_000 + "]" * 100_000, "nested too deeply")}
    for name, (text, needle) in cases.items():
        (tmp_path / name).write_text(text)
        res = subprocess.run(train_cmd("--spec", str(tmp_path / name)), capture_output=True, text=True,
                             cwd=REPO, timeout=120)
        _one_error_line(res.returncode, res.stderr, needle, name)


def _fifo_dir_binary_big(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "latin1.json").write_bytes(b'{"data": "/caf\xe9"}')
    with open(tmp_path / "big.json", "wb") as fh:
        fh.truncate(2 << 30)  # 2 GB, sparse: refused by its size, never read
    return {fifo: "not a regular file", tmp_path / "folder.json": "not a regular file",
            tmp_path / "latin1.json": "not UTF-8 text (byte 14 is 0xe9)",
            tmp_path / "big.json": "2147483648 bytes, more than the 1048576 allowed"}


def test_a_spec_file_that_is_a_fifo_a_folder_binary_or_2_gb_is_refused_unread(tmp_path):
    from facenet.errors import InputError
    from facenet.spec import TrainSpec

    for path, says in _fifo_dir_binary_big(tmp_path).items():
        t0 = time.time()
        with pytest.raises(InputError) as err:
            TrainSpec.from_file(str(path))
        assert str(err.value).startswith(f"--spec {path}: ") and says in str(err.value), str(err.value)
        assert time.time() - t0 < 2


def test_the_trainer_refuses_a_fifo_binary_or_2_gb_spec_in_one_line(tmp_path):
    for path, says in _fifo_dir_binary_big(tmp_path).items():
        try:
            res = subprocess.run(train_cmd("--spec", str(path)), capture_output=True, text=True, cwd=REPO,
                                 timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"--spec {path}: still waiting after 30 s")
        _one_error_line(res.returncode, res.stderr, says, path.name)


# ---- a FIFO as the model --------------------------------------------------------------------------------
def test_evaluate_and_embed_refuse_a_fifo_model_at_once(tmp_path, sample_split):
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    for args in (["evaluate", "--model", str(fifo), "--data", sample_split, "--device", "cpu"],
                 ["embed", "--model", str(fifo), os.path.join(sample_split, "test"), str(tmp_path / "e.npz"),
                  "--device", "cpu"]):
        t0 = time.time()
        try:
            res = subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                                 cwd=REPO, timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{args[0]} --model FIFO: still waiting after 90 s (was: forever)")
        lines = res.stderr.strip().splitlines()
        assert res.returncode != 0 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert f"--model {fifo}: not a regular file" in lines[0], lines
        print(f"{args[0]} --model FIFO: refused in {time.time() - t0:.1f} s")
