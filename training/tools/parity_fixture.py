"""Write a parity fixture so the Rust side can check its inference against PyTorch.

    python -m training.tools.parity_fixture --checkpoint run/model.pt [--onnx model.onnx]
        [--data dataset-or.npz] [--count 8] --out fixture/

Writes to --out:
  hu.npy             float32 [N, S, S]     HU before windowing (from --data, else synthetic)
  input.npy          float32 [N, 1, S, S]  the contract's preprocessing: window + unit normalisation
  probabilities.npy  float32 [N, C]        the checkpoint's calibrated softmax, computed by torch
  fixture.json       classes, input_size, hu_window, temperature, images, and (with --onnx) the
                     max |ONNX Runtime - torch| on the same input
The Rust test feeds input.npy to its ONNX session and compares with probabilities.npy (and may
window hu.npy itself and compare with input.npy).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make `import training` work
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.data import load, to_unit  # noqa: E402
from training.export import INPUT_NAME, OUTPUT_NAME, ExportWrapper  # noqa: E402
from training.train import load_checkpoint  # noqa: E402


def synthetic_hu(count: int, size: int, seed: int) -> np.ndarray:
    """Deterministic HU slices covering the whole window and both clamps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.full((count, size, size), -1024.0, np.float32)
    for i in range(count):
        body = ((yy - 0.5) / rng.uniform(0.25, 0.4)) ** 2 + ((xx - 0.5) / rng.uniform(0.3, 0.45)) ** 2 <= 1
        out[i][body] = rng.normal(40, 60, body.sum())
        out[i][body & (np.abs(xx - 0.5) < 0.05)] = 700  # "bone" above the window
    return out


def write_fixture(checkpoint, out, data=None, onnx_path=None, count=8, seed=0) -> dict:
    model, ckpt = load_checkpoint(checkpoint, "cpu")
    S, (low, high) = int(ckpt["input_size"]), ckpt["hu_window"]
    if data:
        ds = load(data)
        idx = np.unique(np.linspace(0, len(ds) - 1, min(count, len(ds))).round().astype(int))
        hu = ds.images[idx].astype(np.float32) - ds.hu_offset
        source = f"{data} rows {idx.tolist()}"
    else:
        hu, source = synthetic_hu(count, S, seed), f"synthetic seed {seed}"
    if hu.shape[1:] != (S, S):
        raise SystemExit(f"images are {hu.shape[1:]}, the model wants {S}x{S}")
    x = to_unit(torch.from_numpy(hu), low, high).unsqueeze(1).float().contiguous()
    with torch.no_grad():
        probs = ExportWrapper(model, ckpt["temperature"]).eval()(x).numpy()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "hu.npy", hu)
    np.save(out / "input.npy", x.numpy())
    np.save(out / "probabilities.npy", probs.astype(np.float32))
    info = {"classes": ckpt["classes"], "input_size": S, "hu_window": [low, high],
            "normalization": "unit", "temperature": ckpt["temperature"], "images": int(len(hu)),
            "source": source, "input": INPUT_NAME, "output": OUTPUT_NAME}
    if onnx_path:
        import onnxruntime as ort
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        info["onnx"] = str(onnx_path)
        info["onnx_max_abs_diff"] = float(np.abs(got - probs).max())
    (out / "fixture.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model.pt written by `python -m training train`")
    p.add_argument("--onnx", default=None, help="also run this ONNX model and record its max difference")
    p.add_argument("--data", default=None, help="dataset folder or .npz to take images from (default: synthetic)")
    p.add_argument("--count", type=int, default=8, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    p.add_argument("--out", required=True, help="output folder")
    a = p.parse_args(argv)
    info = write_fixture(a.checkpoint, a.out, a.data, a.onnx, a.count, a.seed)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
