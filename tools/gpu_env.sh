# Sourced by the tools/gpu_*.sh scripts from the repository root on the lent GPU machine: finds
# the cuDNN and NCCL wheels of its Python (CUDNN, NCCL: their folders, empty when absent) and
# puts their libraries and the carried Google Benchmark (.carry/benchmark/lib) on the loader path;
# unpacks the staleprop binaries tools/gpu_prepare.sh carried (.carry/bin/staleprop.xz and, with
# COMPARE_BIN, compare.xz) into .carry/bin/staleprop and .carry/bin/compare.
prefix_of() { python3 -c "import nvidia.$1 as m; print(list(m.__path__)[0])" 2>/dev/null; }
CUDNN=$(prefix_of cudnn) NCCL=$(prefix_of nccl)
export LD_LIBRARY_PATH="${CUDNN:+$CUDNN/lib:}${NCCL:+$NCCL/lib:}$PWD/.carry/benchmark/lib:${LD_LIBRARY_PATH:-}"
for carried in staleprop compare; do
  if [ -f .carry/bin/$carried.xz ] && [ ! .carry/bin/$carried -nt .carry/bin/$carried.xz ]; then
    if command -v xz > /dev/null; then
      xz -dc .carry/bin/$carried.xz > .carry/bin/$carried.part
    else
      python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' \
        .carry/bin/$carried.xz > .carry/bin/$carried.part
    fi && chmod +x .carry/bin/$carried.part && mv .carry/bin/$carried.part .carry/bin/$carried ||
      echo "gpu_env.sh: could not unpack .carry/bin/$carried.xz" >&2
  fi
done
