import json

import numpy as np
import pytest
import torch

from training import data


def test_folder_reads_contract(synthetic_dataset):
    ds = data.load(synthetic_dataset)
    info = json.loads((synthetic_dataset / "dataset.json").read_text())
    assert len(ds) == info["images"]
    assert ds.images.dtype == np.uint16 and ds.images.shape[1:] == (32, 32)
    assert ds.input_size == info["input_size"]
    assert set(ds.split) == {"train", "val", "test"}
    t = ds.targets()
    # ambiguous is kept in the dataset but never a class
    assert ((t == -1) == (ds.label == "ambiguous")).all()
    assert set(t[t >= 0]) == set(range(len(data.CLASSES)))


def test_pack_round_trip(synthetic_dataset, tmp_path):
    out = data.pack(synthetic_dataset, tmp_path / "ds.npz")
    a, b = data.load(synthetic_dataset), data.load(out)
    assert np.array_equal(a.images, b.images) and b.images.dtype == np.uint16
    for col in ("image", "patient_key", "series_uid", "label", "label_source", "split"):
        assert list(getattr(a, col)) == list(getattr(b, col)), col
    assert np.allclose(a.z_mm, b.z_mm, equal_nan=True)
    assert a.info == b.info and a.hu_offset == b.hu_offset == 32768
    # numpy alone reads it back: no pickled objects
    with np.load(out, allow_pickle=False) as z:
        assert json.loads(str(z["dataset_json"]))["format"] == data.DATASET_FORMAT


def test_limit_keeps_every_split(synthetic_dataset):
    ds = data.load(synthetic_dataset, limit=40)
    assert len(ds) == 40 and set(ds.split) == {"train", "val", "test"}


def test_unknown_label_is_refused(synthetic_dataset):
    ds = data.load(synthetic_dataset)
    ds.label = ds.label.astype(object)
    ds.label[0] = "abdomen"
    with pytest.raises(ValueError, match="abdomen"):
        ds.targets()


def test_hu_values_survive_png(synthetic_dataset):
    ds = data.load(synthetic_dataset)
    hu = ds.images.astype(np.int32) - ds.hu_offset
    assert hu.min() < -900 and hu.max() > 600  # air and bone of the phantoms


def test_to_unit_matches_contract():
    hu = torch.tensor([-2000.0, -100.0, 50.0, 200.0, 3000.0])
    assert torch.allclose(data.to_unit(hu, -100, 200), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert np.allclose(data.to_unit(hu.numpy(), -100, 200), [0, 0, 0.5, 1, 1])


def test_npz_needs_only_numpy_and_torch(synthetic_dataset, tmp_path):
    """The GPU machine may lack Pillow/onnx: loading a .npz and training must not import them."""
    import subprocess
    import sys
    from pathlib import Path

    npz = data.pack(synthetic_dataset, tmp_path / "ds.npz")
    code = (
        "import sys\n"
        "for m in ('PIL', 'onnx', 'onnxruntime'): sys.modules[m] = None  # any import now fails\n"
        "from training import cli\n"
        f"cli.main(['train', '--data', {str(npz)!r}, '--out', {str(tmp_path / 'run')!r}, '--epochs', '1',"
        " '--width', '4', '--limit', '40', '--batch-size', '8'])\n"
    )
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "model.pt").exists()
