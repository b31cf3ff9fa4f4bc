"""Ensembles: two short runs on the synthetic dataset → one checkpoint → ONNX with the contract."""
import json

import numpy as np
import pytest
import torch

from training import calibrate, cli, data
from training.ensemble import EnsembleError, combine
from training.export import check_metadata, export, read_metadata
from training.train import TrainConfig, hu_tensor, load_checkpoint, predict_logits, run

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def members(synthetic_dataset, tmp_path_factory):
    torch.set_num_threads(2)
    paths = []
    for seed in (11, 12):
        out = tmp_path_factory.mktemp(f"member{seed}")
        run(TrainConfig(data=str(synthetic_dataset), out=str(out), epochs=4, batch_size=16, width=8,
                        lr=3e-3, patience=0, seed=seed, model_version=f"member-{seed}", device="cpu"),
            log=lambda *_: None)
        paths.append(out / "model.pt")
    return paths


@pytest.fixture(scope="module")
def combined(members, synthetic_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble") / "ensemble.pt"
    scores = combine(members, synthetic_dataset, out, model_version="ensemble-1", log=lambda *_: None)
    return out, scores


def _val(ds, classes):
    targets = ds.targets(classes)
    keep = (ds.split == "val") & (targets >= 0)
    return hu_tensor(ds.subset(keep), "cpu"), torch.from_numpy(targets[keep])


def test_the_ensemble_answers_the_mean_of_its_members_logits(members, combined):
    net, ckpt = load_checkpoint(combined[0])
    nets = [load_checkpoint(p)[0] for p in members]
    x = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        expected = (nets[0](x) + nets[1](x)) / 2
        assert torch.allclose(net(x), expected, atol=1e-6)
    assert ckpt["model_version"] == "ensemble-1" and ckpt["classes"] == list(data.CLASSES)
    assert [m["seed"] for m in ckpt["metrics"]["members"]] == [11, 12]


def test_one_temperature_is_fitted_on_the_validation_patients(members, combined, synthetic_dataset):
    _, scores = combined
    ds = data.load(synthetic_dataset)
    hu, targets = _val(ds, data.CLASSES)
    nets = [load_checkpoint(p)[0] for p in members]
    mean = sum(predict_logits(n, hu, -100.0, 200.0, 64) for n in nets) / 2
    assert scores["temperature"] == pytest.approx(calibrate.fit_temperature(mean, targets), rel=1e-6)
    assert scores["val"]["images"] == len(targets) and "test" in scores


def test_the_exported_ensemble_keeps_the_contract_and_matches_torch(combined, synthetic_dataset, tmp_path):
    ckpt_path, scores = combined
    onnx_path = tmp_path / "ensemble.onnx"
    export(ckpt_path, onnx_path)  # verifies ONNX Runtime against torch itself, too
    meta = read_metadata(onnx_path)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert check_metadata(meta, sess.get_inputs()[0].shape, sess.get_outputs()[0].shape[1]) == []
    assert meta["model_version"] == "ensemble-1"
    assert float(meta["temperature"]) == pytest.approx(scores["temperature"])

    net, _ = load_checkpoint(ckpt_path)
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        expected = torch.softmax(net(x) / scores["temperature"], 1).numpy()
    got = sess.run(["probabilities"], {"image": x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4


def test_evaluate_scores_an_ensemble_checkpoint(combined, synthetic_dataset, tmp_path):
    ckpt_path, scores = combined
    report = tmp_path / "report.json"
    assert cli.main(["evaluate", str(ckpt_path), "--data", str(synthetic_dataset), "--splits", "test",
                     "--json", str(report)]) == 0
    assert json.loads(report.read_text())["test"]["error"] == pytest.approx(scores["test"]["error"])


def test_members_must_share_the_contract_and_the_data(members, synthetic_dataset, tmp_path):
    with pytest.raises(EnsembleError, match="at least two"):
        combine(members[:1], synthetic_dataset, tmp_path / "one.pt", log=lambda *_: None)
    ckpt = torch.load(members[1], weights_only=True)
    ckpt["trained_on"] = "another dataset"
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    with pytest.raises(EnsembleError, match=r"other\.pt: trained_on"):
        combine([members[0], other], synthetic_dataset, tmp_path / "bad.pt", log=lambda *_: None)
    with pytest.raises(SystemExit, match="ensemble: .*trained_on"):
        cli.main(["ensemble", str(members[0]), str(other), "--data", str(synthetic_dataset),
                  "--out", str(tmp_path / "bad.pt")])
    assert not (tmp_path / "bad.pt").exists()
