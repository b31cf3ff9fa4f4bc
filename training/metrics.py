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


def other_report(probs: np.ndarray, kinds: np.ndarray, classes) -> dict:
    """Images whose right answer is `other` (e.g. synthetic non-axial ones): how many get it,
    overall and per kind, and what the rest are called."""
    other = list(classes).index("other")
    pred = probs.argmax(1)
    r = {"images": int(len(pred)), "other_rate": float((pred == other).mean()),
         "predicted": {c: int((pred == i).sum()) for i, c in enumerate(classes)}, "kinds": {}}
    for k in sorted(set(kinds.tolist())):
        m = kinds == k
        r["kinds"][k] = {"images": int(m.sum()), "other_rate": float((pred[m] == other).mean())}
    return r


def format_other(r: dict) -> str:
    kinds = " ".join(f"{k}={100 * v['other_rate']:.0f}%/{v['images']}" for k, v in r["kinds"].items())
    wrong = ", ".join(f"{c} {n}" for c, n in r["predicted"].items() if c != "other" and n)
    return (f"n={r['images']} called other: {100 * r['other_rate']:.1f}% [{kinds}]"
            + (f"; otherwise {wrong}" if wrong else ""))


def patient_report(probs: np.ndarray, targets: np.ndarray, patients: np.ndarray) -> dict:
    """Per patient, over its scored slices (ambiguous excluded), as `anatomy-node eval` does it:
    true class = most frequent label, predicted class = most frequent slice prediction (ties go
    to the class first in the class order); `patient_error` is the share of patients whose two
    differ. Also `any_slice_error` (share of patients with at least one wrong slice) and
    `mean_patient_slice_error` (every patient weighs the same, however many slices it has)."""
    keep = targets >= 0
    pred, targets, patients = probs[keep].argmax(1), targets[keep], np.asarray(patients)[keep]
    C = probs.shape[1]
    errors, wrong_vote = {}, 0
    for p in sorted(set(patients.tolist())):
        m = patients == p
        errors[p] = float((pred[m] != targets[m]).mean())
        # argmax of the counts takes the first class on ties: the class order
        wrong_vote += int(np.bincount(targets[m], minlength=C).argmax() != np.bincount(pred[m], minlength=C).argmax())
    n = len(errors)
    with_error = sum(1 for e in errors.values() if e > 0)
    return {"patients": n, "errors": wrong_vote, "with_error": with_error,
            "patient_error": wrong_vote / n if n else float("nan"),
            "any_slice_error": with_error / n if n else float("nan"),
            "mean_patient_slice_error": float(np.mean(list(errors.values()))) if n else float("nan"),
            "slice_error_by_patient": {p: e for p, e in errors.items() if e > 0}}


def headline(report: dict, classes, dataset_info: dict, split: str) -> dict:
    """The model card's figures in the layout of models/anatomy.metrics.json."""
    aucs = {c: report["auc"][c] for c in classes}
    return {
        "dataset": {
            "size": int(dataset_info.get("input_size")),
            "seed": dataset_info.get("seed"),
            "split_ratios": dataset_info.get("split_ratios"),
            "labels": dataset_info.get("labels_file", "labels.csv"),
            "split": split,
            "images_scored": report["images"],
            "patients": report["patients"]["patients"],
        },
        "slice_error": report["error"],
        "mean_auc": report["mean_auc"],
        "per_class_auc": {c: (None if np.isnan(v) else v) for c, v in aucs.items()},
        "patient_error": report["patients"]["patient_error"],
        "patient_any_slice_error": report["patients"]["any_slice_error"],
        "mean_patient_slice_error": report["patients"]["mean_patient_slice_error"],
        "ece": report["ece"],
        "nll": report["nll"],
        "per_class_error": report["per_class_error"],
        "classes": list(classes),
        "confusion": report["confusion"],
        "definitions": {
            "scored": "test-split slices of the dataset, label 'ambiguous' excluded",
            "slice_error": "share of scored slices whose argmax class is not the label",
            "mean_auc": "mean over classes of the one-vs-rest ROC AUC of that class's probability",
            "patient_error": "share of test patients whose majority slice prediction differs from their majority label (ties: first in class order)",
            "patient_any_slice_error": "share of test patients with at least one wrongly labelled scored slice",
            "mean_patient_slice_error": "mean over test patients of their slice error",
            "ece": "expected calibration error of the top-class probability, 15 equal-width bins",
            "confusion": "rows: label, columns: prediction, in the order of classes",
        },
    }
