# Sourced by the tools/gpu_*.sh scripts from the repository root on the lent GPU machine: finds
# the cuDNN and NCCL wheels of its Python (CUDNN, NCCL: their folders, empty when absent) and
# puts their libraries and the carried Google Benchmark (.carry/benchmark/lib) on the loader path.
prefix_of() { python3 -c "import nvidia.$1 as m; print(list(m.__path__)[0])" 2>/dev/null; }
CUDNN=$(prefix_of cudnn) NCCL=$(prefix_of nccl)
export LD_LIBRARY_PATH="${CUDNN:+$CUDNN/lib:}${NCCL:+$NCCL/lib:}$PWD/.carry/benchmark/lib:${LD_LIBRARY_PATH:-}"
