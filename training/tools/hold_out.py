"""Copy a packed dataset (.npz) with some subjects moved to another split: a diagnostic.

    python training/tools/hold_out.py IN.npz OUT.npz --subjects vhp-female --to test
    python training/tools/hold_out.py IN.npz OUT.npz --source okbp- --labels L.csv --rest-to train
    python training/tools/hold_out.py IN.npz OUT.npz --source-name "TCIA CPTAC-PDA" \
        --sources ../shared/data/sources.csv --rest-to train

Subjects are named by their source id (the `case_id` of labels.csv); the dataset holds only
their anonymised `patient_key` (hex SHA-256 prefix, docs/contracts.md), which is recomputed here.
Used for the model card's leave-one-subject-out check: vhp-female is the only subject with
full-field legs, so whether a model recognises such legs without having seen them can only be
measured by training once without it. Never used for the shipped model, whose split is the
Rust builder's.

Leave-source-out: `--source PREFIX` takes every subject of labels.csv whose case_id starts with
PREFIX (one public source: okbp-, ctmed-, sts-, vhp-); with `--rest-to train` the subjects that
were in the target split before move to train, so the target split holds that source alone and
its figures are those of a source the model never saw. `--source-name NAME --sources
sources.csv` takes instead every case whose `source` column (or `--source-column`) is NAME,
in either data folder (../shared/data/sources.csv lists the cases of ct and ct-extra).

`--splits-from REF.npz` first gives every subject of REF its split in REF and every other subject
`--new-to` (default train): a dataset of ct + ct-extra keeps the shipped model's patient split,
so its test patients are the shipped card's test patients and only the new sources are added.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the training package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from training.data import read_npz_arrays, write_npz_arrays  # noqa: E402


def patient_key(subject_id: str) -> str:
    return hashlib.sha256(subject_id.encode()).hexdigest()[:16]


def source_subjects(labels: Path, prefixes: tuple[str, ...]) -> set[str]:
    with labels.open(newline="") as f:
        return {row["case_id"] for row in csv.DictReader(f) if row["case_id"].startswith(prefixes)}


def named_source_subjects(sources: Path, name: str, column: str = "source") -> set[str]:
    with sources.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and column not in rows[0]:
        raise SystemExit(f"{sources}: line 1: no column {column!r} (columns: {', '.join(rows[0])})")
    found = {row["case_id"] for row in rows if row[column] == name}
    if not found:
        names = sorted({row[column] for row in rows})
        raise SystemExit(f"{sources}: no case has {column} {name!r} (there are: {'; '.join(names)})")
    return found


def splits_like(arrays: dict, reference: str, new_to: str) -> np.ndarray:
    """Each image's split: its subject's split in `reference`, or `new_to` for a subject not there."""
    with np.load(reference, allow_pickle=False) as z:
        ref_keys, ref_splits = z["patient_key"], z["split"]
    by_key: dict[str, str] = {}
    for key, split in zip(ref_keys.tolist(), ref_splits.tolist()):
        if by_key.setdefault(key, split) != split:
            raise SystemExit(f"{reference}: patient {key} is in both {by_key[key]} and {split}")
    return np.array([by_key.get(k, new_to) for k in arrays["patient_key"].tolist()], dtype=str)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="packed dataset (.npz from `python -m training pack`)")
    p.add_argument("dst", help="output .npz")
    p.add_argument("--subjects", default="", help="comma-separated subject ids (labels.csv case_id)")
    p.add_argument("--source", default="", help="comma-separated case_id prefixes; needs --labels")
    p.add_argument("--labels", help="labels.csv naming the subjects (for --source)")
    p.add_argument("--source-name", default="", help="one value of the --sources file's source column")
    p.add_argument("--sources", help="sources.csv (case_id, ..., source, ...) for --source-name")
    p.add_argument("--source-column", default="source", help="the column --source-name is matched against")
    p.add_argument("--to", default="test", choices=("train", "val", "test"), help="split to move them to")
    p.add_argument(
        "--rest-to",
        choices=("train", "val", "test"),
        help="move the subjects already in the --to split here, so it holds only the moved ones",
    )
    p.add_argument("--splits-from", help="packed dataset whose subjects keep their split there")
    p.add_argument("--new-to", default="train", choices=("train", "val", "test"),
                   help="with --splits-from: the split of subjects that are not in it")
    a = p.parse_args(argv)
    subjects = [s.strip() for s in a.subjects.split(",") if s.strip()]
    prefixes = tuple(s.strip() for s in a.source.split(",") if s.strip())
    if prefixes:
        if not a.labels:
            raise SystemExit("--source needs --labels (the labels.csv with the case_id column)")
        subjects += sorted(source_subjects(Path(a.labels), prefixes))
    if a.source_name:
        if not a.sources:
            raise SystemExit("--source-name needs --sources (the sources.csv with case_id and source)")
        subjects += sorted(named_source_subjects(Path(a.sources), a.source_name, a.source_column))
    if not subjects and not a.splits_from:
        raise SystemExit("name the subjects to move: --subjects, --source, --source-name or --splits-from")
    arrays, info = read_npz_arrays(a.src)
    if a.splits_from:
        arrays["split"] = splits_like(arrays, a.splits_from, a.new_to)
        info["name"] = f"{info.get('name', 'dataset')} (splits of {Path(a.splits_from).name}, others {a.new_to})"
        if not subjects:
            write_npz_arrays(a.dst, arrays, info)
            print(f"{int((arrays['split'] == a.new_to).sum())} images in {a.new_to}: {a.dst}")
            return 0
    keys = {patient_key(s): s for s in subjects}
    moved = np.isin(arrays["patient_key"], list(keys))
    missing = sorted(s for k, s in keys.items() if not (arrays["patient_key"] == k).any())
    if missing:
        raise SystemExit(f"not in {a.src}: {missing}")
    split = arrays["split"].astype(object)
    if a.rest_to:
        split[(split == a.to) & ~moved] = a.rest_to
    split[moved] = a.to
    arrays["split"] = split.astype(arrays["split"].dtype)
    what = (", ".join(p + "*" for p in prefixes) if prefixes
            else a.source_name if a.source_name else ", ".join(keys.values()))
    info["name"] = f"{info.get('name', 'dataset')} ({what} moved to {a.to})"
    write_npz_arrays(a.dst, arrays, info)
    print(f"moved {int(moved.sum())} images of {len(keys)} subject(s) to {a.to}: {a.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
