# Sourced by the tools/gpu_*.sh scripts from the repository root on the lent GPU machine: finds
# the cuDNN and NCCL wheels of its Python (CUDNN, NCCL: their folders, empty when absent) and
# puts their libraries and the carried Google Benchmark (.carry/benchmark/lib) on the loader path;
# unpacks the staleprop binaries tools/gpu_prepare.sh carried (.carry/bin/staleprop.xz and, with
# COMPARE_BIN, compare.xz) into .carry/bin/staleprop and .carry/bin/compare; and the prebuilt
# build (.carry/prebuilt.tar.xz) into build-gpu/, once: the paths of its CTest files moved from the
# development machine's tree (.carry/prebuilt.paths) to this one, build-gpu/.prebuilt marking it
# (tools/gpu_check.sh then builds nothing), its staleprop as .carry/bin/staleprop. The tests find
# this tree through STALEPROP_SOURCE_DIR (they were built elsewhere).
prefix_of() { python3 -c "import nvidia.$1 as m; print(list(m.__path__)[0])" 2>/dev/null; }
CUDNN=$(prefix_of cudnn) NCCL=$(prefix_of nccl)
export LD_LIBRARY_PATH="${CUDNN:+$CUDNN/lib:}${NCCL:+$NCCL/lib:}$PWD/.carry/benchmark/lib:${LD_LIBRARY_PATH:-}"
unxz_to() {  # FILE.xz OUT: decompressed, with xz or, where there is none, Python's lzma
  if command -v xz > /dev/null; then
    xz -dc "$1" > "$2"
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$1" > "$2"
  fi
}
if [ -f .carry/prebuilt.tar.xz ] && [ ! build-gpu/.prebuilt -nt .carry/prebuilt.tar.xz ]; then
  rm -rf build-gpu.part && mkdir build-gpu.part && unxz_to .carry/prebuilt.tar.xz build-gpu.part.tar &&
    tar xf build-gpu.part.tar -C build-gpu.part && rm -f build-gpu.part.tar &&
    read -r from_src from_build < .carry/prebuilt.paths &&
    find build-gpu.part -name '*.cmake' -exec sed -i \
      "s#$from_build#@BUILD@#g; s#$from_src#@SRC@#g; s#@BUILD@#$PWD/build-gpu#g; s#@SRC@#$PWD#g" {} + &&
    rm -rf build-gpu && mv build-gpu.part build-gpu && touch build-gpu/.prebuilt ||
    echo "gpu_env.sh: could not unpack .carry/prebuilt.tar.xz" >&2
  rm -rf build-gpu.part build-gpu.part.tar
fi
if [ -f build-gpu/.prebuilt ]; then
  export STALEPROP_SOURCE_DIR=$PWD
  [ -x .carry/bin/staleprop ] || { mkdir -p .carry/bin && cp build-gpu/tools/staleprop .carry/bin/staleprop; }
fi
for carried in staleprop compare; do
  if [ -f .carry/bin/$carried.xz ] && [ ! .carry/bin/$carried -nt .carry/bin/$carried.xz ]; then
    unxz_to .carry/bin/$carried.xz .carry/bin/$carried.part && chmod +x .carry/bin/$carried.part &&
      mv .carry/bin/$carried.part .carry/bin/$carried ||
      echo "gpu_env.sh: could not unpack .carry/bin/$carried.xz" >&2
  fi
done
