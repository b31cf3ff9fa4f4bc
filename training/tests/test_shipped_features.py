"""Pairs of crops, synthetic non-axial `other` images, patient scores and the card's JSON."""
import json

import numpy as np
import torch

from training import data, metrics, nonaxial
from training.augment import AIR_HU, AugmentConfig, body_fill, pair_composite
from training.tools import card_metrics, hold_out, lso_table


def _crop(n=3, size=48):
    """Images that one 'thigh' fills (body fill ~0.8), as the sarcoma crops do."""
    hu = torch.full((n, 1, size, size), 40.0)
    hu[:, :, :, :5] = AIR_HU
    hu[:, :, 20:28, 30:38] = 900.0  # femur, off-centre so that the mirror image differs
    return hu


def test_pair_composite_makes_two_mirrored_small_copies_on_air():
    hu = _crop()
    eligible = torch.tensor([True, False, True])
    out = pair_composite(hu, eligible, AugmentConfig(pair_p=1.0), torch.Generator().manual_seed(0))
    assert torch.equal(out[1], hu[1])  # not eligible: untouched
    for i in (0, 2):
        img = out[i, 0]
        assert body_fill(out[i:i + 1]) < 0.5 * body_fill(hu[i:i + 1])  # shrunk, air around
        assert img[0].eq(AIR_HU).all() and img[-1].eq(AIR_HU).all()  # air above and below
        bone = (img > 300).any(0).int()
        runs = int((bone[1:] - bone[:-1]).eq(1).sum() + bone[0])
        assert runs == 2  # two femurs, apart
    assert torch.equal(hu, _crop())  # the input batch is not modified


def test_true_size_pairs_copy_the_body_unscaled_and_leave_wide_bodies_alone():
    hu = torch.full((2, 1, 48, 48), AIR_HU)
    hu[0, :, 20:30, 22:28] = 40.0  # one "thigh", 6 wide and 10 high, at its true size
    hu[1, :, 20:30, 4:44] = 40.0  # already wide (a full-field pelvis): left alone
    cfg = AugmentConfig(pair_p=1.0, pair_true_size=True, pair_min_fill=0.0)
    out = pair_composite(hu, torch.tensor([True, True]), cfg, torch.Generator().manual_seed(3))
    assert torch.equal(out[1], hu[1])
    body = out[0, 0] > -500
    assert body.any(1).nonzero().squeeze(1).tolist() == list(range(20, 30))  # rows kept
    assert int(body.sum()) in range(100, 121)  # two copies of 60 pixels (they may overlap by a column)


def test_pair_composite_is_seeded():
    hu, e = _crop(), torch.ones(3, dtype=torch.bool)
    cfg = AugmentConfig(pair_p=1.0)
    a = pair_composite(hu, e, cfg, torch.Generator().manual_seed(5))
    b = pair_composite(hu, e, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_nonaxial_images_come_from_the_split_series_only(synthetic_dataset):
    ds = data.load(synthetic_dataset)
    train_series = len(set(ds.series_uid[ds.split == "train"]))
    images, kinds = nonaxial.make(ds, "train", seed=1)
    assert images.shape == (4 * train_series, ds.input_size, ds.input_size) and images.dtype == np.uint16
    assert sorted(set(kinds.tolist())) == sorted(nonaxial.KINDS)
    again, _ = nonaxial.make(ds, "train", seed=1)
    assert np.array_equal(images, again)
    test_images, _ = nonaxial.make(ds, "test", seed=1)
    assert len(test_images) == 4 * len(set(ds.series_uid[ds.split == "test"]))
    # a corner is air: the planes are placed on air, never stretched over the whole image
    hu = images.astype(np.int32) - ds.hu_offset
    assert (hu == AIR_HU).mean() > 0.05
    # too few slices per series: nothing
    none, _ = nonaxial.make(ds, "train", seed=1, min_slices=1000)
    assert none.shape == (0, ds.input_size, ds.input_size)


def test_patient_error_is_by_majority_vote():
    C = 3
    onehot = lambda pred: np.eye(C)[pred]
    # p1: labels 0,0,1, predictions 0,1,1 → majority 0 vs 1 (tie in prediction? no: 1 twice)
    # p2: labels 2,2, predictions 2,0 → tie 0/2 in prediction, first in class order = 0 → wrong
    # p3: all right; the ambiguous slice (-1) is ignored
    targets = np.array([0, 0, 1, 2, 2, 1, 1, -1])
    pred = np.array([0, 1, 1, 2, 0, 1, 1, 0])
    patients = np.array(["p1", "p1", "p1", "p2", "p2", "p3", "p3", "p3"])
    r = metrics.patient_report(onehot(pred), targets, patients)
    assert r["patients"] == 3 and r["errors"] == 2 and r["patient_error"] == 2 / 3
    assert r["with_error"] == 2 and r["any_slice_error"] == 2 / 3
    assert np.isclose(r["mean_patient_slice_error"], (1 / 3 + 1 / 2 + 0) / 3)


def test_card_metrics_copies_the_rust_figures():
    rust = {"format": "anatomy-node-eval/1", "splits": ["test"],
            "dataset": {"size": 192, "seed": 2015, "split_ratios": [0.6, 0.2, 0.2], "labels": "labels.csv"},
            "slice": {"error": 0.03, "mean_auc": 0.99, "auc": {"neck": 1.0, "other": 0.98}},
            "patient": {"error": 0.1}, "calibration": {"ece": 0.02}}
    doc = card_metrics.card_metrics(rust, {"test": {"nonaxial": {"images": 4}, "pairs": {"images": 2}}})
    assert (doc["slice_error"], doc["mean_auc"], doc["patient_error"], doc["ece"]) == (0.03, 0.99, 0.1, 0.02)
    assert doc["per_class_auc"] == {"neck": 1.0, "other": 0.98} and doc["dataset"]["seed"] == 2015
    assert doc["slice"] == rust["slice"] and doc["synthetic_checks"]["nonaxial_other"] == {"images": 4}
    json.dumps(doc)


def test_hold_out_moves_a_subject(synthetic_dataset, tmp_path):
    src = data.pack(synthetic_dataset, tmp_path / "a.npz")
    hold_out.main([str(src), str(tmp_path / "b.npz"), "--subjects", "synthetic-0", "--to", "test"])
    a, b = data.load(src), data.load(tmp_path / "b.npz")
    key = hold_out.patient_key("synthetic-0")
    assert (a.split[a.patient_key == key] == "train").all() and (b.split[b.patient_key == key] == "test").all()
    assert np.array_equal(a.split[a.patient_key != key], b.split[b.patient_key != key])


def test_hold_out_a_source_leaves_it_alone_in_test(synthetic_dataset, tmp_path):
    src = data.pack(synthetic_dataset, tmp_path / "a.npz")
    labels = tmp_path / "labels.csv"
    # synthetic-11 is not in this labels.csv: the prefix picks synthetic-1 (train) and -10 (test)
    labels.write_text("case_id,label\n" + "".join(f"synthetic-{p},neck\n" for p in range(11)))
    hold_out.main([str(src), str(tmp_path / "b.npz"), "--source", "synthetic-1", "--labels", str(labels),
                   "--to", "test", "--rest-to", "train"])
    a, b = data.load(src), data.load(tmp_path / "b.npz")
    key = {p: hold_out.patient_key(f"synthetic-{p}") for p in (1, 10, 11)}
    assert set(b.patient_key[b.split == "test"]) == {key[1], key[10]}
    assert (a.split[a.patient_key == key[11]] == "test").all() and (b.split[b.patient_key == key[11]] == "train").all()
    assert np.array_equal(a.split[a.split == "val"], b.split[a.split == "val"])


def test_lso_table_counts_the_errors_of_each_left_out_source(tmp_path, capsys):
    run = tmp_path / "ctmed" / "train"
    run.mkdir(parents=True)
    classes = ["neck", "lungs", "liver", "other"]
    (run / "config.json").write_text(json.dumps({"classes": classes}))
    report = {"images": 10, "error": 0.3, "mean_auc": 0.9, "auc": {"neck": float("nan"), "lungs": 0.9},
              "confusion": [[0, 0, 0, 0], [0, 6, 1, 1], [0, 0, 1, 0], [0, 1, 0, 0]]}
    (run / "metrics.json").write_text(json.dumps({"test": report}))
    assert lso_table.main([str(tmp_path), "ctmed", "sts"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == ("| ctmed | 10 | 30.0 % (3) | 0.9000 (1 classes) | "
                      "lungs 2/8 (1 liver, 1 other); liver 0/1; other 1/1 (1 lungs) |")
    assert out[3].startswith("| sts | no run at ")
