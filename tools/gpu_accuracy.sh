#!/usr/bin/env bash
# An accuracy call on the lent GPU machine: fills cells of the decoupled accuracy table
# (tools/accuracy_table.py) until DEADLINE seconds (default 540), on the staleprop binary that
# tools/gpu_prepare.sh carried (.carry/bin/staleprop; STALEPROP overrides), so no build is needed.
#
# The cells train PARALLEL at once in one process (staleprop sweep; default 7, every ResNet-56
# cell), sharing the GPU. Their metrics, logs and commands live in STATE/table and their
# checkpoints (one per cell, rewritten every epoch) in STATE/ckpt; STATE (default
# gpu-state/table) is git-ignored, so on a warm machine it stays between calls and a cell the
# deadline stopped resumes at its last epoch on the next call, bit for bit.
#
# With RUNS=FILE it trains the named runs of that file instead (tools/resumable_runs.py; e.g.
# bench/runs/resnet20-recipes.txt), the same way, and $OUT/table.md is their summary; each line
# of the file gives its whole recipe, TRAIN_ARGS_EXTRA is added to every run.
#
# What comes back: $OUT/table.tgz (the cells), $OUT/table.md (the table) and the checkpoints of
# the unfinished cells as one gzipped tar cut into parts, $OUT/state-ID.tgz.00, .01, ... (ID: the
# first 8 hex digits of the tar's SHA-256) of at most PART_BYTES (15 MiB) each: the device tool
# returns 8 files of at most 16 MiB. They come back only when the tar is at most STATE_MAX_BYTES
# (32 MiB): what a later call can carry beside the data (19 MB), the xz-compressed binary (7 MB)
# and the tree, within the 64 MiB a call carries; that is about five ResNet-56 cells, so train at
# most five at once (PARALLEL=5) when they must go on in another session. For that session,
# commit the cells (bench/results/...) and name that folder in FROM, and carry the parts:
# STATE_PARTS=DIR ACCURACY=1 tools/gpu_prepare.sh puts them in .carry/state, which is
# FROM_STATE's default (a folder with one state's parts, or one .tgz). They are checked against
# their ID and unpacked aside before any is used, and never over a checkpoint already here (a
# warm machine's is newer). Those cells then resume; the others start again.
#   MODELS (resnet56), SPLITS (1,2,3,4), METHODS (bp,ddg,fdg), EPOCHS (160), SHRINK (every fdg cell's factor; default: the one FDG published the cell with, else 0.5; ddg cells none), PARALLEL (7)
#   TRAIN_ARGS  the recipe, passed to every staleprop train (default: the recipe of the cells in
#               bench/results/nvidia-h100/accuracy-table, which FROM may name: --device cuda
#               --precision bf16 --batch-size 128 --lr 0.1 --momentum 0.9 --nesterov --weight-decay
#               5e-4 --schedule cosine --warmup-epochs 2 --cutout 16 --graphs). A cell resumes, or
#               counts as done, only with the recipe it was trained with (flags in any order, values
#               as written); one trained with another (the fdg K = 4 cell there ran at beta 0.5,
#               not FDG's 0.3, which is now its default) starts again, its records moved aside
#   DATA_DIR    an unpacked CIFAR-10 (default: unpack .carry/data's pack into data/)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/gpu-out}
STATE=${STATE:-gpu-state/table}
EPOCHS=${EPOCHS:-160}
mkdir -p "$OUT" "$STATE/table" "$STATE/ckpt"
DEADLINE=${DEADLINE:-540}
source tools/gpu_env.sh
if [ -z "${DATA_DIR:-}" ]; then
  DATA_DIR=data/cifar-10-batches-bin
  python3 .carry/data/unpack_cifar10.py .carry/data/cifar10-jpeg.pack.gz "$DATA_DIR" > /dev/null || exit 1
fi
if [ -n "${FROM:-}" ]; then
  # Never over what a warm machine's earlier call left: that is newer.
  cp -n "$FROM"/*.jsonl "$FROM"/*.cmd "$FROM"/*.log "$STATE/table/" 2>/dev/null
fi
[ -z "${FROM_STATE:-}" ] && [ -d .carry/state ] && FROM_STATE=.carry/state
if [ -n "${FROM_STATE:-}" ]; then
  fail() { echo "gpu_accuracy.sh: FROM_STATE $FROM_STATE: $*" >&2; exit 1; }
  whole=$FROM_STATE
  if [ -d "$FROM_STATE" ]; then
    ids=()
    for f in "$FROM_STATE"/state-????????.tgz.[0-9][0-9]; do
      [ -e "$f" ] || continue
      id=${f##*/state-}; id=${id%%.*}
      [[ " ${ids[*]} " == *" $id "* ]] || ids+=("$id")
    done
    [ ${#ids[@]} -eq 1 ] || fail "holds the parts of ${#ids[@]} states (${ids[*]}); keep one call's parts"
    whole=$STATE/from-state.tgz
    cat "$FROM_STATE"/state-"${ids[0]}".tgz.[0-9][0-9] > "$whole"
    [ "$(sha256sum "$whole" | cut -c1-8)" = "${ids[0]}" ] || fail "its parts do not make state ${ids[0]}: one is missing or damaged"
  fi
  rm -rf "$STATE/from-state" && mkdir -p "$STATE/from-state"
  tar xzf "$whole" -C "$STATE/from-state" || fail "cannot unpack $whole"
  # Never over a warm call's newer ones.
  cp -n "$STATE"/from-state/* "$STATE/ckpt/" 2>/dev/null
  rm -rf "$STATE/from-state" "$STATE/from-state.tgz"
fi
TRAIN_ARGS=${TRAIN_ARGS:-"--device cuda --precision bf16 --batch-size 128 --lr 0.1 --momentum 0.9 --nesterov \
--weight-decay 5e-4 --schedule cosine --warmup-epochs 2 --cutout 16 --graphs"}
# The budget leaves time for the grace a run's first epoch may take past it (a first epoch after
# a start or resume has nothing to be estimated from) and to pack the results.
COMMON=(--staleprop "${STALEPROP:-.carry/bin/staleprop}" --out "$STATE/table" --state "$STATE/ckpt"
  --parallel "${PARALLEL:-7}" --budget $((DEADLINE - SECONDS - 45)) --grace 30)
if [ -n "${RUNS:-}" ]; then
  python3 tools/resumable_runs.py run --runs "$RUNS" "${COMMON[@]}" -- --data "$DATA_DIR" ${TRAIN_ARGS_EXTRA:-}
  python3 tools/resumable_runs.py summary --out "$STATE/table" | tee "$OUT/table.md"
else
  python3 tools/accuracy_table.py run "${COMMON[@]}" --models "${MODELS:-resnet56}" --splits "${SPLITS:-1,2,3,4}" \
    --methods "${METHODS:-bp,ddg,fdg}" --epochs "$EPOCHS" ${SHRINK:+--shrink "$SHRINK"} -- --data "$DATA_DIR" $TRAIN_ARGS
  python3 tools/accuracy_table.py table --out "$STATE/table" | tee "$OUT/table.md"
fi
tar czf "$OUT/table.tgz" -C "$STATE" table
# The checkpoints of the cells still to finish (written before their last epoch), in parts.
rm -f "$OUT"/state-*.tgz.*
mapfile -t unfinished < <(python3 tools/resumable_runs.py unfinished --out "$STATE/table" --state "$STATE/ckpt")
if [ ${#unfinished[@]} -gt 0 ]; then
  tar czf "$STATE/state.tgz" -C "$STATE/ckpt" "${unfinished[@]}"
  part=${PART_BYTES:-$((15 * 1024 * 1024))}
  max=${STATE_MAX_BYTES:-$((32 * 1024 * 1024))}
  size=$(stat -c %s "$STATE/state.tgz")
  kept="they stay in $STATE/ckpt (on this machine while it is warm) and do not come back"
  if [ "$size" -gt "$max" ]; then
    echo "gpu_accuracy.sh: the checkpoints of ${#unfinished[@]} unfinished cells ($size bytes) are more than a later" \
      "call can carry ($max bytes); $kept" >&2
  elif [ $(((size + part - 1) / part)) -gt 5 ]; then
    echo "gpu_accuracy.sh: the checkpoints of ${#unfinished[@]} unfinished cells ($size bytes) make more than 5 parts" \
      "of $part bytes (the device tool returns 8 files); $kept" >&2
  else
    id=$(sha256sum "$STATE/state.tgz" | cut -c1-8)
    split -b "$part" -d -a 2 "$STATE/state.tgz" "$OUT/state-$id.tgz."
    parts=("$OUT"/state-"$id".tgz.*)
    echo "gpu_accuracy.sh: the checkpoints of ${#unfinished[@]} unfinished cells: ${#parts[@]} parts," \
      "$OUT/state-$id.tgz.*" >&2
  fi
  rm -f "$STATE/state.tgz"
fi
