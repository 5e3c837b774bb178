"""VGGFace2 scale (issue 25): finalize streams its records to the same bytes, packs round-trip, the packed loader
feeds what the folder loader feeds. Timing at scale lives in `make bench-scale`, not here."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

from conftest import REPO, TEST_IMAGE_SIZE, read_json, run_train

FIXTURES = os.path.join(REPO, "tests", "fixtures", "finalize_v1")


def test_finalize_writes_the_bytes_it_wrote_before_it_streamed(tmp_path):
    from finalize_tree import OUTPUTS, build

    from facenet.preprocess.finalize import finalize
    from facenet.preprocess.plan import load_plan, save_plan

    plan = build(str(tmp_path / "out"))
    save_plan(plan)
    finalize(load_plan(plan.out))  # as the queue's finalize runs it: the header only, no items in memory
    for name in OUTPUTS:
        golden = open(os.path.join(FIXTURES, name), "rb").read()
        if name == "test_pairs.txt" or name == "manifest.json":  # they quote OUT, which is this test's folder
            golden = golden.replace(b"/tmp/goldout", str(tmp_path / "out").encode())
        assert (tmp_path / "out" / name).read_bytes() == golden, name


def test_finalize_names_the_first_unfinished_shard_and_writes_nothing(tmp_path):
    from finalize_tree import build

    from facenet.errors import UserError
    from facenet.preprocess.finalize import finalize
    from facenet.preprocess.shard import shard_record_path

    plan = build(str(tmp_path / "out"))
    os.remove(shard_record_path(plan, 3))
    with pytest.raises(UserError, match=r"1 of \d+ shards are not finished \(first: 3\)"):
        finalize(plan)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_plan_is_read_shard_by_shard_under_its_id(tmp_path):
    """A worker holds the plan's header only; each shard's items come from the items file, the same items
    and the same id as the planner's plan."""
    from finalize_tree import build

    from facenet.preprocess.plan import load_plan, save_plan

    plan = build(str(tmp_path / "out"))
    save_plan(plan)
    loaded = load_plan(plan.out)
    assert loaded.items is None and loaded.plan_id == plan.plan_id and loaded.count == plan.count
    assert [loaded.shard_items(i) for i in range(loaded.num_shards)] == \
        [plan.shard_items(i) for i in range(plan.num_shards)]
    header = (tmp_path / "out" / ".preprocess" / "plan.json").stat().st_size
    assert header < 4096  # no item in it
    import dataclasses

    fewer = dataclasses.replace(plan, items=plan.items[:-1])  # a re-plan of other items: its own items file
    save_plan(fewer)
    assert sorted(p.name for p in (tmp_path / "out" / ".preprocess").glob("plan-*.items")) == [fewer.items_name]
    assert fewer.plan_id != plan.plan_id and load_plan(plan.out).plan_id == fewer.plan_id


@pytest.fixture(scope="module")
def packed_orl(orl_faces, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pack") / "orl.pack")
    r = subprocess.run([sys.executable, "-m", "services.cli", "pack", out, "--data", orl_faces,
                        "--shard-bytes", str(1 << 20), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_a_pack_round_trips_every_crop_byte_for_byte(orl_faces, packed_orl):
    from facenet.data.dataset import load_dataset

    out, summary = packed_orl
    source = load_dataset(orl_faces)
    assert summary["shards"] > 1 and summary["unreadable"] == 0 and not summary["skipped"]
    assert (summary["train"], summary["test"]) == (len(source.train), len(source.test)) and summary["pairs"] > 0
    header = read_json(os.path.join(out, "pack.json"))
    members = {}
    for shard in header["shards"]:
        path = os.path.join(out, shard["name"])
        assert hashlib.sha256(open(path, "rb").read()).hexdigest() == shard["sha256"]
        with tarfile.open(path) as tar:  # a plain tar: any tar reader gives the tree back
            for member in tar:
                members[member.name] = tar.extractfile(member).read()
    pairs_images = (open(os.path.join(out, "pair_images.txt")).read().split("\n"))[:-1]
    expected = [os.path.relpath(p, orl_faces) for p, _ in list(source.train) + list(source.test)] + pairs_images
    assert sorted(members) == sorted(set(expected))
    for rel, data in members.items():
        assert data == open(os.path.join(orl_faces, rel), "rb").read(), rel
    packed = load_dataset(out)
    assert packed.layout == "packed" and packed.classes == source.classes
    assert packed.manifest_hash == source.manifest_hash  # the same data: a run resumes across folder and pack
    for mine, theirs in ((packed.train, source.train), (packed.test, source.test)):
        assert [(os.path.relpath(p, out), y) for p, y in mine] == [(os.path.relpath(p, orl_faces), y) for p, y in theirs]
        assert all(mine.reader.read(k, p, None, 1 << 25) == open(q, "rb").read()
                   for k, ((p, _), (q, _)) in enumerate(zip(mine, theirs)))
    again = subprocess.run([sys.executable, "-m", "services.cli", "pack", out, "--data", orl_faces, "--json"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout)["skipped"]


@pytest.mark.parametrize("sampler", ["shuffle", "identities"])
def test_the_packed_loader_feeds_each_rank_what_the_folder_loader_feeds(orl_faces, packed_orl, sampler):
    from facenet.data import loader
    from facenet.data.dataset import load_dataset

    out, _ = packed_orl
    folder, packed = load_dataset(orl_faces), load_dataset(out)
    for rank in (0, 1):
        fed = []
        for split, root in ((folder, orl_faces), (packed, out)):
            if sampler == "shuffle":
                dl = loader.train_loader(split.train, 16, rank, 2, 7, 0, 96, False, False)
            else:
                dl = loader.identity_loader(split.train, 16, 4, rank, 2, 7, 0, 96, False, False)
            dl.sampler.set_epoch(1) if hasattr(dl.sampler, "set_epoch") else dl.batch_sampler.sampler.set_epoch(1)
            fed.append([(b.images, b.labels, [os.path.relpath(p, root) for p in b.fed]) for b in dl])
        assert len(fed[0]) == len(fed[1]) > 0
        for (xa, ya, pa), (xb, yb, pb) in zip(*fed):
            assert pa == pb and torch.equal(ya, yb) and torch.equal(xa, xb)


def test_a_changed_shard_byte_is_a_named_bad_image_not_a_wrong_one(packed_orl, tmp_path):
    from facenet.data.dataset import load_dataset
    from facenet.data.loader import FaceImages

    out = str(tmp_path / "copy")
    shutil.copytree(packed_orl[0], out)
    split = load_dataset(out)
    reader = split.train.reader
    shard = os.path.join(out, reader.shards[int(reader.shard[0])])
    with open(shard, "r+b") as fh:
        fh.seek(int(reader.offset[0]) + 100)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    images = FaceImages(split.train, 96, replace_bad=True)
    img, label, bad, fed = images[0]
    assert bad == [split.train[0][0]] and fed == split.train[1][0] and img is not None
    with pytest.raises(ValueError, match="do not match the pack's sha256"):
        reader.read(0, split.train[0][0], None, 1 << 25)


def test_pack_refuses_a_folder_that_holds_other_files(orl_faces, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    r = subprocess.run([sys.executable, "-m", "services.cli", "pack", str(tmp_path / "busy"), "--data", orl_faces],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "notes.txt" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_training_on_a_pack_verifies_on_its_pairs(orl_faces, packed_orl, tmp_path):
    out, summary = packed_orl
    r = run_train("--data", out, "--output", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "32",
                  *TEST_IMAGE_SIZE, "--json-out", str(tmp_path / "summary.json"), env={"MLFLOW_TRACKING_URI": ""})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    said = r.stdout + r.stderr
    assert f"packed dataset at {out}: {summary['classes']} identities, {summary['train']} training images" in said
    assert "verification every 1 epoch(s)" in said
    result = read_json(tmp_path / "summary.json")
    assert result["bad_images"] == 0 and result["acc1"] is not None and 0 <= result["verify_acc"] <= 1
    reports = []
    for data in (out, orl_faces):  # evaluate reads the pack's pairs from its shards: the folder's numbers
        e = subprocess.run([sys.executable, "-m", "services.cli", "evaluate", "--model", str(tmp_path / "run"),
                            "--data", data, "--device", "cpu", "--no-log", "--json"],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
        assert e.returncode == 0, e.stderr[-2000:]
        reports.append(json.loads(e.stdout))
    for key in ("accuracy", "auc", "pairs", "images"):
        assert reports[0][key] == reports[1][key], key


def test_the_pack_benchmark_reads_both_ways(tmp_path):
    out = tmp_path / "bench_pack.json"
    r = subprocess.run([sys.executable, "-m", "facenet.bench.pack_bench", "--images", "300", "--repeats", "1",
                        "--work", str(tmp_path / "w"), "--out", str(out)], capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    report = read_json(out)
    assert report["train_images"] == 240 and report["pack"]["shards"] == 1
    for row in report["passes"].values():
        assert row["files"] > 0 and row["packed"] > 0 and row["packed_vs_files"] == round(row["packed"] / row["files"], 3)
