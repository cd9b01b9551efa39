#!/usr/bin/env bash
# Run on the lent GPU machine (see tools/gpu_prepare.sh): builds for sm_90a and checks the GPU
# code. Stages (STAGES, default all, in this order), each bounded by its own timeout so that the
# whole script fits one device call:
#   build     configure and build build-gpu/ (nothing where tools/gpu_env.sh unpacked the
#             prebuilt build that tools/gpu_prepare.sh carried)             (T_BUILD, 240 s)
#   test      every test, the GPU ones included (ctest), but the tools/ scripts' CPU tests,
#             each test limited to 120 s                                     (T_TEST, 240 s)
#   sanitize  compute-sanitizer memcheck and racecheck on the CUDA kernel tests (T_SANITIZE, 300 s)
#   throughput  staleprop bench beside bench/pytorch_baseline.py, ResNet-56 at batch 128, fp32 and
#             bf16, custom and vendor kernels, a short run of each           (T_THROUGHPUT, 150 s)
#   smoke     short CUDA training runs in fp32 and bf16 on CIFAR-10          (T_SMOKE, 240 s)
# SANITIZE_TOOLS (memcheck racecheck) and SANITIZE_TESTS (test_cuda_ops test_cuda_tensor_core);
# SANITIZE_FILTER, a --gtest_filter for them (e.g. '*/wgmma' for the wgmma main loop's tests)
# narrow the sanitizer stage. tools/gpu_bench.sh takes the full measurements.
# Logs go to $OUT (default ./gpu-out), one line per stage to stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
export OUT
STAGES=${STAGES:-"build test sanitize throughput smoke"}
mkdir -p "$OUT"
source tools/gpu_env.sh
{ date -u; echo "commit $(cat .carry/commit 2>/dev/null || git rev-parse HEAD)"; nvidia-smi; nvcc --version; } \
  > "$OUT/env.txt" 2>&1
for stage in $STAGES; do
  case $stage in
  build)
    if [ -f build-gpu/.prebuilt ]; then
      # tools/gpu_prepare.sh's build of this commit, unpacked by tools/gpu_env.sh: nothing to build.
      echo "build: prebuilt on the development machine (commit $(cat .carry/commit 2>/dev/null))"
      continue
    fi
    timeout "${T_BUILD:-240}" bash -c "cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DSTALEPROP_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES=90a -DCMAKE_PREFIX_PATH='${CUDNN};${NCCL}' -DSTALEPROP_TEST_TIMEOUT=120 \
      && cmake --build build-gpu -j $(nproc)" \
      > "$OUT/build.log" 2>&1
    rc=$?
    echo "build exit $rc"
    [ $rc = 0 ] || { tail -40 "$OUT/build.log"; exit 1; }
    ;;
  test)
    # A test that hangs (a GPU kernel waiting forever) fails alone after 120 s (the build's
    # STALEPROP_TEST_TIMEOUT, set by the build stage: a build-gpu/ configured otherwise keeps its
    # own). The tools/ scripts' tests use only the CPU and run on the development machine and in
    # CI. timeout -k: SIGKILL if ctest has not ended 10 s after SIGTERM.
    # A prebuilt build's ptxas, command-line and time-limit checks (which run CMake, ctest, nvcc or
    # sh from the development machine's paths) are left to that machine and CI, like the tools/
    # tests.
    skip='^tools\.'; [ -f build-gpu/.prebuilt ] && skip='^(tools|ptxas|cli|ctest)\.'
    (cd build-gpu && timeout -k 10 "${T_TEST:-240}" ctest --output-on-failure -j 8 -E "$skip") \
      > "$OUT/ctest.log" 2>&1
    echo "ctest exit $?: $(grep -E 'tests passed|tests failed' "$OUT/ctest.log")"
    grep -E '^\s+[0-9]+ - .*\((Failed|Timeout|SEGFAULT|Subprocess aborted)\)' "$OUT/ctest.log" | head -20
    ;;
  sanitize)
    for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
      for t in ${SANITIZE_TESTS:-test_cuda_ops test_cuda_tensor_core}; do
        timeout -k 10 "${T_SANITIZE:-300}" compute-sanitizer --tool "$tool" --error-exitcode 1 "build-gpu/tests/$t" \
          ${SANITIZE_FILTER:+--gtest_filter="$SANITIZE_FILTER"} >> "$OUT/sanitizer.log" 2>&1
        echo "compute-sanitizer $tool $t exit $?"
      done
    done
    ;;
  throughput)
    timeout "${T_THROUGHPUT:-150}" bash -c '
      for prec in fp32 bf16; do
        for kern in custom vendor; do
          build-gpu/tools/staleprop bench --device cuda --model resnet56 --batch-size 128 --precision $prec \
            --kernels $kern --steps 30 --warmup 5 --json "$OUT/throughput.jsonl"
        done
        flags=""; [ $prec = bf16 ] && flags="--bf16 --channels-last"
        python3 bench/pytorch_baseline.py --model resnet56 --batch-size 128 --steps 30 --warmup 5 $flags \
          | tee -a "$OUT/throughput.jsonl"
      done' > "$OUT/throughput.txt" 2>&1
    echo "throughput exit $?"; cat "$OUT/throughput.txt"
    ;;
  smoke)
    if [ -f .carry/data/cifar10-jpeg.pack.gz ]; then
      python3 .carry/data/unpack_cifar10.py .carry/data/cifar10-jpeg.pack.gz data/cifar-10-batches-bin > /dev/null
      for prec in fp32 bf16; do
        timeout -k 15 "${T_SMOKE:-240}" build-gpu/tools/staleprop train --device cuda --model resnet20 --epochs 1 \
          --precision $prec --progress plain > "$OUT/train-$prec.log" 2>&1
        echo "training smoke run ($prec) exit $?: $(tail -1 "$OUT/train-$prec.log")"
      done
    fi
    ;;
  esac
done
