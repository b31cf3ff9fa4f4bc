#!/usr/bin/env bash
# Leave-source-out check of the shipped recipe: train once without a source (the shipped recipe,
# training/shipped-recipe.sh) and score that source alone. These are the model card's figures on
# "sources it never saw". Two modes:
#
#   bash training/tools/leave_source_out.sh [SOURCE ...]                # ../shared/data/ct only
#   bash training/tools/leave_source_out.sh --all-folders [SOURCE ...]  # ct + ct-extra
#
# ct only (default: ctmed okbp vhp sts): a source is a case_id prefix (okbp-: OpenKBP RT-planning
# head-and-neck CTs, ctmed-: TCGA single slices of CT Medical Images, sts-: soft-tissue-sarcoma
# crops, vhp-: the Visible Human cadavers), taken out of the packed shipped dataset.
#
# --all-folders: one dataset of both folders (built once by `anatomy-node dataset build` from a
# labels.csv that training/tools/sources.py combines; the shipped contract: size, seed, split),
# and a source is a `source` of ../shared/data/sources.csv, named by its slug or its full name
# (`python training/tools/sources.py list ../shared/data/sources.csv` lists both); none given:
# every source of the file, one run each (15 today: about 15 x 10-25 min on 2 CPU cores, about
# a minute each on a GPU with DEVICE=cuda). Every case of the source, in either folder, goes to
# test; the run trains on everything else. Each run is then exported and scored by `anatomy-node
# eval --groups sources.csv` (RUN/<slug>/eval: per class, and per source within a source that
# spans several; read the left-out source's row, the others are the run's training patients).
#
# In both modes the source's subjects become the test split; the subjects that were in the
# test split move to train, the validation patients stay (minus any of the source).
# Environment:
#   DATA=../shared/data/ct   RUN=training/runs/lso   PY=training/.venv/bin/python   DEVICE=cpu
#   PACKED=training/runs/shipped/dataset.npz   (ct only: the shipped dataset; reproduce.sh builds it)
#   EXTRA_TRAIN_ARGS="--scale 0.8,1.15"       (options added after the shipped recipe's: a variant)
#   --all-folders: DATA_ROOT=../shared/data  FOLDERS="ct ct-extra"  SOURCES=$DATA_ROOT/sources.csv
#                  ANATOMY_NODE=target/release/anatomy-node (built if missing)
#                  COMBINED=$RUN/combined (the combined dataset and its .npz; reused when present)
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/ct}
RUN=${RUN:-training/runs/lso}
PY=${PY:-training/.venv/bin/python}
DEVICE=${DEVICE:-cpu}
PACKED=${PACKED:-training/runs/shipped/dataset.npz}
. training/shipped-recipe.sh

train_one() {  # train_one OUT NAME: the shipped recipe on OUT/dataset.npz, test = the source
    local out=$1 name=$2
    "$PY" -m training train --data "$out/dataset.npz" --out "$out/train" --device "$DEVICE" \
        "${SHIPPED_TRAIN_ARGS[@]}" ${EXTRA_TRAIN_ARGS:-} --model-version "lso-without-$name" > "$out/train.log" 2>&1
    echo "== without $name: test = $name alone"
    grep -A8 "^test (calibrated)" "$out/train.log" || grep "test" "$out/train.log" | tail -3 || true
}

if [ "${1:-}" != "--all-folders" ]; then
    [ -f "$PACKED" ] || { echo "no packed dataset at $PACKED: run training/reproduce.sh first" >&2; exit 2; }
    sources=("$@")
    [ ${#sources[@]} -gt 0 ] || sources=(ctmed okbp vhp sts)
    for source in "${sources[@]}"; do
        out="$RUN/$source"
        mkdir -p "$out"
        "$PY" training/tools/hold_out.py "$PACKED" "$out/dataset.npz" --source "$source-" \
            --labels "$DATA/labels.csv" --to test --rest-to train
        train_one "$out" "$source"
    done
    "$PY" training/tools/lso_table.py "$RUN" "${sources[@]}"
    exit 0
fi

shift
DATA_ROOT=${DATA_ROOT:-../shared/data}
FOLDERS=${FOLDERS:-ct ct-extra}
SOURCES=${SOURCES:-$DATA_ROOT/sources.csv}
COMBINED=${COMBINED:-$RUN/combined}
if [ -z "${ANATOMY_NODE:-}" ]; then
    [ -x target/release/anatomy-node ] || cargo build --release
    ANATOMY_NODE=target/release/anatomy-node
fi
if [ ! -f "$COMBINED/dataset.npz" ]; then
    folders=()
    for f in $FOLDERS; do folders+=("$DATA_ROOT/$f"); done
    mkdir -p "$COMBINED"
    "$PY" training/tools/sources.py combine-labels "$COMBINED/labels.csv" "${folders[@]}"
    rm -rf "$COMBINED/dataset"
    "$ANATOMY_NODE" dataset build --from "$DATA_ROOT" --labels "$COMBINED/labels.csv" \
        --out "$COMBINED/dataset" --size "$SIZE" --seed "$SEED" --split "$SPLIT"
    "$PY" -m training pack "$COMBINED/dataset" "$COMBINED/dataset.npz"
fi
declare -A NAME_OF
slugs=()
while IFS=$'\t' read -r slug name _cases _folders; do
    NAME_OF[$slug]=$name
    slugs+=("$slug")
done < <("$PY" training/tools/sources.py list "$SOURCES")
wanted=()
for arg in "$@"; do  # a slug or a full source name
    found=""
    for slug in "${slugs[@]}"; do
        if [ "$arg" = "$slug" ] || [ "$arg" = "${NAME_OF[$slug]}" ]; then found=$slug; fi
    done
    [ -n "$found" ] || { echo "$SOURCES: no source $arg (slugs: ${slugs[*]})" >&2; exit 2; }
    wanted+=("$found")
done
[ ${#wanted[@]} -gt 0 ] || wanted=("${slugs[@]}")
for slug in "${wanted[@]}"; do
    out="$RUN/$slug"
    mkdir -p "$out"
    "$PY" training/tools/hold_out.py "$COMBINED/dataset.npz" "$out/dataset.npz" \
        --source-name "${NAME_OF[$slug]}" --sources "$SOURCES" --to test --rest-to train
    train_one "$out" "$slug"
    "$PY" -m training export "$out/train/model.pt" "$out/model.onnx" --model-version "lso-without-$slug" > "$out/export.log" 2>&1
    # Every split of the dataset folder, grouped by source: the left-out source's row is the
    # unseen-source figure (its cases sit in all three splits of the folder's manifest, the moved
    # split lives in the .npz only); the other rows are the run's own training patients.
    "$ANATOMY_NODE" eval --model "$out/model.onnx" --dataset "$COMBINED/dataset" --split all \
        --groups "$SOURCES" --out "$out/eval" --device cpu > "$out/eval.log" 2>&1
    grep -F "${NAME_OF[$slug]}" "$out/eval.log" | head -1 || true
done
"$PY" training/tools/lso_table.py "$RUN" "${wanted[@]}"
