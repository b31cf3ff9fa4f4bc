#!/usr/bin/env bash
# On the GPU machine, after ../shared/tools/gpu-ort/ staged ONNX Runtime's CUDA provider into
# /tmp/ort-gpu and with .gpu-check/ (tests/gpu/prepare.sh) carried beside this script's
# repository: proves the node's CUDA path and times it.
#  1. `classify` with classifier.device = "cuda" (fails rather than falls back to the CPU)
#     gives the CPU's labels and probabilities within 1e-4 on real series;
#  2. `eval --device cuda` on the held-out patients gives the CPU's figures;
#  3. the inference bench prints images/s at batch 1, 32 and 256 on CUDA, then on the CPU.
# Writes its outputs under $OUT (or /tmp/gpu-check); exit status non-zero on any mismatch.
set -euo pipefail
cd "$(dirname "$0")/../.."
C=.gpu-check
R=${OUT:-/tmp/gpu-check}
mkdir -p "$R"
# shellcheck disable=SC1091
source /tmp/ort-gpu/env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

"$C/anatomy-node" classify --config "$C/cuda.toml" --json "$C/dicom" >"$R/classify-cuda.jsonl" \
    2>"$R/classify-cuda.log" || { cat "$R/classify-cuda.log"; exit 1; }
grep "CUDAExecutionProvider" "$R/classify-cuda.log" ||
    { echo "gpu check: classify did not run on CUDA"; cat "$R/classify-cuda.log"; exit 1; }
"$C/anatomy-node" eval --model "$C/anatomy.onnx" --dataset "$C/dataset" --split test \
    --device cuda --out "$R/eval-cuda" | tee "$R/eval-cuda.txt"
python3 "$C/compare.py" "$C" "$R"

for device in cuda cpu; do
    ANATOMY_BENCH_DEVICE=$device ANATOMY_BENCH_MODEL="$C/anatomy.onnx" \
        ANATOMY_BENCH_SECONDS=${SECONDS_PER_BATCH:-3} "$C/bench-inference" | tee "$R/bench-$device.txt"
done
echo "gpu check: passed"
