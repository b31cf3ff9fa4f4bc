"""Copy a packed dataset (.npz) with some subjects moved to another split: a diagnostic.

    python training/tools/hold_out.py IN.npz OUT.npz --subjects vhp-female --to test

Subjects are named by their source id (the `case_id` of labels.csv); the dataset holds only
their anonymised `patient_key` (hex SHA-256 prefix, docs/contracts.md), which is recomputed here.
Used for the model card's leave-one-subject-out check: vhp-female is the only subject with
full-field legs, so whether a model recognises such legs without having seen them can only be
measured by training once without it. Never used for the shipped model, whose split is the
Rust builder's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np


def patient_key(subject_id: str) -> str:
    return hashlib.sha256(subject_id.encode()).hexdigest()[:16]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="packed dataset (.npz from `python -m training pack`)")
    p.add_argument("dst", help="output .npz")
    p.add_argument("--subjects", required=True, help="comma-separated subject ids (labels.csv case_id)")
    p.add_argument("--to", default="test", choices=("train", "val", "test"), help="split to move them to")
    a = p.parse_args(argv)
    with np.load(a.src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    keys = {patient_key(s.strip()): s.strip() for s in a.subjects.split(",") if s.strip()}
    moved = np.isin(arrays["patient_key"], list(keys))
    missing = sorted(s for k, s in keys.items() if not (arrays["patient_key"] == k).any())
    if missing:
        raise SystemExit(f"not in {a.src}: {missing}")
    split = arrays["split"].astype(object)
    split[moved] = a.to
    arrays["split"] = split.astype(arrays["split"].dtype)
    info = json.loads(str(arrays["dataset_json"]))
    info["name"] = f"{info.get('name', 'dataset')} ({', '.join(keys.values())} moved to {a.to})"
    arrays["dataset_json"] = np.array(json.dumps(info))
    Path(a.dst).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(a.dst, **arrays)
    print(f"moved {int(moved.sum())} images of {len(keys)} subject(s) to {a.to}: {a.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
