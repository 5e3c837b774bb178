"""Fast checks of the spec and the dataset contract (no training)."""

from __future__ import annotations

import json
import os

import pytest

from facenet.data.dataset import load_dataset
from facenet.errors import UserError
from facenet.spec import TrainSpec
from facenet.train.options import spec_from_args


def test_spec_round_trips_json_and_rejects_unknown_keys(tmp_path):
    spec = spec_from_args(["--data", str(tmp_path), "--npus", "2", "--batch-size", "64", "--amp_cfg",
                           "--opt_level", "O1", "--loss_scale_value", "1024", "--device_list", "2,3",
                           "--tag", "job_id=abc"])
    again = TrainSpec.from_json(spec.to_json())
    assert again == spec
    assert again.amp and again.opt_level == "O1" and again.loss_scale == "1024" and again.device_list == [2, 3]
    bad = json.loads(spec.to_json()) | {"epoch_count": 3}
    with pytest.raises(UserError, match="unknown training option.*epoch_count"):
        TrainSpec.from_dict(bad)


def test_seed_spellings_are_aliases(tmp_path):
    spec = spec_from_args(["--data_path", str(tmp_path), "--batch_size", "512", "--epoch", "1", "--lr", "0.001",
                           "--device_num", "1"])
    assert (spec.data, spec.batch_size, spec.epochs, spec.lr) == (str(tmp_path), 512, 1, 0.001)
    assert TrainSpec(data="x").lr == 0.01  # the seed README's default


@pytest.mark.parametrize("args, message", [
    (["--device-list", "0,1", "--npus", "3", "--batch-size", "3"], "names 2 device"),
    (["--lr-steps", "10,5"], "increasing"),
    (["--epochs", "0"], "--epochs 0"),
    (["--holdout", "1.5"], "--holdout 1.5"),
])
def test_bad_values_name_the_flag(tmp_path, args, message):
    with pytest.raises(UserError, match=message):
        spec_from_args(["--data", str(tmp_path), *args])


def _touch_images(root, layout):
    for rel in layout:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()


def test_folder_split_is_seeded_per_identity_and_stable(tmp_path):
    _touch_images(tmp_path, [f"id{i}/{j:02d}.jpg" for i in range(3) for j in range(10)])
    a = load_dataset(str(tmp_path), holdout=0.2, seed=1)
    b = load_dataset(str(tmp_path), holdout=0.2, seed=1)
    c = load_dataset(str(tmp_path), holdout=0.2, seed=2)
    assert a.test == b.test and a.test != c.test
    assert len(a.train) == 24 and len(a.test) == 6 and a.classes == ["id0", "id1", "id2"]
    assert not {p for p, _ in a.train} & {p for p, _ in a.test}
    # adding an identity leaves the others' split alone
    _touch_images(tmp_path, [f"id9/{j:02d}.jpg" for j in range(10)])
    d = load_dataset(str(tmp_path), holdout=0.2, seed=1)
    assert [s for s in d.test if "id9" not in s[0]] == a.test


def test_seed_tree_without_lists_uses_train_folder(tmp_path):
    _touch_images(tmp_path, [f"train/n00000{i}/{j}.jpg" for i in range(2) for j in range(5)] + ["test/n000009/0.jpg"])
    split = load_dataset(str(tmp_path))
    assert split.classes == ["n000000", "n000001"] and split.layout == "folders"


def test_list_files_are_parsed_and_checked(tmp_path):
    _touch_images(tmp_path, ["train/a/1.jpg", "train/a/2.jpg", "train/b/1.jpg", "train/b/2.jpg"])
    (tmp_path / "train_list.txt").write_text("# comment\ntrain/a/1.jpg 0\n\ntrain/b/1.jpg 1\n")
    (tmp_path / "test_list.txt").write_text("train/a/2.jpg 0\ntrain/b/2.jpg 1\n")
    split = load_dataset(str(tmp_path))
    assert split.layout == "lists" and split.classes == ["a", "b"]
    assert split.test == [(str(tmp_path / "train/a/2.jpg"), 0), (str(tmp_path / "train/b/2.jpg"), 1)]
    assert split.manifest_hash.startswith("lists-sha256:")
    (tmp_path / "test_list.txt").write_text("train/a/2.jpg 0\ntrain/b/2.jpg 5\n")
    with pytest.raises(UserError, match="class indices must be 0..5"):
        load_dataset(str(tmp_path))
    (tmp_path / "test_list.txt").write_text("/etc/passwd 0\n")
    with pytest.raises(UserError, match="must be relative to the dataset root"):
        load_dataset(str(tmp_path))
    os.remove(tmp_path / "test_list.txt")
    with pytest.raises(UserError, match="test_list.txt: missing"):
        load_dataset(str(tmp_path))


def test_one_identity_is_refused(tmp_path):
    _touch_images(tmp_path, ["only/1.jpg", "only/2.jpg"])
    with pytest.raises(UserError, match="needs at least 2"):
        load_dataset(str(tmp_path))


def test_train_sampler_covers_every_image_in_whole_batches():
    from facenet.data.loader import TrainSampler

    n, world, batch = 45, 2, 8  # 45 images -> 3 global batches of 16 = 48 slots, 3 read twice
    shards = [list(TrainSampler(n, r, world, batch, seed=7)) for r in range(world)]
    assert [len(s) for s in shards] == [24, 24]
    both = shards[0] + shards[1]
    assert set(both) == set(range(n)) and len(both) - len(set(both)) == 3
    again = TrainSampler(n, 0, world, batch, seed=7)
    assert list(again) == shards[0]
    again.set_epoch(1)
    assert list(again) != shards[0]


def test_quoted_text_is_one_short_line():
    """errors.clipped / first_line, which every message quoting outside text goes through: control characters
    escaped, long text cut with a mark, an exception without text named by its type."""
    from facenet.errors import clipped, first_line

    assert clipped("a\nb") == "a\\nb" and clipped("x" * 100, 10) == "xxxxxxx..." and clipped("short") == "short"
    assert first_line(ValueError("")) == "ValueError" and first_line(OSError("one\ntwo")) == "one"
    assert len(first_line(RuntimeError("y" * 500), 120)) == 120
