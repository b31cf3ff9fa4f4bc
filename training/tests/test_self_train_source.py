"""training/tools/self_train_source.py: the head-to-foot decoding, the pseudo-label rule, and
the three arms end to end on the synthetic dataset (tiny training runs)."""
import csv
import json
import sys

import numpy as np

from training import data, order
from training.data import CLASSES, read_npz_arrays
from training.tools import self_train_source as st


def probs_of(labels, p=0.99):
    out = np.full((len(labels), len(CLASSES)), (1 - p) / (len(CLASSES) - 1))
    for i, label in enumerate(labels):
        out[i, CLASSES.index(label)] = p
    return out


def test_decoding_is_the_nodes_head_to_foot_order():
    names = lambda idx: [CLASSES[i] for i in idx]
    ordered = ["other", "neck", "lungs", "liver", "other", "pelvis", "legs"]
    z = -40.0 * np.arange(len(ordered))
    assert names(order.decode(probs_of(ordered), z, CLASSES)) == ordered
    # given foot first, the same labels: the decoder sorts by z
    assert names(order.decode(probs_of(ordered)[::-1], z[::-1], CLASSES)) == ordered[::-1]
    # A confident "legs" between neck slices is out of order; the decoding overrules it.
    p = probs_of(["neck", "neck", "legs", "neck", "lungs"])
    p[2] = probs_of(["legs"], 0.6)[0]
    assert names(order.decode(p, -10.0 * np.arange(5), CLASSES)) == ["neck", "neck", "neck", "neck", "lungs"]
    assert len(order.decode(np.zeros((0, len(CLASSES))), np.zeros(0), CLASSES)) == 0


def test_the_port_agrees_with_the_fixture_the_rust_decoder_checks():
    import json
    from pathlib import Path
    fixture = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "order" / "cases.json"
    cases = json.loads(fixture.read_text())["cases"]
    for n, c in enumerate(cases):
        got = order.decode(c["probabilities"], c["z_mm"], c["classes"], c["switch_penalty"], c["skip_penalty"])
        assert got.tolist() == c["decoded"], f"case {n}"


def test_pseudo_labels_need_confidence_and_the_series_order():
    # Two series, given foot first in the arrays: sorted by z (head first) before decoding.
    labels = ["lungs", "legs", "neck", "neck", "liver", "pelvis"]
    p = probs_of(labels)
    p[1] = probs_of(["legs"], 0.7)[0]  # legs between neck and lungs, confident enough to win its slice
    p[5] = probs_of(["pelvis"], 0.9)[0]
    series = np.array(["a", "a", "a", "a", "b", "b"])
    z = np.array([-10.0, -5.0, 0.0, 5.0, 0.0, -10.0])  # series a head first: 5, 0, -5 (legs), -10
    raw, why = st.pseudo_labels(p, series, z, CLASSES, 0.65)
    assert [CLASSES[i] for i in raw] == labels
    assert why.tolist() == ["kept", "out-of-order", "kept", "kept", "kept", "kept"]
    _, why = st.pseudo_labels(p, series, z, CLASSES, 0.95)
    assert why.tolist() == ["kept", "below-threshold", "kept", "kept", "kept", "below-threshold"]


def test_three_arms_on_a_left_out_synthetic_source(synthetic_dataset, tmp_path, monkeypatch):
    npz = tmp_path / "ds.npz"
    data.pack(synthetic_dataset, npz)
    # The synthetic patients' keys are those of case_ids synthetic-0 ... synthetic-11;
    # "synthetic-1" names three of them (1, 10, 11): the left-out source.
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id"])
        w.writerows([[f"synthetic-{p}"] for p in range(12)])
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    assert st.main([str(npz), "--source", "synthetic-1", "--labels", str(labels), "--out", str(out),
                    "--labelled-persons", "1", "--min-probability", "0", "--py", sys.executable,
                    "--train-args", "--epochs 1 --width 8 --batch-size 16 --no-nonaxial --seed 3"]) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["persons"] == 3 and r["scored_persons"] == 2 and len(r["labelled_persons"]) == 1
    # Every arm is scored on the same images: the two scored persons' (6 classes x 3 each).
    assert {arm: r["arms"][arm]["images"] for arm in st.ARMS} == {arm: 36 for arm in st.ARMS}
    ps = r["pseudo"]
    assert ps["images"] == 3 * 19 and ps["kept"] + ps["below_threshold"] + ps["out_of_order"] == ps["images"]
    # The self-training set: the pseudo copies train, marked; the source's originals stay in test.
    arrays, _ = read_npz_arrays(out / "self-train.npz")
    pseudo = np.char.startswith(arrays["label_source"].astype(str), "pseudo:")
    assert pseudo.sum() == ps["kept"] > 0
    assert set(arrays["split"][pseudo].tolist()) == {"train"}
    assert all(k.endswith(":pseudo") for k in arrays["patient_key"][pseudo].tolist())
    before, _ = read_npz_arrays(out / "before.npz")
    assert (arrays["label"][: len(before["label"])] == before["label"]).all()
    # The labelled arm: the labelled person trains with human labels, nothing pseudo.
    lab, _ = read_npz_arrays(out / "labelled.npz")
    assert (lab["split"] == "test").sum() == 2 * 19
    assert "| self-train |" in (out / "results.md").read_text()
