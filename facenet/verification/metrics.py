"""Verification numbers by the LFW protocol, from pair distances alone (numpy, no torch).

A pair is called "same person" when its distance is below a threshold. The
protocol's accuracy is honest because the threshold is never chosen on the
pairs it is scored on: for each of the k folds, the threshold that is best on
the other k-1 folds is applied to it, and the k accuracies are averaged
(davidsandberg/facenet's `calculate_roc`). VAL@FAR is done the same way: the
threshold with a false-accept rate of at most `far_target` on the other folds
gives the fold's true-accept rate (VAL) and false-accept rate.

Unlike a fixed grid of thresholds (0.00, 0.01, ... 4.00 in davidsandberg's
code), every distinct cut between two observed distances is considered, so
the numbers do not depend on the grid or on the distance's scale (Euclidean
on unit vectors lies in [0, 2], cosine distance in [0, 2]).

For insightface's .bin sets, `insightface_accuracy` also gives the accuracy exactly as insightface's
arcface_torch computes it (its grid, its folds, its squared distance), the number papers quote, which can
differ from ours by a point or two on the same embeddings.

Pairs that cannot be scored are a ScoreError in one line, never a traceback and never a number: fewer than 2
folds, fewer pairs than insightface's folds, or a NaN or inf distance or embedding (a model that diverged gives
NaN embeddings; a comparison with NaN is simply False, so they would score as a plausible but meaningless
accuracy).
"""

from __future__ import annotations

import numpy as np

from facenet.errors import UserError


class ScoreError(UserError, ValueError):
    """Pairs these numbers cannot be computed for, in one line. A UserError: the trainer exits 2 with it, so a
    queued job fails at once instead of being retried as a crash; a ValueError, as these functions raised."""


def _finite(finite: np.ndarray, what: str) -> None:
    """ScoreError naming how many pairs are not `finite` (a bool a pair) in their `what`."""
    bad = ~finite
    if bad.any():
        raise ScoreError(f"{int(bad.sum())} of {len(finite)} pairs have a NaN or inf {what} (the model gave "
                         "embeddings that are not finite numbers: did training diverge?); no accuracy can be "
                         "computed from them")


def cuts(distances: np.ndarray) -> np.ndarray:
    """Every threshold that changes a decision: below the smallest distance, between each two distinct
    distances, above the largest. `distance < cut` means "same person"."""
    u = np.unique(distances)
    if len(u) == 0:
        return np.array([0.0])
    return np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2.0, [u[-1] + 1.0]])


def _counts(distances: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true accepts, false accepts) at each threshold: pairs with distance < threshold called same."""
    order = np.argsort(distances, kind="stable")
    d, s = distances[order], same[order]
    accepted = np.searchsorted(d, thresholds, side="left")  # how many pairs lie below each threshold
    tp_cum = np.concatenate([[0], np.cumsum(s)])
    tp = tp_cum[accepted]
    return tp, accepted - tp


def roc(distances: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-accept rates, true-accept rates, thresholds), thresholds ascending from "nobody is the
    same person" (0, 0) to "everybody is" (1, 1)."""
    distances, same = np.asarray(distances, float), np.asarray(same, bool)
    _finite(np.isfinite(distances), "distance")
    thresholds = cuts(distances)
    tp, fp = _counts(distances, same, thresholds)
    n_pos, n_neg = int(same.sum()), int((~same).sum())
    return fp / max(n_neg, 1), tp / max(n_pos, 1), thresholds


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.trapezoid(tpr, fpr))


def eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Equal error rate: where the false-accept rate equals the false-reject rate (1 - TPR), linearly
    interpolated between the two ROC points that straddle it."""
    gap = fpr - (1.0 - tpr)  # rises from -1 (nobody accepted) to +1 (everybody accepted)
    i = int(np.searchsorted(gap, 0.0, side="left"))
    if i == 0:
        return float(fpr[0])
    g0, g1 = gap[i - 1], gap[i]
    w = 0.0 if g1 == g0 else -g0 / (g1 - g0)
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


def best_accuracy_threshold(distances: np.ndarray, same: np.ndarray) -> float:
    """The cut with the highest accuracy on these pairs (the smallest such cut on ties)."""
    thresholds = cuts(distances)
    tp, fp = _counts(distances, same, thresholds)
    correct = tp + (int((~same).sum()) - fp)
    return float(thresholds[int(np.argmax(correct))])


def far_threshold(distances: np.ndarray, same: np.ndarray, far_target: float) -> float:
    """The largest cut whose false-accept rate on these pairs is at most `far_target` (conservative:
    davidsandberg's code interpolates to the target instead, which can overshoot it)."""
    thresholds = cuts(distances)
    _, fp = _counts(distances, same, thresholds)
    far = fp / max(int((~same).sum()), 1)
    ok = np.nonzero(far <= far_target)[0]
    return float(thresholds[ok[-1]])  # the first cut accepts nobody, so there is always one


def verification_metrics(distances, same, folds, far_target: float = 1e-3) -> dict:
    """The LFW protocol's numbers for pairs with these distances, labels (True = same person) and fold
    numbers. Returns accuracy (mean and std over folds, each fold scored at the threshold best on the
    others), the mean of those thresholds, VAL and FAR at `far_target` (likewise), and, over all pairs,
    ROC AUC and the equal error rate."""
    d = np.asarray(distances, dtype=float)
    s = np.asarray(same, dtype=bool)
    f = np.asarray(folds)
    if not (d.ndim == s.ndim == f.ndim == 1 and len(d) == len(s) == len(f)):
        raise ScoreError(f"{len(d)} distances, {len(s)} labels, {len(f)} fold numbers")
    _finite(np.isfinite(d), "distance")
    fold_ids = np.unique(f)
    if len(fold_ids) < 2:
        raise ScoreError(f"{len(d)} pair(s) in {len(fold_ids)} fold(s): the protocol needs at least 2 folds of "
                         "pairs (each fold is scored at the threshold best on the others)")
    accs, thresholds, vals, fars = [], [], [], []
    for k in fold_ids:
        test, train = f == k, f != k
        t = best_accuracy_threshold(d[train], s[train])
        thresholds.append(t)
        accs.append(float(np.mean((d[test] < t) == s[test])))
        t_far = far_threshold(d[train], s[train], far_target)
        accepted = d[test] < t_far
        vals.append(float(accepted[s[test]].mean()) if s[test].any() else 0.0)
        fars.append(float(accepted[~s[test]].mean()) if (~s[test]).any() else 0.0)
    fpr, tpr, _ = roc(d, s)
    return {"pairs": int(len(d)), "same_pairs": int(s.sum()), "different_pairs": int((~s).sum()),
            "folds": int(len(fold_ids)),
            "accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
            "threshold": float(np.mean(thresholds)),
            "val": float(np.mean(vals)), "val_std": float(np.std(vals)), "far": float(np.mean(fars)),
            "far_target": far_target, "auc": auc(fpr, tpr), "eer": eer(fpr, tpr)}


# ---- insightface's accuracy -----------------------------------------------------------------------------------
# deepinsight/insightface@7fadd420c2351d0ffa8cac403421c1a3ed733365:recognition/arcface_torch/eval/verification.py:
# evaluate() L181 (the accuracy's grid), calculate_roc() L54-106, calculate_accuracy() L109-121.
INSIGHTFACE_THRESHOLDS = np.arange(0, 4, 0.01)


def kfold_folds(n: int, folds: int) -> list[int]:
    """The fold of each of n items in order as sklearn's KFold(n_splits=folds, shuffle=False) cuts them:
    contiguous, the first n % folds folds one item longer (scikit-learn@7c20fa7b:sklearn/model_selection/
    _split.py, KFold._iter_test_indices). Plain Python: binset uses it without numpy work."""
    sizes = [n // folds + (1 if f < n % folds else 0) for f in range(folds)]
    return [f for f, size in enumerate(sizes) for _ in range(size)]


def insightface_accuracy(embeddings1: np.ndarray, embeddings2: np.ndarray, same, folds: int = 10) -> dict:
    """The accuracy of pairs (embeddings1[i], embeddings2[i]) (unit rows, in file order; at least `folds` pairs)
    exactly as arcface_torch's eval/verification.py computes it: squared Euclidean distance in float64, the
    pairs cut into `folds` KFold folds in order, each fold scored at the first threshold of the grid 0.00,
    0.01, ..., 3.99 that is best on the other folds (`distance < threshold` is "same"). Returns
    accuracy_insightface (mean over folds: its test()'s acc2), accuracy_insightface_std (std2) and
    thresholds_insightface (each fold's threshold on squared distance)."""
    e1, e2 = np.asarray(embeddings1, np.float64), np.asarray(embeddings2, np.float64)
    if not (e1.ndim == e2.ndim == 2 and e1.shape == e2.shape):
        raise ScoreError(f"embeddings of shapes {e1.shape} and {e2.shape}: expected two equal [pairs, dims]")
    _finite(np.isfinite(e1).all(axis=1) & np.isfinite(e2).all(axis=1), "embedding")
    with np.errstate(over="ignore"):  # finite rows whose squared difference overflows: refused just below
        d = np.sum(np.square(np.subtract(e1, e2)), 1)  # as calculate_roc computes it, to the last bit
    _finite(np.isfinite(d), "distance")
    s = np.asarray(same, dtype=bool)
    if len(d) < folds:
        raise ScoreError(f"{len(d)} pairs: insightface's procedure needs at least {folds} (one a fold)")
    fold_of = np.array(kfold_folds(len(d), folds))
    accs, thresholds = np.zeros(folds), []
    for k in range(folds):
        test, train = fold_of == k, fold_of != k
        tp, fp = _counts(d[train], s[train], INSIGHTFACE_THRESHOLDS)
        # argmax of the correct counts is calculate_roc's argmax of their accuracies (the same counts over the
        # same size): the first best threshold on ties.
        t = INSIGHTFACE_THRESHOLDS[int(np.argmax(tp + (int((~s[train]).sum()) - fp)))]
        thresholds.append(float(t))
        accs[k] = float(np.sum((d[test] < t) == s[test])) / int(test.sum())  # calculate_accuracy's float(tp + tn) / size
    return {"accuracy_insightface": float(np.mean(accs)), "accuracy_insightface_std": float(np.std(accs)),
            "thresholds_insightface": thresholds}
