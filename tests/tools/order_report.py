#!/usr/bin/env python3
"""How much decoding along z (classifier.decoding = "order") changes the labels of real CT.

Usage: order_report.py [--binary target/release/anatomy-node] [--model models/anatomy.onnx]
                       [--data ../shared/data] [DATASET ...]      (default: ct-extra ct)

For each DATASET folder of --data it runs `anatomy-node classify --json` once over all of its
case folders (every axial image of every series is labelled, as `classify` does), joins the
image records with the folder's labels.csv by SOP Instance UID (rows labelled `ambiguous`
are left out) and the cases with --data/sources.csv, and prints per source:

- images: labelled images scored; slice error of the model's own label (`label`) and of the
  label decoded along z (`decoded_label`);
- (--verbose) each series' labelled regions and its own and decoded labels, head to foot;
- series with at least two scored images: how many, and the fraction whose region sequence
  (the labels head to foot with repeats collapsed) equals the labelled one, for the own and
  the decoded labels.

Environment variables ANATOMY_CLASSIFIER__* reach the binary, so other decoder settings can be
compared (e.g. ANATOMY_CLASSIFIER__SKIP_PENALTY=2). Needs only the Python standard library.
"""
import argparse
import collections
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def classify(binary: Path, model: Path, cases: list[Path]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.toml"
        lines = ["[classifier]", f'model = "{model}"', 'device = "cpu"']
        library = ROOT / ".onnxruntime" / "libonnxruntime.so"
        if library.is_file() and not os.environ.get("ORT_DYLIB_PATH"):
            lines.append(f'onnxruntime_library = "{library}"')
        config.write_text("\n".join(lines) + "\n")
        out = subprocess.run(
            [str(binary), "classify", "--config", str(config), "--json", *map(str, cases)],
            capture_output=True, text=True, check=False,
        )
    if out.returncode != 0:
        sys.exit(f"{binary} classify failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def runs(labels: list[str]) -> list[str]:
    return [l for i, l in enumerate(labels) if i == 0 or labels[i - 1] != l]


def report(dataset: Path, sources: dict[str, str], binary: Path, model: Path, verbose: bool) -> None:
    truth = {}
    with open(dataset / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row["label"] != "ambiguous":
                truth[row["sop_instance_uid"]] = row
    cases = sorted(p for p in dataset.iterdir() if p.is_dir())
    records = classify(binary, model, cases)
    decodings = collections.Counter(r.get("decoding", "-") for r in records if r["record"] == "series")
    by_series = collections.defaultdict(list)
    for r in records:
        if r["record"] == "image" and r["sop_instance_uid"] in truth:
            by_series[r["series_uid"]].append(r)
    stats = collections.defaultdict(lambda: collections.Counter())
    for images in by_series.values():
        images.sort(key=lambda r: -r["z_mm"])
        case = truth[images[0]["sop_instance_uid"]]["case_id"]
        s = stats[sources.get(case, case)]
        want = [truth[r["sop_instance_uid"]]["label"] for r in images]
        own = [r["label"] for r in images]
        decoded = [r["decoded_label"] for r in images]
        s["images"] += len(images)
        s["own_wrong"] += sum(a != b for a, b in zip(own, want))
        s["decoded_wrong"] += sum(a != b for a, b in zip(decoded, want))
        if len(images) >= 2:
            if verbose:
                print(f"  {case}: labelled {' '.join(runs(want))}\n    own     {' '.join(own)}\n    decoded {' '.join(decoded)}")
            s["series"] += 1
            s["own_sequence"] += runs(own) == runs(want)
            s["decoded_sequence"] += runs(decoded) == runs(want)
    print(f"\n{dataset.name}: {len(cases)} case folders; series decoded: {dict(decodings)}")
    print(f"  {'source':<58} {'images':>6} {'own err':>8} {'decoded':>8} {'series':>6} {'own seq':>8} {'dec seq':>8}")
    total = collections.Counter()
    for source in sorted(stats):
        total.update(stats[source])
        line(source, stats[source])
    line("all", total)


def line(name: str, s: collections.Counter) -> None:
    pct = lambda a, b: f"{100 * a / b:7.1f}%" if b else "       -"
    print(
        f"  {name[:58]:<58} {s['images']:>6} {pct(s['own_wrong'], s['images'])} "
        f"{pct(s['decoded_wrong'], s['images'])} {s['series']:>6} "
        f"{pct(s['own_sequence'], s['series'])} {pct(s['decoded_sequence'], s['series'])}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", type=Path, default=ROOT / "target/release/anatomy-node")
    p.add_argument("--model", type=Path, default=ROOT / "models/anatomy.onnx")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
    p.add_argument("--verbose", action="store_true", help="print each series' labels head to foot")
    p.add_argument("datasets", nargs="*", default=["ct-extra", "ct"])
    a = p.parse_args()
    sources = {}
    with open(a.data / "sources.csv", newline="") as f:
        for row in csv.DictReader(f):
            sources[row["case_id"]] = row["source"]
    for name in a.datasets:
        dataset = a.data / name
        if not (dataset / "labels.csv").is_file():
            sys.exit(f"{dataset}/labels.csv is absent: no real CT data to report on")
        report(dataset, sources, a.binary.resolve(), a.model.resolve(), a.verbose)


if __name__ == "__main__":
    main()
