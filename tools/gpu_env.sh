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
for carried in staleprop compare; do
  if [ -f .carry/bin/$carried.xz ] && [ ! .carry/bin/$carried -nt .carry/bin/$carried.xz ]; then
    unxz_to .carry/bin/$carried.xz .carry/bin/$carried.part && chmod +x .carry/bin/$carried.part &&
      mv .carry/bin/$carried.part .carry/bin/$carried ||
      echo "gpu_env.sh: could not unpack .carry/bin/$carried.xz" >&2
  fi
done
# The prebuilt build, unpacked unless build-gpu/ already holds this archive of this commit (a warm
# machine's earlier call); build-gpu/.prebuilt names the commit. A call that carries no archive
# (NO_PREBUILT=1, ACCURACY=1) finds no marker: an earlier call's prebuilt build is not its own.
if [ ! -f .carry/prebuilt.tar.xz ]; then
  rm -f build-gpu/.prebuilt
elif [ ! build-gpu/.prebuilt -nt .carry/prebuilt.tar.xz ] ||
     [ "$(cat build-gpu/.prebuilt 2> /dev/null)" != "$(cat .carry/commit 2> /dev/null)" ]; then
  rm -rf build-gpu.part && mkdir build-gpu.part && unxz_to .carry/prebuilt.tar.xz build-gpu.part.tar &&
    tar xf build-gpu.part.tar -C build-gpu.part && rm -f build-gpu.part.tar &&
    python3 - .carry/prebuilt.paths build-gpu.part "$PWD" << 'PY' &&
import os, sys
# The development machine's tree and build (one path a line), as its CTest files name them: here
# this tree and build-gpu/ (the build first: it lies inside the tree).
src, build = open(sys.argv[1]).read().splitlines()[:2]
here = sys.argv[3]
for d, _, files in os.walk(sys.argv[2]):
    for f in files:
        if f.endswith(".cmake"):
            path = os.path.join(d, f)
            text = open(path).read()
            new = text.replace(build, "\0BUILD").replace(src, here).replace("\0BUILD", here + "/build-gpu")
            if new != text:
                open(path, "w").write(new)
PY
    rm -rf build-gpu && mv build-gpu.part build-gpu && cat .carry/commit > build-gpu/.prebuilt 2> /dev/null ||
    echo "gpu_env.sh: could not unpack .carry/prebuilt.tar.xz" >&2
  rm -rf build-gpu.part build-gpu.part.tar
fi
if [ -f build-gpu/.prebuilt ]; then
  export STALEPROP_SOURCE_DIR=$PWD
  # The accuracy run's binary is the prebuilt one (not one an earlier call left in .carry/bin).
  cmp -s build-gpu/tools/staleprop .carry/bin/staleprop ||
    { mkdir -p .carry/bin && rm -f .carry/bin/staleprop && cp build-gpu/tools/staleprop .carry/bin/staleprop; }
fi
