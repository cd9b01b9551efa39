#!/usr/bin/env bash
# Run on the lent GPU machine after tools/gpu_check.sh has built build-gpu/ (it builds it when
# missing): the measurements the issues ask for, sized to fit one device call of ~10 minutes.
#   1. kernel benchmarks (bench_gpu_kernels) against cuBLAS/cuDNN and the copy ceiling, JSON;
#   2. training throughput of staleprop (bench) beside PyTorch eager (bench/pytorch_baseline.py)
#      for ResNet-56 at batch 128 and ResNet-18 at batch 512, fp32 and bf16;
#   3. the locking study of ResNet-56: backprop and bp/ddg/fdg over K = 2..4 modules;
#   4. launch overhead: ResNet-20/56 at batch 128 (bf16 and fp32), one module and FDG over 3
#      (ResNet-20) or 4 (ResNet-56) modules, op by op and replayed from CUDA graphs (--graphs) with
#      planned and with bump arenas (--graph-memory), each triple in the same call;
#   5. the tensor-core main loops (MAINLOOPS, default mma_sync wgmma wgmma_tma) side by side, and
#      the data gradient per layer in its four forms (direct or by stride class, --dgrad-classes;
#      the filter gathered or transposed, --dgrad-wt): the bf16 GEMM and
#      ResNet-18 convolution benchmarks (each against cuBLASLt/cuDNN in the same run, one JSON
#      per main loop) and bf16 training throughput of ResNet-18 (batch 512) and ResNet-56 (128).
# Everything goes to $OUT (default ./gpu-out) with the environment; STAGES="1 2 3 4" picks stages
# MIN_TIME the benchmarks' --benchmark_min_time in seconds (default 0.005; a plain number: the
# carried Google Benchmark (Debian's) rejects the "0.005s" form). It counts the time per call that
# bench_gpu_kernels reports, while each iteration runs a block of `inner` calls (up to 100) of
# ours and as many of the twin: a repetition lasts about 2 x inner x MIN_TIME, and every
# benchmark runs 5 repetitions (bench_gpu_kernels --repetitions). At 0.02 the batch-norm family alone took 282 s on an H100
# (2026-11-26); at 0.002 the 28 bn_add_relu entries took 9 s, with spreads under 1%.
# BENCH_FAMILIES the benchmark families to run (default: all, one JSON each: gemm_bf16 conv_bf16 gemm conv_fwd
# conv_bwd_data conv_bwd_weight bn bn_add_relu elementwise pool sgd; conv_bf16 is ResNet-18's layers
# at batch 512 and their sums, conv_bf16_all, not run by default, every ResNet-20/56 and ResNet-18
# layer at batch 128 and 512) and BENCH_FILTER a regex that further narrows the names within each
# family. TAR=1 packs $OUT into $OUT/results.tgz at the end (the
# device tool brings back at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
STAGES=${STAGES:-"1 2 3 4 5"}
MIN_TIME=${MIN_TIME:-0.005}
mkdir -p "$OUT"
source tools/gpu_env.sh
{ date -u; echo "commit $(cat .carry/commit 2>/dev/null || git rev-parse HEAD)"; nvidia-smi; nvcc --version;
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1; } \
  > "$OUT/env-bench.txt" 2>&1
if [ ! -x build-gpu/tools/staleprop ]; then
  echo "== build (build-gpu/)"
  cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DSTALEPROP_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a \
    -DCMAKE_PREFIX_PATH="${CUDNN};${NCCL}" > "$OUT/build.log" 2>&1 &&
    cmake --build build-gpu -j "$(nproc)" >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
fi
SP=build-gpu/tools/staleprop

for stage in $STAGES; do
  case $stage in
  1)
    # One run per family, each with its own JSON, so a run cut short by a timeout keeps what it
    # finished (Google Benchmark writes --benchmark_out only at the end of a run).
    echo "== kernel benchmarks"
    declare -A FAM=([gemm]='^gemm/' [gemm_bf16]='^gemm_bf16/' [conv_fwd]='^conv_fwd/' [conv_bwd_data]='^conv_bwd_data/'
      [conv_bwd_weight]='^conv_bwd_weight/' [conv_bf16]='^conv_(fwd|bwd_data|bwd_weight|train)_bf16/r18_.*n512'
      [conv_bf16_all]='^conv_(fwd|bwd_data|bwd_weight|train)_bf16/'
      [bn]='^bn_(fwd_train|bwd)/' [bn_add_relu]='^bn_add_relu_'
      [elementwise]='^((relu_fwd|relu_bwd|add|scale)(_bf16)?|cast_(f32_to_bf16|bf16_to_f32))/'
      [pool]='^(avgpool|maxpool|shortcut)_' [sgd]='^sgd_step/')
    for fam in ${BENCH_FAMILIES:-gemm_bf16 conv_bf16 gemm conv_fwd conv_bwd_data conv_bwd_weight bn bn_add_relu \
        elementwise pool sgd}; do
      build-gpu/bench/bench_gpu_kernels --benchmark_min_time="${MIN_TIME}" \
        --benchmark_filter="${FAM[$fam]}${BENCH_FILTER:+.*(${BENCH_FILTER})}" \
        --benchmark_report_aggregates_only=true --benchmark_out="$OUT/kernels-$fam.json" \
        --benchmark_out_format=json >> "$OUT/bench_gpu_kernels.txt" 2>&1
      echo "bench_gpu_kernels $fam exit $?"
    done
    ;;
  2)
    echo "== training throughput: staleprop vs PyTorch eager"
    for cfg in "resnet56 128" "resnet18 512"; do
      set -- $cfg
      for prec in fp32 bf16; do
        for kern in custom vendor; do
          $SP bench --device cuda --model "$1" --batch-size "$2" --precision $prec --kernels $kern --steps 50 \
            --warmup 10 --json "$OUT/throughput.jsonl" 2>&1 | tee -a "$OUT/throughput.txt"
        done
        flags=""
        [ $prec = bf16 ] && flags="--bf16 --channels-last"
        python3 bench/pytorch_baseline.py --model "$1" --batch-size "$2" --steps 50 --warmup 10 $flags \
          >> "$OUT/pytorch.jsonl" 2>> "$OUT/pytorch.err" && tail -1 "$OUT/pytorch.jsonl"
        # PyTorch eager at its fastest: for ResNet-56 NCHW beat channels_last (bf16 channels_last
        # ran slower than fp32 NCHW on 2026-11-26), so bf16 in NCHW too; the ratio is to the best.
        if [ $prec = bf16 ] && [ "$1" = resnet56 ]; then
          python3 bench/pytorch_baseline.py --model "$1" --batch-size "$2" --steps 50 --warmup 10 --bf16 \
            >> "$OUT/pytorch.jsonl" 2>> "$OUT/pytorch.err" && tail -1 "$OUT/pytorch.jsonl"
        fi
        if [ $prec = fp32 ]; then  # also PyTorch's default fp32 (cuDNN TF32 on), for reference
          python3 bench/pytorch_baseline.py --model "$1" --batch-size "$2" --steps 50 --warmup 10 --tf32 \
            >> "$OUT/pytorch.jsonl" 2>> "$OUT/pytorch.err" && tail -1 "$OUT/pytorch.jsonl"
        fi
      done
    done
    ;;
  3)
    echo "== locking study (ResNet-56, batch 128)"
    $SP study --device cuda --model resnet56 --batch-size 128 --steps 60 --warmup 10 --split-at-fdg \
      --json "$OUT/study.jsonl" > "$OUT/study.md" 2> "$OUT/study.err"
    echo "study exit $?"; cat "$OUT/study.md"
    ;;
  4)
    echo "== launch overhead: op by op vs CUDA graphs"
    for model in resnet20 resnet56; do
      k=4; [ $model = resnet20 ] && k=3  # FDG's published splits: resnet20 K=2,3; resnet56 K=2-4
      for prec in bf16 fp32; do
        for run in "--method bp" "--method fdg --split $k --split-at fdg"; do
          for g in "" "--graphs" "--graphs --graph-memory bump"; do
            timeout 120 $SP bench --device cuda --model $model --batch-size 128 --precision $prec $run $g \
              --steps 100 --warmup 20 --json "$OUT/graphs.jsonl" 2>&1 | tee -a "$OUT/graphs.txt"
          done
        done
      done
    done
    ;;
  5)
    echo "== tensor-core main loops (${MAINLOOPS:-mma_sync wgmma wgmma_tma}) and the data gradient in four forms"
    for loop in ${MAINLOOPS:-mma_sync wgmma wgmma_tma}; do
      # Bounded per main loop, so that one that hangs costs its own time only.
      timeout "${T_LOOP:-120}" build-gpu/bench/bench_gpu_kernels --mainloop=$loop --benchmark_min_time="${MIN_TIME}" \
        --benchmark_report_aggregates_only=true \
        --benchmark_filter="^gemm_bf16/|^conv_(fwd|bwd_data|bwd_weight|train)_bf16/r18_all_layers${BENCH_FILTER:+.*(${BENCH_FILTER})}" \
        --benchmark_out="$OUT/mainloop-$loop.json" --benchmark_out_format=json >> "$OUT/mainloop.txt" 2>&1
      echo "bench_gpu_kernels --mainloop=$loop exit $?"
    done
    # The data gradient per layer and over the network in its four forms (direct or by stride
    # class, the filter gathered or transposed): one run each, each layer's vs_vendor comparing
    # them (cuDNN timed in every run; tools/bench_table.py kernels puts them side by side).
    for form in direct wt classes classes-wt; do
      flags="--dgrad-classes=0 --dgrad-wt=0"  # explicit, whatever the defaults (classes on, wt on)
      case $form in *classes*) flags="--dgrad-classes=1 --dgrad-wt=0" ;; esac
      case $form in *wt) flags="${flags% --dgrad-wt=0} --dgrad-wt=1" ;; esac
      timeout "${T_LOOP:-120}" build-gpu/bench/bench_gpu_kernels --mainloop=wgmma $flags \
        --benchmark_min_time="${MIN_TIME}" --benchmark_report_aggregates_only=true \
        --benchmark_filter="^conv_bwd_data_bf16/r18_.*n512${BENCH_FILTER:+.*(${BENCH_FILTER})}" \
        --benchmark_out="$OUT/dgrad-$form.json" --benchmark_out_format=json >> "$OUT/mainloop.txt" 2>&1
      echo "bench_gpu_kernels --mainloop=wgmma data gradient per layer, $form: exit $?"
    done
    for cfg in "resnet18 512" "resnet56 128"; do
      set -- $cfg
      for loop in ${MAINLOOPS:-mma_sync wgmma wgmma_tma}; do
        timeout 120 $SP bench --device cuda --model "$1" --batch-size "$2" --precision bf16 --mainloop $loop \
          --steps 50 --warmup 10 --json "$OUT/mainloop-throughput.jsonl" 2>&1 | tee -a "$OUT/mainloop.txt"
      done
    done
    ;;
  esac
done
if [ "${TAR:-0}" = 1 ]; then
  tar czf "/tmp/results.tgz" -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/results.tgz"
fi
