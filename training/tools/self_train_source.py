"""Adapting to a site without hand labels, measured on a left-out source: before / after
self-training with no labels / after N labelled persons.

    . training/shipped-recipe.sh
    python training/tools/self_train_source.py training/runs/shipped/dataset.npz \\
        --source okbp- --labels ../shared/data/ct/labels.csv --out training/runs/self-train/okbp \\
        --train-args "${SHIPPED_TRAIN_ARGS[*]}"

A public source (a case_id prefix of labels.csv) plays a new site. Its persons are split
(seeded) into `--labelled-persons` N persons that the third arm labels and the others, the
SCORED persons, on which all three arms are scored with their human labels:

1. before      trained without the source (hold_out.py: the source alone in test, the old test
               patients in train, as leave_source_out.sh does); `--before CKPT` reuses such a run.
2. self-train  the `before` model labels every image of the source (`--pseudo-from all`, the
               default: as the node self-trains on every series of its site, the scored persons'
               included, transductively; `labelled`: only the N persons' images). An image
               becomes a pseudo label, as `anatomy-node mine` makes them, where the calibrated
               probability of its class reaches `--min-probability` (0.98) AND that class is the
               one its series' head-to-foot decoding gives it (training/order.py, the port of the
               node's decoder src/anatomy/order.rs: the most probable labelling along z through
               head, neck, lungs, liver, mid-abdomen, pelvis, legs, with the node's penalties). Those images join the training split as
               `pseudo:<before model>` rows (a copy; the originals stay in test with their human
               labels, the copy under another patient key) and the same recipe trains again.
               No human label of the source is used.
3. labelled    the N persons' images join the training split with their human labels.

Each arm is one full training run (~20 min on 2 CPU cores with the shipped recipe). Writes
OUT/results.json and OUT/results.md (slice error on the scored persons, and how many pseudo
labels were made, left out, and right against the human labels).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the training package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from training import order  # noqa: E402
from training.data import AMBIGUOUS, read_npz_arrays, write_npz_arrays  # noqa: E402
from training.tools import hold_out  # noqa: E402

PSEUDO_PREFIX = "pseudo:"
ARMS = ("before", "self-train", "labelled")


def pseudo_labels(probabilities: np.ndarray, series: np.ndarray, z_mm: np.ndarray, classes,
                  min_probability: float) -> tuple[np.ndarray, np.ndarray]:
    """(label index per image, why) with why one of "kept", "below-threshold", "out-of-order":
    confident and in agreement with the series' head-to-foot decoding, as `mine` requires."""
    p = np.asarray(probabilities)
    raw = p.argmax(1)
    decoded = raw.copy()
    for s in np.unique(series):
        idx = np.flatnonzero(series == s)
        z = np.nan_to_num(np.asarray(z_mm, dtype=np.float64)[idx], nan=0.0)
        decoded[idx] = order.decode(p[idx], z, classes)  # the node's decoder (training/order.py)
    confident = p[np.arange(len(p)), raw] >= min_probability
    why = np.where(~confident, "below-threshold", np.where(raw != decoded, "out-of-order", "kept"))
    return raw, why


def predict(checkpoint: Path, images: np.ndarray, hu_offset: int) -> tuple[np.ndarray, list, str]:
    """Calibrated probabilities [n, C] of a training checkpoint, its classes and version."""
    import torch

    from training.train import load_checkpoint, predict_logits

    model, ckpt = load_checkpoint(checkpoint, "cpu")
    low, high = ckpt["hu_window"]
    hu = torch.from_numpy(np.clip(images.astype(np.int32) - hu_offset, -32768, 32767).astype(np.int16))
    logits = predict_logits(model, hu, low, high, 64)
    # softmax(logits / T): what the exported model (and so the node) computes.
    probs = torch.softmax(logits / float(ckpt.get("temperature", 1.0)), 1).numpy()
    return probs, list(ckpt["classes"]), str(ckpt.get("model_version") or checkpoint.parent.name)


def score(probs: np.ndarray, labels: np.ndarray, classes) -> dict:
    """Slice error on the images whose human label is one of the classes (ambiguous left out)."""
    keep = np.isin(labels, list(classes))
    predicted = np.array(classes)[probs.argmax(1)]
    errors = int((predicted[keep] != labels[keep]).sum())
    images = int(keep.sum())
    return {"images": images, "errors": errors, "error": errors / images if images else None}


def train(py: str, data: Path, out: Path, args: list[str], version: str, device: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [py, "-m", "training", "train", "--data", str(data), "--out", str(out), "--device", device,
           *args, "--model-version", version]
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT,
                       cwd=Path(__file__).resolve().parents[2])
    return out / "model.pt"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("packed", help="packed dataset (.npz of `python -m training pack`), e.g. the shipped one")
    p.add_argument("--source", required=True, help="case_id prefix of the left-out source, e.g. okbp-")
    p.add_argument("--labels", required=True, help="labels.csv naming the subjects (case_id)")
    p.add_argument("--out", required=True, help="folder for the datasets, runs and results")
    p.add_argument("--train-args", default="", help="options of `python -m training train` (the recipe)")
    p.add_argument("--labelled-persons", type=int, default=5, help="persons the third arm labels (5)")
    p.add_argument("--min-probability", type=float, default=0.98,
                   help="pseudo label threshold (mine.pseudo_label_min_probability)")
    p.add_argument("--no-order", action="store_true",
                   help="pseudo labels by probability alone (mine.pseudo_label_require_order = false)")
    p.add_argument("--pseudo-from", choices=("all", "labelled"), default="all",
                   help="images pseudo-labelled: every image of the source, or only the labelled persons'")
    p.add_argument("--before", help="checkpoint of a run without the source (skips arm 1's training)")
    p.add_argument("--arms", default=",".join(ARMS), help="arms to run (before is always scored)")
    p.add_argument("--seed", type=int, default=2015, help="which persons are labelled")
    p.add_argument("--py", default=sys.executable, help="Python with the training package's requirements")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    arms = [s.strip() for s in a.arms.split(",") if s.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; choose from {list(ARMS)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = shlex.split(a.train_args)

    # 1. The source alone in test; the old test patients train.
    before_npz = out / "before.npz"
    hold_out.main([a.packed, str(before_npz), "--source", a.source, "--labels", a.labels,
                   "--to", "test", "--rest-to", "train"])
    arrays, info = read_npz_arrays(before_npz)
    subjects = sorted(hold_out.source_subjects(Path(a.labels), (a.source,)))
    keys = {hold_out.patient_key(s): s for s in subjects}
    source = np.isin(arrays["patient_key"], list(keys))
    present = sorted(k for k in keys if (arrays["patient_key"] == k).any())
    if len(present) <= a.labelled_persons:
        raise SystemExit(f"{a.source}: {len(present)} persons in the dataset; need more than "
                         f"--labelled-persons {a.labelled_persons}")
    rng = np.random.default_rng(a.seed)
    labelled_keys = sorted(rng.choice(present, a.labelled_persons, replace=False).tolist())
    labelled = np.isin(arrays["patient_key"], labelled_keys)
    scored = source & ~labelled
    hu_offset = int(info.get("hu_offset", 32768))
    labels = arrays["label"].astype(str)

    before_ckpt = Path(a.before) if a.before else train(a.py, before_npz, out / "before", recipe,
                                                        f"without-{a.source.rstrip('-')}", a.device)
    probs, classes, before_version = predict(before_ckpt, arrays["images"][source], hu_offset)
    results = {
        "source": a.source, "persons": len(present),
        "labelled_persons": [keys[k] for k in labelled_keys],
        "scored_persons": len(present) - a.labelled_persons,
        "train_args": a.train_args, "min_probability": a.min_probability,
        "require_order": not a.no_order, "pseudo_from": a.pseudo_from,
        "arms": {"before": score(probs[scored[source]], labels[scored], classes)
                 | {"model": str(before_ckpt)}},
    }

    if "self-train" in arms:
        # 2. Pseudo labels from the `before` model where confident and in head-to-foot order.
        raw, why = pseudo_labels(probs, arrays["series_uid"][source], arrays["z_mm"][source], classes,
                                 a.min_probability)
        if a.no_order:
            why = np.where(why == "out-of-order", "kept", why)
        candidates = labelled[source] if a.pseudo_from == "labelled" else np.ones(int(source.sum()), bool)
        keep = (why == "kept") & candidates
        truth = labels[source]
        judged = keep & (truth != AMBIGUOUS)
        pseudo_names = np.array(classes)[raw]
        results["pseudo"] = {
            "images": int(candidates.sum()), "kept": int(keep.sum()),
            "below_threshold": int(((why == "below-threshold") & candidates).sum()),
            "out_of_order": int(((why == "out-of-order") & candidates).sum()),
            "right_against_human": int((pseudo_names[judged] == truth[judged]).sum()),
            "with_human_label": int(judged.sum()),
        }
        rows = np.flatnonzero(source)[keep]
        copy = {k: v[rows].copy() for k, v in arrays.items() if k != "dataset_json" and len(v) == len(labels)}
        copy["label"] = pseudo_names[keep].astype(arrays["label"].dtype)
        copy["label_source"] = np.array([PSEUDO_PREFIX + before_version] * len(rows))
        copy["split"] = np.array(["train"] * len(rows))
        copy["patient_key"] = np.char.add(copy["patient_key"].astype(str), ":pseudo")
        merged = {k: np.concatenate([v, copy[k]]) if k in copy else v for k, v in arrays.items()}
        self_npz = out / "self-train.npz"
        write_npz_arrays(self_npz, merged, info | {"name": f"{info.get('name', 'dataset')} + "
                                                          f"{len(rows)} pseudo labels of {a.source}*"})
        ckpt = train(a.py, self_npz, out / "self-train", recipe, f"self-train-{a.source.rstrip('-')}", a.device)
        p2, c2, _ = predict(ckpt, arrays["images"][scored], hu_offset)
        results["arms"]["self-train"] = score(p2, labels[scored], c2) | {"model": str(ckpt)}

    if "labelled" in arms:
        # 3. The labelled persons' images train with their human labels.
        split = arrays["split"].astype(object)
        split[labelled] = "train"
        lab = dict(arrays) | {"split": split.astype(arrays["split"].dtype)}
        del lab["dataset_json"]
        lab_npz = out / "labelled.npz"
        write_npz_arrays(lab_npz, lab, info | {"name": f"{info.get('name', 'dataset')} + "
                                                        f"{a.labelled_persons} labelled persons of {a.source}*"})
        ckpt = train(a.py, lab_npz, out / "labelled", recipe,
                     f"labelled-{a.labelled_persons}-{a.source.rstrip('-')}", a.device)
        p3, c3, _ = predict(ckpt, arrays["images"][scored], hu_offset)
        results["arms"]["labelled"] = score(p3, labels[scored], c3) | {"model": str(ckpt)}

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"Left-out source `{a.source}*`: {results['scored_persons']} scored persons "
             f"({a.labelled_persons} others labelled in the third arm)", "",
             "| arm | slice error on the scored persons |", "|---|---|"]
    for arm in ARMS:
        r = results["arms"].get(arm)
        if r:
            err = "n/a" if r["error"] is None else f"{100 * r['error']:.1f} %"
            lines.append(f"| {arm} | {err} ({r['errors']}/{r['images']}) |")
    if "pseudo" in results:
        ps = results["pseudo"]
        lines += ["", f"Pseudo labels: {ps['kept']} of {ps['images']} images (below threshold "
                      f"{ps['below_threshold']}, out of order {ps['out_of_order']}); "
                      f"{ps['right_against_human']} of {ps['with_human_label']} right against the human labels."]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
