"""Print the leave-source-out figures (training/tools/leave_source_out.sh) as a Markdown table.

    python training/tools/lso_table.py training/runs/lso ctmed okbp vhp sts

Reads RUN/<source>/train/metrics.json (the test split there is the left-out source alone) and
writes one row per source: scored slices, slice error, the classes present with their errors
and what they were called instead.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def row(source: str, report: dict, classes: list[str]) -> str:
    n = report["images"]
    wrong = round(report["error"] * n)
    per_class = []
    for i, c in enumerate(classes):
        counts = report["confusion"][i]
        total = sum(counts)
        if not total:
            continue
        missed = {classes[j]: v for j, v in enumerate(counts) if j != i and v}
        called = ", ".join(f"{v} {k}" for k, v in sorted(missed.items(), key=lambda kv: -kv[1]))
        per_class.append(f"{c} {total - counts[i]}/{total}" + (f" ({called})" if called else ""))
    aucs = [v for v in report["auc"].values() if v == v]
    mean_auc = f"{report['mean_auc']:.4f} ({len(aucs)} classes)" if aucs else "n/a"
    return (f"| {source} | {n} | {100 * report['error']:.1f} % ({wrong}) | {mean_auc} | "
            + "; ".join(per_class) + " |")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    run, sources = Path(argv[0]), argv[1:]
    print("| left-out source | scored slices | slice error | mean AUC | wrong per class (called instead) |")
    print("|---|---|---|---|---|")
    for source in sources:
        path = run / source / "train" / "metrics.json"
        if not path.is_file():
            print(f"| {source} | no run at {path} | | | |")
            continue
        m = json.loads(path.read_text())
        classes = json.loads((run / source / "train" / "config.json").read_text())["classes"]
        print(row(source, m["test"], classes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
