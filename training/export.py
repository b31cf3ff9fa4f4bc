"""Checkpoint → ONNX model file as docs/contracts.md ("Model file") defines it.

Uses torch's TorchScript-based exporter (dynamo=False): it runs on CPU, needs only the `onnx`
package besides torch (the dynamo exporter also needs onnxscript), folds BatchNorm into the
convolutions, and emits plain opset-17 operators.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .train import load_checkpoint

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"


class ExportWrapper(nn.Module):
    """logits / T, then softmax: the graph outputs calibrated probabilities."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("inv_temperature", torch.tensor(1.0 / temperature, dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(image) * self.inv_temperature, dim=1)


def metadata(ckpt: dict, model_version: str | None = None, trained_on: str | None = None) -> dict[str, str]:
    """The contract's metadata_props; every value a string, JSON where the contract says so."""
    low, high = ckpt["hu_window"]
    fmt = lambda v: json.dumps(int(v) if float(v).is_integer() else float(v))
    meta = {
        "classes": json.dumps(list(ckpt["classes"])),
        "input_size": str(int(ckpt["input_size"])),
        "hu_window": f"[{fmt(low)}, {fmt(high)}]",
        "normalization": "unit",
        "model_version": model_version or ckpt["model_version"],
        "trained_on": trained_on or ckpt["trained_on"],
        "temperature": repr(float(ckpt["temperature"])),
    }
    if ckpt.get("field_of_view_mm"):
        # the node then shows the model this many millimetres of every image (docs/contracts.md)
        meta["field_of_view_mm"] = fmt(ckpt["field_of_view_mm"])
    if ckpt.get("framing", "whole") != "whole":
        # the node then cuts the square around the body out of every image (docs/contracts.md)
        meta["framing"] = ckpt["framing"]
    return meta


def export(checkpoint: str | Path, out: str | Path, model_version: str | None = None,
           verify: bool = True, trained_on: str | None = None) -> dict[str, str]:
    import onnx

    model, ckpt = load_checkpoint(checkpoint, "cpu")
    wrapper = ExportWrapper(model, ckpt["temperature"]).eval()
    S = int(ckpt["input_size"])
    example = torch.zeros(2, 1, S, S)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # torch ≥ 2.9 flags the TorchScript exporter as legacy; it is chosen on purpose (above)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper, (example,), buf, dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            # only the batch is dynamic: the node checks S against the input's fixed dims
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buf.getvalue())
    meta = metadata(ckpt, model_version, trained_on)
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "anatomy-node training"
    proto.doc_string = f"{meta['model_version']}: axial CT body-region classifier; {meta['trained_on']}"
    onnx.checker.check_model(proto)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, out)
    if verify:
        verify_parity(out, model, ckpt["temperature"])
    return meta


def verify_parity(onnx_path, model: nn.Module, temperature: float, batch: int = 3, tol: float = 1e-4) -> float:
    """Random inputs in [0,1] through ONNX Runtime and torch; returns the max abs difference."""
    try:
        import onnxruntime as ort
    except ImportError:  # export must not need it; the tests do
        return float("nan")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    S = sess.get_inputs()[0].shape[-1]
    x = torch.rand(batch, 1, S, S, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ExportWrapper(model, temperature).eval()(x).numpy()
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    diff = float(np.abs(ref - got).max())
    if diff > tol:
        raise RuntimeError(f"{onnx_path}: ONNX Runtime differs from torch by {diff:.2e} (> {tol})")
    return diff


def read_metadata(onnx_path) -> dict[str, str]:
    """metadata_props as ONNX Runtime sees them (what the node will read)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return dict(sess.get_modelmeta().custom_metadata_map)


def check_metadata(meta: dict[str, str], input_shape=None, num_outputs=None) -> list[str]:
    """The node's acceptance rules, in Python: returns the problems (empty when valid)."""
    problems = []
    for key in ("classes", "input_size", "hu_window", "normalization", "model_version", "trained_on"):
        if key not in meta:
            problems.append(f"missing {key}")
    if problems:
        return problems
    classes = json.loads(meta["classes"])
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        problems.append("classes: not a non-empty JSON list of strings")
    if classes[:5] != ["neck", "lungs", "liver", "pelvis", "legs"]:
        problems.append("classes: must start with neck, lungs, liver, pelvis, legs")
    S = int(meta["input_size"])
    low, high = json.loads(meta["hu_window"])
    if not low < high:
        problems.append("hu_window: low >= high")
    if meta["normalization"] != "unit":
        problems.append(f"normalization: {meta['normalization']!r}")
    if input_shape is not None and list(input_shape[-2:]) != [S, S]:
        problems.append(f"input_size {S} but input dims {input_shape}")
    if num_outputs is not None and num_outputs != len(classes):
        problems.append(f"{len(classes)} classes but {num_outputs} outputs")
    if "temperature" in meta and not float(meta["temperature"]) > 0:
        problems.append("temperature: not > 0")
    if "field_of_view_mm" in meta and not 10 <= float(meta["field_of_view_mm"]) <= 2000:
        problems.append("field_of_view_mm: not between 10 and 2000")
    if meta.get("framing", "whole") not in ("whole", "body"):
        problems.append(f"framing: {meta['framing']!r} is neither 'whole' nor 'body'")
    if meta.get("framing") == "body" and "field_of_view_mm" in meta:
        problems.append("framing: 'body' and field_of_view_mm exclude each other")
    return problems
