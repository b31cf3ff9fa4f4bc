"""models/anatomy.metrics.json from `anatomy-node eval`'s metrics.json: the model card's figures.

    python training/tools/card_metrics.py EVAL/metrics.json models/anatomy.metrics.json \
        [--python-report RUN/evaluate.json]

The figures come from the Rust command (the production inference path: PNG → window → ONNX
Runtime), never from a second implementation: this adds the headline keys the model card quotes
(`slice_error`, `mean_auc`, `per_class_auc`, `patient_error`, `ece`) at the top of a copy of
that document, each a plain copy of a value inside it. With --python-report (the JSON of
`python -m training evaluate --nonaxial --pairs`), the synthetic checks of the test split, which
the Rust command does not make, are added under `synthetic_checks`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def card_metrics(rust: dict, python_report: dict | None = None, split: str = "test") -> dict:
    if rust.get("splits") != [split]:
        raise SystemExit(f"expected `anatomy-node eval --split {split}`, got splits {rust.get('splits')}")
    sl, pat, cal = rust["slice"], rust["patient"], rust["calibration"]
    head = {
        "dataset": rust["dataset"],
        "split": split,
        "slice_error": sl["error"],
        "mean_auc": sl["mean_auc"],
        "per_class_auc": sl["auc"],
        "patient_error": pat["error"],
        "ece": cal["ece"],
        "headline_source": ("copies of slice.error, slice.mean_auc, slice.auc, patient.error "
                            "(majority vote) and calibration.ece below, written by `anatomy-node eval`"),
    }
    doc = head | {k: v for k, v in rust.items() if k not in head}
    if python_report and split in python_report:
        r = python_report[split]
        doc["synthetic_checks"] = {
            "source": "python -m training evaluate --nonaxial --pairs (training/nonaxial.py, augment.pair_composite)",
            "nonaxial_other": r.get("nonaxial"),
            "full_field_pairs": r.get("pairs"),
        }
    return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rust_metrics", help="metrics.json written by `anatomy-node eval --split test`")
    p.add_argument("out", help="models/anatomy.metrics.json")
    p.add_argument("--python-report", default=None, help="JSON of `python -m training evaluate --json`")
    a = p.parse_args(argv)
    rust = json.loads(Path(a.rust_metrics).read_text())
    py = json.loads(Path(a.python_report).read_text()) if a.python_report else None
    doc = card_metrics(rust, py)
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {a.out}: slice_error {doc['slice_error']:.4f}, mean_auc {doc['mean_auc']:.4f}, "
          f"patient_error {doc['patient_error']:.4f}, ece {doc['ece']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
