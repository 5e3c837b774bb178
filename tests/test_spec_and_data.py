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


def test_identity_batches_hold_min_p_people_for_any_labels():
    """Property test over seeded label sets (1-10 people of 1-60 photos, P from 2, K from 2, 1-3 ranks): every
    batch is P groups of K images of one person each, holding min(P, people) different people (a short last
    batch is filled with people not already in it); every image is read each epoch, every rank takes the same
    number of steps every epoch, and the epoch has the fewest batches a dealing can have. The triplet loss of
    every batch is finite (issue 33: [0]*6 + [1]*4, P 2, K 2 dealt a batch of one person, and the loss raised)."""
    import random

    import torch

    from facenet.data.loader import IdentityBatchSampler
    from facenet.train.losses import Triplet

    triplet = Triplet(0.2)
    cases = [([0] * 6 + [1] * 4, 2, 2, 1)]
    rng = random.Random(33)
    for _ in range(300):
        counts = [rng.randint(1, 60) for _ in range(rng.randint(1, 10))]
        labels = [person for person, n in enumerate(counts) for _ in range(n)]
        rng.shuffle(labels)
        cases.append((labels, rng.randint(2, 6), rng.randint(2, 5), rng.randint(1, 3)))
    for labels, p, k, world in cases:
        people = len(set(labels))
        groups = [-(-labels.count(person) // k) for person in set(labels)]
        for epoch in (0, 1):
            orders = []
            for rank in range(world):
                sampler = IdentityBatchSampler(labels, rank, world, batch_size=p * k, per_identity=k, seed=epoch)
                sampler.set_epoch(epoch)
                if rank == 0:
                    assert len(sampler._batches()) == max(max(groups), -(-sum(groups) // p)), (labels, p, k)
                order = list(sampler)
                assert len(order) == len(sampler) and len(order) % (p * k) == 0
                orders.append(order)
                for b in range(0, len(order), p * k):
                    batch = [labels[i] for i in order[b:b + p * k]]
                    assert all(len(set(batch[g:g + k])) == 1 for g in range(0, p * k, k)), (batch, p, k)
                    assert len(set(batch)) == min(p, people), (sorted(labels), p, k, world, batch)
                    if rank == 0 and b == len(order) - p * k:  # the last batch: the short one, when there is one
                        loss, _ = triplet.loss(torch.nn.functional.normalize(torch.randn(len(batch), 8), dim=1),
                                               torch.tensor(batch))
                        assert torch.isfinite(loss), batch
            assert len({len(o) for o in orders}) == 1, "every rank takes the same steps"
            assert set().union(*orders) == set(range(len(labels))), "every image each epoch"


def test_augmented_batches_depend_on_the_epoch_not_on_workers_or_resume(small_faces):
    """The training loader with --augment feeds the same bytes with 0 or 2 workers, and a fresh loader started at
    epoch 1 (a resumed run's) feeds what a loader that ran epoch 0 first feeds in epoch 1; the augmentation does
    change from epoch to epoch."""
    import torch

    from facenet.data.loader import train_loader

    split = load_dataset(small_faces)
    fed = {}
    for workers in (0, 2):
        for start in (0, 1):
            dl = train_loader(split.train, 8, 0, 1, 7, workers, 80, True, False)
            for epoch in range(start, 2):
                dl.sampler.set_epoch(epoch)
                fed[workers, start, epoch] = [(b.images, b.fed) for b in dl]
    want = fed[0, 0, 1]
    for got in (fed[2, 0, 1], fed[0, 1, 1], fed[2, 1, 1]):
        assert [p for _, p in got] == [p for _, p in want]
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, want))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(fed[2, 0, 0], fed[0, 0, 0]))
    first = {p: img for images, paths in fed[0, 0, 0] for p, img in zip(paths, images)}
    second = {p: img for images, paths in want for p, img in zip(paths, images)}
    assert sum(not torch.equal(first[p], second[p]) for p in first) > len(first) // 2
