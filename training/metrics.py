"""Scores as the paper reports them: slice error and one-vs-rest AUC per class, plus NLL and
calibration error. Images labelled `ambiguous` (target -1) are excluded before scoring."""
from __future__ import annotations

import numpy as np


def auc_one_vs_rest(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN if one side is empty."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # mid-ranks: tied scores share the mean of their rank positions
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mid = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(mid, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    conf = probs.max(1)
    correct = probs.argmax(1) == targets
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def classification_report(probs: np.ndarray, targets: np.ndarray, classes) -> dict:
    """probs [n, C] (rows sum to 1), targets [n] with -1 = ambiguous (excluded)."""
    keep = targets >= 0
    probs, targets = probs[keep], targets[keep]
    n = len(targets)
    if n == 0:
        return {"images": 0}
    pred = probs.argmax(1)
    auc = {c: auc_one_vs_rest(probs[:, i], targets == i) for i, c in enumerate(classes)}
    valid = [v for v in auc.values() if not np.isnan(v)]
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(confusion, (targets, pred), 1)
    per_class_error = {
        c: float(1 - confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else float("nan")
        for i, c in enumerate(classes)
    }
    return {
        "images": n,
        "error": float((pred != targets).mean()),
        "nll": float(-np.log(np.clip(probs[np.arange(n), targets], 1e-12, 1)).mean()) + 0.0,
        "ece": expected_calibration_error(probs, targets),
        "auc": auc,
        "mean_auc": float(np.mean(valid)) if valid else float("nan"),
        "per_class_error": per_class_error,
        "confusion": confusion.tolist(),  # rows: truth, columns: prediction
    }


def format_report(r: dict, classes) -> str:
    if not r.get("images"):
        return "no scored images"
    aucs = " ".join(f"{c}={r['auc'][c]:.3f}" for c in classes if not np.isnan(r["auc"][c]))
    return (f"n={r['images']} error={100 * r['error']:.2f}% nll={r['nll']:.4f} ece={r['ece']:.4f} "
            f"meanAUC={r['mean_auc']:.4f} [{aucs}]")


def format_confusion(r: dict, classes) -> str:
    w = max(8, max(len(c) for c in classes) + 1)
    lines = ["truth\\pred".ljust(w) + "".join(c[:w - 1].rjust(w) for c in classes)]
    for c, row in zip(classes, r["confusion"]):
        lines.append(c.ljust(w) + "".join(str(v).rjust(w) for v in row))
    return "\n".join(lines)
