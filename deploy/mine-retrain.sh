#!/usr/bin/env bash
# The nightly model loop: mine → retrain → evaluate → promote (issue #6), optionally
# self-training on the site's own unlabelled series (issue #16).
#
#   deploy/mine-retrain.sh [options]        # as the service user; cron or systemd timer
#
# Models are judged on HUMAN labels only: every evaluation scores the test split's images
# whose label_source does not start with `pseudo:` (`anatomy-node eval --labels human`), so a
# candidate can never look better by agreeing with pseudo labels (its own, or its
# predecessor's). Pseudo labels are training material, never the yardstick.
#
# Stages (each one's log goes into the run's report folder, see "Reports" below):
#  1. mine     `anatomy-node mine --config CONFIG --out DATASET` appends newly labelled
#              key-images of the archive to the dataset folder (splits by patient, stable).
#              Its exit codes: 0 → go on; 75 (another mine holds its lock) → stop, exit 75;
#              3 (some studies failed) or 4 (stopped by its time window or a signal) → stop
#              with exit 13 unless --allow-partial (ALLOW_PARTIAL=1), since the dataset is
#              consistent but incomplete and the next night completes it; 1, 2 or any other →
#              exit 1. --skip-mine uses DATASET as it is.
#              --self-train (SELF_TRAIN=1) runs mine with pseudo labels on, whatever the
#              configuration says (ANATOMY_MINE__PSEUDO_LABELS=true): the key-images of the
#              node's index (the site's own series, labelled by the served model) whose
#              probability reaches mine.pseudo_label_min_probability and whose label equals
#              their series' decoded head-to-foot label (mine.pseudo_label_require_order)
#              join the dataset as `pseudo:<model version>` rows, only where no human label
#              exists. CONFIG's [database] and [storage] must be the node's own.
#  2. check    the dataset's test split (held-out patients) must hold at least
#              MIN_TEST_IMAGES scored images (human label, not `ambiguous`) of
#              MIN_TEST_PATIENTS patients, or nothing can be compared: exit 11, nothing
#              trained or promoted. Pseudo-labelled test images are counted apart, never
#              scored.
#     With training (no --candidate): if manifest.csv is byte-identical to the one the last
#     training run used, there is nothing new to learn: exit 15 (--force trains anyway).
#  3. train    `python -m training pack` + `train` + `export` (the choices of
#              training/reproduce.sh, changeable through the environment below); the model's
#              version is VERSION_PREFIX-<run id>, e.g. anatomy-convnet-20261128T020000Z.
#              Pseudo-labelled training images are drawn PSEUDO_WEIGHT times as often as a
#              human-labelled image of the same class (`train --pseudo-weight`; 0 drops them).
#              --candidate MODEL skips training and evaluates/promotes MODEL instead (a site
#              that trains elsewhere, e.g. on a GPU machine).
#  4. evaluate `anatomy-node eval --split test --labels human` scores the current model
#              (MODEL, the file the node serves) and the candidate on the same dataset, so on
#              the same held-out patients and the same human-labelled images. A candidate
#              that `eval` cannot load (the model contract: metadata, input/output, its input
#              size against the dataset's) or that lacks one of the current model's classes
#              is refused: exit 12.
#  5. decide   Promote only if the candidate is better:
#                - its slice error on the test split is strictly lower (errors/images, exact),
#                - or equal, and its mean one-vs-rest AUC over the classes that both models
#                  score (classes with positives in the test split) is higher by more than
#                  AUC_MARGIN (default 0.001: noise-level differences never swap models).
#              Anything else (worse, or a tie) keeps the current model: exit 10.
#              With no current model at MODEL (first installation) the candidate is promoted
#              once it has been evaluated (the test split check still applies).
#  6. promote  The candidate is copied next to MODEL (a temporary file in the same folder,
#              fsynced, the current file's mode), the current file is kept as
#              <stem>.<its model_version>.onnx in the same folder (a hard link), and the copy is
#              renamed over MODEL (atomic: the node never reads a half-written model). Then
#              RELOAD_CMD, if set, runs (e.g. `sudo systemctl restart anatomy-node`); if it
#              fails the new model is in place but not served yet: exit 14.
#
# Options (each has an environment variable; the option wins):
#   --config FILE     CONFIG=/etc/anatomy-node/config.toml   configuration of `mine`
#   --dataset DIR     DATASET=/var/lib/anatomy-node/dataset   dataset folder (mine appends)
#   --model FILE      MODEL=/var/lib/anatomy-node/models/anatomy.onnx   the served model: the
#                     file [classifier] model of the node's configuration names
#   --reports DIR     REPORTS=/var/lib/anatomy-node/retrain   one folder per run, and the lock
#   --candidate FILE  CANDIDATE=     skip training; evaluate and maybe promote this ONNX file
#   --skip-mine       SKIP_MINE=1    use DATASET as it is
#   --self-train      SELF_TRAIN=1   mine with pseudo labels on (see stage 1); not with
#                                    --skip-mine
#   --allow-partial   ALLOW_PARTIAL=1  go on after mine exit 3 or 4
#   --since/--until YYYYMMDD  SINCE=, UNTIL=   passed to `mine` (default: its lookback)
#   --force           FORCE=1        train even when the dataset has not changed
#   --reload-cmd CMD  RELOAD_CMD=    run after a promotion (bash -c), e.g.
#                                    "sudo systemctl restart anatomy-node"
#   -h, --help
# Environment only:
#   ANATOMY_NODE=anatomy-node (from PATH, else target/release/anatomy-node of this checkout)
#   ANATOMY_REPO=<this script's checkout>  where training/ is (python -m training runs there)
#   PY=$ANATOMY_REPO/training/.venv/bin/python   (bash training/install.sh creates it)
#   PYTHON3=python3          for this script's own JSON work (standard library only)
#   DEVICE=cpu SEED=2015 EPOCHS=40 PATIENCE=15 THREADS=2   as training/reproduce.sh
#   TRAIN_ARGS="--width 32 --blocks 1,1,1,1 --pair-p 0.5 --pair-classes legs,pelvis"
#                            the rest of the `train` options (word-split; shipped choices)
#   VERSION_PREFIX=anatomy-convnet
#   PSEUDO_WEIGHT=1          `train --pseudo-weight`: sampling weight of pseudo-labelled
#                            training images against human ones (0: not trained on)
#   WORK=$REPORTS/work       the packed dataset.npz (rewritten every run)
#   EVAL_DEVICE=cpu EVAL_THREADS=0   `anatomy-node eval --device/--threads`
#   MIN_TEST_IMAGES=100 MIN_TEST_PATIENTS=5 AUC_MARGIN=0.001
#   KEEP_REPORTS=60          run folders kept (oldest removed first; 0 keeps all)
#   LOCK_FILE=$REPORTS/mine-retrain.lock
#
# Exit codes:
#   0   promoted (and RELOAD_CMD, if any, succeeded)
#   1   failed: a stage failed (mine 1/2, training, export, the current model's evaluation,
#       the copy); nothing was promoted; see the report
#   2   usage: bad options or a missing tool
#   10  not promoted: the candidate is not better than the current model
#   11  not promoted: the test split is empty or too small to compare models
#   12  candidate refused: it fails the model contract, or lacks a class of the current model
#   13  stopped after mine: it was partial (3) or stopped early (4), without --allow-partial
#   14  promoted, but RELOAD_CMD failed: the node still serves the previous model
#   15  nothing to do: the dataset is unchanged since the last training run (see --force)
#   75  locked: another mine-retrain run (or `anatomy-node mine`) is running; nothing done
#
# Reports: $REPORTS/<run id>/ (run id = UTC time, e.g. 20261128T020000Z; `latest` links to
# the newest): decision.json (outcome, exit code, reason, mine exit code and meaning, dataset
# and test-split counts, both models' headline figures, backup path, reload result),
# summary.txt (the same in a few lines, also printed on stdout), mine.log and mine.json (mine's
# report of this run, the dataset's reports/mine-<run>.json, when mine wrote one; decision.json
# carries it as mine.report, its rows_added as mine.rows_added), pack.log,
# train.log, export.log, train/ (config.json, metrics.json, history.jsonl, model.pt),
# candidate.onnx (when trained here), eval-current/ and eval-candidate/ (metrics.json,
# predictions.csv, plots of `anatomy-node eval`).
set -euo pipefail

readonly EXIT_PROMOTED=0 EXIT_FAILED=1 EXIT_USAGE=2 EXIT_NOT_BETTER=10 EXIT_TOO_SMALL=11
readonly EXIT_REFUSED=12 EXIT_MINE_INCOMPLETE=13 EXIT_RELOAD_FAILED=14 EXIT_UNCHANGED=15
readonly EXIT_LOCKED=75

usage() {
    # The header above, without the shebang and the `set` line.
    sed -n '2,/^set -euo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

die_usage() {
    echo "mine-retrain: $*" >&2
    echo "mine-retrain: --help lists the options" >&2
    exit "$EXIT_USAGE"
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ANATOMY_REPO=${ANATOMY_REPO:-$(dirname "$here")}
CONFIG=${CONFIG:-/etc/anatomy-node/config.toml}
DATASET=${DATASET:-/var/lib/anatomy-node/dataset}
MODEL=${MODEL:-/var/lib/anatomy-node/models/anatomy.onnx}
REPORTS=${REPORTS:-/var/lib/anatomy-node/retrain}
CANDIDATE=${CANDIDATE:-}
SKIP_MINE=${SKIP_MINE:-0}
SELF_TRAIN=${SELF_TRAIN:-0}
ALLOW_PARTIAL=${ALLOW_PARTIAL:-0}
SINCE=${SINCE:-}
UNTIL=${UNTIL:-}
FORCE=${FORCE:-0}
RELOAD_CMD=${RELOAD_CMD:-}

while (($#)); do
    case "$1" in
        --config | --dataset | --model | --reports | --candidate | --since | --until | --reload-cmd)
            (($# >= 2)) || die_usage "$1 needs a value"
            case "$1" in
                --config) CONFIG=$2 ;;
                --dataset) DATASET=$2 ;;
                --model) MODEL=$2 ;;
                --reports) REPORTS=$2 ;;
                --candidate) CANDIDATE=$2 ;;
                --since) SINCE=$2 ;;
                --until) UNTIL=$2 ;;
                --reload-cmd) RELOAD_CMD=$2 ;;
            esac
            shift 2
            ;;
        --skip-mine) SKIP_MINE=1 && shift ;;
        --self-train) SELF_TRAIN=1 && shift ;;
        --allow-partial) ALLOW_PARTIAL=1 && shift ;;
        --force) FORCE=1 && shift ;;
        -h | --help) usage && exit 0 ;;
        *) die_usage "unknown argument: $1" ;;
    esac
done

PY=${PY:-$ANATOMY_REPO/training/.venv/bin/python}
PYTHON3=${PYTHON3:-python3}
DEVICE=${DEVICE:-cpu}
SEED=${SEED:-2015}
EPOCHS=${EPOCHS:-40}
PATIENCE=${PATIENCE:-15}
THREADS=${THREADS:-2}
TRAIN_ARGS=${TRAIN_ARGS:---width 32 --blocks 1,1,1,1 --pair-p 0.5 --pair-classes legs,pelvis}
VERSION_PREFIX=${VERSION_PREFIX:-anatomy-convnet}
PSEUDO_WEIGHT=${PSEUDO_WEIGHT:-1}
WORK=${WORK:-$REPORTS/work}
EVAL_DEVICE=${EVAL_DEVICE:-cpu}
EVAL_THREADS=${EVAL_THREADS:-0}
MIN_TEST_IMAGES=${MIN_TEST_IMAGES:-100}
MIN_TEST_PATIENTS=${MIN_TEST_PATIENTS:-5}
AUC_MARGIN=${AUC_MARGIN:-0.001}
KEEP_REPORTS=${KEEP_REPORTS:-60}
if [[ -z "${ANATOMY_NODE:-}" ]]; then
    if command -v anatomy-node >/dev/null; then
        ANATOMY_NODE=anatomy-node
    else
        ANATOMY_NODE=$ANATOMY_REPO/target/release/anatomy-node
    fi
fi

# --- checks that need no lock ---------------------------------------------------------------
for flag in SKIP_MINE SELF_TRAIN ALLOW_PARTIAL FORCE; do
    [[ "${!flag}" == 0 || "${!flag}" == 1 ]] || die_usage "$flag must be 0 or 1, not '${!flag}'"
done
for n in MIN_TEST_IMAGES MIN_TEST_PATIENTS KEEP_REPORTS EPOCHS PATIENCE THREADS EVAL_THREADS; do
    [[ "${!n}" =~ ^[0-9]+$ ]] || die_usage "$n must be a whole number, not '${!n}'"
done
[[ "$AUC_MARGIN" =~ ^[0-9]*\.?[0-9]+$ ]] || die_usage "AUC_MARGIN must be a number >= 0"
[[ "$PSEUDO_WEIGHT" =~ ^[0-9]*\.?[0-9]+$ ]] || die_usage "PSEUDO_WEIGHT must be a number >= 0"
if [[ "$SELF_TRAIN" == 1 && "$SKIP_MINE" == 1 ]]; then
    die_usage "--self-train mines pseudo labels: not with --skip-mine"
fi
for d in SINCE UNTIL; do
    [[ -z "${!d}" || "${!d}" =~ ^[0-9]{8}$ ]] || die_usage "$d must be YYYYMMDD, not '${!d}'"
done
command -v "$PYTHON3" >/dev/null || die_usage "no $PYTHON3 (apt install python3)"
command -v flock >/dev/null || die_usage "no flock (util-linux)"
command -v "$ANATOMY_NODE" >/dev/null || die_usage "no anatomy-node at '$ANATOMY_NODE' (set ANATOMY_NODE)"
if [[ -n "$CANDIDATE" ]]; then
    [[ -f "$CANDIDATE" ]] || die_usage "--candidate $CANDIDATE: no such file"
    CANDIDATE=$(realpath "$CANDIDATE")
else
    [[ -x "$PY" ]] || die_usage "no training Python at $PY (bash training/install.sh, or set PY)"
fi
if [[ "$SKIP_MINE" == 0 && ! -f "$CONFIG" ]]; then
    die_usage "no configuration file $CONFIG (--config; or --skip-mine)"
fi
# Absolute paths: training runs in $ANATOMY_REPO.
DATASET=$(realpath -m "$DATASET")
MODEL=$(realpath -m "$MODEL")
REPORTS=$(realpath -m "$REPORTS")
WORK=$(realpath -m "$WORK")
LOCK_FILE=$(realpath -m "${LOCK_FILE:-$REPORTS/mine-retrain.lock}")
[[ "$ANATOMY_NODE" == */* ]] && ANATOMY_NODE=$(realpath -m "$ANATOMY_NODE")

# --- one run at a time ----------------------------------------------------------------------
mkdir -p "$REPORTS"
exec 9>>"$LOCK_FILE"
if ! flock -n 9; then
    echo "mine-retrain: another run holds $LOCK_FILE; nothing done" >&2
    exit "$EXIT_LOCKED"
fi

RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)
RUN_DIR=$REPORTS/$RUN_ID
n=1
while [[ -e "$RUN_DIR" ]]; do
    n=$((n + 1))
    RUN_DIR=$REPORTS/$RUN_ID-$n
done
RUN_ID=$(basename "$RUN_DIR")
mkdir -p "$RUN_DIR"
ln -sfn "$RUN_ID" "$REPORTS/latest"

# What the report says; finish() writes it on every exit after this point.
R_STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
R_REASON=""
R_MINE_EXIT=""
R_TRAINED=0
R_CANDIDATE=""
R_BACKUP=""
R_RELOAD_EXIT=""
R_STAGE="start"

log() { echo "mine-retrain [$RUN_ID] $*"; }

# Prints the last lines of a stage's log on stderr, for the cron mail or journal.
show_tail() {
    echo "---- last lines of $1 ----" >&2
    tail -n 20 "$1" >&2 || true
}

# shellcheck disable=SC2317  # finish runs from the EXIT trap
finish() {
    local code=$1
    trap - EXIT
    set +e
    R_FINISHED=$(date -u +%Y-%m-%dT%H:%M:%SZ) R_CODE=$code R_STARTED=$R_STARTED \
        R_REASON=$R_REASON R_MINE_EXIT=$R_MINE_EXIT R_SKIP_MINE=$SKIP_MINE R_TRAINED=$R_TRAINED \
        R_SELF_TRAIN=$SELF_TRAIN R_PSEUDO_WEIGHT=$PSEUDO_WEIGHT \
        R_CANDIDATE=$R_CANDIDATE R_MODEL=$MODEL R_DATASET=$DATASET R_BACKUP=$R_BACKUP \
        R_RELOAD_CMD=$RELOAD_CMD R_RELOAD_EXIT=$R_RELOAD_EXIT R_STAGE=$R_STAGE R_RUN_ID=$RUN_ID \
        R_RUN_DIR=$RUN_DIR R_AUC_MARGIN=$AUC_MARGIN R_MIN_TEST_IMAGES=$MIN_TEST_IMAGES \
        R_MIN_TEST_PATIENTS=$MIN_TEST_PATIENTS \
        "$PYTHON3" - <<'PY'
import json, os
from pathlib import Path

e = os.environ
run = Path(e["R_RUN_DIR"])
code = int(e["R_CODE"])
outcomes = {0: "promoted", 1: "failed", 2: "usage", 10: "not-better", 11: "test-split-too-small",
            12: "candidate-refused", 13: "mine-incomplete", 14: "promoted-reload-failed",
            15: "dataset-unchanged", 75: "locked"}
mine_meaning = {"0": "complete", "1": "failed", "2": "usage or configuration error",
                "3": "complete except some studies (retried next run)",
                "4": "stopped early (time window or signal); resumes next run",
                "75": "another run holds the lock"}

def load(name):
    try:
        return json.loads((run / name).read_text())
    except (OSError, ValueError):
        return None

def headline(metrics):
    if metrics is None:
        return None
    s = metrics.get("slice", {})
    return {"file": metrics["model"]["file"], "sha256": metrics["model"]["sha256"],
            "version": metrics["model"]["version"], "classes": metrics["model"]["classes"],
            "slice_images": s.get("images"), "slice_errors": s.get("errors"),
            "slice_error": s.get("error"), "mean_auc": s.get("mean_auc"),
            "patient_error": metrics.get("patient", {}).get("error"),
            "ece": metrics.get("calibration", {}).get("ece")}

mine = {"skipped": e["R_SKIP_MINE"] == "1", "pseudo_labels": e["R_SELF_TRAIN"] == "1"}
if e["R_MINE_EXIT"]:
    mine["exit_code"] = int(e["R_MINE_EXIT"])
    mine["meaning"] = mine_meaning.get(e["R_MINE_EXIT"], "unknown")
    try:
        lines = [l for l in (run / "mine.log").read_text(errors="replace").splitlines() if l.strip()]
        mine["summary"] = lines[-10:]
    except OSError:
        pass
    mine_report = load("mine.json")
    if isinstance(mine_report, dict):
        mine["report"] = mine_report
        stats = (mine_report.get("report") or {}).get("stats") or {}
        if "rows_added" in stats:
            mine["rows_added"] = stats["rows_added"]
report = {
    "format": "anatomy-node-retrain/1",
    "run_id": e["R_RUN_ID"],
    "started": e["R_STARTED"],
    "finished": e["R_FINISHED"],
    "outcome": outcomes.get(code, "failed"),
    "exit_code": code,
    "reason": e["R_REASON"] or f"stopped in stage {e['R_STAGE']} (exit code {code})",
    "stage": e["R_STAGE"],
    "mine": mine,
    "dataset": load("test-split.json") or {"path": e["R_DATASET"]},
    "trained_here": e["R_TRAINED"] == "1",
    "self_train": {"enabled": e["R_SELF_TRAIN"] == "1", "pseudo_weight": float(e["R_PSEUDO_WEIGHT"])},
    "current_model": {"path": e["R_MODEL"], "eval": headline(load("eval-current/metrics.json"))},
    "candidate_model": {"path": e["R_CANDIDATE"] or None,
                        "eval": headline(load("eval-candidate/metrics.json"))},
    "rule": {"scored": "the test split's human labels (label_source not pseudo:...)",
             "primary": "slice error on the test split, strictly lower",
             "tie_break": "mean AUC over the classes both models score, higher by more than "
                          f"{e['R_AUC_MARGIN']}",
             "min_test_images": int(e["R_MIN_TEST_IMAGES"]),
             "min_test_patients": int(e["R_MIN_TEST_PATIENTS"])},
    "comparison": load("comparison.json"),
    "promotion": {"backup": e["R_BACKUP"] or None, "reload_cmd": e["R_RELOAD_CMD"] or None,
                  "reload_exit_code": int(e["R_RELOAD_EXIT"]) if e["R_RELOAD_EXIT"] else None},
}
(run / "decision.json").write_text(json.dumps(report, indent=2) + "\n")

def fig(h):
    if h is None:
        return "not evaluated"
    auc = "n/a" if h["mean_auc"] is None else f"{h['mean_auc']:.4f}"
    return (f"{h['version']}: slice error {100 * h['slice_error']:.2f} % "
            f"({h['slice_errors']}/{h['slice_images']}), mean AUC {auc}")

lines = [f"run {report['run_id']}: {report['outcome']} (exit {code})",
         f"reason: {report['reason']}"]
if "exit_code" in mine:
    lines.append(f"mine: exit {mine['exit_code']} ({mine['meaning']})")
elif mine["skipped"]:
    lines.append("mine: skipped")
lines.append(f"current:   {e['R_MODEL']} — {fig(report['current_model']['eval'])}")
if report["candidate_model"]["path"]:
    lines.append(f"candidate: {report['candidate_model']['path']} — "
                 f"{fig(report['candidate_model']['eval'])}")
if report["promotion"]["backup"]:
    lines.append(f"previous model kept as {report['promotion']['backup']}")
if report["promotion"]["reload_cmd"] and report["promotion"]["reload_exit_code"] is not None:
    lines.append(f"reload: `{report['promotion']['reload_cmd']}` exit "
                 f"{report['promotion']['reload_exit_code']}")
lines.append(f"report: {run}")
text = "\n".join(lines) + "\n"
(run / "summary.txt").write_text(text)
if code != 75:  # locked: the one line on stderr is enough
    print(text, end="")
PY
    # Old run folders go, the newest KEEP_REPORTS stay (names sort by time).
    if ((KEEP_REPORTS > 0)); then
        find "$REPORTS" -mindepth 1 -maxdepth 1 -type d -name '[0-9]*T[0-9]*Z*' -printf '%f\n' |
            sort | head -n -"$KEEP_REPORTS" | while read -r old; do rm -rf "${REPORTS:?}/$old"; done
    fi
    exit "$code"
}
trap 'finish $?' EXIT

# Ends the run with an exit code and the reason the report gives.
stop() {
    R_REASON=$2
    if (($1 == EXIT_FAILED)); then
        echo "mine-retrain [$RUN_ID] FAILED: $2" >&2
    fi
    exit "$1"
}

# --- 1. mine --------------------------------------------------------------------------------
# The name of the newest report `mine` kept in the dataset (reports/mine-<run>.json), if any.
newest_mine_report() {
    { find "$DATASET/reports" -maxdepth 1 -type f -name 'mine-*.json' -printf '%f\n' 2>/dev/null ||
        true; } | sort -V | tail -n 1
}
if [[ "$SKIP_MINE" == 1 ]]; then
    log "mine: skipped (--skip-mine), dataset $DATASET"
else
    R_STAGE=mine
    args=(mine --config "$CONFIG" --out "$DATASET")
    [[ -n "$SINCE" ]] && args+=(--since "$SINCE")
    [[ -n "$UNTIL" ]] && args+=(--until "$UNTIL")
    mine_env=()
    if [[ "$SELF_TRAIN" == 1 ]]; then
        # Self-training: the node's confident, order-consistent predictions as pseudo labels.
        mine_env=(ANATOMY_MINE__PSEUDO_LABELS=true)
        log "mine: self-training, pseudo labels on (ANATOMY_MINE__PSEUDO_LABELS=true)"
    fi
    log "mine: $ANATOMY_NODE mine --config $CONFIG --out $DATASET"
    rc=0
    report_before=$(newest_mine_report)
    env "${mine_env[@]}" "$ANATOMY_NODE" "${args[@]}" >"$RUN_DIR/mine.log" 2>&1 9>&- || rc=$?
    R_MINE_EXIT=$rc
    # mine's own report of this run (counts, timing), when it wrote one: a report newer than
    # the newest before the run (the dataset's mine.json only ties the folder to the index).
    report_after=$(newest_mine_report)
    if [[ -n "$report_after" && "$report_after" != "$report_before" ]]; then
        cp "$DATASET/reports/$report_after" "$RUN_DIR/mine.json" || true
    fi
    case "$rc" in
        0) log "mine: complete" ;;
        75)
            echo "mine-retrain [$RUN_ID] another anatomy-node mine holds its lock; nothing done" >&2
            stop "$EXIT_LOCKED" "anatomy-node mine exit 75: another mine run holds its lock"
            ;;
        3 | 4)
            if [[ "$ALLOW_PARTIAL" == 1 ]]; then
                log "mine: exit $rc (partial or stopped early); going on (--allow-partial)"
            else
                stop "$EXIT_MINE_INCOMPLETE" "anatomy-node mine exit $rc (partial or stopped early); \
not retraining on an incomplete night without --allow-partial; the next run completes it"
            fi
            ;;
        *)
            show_tail "$RUN_DIR/mine.log"
            stop "$EXIT_FAILED" "anatomy-node mine failed with exit $rc (see mine.log)"
            ;;
    esac
fi

# --- 2. the test split ----------------------------------------------------------------------
R_STAGE=check
[[ -f "$DATASET/manifest.csv" ]] || stop "$EXIT_FAILED" "no dataset at $DATASET (manifest.csv missing)"
DATASET=$DATASET RUN_DIR=$RUN_DIR "$PYTHON3" - <<'PY' || stop "$EXIT_FAILED" "cannot read $DATASET/manifest.csv"
import csv, hashlib, json, os
from pathlib import Path

ds = Path(os.environ["DATASET"])
manifest = ds / "manifest.csv"
with manifest.open(newline="") as f:
    rows = list(csv.DictReader(f))
for column in ("label", "split"):
    if rows and column not in rows[0]:
        raise SystemExit(f"manifest.csv has no `{column}` column")
# Models are judged on human labels only (`anatomy-node eval --labels human`).
def pseudo(r):
    return (r.get("label_source") or "").startswith("pseudo:")
test_all = [r for r in rows if r["split"] == "test" and r["label"] != "ambiguous"]
test = [r for r in test_all if not pseudo(r)]
# Patients: the anonymised patient key of the contract; a study when a manifest has none.
key = "patient_key" if rows and "patient_key" in rows[0] else "study_uid"
summary = {
    "path": str(ds),
    "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
    "images": len(rows),
    "test_images": len(test),
    "test_patients": len({r.get(key, "") for r in test}),
    "patients_from": key,
    "test_images_pseudo": len(test_all) - len(test),
    "pseudo_images": sum(1 for r in rows if pseudo(r)),
    "splits": {s: sum(1 for r in rows if r["split"] == s) for s in sorted({r["split"] for r in rows})},
}
(Path(os.environ["RUN_DIR"]) / "test-split.json").write_text(json.dumps(summary, indent=2) + "\n")
PY
read -r MANIFEST_SHA TEST_IMAGES TEST_PATIENTS < <("$PYTHON3" -c '
import json, sys
s = json.load(open(sys.argv[1]))
print(s["manifest_sha256"], s["test_images"], s["test_patients"])' "$RUN_DIR/test-split.json")
log "dataset: test split $TEST_IMAGES scored images (human labels) of $TEST_PATIENTS patients"
if ((TEST_IMAGES < MIN_TEST_IMAGES || TEST_PATIENTS < MIN_TEST_PATIENTS)); then
    stop "$EXIT_TOO_SMALL" "the test split holds $TEST_IMAGES scored human-labelled images of $TEST_PATIENTS \
patients; comparing models needs at least $MIN_TEST_IMAGES images of $MIN_TEST_PATIENTS patients \
(MIN_TEST_IMAGES, MIN_TEST_PATIENTS): not promoted"
fi

# --- 3. train -------------------------------------------------------------------------------
if [[ -n "$CANDIDATE" ]]; then
    log "train: skipped, candidate $CANDIDATE"
    R_CANDIDATE=$CANDIDATE
else
    last_sha_file=$REPORTS/last-trained-manifest.sha256
    if [[ "$FORCE" == 0 && -f "$last_sha_file" && "$(cat "$last_sha_file")" == "$MANIFEST_SHA" ]]; then
        stop "$EXIT_UNCHANGED" "manifest.csv is unchanged since the last training run \
(sha256 $MANIFEST_SHA): nothing new to learn (--force trains anyway)"
    fi
    R_STAGE=train
    VERSION=$VERSION_PREFIX-$RUN_ID
    mkdir -p "$WORK"
    log "train: pack $DATASET"
    (cd "$ANATOMY_REPO" && "$PY" -m training pack "$DATASET" "$WORK/dataset.npz") \
        >"$RUN_DIR/pack.log" 2>&1 9>&- ||
        { show_tail "$RUN_DIR/pack.log" && stop "$EXIT_FAILED" "python -m training pack failed (see pack.log)"; }
    log "train: $VERSION ($EPOCHS epochs at most, device $DEVICE)"
    read -r -a train_extra <<<"$TRAIN_ARGS"
    (cd "$ANATOMY_REPO" && "$PY" -m training train --data "$WORK/dataset.npz" --out "$RUN_DIR/train" \
        --device "$DEVICE" --seed "$SEED" --epochs "$EPOCHS" --patience "$PATIENCE" \
        --threads "$THREADS" --model-version "$VERSION" --pseudo-weight "$PSEUDO_WEIGHT" \
        "${train_extra[@]}") \
        >"$RUN_DIR/train.log" 2>&1 9>&- ||
        { show_tail "$RUN_DIR/train.log" && stop "$EXIT_FAILED" "python -m training train failed (see train.log)"; }
    log "train: export $RUN_DIR/candidate.onnx"
    (cd "$ANATOMY_REPO" && "$PY" -m training export "$RUN_DIR/train/model.pt" \
        "$RUN_DIR/candidate.onnx" --model-version "$VERSION") >"$RUN_DIR/export.log" 2>&1 9>&- ||
        { show_tail "$RUN_DIR/export.log" && stop "$EXIT_FAILED" "python -m training export failed (see export.log)"; }
    echo "$MANIFEST_SHA" >"$last_sha_file"
    R_TRAINED=1
    R_CANDIDATE=$RUN_DIR/candidate.onnx
fi

# --- 4. evaluate both on the same held-out patients, human labels only ----------------------
R_STAGE=evaluate
first_error() { # the first error line of a log, without the program's prefix
    { grep -m1 'error' "$1" || tail -n1 "$1"; } | sed 's/^anatomy-node: error: //'
}
evaluate() { # model, out folder → eval's exit code; its output in <out>.log
    local rc=0
    "$ANATOMY_NODE" eval --model "$1" --dataset "$DATASET" --split test --labels human --out "$2" \
        --device "$EVAL_DEVICE" --threads "$EVAL_THREADS" >"$2.log" 2>&1 9>&- || rc=$?
    return "$rc"
}
if [[ -e "$MODEL" ]]; then
    log "evaluate: current $MODEL"
    evaluate "$MODEL" "$RUN_DIR/eval-current" || {
        show_tail "$RUN_DIR/eval-current.log"
        stop "$EXIT_FAILED" "anatomy-node eval of the current model $MODEL failed: \
$(first_error "$RUN_DIR/eval-current.log")"
    }
else
    log "evaluate: no current model at $MODEL (first installation)"
fi
log "evaluate: candidate $R_CANDIDATE"
if ! evaluate "$R_CANDIDATE" "$RUN_DIR/eval-candidate"; then
    show_tail "$RUN_DIR/eval-candidate.log"
    stop "$EXIT_REFUSED" "candidate refused (it fails the model contract, or does not fit the \
dataset): $(first_error "$RUN_DIR/eval-candidate.log")"
fi

# --- 5. decide ------------------------------------------------------------------------------
R_STAGE=decide
verdict=$(RUN_DIR=$RUN_DIR AUC_MARGIN=$AUC_MARGIN MIN_TEST_IMAGES=$MIN_TEST_IMAGES \
    MIN_TEST_PATIENTS=$MIN_TEST_PATIENTS "$PYTHON3" - <<'PY'
import json, os
from fractions import Fraction
from pathlib import Path

run = Path(os.environ["RUN_DIR"])
margin = float(os.environ["AUC_MARGIN"])
cand = json.loads((run / "eval-candidate/metrics.json").read_text())
cur_file = run / "eval-current/metrics.json"
cur = json.loads(cur_file.read_text()) if cur_file.exists() else None

def scored_patients(m):
    return sum(1 for p in m.get("patient", {}).get("per_patient", []) if p.get("images", 0) > 0)

def out(verdict, reason, **extra):
    (run / "comparison.json").write_text(json.dumps({"verdict": verdict, "reason": reason, **extra}, indent=2) + "\n")
    print(verdict, reason)
    raise SystemExit(0)

c = cand["slice"]
images, patients = c["images"], scored_patients(cand)
if images < int(os.environ["MIN_TEST_IMAGES"]) or patients < int(os.environ["MIN_TEST_PATIENTS"]):
    out("too-small", f"the candidate scores {images} human-labelled test images of {patients} "
        "patients (the others have labels outside its classes); too few to compare")
if cur is None:
    out("promote", "no current model: the candidate becomes the first one "
        f"(slice error {100 * c['error']:.2f} %)")
missing = [k for k in cur["model"]["classes"] if k not in cand["model"]["classes"]]
if missing:
    out("refuse", f"the candidate lacks classes of the current model: {', '.join(missing)}")
if cur["dataset"]["manifest_sha256"] != cand["dataset"]["manifest_sha256"]:
    out("error", "the two evaluations read different manifests")
k = cur["slice"]
e_cand = Fraction(c["errors"], c["images"])
e_cur = Fraction(k["errors"], k["images"])
common = [name for name, v in cur["slice"]["auc"].items()
          if v is not None and cand["slice"]["auc"].get(name) is not None]
auc_cur = sum(cur["slice"]["auc"][n] for n in common) / len(common) if common else None
auc_cand = sum(cand["slice"]["auc"][n] for n in common) / len(common) if common else None
extra = {"slice_error_current": float(e_cur), "slice_error_candidate": float(e_cand),
         "auc_classes": common, "mean_auc_current": auc_cur, "mean_auc_candidate": auc_cand,
         "auc_margin": margin}
fig = (f"slice error {100 * float(e_cand):.2f} % ({c['errors']}/{c['images']}) vs "
       f"{100 * float(e_cur):.2f} % ({k['errors']}/{k['images']})")
if e_cand < e_cur:
    out("promote", f"the candidate is better: {fig}", **extra)
if e_cand > e_cur:
    out("keep", f"the candidate is worse: {fig}", **extra)
if auc_cur is None:
    out("keep", f"equal slice error ({fig}) and no class with an AUC for both models", **extra)
auc = f"mean AUC over {len(common)} classes {auc_cand:.4f} vs {auc_cur:.4f}"
if auc_cand > auc_cur + margin:
    out("promote", f"equal slice error ({fig}), higher {auc} (margin {margin})", **extra)
out("keep", f"equal slice error ({fig}), {auc}: not higher by more than {margin}", **extra)
PY
) || stop "$EXIT_FAILED" "comparing the two evaluations failed"
reason=${verdict#* }
case "${verdict%% *}" in
    promote) log "decide: promote: $reason" ;;
    keep) stop "$EXIT_NOT_BETTER" "not promoted: $reason" ;;
    too-small) stop "$EXIT_TOO_SMALL" "not promoted: $reason" ;;
    refuse) stop "$EXIT_REFUSED" "candidate refused: $reason" ;;
    *) stop "$EXIT_FAILED" "$reason" ;;
esac

# --- 6. promote -----------------------------------------------------------------------------
R_STAGE=promote
model_dir=$(dirname "$MODEL")
stem=$(basename "$MODEL" .onnx)
mkdir -p "$model_dir"
tmp=$(mktemp "$model_dir/.$stem.onnx.XXXXXX") || stop "$EXIT_FAILED" "cannot write in $model_dir"
cleanup_tmp() { rm -f "$tmp"; }
if ! { cp "$R_CANDIDATE" "$tmp" && sync "$tmp"; }; then
    cleanup_tmp
    stop "$EXIT_FAILED" "copying the candidate to $model_dir failed; current model untouched"
fi
if [[ -e "$MODEL" ]]; then
    chmod --reference="$MODEL" "$tmp"
    old_version=$("$PYTHON3" -c 'import json,sys; print(json.load(open(sys.argv[1]))["model"]["version"])' \
        "$RUN_DIR/eval-current/metrics.json")
    safe_version=$(printf '%s' "$old_version" | tr -c 'A-Za-z0-9._-' '_')
    backup=$model_dir/$stem.$safe_version.onnx
    if [[ -e "$backup" ]] && ! cmp -s "$backup" "$MODEL"; then
        backup=$model_dir/$stem.$safe_version.$RUN_ID.onnx
    fi
    if [[ ! -e "$backup" ]] && ! ln "$MODEL" "$backup" 2>/dev/null && ! cp -p "$MODEL" "$backup"; then
        cleanup_tmp
        stop "$EXIT_FAILED" "cannot keep the current model as $backup; current model untouched"
    fi
    R_BACKUP=$backup
else
    chmod 644 "$tmp"
fi
if ! mv -f "$tmp" "$MODEL"; then
    cleanup_tmp
    stop "$EXIT_FAILED" "renaming the candidate over $MODEL failed; current model untouched"
fi
sync "$model_dir" || true
cmp -s "$R_CANDIDATE" "$MODEL" || stop "$EXIT_FAILED" "$MODEL does not hold the candidate after the rename"
log "promote: $MODEL replaced${R_BACKUP:+, previous model kept as $R_BACKUP}"
R_REASON="promoted: $reason"

if [[ -n "$RELOAD_CMD" ]]; then
    R_STAGE=reload
    log "reload: $RELOAD_CMD"
    rc=0
    bash -c "$RELOAD_CMD" >"$RUN_DIR/reload.log" 2>&1 9>&- || rc=$?
    R_RELOAD_EXIT=$rc
    if ((rc != 0)); then
        show_tail "$RUN_DIR/reload.log"
        stop "$EXIT_RELOAD_FAILED" "promoted ($reason), but the reload command failed with exit \
$rc: the node serves the previous model until it restarts"
    fi
fi
R_STAGE=finished
exit "$EXIT_PROMOTED"
