"""End to end on the synthetic dataset: train on CPU → checkpoint → ONNX → metadata + parity."""
import json

import numpy as np
import pytest
import torch

from training import cli, data
from training.export import ExportWrapper, check_metadata, export, read_metadata
from training.tools.parity_fixture import write_fixture
from training.train import TrainConfig, load_checkpoint, run

ort = pytest.importorskip("onnxruntime")


def _cfg(ds, out, **kw):
    base = dict(data=str(ds), out=str(out), epochs=10, batch_size=16, width=16, lr=3e-3,
                patience=0, seed=11, model_version="test-model-1", device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(synthetic_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(2)
    scores = run(_cfg(synthetic_dataset, out), log=lambda *_: None)
    onnx_path = out / "model.onnx"
    export(out / "model.pt", onnx_path)
    return out, scores, onnx_path


def test_training_learns_the_synthetic_classes(trained):
    out, scores, _ = trained
    assert scores["test"]["error"] <= 0.2 and scores["test"]["mean_auc"] >= 0.95
    assert (out / "model.pt").exists() and (out / "metrics.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hu_window"] == [-100.0, 200.0] and cfg["input_size"] == 32


def test_onnx_metadata_is_the_contract(trained):
    out, scores, onnx_path = trained
    meta = read_metadata(onnx_path)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "image" and outp.name == "probabilities"
    assert inp.shape[1:] == [1, 32, 32] and not isinstance(inp.shape[0], int)  # dynamic batch
    assert check_metadata(meta, inp.shape, outp.shape[1]) == []
    assert json.loads(meta["classes"]) == list(data.CLASSES)
    assert meta["input_size"] == "32" and json.loads(meta["hu_window"]) == [-100, 200]
    assert meta["normalization"] == "unit" and meta["model_version"] == "test-model-1"
    assert "12 patients" in meta["trained_on"]
    assert float(meta["temperature"]) == pytest.approx(scores["temperature"])
    assert all(isinstance(v, str) for v in meta.values())
    assert "field_of_view_mm" not in meta  # the synthetic dataset is fitted whole
    assert "framing" not in meta


def test_check_metadata_names_the_bad_key():
    good = {"classes": json.dumps(list(data.CLASSES)), "input_size": "64", "hu_window": "[-100, 200]",
            "normalization": "unit", "model_version": "x", "trained_on": "y"}
    assert check_metadata(good, [None, 1, 64, 64], 6) == []
    assert any("hu_window" in p for p in check_metadata(good | {"hu_window": "[200, -100]"}))
    assert any("normalization" in p for p in check_metadata(good | {"normalization": "zscore"}))
    assert any("classes" in p for p in check_metadata(good, None, 5))
    assert check_metadata({k: v for k, v in good.items() if k != "trained_on"}) == ["missing trained_on"]
    assert check_metadata(good | {"field_of_view_mm": "500"}) == []
    assert any("field_of_view_mm" in p for p in check_metadata(good | {"field_of_view_mm": "0"}))
    assert check_metadata(good | {"framing": "body"}) == []
    assert any("framing" in p for p in check_metadata(good | {"framing": "tight"}))
    assert any("framing" in p for p in check_metadata(good | {"framing": "body", "field_of_view_mm": "500"}))


def test_the_datasets_field_of_view_reaches_the_model(synthetic_dataset, tmp_path):
    import shutil
    folder = tmp_path / "fov"
    shutil.copytree(synthetic_dataset, folder)
    info = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps(info | {"field_of_view_mm": 480.0}))
    assert cli.main(["pack", str(folder), str(tmp_path / "ds.npz")]) == 0
    assert cli.main(["train", "--data", str(tmp_path / "ds.npz"), "--out", str(tmp_path / "run"), "--epochs", "1",
                     "--width", "8", "--batch-size", "16", "--limit", "30"]) == 0
    assert cli.main(["export", str(tmp_path / "run" / "model.pt"), str(tmp_path / "m.onnx")]) == 0
    meta = read_metadata(tmp_path / "m.onnx")
    assert meta["field_of_view_mm"] == "480"


def test_a_body_framed_dataset_makes_a_body_framed_model(synthetic_dataset, tmp_path):
    import shutil
    folder = tmp_path / "body"
    shutil.copytree(synthetic_dataset, folder)
    info = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps(info | {"framing": "body"}))
    assert cli.main(["train", "--data", str(folder), "--out", str(tmp_path / "run"), "--epochs", "1",
                     "--width", "8", "--batch-size", "16", "--limit", "30"]) == 0
    assert cli.main(["export", str(tmp_path / "run" / "model.pt"), str(tmp_path / "m.onnx")]) == 0
    meta = read_metadata(tmp_path / "m.onnx")
    assert meta["framing"] == "body" and "field_of_view_mm" not in meta


def test_an_unknown_framing_is_refused(synthetic_dataset, tmp_path):
    import shutil
    folder = tmp_path / "odd"
    shutil.copytree(synthetic_dataset, folder)
    info = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps(info | {"framing": "tight"}))
    with pytest.raises(ValueError, match="framing 'tight'"):
        data.load(folder).framing


def test_onnx_matches_torch_on_preprocessed_images(trained, synthetic_dataset):
    out, _, onnx_path = trained
    ds = data.load(synthetic_dataset)
    x = data.to_unit(torch.from_numpy(ds.images[:17].astype(np.float32) - ds.hu_offset), -100, 200).unsqueeze(1)
    model, ckpt = load_checkpoint(out / "model.pt")
    with torch.no_grad():
        ref = ExportWrapper(model, ckpt["temperature"]).eval()(x).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for batch in (x[:1], x):  # batch size is dynamic
        got = sess.run(["probabilities"], {"image": batch.numpy()})[0]
        assert np.abs(got - ref[:len(batch)]).max() < 1e-4
        assert np.allclose(got.sum(1), 1, atol=1e-5)


def test_parity_fixture(trained, synthetic_dataset, tmp_path):
    out, _, onnx_path = trained
    info = write_fixture(out / "model.pt", tmp_path, data=str(synthetic_dataset), onnx_path=onnx_path, count=5)
    assert info["onnx_max_abs_diff"] < 1e-4
    x, p = np.load(tmp_path / "input.npy"), np.load(tmp_path / "probabilities.npy")
    assert x.shape == (5, 1, 32, 32) and x.dtype == np.float32 and p.shape == (5, 6)
    hu = np.load(tmp_path / "hu.npy")
    assert np.allclose(data.to_unit(hu, -100, 200), x[:, 0])


def test_same_seed_same_model(synthetic_dataset, tmp_path):
    states = []
    for name in ("a", "b"):
        run(_cfg(synthetic_dataset, tmp_path / name, epochs=2, width=8), log=lambda *_: None)
        states.append(torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_cli_pack_train_export_evaluate(synthetic_dataset, tmp_path, capsys):
    npz = tmp_path / "ds.npz"
    assert cli.main(["pack", str(synthetic_dataset), str(npz)]) == 0
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--data", str(npz), "--out", str(run_dir), "--epochs", "1", "--width", "8",
                     "--batch-size", "16", "--hu-window=-150,250", "--limit", "60"]) == 0
    assert cli.main(["export", str(run_dir / "model.pt"), str(tmp_path / "m.onnx"), "--model-version", "cli-1"]) == 0
    meta = read_metadata(tmp_path / "m.onnx")
    assert meta["hu_window"] == "[-150, 250]" and meta["model_version"] == "cli-1"
    assert cli.main(["evaluate", str(tmp_path / "m.onnx"), "--data", str(npz), "--splits", "val,test",
                     "--json", str(tmp_path / "r.json")]) == 0
    assert set(json.loads((tmp_path / "r.json").read_text())) == {"val", "test"}
    assert "meanAUC" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["pack", "train", "export", "evaluate"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text


def test_trains_without_validation_patients(tmp_path):
    """No val split: nothing to stop early on or calibrate with; keep the last epoch, T = 1."""
    import csv

    from training.tests.synthetic import write_dataset

    ds = write_dataset(tmp_path / "ds", patients=4, per_class=1)
    with open(ds / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["split"] = "train"
    with open(ds / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    scores = run(_cfg(ds, tmp_path / "run", epochs=2, width=4), log=lambda *_: None)
    assert scores["best_epoch"] == 2 and scores["temperature"] == 1.0 and "val" not in scores


def test_weight_average_follows_the_weights_with_a_ramped_decay():
    from training.train import WeightAverage

    model = torch.nn.BatchNorm1d(2)
    average = WeightAverage(model, 0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)  # the initial weight is 1
        model.running_mean.fill_(2.0)
        model.num_batches_tracked.fill_(7)
    average.update(model)  # first decay: min(0.9, 1/10) = 0.1
    assert torch.allclose(average.model.weight, torch.full((2,), 0.1 * 1 + 0.9 * 3))
    assert torch.allclose(average.model.running_mean, torch.full((2,), 0.9 * 2))
    assert int(average.model.num_batches_tracked) == 7
    average.update(model)  # second decay: min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(average.model.weight, torch.full((2,), d * 2.8 + (1 - d) * 3))
    assert not average.model.weight.requires_grad
    with pytest.raises(ValueError, match="ema 1.0"):
        WeightAverage(model, 1.0)


def test_a_run_with_a_weight_average_keeps_and_exports_the_average(trained, synthetic_dataset, tmp_path):
    plain_dir, plain, _ = trained
    averaged = run(_cfg(synthetic_dataset, tmp_path, ema=0.9), log=lambda *_: None)
    assert averaged["test"]["error"] <= 0.2 and averaged["test"]["mean_auc"] >= 0.95
    a = torch.load(plain_dir / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "model.pt", weights_only=True)
    assert a["train_config"]["ema"] == 0.0 and b["train_config"]["ema"] == 0.9
    assert any(not torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert plain["val"]["nll"] != averaged["val"]["nll"]
    export(tmp_path / "model.pt", tmp_path / "model.onnx")
    assert check_metadata(read_metadata(tmp_path / "model.onnx")) == []


def test_keep_last_keeps_the_final_epoch_whatever_validation_says(synthetic_dataset, tmp_path):
    # patience 1 would stop a "best" run at the first epoch without improvement; "last" never stops
    scores = run(_cfg(synthetic_dataset, tmp_path, epochs=4, patience=1, keep="last"), log=lambda *_: None)
    assert scores["best_epoch"] == 4 and len(scores["history"]) == 4
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert ckpt["train_config"]["keep"] == "last"
    with pytest.raises(ValueError, match="keep 'first'"):
        run(_cfg(synthetic_dataset, tmp_path / "bad", keep="first"), log=lambda *_: None)
