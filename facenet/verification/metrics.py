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
"""

from __future__ import annotations

import numpy as np


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
    if not (len(d) == len(s) == len(f)):
        raise ValueError(f"{len(d)} distances, {len(s)} labels, {len(f)} fold numbers")
    fold_ids = np.unique(f)
    if len(fold_ids) < 2:
        raise ValueError("the protocol needs at least 2 folds of pairs")
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
