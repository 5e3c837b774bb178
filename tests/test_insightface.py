"""insightface compatibility: the .bin files its own tools write are read (safely), and a .bin's accuracy is also
computed exactly as its arcface_torch scores it, held against a transcription of that code."""

from __future__ import annotations

import codecs
import io
import pickle

import numpy as np
import pytest
from PIL import Image

from facenet.errors import UserError
from facenet.evaluate import format_report, logged_metrics, score_pairs
from facenet.verification import metrics as vm
from facenet.verification.binset import bin_pairs, read_bin


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


def _imencoded(jpeg: bytes, column: bool) -> np.ndarray:
    """What `_, s = cv2.imencode('.jpg', im)` gives: an owned, writable uint8 array of the file's bytes, (n,) from
    opencv-python 3.4.18, 4.5.5, 4.10 and 5.1 (their pickles are byte for byte this array's), (n, 1) from the
    older releases insightface's tools were written with."""
    array = np.frombuffer(jpeg, np.uint8).copy()
    return array.reshape(-1, 1) if column else array


def _write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


# ---- item: .bin files as insightface's build_eval_pack.py writes them ------------------------------------------
# deepinsight/insightface@7fadd420c2351d0ffa8cac403421c1a3ed733365:recognition/arcface_mxnet/common/build_eval_pack.py
# L127-136: issame_list.append(True/False); `_, s = cv2.imencode('.jpg', im); bins.append(s)`;
# pickle.dump((bins, issame_list), f, protocol=pickle.HIGHEST_PROTOCOL).

# That script under Python 2.7.18 with numpy 1.16.6 (HIGHEST_PROTOCOL 2), for two (8, 1) uint8 arrays b'\xff\xd8\xff\xe0 one'
# and b'\xff\xd8\xff\xe0 two' and issame [True]: its bytes as that interpreter wrote them.
PYTHON2_NUMPY_BIN = (
    b"\x80\x02]q\x00(cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85q\x03U\x01bq\x04\x87q\x05"
    b"Rq\x06(K\x01K\x08K\x01\x86q\x07cnumpy\ndtype\nq\x08U\x02u1q\tK\x00K\x01\x87q\nRq\x0b(K\x03U\x01|q\x0cNNNJ\xff\xff"
    b"\xff\xffJ\xff\xff\xff\xffK\x00tq\rb\x89U\x08\xff\xd8\xff\xe0 oneq\x0etq\x0fbh\x01h\x02K\x00\x85q\x10h\x04\x87q\x11"
    b"Rq\x12(K\x01K\x08K\x01\x86q\x13h\x0b\x89U\x08\xff\xd8\xff\xe0 twoq\x14tq\x15be]q\x16\x88a\x86q\x17.")


@pytest.mark.parametrize("column", [True, False], ids=["n_by_1", "1d"])
@pytest.mark.parametrize("protocol", [pickle.HIGHEST_PROTOCOL, 4, 2])
def test_a_bin_of_imencoded_arrays_is_read_as_their_image_bytes(tmp_path, protocol, column):
    """HIGHEST_PROTOCOL is 5 here (numpy's _frombuffer and an in-band bytearray), 4 under the Pythons of insightface's
    day (numpy's _reconstruct and the raw bytes), 2 under Python 2 (and _codecs.encode from Python 3)."""
    jpegs = [_jpeg(k) for k in range(6)]
    issame = [True, False, True]
    path = _write(tmp_path, "ijbc.bin", pickle.dumps(([_imencoded(j, column) for j in jpegs], issame), protocol=protocol))
    assert read_bin(path) == (jpegs, issame)


def test_a_bin_written_by_python2_numpy_is_read(tmp_path):
    assert read_bin(_write(tmp_path, "py2.bin", PYTHON2_NUMPY_BIN)) == (
        [b"\xff\xd8\xff\xe0 one", b"\xff\xd8\xff\xe0 two"], [True])


class _Lie:
    """An array as numpy's protocol-5 pickle names it, with the shape and dtype a hostile file chooses."""

    def __init__(self, data, dtype, shape):
        self.args = (bytearray(data), np.dtype(dtype), shape, "C")

    def __reduce__(self):
        return (np._core if hasattr(np, "_core") else np.core).numeric._frombuffer, self.args  # numpy 2, numpy 1


def test_arrays_that_are_not_image_bytes_or_flags_are_refused_in_one_line(tmp_path):
    jpeg = _imencoded(_jpeg(0), True)
    cases = {
        "wide.bin": (([np.zeros((4, 2), np.uint8)] * 2, [True]), "shape (4, 2)"),
        "cube.bin": (([np.zeros((4, 1, 1), np.uint8)] * 2, [True]), "shape (4, 1, 1)"),
        "floats.bin": (([np.zeros(4, np.float32)] * 2, [True]), "dtype 'f4'"),
        "u1flags.bin": (([jpeg, jpeg], np.array([1], np.uint8)), "flags are not"),
        "boolimages.bin": (([np.ones(4, bool)] * 2, [True]), "images are not"),
        "long.bin": (([_Lie(b"12345", "u1", (10 ** 12, 1)), jpeg], [True]), "but 5 bytes"),  # never allocated
        "longflags.bin": (([jpeg, jpeg], _Lie(b"\x01", "b1", (10 ** 12,))), "but 1 bytes"),
    }
    for name, (obj, says) in cases.items():
        path = _write(tmp_path, name, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        with pytest.raises(UserError) as err:
            read_bin(path)
        assert str(err.value).startswith(f"--bin {path}: ") and says in str(err.value), str(err.value)
        assert "\n" not in str(err.value)
    # An array pickled out of band names a buffer the file does not hold.
    path = _write(tmp_path, "oob.bin", pickle.dumps(([jpeg, jpeg], [True]), protocol=5, buffer_callback=lambda b: False))
    with pytest.raises(UserError, match="not an insightface verification set"):
        read_bin(path)


def test_a_buffer_the_file_names_many_times_is_held_once(tmp_path):
    """A pickle names an object again by its memo (two bytes), so 200 names of one 64 KiB buffer must not become
    200 copies (one 16 MiB bytearray named 200 times made 3.27 GB): an image held once is returned once."""
    blob = bytearray(_jpeg(1)) * 4
    text = blob.decode("latin-1")

    class Encoded:  # Python 3's protocol-2 pickle of bytes: _codecs.encode(text, 'latin1'), here of one memo'd text
        def __reduce__(self):
            return codecs.encode, (text, "latin1")

    sets = {"bytearray.bin": pickle.dumps(([blob] * 200, [True] * 100), protocol=5),
            "array.bin": pickle.dumps(([_imencoded(bytes(blob), True)] * 200, [True] * 100), protocol=5),
            "encode.bin": pickle.dumps(([Encoded() for _ in range(200)], [True] * 100), protocol=2)}
    for name, data in sets.items():
        assert len(data) < 2 * len(blob)
        images, _ = read_bin(_write(tmp_path, name, data))
        assert len(images) == 200 and images[0] == bytes(blob)
        assert len({id(image) for image in images}) == 1, name


# ---- item: a .bin's accuracy as arcface_torch computes it --------------------------------------------------------
# A transcription, numpy only, of deepinsight/insightface@7fadd420c2351d0ffa8cac403421c1a3ed733365:
# recognition/arcface_torch/eval/verification.py: LFold L41-51 (sklearn's KFold(n_splits=10, shuffle=False)), calculate_roc
# L54-106 (pca=0; its tpr/fpr left out), calculate_accuracy L109-121, evaluate L179-189 (the accuracy half), and test()'s
# acc2, std2 = np.mean(accuracy), np.std(accuracy) (L273). KFold from scikit-learn/scikit-learn@7c20fa7b5721e806b7aef708c47c1e0627ac256e:
# sklearn/model_selection/_split.py, KFold._iter_test_indices and BaseCrossValidator.split.
def _kfold_split(n_samples, n_splits=10):
    indices = np.arange(n_samples)
    fold_sizes = np.full(n_splits, n_samples // n_splits, dtype=int)
    fold_sizes[: n_samples % n_splits] += 1
    current = 0
    for fold_size in fold_sizes:
        start, stop = current, current + fold_size
        test_mask = np.zeros(n_samples, dtype=bool)
        test_mask[indices[start:stop]] = True
        yield indices[np.logical_not(test_mask)], indices[test_mask]
        current = stop


def _calculate_accuracy(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict_issame, actual_issame))
    fp = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
    fn = np.sum(np.logical_and(np.logical_not(predict_issame), actual_issame))
    tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
    fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
    acc = float(tp + tn) / dist.size
    return tpr, fpr, acc


def _calculate_roc(thresholds, embeddings1, embeddings2, actual_issame, nrof_folds=10):
    nrof_pairs = min(len(actual_issame), embeddings1.shape[0])
    nrof_thresholds = len(thresholds)
    accuracy = np.zeros((nrof_folds))
    best = np.zeros((nrof_folds))  # ours: each fold's threshold, to compare
    indices = np.arange(nrof_pairs)
    diff = np.subtract(embeddings1, embeddings2)
    dist = np.sum(np.square(diff), 1)
    for fold_idx, (train_set, test_set) in enumerate(_kfold_split(len(indices), nrof_folds)):
        acc_train = np.zeros((nrof_thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            _, _, acc_train[threshold_idx] = _calculate_accuracy(threshold, dist[train_set], actual_issame[train_set])
        best_threshold_index = np.argmax(acc_train)
        _, _, accuracy[fold_idx] = _calculate_accuracy(thresholds[best_threshold_index], dist[test_set],
                                                       actual_issame[test_set])
        best[fold_idx] = thresholds[best_threshold_index]
    return accuracy, best


def _insightface(embeddings, actual_issame, nrof_folds=10):
    """(acc2, std2, each fold's threshold) for embeddings laid out as test() passes them: pair i is rows 2i, 2i+1."""
    thresholds = np.arange(0, 4, 0.01)
    embeddings1 = embeddings[0::2]
    embeddings2 = embeddings[1::2]
    accuracy, best = _calculate_roc(thresholds, embeddings1, embeddings2, np.asarray(actual_issame), nrof_folds)
    return np.mean(accuracy), np.std(accuracy), best


def _pair_embeddings(n: int, noise: float, seed: int) -> tuple[np.ndarray, list[bool]]:
    """2n float32 unit rows (pair i: rows 2i, 2i+1), about half the pairs the same person (the second row the first
    plus noise), the rest two random people."""
    rng = np.random.default_rng(seed)
    issame = [bool(s) for s in rng.random(n) < 0.5]
    a = rng.standard_normal((n, 512))
    b = np.where(np.array(issame)[:, None], a + noise * rng.standard_normal((n, 512)), rng.standard_normal((n, 512)))
    rows = np.empty((2 * n, 512))
    rows[0::2], rows[1::2] = a, b
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32), issame


def _scored(embeddings: np.ndarray, issame: list[bool], unreadable=()) -> dict:
    """score_pairs on a .bin of these embeddings: rows in the order of the set's image names, as evaluate gives them."""
    pairs = bin_pairs("/sets/wild.bin", issame)
    images = pairs.images()
    rows = embeddings[[int(name.rsplit("#", 1)[1]) for name in images]]
    result, _, _ = score_pairs(pairs, images, rows, list(unreadable))
    return result


@pytest.mark.parametrize("n", [557, 550])
def test_bin_accuracy_is_insightfaces_to_the_last_bit(n):
    emb, issame = _pair_embeddings(n, noise=8.0, seed=n)
    acc2, std2, thresholds = _insightface(emb.astype(np.float64), issame)
    result = _scored(emb, issame)
    assert result["accuracy_insightface"] == acc2 and result["accuracy_insightface_std"] == std2
    assert result["thresholds_insightface"] == thresholds.tolist()
    assert 0.85 < acc2 < 0.95  # neither perfect nor hopeless: where the threshold lies matters
    assert logged_metrics(result)["verify_acc_insightface"] == acc2
    assert f"insightface   {acc2:.4f} +- {std2:.4f}" in format_report(
        {**result, "model": "m", "epoch": 1, "image_size": 160, "device": "cpu", "pairs_source": "wild.bin",
         "identities": None, "metric": "euclidean", "flip": False})
    # A pair with an unreadable image is dropped; insightface's procedure then runs on the pairs kept, in order.
    result = _scored(emb, issame, unreadable=["/sets/wild.bin#7"])
    keep = [i for i in range(n) if i != 3]
    acc2, _, _ = _insightface(emb.astype(np.float64).reshape(n, 2, 512)[keep].reshape(-1, 512), [issame[i] for i in keep])
    assert result["pairs"] == n - 1 and result["accuracy_insightface"] == acc2


def test_the_two_accuracies_are_different_procedures():
    """Squared distances 0.001 apart, the same people's all below the others': every cut between two observed
    distances separates them, the grid's 0.01 steps cannot (1.00 accepts no pair, 1.01 every pair)."""
    n = 400
    issame = [k % 2 == 0 for k in range(n)]
    squared = np.where(issame, 1.0005 + 0.003 * np.arange(n) / n, 1.0055 + 0.003 * np.arange(n) / n)
    angle = np.arccos(1.0 - squared / 2.0)  # |a - b|^2 = 2 - 2 cos(angle) for unit a, b
    rows = np.zeros((2 * n, 512))
    rows[0::2, 0] = 1.0
    rows[1::2, 0], rows[1::2, 1] = np.cos(angle), np.sin(angle)
    emb = rows.astype(np.float32)
    result = _scored(emb, issame)
    acc2, _, _ = _insightface(emb.astype(np.float64), issame)
    assert result["accuracy"] == 1.0 and result["accuracy_insightface"] == acc2 == 0.5
    # The same embeddings on folder pairs (our own folds): no insightface number, nothing logged for it.
    pairs = bin_pairs("/sets/wild.bin", issame)
    pairs.insightface = False
    images = pairs.images()
    result, _, _ = score_pairs(pairs, images, emb[[int(i.rsplit("#", 1)[1]) for i in images]], [])
    assert "accuracy_insightface" not in result and "verify_acc_insightface" not in logged_metrics(result)


def test_the_grid_and_folds_are_insightfaces():
    assert np.array_equal(vm.INSIGHTFACE_THRESHOLDS, np.arange(0, 4, 0.01))
    for n in (10, 17, 550, 6000):
        ours = vm.kfold_folds(n, 10)
        theirs = np.zeros(n, int)
        for fold, (_, test) in enumerate(_kfold_split(n)):
            theirs[test] = fold
        assert ours == theirs.tolist()
