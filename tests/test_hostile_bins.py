"""Hostile insightface .bin verification sets (the security issue's items 1, 2 and 13's .bin and NaN parts), and NaN
in verification. Each attack is a real file built the way insightface's tools write one (build_eval_pack.py:
pickle.dump((bins, issame_list), f, protocol=pickle.HIGHEST_PROTOCOL); tests/test_insightface.py cites it), read by
a real process whose peak memory and seconds are measured; a process that passes a memory line is killed there,
as the queue's worker would be (but long before the host's OOM killer takes anyone else's work).

Were: one image named 20,000 times was 20,000 decodes of 1 MiB (20 GB); a 16 MiB image was read; 9 bytes of pickle
(a memo index of 2**28) made 2 GB, and a pickle of empty sets 235x its size; 10**6 pairs of one 8 x 8 JPEG (5 MB)
were ~18 h of embedding and 10**7 passed 3 GB before the first image was decoded; a 1-pair set was read, then the
verification before training raised ValueError (a traceback, exit 1: for a queued job a crash, retried 3 times);
NaN embeddings scored as a plausible accuracy or raised IndexError."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, train_cmd
from facenet.errors import UserError
from facenet.verification import binset
from facenet.verification import metrics as vm
from facenet.verification.binset import (MAX_BIN_IMAGE_BYTES, MAX_BIN_PAIRS, MAX_BIN_REFERENCED_BYTES,
                                         MAX_HELD_BIN_PAIRS, MIN_BIN_PAIRS, load_set, read_bin)

pytestmark = pytest.mark.timeout(900)

# A process reading a .bin is killed when its resident memory passes this (MiB): a reader that stays in its
# bounds peaks under 300 MiB (measured: ~250 MiB for a file of only the costliest opcodes the scan admits).
KILL_ABOVE_MIB = 1024


def _jpeg(side: int = 112, seed: int = 0, quality: int = 75) -> bytes:
    """A face-crop-sized JPEG: a smooth picture (as a face is), ~2-5 KB at 112 x 112."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    pixels = np.stack([(np.sin(6 * x + rng.uniform(0, 6)) + np.cos(5 * y * rng.uniform(0.5, 2))) * 60 + 128] * 3, -1)
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def _imencoded(data: bytes) -> np.ndarray:
    """What `_, s = cv2.imencode('.jpg', im)` gives insightface's build_eval_pack.py: a (n, 1) uint8 array."""
    return np.frombuffer(data, np.uint8).reshape(-1, 1).copy()


def _write_bin(path, bins, issame, protocol: int = pickle.HIGHEST_PROTOCOL) -> str:
    with open(path, "wb") as fh:
        pickle.dump((bins, issame), fh, protocol=protocol)
    return str(path)


@dataclass
class Ran:
    rc: int | None
    stdout: str
    stderr: str
    peak_mib: float  # the most resident memory seen (the child's own VmHWM where it says it, else polled)
    seconds: float
    killed: str | None  # why it was killed: "memory" or "time"


def _run(cmd: list[str], timeout: float, kill_above_mib: float | None = KILL_ABOVE_MIB, env: dict | None = None) -> Ran:
    """`cmd` in a process of its own, killed past `timeout` seconds or past `kill_above_mib` of resident memory
    (polled every 20 ms). Not wait4's ru_maxrss: Linux carries the parent's (this test process's, torch and all)
    into a child started by vfork or fork and exec."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=REPO,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        killed, peak = None, 0.0
        while proc.poll() is None:
            peak = max(peak, _status_mib(proc.pid, "VmHWM:"))
            if killed is None and time.time() - t0 > timeout:
                killed = "time"
                proc.kill()
            if killed is None and kill_above_mib is not None and _status_mib(proc.pid, "VmRSS:") > kill_above_mib:
                killed = "memory"
                proc.kill()
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        said = [float(line.split()[1]) / 1024 for line in stdout.splitlines() if line.startswith("VmHWM ")]
        return Ran(proc.returncode, stdout, err.read().decode(errors="replace"), max([peak] + said),
                   time.time() - t0, killed)


def _status_mib(pid: int, field: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(field)) / 1024
    except (OSError, StopIteration, ValueError):
        return 0.0


READ = ("import sys\n"
        "from facenet.errors import UserError, one_line\n"
        "from facenet.verification.binset import load_set\n"
        "def peak():\n"
        "    print('VmHWM', next(ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM:')))\n"
        "try:\n"
        "    pairs, images = load_set(sys.argv[1], what='--verify-bin')\n"
        "except UserError as exc:\n"
        "    peak()\n"
        "    print('error: ' + one_line(exc), file=sys.stderr)\n"
        "    sys.exit(2)\n"
        "peak()\n"
        "print(len(pairs.pairs), 'pairs,', len(images.bins), 'images')\n")


def _read_in_child(path: str, timeout: float = 120) -> Ran:
    """load_set(path) (what --verify-bin and evaluate --bin do with it) in a process of its own."""
    ran = _run([sys.executable, "-c", READ, path], timeout)
    print(f"{os.path.basename(path)} ({os.path.getsize(path)} bytes): exit {ran.rc}, peak {ran.peak_mib:.0f} MiB, "
          f"{ran.seconds:.1f} s{', killed for ' + ran.killed if ran.killed else ''}; {ran.stderr.strip()[:200]}")
    return ran


def _refused(ran: Ran, path: str, says: str, peak_mib: float = 300, seconds: float = 30) -> None:
    """The child refused `path` in one line naming it and saying `says`, within its memory and time."""
    assert ran.killed is None, f"killed for {ran.killed} (peak {ran.peak_mib:.0f} MiB after {ran.seconds:.0f} s)"
    assert ran.rc == 2, (ran.rc, ran.stdout[-500:], ran.stderr[-2000:])
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --verify-bin {path}: "), ran.stderr[-2000:]
    assert says in lines[0], lines[0]
    assert ran.peak_mib < peak_mib and ran.seconds < seconds, (ran.peak_mib, ran.seconds)


# ---- item 1: the same bytes named many times, and pickles that ask for memory ---------------------------------
def _padded_jpeg(size: int) -> bytes:
    """A real JPEG padded with zeros to `size` bytes (decoders stop at its end marker)."""
    jpeg = _jpeg()
    return jpeg + bytes(size - len(jpeg))


@pytest.mark.parametrize("form", ["bytearray", "imencoded", "bytes_protocol2"])
def test_one_image_named_20000_times_counts_20000_times(tmp_path, form):
    """1 MiB named 20,000 times (10,000 pairs) is a 1 MiB file that asks for 20,000 decodes of 1 MiB: refused,
    counting every name toward MAX_BIN_REFERENCED_BYTES. (Was: read, held once, then decoded 20,000 times.)"""
    blob = _padded_jpeg(MAX_BIN_IMAGE_BYTES)  # exactly the per-image bound: only the total refuses it
    image = {"bytearray": bytearray(blob), "imencoded": _imencoded(blob), "bytes_protocol2": blob}[form]
    protocol = 2 if form == "bytes_protocol2" else pickle.HIGHEST_PROTOCOL
    path = _write_bin(tmp_path / "amplified.bin", [image] * 20_000, [True, False] * 5_000, protocol)
    assert os.path.getsize(path) < 2 * MAX_BIN_IMAGE_BYTES + 100_000
    _refused(_read_in_child(path), path, f"more than {MAX_BIN_REFERENCED_BYTES} bytes, counting an image every time")


def test_a_16_mib_image_named_200_times_is_refused_for_its_size(tmp_path):
    """The issue's 16 MiB bytearray named 200 times (3.27 GB when every name was copied): no face crop is 16 MiB."""
    path = _write_bin(tmp_path / "big.bin", [bytearray(_padded_jpeg(16 << 20))] * 200, [True] * 100)
    _refused(_read_in_child(path), path, f"image 0 is {16 << 20} bytes, more than the {MAX_BIN_IMAGE_BYTES} allowed")


def test_shared_images_within_the_bounds_are_held_once_and_counted_every_time(tmp_path):
    """What stays allowed: a set that names one image object in many pairs (a tool that caches by path) is read,
    held once, and its images are counted every time they are named."""
    jpeg = _jpeg()
    path = _write_bin(tmp_path / "cached.bin", [_imencoded(jpeg)] * 2000, [True, False] * 500)
    pairs, images = load_set(path)
    assert len(pairs.pairs) == 1000 and len({id(b) for b in images.bins}) == 1
    assert images.referenced == 2000 * len(jpeg)


@pytest.mark.parametrize("attack", ["memo_index", "empty_sets", "empty_dicts"])
def test_pickles_that_ask_for_memory_are_refused_before_anything_is_made(tmp_path, attack):
    """Nine bytes (LONG_BINPUT 2**28: CPython's unpickler sizes and zeroes its memo to twice the index, 2 GiB)
    and 8 MB of EMPTY_SET (216 bytes of set a byte: 1.7 GB) or EMPTY_DICT: no global is named, so the restricted
    loader alone never saw them."""
    data = {"memo_index": b"\x80\x04]r" + (1 << 28).to_bytes(4, "little") + b".",
            "empty_sets": b"\x80\x04(" + b"\x8f" * (8 << 20) + b"l.",
            "empty_dicts": b"\x80\x04(" + b"}" * (8 << 20) + b"l."}[attack]
    path = tmp_path / f"{attack}.bin"
    path.write_bytes(data)
    says = {"memo_index": "memo slot 268435456 after 3 opcodes", "empty_sets": "pickle opcode EMPTY_SET",
            "empty_dicts": "pickle opcode EMPTY_DICT"}[attack]
    _refused(_read_in_child(str(path)), str(path), says, peak_mib=200)


def test_the_costliest_pickle_the_scan_admits_stays_small(tmp_path):
    """The opcode bound is what bounds the unpickler's objects: MAX_PICKLE_OPS opcodes of the allowed kinds that
    make the most memory a byte (empty lists, 2-character texts) stay under 300 MiB and a few seconds."""
    n = binset.MAX_PICKLE_OPS - 8
    for name, data in {"lists.bin": b"\x80\x04(" + b"]" * n + b"l.",
                       "texts.bin": b"\x80\x04(" + b"\x8c\x02ab" * n + b"l."}.items():
        path = tmp_path / name
        path.write_bytes(data)
        _refused(_read_in_child(str(path)), str(path), "not an insightface verification set", seconds=20)
    (tmp_path / "more.bin").write_bytes(b"\x80\x04(" + b"]" * (n + 8) + b"l.")
    _refused(_read_in_child(str(tmp_path / "more.bin")), str(tmp_path / "more.bin"),
             f"more than {binset.MAX_PICKLE_OPS} pickle opcodes", seconds=20)


# ---- item 2: pair counts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pairs", [10 ** 6, 10 ** 7])
def test_a_million_or_ten_million_pairs_of_one_tiny_jpeg_are_refused_at_once(tmp_path, pairs):
    """10**6 pairs of one 8 x 8 JPEG (5 MB) were ~18 h of embedding at every verification; 10**7 (50 MB) passed
    3 GB before the first image was decoded. Both are refused in one line, in seconds, in little memory."""
    jpeg = _jpeg(side=8)
    path = _write_bin(tmp_path / f"pairs{pairs}.bin", [jpeg] * (2 * pairs), [True, False] * (pairs // 2), protocol=4)
    _refused(_read_in_child(path), path, "pickle opcodes, more than a set of 20000 pairs takes", seconds=20)


def test_pair_count_bound_and_its_edges(tmp_path):
    """One pair past MAX_BIN_PAIRS is refused naming the bound (a bool array of flags too, checked before a list
    is made of it); MAX_BIN_PAIRS pairs are read."""
    jpeg = _imencoded(_jpeg(side=8))
    over = _write_bin(tmp_path / "over.bin", [jpeg] * (2 * MAX_BIN_PAIRS + 2), [True] * (MAX_BIN_PAIRS + 1))
    _refused(_read_in_child(over), over, f"{MAX_BIN_PAIRS + 1} pairs, more than the {MAX_BIN_PAIRS} allowed")
    flags = _write_bin(tmp_path / "flags.bin", [jpeg] * 2, np.ones(10 ** 7, bool))
    _refused(_read_in_child(flags), flags, f"{10 ** 7} pairs, more than the {MAX_BIN_PAIRS} allowed")
    edge = _write_bin(tmp_path / "edge.bin", [jpeg] * (2 * MAX_BIN_PAIRS), [True, False] * (MAX_BIN_PAIRS // 2))
    ran = _read_in_child(edge)
    assert ran.rc == 0 and f"{MAX_BIN_PAIRS} pairs, {2 * MAX_BIN_PAIRS} images" in ran.stdout, ran.stderr[-2000:]


def test_real_sized_sets_in_every_writers_format_are_read(tmp_path):
    """The bounds refuse no real set: CFP-FP's 7,000 pairs of distinct 112 x 112 JPEGs as build_eval_pack.py writes
    them (imencoded arrays, HIGHEST_PROTOCOL), and MAX_BIN_PAIRS pairs of distinct arrays at protocol 0, the
    writer that takes the most opcodes an image (numpy's arrays there: ~35)."""
    faces = [_jpeg(seed=k) for k in range(200)]
    cfp = _write_bin(tmp_path / "cfp_fp.bin", [_imencoded(faces[k % 200]) for k in range(14_000)],
                     [k % 2 == 0 for k in range(7_000)])
    tiny = _jpeg(side=8)
    wordy = _write_bin(tmp_path / "wordy.bin", [_imencoded(tiny) for _ in range(2 * MAX_BIN_PAIRS)],
                       [True, False] * (MAX_BIN_PAIRS // 2), protocol=0)
    for path, n in ((cfp, 7_000), (wordy, MAX_BIN_PAIRS)):
        ran = _read_in_child(path)
        assert ran.rc == 0 and f"{n} pairs, {2 * n} images" in ran.stdout, ran.stderr[-2000:]
        assert ran.peak_mib < 600 and ran.seconds < 60


def test_the_sets_a_process_holds_at_once_are_bounded(tmp_path):
    """--verify-bin takes 16 sets and embeds them all at every verification: past MAX_HELD_BIN_PAIRS together the
    next is refused in one line; a set nothing holds any more no longer counts."""
    jpeg = _jpeg(side=8)
    paths = [_write_bin(tmp_path / f"s{k}.bin", [jpeg] * (2 * MAX_BIN_PAIRS), [True, False] * (MAX_BIN_PAIRS // 2),
                        protocol=4) for k in range(3)]
    held = [load_set(p, what="--verify-bin") for p in paths[:2]]
    assert 2 * MAX_BIN_PAIRS <= MAX_HELD_BIN_PAIRS < 3 * MAX_BIN_PAIRS
    with pytest.raises(UserError) as err:
        load_set(paths[2], what="--verify-bin")
    assert str(err.value).startswith(f"--verify-bin {paths[2]}: ") and f"{MAX_HELD_BIN_PAIRS}" in str(err.value)
    assert "\n" not in str(err.value)
    del held
    load_set(paths[2])  # the first two are gone
    # and in bytes, counted every time named: 4 sets of one 200 KiB image named 1,280 times (250 MiB each)
    image = bytearray(_padded_jpeg(200 << 10))
    paths = [_write_bin(tmp_path / f"b{k}.bin", [image] * 1280, [True, False] * 320) for k in range(4)]
    held = [load_set(p) for p in paths[:3]]
    with pytest.raises(UserError, match=f"or {binset.MAX_HELD_BIN_BYTES} bytes of .bin sets allowed at once"):
        load_set(paths[3])


# ---- the pixels an image may decode to ------------------------------------------------------------------------
class _Net(torch.nn.Module):
    """An embedding network's interface (embed_paths': `classify`), giving `value` for every image."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.classify = False
        self.value = value

    def forward(self, x):
        return torch.full((x.shape[0], 512), self.value)


def test_an_image_of_more_pixels_than_a_face_crop_is_an_unreadable_image(tmp_path):
    """A 4096 x 4096 PNG of one colour is 50 KB (within the per-image bytes) and ~1000x a crop's decode: dropped and
    named like any unreadable image, so the pair bound bounds the decoding too."""
    from facenet.verification.embed import embed_paths

    out = io.BytesIO()
    Image.new("RGB", (4096, 4096), (90, 60, 40)).save(out, "PNG")
    assert len(out.getvalue()) < MAX_BIN_IMAGE_BYTES
    face = _jpeg()
    path = _write_bin(tmp_path / "wide.bin", [out.getvalue()] + [face] * 19, [True] * 10)
    pairs, source = load_set(path)
    images = pairs.images()
    t0 = time.time()
    _, bad = embed_paths(_Net(), images, torch.device("cpu"), 96, source=source)
    assert bad == [f"{path}#0"] and time.time() - t0 < 10


# ---- item 13: a set too small to score, and NaN ----------------------------------------------------------------
def test_fewer_pairs_than_folds_are_refused_when_read(tmp_path):
    face = _imencoded(_jpeg())
    for n in (1, MIN_BIN_PAIRS - 1):
        path = _write_bin(tmp_path / f"p{n}.bin", [face] * (2 * n), [True] * n)
        with pytest.raises(UserError) as err:
            load_set(path, what="--verify-bin")
        assert str(err.value) == (f"--verify-bin {path}: {n} pair(s); a set needs at least {MIN_BIN_PAIRS}: "
                                  f"insightface's procedure scores pairs in 10 folds, one pair a fold at least")
    assert len(load_set(_write_bin(tmp_path / "ten.bin", [face] * 20, [True, False] * 5))[0].pairs) == MIN_BIN_PAIRS
    assert len(read_bin(str(tmp_path / "p1.bin"))[1]) == 1  # the format itself is read as written


def test_a_one_pair_bin_fails_the_trainer_once_in_one_line(orl_faces, tmp_path):
    """Was: the trainer read it, then its first verification raised ValueError (a traceback, exit 1), which a
    queued job takes for a crash and retries 3 times. Now: refused before training, one `error:` line, exit 2
    (services/queue/attempt.py fails a job at once on that)."""
    path = _write_bin(tmp_path / "one.bin", [_imencoded(_jpeg(seed=1)), _imencoded(_jpeg(seed=2))], [True])
    ran = _run(train_cmd("--data", orl_faces, "--output", str(tmp_path / "run"), "--epochs", "1", "--pretrained",
                         "none", "--verify-bin", path),
               timeout=300, kill_above_mib=None, env={"MLFLOW_TRACKING_URI": ""})
    assert ran.rc == 2 and "Traceback" not in ran.stderr, (ran.rc, ran.stderr[-3000:])
    errors = [ln for ln in ran.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: --verify-bin {path}: 1 pair(s); a set needs at least {MIN_BIN_PAIRS}: insightface's "
                      "procedure scores pairs in 10 folds, one pair a fold at least"], ran.stderr[-3000:]


@pytest.mark.parametrize("attack", ["amplified", "million_pairs"])
def test_the_trainer_refuses_hostile_verify_bins_before_training(orl_faces, tmp_path, attack):
    """submit-train --verify-bin: whoever can write a data root gave the trainer a set that took it past 5 GB (the
    worker kills it: 3 attempts) or kept it embedding for hours. Now: exit 2 and one line, in seconds."""
    if attack == "amplified":
        path = _write_bin(tmp_path / "amp.bin", [bytearray(_padded_jpeg(MAX_BIN_IMAGE_BYTES))] * 20_000,
                          [True, False] * 5_000)
        says = "counting an image every time"
    else:
        path = _write_bin(tmp_path / "many.bin", [_jpeg(side=8)] * (2 * 10 ** 6), [True, False] * (10 ** 6 // 2),
                          protocol=4)
        says = "pickle opcodes"
    ran = _run(train_cmd("--data", orl_faces, "--output", str(tmp_path / "run"), "--epochs", "1", "--pretrained",
                         "none", "--verify-bin", path),
               timeout=240, kill_above_mib=4096, env={"MLFLOW_TRACKING_URI": ""})
    print(f"trainer on {attack}: exit {ran.rc}, peak {ran.peak_mib:.0f} MiB, {ran.seconds:.1f} s")
    assert ran.killed is None and ran.rc == 2 and "Traceback" not in ran.stderr, (ran.killed, ran.stderr[-3000:])
    errors = [ln for ln in ran.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: --verify-bin {path}: ") and says in errors[0], errors
    assert ran.seconds < 120


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_the_metrics_refuse_nan_and_inf_in_one_line(bad):
    """A comparison with NaN is False: NaN distances scored as a plausible accuracy (0.5 here), silently."""
    rng = np.random.default_rng(0)
    same = np.repeat([True, False], 50)
    folds = np.tile(np.arange(10), 10)
    d = np.where(same, rng.uniform(0, 1, 100), rng.uniform(1, 2, 100))
    d[[3, 60]] = bad
    for call in (lambda: vm.verification_metrics(d, same, folds), lambda: vm.roc(d, same)):
        with pytest.raises(vm.ScoreError) as err:
            call()
        assert str(err.value).startswith("2 of 100 pairs have a NaN or inf distance") and "\n" not in str(err.value)
        assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    e = np.ones((100, 512), np.float32) / np.sqrt(512)
    e2 = e.copy()
    e2[7, 3] = bad
    with pytest.raises(vm.ScoreError, match="1 of 100 pairs have a NaN or inf embedding"):
        vm.insightface_accuracy(e, e2, same)
    huge = np.full((100, 512), 1e300)
    with pytest.raises(vm.ScoreError, match="100 of 100 pairs have a NaN or inf distance"):
        vm.insightface_accuracy(huge, -huge, same)  # finite, but their squared distance overflows


def test_pairs_left_in_one_fold_are_one_line_not_a_crash():
    """Unreadable images can leave the kept pairs in one fold: was a bare ValueError, which the trainer did not
    catch (a traceback, exit 1: a queued job retried as a crash); now a UserError in one line (exit 2)."""
    from facenet.evaluate import score_pairs
    from facenet.verification.binset import bin_pairs

    pairs = bin_pairs("/sets/few.bin", [True, False] * 5)
    images = pairs.images()
    emb = np.eye(len(images), 512, dtype=np.float32)
    unreadable = [f"/sets/few.bin#{k}" for k in range(2, 20)]  # only pair 0 (fold 0) is left
    with pytest.raises(UserError) as err:
        score_pairs(pairs, images, emb, unreadable)
    assert "1 pair(s) in 1 fold(s): the protocol needs at least 2 folds" in str(err.value)


def test_the_trainers_verification_of_a_diverged_model_is_one_line(tmp_path):
    """A model whose embeddings are NaN (training diverged): the trainer's verification said an accuracy; now one
    line naming the set, a UserError (the trainer exits 2 with it)."""
    from facenet.train import engine
    from facenet.train.distributed import DistInfo

    face = _jpeg()
    path = _write_bin(tmp_path / "lfw.bin", [_imencoded(face)] * 20, [True, False] * 5)
    pairs, source = load_set(path)
    device = types.SimpleNamespace(torch_device=torch.device("cpu"), autocast=lambda enabled, dtype: torch.no_grad())
    r = types.SimpleNamespace(model=_Net(float("nan")), spec=types.SimpleNamespace(image_size=96, batch_size=8),
                              device=device, amp=types.SimpleNamespace(enabled=False, dtype=None), info=DistInfo(),
                              roots=None, channels_last=False, pairs=None, bins=[("lfw", pairs, source)])
    with pytest.raises(UserError) as err:
        engine.verify(r)
    assert str(err.value).startswith("verification on lfw.bin (10 pairs, 10 folds in file order): 10 of 10 pairs "
                                     "have a NaN or inf distance"), str(err.value)
    r.model = _Net(1.0)
    assert 0 <= engine.verify(r)["lfw_verify_acc"] <= 1  # a finite model is scored as before
