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
# What comes back: $OUT/table.tgz (the cells), $OUT/table.md (the table) and, when it fits the
# 16 MiB a returned file may have (about two ResNet-56 cells), $OUT/state.tgz with the
# checkpoints of the unfinished cells. For a later session, commit the cells (bench/results/...)
# and name that folder in FROM, and carry state.tgz and name it in FROM_STATE: those cells then
# resume too; the others start again.
#   MODELS (resnet56), SPLITS (1,2,3,4), METHODS (bp,ddg,fdg), EPOCHS (30), SHRINK (0.5), PARALLEL (7)
#   TRAIN_ARGS  the recipe, passed to every staleprop train
#               (default: --device cuda --precision bf16 --lr 0.1 --schedule cosine
#                --weight-decay 5e-4 --nesterov --batch-size 128 --graphs)
#   DATA_DIR    an unpacked CIFAR-10 (default: unpack .carry/data's pack into data/)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
STATE=${STATE:-gpu-state/table}
EPOCHS=${EPOCHS:-30}
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
if [ -n "${FROM_STATE:-}" ]; then
  tar xzf "$FROM_STATE" -C "$STATE/ckpt" --skip-old-files || exit 1  # never over a warm call's newer ones
fi
TRAIN_ARGS=${TRAIN_ARGS:-"--device cuda --precision bf16 --lr 0.1 --schedule cosine --weight-decay 5e-4 --nesterov \
--batch-size 128 --graphs"}
# The budget leaves time for the grace a run's first epoch may take past it (a first epoch after
# a start or resume has nothing to be estimated from) and to pack the results.
COMMON=(--staleprop "${STALEPROP:-.carry/bin/staleprop}" --out "$STATE/table" --state "$STATE/ckpt"
  --parallel "${PARALLEL:-7}" --budget $((DEADLINE - SECONDS - 45)) --grace 30)
if [ -n "${RUNS:-}" ]; then
  python3 tools/resumable_runs.py run --runs "$RUNS" "${COMMON[@]}" -- --data "$DATA_DIR" ${TRAIN_ARGS_EXTRA:-}
  python3 tools/resumable_runs.py summary --out "$STATE/table" | tee "$OUT/table.md"
else
  python3 tools/accuracy_table.py run "${COMMON[@]}" --models "${MODELS:-resnet56}" --splits "${SPLITS:-1,2,3,4}" \
    --methods "${METHODS:-bp,ddg,fdg}" --epochs "$EPOCHS" --shrink "${SHRINK:-0.5}" -- --data "$DATA_DIR" $TRAIN_ARGS
  python3 tools/accuracy_table.py table --out "$STATE/table" | tee "$OUT/table.md"
fi
tar czf "$OUT/table.tgz" -C "$STATE" table
# The checkpoints of the cells still to finish (written before their last epoch).
mapfile -t unfinished < <(python3 tools/resumable_runs.py unfinished --out "$STATE/table" --state "$STATE/ckpt")
if [ ${#unfinished[@]} -gt 0 ]; then
  tar czf "$OUT/state.tgz" -C "$STATE/ckpt" "${unfinished[@]}"
  if [ "$(stat -c %s "$OUT/state.tgz")" -gt $((16 * 1024 * 1024)) ]; then
    echo "gpu_accuracy.sh: the checkpoints of ${#unfinished[@]} unfinished cells exceed 16 MiB; they stay in" \
      "$STATE/ckpt (on this machine while it is warm) and do not come back" >&2
    rm -f "$OUT/state.tgz"
  fi
fi
