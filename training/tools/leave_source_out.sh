#!/usr/bin/env bash
# Leave-source-out check of the shipped recipe: for each public source of ../shared/data/ct,
# train once without it (the shipped recipe, training/shipped-recipe.sh) and score that source
# alone. These are the model card's figures on "sources it never saw".
#
#   bash training/tools/leave_source_out.sh [SOURCE ...]   # default: ctmed okbp vhp sts
#
# A source is a case_id prefix (okbp-: OpenKBP RT-planning head-and-neck CTs, ctmed-: TCGA
# single slices of CT Medical Images, sts-: soft-tissue-sarcoma crops, vhp-: the Visible Human
# cadavers). Its subjects become the test split; the subjects that were in the shipped test split
# move to train, the validation patients stay (minus any of the source). Each run takes about as
# long as the shipped training (~10-25 min on 2 CPU cores). Environment:
#   DATA=../shared/data/ct   RUN=training/runs/lso   PY=training/.venv/bin/python   DEVICE=cpu
#   PACKED=training/runs/shipped/dataset.npz   (the shipped dataset; reproduce.sh builds it)
#   EXTRA_TRAIN_ARGS="--scale 0.8,1.15"       (options added after the shipped recipe's: a variant)
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/ct}
RUN=${RUN:-training/runs/lso}
PY=${PY:-training/.venv/bin/python}
DEVICE=${DEVICE:-cpu}
PACKED=${PACKED:-training/runs/shipped/dataset.npz}
. training/shipped-recipe.sh
[ -f "$PACKED" ] || { echo "no packed dataset at $PACKED: run training/reproduce.sh first" >&2; exit 2; }
sources=("$@")
[ ${#sources[@]} -gt 0 ] || sources=(ctmed okbp vhp sts)
for source in "${sources[@]}"; do
    out="$RUN/$source"
    mkdir -p "$out"
    "$PY" training/tools/hold_out.py "$PACKED" "$out/dataset.npz" --source "$source-" \
        --labels "$DATA/labels.csv" --to test --rest-to train
    "$PY" -m training train --data "$out/dataset.npz" --out "$out/train" --device "$DEVICE" \
        "${SHIPPED_TRAIN_ARGS[@]}" ${EXTRA_TRAIN_ARGS:-} --model-version "lso-without-$source" > "$out/train.log" 2>&1
    echo "== without $source: test = $source alone"
    grep -A8 "^test (calibrated)" "$out/train.log" || grep "test" "$out/train.log" | tail -3
done
"$PY" training/tools/lso_table.py "$RUN" "${sources[@]}"
