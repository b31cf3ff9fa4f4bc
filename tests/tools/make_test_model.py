#!/usr/bin/env python3
"""Small ONNX models that follow docs/contracts.md "Model file", for tests/model.rs and
benches/inference.rs. Needs only `onnx` and `numpy` (tests/tools/requirements.txt).

Usage: make_test_model.py OUT.onnx [--size S] [--classes a,b,c] [--kind stats|conv|nan]
           [--temperature T] [--drop-key KEY]... [--set-key KEY=VALUE]...
           [--input-name NAME] [--output-name NAME] [--channels K] [--dynamic-size]

Kinds (every weight is fixed, so the same command writes the same file):
  stats  four quadrant means q = [top-left, top-right, bottom-left, bottom-right] (one
         AveragePool with an (S/2)x(S/2) kernel), logits = q @ W + b, then
         softmax(logits / T). W and b are written to OUT.json (next to OUT.onnx), so a test
         can compute the expected probabilities itself, and a transposed or flipped input
         gives different numbers. S must be even.
  conv   a tiny CNN (5x5/2 conv 8, ReLU, 2x2 max-pool, 3x3/2 conv 16, ReLU, global average
         pool, linear, softmax) with seeded weights: realistic operators for the bench.
  nan    like stats, but every probability is NaN (the node must refuse such output).

The contract's metadata_props are written with values that match the graph; --drop-key and
--set-key break them on purpose (a key missing, classes length != C, input_size != S, a bad
hu_window, an unknown normalization), --input-name/--output-name/--channels break the
graph's interface.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # the contract's minimum
IR_VERSION = 8  # the lowest IR that carries opset 17; every ONNX Runtime >= 1.13 reads it
DEFAULT_CLASSES = "neck,lungs,liver,pelvis,legs,other"


def stats_weights(classes: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """W [4*channels, C], b [C]: each class prefers a different mix of quadrants, and the
    numbers are large enough that the softmax is far from uniform on [0, 1] inputs."""
    features = 4 * channels
    w = np.zeros((features, classes), np.float32)
    for c in range(classes):
        for f in range(features):
            w[f, c] = ((c + 1) * (f + 2) % 7 - 3) * 1.5
    b = np.array([0.1 * c - 0.2 for c in range(classes)], np.float32)
    return w, b


def stats_graph(size: int, classes: int, channels: int, temperature: float, nan: bool):
    """Nodes and initializers from `image` [N,K,S,S] to `logits_scaled` [N,C]."""
    if size % 2:
        raise SystemExit(f"--kind stats needs an even --size, got {size}")
    half = size // 2
    w, b = stats_weights(classes, channels)
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(b, "B"),
        numpy_helper.from_array(np.array(1.0 / temperature, np.float32), "inv_t"),
    ]
    nodes = [
        helper.make_node("AveragePool", ["image"], ["quadrants"], kernel_shape=[half, half], strides=[half, half]),
        helper.make_node("Flatten", ["quadrants"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "W", "B"], ["logits"]),
    ]
    if nan:
        inits.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan"))
        nodes.append(helper.make_node("Mul", ["logits", "nan"], ["logits_nan"]))
        nodes.append(helper.make_node("Mul", ["logits_nan", "inv_t"], ["logits_scaled"]))
    else:
        nodes.append(helper.make_node("Mul", ["logits", "inv_t"], ["logits_scaled"]))
    params = {"kind": "stats", "W": w.tolist(), "b": b.tolist(), "temperature": temperature,
              "features": "quadrant means per channel: top-left, top-right, bottom-left, bottom-right"}
    return nodes, inits, params


def conv_graph(classes: int, channels: int, temperature: float, seed: int):
    rng = np.random.default_rng(seed)

    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    inits = [
        numpy_helper.from_array(he((8, channels, 5, 5), channels * 25), "c1_w"),
        numpy_helper.from_array(np.full(8, 0.01, np.float32), "c1_b"),
        numpy_helper.from_array(he((16, 8, 3, 3), 8 * 9), "c2_w"),
        numpy_helper.from_array(np.full(16, 0.01, np.float32), "c2_b"),
        numpy_helper.from_array(he((16, classes), 16), "fc_w"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"),
        numpy_helper.from_array(np.array(1.0 / temperature, np.float32), "inv_t"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "c1_w", "c1_b"], ["c1"], kernel_shape=[5, 5], strides=[2, 2], pads=[2, 2, 2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2_w", "c2_b"], ["c2"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["logits"]),
        helper.make_node("Mul", ["logits", "inv_t"], ["logits_scaled"]),
    ]
    return nodes, inits, {"kind": "conv", "seed": seed, "temperature": temperature}


def metadata(args, classes: list[str]) -> dict[str, str]:
    props = {
        "classes": json.dumps(classes),
        "input_size": str(args.size),
        "hu_window": "[-100, 200]",
        "normalization": "unit",
        "model_version": f"test-{args.kind}-{args.size}",
        "trained_on": "nothing: fixed weights written by tests/tools/make_test_model.py",
    }
    if args.temperature != 1.0:
        props["temperature"] = repr(args.temperature)
    for item in args.set_key:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set-key wants KEY=VALUE, got {item!r}")
        props[key] = value
    for key in args.drop_key:
        props.pop(key, None)
    return props


def build(args) -> tuple[onnx.ModelProto, dict]:
    classes = [c for c in args.classes.split(",") if c]
    if args.kind == "conv":
        nodes, inits, params = conv_graph(len(classes), args.channels, args.temperature, args.seed)
    else:
        nodes, inits, params = stats_graph(args.size, len(classes), args.channels, args.temperature, args.kind == "nan")
    # Rename the interface last, so every kind can get a wrong input or output name.
    nodes.append(helper.make_node("Softmax", ["logits_scaled"], [args.output_name], axis=1))
    for node in nodes:
        node.input[:] = [args.input_name if name == "image" else name for name in node.input]
    side = "S" if args.dynamic_size else args.size
    graph = helper.make_graph(
        nodes,
        f"anatomy-test-{args.kind}",
        [helper.make_tensor_value_info(args.input_name, TensorProto.FLOAT, ["N", args.channels, side, side])],
        [helper.make_tensor_value_info(args.output_name, TensorProto.FLOAT, ["N", len(classes)])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="make_test_model.py")
    model.ir_version = IR_VERSION
    for key, value in metadata(args, classes).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model, full_check=True)
    params.update({"classes": classes, "input_size": args.size, "channels": args.channels})
    return model, params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the .onnx file to write (parameters go to the same name with .json)")
    p.add_argument("--size", type=int, default=64, help="input side S (default 64)")
    p.add_argument("--classes", default=DEFAULT_CLASSES, help=f"comma-separated class names (default {DEFAULT_CLASSES})")
    p.add_argument("--kind", choices=["stats", "conv", "nan"], default="stats")
    p.add_argument("--temperature", type=float, default=1.0, help="divide the logits by T before the softmax (recorded in metadata when != 1)")
    p.add_argument("--drop-key", action="append", default=[], metavar="KEY", help="leave this metadata key out")
    p.add_argument("--set-key", action="append", default=[], metavar="KEY=VALUE", help="write this metadata value instead of the right one")
    p.add_argument("--input-name", default="image")
    p.add_argument("--output-name", default="probabilities")
    p.add_argument("--channels", type=int, default=1, help="input channels (the contract says 1)")
    p.add_argument("--dynamic-size", action="store_true", help="leave H and W symbolic instead of S")
    p.add_argument("--seed", type=int, default=2015, help="seed of the conv kind's weights")
    args = p.parse_args(argv)
    model, params = build(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out)
    out.with_suffix(".json").write_text(json.dumps(params, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
