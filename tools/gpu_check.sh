#!/usr/bin/env bash
# Run on the lent GPU machine (see tools/gpu_prepare.sh): builds for sm_90, runs every test
# (the GPU tests included), compute-sanitizer memcheck and racecheck on the CUDA kernel tests,
# and short CUDA training runs in fp32 and bf16; logs go to $OUT (default ./gpu-out), a summary to stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
prefix_of() { python3 -c "import nvidia.$1 as m; print(list(m.__path__)[0])" 2>/dev/null; }
CUDNN=$(prefix_of cudnn) NCCL=$(prefix_of nccl)
export LD_LIBRARY_PATH="${CUDNN:+$CUDNN/lib:}${NCCL:+$NCCL/lib:}$PWD/.carry/benchmark/lib:${LD_LIBRARY_PATH:-}"
{ date -u; echo "commit $(cat .carry/commit 2>/dev/null || git rev-parse HEAD)"; nvidia-smi; nvcc --version; } \
  > "$OUT/env.txt" 2>&1
echo "== configure and build (build-gpu/)"
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DSTALEPROP_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCMAKE_PREFIX_PATH="${CUDNN};${NCCL}" > "$OUT/build.log" 2>&1 &&
  cmake --build build-gpu -j "$(nproc)" >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "== tests"
(cd build-gpu && ctest --output-on-failure -j 4) > "$OUT/ctest.log" 2>&1
echo "ctest exit $?: $(grep -E 'tests passed' "$OUT/ctest.log")"
for tool in memcheck racecheck; do
  for t in test_cuda_ops test_cuda_tensor_core; do
    compute-sanitizer --tool "$tool" --error-exitcode 1 "build-gpu/tests/$t" > "$OUT/sanitizer-$tool-$t.log" 2>&1
    echo "compute-sanitizer $tool $t exit $?"
  done
done
if [ -f .carry/data/cifar10-jpeg.pack.gz ]; then
  python3 .carry/data/unpack_cifar10.py .carry/data/cifar10-jpeg.pack.gz data/cifar-10-batches-bin > /dev/null &&
    build-gpu/tools/staleprop train --device cuda --model resnet20 --epochs 1 --progress plain \
      --metrics "$OUT/train-metrics.jsonl" > "$OUT/train.log" 2>&1
  echo "training smoke run exit $?: $(tail -1 "$OUT/train.log")"
  build-gpu/tools/staleprop train --device cuda --model resnet20 --epochs 1 --precision bf16 --progress plain \
    --metrics "$OUT/train-bf16-metrics.jsonl" > "$OUT/train-bf16.log" 2>&1
  echo "bf16 training smoke run exit $?: $(tail -1 "$OUT/train-bf16.log")"
fi
