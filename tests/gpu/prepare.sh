#!/usr/bin/env bash
# Prepares the GPU check of the classifier's CUDA path (issue #3) for a GPU machine that has
# no Rust toolchain and takes files in transfers of at most 64 MiB.
#
#   bash tests/gpu/prepare.sh          # here, from the repository root
#
# Writes .gpu-check/ (git-ignored, about 35 MiB): the node and the inference bench built with
# `--features cuda` (stripped), the shipped model's held-out (test) patients as a dataset
# folder, real CT series from every tenth case, and the CPU results the GPU run must reproduce. Then, on the
# GPU machine, stage ONNX Runtime's CUDA provider with ../shared/tools/gpu-ort/ (one transfer
# per piece) and run, carrying .gpu-check:
#
#   bash tests/gpu/check.sh            # prints images/s, exits non-zero on any mismatch
#
# Environment: DATA=../shared/data/ct, DS (an existing full dataset folder built as in
# training/reproduce.sh; default training/runs/shipped/dataset, built when missing).
set -euo pipefail
cd "$(dirname "$0")/../.."

DATA=${DATA:-../shared/data/ct}
DS=${DS:-training/runs/shipped/dataset}
OUT=.gpu-check

rm -rf "$OUT" && mkdir -p "$OUT/dicom"
[ -f .onnxruntime/libonnxruntime.so ] || bash deploy/install-onnxruntime.sh

cargo build --release --features cuda
strip -o "$OUT/anatomy-node" target/release/anatomy-node
bench=$(cargo bench --features cuda --bench inference --no-run 2>&1 |
    grep -o 'target/release/deps/inference-[0-9a-f]*' | tail -1)
[ -x "$bench" ] || { echo "prepare: the inference bench binary was not built" >&2; exit 1; }
strip -o "$OUT/bench-inference" "$bench"

if [ ! -f "$DS/manifest.csv" ]; then
    DS="$OUT/full-dataset"
    "$OUT/anatomy-node" dataset build --from "$DATA" --labels "$DATA/labels.csv" --out "$DS" \
        --size 192 --seed 2015 --split 60,20,20
fi
# Only the test split travels: the rows of the held-out patients and their images.
python3 - "$DS" "$OUT/dataset" <<'PY'
import csv, json, shutil, sys, pathlib
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
(dst / "images").mkdir(parents=True)
shutil.copy(src / "dataset.json", dst / "dataset.json")
with open(src / "manifest.csv", newline="") as f:
    reader = csv.DictReader(f)
    rows = [r for r in reader if r["split"] == "test"]
    fields = reader.fieldnames
with open(dst / "manifest.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow(r)
        shutil.copy(src / r["image"], dst / r["image"])
print(f"prepare: {len(rows)} held-out images")
PY
rm -rf "$OUT/full-dataset"

# Every tenth case folder: series from each source of the data.
find "$DATA" -mindepth 1 -maxdepth 1 -type d | sort | awk 'NR % 10 == 1' |
    while read -r case; do cp -r "$case" "$OUT/dicom/"; done
cp models/anatomy.onnx "$OUT/anatomy.onnx"
for device in cpu cuda; do
    printf '[classifier]\nmodel = "anatomy.onnx"\ndevice = "%s"\n' "$device" >"$OUT/$device.toml"
done

# The CPU answers the GPU run is compared with.
"$OUT/anatomy-node" classify --config "$OUT/cpu.toml" --json "$OUT/dicom" >"$OUT/classify-cpu.jsonl"
"$OUT/anatomy-node" eval --model "$OUT/anatomy.onnx" --dataset "$OUT/dataset" --split test \
    --device cpu --out "$OUT/eval-cpu" >"$OUT/eval-cpu.txt"
cp tests/gpu/compare.py "$OUT/"
du -sh "$OUT"
echo "prepare: done; carry .gpu-check (and the .ort-gpu pieces, one per transfer) to the GPU machine"
