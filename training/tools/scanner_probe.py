"""How much does each scanner/protocol change move a model? (a diagnostic, no training)

    python training/tools/scanner_probe.py models/anatomy.onnx training/runs/shipped/dataset.npz \
        --split test [--seeds 0,1,2] [--threads 1]

Applies each part of augment.scanner_variation (soft kernel, sharp kernel, low-dose noise,
contrast phase, reconstruction circle, couch top) to every image of a split, with probability 1
and the AugmentConfig magnitudes, and scores the ONNX model on the result: slice error and the
share of slices whose prediction changed, per part (mean over the seeds). A part that moves
many predictions is a shift the model is not robust to, which the training augmentation of the
same name targets.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from training import data  # noqa: E402
from training.augment import SCANNER_PARTS, AugmentConfig, scanner_variation  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="ONNX model")
    p.add_argument("data", help="packed dataset (.npz)")
    p.add_argument("--split", default="test")
    p.add_argument("--seeds", default="0", help="comma list of seeds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the table as JSON here")
    a = p.parse_args(argv)
    import onnxruntime as ort

    from training.export import INPUT_NAME, OUTPUT_NAME, read_metadata

    meta = read_metadata(Path(a.model))
    classes = json.loads(meta["classes"])
    low, high = json.loads(meta["hu_window"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    sess = ort.InferenceSession(a.model, opts, providers=["CPUExecutionProvider"])
    ds = data.load(a.data)
    targets = ds.targets(classes)
    keep = (ds.split == a.split) & (targets >= 0)
    hu = torch.from_numpy(ds.images[keep].astype(np.float32) - ds.hu_offset).unsqueeze(1)
    y = targets[keep]

    def predict(x: torch.Tensor) -> np.ndarray:
        out = [sess.run([OUTPUT_NAME], {INPUT_NAME: data.to_unit(x[i:i + 64], low, high).numpy()})[0]
               for i in range(0, len(x), 64)]
        return np.concatenate(out).argmax(1)

    base = predict(hu)
    rows = [{"part": "none", "error": float((base != y).mean()), "changed": 0.0, "errors": int((base != y).sum())}]
    seeds = [int(s) for s in a.seeds.split(",")]
    for part in SCANNER_PARTS:
        err, changed, wrong = [], [], {}
        for seed in seeds:
            x = scanner_variation(hu, AugmentConfig(**{part: 1.0}), torch.Generator().manual_seed(seed))
            pred = predict(x)
            err.append(float((pred != y).mean()))
            changed.append(float((pred != base).mean()))
            for t, q in zip(y[pred != y], pred[pred != y]):
                key = f"{classes[t]}->{classes[q]}"
                wrong[key] = wrong.get(key, 0) + 1
        top = sorted(wrong.items(), key=lambda kv: -kv[1])[:3]
        rows.append({"part": part, "error": float(np.mean(err)), "changed": float(np.mean(changed)),
                     "errors": round(float(np.mean(err)) * len(y)),
                     "top_errors": {k: v / len(seeds) for k, v in top}})
    print(f"{a.model} on {a.split} of {a.data}: {len(y)} scored slices, seeds {a.seeds}")
    print("| part (probability 1) | slice error | predictions changed | most frequent errors (per seed) |")
    print("|---|---|---|---|")
    for r in rows:
        top = ", ".join(f"{k} {v:g}" for k, v in r.get("top_errors", {}).items())
        print(f"| {r['part']} | {100 * r['error']:.2f} % ({r['errors']}) | {100 * r['changed']:.1f} % | {top} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
