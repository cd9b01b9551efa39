# Sourced by the tools/gpu_*.sh scripts from the repository root on the lent GPU machine: finds
# the cuDNN and NCCL wheels of its Python (CUDNN, NCCL: their folders, empty when absent) and
# puts their libraries and the carried Google Benchmark (.carry/benchmark/lib) on the loader path;
# unpacks the staleprop binary tools/gpu_prepare.sh carried (.carry/bin/staleprop.xz) into
# .carry/bin/staleprop.
prefix_of() { python3 -c "import nvidia.$1 as m; print(list(m.__path__)[0])" 2>/dev/null; }
CUDNN=$(prefix_of cudnn) NCCL=$(prefix_of nccl)
export LD_LIBRARY_PATH="${CUDNN:+$CUDNN/lib:}${NCCL:+$NCCL/lib:}$PWD/.carry/benchmark/lib:${LD_LIBRARY_PATH:-}"
if [ -f .carry/bin/staleprop.xz ] && [ ! .carry/bin/staleprop -nt .carry/bin/staleprop.xz ]; then
  if command -v xz > /dev/null; then
    xz -dc .carry/bin/staleprop.xz > .carry/bin/staleprop.part
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' \
      .carry/bin/staleprop.xz > .carry/bin/staleprop.part
  fi && chmod +x .carry/bin/staleprop.part && mv .carry/bin/staleprop.part .carry/bin/staleprop ||
    echo "gpu_env.sh: could not unpack .carry/bin/staleprop.xz" >&2
fi
