#!/usr/bin/env bash
# An accuracy call on the lent GPU machine: fills cells of the decoupled accuracy table
# (tools/accuracy_table.py) until DEADLINE seconds (default 540), on the staleprop binary that
# tools/gpu_prepare.sh carried (.carry/bin/staleprop; STALEPROP overrides), so no build is needed.
# Everything comes back as $OUT/table.tgz, plus the table as $OUT/table.md. To go on from an
# earlier call, commit its cells (bench/results/...) and name that folder in FROM: its cells are
# copied in first, and the finished ones are skipped.
#   MODELS (resnet56), SPLITS (1,2,3,4), METHODS (bp,ddg,fdg), EPOCHS (30), SHRINK (0.5)
#   TRAIN_ARGS  the recipe, passed to every staleprop train
#               (default: --device cuda --precision bf16 --lr 0.1 --schedule cosine
#                --weight-decay 5e-4 --nesterov --batch-size 128 --graphs)
#   DATA_DIR    an unpacked CIFAR-10 (default: unpack .carry/data's pack into data/)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT/table"
DEADLINE=${DEADLINE:-540}
source tools/gpu_env.sh
if [ -z "${DATA_DIR:-}" ]; then
  DATA_DIR=data/cifar-10-batches-bin
  python3 .carry/data/unpack_cifar10.py .carry/data/cifar10-jpeg.pack.gz "$DATA_DIR" > /dev/null || exit 1
fi
if [ -n "${FROM:-}" ]; then
  cp "$FROM"/*.jsonl "$FROM"/*.cmd "$OUT/table/" 2>/dev/null
  cp "$FROM"/*.log "$OUT/table/" 2>/dev/null
fi
TRAIN_ARGS=${TRAIN_ARGS:-"--device cuda --precision bf16 --lr 0.1 --schedule cosine --weight-decay 5e-4 --nesterov \
--batch-size 128 --graphs"}
# The table's own budget leaves time to pack the results.
python3 tools/accuracy_table.py run --staleprop "${STALEPROP:-.carry/bin/staleprop}" --out "$OUT/table" \
  --models "${MODELS:-resnet56}" --splits "${SPLITS:-1,2,3,4}" --methods "${METHODS:-bp,ddg,fdg}" \
  --epochs "${EPOCHS:-30}" --shrink "${SHRINK:-0.5}" --budget $((DEADLINE - SECONDS - 20)) \
  -- --data "$DATA_DIR" $TRAIN_ARGS
python3 tools/accuracy_table.py table --out "$OUT/table" | tee "$OUT/table.md"
tar czf "$OUT/table.tgz" -C "$OUT" table && rm -rf "${OUT:?}/table"
