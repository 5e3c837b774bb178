"""Face verification (LFW protocol): the numbers against a case worked by hand, pairs files (ours and
LFW's), pairs generated from unseen people, and `facenet-cli evaluate` / `embed` on real photos."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from facenet.errors import UserError
from facenet.evaluate import format_report
from facenet.verification import metrics as vm
from facenet.verification.pairs import find_pairs, format_pairs, generate_pairs, read_pairs


def cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


# ---- the numbers -----------------------------------------------------------------------------------------
def test_protocol_numbers_match_a_case_worked_by_hand():
    # Two folds of 2 same-person and 2 different-person pairs (no distance equals a cut of the other fold).
    d = [0.10, 0.30, 0.25, 0.90, 0.20, 0.60, 0.50, 0.80]
    same = [1, 1, 0, 0, 1, 1, 0, 0]
    folds = [0, 0, 0, 0, 1, 1, 1, 1]
    r = vm.verification_metrics(d, same, folds, far_target=1e-3)
    # Fold 0 is scored at the cut best on fold 1: between 0.20 and 0.50 -> 0.35; 0.10, 0.30 accepted
    # (right), 0.25 accepted (wrong), 0.90 rejected (right): 3/4. Fold 1 at fold 0's best cut, 0.175
    # (between 0.10 and 0.25): 0.20 and 0.60 rejected (wrong), 0.50 and 0.80 rejected (right): 2/4.
    assert r["accuracy"] == pytest.approx(0.625) and r["accuracy_std"] == pytest.approx(0.125)
    assert r["threshold"] == pytest.approx((0.35 + 0.175) / 2)
    # At FAR <= 1e-3 the same cuts have no false accept on the other fold: VAL 2/2 and 0/2, FAR 1/2 and 0/2.
    assert (r["val"], r["val_std"], r["far"]) == pytest.approx((0.5, 0.5, 0.25))
    # AUC = P(same-person distance < different-person distance) = (4 + 4 + 3 + 2) / 16.
    assert r["auc"] == pytest.approx(13 / 16)
    # The ROC passes through (FAR 0.25, TAR 0.75): false accepts = false rejects = 0.25 there.
    assert r["eer"] == pytest.approx(0.25)
    assert (r["pairs"], r["same_pairs"], r["different_pairs"], r["folds"]) == (8, 4, 4, 2)


def test_perfect_and_hopeless_separations():
    rng = np.random.default_rng(0)
    same = np.repeat([True, False], 100)
    folds = np.tile(np.arange(10), 20)
    perfect = vm.verification_metrics(np.where(same, rng.uniform(0, 1, 200), rng.uniform(2, 3, 200)), same, folds)
    assert perfect["accuracy"] == 1.0 and perfect["auc"] == 1.0 and perfect["eer"] == 0.0 and perfect["val"] == 1.0
    noise = vm.verification_metrics(rng.uniform(0, 1, 200), same, folds)
    assert 0.3 < noise["accuracy"] < 0.7 and 0.35 < noise["auc"] < 0.65
    with pytest.raises(ValueError, match="2 folds"):
        vm.verification_metrics([0.1, 0.2], [1, 0], [0, 0])


# ---- pairs -------------------------------------------------------------------------------------------------
def _image(path, value: int = 0) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (32, 32), (value, value, value)).save(path)
    return str(path)


def test_lfw_pairs_file_is_read_as_published(tmp_path):
    # LFW's layout, one person's crops under train/ as our preprocessing writes them, and a .png crop.
    for name, n in (("Ann_Lee", 2), ("Bob_Roy", 2), ("Cy_Po", 1), ("Di_Ma", 1)):
        for k in range(1, n + 1):
            folder = tmp_path / ("train" if name == "Bob_Roy" else "") / name
            _image(folder / f"{name}_{k:04d}.{'png' if name == 'Cy_Po' else 'jpg'}")
    (tmp_path / "pairs.txt").write_text("2\t1\nAnn_Lee\t1\t2\nAnn_Lee\t1\tCy_Po\t1\n"
                                        "Bob_Roy\t1\t2\nBob_Roy\t2\tDi_Ma\t1\n")
    got = find_pairs(str(tmp_path))
    assert [(os.path.relpath(p.a, tmp_path), os.path.relpath(p.b, tmp_path), p.same, p.fold) for p in got.pairs] == [
        ("Ann_Lee/Ann_Lee_0001.jpg", "Ann_Lee/Ann_Lee_0002.jpg", True, 0),
        ("Ann_Lee/Ann_Lee_0001.jpg", "Cy_Po/Cy_Po_0001.png", False, 0),
        ("train/Bob_Roy/Bob_Roy_0001.jpg", "train/Bob_Roy/Bob_Roy_0002.jpg", True, 1),
        ("train/Bob_Roy/Bob_Roy_0002.jpg", "Di_Ma/Di_Ma_0001.jpg", False, 1)]
    assert got.source.startswith(str(tmp_path / "pairs.txt"))
    (tmp_path / "pairs.txt").write_text("1\t1\nAnn_Lee\t1\t3\nAnn_Lee\t1\tCy_Po\t1\n")
    with pytest.raises(UserError, match=r"pairs.txt:2: no image Ann_Lee_0003\.\*"):
        find_pairs(str(tmp_path))
    (tmp_path / "pairs.txt").write_text("3\t1\nAnn_Lee\t1\t2\n")
    with pytest.raises(UserError, match="promises 3 x 2 x 1 pairs, the file has 1 lines"):
        find_pairs(str(tmp_path))


def test_generated_pairs_are_balanced_over_disjoint_people_and_repeatable(tmp_path):
    people = {f"p{i:02d}": [f"/d/p{i:02d}/{k}.jpg" for k in range(5)] for i in range(23)}
    people["lonely"] = ["/d/lonely/0.jpg"]
    pairs = generate_pairs(people, seed=7, max_pairs=400)
    assert pairs == generate_pairs(dict(reversed(list(people.items()))), seed=7, max_pairs=400)
    assert pairs != generate_pairs(people, seed=8, max_pairs=400)
    folds = sorted({p.fold for p in pairs})
    assert folds == list(range(10))
    owner: dict[str, int] = {}
    for p in pairs:
        for img in (p.a, p.b):
            assert owner.setdefault(img.split("/")[2], p.fold) == p.fold  # nobody in two folds
        assert (p.a.split("/")[2] == p.b.split("/")[2]) is p.same and p.a != p.b
    for k in folds:
        in_fold = [p for p in pairs if p.fold == k]
        assert sum(p.same for p in in_fold) == sum(not p.same for p in in_fold) == 20
    assert len({(p.a, p.b) for p in pairs}) == len(pairs)
    # Our file format: the same pairs in any order give the same bytes, and read back as they were.
    text = format_pairs(pairs, "/d")
    assert text == format_pairs(list(reversed(pairs)), "/d") and text.count("\n") == len(pairs) + 1
    for p in pairs:
        _image(tmp_path / os.path.relpath(p.a, "/d"))
        _image(tmp_path / os.path.relpath(p.b, "/d"))
    (tmp_path / "test_pairs.txt").write_text(text)
    back = read_pairs(str(tmp_path / "test_pairs.txt"), str(tmp_path))
    assert sorted((os.path.relpath(p.a, tmp_path), os.path.relpath(p.b, tmp_path), p.same, p.fold) for p in back.pairs) \
        == sorted((os.path.relpath(p.a, "/d"), os.path.relpath(p.b, "/d"), p.same, p.fold) for p in pairs)
    assert generate_pairs({"a": ["x", "y"], "b": ["z"], "c": ["w"]}) == []  # 3 people: no two folds


def test_preprocessing_pairs_people_it_never_trains_on(orl_faces):
    manifest = json.load(open(os.path.join(orl_faces, "manifest.json")))
    assert manifest["splits"]["train"] == {"identities": 30, "images": 300, "faces": 300, "rejects": 0}
    assert manifest["splits"]["test"] == {"identities": 10, "images": 100, "faces": 100, "rejects": 0}
    pairs = read_pairs(os.path.join(orl_faces, "test_pairs.txt"), orl_faces)
    assert manifest["lists"]["test_pairs"] == len(pairs.pairs) > 0
    people = pairs.people()
    listed = {line.split()[0].split("/")[1] for name in ("train_list.txt", "test_list.txt")
              for line in open(os.path.join(orl_faces, name))}
    assert len(people) == 10 and len(listed) == 30 and not people & listed
    assert all(p.a.startswith(os.path.join(orl_faces, "test") + os.sep) for p in pairs.pairs)
    assert sum(p.same for p in pairs.pairs) * 2 == len(pairs.pairs)


def test_identity_batches_hold_several_people_and_read_every_image():
    from facenet.data.loader import IdentityBatchSampler

    # 4 people x 32 (the sample split), 5 x 7 and one person with 1 image, 10 + 3 (fewer people than P).
    for labels in ([i // 32 for i in range(128)], [i // 7 for i in range(35)] + [5], [0] * 10 + [1] * 3):
        for world in (1, 2):
            read = set()
            lengths = set()
            for rank in range(world):
                sampler = IdentityBatchSampler(labels, rank, world, batch_size=16, per_identity=4, seed=1)
                for epoch in range(3):
                    sampler.set_epoch(epoch)
                    order = list(sampler)
                    lengths.add(len(order))
                    assert len(order) == len(sampler) and len(order) % 16 == 0
                    for b in range(0, len(order), 16):
                        people = [labels[i] for i in order[b:b + 16]]
                        assert all(len(set(people[g:g + 4])) == 1 for g in range(0, 16, 4))  # K of one person
                        assert len(set(people)) >= 2, people  # and never one person alone
                    if epoch == 0:
                        read.update(order)
            assert read == set(range(len(labels))) and len(lengths) == 1  # every image; equal steps on all ranks


def test_identity_batches_keep_their_guarantees_at_scale():
    """~120,000 images of 6,008 people (1 to 39 each, the long tail VGGFace2 has, and 8 with 400), 2 ranks,
    P 16 x K 4: every batch holds P different people until fewer than P have groups left (and from then on
    only the last batches do), people run out together (the epoch has the fewest batches any dealing can
    have: max(most groups of one person, all groups / P)), every image is read each epoch, both ranks take
    the same number of steps. The old dealing sorted every person for every batch; its time, and this
    one's, belong in `make bench-scale`."""
    import random

    from facenet.data.loader import IdentityBatchSampler

    rng = random.Random(5)
    counts = [rng.choice([1, 2, 5, 20, 39]) for _ in range(6000)] + [400] * 8
    labels = [person for person, n in enumerate(counts) for _ in range(n)]
    rng.shuffle(labels)
    p, k = 16, 4
    groups = [-(-n // k) for n in counts]
    orders = []
    for rank in range(2):
        sampler = IdentityBatchSampler(labels, rank, 2, batch_size=p * k, per_identity=k, seed=3)
        sampler.set_epoch(1)
        assert len(sampler._batches()) == max(max(groups), -(-sum(groups) // p))
        orders.append(list(sampler))
        assert len(orders[-1]) == len(sampler)
    assert len(orders[0]) == len(orders[1]) and len(orders[0]) % (p * k) == 0
    assert set(orders[0]) | set(orders[1]) == set(range(len(labels)))
    for order in orders:
        people = [len({labels[i] for i in order[b:b + p * k]}) for b in range(0, len(order), p * k)]
        short = [n < p for n in people]
        # after the first batch of fewer than P people only such batches, and the last round's wrap-around
        # fill (a repeat of a full first batch)
        tail = short[short.index(True):] if True in short else []
        assert all(tail[:-1]), people[-12:]


# ---- facenet-cli evaluate / embed ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def untrained_model(tmp_path_factory) -> str:
    """A model file as training writes it (state dict, classes, spec), untrained: seeded random weights."""
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("model") / "model.pt")
    net = InceptionResnetV1(classify=True, num_classes=30)
    torch.save({"model": net.state_dict(), "classes": [f"s{k}" for k in range(1, 31)],
                "spec": {"image_size": 96}, "epoch": 0, "mlflow_run_id": None}, path)
    return path


def test_evaluate_reports_the_protocol_and_draws_the_roc(untrained_model, orl_faces, tmp_path):
    png = tmp_path / "roc.png"
    res = cli("evaluate", "--model", untrained_model, "--data", orl_faces, "--device", "cpu", "--plot", str(png),
              "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert report["pairs_source"].startswith(os.path.join(orl_faces, "test_pairs.txt"))
    assert report["identities"] == 10 and report["identities_seen_in_training"] == 0
    assert report["pairs"] == json.load(open(os.path.join(orl_faces, "manifest.json")))["lists"]["test_pairs"]
    assert report["folds"] >= 2 and 0.0 <= report["eer"] <= 1.0 and 0.5 <= report["accuracy"] <= 1.0
    assert report["roc_png"] == str(png) and report["logged_to_mlflow"] is None  # a file naming no run
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (600, 600)
    text = cli("evaluate", "--model", untrained_model, "--data", orl_faces, "--device", "cpu", "--distance", "cosine",
               "--flip")
    assert text.returncode == 0, text.stderr[-2000:]
    assert "none of them seen in training" in text.stdout and "cosine distance, flipped images added" in text.stdout
    assert "VAL@FAR=0.001" in text.stdout and "ROC AUC" in text.stdout
    # A plain folder of identity folders, no pairs file: pairs generated from all of it, and said so.
    plain = cli("evaluate", "--model", untrained_model, "--data", os.path.join(orl_faces, "test"), "--device", "cpu",
                "--json", "--no-log")
    assert plain.returncode == 0, plain.stderr[-2000:]
    generated = json.loads(plain.stdout)
    assert generated["pairs_source"].endswith(f"from the 10 identity folders of {os.path.join(orl_faces, 'test')}")
    assert generated["pairs_source"].startswith(f"{generated['pairs']} pairs generated (seed 0, 5 folds)")


def test_evaluate_refuses_bad_input_in_one_line(untrained_model, orl_faces, tmp_path):
    two = tmp_path / "two_people"
    for person in ("a", "b"):
        for k in range(3):
            _image(two / person / f"{k}.jpg", 40 * k)
    missing = tmp_path / "missing_pairs.txt"
    missing.write_text("# facenet-stack pairs v1: <path a> <path b> <1 same | 0 different> <fold>\n"
                       "test/s31/01.png test/s31/99.png 1 0\n")
    one_fold = tmp_path / "one_fold.txt"
    one_fold.write_text("# facenet-stack pairs v1: <path a> <path b> <1 same | 0 different> <fold>\n"
                        "test/s31/01.png test/s31/02.png 1 0\ntest/s31/01.png test/s32/01.png 0 0\n")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    cases = [
        (["--model", str(tmp_path / "nope.pt"), "--data", orl_faces], "--model", "no such file or folder"),
        (["--model", str(junk), "--data", orl_faces], "--model", "cannot read it as tensors"),
        (["--model", str(tmp_path), "--data", orl_faces], "--model", "no model.pt or checkpoint.pt"),
        (["--model", untrained_model, "--data", str(two)], "--data", "no verification pairs"),
        (["--model", untrained_model, "--data", orl_faces, "--pairs", str(missing)], "--pairs",
         "test/s31/99.png does not exist"),
        (["--model", untrained_model, "--data", orl_faces, "--pairs", str(one_fold)], "--pairs",
         "every pair is in one fold"),
        (["--model", untrained_model, "--data", str(tmp_path / "nowhere")], "--data", "no such directory"),
        (["--model", "runs:/abc/model", "--data", orl_faces], "--model", "runs:/<32-hex run id>/model"),
    ]
    for args, names, says in cases:
        res = cli("evaluate", *args, "--device", "cpu")
        lines = res.stderr.strip().splitlines()
        assert res.returncode != 0 and len(lines) == 1, (args, res.stderr)
        assert names in lines[0] and says in lines[0] and "Traceback" not in res.stderr, (args, lines)


def test_embed_writes_npz_and_parquet(untrained_model, orl_faces, tmp_path):
    import pyarrow.parquet as pq

    folder = os.path.join(orl_faces, "test")
    (tmp_path / "bad").mkdir()
    out_npz, out_pq = tmp_path / "e.npz", tmp_path / "e.parquet"
    res = cli("embed", "--model", untrained_model, folder, str(out_npz), "--device", "cpu", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["images"] == 100 and summary["dim"] == 512 and summary["unreadable"] == []
    data = np.load(out_npz)
    assert data["embeddings"].shape == (100, 512) and len(data["paths"]) == 100
    assert str(data["paths"][0]) == "s31/01.png"
    assert np.allclose(np.linalg.norm(data["embeddings"], axis=1), 1.0, atol=1e-4)
    assert cli("embed", "--model", untrained_model, folder, str(out_pq), "--device", "cpu").returncode == 0
    table = pq.read_table(out_pq)
    assert table.column("path").to_pylist() == [str(p) for p in data["paths"]]
    assert np.allclose(np.array(table.column("embedding").to_pylist()), data["embeddings"], atol=1e-6)
    assert json.loads(table.schema.metadata[b"facenet"])["image_size"] == 96
    bad = cli("embed", "--model", untrained_model, folder, str(tmp_path / "e.csv"))
    assert bad.returncode != 0 and "name it .npz or .parquet" in bad.stderr


# ---- insightface .bin verification sets ------------------------------------------------------------------------
def _python2_bin(bins: list[bytes], issame: list[bool]) -> bytes:
    """A .bin as insightface's Python 2 tooling wrote lfw.bin: protocol 2, each image a (SHORT_)BINSTRING,
    the flags NEWTRUE/NEWFALSE, a TUPLE2 of the two lists."""
    import struct

    out = bytearray(b"\x80\x02]q\x00(")  # PROTO 2, EMPTY_LIST, BINPUT, MARK
    for b in bins:
        out += (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b
    out += b"e](" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e\x86."  # APPENDS, TUPLE2, STOP
    return bytes(out)


@pytest.fixture(scope="module")
def orl_pairs_as_bins(orl_faces, tmp_path_factory):
    """ORL's unseen people's pairs as .bin files in the formats such files come in, pairs ordered by fold: lfw.bin
    as insightface's published sets (Python 2, byte strings), agedb_30.bin with a numpy bool array, cfp_fp.bin as
    insightface's build_eval_pack.py writes one (each image cv2.imencode's uint8 (n, 1) array, HIGHEST_PROTOCOL;
    tests/test_insightface.py cites it)."""
    import pickle

    pairs = read_pairs(os.path.join(orl_faces, "test_pairs.txt"), orl_faces)
    ordered = sorted(pairs.pairs, key=lambda p: p.fold)
    bins = [open(path, "rb").read() for p in ordered for path in (p.a, p.b)]
    issame = [p.same for p in ordered]
    folder = tmp_path_factory.mktemp("bins")
    (folder / "lfw.bin").write_bytes(_python2_bin(bins, issame))
    (folder / "agedb_30.bin").write_bytes(pickle.dumps((bins, np.array(issame)), protocol=4))
    imencoded = [np.frombuffer(b, np.uint8).reshape(-1, 1).copy() for b in bins]
    (folder / "cfp_fp.bin").write_bytes(pickle.dumps((imencoded, issame), protocol=pickle.HIGHEST_PROTOCOL))
    return folder, len(issame)


def test_evaluate_scores_insightface_bins_as_the_folder(untrained_model, orl_faces, orl_pairs_as_bins):
    folder, n = orl_pairs_as_bins
    res = cli("evaluate", "--model", untrained_model, "--bin", str(folder / "lfw.bin"), "--bin",
              str(folder / "agedb_30.bin"), "--bin", str(folder / "cfp_fp.bin"), "--device", "cpu", "--json", "--no-log")
    assert res.returncode == 0, res.stderr[-2000:]
    lfw, agedb, cfp = json.loads(res.stdout)
    ours = json.loads(cli("evaluate", "--model", untrained_model, "--data", orl_faces, "--device", "cpu", "--json",
                          "--no-log").stdout)
    for report, name in ((lfw, "lfw"), (agedb, "agedb_30"), (cfp, "cfp_fp")):
        assert report["set"] == name and report["pairs"] == n == ours["pairs"] and report["folds"] == 10
        assert report["identities"] is None and report["pairs_source"].startswith(f"{name}.bin ({n} pairs")
        assert report["auc"] == pytest.approx(ours["auc"], abs=1e-6)  # the same bytes, the same embeddings
        assert report["images"] == ours["images"] == 100 < 2 * n  # each distinct image embedded once
        assert 0 <= report["accuracy_insightface"] <= 1 and len(report["thresholds_insightface"]) == 10
    assert lfw["accuracy"] == agedb["accuracy"] == cfp["accuracy"]
    assert lfw["accuracy_insightface"] == agedb["accuracy_insightface"] == cfp["accuracy_insightface"]
    assert "accuracy_insightface" not in ours  # our own folds: insightface's procedure does not apply
    assert f"  insightface   {cfp['accuracy_insightface']:.4f} +- " in format_report(cfp)  # what the text prints
    flipped = json.loads(cli("evaluate", "--model", untrained_model, "--bin", str(folder / "lfw.bin"), "--flip",
                             "--device", "cpu", "--json", "--no-log").stdout)
    assert flipped["flip"] and flipped["auc"] != lfw["auc"]


def test_a_bin_that_is_not_a_verification_set_is_refused_without_running_it(untrained_model, tmp_path):
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    cases = {"payload.bin": pickle.dumps(([b"a", b"b"], Payload()), protocol=2),
             "eval.bin": pickle.dumps(([b"a", b"b"], [True]), protocol=2)
             .replace(b"\x80\x02", b"\x80\x02cbuiltins\neval\n(X\x01\x00\x00\x001tR0", 1),
             "ints.bin": pickle.dumps(([b"a", b"b"], np.array([1])), protocol=4),
             "odd.bin": pickle.dumps(([b"a", b"b", b"c"], [True]), protocol=4),
             "text.bin": b"not a pickle at all"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        res = cli("evaluate", "--model", untrained_model, "--bin", str(tmp_path / name), "--device", "cpu")
        assert res.returncode != 0 and "Traceback" not in res.stderr, name
        assert f"--bin {tmp_path / name}:" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "names posix.system" in cli("evaluate", "--model", untrained_model, "--bin", str(tmp_path / "payload.bin"),
                                       "--device", "cpu").stderr
    assert not marker.exists()


def test_training_verifies_on_bins_beside_its_pairs(orl_faces, orl_pairs_as_bins, tmp_path):
    """--verify-bin: each set's numbers every epoch beside verify_acc; the same pairs as a .bin give the same AUC."""
    from conftest import read_events, run_train

    folder, n = orl_pairs_as_bins
    out = tmp_path / "run"
    r = run_train("--data", orl_faces, "--output", str(out), "--epochs", "1", "--batch-size", "32", "--image-size",
                  "96", "--verify-bin", f"{folder / 'lfw.bin'},{folder / 'agedb_30.bin'}", "--json-out",
                  str(tmp_path / "summary.json"), env={"MLFLOW_TRACKING_URI": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"verification on lfw.bin ({n} pairs" in r.stdout + r.stderr
    records = [e for e in read_events(out / "events.jsonl") if e["event"] in ("verify", "epoch")]
    assert [e["epoch"] for e in records] == [0, 1]
    for e in records:
        assert e["lfw_pairs"] == e["agedb_30_pairs"] == e["verify_pairs"] == n
        assert e["lfw_auc"] == pytest.approx(e["auc"], abs=1e-6) and e["agedb_30_auc"] == pytest.approx(e["auc"], abs=1e-6)
        assert 0 <= e["lfw_verify_acc_insightface"] <= 1 and "verify_acc_insightface" not in e
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["lfw_verify_acc"] == records[-1]["lfw_verify_acc"]
    assert summary["agedb_30_verify_acc_insightface"] == records[-1]["agedb_30_verify_acc_insightface"]
    bad = run_train("--data", orl_faces, "--output", str(tmp_path / "bad"), "--epochs", "1", "--verify-bin",
                    str(tmp_path / "nothere.bin"))
    assert bad.returncode != 0 and f"--verify-bin {tmp_path / 'nothere.bin'}: no such file" in bad.stderr
    assert "Traceback" not in bad.stderr
