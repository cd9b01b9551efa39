#!/usr/bin/env bash
# A whole GPU session in one device call (the lease is short: see ../shared/guide/gpu.md). Run
# tools/gpu_prepare.sh here first: it carries the build made here (tools/gpu_env.sh unpacks it as
# build-gpu/, its staleprop as .carry/bin/staleprop), so nothing is built there and the accuracy
# run starts at once; with NO_PREBUILT=1 it carries staleprop alone and the rest is built there.
# Order, each step bounded so that the results are packed before DEADLINE seconds (default 560):
#   1. unpack CIFAR-10; start the accuracy run (TRAIN_ARGS) in the background, on the carried
#      binary when present (else after the build), its metrics in train.jsonl and its last
#      finished epoch's checkpoint in train.safetensors (returned beside the archive). With
#      .carry/resume/train.safetensors (RESUME=FILE tools/gpu_prepare.sh) it resumes that run;
#   2. build build-gpu/ (tools/gpu_check.sh build, niced; nothing to build where gpu_prepare.sh
#      carried the build made on the development machine, which tools/gpu_env.sh unpacks) and
#      run every test but the tools/ scripts' CPU tests (ctest, 120 s per test);
#   3. compute-sanitizer memcheck (first) on the stride classes' test (their results go straight
#      into dx), the split-K test of every main loop (the epilogue's paired stores) and the
#      persistent TMA kernel's, then racecheck on the persistent kernel's (for at most
#      PERSISTENT_RACECHECK_CAP seconds, default 90), then memcheck on the
#      halo convolutions' tests, streaming and resident (where they passed, possibly with
#      STALEPROP_HALO_DESC_PHASE=1 on a second try) (SAN_CAP seconds each, default 30: each is
#      one test, which took 1-15 s under either tool on an H100; only tests that ended in ctest,
#      none that timed out; each runs while its cap + 200 s are left); then racecheck over the
#      convolution tests that it has not yet finished clean, and test_cuda_network
#      (SWEEP_CAP seconds each, default 100) while the accuracy run holds the GPU, else after
#      step 6 as time allows;
#   4. wait for the accuracy run (at most T_TRAIN seconds from its start, default 330, and never
#      past DEADLINE - 230 s, which the measurements keep), so that nothing shares the GPU with
#      the measurements; evaluate its checkpoint with staleprop and, loaded into PyTorch, with
#      bench/pytorch_load_checkpoint.py;
#   5. first, training throughput beside PyTorch eager in two rounds (#4's ratios, in one call):
#      bf16 ResNet-18 (batch 512) and ResNet-56 (128, from graphs) with every new path that passed
#      off, as by default, as by default with the candidate for a default (the halo convolutions
#      in mode 1, which gained alone on 2026-11-28, never timed against the persistent TMA kernel
#      alone in one call; that kernel is a default since 2026-11-28b) and all on
#      (STALEPROP_CONV_TMA, _DGRAD_CLASSES, _DGRAD_CLASS_DIRECT, _TMA_WIDE_BY_SHAPE, _TMA_CLUSTER,
#      _CONV_SMALL_C, _BN_PERSISTENT, _PDL, _TMA_PERSISTENT, _BF16_WEIGHT_COPIES, _DGRAD_ACCUMULATE,
#      _CONV_HALO, _HALO_RESIDENT, _TMA_L2_PREFETCH), ResNet-56 in fp32 as by default, PyTorch's settings beside each
#      round; then the sums over ResNet-18's bf16 convolutions as by default against cuDNN (and with
#      the halo convolutions in mode 1, never timed on the persistent kernel's sums), the
#      bf16 GEMM (both TMA tiles) and the convolutions' sums with the persistent TMA kernel off and
#      on (--tma-persistent) against cuBLASLt and cuDNN (or, where its test did not pass, the GEMM
#      with --tma-wide=0 and =1), and the same with the TMA kernel's L2 prefetch off and on
#      (--tma-l2-prefetch, never timed), with ResNet-18's training step. With REMEASURE=1 the figures first taken on 2026-11-28 again:
#      ResNet-18's stride-1 layers and the sums with the halo kernel off and in modes 1 and 2
#      (--conv-halo) and its training step, its resident form off and on; Nsight Compute on every
#      kernel of one stride-class data gradient (at most 90 s); the convolutions' sums with the
#      split of K by the earlier rule and capped at two waves; the convolutions layer by layer;
#      ResNet-18's and ResNet-56's
#      throughput with the persistent TMA kernel off and on; ResNet-18 at batch 128 from graphs;
#      and those first taken on 2026-11-28b: the bf16 weight copies off and on (ResNet-18,
#      ResNet-56 op by op and from graphs), the residual gradients summed in the data gradient off
#      and on (ResNet-18, ResNet-56 graphs). With or without it, ResNet-56's fdg over four modules
#      from graphs with the persistent TMA kernel off and on, and max pooling and the fused
#      BN+add+ReLU against the copy (their kernels changed on 2026-11-28c). With COMPARE_BIN, ResNet-56's
#      op-by-op fdg (interleaved, twice) and backprop on this commit's binary and another's, and
#      fdg with the transposed filter and the scratch pool's cross-stream waits. With POOL=1,
#      gpu_bench stage 1 for the pooling and shortcut kernels against the copy (at most 60 s).
#      Then ResNet-56's from graphs, ResNet-18's and the three-kernel batch norm with programmatic
#      dependent launch off and on (--pdl); ResNet-18's bf16 throughput on cuBLASLt/cuDNN
#      (--kernels vendor), and the op profile of a ResNet-18 step on the new paths. Each switch
#      is measured only where ctest passed its GPU test (a hang there would burn every later
#      timeout);
#   6. Chrome-trace timelines of ResNet-56 over 4 modules, locked bp and fdg (--trace, lr 0.02),
#      and fdg's with every op (--trace-ops);
#      the peak memory of fdg over 4 modules op by op and from graphs (planned, bump arenas);
#      four short ResNet-56 runs in a sweep one after another, then four at once;
#   7. a SASS check of the TMA kernels, and Nsight Compute sections (the TMA GEMM with source
#      counters; the halo forward with REMEASURE=1; then, with the bandwidth sections, each kernel
#      of one call of the three-kernel batch norm, forward and backward, and of the max-pool
#      backward) when ncu is there and time is left.
# With CTEST_LOG=FILE (an earlier call's ctest.log, carried in the tree) it skips the build
# (when build-gpu/ is still there), the accuracy run, ctest and the sanitizers, and runs the
# measurements of steps 5-7 for the switches that log says passed: the follow-up call on a warm
# machine, e.g. CTEST_LOG=.carry/ctest.log NO_TRAIN=1 DEADLINE=500 bash tools/gpu_session.sh
# (where the device budget has room for it: 15 minutes in all, the machine's start included,
# leave little after one call of DEADLINE=560).
# Everything lands in $OUT/results.tgz (the device tool brings back at most 8 files), with the
# accuracy run's checkpoint beside it, also when the script stops early (a trap packs them).
# Separate processes on one GPU time-slice it (no MPS): the accuracy run shares it only with the
# build, ctest and the sanitizers, never with a measurement; two training runs at once each get
# about half (four got a quarter each: bench/results/nvidia-h200/2026-11-26-mainloops.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
export OUT
mkdir -p "$OUT"
DEADLINE=${DEADLINE:-560}
SAN_CAP=${SAN_CAP:-30}
# Default: the next cell of #5's accuracy table (bench/results/nvidia-h100/accuracy-table and
# nvidia-h200/accuracy-table), ddg over FDG's two modules of ResNet-56, without a shrink factor
# (Huo et al.'s DDG has none), with the recipe of the cells there (bp at K = 1: 91.80%; fdg at
# K = 2: 91.85%; fdg at K = 3, beta 0.2: 91.77%, 149 epochs in 321 s on an H200 beside the tests
# and the sanitizers, the rest resumed in a second call, 2026-11-28b-summary.md; fdg at K = 4:
# 91.39%): 160 epochs of cosine decay after 2 warm-up epochs, Nesterov, weight decay 5e-4,
# Cutout 16, replayed from CUDA graphs. The warm-up matters: at lr
# 0.1 from step 0 an fdg run over four modules diverged by step 40 (2026-11-27-summary.md). A
# run that the limit stops comes back as its last finished epoch's checkpoint, and the next call
# resumes it (see 1. above): RESUME=FILE tools/gpu_prepare.sh, with the checkpoint kept
# (git-ignored) under gpu-state/.
TRAIN_ARGS=${TRAIN_ARGS:-"--model resnet56 --precision bf16 --epochs 160 --batch-size 128 --lr 0.1 \
--momentum 0.9 --nesterov --weight-decay 5e-4 --schedule cosine --warmup-epochs 2 --cutout 16 --graphs \
--method ddg --split 2 --split-at fdg"}
left() { echo $((DEADLINE - SECONDS)); }
log() { echo "[$(printf '%3d' $SECONDS) s] $*" | tee -a "$OUT/session.txt"; }
source tools/gpu_env.sh

TRAIN_PID=
TRAIN_ENDS=0  # the script's clock ($SECONDS) when the accuracy run's limit ends it
start_train() {
  local resume=() limit=$((DEADLINE - 230 - SECONDS))
  [ "$limit" -gt "${T_TRAIN:-330}" ] && limit=${T_TRAIN:-330}
  [ "$limit" -gt 30 ] || { log "no time left for the accuracy run"; return; }
  [ -f .carry/resume/train.safetensors ] && resume=(--resume .carry/resume/train.safetensors)
  log "accuracy run on $1 for at most $limit s: staleprop train $TRAIN_ARGS ${resume[*]}"
  (
    # The checkpoint comes back too: a run cut by the limit can be resumed in a later session
    # (--resume), and a finished one evaluated (staleprop eval). The limit's SIGTERM stops the run
    # as Ctrl-C would (a pipelined run at its last epoch boundary, plain backprop at its last
    # step, checkpointed there); -k ends it if it has not stopped 15 s later.
    timeout -k 15 "$limit" "$1" train --device cuda $TRAIN_ARGS "${resume[@]}" \
      --progress plain \
      --metrics "$OUT/train.jsonl" --checkpoint "$OUT/train.safetensors" > "$OUT/train.log" 2>&1
    echo "train exit $?" >> "$OUT/train.log"
  ) &
  TRAIN_PID=$!
  TRAIN_ENDS=$((SECONDS + limit))
}
# Packs $OUT into results.tgz, the checkpoint beside it (the device tool returns 8 files of at
# most 16 MiB), whether the script ends or is stopped.
pack() {
  trap - EXIT TERM INT
  if [ -n "$TRAIN_PID" ] && kill -0 "$TRAIN_PID" 2> /dev/null; then
    pkill -TERM -P "$TRAIN_PID" 2> /dev/null
    wait "$TRAIN_PID" 2> /dev/null
  fi
  # The headline figures on stdout too: the device tool returns the output's tail whatever
  # becomes of the files.
  [ -f "$OUT/headline.md" ] && { echo "== headline.md"; cat "$OUT/headline.md"; }
  rm -f "$OUT"/*.tmp.*
  local pack_dir
  pack_dir=$(mktemp -d)
  [ -f "$OUT/train.safetensors" ] && mv "$OUT/train.safetensors" "$pack_dir/"
  # The loose files go only once the archive is whole; whatever happens, the checkpoint goes
  # back into $OUT (a failed tar used to take it with the folder).
  if tar czf "$pack_dir/results.tgz" -C "$OUT" .; then
    rm -rf "${OUT:?}"/*
  else
    echo "gpu_session.sh: packing failed; the loose files stay in $OUT" >&2
    rm -f "$pack_dir/results.tgz"
  fi
  mv "$pack_dir"/* "$OUT/" 2> /dev/null
  rmdir "$pack_dir" 2> /dev/null
}
trap pack EXIT
trap 'pack; exit 143' TERM INT

if [ -f .carry/data/cifar10-jpeg.pack.gz ]; then
  python3 .carry/data/unpack_cifar10.py .carry/data/cifar10-jpeg.pack.gz data/cifar-10-batches-bin > /dev/null
  [ -x .carry/bin/staleprop ] && [ -z "${NO_TRAIN:-}" ] && start_train .carry/bin/staleprop
fi

if [ -n "${CTEST_LOG:-}" ]; then
  # A follow-up call on a warm machine: the measurements only, trusting an earlier call's ctest
  # log (carried in the tree) for which switches passed; build-gpu/ is kept between warm calls.
  cp "$CTEST_LOG" "$OUT/ctest.log" || exit 1
  log "measurements only, ctest results from $CTEST_LOG"
  if [ ! -x build-gpu/bench/bench_gpu_kernels ]; then
    log "build (build-gpu/ is gone: not a warm machine)"
    STAGES=build nice -n 10 tools/gpu_check.sh | tee -a "$OUT/session.txt" || exit 1
  fi
else
  log "build"
  if ! STAGES=build nice -n 10 tools/gpu_check.sh | tee -a "$OUT/session.txt"; then
    # The accuracy run needs no build (it runs on the carried binary): it finishes, and its
    # results are packed, before the script gives up.
    log "the build failed (build.log)"
    [ -n "$TRAIN_PID" ] && log "waiting for the accuracy run" && wait "$TRAIN_PID" && log "$(tail -1 "$OUT/train.log")"
    exit 1
  fi
  [ -z "$TRAIN_PID" ] && [ -z "${NO_TRAIN:-}" ] && [ -d data/cifar-10-batches-bin ] && start_train build-gpu/tools/staleprop
  log "ctest"
  STAGES=test tools/gpu_check.sh | tee -a "$OUT/session.txt"
fi
# A switch is measured only where its GPU test passed in ctest. A value-parameterised test's
# name may carry CMake's "  # GetParam() = ..." (newer CMake), which holds no dot.
passed() { grep -qE "$1( [^.]*)? \.+ +Passed" "$OUT/ctest.log" 2> /dev/null; }
# Whether a test ended in ctest (passed or failed, not timed out).
finished() { grep -qE "$1( [^.]*)? \.+ *(\*\*\*)?(Passed|Failed|Exception)" "$OUT/ctest.log" 2> /dev/null; }
CONV_TMA_OK=; passed 'ConvolutionsWithTmaLoads/wgmma_tma' && CONV_TMA_OK=1
TMA_WIDE_OK=; passed 'GemmOnTheWideTmaTile/wgmma_tma' && TMA_WIDE_OK=1
BN_PERSISTENT_OK=; passed 'PersistentBatchNormGivesTheSameBitsAsTheSeparateKernels' && BN_PERSISTENT_OK=1
PDL_OK=; passed 'ProgrammaticDependentLaunchChangesNoBit' && PDL_OK=1
CONV_WIDE_OK=; passed 'ConvolutionsWithTmaLoadsOnTheWideTile/wgmma_tma' && CONV_WIDE_OK=1
CLASSES_TMA_OK=; passed 'ConvolutionsByStrideClassWithTmaLoads/wgmma_tma' && CLASSES_TMA_OK=1
CLUSTER_OK=; passed 'GemmAndConvolutionsInClustersOfTwo/wgmma_tma' && CLUSTER_OK=1
SMALL_C_OK=; passed 'ConvolutionsWithFewChannelsRunDirect/wgmma_tma' && SMALL_C_OK=1
CLASS_DIRECT_OK=; passed 'ConvolutionsByStrideClass/wgmma_tma' && CLASS_DIRECT_OK=1
PERSISTENT_OK=; passed 'PersistentTmaKernelGivesTheSameBits/wgmma_tma' && PERSISTENT_OK=1
PREFETCH_OK=; passed 'TmaL2PrefetchChangesNoBit/wgmma_tma' && PREFETCH_OK=1
WEIGHT_COPIES_OK=; passed 'SgdGivesTheSameBitsFromUnalignedTensors' && passed 'Bf16WeightCopiesChangeNoBit' &&
  WEIGHT_COPIES_OK=1
# The data gradient added to dx (beta 1): every form in the first test, the stride classes in the second.
DGRAD_ACC_OK=; passed 'ConvolutionsOnResNetAndAwkwardShapes/wgmma_tma' && [ -n "$CLASS_DIRECT_OK" ] && DGRAD_ACC_OK=1
# The halo kernel of the stride-1 convolutions (never run before): where its test fails, the test
# once more with the A descriptors' base offset set to the start's row phase (conv_halo.h: which
# form the hardware wants is the open question); where that passes, the halo is measured so.
HALO_OK=; passed 'ConvolutionsByHaloPatches/wgmma_tma' && HALO_OK=1
HALO_RESIDENT_OK=; passed 'ConvolutionsByHaloPatchesResident/wgmma_tma' && HALO_RESIDENT_OK=1
# It takes at most 60 s, and mostly runs while the accuracy run holds the GPU anyway.
if [ -z "$HALO_OK" ] && finished 'ConvolutionsByHaloPatches/wgmma_tma' && [ "$(left)" -gt 150 ]; then
  STALEPROP_HALO_DESC_PHASE=1 timeout 60 build-gpu/tests/test_cuda_tensor_core \
    --gtest_filter='*ConvolutionsByHaloPatches*/wgmma_tma' > "$OUT/halo-desc-phase.log" 2>&1 &&
    HALO_OK=1 && HALO_RESIDENT_OK=1 && export STALEPROP_HALO_DESC_PHASE=1
  log "halo tests with the descriptors' base offset set: $(tail -1 "$OUT/halo-desc-phase.log")"
fi
[ -n "$HALO_OK" ] || HALO_RESIDENT_OK=
# The wide tile chosen by shape runs the kernels of both wide-tile tests; its own test checks the routing.
WIDE_SHAPE_OK=; [ -n "$TMA_WIDE_OK" ] && [ -n "$CONV_WIDE_OK" ] && passed 'WideTileByShape/wgmma_tma' && WIDE_SHAPE_OK=1
verdict() { [ -n "$1" ] && echo passed || echo "did not pass: not measured"; }
log "ctest: TMA convolutions $(verdict "$CONV_TMA_OK"); wide TMA tile $(verdict "$TMA_WIDE_OK");" \
  "persistent batch norm $(verdict "$BN_PERSISTENT_OK"); programmatic launch $(verdict "$PDL_OK");" \
  "stride-class data gradient with TMA loads $(verdict "$CLASSES_TMA_OK"); wide tile by shape $(verdict "$WIDE_SHAPE_OK");" \
  "clusters of two $(verdict "$CLUSTER_OK"); direct stem $(verdict "$SMALL_C_OK");" \
  "persistent TMA kernel $(verdict "$PERSISTENT_OK"); bf16 weight copies written by the step $(verdict "$WEIGHT_COPIES_OK");" \
  "residual gradients summed in the data gradient $(verdict "$DGRAD_ACC_OK"); halo convolutions $(verdict "$HALO_OK");" \
  "their resident form $(verdict "$HALO_RESIDENT_OK"); TMA L2 prefetch $(verdict "$PREFETCH_OK")"

[ -z "${CTEST_LOG:-}" ] && log "compute-sanitizer"
san() {  # tool test filter [log-name tag]; CAP=seconds overrides SAN_CAP for one call, RESERVE=seconds
  # the time kept for what follows (default 200: the measurements)
  local cap=${CAP:-$SAN_CAP} reserve=${RESERVE:-200}
  [ "$(left)" -gt $((cap + reserve)) ] || { log "no time for compute-sanitizer $1 '$3'"; return; }
  local log="$OUT/sanitizer-$1-$2${4:+-$4}.log"
  timeout -k 10 "$cap" compute-sanitizer --tool "$1" --error-exitcode 1 "build-gpu/tests/$2" --gtest_filter="$3" \
    > "$log" 2>&1
  local rc=$?
  log "compute-sanitizer $1 $2 '$3' exit $rc ($(grep -c '\[       OK \]' "$log") tests passed" \
    "before the end or the ${cap} s cap; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log"))"
}
# Every wgmma and wgmma_tma test ran under memcheck on an H100, and racecheck finished the GEMM
# tests, the TMA convolutions (also wide), the stride classes' TMA data gradient, the clusters'
# first form, and all of test_cuda_ops, with no error or hazard; memcheck the stride classes
# written straight into dx and the clusters' present form (bench/results/nvidia-h100/2026-11-26-
# and 2026-11-27(b,c)-sanitizers.log). On an H200 (2026-11-28-sanitizers.log) memcheck passed the
# present epilogue (the stride classes' grouped rows, the split-K test of every main loop), the
# persistent TMA kernel and both halo forms, and racecheck's convolution sweep the first six tests
# (up to the wide TMA tile); racecheck did not finish the persistent kernel's test in 30 s, so it
# gets PERSISTENT_RACECHECK_CAP seconds (default 90: it runs beside the accuracy run). On b440d7f
# (2026-11-28b-sanitizers.log) all of these were clean again, racecheck the persistent kernel's
# test too, and their kernels have not changed since: they run again only with REMEASURE=1 (or,
# for the halo, where its test passed only with the descriptors' base offset set).
# Only tests that ended in ctest (passed or failed, not timed out): one that hung there would
# hang here too, for SAN_CAP seconds each time. memcheck first; racecheck is slow (16 tests in
# 55 s on 2026-11-26). The calls stop where less than SAN_CAP + 200 s is left.
if [ -z "${CTEST_LOG:-}" ] && [ -n "${REMEASURE:-}" ]; then
  finished 'ConvolutionsByStrideClass/wgmma_tma' &&
    san memcheck test_cuda_tensor_core '*ConvolutionsByStrideClass/wgmma_tma' class-direct
  finished 'GemmSplitKOnLongReductions/wgmma_tma' &&
    san memcheck test_cuda_tensor_core '*GemmSplitKOnLongReductions/*' epilogue-pairs
  finished 'PersistentTmaKernelGivesTheSameBits/wgmma_tma' &&
    san memcheck test_cuda_tensor_core '*PersistentTmaKernelGivesTheSameBits/wgmma_tma' persistent
  finished 'PersistentTmaKernelGivesTheSameBits/wgmma_tma' && CAP=${PERSISTENT_RACECHECK_CAP:-90} \
    san racecheck test_cuda_tensor_core '*PersistentTmaKernelGivesTheSameBits/wgmma_tma' persistent
fi
if [ -z "${CTEST_LOG:-}" ] && { [ -n "${REMEASURE:-}" ] || [ "${STALEPROP_HALO_DESC_PHASE:-}" = 1 ]; }; then
  [ -n "$HALO_OK" ] && san memcheck test_cuda_tensor_core '*ConvolutionsByHaloPatches/wgmma_tma' halo
  [ -n "$HALO_RESIDENT_OK" ] &&
    san memcheck test_cuda_tensor_core '*ConvolutionsByHaloPatchesResident/wgmma_tma' halo-resident
fi

# racecheck's sweeps: test_cuda_ops finished clean on 2026-11-27b, and every convolution test of
# the wgmma_tma main loop on 2026-11-28 and -28b. Left are the GEMM tests on the present
# epilogue (clean on an H100 before it) and the wide tile by shape, and the network tests after
# the two that finished clean (the fp32 step on 2026-11-28, the bf16 step on -28b): the
# pipeline's graphs and the rest. Each runs once, for at most SWEEP_CAP s (default 100): here while the
# accuracy run holds the GPU for 30 s or more yet (the measurements wait for it anyway), else
# after the measurements, keeping 20 s to pack (on 2026-11-27 a sweep's 100 s came out of the
# measurements' time).
SWEPT=
SWEEP_CONV='*Gemm*/wgmma_tma:*WideTileByShape/wgmma_tma:-*GemmAndConvolutionsInClustersOfTwo/*'
SWEEP_NET='-*Fp32StepMatchesTheCpuReference:*Bf16StepTracksTheFp32Step'
racecheck_sweeps() {  # CAP_FUNCTION: prints the seconds a sweep may take now
  local pair cap
  for pair in "test_cuda_tensor_core $SWEEP_CONV" "test_cuda_network $SWEEP_NET"; do
    case " $SWEPT " in *" ${pair%% *} "*) continue ;; esac
    cap=$($1)
    [ "$cap" -ge 30 ] || continue
    CAP=$cap RESERVE=20 san racecheck ${pair%% *} "${pair#* }" sweep
    SWEPT="$SWEPT ${pair%% *}"
  done
}
at_most_sweep_cap() { [ "$1" -gt "${SWEEP_CAP:-100}" ] && echo "${SWEEP_CAP:-100}" || echo "$1"; }
sweep_cap() { at_most_sweep_cap $(($(left) - 25)); }
# While the accuracy run is on: up to 5 s before its limit.
train_window_cap() {
  local c=0
  [ -n "$TRAIN_PID" ] && kill -0 "$TRAIN_PID" 2> /dev/null && c=$((TRAIN_ENDS - SECONDS - 5))
  at_most_sweep_cap "$c"
}
[ -z "${CTEST_LOG:-}" ] && racecheck_sweeps train_window_cap

if [ -n "$TRAIN_PID" ]; then
  log "waiting for the accuracy run"
  wait "$TRAIN_PID"
  log "$(tail -1 "$OUT/train.log")"
  # Its checkpoint in PyTorch (strict load into bench/pytorch_baseline.py's model) beside
  # staleprop's own evaluation of it, both in fp32: the two test accuracies should agree.
  if [ -f "$OUT/train.safetensors" ] && [ -d data/cifar-10-batches-bin ] && [ "$(left)" -gt 200 ]; then
    timeout 60 build-gpu/tools/staleprop eval --device cuda --precision fp32 --checkpoint "$OUT/train.safetensors" \
      > "$OUT/checkpoint-eval.txt" 2>&1
    timeout 60 python3 bench/pytorch_load_checkpoint.py --checkpoint "$OUT/train.safetensors" \
      >> "$OUT/checkpoint-eval.txt" 2>&1
    log "checkpoint in staleprop and in PyTorch: $(tr '\n' ' ' < "$OUT/checkpoint-eval.txt" | cut -c1-400)"
  fi
fi

# Every switch is set either way, so that one exported by the caller cannot turn "off" on.
# The wide tile is switched on by shape (the rule of kernels/cuda/tile_plan.h), not everywhere:
# everywhere, it lost up to 37% on some layers (2026-11-27).
NEW_PATHS=() OLD_PATHS=(STALEPROP_CONV_TMA=0 STALEPROP_TMA_WIDE=0 STALEPROP_TMA_WIDE_BY_SHAPE=0
  STALEPROP_TMA_CLUSTER=0 STALEPROP_CONV_SMALL_C=0 STALEPROP_BN_PERSISTENT=0 STALEPROP_PDL=0
  STALEPROP_DGRAD_CLASSES=0 STALEPROP_DGRAD_CLASS_DIRECT=0 STALEPROP_TMA_PERSISTENT=0
  STALEPROP_BF16_WEIGHT_COPIES=0 STALEPROP_DGRAD_ACCUMULATE=0 STALEPROP_CONV_HALO=0 STALEPROP_HALO_RESIDENT=0
  STALEPROP_TMA_L2_PREFETCH=0)
[ -n "$CONV_TMA_OK" ] && NEW_PATHS+=(STALEPROP_CONV_TMA=1)
[ -n "$CONV_TMA_OK" ] && [ -n "$CLASSES_TMA_OK" ] && NEW_PATHS+=(STALEPROP_DGRAD_CLASSES=1)
[ -n "$CONV_TMA_OK" ] && [ -n "$CLASSES_TMA_OK" ] && [ -n "$CLASS_DIRECT_OK" ] &&
  NEW_PATHS+=(STALEPROP_DGRAD_CLASS_DIRECT=1)
[ -n "$CONV_TMA_OK" ] && [ -n "$WIDE_SHAPE_OK" ] && NEW_PATHS+=(STALEPROP_TMA_WIDE_BY_SHAPE=1)
[ -n "$CLUSTER_OK" ] && NEW_PATHS+=(STALEPROP_TMA_CLUSTER=1)
[ -n "$SMALL_C_OK" ] && NEW_PATHS+=(STALEPROP_CONV_SMALL_C=1)
[ -n "$BN_PERSISTENT_OK" ] && NEW_PATHS+=(STALEPROP_BN_PERSISTENT=1)
[ -n "$PDL_OK" ] && NEW_PATHS+=(STALEPROP_PDL=1)
[ -n "$PERSISTENT_OK" ] && NEW_PATHS+=(STALEPROP_TMA_PERSISTENT=1)
[ -n "$WEIGHT_COPIES_OK" ] && NEW_PATHS+=(STALEPROP_BF16_WEIGHT_COPIES=1)
[ -n "$DGRAD_ACC_OK" ] && NEW_PATHS+=(STALEPROP_DGRAD_ACCUMULATE=1)
[ -n "$HALO_OK" ] && NEW_PATHS+=(STALEPROP_CONV_HALO=1)
[ -n "$HALO_RESIDENT_OK" ] && NEW_PATHS+=(STALEPROP_HALO_RESIDENT=1)
[ -n "$PREFETCH_OK" ] && NEW_PATHS+=(STALEPROP_TMA_L2_PREFETCH=1)
# "defaults" runs with no switch set (the caller's unset too): what a user gets; "candidate" the
# defaults with the halo convolutions in mode 1, which gained alone on 2026-11-28 (H200, ResNet-18
# at batch 512: 47.9k -> 48.8k img/s); on top of the persistent TMA kernel, a default since
# 2026-11-28b, they ran 49.4k (the defaults then 47.6k), the persistent kernel alone 49.6k in
# another call: whether the halo becomes a default too. Two rounds of each model,
# each beside PyTorch, whose rate moved by up to 33% between rounds of one call (2026-11-28: its
# ResNet-56 bf16 channels_last 4449 then 5904 img/s); ResNet-56 from graphs (its headline rate),
# and in fp32 as by default too (#4's target is fp32's ratio: >= 1.5x PyTorch's best).
# These rounds come first of the measurements: #4's ratios to PyTorch in one call are what the
# session must bring back (on 2026-11-28 the budget ran out before them).
DEFAULTS=()
for v in $(compgen -e | grep '^STALEPROP_'); do DEFAULTS+=(-u "$v"); done
CANDIDATE=()
[ -n "$HALO_OK" ] && CANDIDATE+=(STALEPROP_CONV_HALO=1)
# The halo measured as its test passed: with the descriptors' base offset where only that passed.
[ -n "$HALO_OK" ] && [ "${STALEPROP_HALO_DESC_PHASE:-}" = 1 ] && CANDIDATE+=(STALEPROP_HALO_DESC_PHASE=1)
# The defaults, ResNet-56's fp32 and PyTorch run whether or not any new path passed (#4's ratios
# need none); off, candidate and on only where one did.
if true; then
  for cfg in "resnet18 512" "resnet56 128 --graphs"; do
    set -- $cfg
    for round in 1 2; do
      for paths in off defaults candidate on; do
        [ "$(left)" -gt 60 ] || break
        [ $paths = defaults ] || ((${#NEW_PATHS[@]})) || continue
        envs=("${OLD_PATHS[@]}")
        [ $paths = on ] && envs+=("${NEW_PATHS[@]}")
        [ $paths = defaults ] && envs=("${DEFAULTS[@]}")
        if [ $paths = candidate ]; then
          ((${#CANDIDATE[@]})) || continue
          envs=("${DEFAULTS[@]}" "${CANDIDATE[@]}")
        fi
        env "${envs[@]}" timeout 40 build-gpu/tools/staleprop bench --device cuda --model "$1" --batch-size "$2" \
          --precision bf16 ${3:-} --steps 50 --warmup 10 --json "$OUT/throughput-new-paths-$paths.jsonl" 2>&1 |
          tee -a "$OUT/session.txt"
        log "bench $1 $2 bf16 ${3:-} round $round with the new paths $paths (${envs[*]}: the last setting of" \
          "each counts) exit ${PIPESTATUS[0]}"
      done
      if [ "$1" = resnet56 ] && [ "$(left)" -gt 60 ]; then
        env "${DEFAULTS[@]}" timeout 40 build-gpu/tools/staleprop bench --device cuda --model "$1" --batch-size "$2" \
          --precision fp32 $3 --steps 50 --warmup 10 --json "$OUT/throughput-new-paths-defaults.jsonl" 2>&1 |
          tee -a "$OUT/session.txt"
        log "bench $1 $2 fp32 $3 round $round as by default exit ${PIPESTATUS[0]}"
      fi
      [ "$(left)" -gt 75 ] && timeout 60 python3 bench/pytorch_baseline.py --model "$1" --batch-size "$2" \
        --steps 50 --warmup 10 --bf16 --channels-last >> "$OUT/pytorch.jsonl" 2>> "$OUT/pytorch.err" &&
        tail -1 "$OUT/pytorch.jsonl"
      # ResNet-56: PyTorch eager is fastest in NCHW (channels_last bf16 ran slower than fp32 NCHW on
      # 2026-11-26), so bf16 and fp32 in NCHW too; a ratio is to PyTorch's best.
      if [ "$1" = resnet56 ]; then
        for flags in "--bf16" ""; do
          [ "$(left)" -gt 75 ] && timeout 60 python3 bench/pytorch_baseline.py --model "$1" --batch-size "$2" \
            --steps 50 --warmup 10 $flags >> "$OUT/pytorch.jsonl" 2>> "$OUT/pytorch.err" &&
            tail -1 "$OUT/pytorch.jsonl"
        done
      fi
    done
  done
  # Each run beside PyTorch's best in the same precision and in any setting (tools/bench_table.py;
  # of each side's repeats the fastest), where both were measured (the budget may have skipped them).
  if compgen -G "$OUT/throughput-new-paths-*.jsonl" > /dev/null && [ -s "$OUT/pytorch.jsonl" ]; then
    { echo "== training throughput beside PyTorch eager"
      python3 tools/bench_table.py pytorch "$OUT"/throughput-new-paths-*.jsonl "$OUT/pytorch.jsonl"; } \
      >> "$OUT/vs-pytorch.md" 2>&1
    cat "$OUT/vs-pytorch.md" >> "$OUT/session.txt"
  else
    log "no throughput beside PyTorch to tabulate"
  fi
fi

# A switch of bench_gpu_kernels off and on, the benchmarks matching a filter, each run against
# its vendor twin in that run: ab NAME FLAG SECONDS FILTER (JSON in $OUT/NAME-0.json, -1.json;
# AB_VALUES="0" runs only the first).
ab() {
  for v in ${AB_VALUES:-0 1}; do
    [ "$(left)" -gt 60 ] || break
    timeout "$3" build-gpu/bench/bench_gpu_kernels "--$2=$v" --benchmark_min_time=0.002 --benchmark_filter="$4" \
      --benchmark_report_aggregates_only=true --benchmark_out="$OUT/$1-$v.json" --benchmark_out_format=json \
      >> "$OUT/ab.txt" 2>&1
    log "bench_gpu_kernels $1 --$2=$v exit $?"
  done
}
# bf16 training throughput (staleprop bench, random device-resident batches) with the environment
# switch VAR off and then on: throughput_ab NAME VAR MODEL BATCH [more bench flags] (JSON lines
# in $OUT/throughput-NAME0.jsonl and -NAME1.jsonl).
throughput_ab() {
  local name=$1 var=$2 model=$3 batch=$4
  shift 4
  for v in 0 1; do
    [ "$(left)" -gt 60 ] || break
    env "$var=$v" timeout 40 build-gpu/tools/staleprop bench --device cuda --model "$model" --batch-size "$batch" \
      --precision bf16 --steps 50 --warmup 10 "$@" --json "$OUT/throughput-$name$v.jsonl" 2>&1 | tee -a "$OUT/session.txt"
    log "bench $model $* $var=$v exit ${PIPESTATUS[0]}"
  done
}
# Then one figure for each path, each against its vendor twin. The sums over ResNet-18's bf16
# convolutions as by default against cuDNN (#3: >= 0.60), and the bf16 GEMM on both TMA tiles
# against cuBLASLt (#3: >= 0.70), with the persistent TMA kernel off and on (the GEMM on both
# tiles, the convolutions' sums). The stride classes (also straight into dx), the clusters and the
# direct stem were each measured off and on in 2026-11-27b and -27c; the halo convolutions (modes
# 0-2 and in training), their resident form, the stride classes' profile, max pooling and the
# fused BN against the copy, the split's caps, the convolutions layer by layer, the persistent
# kernel in training and ResNet-18 at batch 128 from graphs on 2026-11-28 (H200): those run again
# only with REMEASURE=1.
REMEASURE=${REMEASURE:-}
[ -n "$CONV_TMA_OK" ] && AB_VALUES=1 ab r18-convs-tma-sums conv-tma 40 '_bf16/r18_all_layers'
# The same sums with the halo convolutions in mode 1 (the candidate) on the persistent TMA kernel, a
# default since 2026-11-28b: the halo was measured only without it (0.57 of cuDNN, the persistent
# kernel alone 0.58; #3 asks 0.60).
[ -n "$CONV_TMA_OK" ] && [ -n "$HALO_OK" ] && AB_VALUES=1 ab r18-convs-halo-sums conv-halo 40 '_bf16/r18_all_layers'
# The halo kernel off, in mode 1 (the 32 px layers) and in mode 2 (also 16 px): ResNet-18's
# 64- and 128-channel stride-1 layers and the sums, against cuDNN; then the training step.
if [ -n "$HALO_OK" ] && [ -n "$REMEASURE" ]; then
  AB_VALUES="0 1 2" ab r18-convs-halo conv-halo 40 '_bf16/r18_(64to64_3x3|128to128_3x3|all_layers)'
  { echo "== r18-convs-halo: off, mode 1"; python3 tools/bench_table.py kernels "$OUT/r18-convs-halo-0.json" \
      "$OUT/r18-convs-halo-1.json"; } >> "$OUT/headline.md" 2>&1
  throughput_ab halo STALEPROP_CONV_HALO resnet18 512
fi
# Its resident form off and on (the halo in mode 1): the 64-channel 32 px layers and the sums,
# then the training step.
if [ -n "$HALO_RESIDENT_OK" ] && [ -n "$REMEASURE" ]; then
  STALEPROP_CONV_HALO=1 ab r18-convs-halo-resident halo-resident 40 '_bf16/r18_(64to64_3x3|all_layers)'
  STALEPROP_CONV_HALO=1 throughput_ab halo-resident STALEPROP_HALO_RESIDENT resnet18 512
fi
if [ -n "$PERSISTENT_OK" ]; then
  ab gemm-bf16-persistent tma-persistent 30 '^gemm_bf16/square'
  [ -n "$TMA_WIDE_OK" ] && STALEPROP_TMA_WIDE=1 ab gemm-bf16-wide-persistent tma-persistent 30 '^gemm_bf16/square'
  [ -n "$CONV_TMA_OK" ] && ab r18-convs-persistent tma-persistent 40 '_bf16/r18_all_layers'
elif [ -n "$TMA_WIDE_OK" ]; then
  ab gemm-bf16-wide tma-wide 30 '^gemm_bf16/square'
fi
# The TMA kernel's producer asking L2 for each stage one round of the ring ahead (off by default;
# written on 2026-11-28c without a GPU): the GEMM and the convolutions' sums off and on, and
# ResNet-18's training step, where its test passed.
if [ -n "$PREFETCH_OK" ]; then
  ab gemm-bf16-l2-prefetch tma-l2-prefetch 30 '^gemm_bf16/square'
  [ -n "$CONV_TMA_OK" ] && ab r18-convs-l2-prefetch tma-l2-prefetch 40 '_bf16/r18_all_layers'
  throughput_ab tma-l2-prefetch STALEPROP_TMA_L2_PREFETCH resnet18 512
fi
# Nsight Compute, where it is there. ncu_run NAME KERNEL-REGEX SKIP COUNT FILTER [bench flags]:
# Nsight Compute on COUNT launches of our kernels matching KERNEL-REGEX (after SKIP), in
# bench_gpu_kernels' benchmarks matching FILTER, for at most NCU_CAP seconds (default: the time
# left less 10 s).
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
SECTIONS=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
  --section Occupancy --section WarpStateStats --section LaunchStats --section InstructionStats
  --section SchedulerStats --section SourceCounters)
# SourceCounters samples the warps' program counters, which puts the stall cycles on instructions:
# the 2026-11-28b profile's warp states could not tell its mbarrier waits from its tile's start
# and end without them.
# Each section's body too (the warp stall reasons of WarpStateStats): the headers alone could not say
# what the bf16 GEMM's warps wait on (2026-11-28). Only where this ncu has the option.
# (The help is read whole first: grep -q leaving early would end ncu by SIGPIPE, which pipefail
# takes for a failure.)
# The bandwidth-bound kernels' profiles (NCU_BANDWIDTH=1): where the bytes go and what the warps
# wait on, without the tensor-core kernels' instruction-level sections.
BANDWIDTH_SECTIONS=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy
  --section LaunchStats --section WarpStateStats --section SchedulerStats)
NCU_HELP=$([ -n "$NCU" ] && "$NCU" --help 2> /dev/null)
[[ $NCU_HELP == *--print-details* ]] && SECTIONS+=(--print-details all) && BANDWIDTH_SECTIONS+=(--print-details all)
ncu_run() {
  local name=$1 kernels=$2 skip=$3 count=$4 filter=$5 cap sections=("${SECTIONS[@]}")
  shift 5
  [ -n "${NCU_BANDWIDTH:-}" ] && sections=("${BANDWIDTH_SECTIONS[@]}")
  [ "$(left)" -gt 15 ] || return
  cap=$(( $(left) - 10 ))
  [ -n "${NCU_CAP:-}" ] && [ "$NCU_CAP" -lt "$cap" ] && cap=$NCU_CAP
  log "ncu $name ($filter; $count launches of $kernels; at most $cap s)"
  timeout "$cap" "$NCU" --kernel-name regex:"$kernels" --launch-skip "$skip" --launch-count "$count" \
    "${sections[@]}" build-gpu/bench/bench_gpu_kernels --conv-tma=1 "$@" \
    --benchmark_filter="$filter" --benchmark_min_time=0.001 > "$OUT/ncu-$name.txt" 2>&1
  log "ncu exit $?"
}
# The strided data gradient by stride class, every kernel of one call (the filter's transpose
# and the class's GEMM, for each of the four classes): on the H100 it ran at 0.24-0.33 of cuDNN
# (2026-11-27b and -27c), 3x-4x what its FLOPs and bytes on the TMA kernel suggest, and no
# profile says where the time goes. Profiled early (at most 90 s), since the session's later
# stages rarely get to run.
if [ -n "$NCU" ] && [ -n "$CONV_TMA_OK" ] && [ -n "$REMEASURE" ]; then
  NCU_CAP=90 ncu_run conv_bwd_data-classes 'wgmma_tma_gemm_kernel|transpose_filter_kernel|class_copy_kernel' 8 8 \
    '^conv_bwd_data_bf16/r18_64to128_3x3_s2_32px/n512'
fi
# The headline figures at once, in the session log (tools/bench_table.py): the GEMM and the
# convolutions' sums as by default and persistent, each against cuBLASLt/cuDNN in its run (the
# bf16 GEMM at 4096^3 ran 0.64 of cuBLASLt on 2026-11-27b and 0.42 on -27c, a regression that
# only a comparison with the last session's figures showed).
for pair in gemm-bf16-persistent gemm-bf16-wide-persistent r18-convs-persistent gemm-bf16-wide gemm-bf16-l2-prefetch \
  r18-convs-l2-prefetch; do
  [ -f "$OUT/$pair-0.json" ] && [ -f "$OUT/$pair-1.json" ] || continue
  { echo "== $pair: off, on"; python3 tools/bench_table.py kernels "$OUT/$pair-0.json" "$OUT/$pair-1.json"; } \
    >> "$OUT/headline.md" 2>&1
done
if [ -f "$OUT/r18-convs-tma-sums-1.json" ] && [ -f "$OUT/r18-convs-halo-sums-1.json" ]; then
  { echo "== r18-convs: as by default, with the halo in mode 1"
    python3 tools/bench_table.py kernels "$OUT/r18-convs-tma-sums-1.json" "$OUT/r18-convs-halo-sums-1.json"; } \
    >> "$OUT/headline.md" 2>&1
fi
[ -f "$OUT/headline.md" ] && cat "$OUT/headline.md" >> "$OUT/session.txt"
# Max pooling and the fused BN+add+ReLU against the copy (2026-11-28: 0.69-0.73 / 0.36-0.39 for
# max pooling, 0.28-0.65 for the fused BN): since then (2026-11-28c, never timed) the max-pool
# argmax loads a window's taps together and its gather its windows' taps and gradients together,
# the BN finalisation 8 chunks a lane at a time, its statistics pass prefetches its rows, and its
# forward element pass loads four items a thread and the channel's parameters once.
if [ "$(left)" -gt 90 ]; then
  timeout 30 build-gpu/bench/bench_gpu_kernels --benchmark_min_time=0.002 \
    --benchmark_filter='^maxpool_(fwd|bwd)/|^bn_add_relu_bwd|^bn_add_relu_fwd_train.*n512' \
    --benchmark_report_aggregates_only=true --benchmark_out="$OUT/maxpool.json" --benchmark_out_format=json \
    >> "$OUT/ab.txt" 2>&1
  log "bench_gpu_kernels maxpool exit $?"
fi
# The convolutions' sums with the split of K by the earlier target rule (STALEPROP_SPLIT_MAX_BLOCKS=0,
# at least 256 blocks, whose 270-288-block weight gradients start a third wave) and capped at two
# full waves of 132 SMs, against the default cap of one wave (kernels/cuda/tile_plan.h;
# r18-convs-tma-sums-1 above is the default).
if [ -n "$CONV_TMA_OK" ] && [ -n "$REMEASURE" ]; then
  for blocks in 0 264; do
    STALEPROP_SPLIT_MAX_BLOCKS=$blocks AB_VALUES=1 ab r18-split-max-$blocks conv-tma 30 '_bf16/r18_all_layers'
  done
fi
# With COMPARE_BIN (tools/gpu_prepare.sh), ResNet-56's op-by-op fdg run over FDG's four cuts on
# this commit's binary and on the other's, on this machine: on 2026-11-27 the fdg run was
# host-bound at 17.5k img/s where an H100 the day before ran it at 27.1k (1265bd6), and only
# running both on one machine tells the code from the machine. Like for like: every switch off,
# the data gradient on the gathered filter and the wgmma main loop (1265bd6's defaults for
# ResNet-56), its 60 steps after 15; the two binaries interleaved, twice. Then this binary with
# the transposed filter (a default since 1265bd6: two more scratch allocations and a transpose per
# data gradient), with the scratch pool as now (no waits inserted between streams) and as at
# a7657e6 (STALEPROP_POOL_INTERNAL_DEPS=1: the driver's default); and single-module backprop on
# each binary.
if [ -x .carry/bin/compare ]; then
  SAME=("${OLD_PATHS[@]}" STALEPROP_DGRAD_WT=0 STALEPROP_MAINLOOP=wgmma)
  compare_run() {  # tag binary method [env...]
    local tag=$1 bin=$2 method=$3
    shift 3
    [ "$(left)" -gt 60 ] || return
    local pipeline=()
    [ "$method" = fdg ] && pipeline=(--method fdg --split 4 --split-at fdg)
    env "$@" timeout 40 "$bin" bench --device cuda --model resnet56 --batch-size 128 --precision bf16 \
      "${pipeline[@]}" --steps 60 --warmup 15 --json "$OUT/compare-$tag.jsonl" 2>&1 | tee -a "$OUT/session.txt"
    log "bench resnet56 bf16 $method op by op on $bin ($tag: $*) exit ${PIPESTATUS[0]}"
  }
  for round in 1 2; do
    compare_run this build-gpu/tools/staleprop fdg "${SAME[@]}"
    compare_run compare .carry/bin/compare fdg "${SAME[@]}"
  done
  compare_run this-wt build-gpu/tools/staleprop fdg "${SAME[@]}" STALEPROP_DGRAD_WT=1
  compare_run this-wt-pool-deps build-gpu/tools/staleprop fdg "${SAME[@]}" STALEPROP_DGRAD_WT=1 \
    STALEPROP_POOL_INTERNAL_DEPS=1
  compare_run this build-gpu/tools/staleprop bp "${SAME[@]}"
  compare_run compare .carry/bin/compare bp "${SAME[@]}"
fi

# The pooling and shortcut kernels against the copy (measured on 2026-11-27b: 0.57-1.19, the
# max-pool backward 0.46-0.52): again only with POOL=1, at most 60 s.
if [ -n "${POOL:-}" ] && [ "$(left)" -gt 100 ]; then
  log "gpu_bench stage 1: pooling and the shortcut against the copy"
  STAGES=1 BENCH_FAMILIES="pool" MIN_TIME=0.002 timeout 60 tools/gpu_bench.sh | tee -a "$OUT/session.txt"
fi

# Then each path on its own. The TMA convolutions layer by layer: the sums alone (2026-11-26)
# could not say which layers hold the data gradient at 0.25 of cuDNN while the forward reaches
# 0.45. The TMA convolutions on the 128 x 256 tile against the 128 x 128 one (the wide layers).
# Layer by layer as by default (the TMA loads, the stride classes, the wide tile by shape and the
# direct stem; each was measured off and on on 2026-11-27b), or on the cp.async loads where the
# TMA convolutions did not pass.
if [ -n "$CONV_TMA_OK" ] && [ -n "$REMEASURE" ]; then
  AB_VALUES=1 ab r18-convs-tma conv-tma 40 '_bf16/r18_[0-9].*/n512'
elif [ -z "$CONV_TMA_OK" ] && [ "$(left)" -gt 120 ]; then
  AB_VALUES=0 ab r18-convs-tma conv-tma 40 '_bf16/r18_[0-9].*/n512'  # layer by layer, cp.async loads only
fi
# The persistent TMA kernel in training: ResNet-18 (batch 512), and ResNet-56 from graphs, whose
# 16-64-channel convolutions are the shortest reductions. (The stride classes, the clusters, the
# direct stem, the persistent batch norm and the TMA loads were each measured in training on
# 2026-11-27b or -27c.)
if [ -n "$PERSISTENT_OK" ] && [ -n "$REMEASURE" ]; then
  throughput_ab tma-persistent STALEPROP_TMA_PERSISTENT resnet18 512
  throughput_ab tma-persistent-r56 STALEPROP_TMA_PERSISTENT resnet56 128 --graphs
fi
# The persistent TMA kernel (a default since 2026-11-28b, measured in backprop only) in the
# pipeline: ResNet-56 fdg over FDG's four modules from graphs, whose modules' kernels share the SMs
# (a persistent grid holds every SM until its last tile).
[ -n "$PERSISTENT_OK" ] &&
  throughput_ab fdg4-persistent STALEPROP_TMA_PERSISTENT resnet56 128 --graphs --method fdg --split 4 --split-at fdg
# ResNet-18 at batch 128 from graphs, as bench/runs/long-runs.txt's 200-epoch run towards 95%
# trains it: whether that run (10M images; its 90 MB checkpoint cannot come back, so it must end
# within one lease) fits a session.
if [ "$(left)" -gt 60 ] && [ -n "$REMEASURE" ]; then
  timeout 40 build-gpu/tools/staleprop bench --device cuda --model resnet18 --batch-size 128 --precision bf16 --graphs \
    --steps 50 --warmup 10 --json "$OUT/throughput-r18-b128-graphs.jsonl" 2>&1 | tee -a "$OUT/session.txt"
  log "bench resnet18 128 bf16 --graphs exit ${PIPESTATUS[0]}"
fi
# The bf16 weight copies written by the optimizer's step (a default) against a cast before every
# use: 41 launches fewer per ResNet-18 step, 111 per ResNet-56 step (op by op, where launches cost
# most, and from graphs); 1.02x, 1.05x and 1.03x on 2026-11-28b (H200): only with REMEASURE=1.
if [ -n "$WEIGHT_COPIES_OK" ] && [ -n "$REMEASURE" ]; then
  throughput_ab weight-copies STALEPROP_BF16_WEIGHT_COPIES resnet18 512
  throughput_ab weight-copies-r56 STALEPROP_BF16_WEIGHT_COPIES resnet56 128
  throughput_ab weight-copies-r56-graphs STALEPROP_BF16_WEIGHT_COPIES resnet56 128 --graphs
fi
# A residual block's gradients summed in the convolution's data gradient (a default) against the
# separate add: 8 adds per ResNet-18 step, 27 per ResNet-56 step; 1.02x and 1.01x on 2026-11-28b
# (H200): only with REMEASURE=1.
if [ -n "$DGRAD_ACC_OK" ] && [ -n "$REMEASURE" ]; then
  throughput_ab dgrad-accumulate STALEPROP_DGRAD_ACCUMULATE resnet18 512
  throughput_ab dgrad-accumulate-r56 STALEPROP_DGRAD_ACCUMULATE resnet56 128 --graphs
fi
# Programmatic dependent launch against plain launches: the launch-bound small model (ResNet-56
# at batch 128 in bf16) from graphs (op by op it is in the first pass above), and the
# three-kernel batch norm.
if [ -n "$PDL_OK" ]; then
  throughput_ab pdl STALEPROP_PDL resnet56 128 --graphs
  throughput_ab pdl-r18 STALEPROP_PDL resnet18 512
  ab bn-pdl pdl 30 '^bn_(fwd_train|bwd)/.*n128'
fi
# The same training on cuBLASLt/cuDNN (--kernels vendor): what the rest of the engine reaches
# against PyTorch when the convolutions are cuDNN's too; and the op profile of a ResNet-18 step on
# the new paths.
if [ "$(left)" -gt 120 ]; then
  timeout 40 build-gpu/tools/staleprop bench --device cuda --model resnet18 --batch-size 512 --precision bf16 \
    --kernels vendor --steps 50 --warmup 10 --json "$OUT/throughput-vendor.jsonl" 2>&1 | tee -a "$OUT/session.txt"
  log "bench resnet18 --kernels vendor exit ${PIPESTATUS[0]}"
fi
if [ "$(left)" -gt 60 ]; then
  log "op profile: resnet18 batch 512 bf16 with ${NEW_PATHS[*]:-no new path}"
  env "${OLD_PATHS[@]}" "${NEW_PATHS[@]}" timeout 40 build-gpu/tools/staleprop bench --device cuda --model resnet18 --batch-size 512 \
    --precision bf16 --steps 10 --warmup 5 --profile-ops 5 --json "$OUT/op-profile.jsonl" >> "$OUT/op-profile.txt" 2>&1
  log "op profile exit $?"
fi

# Timelines of the locking study (#5): ResNet-56, bf16, 4 modules, locked bp against fdg, 40
# steps of real data each (Chrome-trace/Perfetto JSON of the module stages, device-timed).
if [ -d data/cifar-10-batches-bin ]; then
  for method in bp fdg; do
    [ "$(left)" -gt 60 ] || break
    log "trace: resnet56 $method K=4"
    # lr 0.02: at the default 0.1, from step 0 without warm-up, fdg over four modules diverged
    # before its 40th step on the H100 (2026-11-27).
    timeout -k 10 40 build-gpu/tools/staleprop train --device cuda --model resnet56 --precision bf16 --method $method \
      --split 4 --split-at fdg --epochs 1 --lr 0.02 --train-limit 5120 --test-limit 1000 --progress none \
      --trace "$OUT/trace-resnet56-$method-K4.json" > "$OUT/trace-resnet56-$method-K4.log" 2>&1
    log "trace exit $?"
  done
  # fdg's again with every op of each module's stream inside its stages (--trace-ops): which ops
  # fill a module's tick, and where a module waits.
  if [ "$(left)" -gt 60 ]; then
    timeout -k 10 40 build-gpu/tools/staleprop train --device cuda --model resnet56 --precision bf16 --method fdg \
      --split 4 --split-at fdg --epochs 1 --lr 0.02 --train-limit 5120 --test-limit 1000 --progress none \
      --trace "$OUT/trace-ops-resnet56-fdg-K4.json" --trace-ops > "$OUT/trace-ops-resnet56-fdg-K4.log" 2>&1
    log "trace with ops exit $?"
  fi
  # With the optimizer steps and without them (a locked pipeline overlaps only through them).
  if ls "$OUT"/trace-resnet56-*-K4.json > /dev/null 2>&1; then
    python3 tools/trace_overlap.py "$OUT"/trace-resnet56-*-K4.json | tee -a "$OUT/session.txt"
    python3 tools/trace_overlap.py --skip step "$OUT"/trace-resnet56-*-K4.json | tee -a "$OUT/session.txt"
    python3 tools/trace_overlap.py --stages "$OUT"/trace-resnet56-*-K4.json | tee -a "$OUT/session.txt"
  fi
fi

# Memory of captured ticks over 4 modules (fdg's phases are d_k since eded206, were d_k + 2 on
# the H100 run of 2026-11-26: eager 1,144 MiB, planned 1,825, bump 3,784): ResNet-56, bf16.
for memory in eager planned bump; do
  [ "$(left)" -gt 60 ] || break
  case $memory in eager) extra=() ;; planned) extra=(--graphs) ;; bump) extra=(--graphs --graph-memory bump) ;; esac
  timeout 40 build-gpu/tools/staleprop bench --device cuda --model resnet56 --batch-size 128 --precision bf16 \
    --method fdg --split 4 --split-at fdg --steps 50 --warmup 10 "${extra[@]}" --json "$OUT/graph-memory.jsonl" 2>&1 |
    tee -a "$OUT/session.txt"
  log "bench fdg K=4 graph memory $memory exit ${PIPESTATUS[0]}"
done

# Several runs at once in one process (staleprop sweep), which the accuracy table uses: four
# ResNet-56 bf16 runs (seeds 1-4, 10,240 images, 2 epochs, graphs) one after another, then all at
# once; the wall times give the gain of sharing the GPU (the runs give the same bits either way).
if [ -d data/cifar-10-batches-bin ]; then
  for parallel in 1 4; do
    [ "$(left)" -gt 100 ] || break
    jobs="$OUT/sweep-p$parallel-jobs.txt" && : > "$jobs"
    for seed in 1 2 3 4; do
      echo "--device cuda --model resnet56 --precision bf16 --graphs --epochs 2 --train-limit 10240" \
        "--test-limit 2000 --seed $seed --progress plain --log $OUT/sweep-p$parallel-s$seed.log" \
        "--metrics $OUT/sweep-p$parallel-s$seed.jsonl" >> "$jobs"
    done
    start=$SECONDS
    timeout -k 10 50 build-gpu/tools/staleprop sweep --jobs "$jobs" --parallel $parallel | tee -a "$OUT/session.txt"
    log "sweep of 4 resnet56 runs, $parallel at once: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
  done
fi

# racecheck's sweeps that did not run while the accuracy run held the GPU, now as time allows.
[ -z "${CTEST_LOG:-}" ] && racecheck_sweeps sweep_cap

# The warp-specialised TMA kernels' SASS: each should set its warpgroups' registers twice
# (USETMAXREG) and make no calls in the producer's 40-register region; the wide tile with the
# convolutions' sources had not run before (tools/sass_check.sh prints both per kernel).
# Only the two objects that hold them (the whole archive's SASS did not end within 30 s on
# 2026-11-27b and -27c), and only while there is time for it.
CUOBJDUMP=$(command -v cuobjdump || ls /usr/local/cuda/bin/cuobjdump 2>/dev/null | head -1)
GEMM_TMA_KERNEL=_ZN2sp7kernels4cuda6detail5wgmma21wgmma_tma_gemm_kernelINS3_11WgTmaTileOfILi256ELi4ELi1ELi40ELi232ELi1EEENS3_11PlainSourceILb1EEELb0EtEEv14CUtensorMap_stS9_T0_NS2_3mma11MmaGeometryENSB_11MmaEpilogueIT2_EEPf
TMA_OBJECTS=(build-gpu/kernels/CMakeFiles/staleprop_kernels.dir/cuda/{gemm_bf16,conv_bf16}.cu.o)
if [ -n "$CUOBJDUMP" ] && [ -f "${TMA_OBJECTS[0]}" ] && [ "$(left)" -gt 50 ]; then
  for obj in "${TMA_OBJECTS[@]}"; do
    CUOBJDUMP="$CUOBJDUMP" timeout -k 5 20 bash tools/sass_check.sh "$obj" >> "$OUT/sass-tma.txt" 2>&1
  done
  log "SASS of the TMA kernels: $(grep -c '^kernel' "$OUT/sass-tma.txt") kernels listed in sass-tma.txt"
  # The whole SASS of the GEMM kernel that Nsight Compute profiles below (the 128 x 256 tile, bf16
  # out), so that its stall reasons can be read against the instructions on a machine without a GPU.
  timeout -k 5 20 "$CUOBJDUMP" -sass -fun "$GEMM_TMA_KERNEL" "${TMA_OBJECTS[0]}" > "$OUT/sass-gemm-tma.txt" 2>&1
  log "SASS of the profiled GEMM kernel exit $? ($(wc -l < "$OUT/sass-gemm-tma.txt") lines)"
fi

# Then the halo forward where its test passed (profiled on 2026-11-28b: only with REMEASURE=1),
# and the TMA GEMM.
if [ -n "$NCU" ] && [ -n "$CONV_TMA_OK" ]; then
  [ -n "$HALO_OK" ] && [ -n "$REMEASURE" ] && ncu_run conv_fwd-halo 'wgmma_halo_conv_kernel' 2 1 \
    '^conv_fwd_bf16/r18_64to64_3x3_s1_32px/n512' --conv-halo=1
  # A block per tile, as the 2026-11-28b profile (ncu-gemm-tma.txt) whose stall reasons this one's
  # source counters are to place; the persistent grid is a default since.
  NCU_CAP=120 ncu_run gemm-tma 'wgmma_tma_gemm_kernel' 2 1 '^gemm_bf16/square/m4096' --tma-wide=${TMA_WIDE_OK:-0} \
    --tma-persistent=0
else
  log "no ncu on this machine, or no TMA convolutions to profile"
fi
# The three-kernel batch norm (forward: the statistics' partial sums, their finalisation, the
# element pass; backward likewise) and the max-pool backward (its argmax and gather passes), one
# call each of ResNet-18's 64-channel 32 px layer at batch 128 (fp32), after one call's warm-up:
# #3 asks what keeps them under 0.70 of the copy (0.29-0.39 and 0.36-0.39 on the H200), and no
# profile has said which pass takes the time, at what DRAM throughput and occupancy.
if [ -n "$NCU" ]; then
  for bw in "bn-fwd column_partials_kernel|bn_statistics_kernel|bn_normalize_kernel 3 ^bn_fwd_train/r18_c64_32px/n128" \
            "bn-bwd column_partials_kernel|bn_backward_finalize_kernel|bn_backward_dx_kernel 3 ^bn_bwd/r18_c64_32px/n128" \
            "maxpool-bwd maxpool_argmax_kernel|maxpool_backward_gather_kernel 2 ^maxpool_bwd/3x3_s2_c64_32px/n128"; do
    set -- $bw
    NCU_BANDWIDTH=1 NCU_CAP=40 ncu_run "$1" "$2" "$3" "$3" "$4"
  done
fi
log "done"
