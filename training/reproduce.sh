#!/usr/bin/env bash
# Rebuilds the shipped model (models/anatomy.onnx) and its figures from ../shared/data/ct, on CPU.
#
#   bash training/reproduce.sh            # from the repository root; ~25-40 min on 2 CPU cores
#
# Stages: 1. the dataset, by the Rust side (the one preprocessing implementation);
# 2. pack it into one .npz; 3. train (seeded, deterministic); 4. export to ONNX (opset 17,
# contract metadata, temperature in the graph); 5. score the held-out (test) patients with
# `anatomy-node eval` and write the model card's metrics JSON. Environment:
#   DATA=../shared/data/ct     the labelled CT folder (labels.csv inside)
#   RUN=training/runs/shipped  where the dataset, checkpoint and logs go (gitignored)
#   OUT=models                 where anatomy.onnx and anatomy.metrics.json go
#   ANATOMY_NODE=...           an anatomy-node binary to use instead of `cargo build --release`
#   PY=training/.venv/bin/python (bash training/install.sh creates it)
#   DEVICE=cpu                 cuda works too (add --amp for speed; bf16 changes the weights)
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-../shared/data/ct}
RUN=${RUN:-training/runs/shipped}
OUT=${OUT:-models}
PY=${PY:-training/.venv/bin/python}
DEVICE=${DEVICE:-cpu}
# The shipped choices (SIZE, SEED, SPLIT, VERSION, SHIPPED_TRAIN_ARGS; models/README.md says why):
. training/shipped-recipe.sh

if [ -z "${ANATOMY_NODE:-}" ]; then
    cargo build --release
    ANATOMY_NODE=target/release/anatomy-node
fi
[ -x "$PY" ] || bash training/install.sh

DS="$RUN/dataset"
rm -rf "$DS"
mkdir -p "$RUN" "$OUT"
"$ANATOMY_NODE" dataset build --from "$DATA" --labels "$DATA/labels.csv" --out "$DS" \
    --size "$SIZE" --seed "$SEED" --split "$SPLIT"
"$PY" -m training pack "$DS" "$RUN/dataset.npz"

"$PY" -m training train --data "$RUN/dataset.npz" --out "$RUN/train" --device "$DEVICE" \
    "${SHIPPED_TRAIN_ARGS[@]}" --model-version "$VERSION" 2>&1 | tee "$RUN/train.log"

"$PY" -m training export "$RUN/train/model.pt" "$OUT/anatomy.onnx" --model-version "$VERSION"

# The figures: the Rust production path scores the held-out (test) patients; the Python side
# adds the synthetic checks (non-axial/scout → other; held-out crops made full-field pairs).
"$ANATOMY_NODE" eval --model "$OUT/anatomy.onnx" --dataset "$DS" --split test --out "$RUN/eval" \
    --device cpu | tee "$RUN/eval.log"
"$PY" -m training evaluate "$OUT/anatomy.onnx" --data "$RUN/dataset.npz" --splits val,test \
    --nonaxial --pairs --json "$RUN/evaluate.json" | tee "$RUN/evaluate.log"
"$PY" training/tools/card_metrics.py "$RUN/eval/metrics.json" "$OUT/anatomy.metrics.json" \
    --python-report "$RUN/evaluate.json"
