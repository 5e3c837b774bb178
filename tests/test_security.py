"""Each finding of the security review, reproduced as an attack that must now fail to get through.

Real files, real symlinks, FIFOs and devices, a real Redis (the `redis_url` fixture) and real
redis-server/MLflow command lines; no mocks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zlib

import pytest
from PIL import Image

from facenet import confine
from facenet.errors import InputError

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def tree(tmp_path):
    """root/ (the only data root) and outside/ holding a 0600 secret."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    secret = outside / "secrets.env"
    secret.write_text("REDIS_PASSWORD=hunter2\n")
    secret.chmod(0o600)
    return root, outside, confine.Roots([str(root)])


# ---- confinement ---------------------------------------------------------------------------------------

def test_confinement_fails_closed(tmp_path, monkeypatch):
    from services.config import check_path_allowed, load_settings

    for value in ("", ":"):
        with pytest.raises(InputError, match="no data roots are configured"):
            confine.Roots.from_env({"FACENET_DATA_ROOTS": value}).check(str(tmp_path), "--data")
    monkeypatch.delenv("FACENET_DATA_ROOTS", raising=False)
    monkeypatch.setenv("FACENET_STATE_DIR", str(tmp_path / "no-stack-here"))
    with pytest.raises(InputError, match="no data roots are configured"):
        check_path_allowed(str(tmp_path), load_settings().data_roots, "--data")
    monkeypatch.setenv("FACENET_DATA_ROOTS", "")
    with pytest.raises(InputError, match="no data roots are configured"):
        check_path_allowed(str(tmp_path), load_settings().data_roots, "--data")


def test_a_list_line_through_a_symlinked_folder_is_refused(tree, sample_faces):
    from facenet.data.dataset import load_dataset
    from facenet.data.loader import decode

    root, outside, roots = tree
    ident = sorted(os.listdir(sample_faces))[0]
    shutil.copytree(os.path.join(sample_faces, ident), outside / "stolen")
    shutil.copytree(os.path.join(sample_faces, ident), root / "a")
    shutil.copytree(os.path.join(sample_faces, sorted(os.listdir(sample_faces))[1]), root / "b")
    os.symlink(outside / "stolen", root / "link")
    name = sorted(os.listdir(root / "a"))[0]
    (root / "train_list.txt").write_text(f"a/{name} 0\nlink/{name} 1\n")
    (root / "test_list.txt").write_text("")
    with pytest.raises(confine.Refused, match=r"train_list.txt:2: folder .*link.*outside the data roots"):
        load_dataset(str(root), roots=roots)
    # The loader checks each file again where it opens it (a folder swapped for a link after loading).
    with pytest.raises(confine.Refused, match="outside the data roots"):
        decode(str(root / "link" / name), 160, roots)
    os.symlink(outside / "secrets.env", root / "a" / "x.jpg")
    with pytest.raises(confine.Refused):
        decode(str(root / "a" / "x.jpg"), 160, roots)
    assert decode(str(root / "a" / name), 160, roots).shape == (3, 160, 160)


def test_a_symlinked_identity_in_raw_is_not_planned_and_is_counted(tree, sample_root):
    from facenet.preprocess.plan import make_plan, Params

    root, outside, roots = tree
    raw = root / "raw"
    raw_src = os.path.join(sample_root, "raw")
    first, second = sorted(os.listdir(raw_src))[:2]
    shutil.copytree(os.path.join(raw_src, first), raw / first)
    shutil.copytree(os.path.join(raw_src, second), outside / second)
    os.symlink(outside / second, raw / "elsewhere")
    os.symlink(outside / "secrets.env", raw / first / "secret.jpg")
    plan = make_plan(str(raw), str(root / "out"), Params(), roots)
    assert {item[1] for item in plan.items} == {first}
    assert not any(item[2] == "secret.jpg" for item in plan.items)
    assert dict(plan.refused) == {"elsewhere": "symbolic link outside the data roots",
                                  f"{first}/secret.jpg": "symbolic link outside the data roots"}


def test_a_symlinked_state_folder_in_out_writes_nothing_outside(tree, sample_root):
    from facenet.preprocess.plan import Params, make_plan, save_plan

    root, outside, roots = tree
    raw = root / "raw"
    shutil.copytree(os.path.join(sample_root, "raw", sorted(os.listdir(os.path.join(sample_root, "raw")))[0]),
                    raw / "p")
    (root / "out").mkdir()
    os.symlink(outside, root / "out" / ".preprocess")
    plan = make_plan(str(raw), str(root / "out"), Params(), roots).with_shard_size(1)
    with pytest.raises(confine.Refused, match="outside the data roots"):
        save_plan(plan, roots)
    assert sorted(os.listdir(outside)) == ["secrets.env"]


def test_the_plan_is_checked_not_trusted(tmp_path):
    from facenet.errors import UserError
    from facenet.preprocess.plan import Params, Plan

    from facenet.preprocess.plan import load_plan, save_plan

    plan = Plan("/data/raw", "/data/out", Params(shard_size=8), [("train", "a", "1.jpg")], "folders")
    moved = Plan("/etc", "/data/out", Params(shard_size=8), [("train", "a", "1.jpg")], "folders")
    assert plan.plan_id != moved.plan_id  # RAW and OUT are part of what the job recorded
    for bad_item in (["train", "..", "x"], ["train", "a/../../etc", "passwd"], ["nope", "a", "b"]):
        # A version-1 plan (items inline) is checked as it is read ...
        legacy = {"raw": plan.raw, "out": plan.out, "params": json.loads(plan.to_json())["params"],
                  "layout": plan.layout, "items": [bad_item]}
        with pytest.raises(UserError, match="plan is corrupt"):
            Plan.from_json(json.dumps(legacy))
        # ... and a saved plan's items when a shard reads them, even when the hashes were forged to match.
        out = tmp_path / f"out-{bad_item[1].replace('/', '_')}"
        forged = Plan("/data/raw", str(out), Params(shard_size=8), [tuple(bad_item)], "folders")
        save_plan(forged)
        with pytest.raises(UserError, match="plan is corrupt"):
            load_plan(str(out)).shard_items(0)
    out = tmp_path / "edited"
    save_plan(Plan("/data/raw", str(out), Params(shard_size=8), [("train", "a", "1.jpg")], "folders"))
    (items,) = (out / ".preprocess").glob("plan-*.items")
    items.write_text("train\tb\t1.jpg\n")  # another person's photo, same length
    loaded = load_plan(str(out))
    with pytest.raises(UserError, match="do not match the plan"):
        loaded.shard_items(0)
    header = json.loads((out / ".preprocess" / "plan.json").read_text())
    header["count"] = 9
    (out / ".preprocess" / "plan.json").write_text(json.dumps(header))
    with pytest.raises(UserError, match="plan is corrupt"):
        load_plan(str(out))


def test_crops_and_hashes_refuse_devices_fifos_and_symlinks(tree):
    from facenet.images import load_rgb
    from facenet.preprocess.shard import _reusable

    root, outside, roots = tree
    os.symlink("/dev/zero", root / "crop.png")
    assert _reusable(str(root / "crop.png"), roots) is None  # was MemoryError reading /dev/zero whole
    fifo = root / "fifo.jpg"
    os.mkfifo(fifo)
    t0 = time.time()
    assert load_rgb(str(fifo), roots=roots).reject == "refused (not a regular file)"  # was: hung forever
    assert time.time() - t0 < 5
    os.symlink(outside / "secrets.env", root / "s.png")
    assert "outside the data roots" in load_rgb(str(root / "s.png"), roots=roots).reject


def test_pretrained_audit_samples_and_verify_bins_are_confined(tree):
    from facenet.model import resolve_pretrained
    from facenet.spec import TrainSpec
    from services.queue.trainer import check_job_paths

    root, outside, roots = tree
    messages = []
    for name in ("secrets.env", "does-not-exist"):  # the error must not tell whether the file exists
        with pytest.raises(confine.Refused) as err:
            resolve_pretrained(str(outside / name), roots)
        messages.append(str(err.value).replace(name, "X"))
    assert messages[0] == messages[1]
    for spec, match in ((TrainSpec(data=str(root), pretrained=str(outside / "secrets.env")), "--pretrained"),
                        (TrainSpec(data=str(root), audit_samples=str(outside / "audit")), "--audit-samples"),
                        (TrainSpec(data=str(root), audit_samples="../../outside"), "--audit-samples"),
                        (TrainSpec(data=str(root), verify_bin=[str(root / "in.bin"), str(outside / "secrets.env")]),
                         "--verify-bin")):
        with pytest.raises(confine.Refused, match=match):
            check_job_paths(spec, roots.roots, str(root / "runs" / "job"))
    ok = TrainSpec(data=str(root), audit_samples="audit")
    # Resolved under the job's own output, returned for the worker's copy; the spec itself is not rewritten.
    assert check_job_paths(ok, roots.roots, str(root / "runs" / "job")) == {
        "audit_samples": str(root / "runs" / "job" / "audit")}
    assert ok.audit_samples == "audit"
    inside = TrainSpec(data=str(root), verify_bin=[str(root / "lfw.bin")])
    assert check_job_paths(inside, roots.roots, str(root / "runs" / "job")) == {"verify_bin": [str(root / "lfw.bin")]}


# ---- memory from small hostile files -------------------------------------------------------------------

def _png(path, width: int, height: int, bit_depth: int, color_type: int, rows: int | None = None) -> int:
    """A valid PNG of zeros written by hand (PIL would need the whole image in memory); returns its size."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    channels = {0: 1, 2: 3}[color_type]
    row = b"\0" * (1 + width * channels * bit_depth // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(height if rows is None else rows)) + z.flush()
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    path.write_bytes(data)
    return len(data)


def _peak_rss_mb(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code + "\nimport resource, sys\n"
                          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return float(out.strip().splitlines()[-1])


def test_a_small_16_bit_png_stays_small_in_memory(tmp_path):
    big = tmp_path / "gray16.png"
    size = _png(big, 6000, 6000, 16, 0)  # 36 MP of 16-bit gray: ~100 KB on disk
    assert size < 200_000
    base = _peak_rss_mb("from facenet.images import load_rgb")
    peak = _peak_rss_mb(f"from facenet.images import load_rgb\n"
                        f"r = load_rgb({str(big)!r}); assert r.image is not None and r.converted == 'I;16->RGB'")
    # The decode itself is 72 MB (16-bit) and the RGB result 108 MB; the old float64 path took >1.2 GB here.
    assert peak - base < 500, (base, peak)


def test_huge_dimensions_are_refused_from_the_header(tmp_path):
    from facenet.data.loader import decode
    from facenet.images import load_rgb

    bomb = tmp_path / "bomb.png"
    assert _png(bomb, 20000, 20000, 8, 2, rows=1) < 50_000
    t0 = time.time()
    assert load_rgb(str(bomb)).reject == "decompression bomb (400000000 pixels)"
    with pytest.raises(ValueError, match="400000000 pixels"):
        decode(str(bomb), 160)
    assert time.time() - t0 < 5


@pytest.mark.parametrize("field,value,match", [
    ("workers", 4096, r"--workers 4096: must be in \[0, 64\]"),
    ("image_size", 60000, r"--image-size 60000: must be in \[32, 1024\]"),
    ("epochs", 0, r"--epochs 0"), ("batch_size", -1, r"--batch-size -1"),
    ("lr", float("nan"), r"--lr nan"), ("lr", float("inf"), r"--lr inf"), ("npus", 10**9, r"--npus"),
    ("holdout", float("nan"), r"--holdout nan"), ("epochs", "ten", r"'epochs': 'ten' is not an integer"),
    ("tags", {"k": 3}, r"tag"), ("lr_steps", "5,10", r"'lr_steps'"), ("amp", "yes", r"'amp'"),
])
def test_every_numeric_option_is_bounded_and_typed(field, value, match):
    from facenet.spec import TrainSpec

    with pytest.raises(InputError, match=match):
        TrainSpec.from_dict({"data": "/x", field: value})


# ---- leases belong to the attempt ----------------------------------------------------------------------

def test_a_lost_attempt_cannot_drop_the_next_attempts_leases(redis_url):
    from services.queue.registry import Registry, connect
    from services.queue.attempt import Heartbeat

    client = connect(redis_url)
    client.flushdb()
    reg = Registry(client, heartbeat_ttl=3)
    job = reg.create("train", {"spec": {"data": "/x"}, "device_type": "cpu", "npus": 1})
    assert reg.lease("w", [0, 1], 1, f"{job}:A") == [0]
    time.sleep(3.5)  # attempt A's heartbeat and lease lapse; attempt B of the same job takes the device
    assert reg.lease("w", [0, 1], 1, f"{job}:B") == [0]
    assert reg.renew_leases("w", [0], f"{job}:A", drop=True) == 0  # A's cleanup: B's lease stays
    assert reg.leases("w", [0, 1]) == {0: f"{job}:B", 1: None}
    assert reg.lease("w", [0], 1, "other:C") == []  # no other job can take B's device

    # An attempt whose lease was taken stops (its heartbeat sets `lost`), instead of training on.
    claimed_at = time.monotonic()
    assert reg.claim(job, "B")[0] == "ok"
    beat = Heartbeat(reg, job, "B", "w", [0, 1], claimed_at)
    beat.leased = [0]
    client.set("facenet:lease:w:0", "other:C", ex=30)
    beat.start()
    assert beat.lost.wait(5) and "lease" in beat.why
    beat.stop()


def test_a_late_status_write_cannot_undo_a_cancel(redis_url):
    from services.queue.registry import CANCELLED, SUCCEEDED, Registry, connect

    client = connect(redis_url)
    client.flushdb()
    reg = Registry(client, heartbeat_ttl=3, retention_seconds=120)
    job = reg.create("preprocess", {})
    assert reg.finish(job, CANCELLED, message="cancelled")
    assert not reg.finish(job, SUCCEEDED, result={"faces": 1})
    assert not reg.update(job, status="QUEUED")
    assert reg.get(job)["status"] == CANCELLED
    assert reg.update(job, message="a field that is not the status still lands")
    # An ended job leaves the active set and its keys expire after the retention.
    assert job not in reg.active_ids() and 0 < client.ttl(reg.key(job)) <= 120


def test_the_sweep_finds_a_dead_job_older_than_a_thousand_newer_ones(redis_url, monkeypatch):
    from services.queue.registry import Registry, connect

    client = connect(redis_url)
    client.flushdb()
    reg = Registry(client, heartbeat_ttl=2)
    old = reg.create("train", {"spec": {"data": "/x"}, "device_type": "cpu", "npus": 1})
    assert reg.claim(old, "dead")[0] == "ok"
    pipe = client.pipeline()
    for i in range(1200):  # newer jobs, all ended
        pipe.hset(f"facenet:job:n{i:011d}", mapping={"id": f"n{i:011d}", "status": "SUCCEEDED", "kind": "train"})
        pipe.zadd("facenet:jobs", {f"n{i:011d}": time.time() + 1 + i})
    pipe.execute()
    time.sleep(2.5)
    assert old in reg.active_ids()
    assert old not in {j["id"] for j in reg.jobs(1000)}
    # The sweep sends the job's train message through Celery; point it at this Redis.
    monkeypatch.setenv("FACENET_REDIS_URL", redis_url)
    code = ("import sys\nfrom services.queue.registry import Registry, connect\nfrom services.queue.sweep import sweep\n"
            f"print(sweep(Registry(connect({redis_url!r}), 2)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "FACENET_REDIS_URL": redis_url})
    assert old in out.stdout, out.stderr[-2000:]
    assert reg.get(old)["status"] == "QUEUED"
    assert reg.prune(keep=100) == 1100 and client.zcard("facenet:jobs") == 101


# ---- secrets -------------------------------------------------------------------------------------------

def test_a_hostile_redis_password_stays_a_password(tmp_path):
    from facenet.fsutil import free_port
    from services.queue.registry import connect

    password = 'p"w\\ x\nrequirepass owned\n"#'
    port = free_port()
    env = {**os.environ, "FACENET_REDIS_PORT": str(port), "FACENET_REDIS_PASSWORD": password,
           "FACENET_REDIS_DATA": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "services.stack.entrypoints", "redis"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        from urllib.parse import quote

        url = f"redis://:{quote(password, safe='')}@127.0.0.1:{port}/0"
        deadline = time.time() + 20
        while True:
            try:
                assert connect(url, timeout=1).ping()
                break
            except Exception:
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                assert time.time() < deadline
                time.sleep(0.2)
        with pytest.raises(Exception, match="(?i)invalid|WRONGPASS|auth"):
            connect(f"redis://:owned@127.0.0.1:{port}/0", timeout=1).ping()
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_trainer_gets_no_redis_or_flower_credentials():
    from services.queue.trainer import trainer_env

    worker = {"PATH": "/usr/bin", "HOME": "/root", "FACENET_REDIS_URL": "redis://:s3cret@redis:6379/0",
              "FACENET_REDIS_PASSWORD": "s3cret", "FLOWER_BASIC_AUTH": "u:s3cret", "POSTGRES_PASSWORD": "s3cret",
              "REDIS_PASSWORD": "s3cret", "MLFLOW_TRACKING_USERNAME": "facenet", "MLFLOW_TRACKING_PASSWORD": "m",
              "ASCEND_TOOLKIT_HOME": "/usr/local/Ascend", "LD_LIBRARY_PATH": "/x", "FACENET_DATA_ROOTS": "/anything"}
    env = trainer_env(worker, ["/data", "/prep"])
    assert "s3cret" not in json.dumps(env)
    assert env["MLFLOW_TRACKING_PASSWORD"] == "m" and env["ASCEND_TOOLKIT_HOME"] == "/usr/local/Ascend"
    assert env["FACENET_DATA_ROOTS"] == "/data:/prep"


def test_checkpoints_load_without_unpickling_code(tmp_path):
    import pickle

    import torch

    from facenet.errors import UserError
    from facenet.train import checkpoint as ckpt_io

    good = tmp_path / "good.pt"
    ckpt_io.save_atomic({"model": {"w": torch.zeros(2)}, "epoch": 1, "rng": ckpt_io.rng_state(),
                         "history": [{"epoch": 1, "loss": 0.5}], "classes": ["a", "b"]}, str(good))
    state = ckpt_io.load(str(good))
    ckpt_io.set_rng_state(state["rng"])

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "epoch": 1, "x": Evil()}, str(evil), pickle_module=pickle)
    with pytest.raises(UserError, match="--resume .*: cannot read it as tensors .*by other code is refused"):
        ckpt_io.load(str(evil))
    assert not marker.exists()


def test_the_mlflow_server_command_line_holds_no_password():
    from services.stack.entrypoints import mlflow_server_command

    cmd, env = mlflow_server_command("127.0.0.1", 5000, "postgresql+psycopg2://mlflow:s3cret@db/mlflow", "/a")
    assert not any("s3cret" in arg for arg in cmd)
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith(":s3cret@db/mlflow")


# ---- hostile data --------------------------------------------------------------------------------------

def test_a_file_replaced_while_it_is_read_is_one_version_or_the_other(tmp_path, sample_faces):
    from facenet.images import load_rgb

    ident = sorted(os.listdir(sample_faces))[0]
    a, b = [os.path.join(sample_faces, ident, n) for n in sorted(os.listdir(os.path.join(sample_faces, ident)))[:2]]
    from PIL import Image

    big = tmp_path / "big.png"
    Image.open(a).resize((640, 480)).save(big)
    target = tmp_path / "swap.png"
    shutil.copy(a, target)
    stop = threading.Event()

    def swapper():
        i = 0
        while not stop.is_set():
            src = (a, str(big))[i % 2]
            shutil.copy(src, tmp_path / "next.png")
            os.replace(tmp_path / "next.png", target)
            i += 1

    t = threading.Thread(target=swapper)
    t.start()
    try:
        sizes = {load_rgb(str(target)).size for _ in range(300)}
    finally:
        stop.set()
        t.join()
    assert sizes <= {Image.open(a).size, (640, 480)} and len(sizes) >= 1


def test_ten_thousand_files_an_empty_folder_and_a_folder_of_bad_files_are_counted(tmp_path, sample_root):
    from facenet.preprocess import Params, run_local

    raw = tmp_path / "raw"
    src = os.path.join(sample_root, "raw")
    first = sorted(os.listdir(src))[0]
    shutil.copytree(os.path.join(src, first), raw / "real")
    real = len(os.listdir(raw / "real"))
    (raw / "many").mkdir()
    for i in range(10_000):
        (raw / "many" / f"{i:05d}.jpg").write_bytes(b"not a photo")
    (raw / "empty").mkdir()
    (raw / "bad").mkdir()
    good = sorted(os.listdir(raw / "real"))[0]
    (raw / "bad" / "truncated.jpg").write_bytes((raw / "real" / good).read_bytes()[:500])
    (raw / "bad" / "text.png").write_text("hello")
    (raw / "bad" / "empty.jpg").write_bytes(b"")
    summary = run_local(str(raw), str(tmp_path / "out"), Params(), workers=1, progress=False)
    assert summary["images"] == real + 10_000 + 3
    assert summary["rejects"] == 10_000 + 3 + (real - summary["faces"])
    assert summary["reject_reasons"]["not an image"] >= 10_001
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["identities"] == 3  # the empty folder holds no image to count
    assert manifest["lists"]["classes"] == 1


# ---- the second review: no symlink at any component, no parent swap, no hard-linked metadata ---------------

def _exchange(a: str, b: str) -> None:
    """renameat2(RENAME_EXCHANGE): swap two names atomically (what the attacker of the race uses)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")


def _which_file(reader: str, path: str, roots) -> str:
    """'inside', 'SECRET', 'refused' or 'missing': what one read of `path` through `reader` got, told apart by
    the file's bytes (read_bytes) or its colour (the training loader's decode, preprocessing's load_rgb)."""
    from facenet.data.loader import decode
    from facenet.images import load_rgb

    try:
        if reader == "read_bytes":
            data = confine.read_bytes(path, roots, "image")
            return "SECRET" if data == b"SECRET" else "inside"
        if reader == "loader":
            red = int(decode(path, 8, roots)[0].float().mean())
        else:
            loaded = load_rgb(path, roots=roots)
            if loaded.image is None:
                return "missing" if loaded.reject == "file vanished" else "refused"
            red = loaded.image.getpixel((0, 0))[0]
        return "SECRET" if red > 128 else "inside"
    except confine.Refused:
        return "refused"
    except (FileNotFoundError, NotADirectoryError):
        return "missing"


@pytest.mark.parametrize("reader,reads", [("read_bytes", 4000), ("loader", 2000), ("preprocessing", 2000)])
@pytest.mark.parametrize("walk", ["0", "1"], ids=["openat2", "component-walk"])
def test_a_parent_folder_swapped_for_a_symlink_is_never_followed(tree, monkeypatch, walk, reader, reads):
    """A parent folder exchanged with a symlink to outside, as fast as the attacker can, while a job reads a
    file beneath it: 0 reads of the outside file (was: 33 of 20,000 loader reads, 5 of 3,000 preprocessing
    reads, since the path was resolved and then opened again), through confine itself, the training
    loader and preprocessing's photo reader. Both the openat2 path and the walk of O_NOFOLLOW|O_DIRECTORY
    opens used where the kernel lacks openat2."""
    root, outside, roots = tree
    monkeypatch.setenv(confine.WALK_ENV, walk)
    (root / "a").mkdir()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(root / "a" / "f.png")  # inside: green
    Image.new("RGB", (8, 8), (250, 0, 0)).save(outside / "f.png")  # outside: red, the secret
    if reader == "read_bytes":
        (root / "a" / "f.png").write_bytes(b"inside")
        (outside / "f.png").write_bytes(b"SECRET")
    os.symlink(outside, root / "b")
    stop = threading.Event()
    swaps = [0]

    def attacker():
        while not stop.is_set():
            _exchange(str(root / "a"), str(root / "b"))
            swaps[0] += 1

    t = threading.Thread(target=attacker, daemon=True)
    t.start()
    got = {"inside": 0, "refused": 0, "SECRET": 0, "missing": 0}
    try:
        for _ in range(reads):
            got[_which_file(reader, str(root / "a" / "f.png"), roots)] += 1
    finally:
        stop.set()
        t.join()
    assert got["SECRET"] == 0, got
    assert got["refused"] > 0 and got["inside"] > 0 and swaps[0] > 100, (got, swaps)  # the race really ran


def test_symlinks_inside_the_roots_are_not_followed_either(tree):
    root, outside, roots = tree
    (root / "real").mkdir()
    (root / "real" / "x.txt").write_text("ok")
    os.symlink(root / "real", root / "alias")
    os.symlink(root / "real" / "x.txt", root / "y.txt")
    assert confine.read_bytes(str(root / "real" / "x.txt"), roots) == b"ok"
    for path in (root / "alias" / "x.txt", root / "y.txt"):
        with pytest.raises(confine.Refused, match="is a symbolic link .*links are not followed"):
            confine.read_bytes(str(path), roots)
    with pytest.raises(confine.Refused, match="symbolic link"):
        confine.write_bytes(str(root / "alias" / "new.txt"), b"x", roots)
    assert sorted(os.listdir(root / "real")) == ["x.txt"]


def test_hard_linked_metadata_is_refused_and_images_are_counted(tree, sample_root):
    """A hard link cannot be told from its target: the manifest, lists and pairs a job uploads or quotes must
    have one link; images may have more (allowed, and counted in the manifest)."""
    from facenet.data.dataset import load_dataset
    from facenet.preprocess import Params, run_local

    root, outside, roots = tree
    data = root / "data"
    data.mkdir()
    os.link(outside / "secrets.env", data / "manifest.json")
    with pytest.raises(confine.Refused, match="has 2 hard links"):
        confine.read_metadata(str(data / "manifest.json"), roots, "manifest")
    (root / "a").mkdir()
    (root / "a" / "x.jpg").write_bytes(b"x")
    (data / "train_list.txt").write_text("a/x.jpg 0\n")
    os.link(data / "train_list.txt", outside / "linked_list.txt")
    (data / "test_list.txt").write_text("")
    with pytest.raises(confine.Refused, match="train_list.txt: has 2 hard links"):
        load_dataset(str(data), roots=roots)
    # Raw photos with two names are planned and cropped, and the manifest says how many there were.
    raw_src = os.path.join(sample_root, "raw")
    person = sorted(os.listdir(raw_src))[0]
    raw = root / "raw" / person
    raw.mkdir(parents=True)
    for k, name in enumerate(sorted(os.listdir(os.path.join(raw_src, person)))[:4]):
        shutil.copy(os.path.join(raw_src, person, name), raw / name)
        if k < 2:
            os.link(raw / name, outside / f"copy{k}.jpg")
    env_roots = os.environ.get(confine.ROOTS_ENV)
    os.environ[confine.ROOTS_ENV] = str(root)
    try:
        run_local(str(root / "raw"), str(root / "out"), Params(), workers=1, progress=False)
    finally:
        if env_roots is None:
            del os.environ[confine.ROOTS_ENV]
        else:
            os.environ[confine.ROOTS_ENV] = env_roots
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    assert manifest["hard_linked"] == 2 and manifest["splits"]["train"]["images"] == 4


def test_newlines_in_file_names_reach_no_log_line_or_job_error(tree, sample_faces):
    """A file named 'x\\nerror: ...' is data: the trainer names it escaped on one line, so the supervisor (which
    takes the trainer's last `error:` line as the job's error) never reads the attacker's text as one."""
    from conftest import train_cmd
    from facenet.samples import copy_subset

    root, outside, roots = tree
    data = copy_subset(sample_faces, str(root / "data"), 2, 6)
    person = sorted(os.listdir(data))[0]
    (root / "data" / person / "x\nerror: OWNED by a file name.jpg").write_bytes(b"not an image")
    out = root / "out"
    env = {**os.environ, confine.ROOTS_ENV: str(root)}
    proc = subprocess.run(train_cmd("--data", data, "--output", str(out), "--epochs", "1", "--batch-size", "4"),
                          capture_output=True, text=True, env=env, timeout=280)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not [ln for ln in lines if ln.startswith("error:")], lines
    assert any("skipped 1 unreadable image" in ln and "x\\nerror: OWNED" in ln for ln in lines), lines


def test_workers_refuse_roots_that_hold_secrets(tmp_path):
    """Whatever the roots are, the state folder (secrets.env, stack.json, the stores) and /proc (every
    process's environment) are never beneath one: the worker refuses to start, in one line."""
    state = tmp_path / "home" / ".facenet" / "stack"
    state.mkdir(parents=True)
    for roots, said in ((str(tmp_path / "home"), "holds the stack's state folder"),
                        (str(state / "runs"), "inside the stack's state folder"),
                        ("/", "the whole file system"), ("/proc", "kernel folder")):
        for worker in ("worker-preprocess", "worker-device"):
            proc = subprocess.run([sys.executable, "-m", "services.stack.entrypoints", worker], capture_output=True,
                                  text=True, timeout=60,
                                  env={**os.environ, "FACENET_STATE_DIR": str(state), "FACENET_DATA_ROOTS": roots})
            assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
