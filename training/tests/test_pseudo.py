"""Pseudo labels (label_source `pseudo:<model>`, the node's own predictions mined by
`anatomy-node mine`): weighted in training (`--pseudo-weight`), never scored in validation."""
import csv
import json
import shutil

import numpy as np
import pytest

from training import cli
from training.data import MANIFEST_COLUMNS
from training.train import is_pseudo, pseudo_sampling_weights


def test_pseudo_sampling_weights_scale_only_pseudo_images():
    w = np.array([1.0, 2.0, 3.0, 4.0])
    pseudo = np.array([False, True, False, True])
    assert pseudo_sampling_weights(w, pseudo, 1.0).tolist() == [1, 2, 3, 4]
    assert pseudo_sampling_weights(w, pseudo, 0.5).tolist() == [1, 1, 3, 2]
    assert pseudo_sampling_weights(w, pseudo, 0.0).tolist() == [1, 0, 3, 0]
    assert w.tolist() == [1, 2, 3, 4], "the input is not changed"
    with pytest.raises(ValueError):
        pseudo_sampling_weights(w, pseudo, -1.0)
    with pytest.raises(ValueError, match="no training image"):
        pseudo_sampling_weights(w, np.ones(4, bool), 0.0)
    assert is_pseudo(np.array(["mined:ris", "pseudo:m1", "synthetic", "pseudox"])).tolist() == [
        False, True, False, False]


def test_train_weights_pseudo_labels_and_validates_on_human_ones(synthetic_dataset, tmp_path, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(synthetic_dataset, ds)
    with open(ds / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # Wrong pseudo labels on the training patients' legs, and one pseudo label per val patient.
    pseudo_train = pseudo_val = 0
    seen_val = set()
    for r in rows:
        if r["split"] == "train" and r["label"] == "legs":
            r["label"], r["label_source"] = "neck", "pseudo:site-1"
            pseudo_train += 1
        elif r["split"] == "val" and r["label"] != "ambiguous" and r["patient_key"] not in seen_val:
            seen_val.add(r["patient_key"])
            r["label_source"] = "pseudo:site-1"
            pseudo_val += 1
    with open(ds / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(ds), "--out", str(out), "--epochs", "1", "--width", "8",
                     "--batch-size", "16", "--no-nonaxial", "--pseudo-weight", "0"]) == 0
    log = capsys.readouterr().out
    assert f"pseudo-labelled training images: {pseudo_train} of " in log, log
    assert "drawn with weight 0 " in log, log
    assert f"val: {pseudo_val} pseudo-labelled images not scored" in log, log
    assert json.loads((out / "config.json").read_text())["pseudo_weight"] == 0.0
