#!/usr/bin/env bash
# Run on the development machine before sending the tree to the lent GPU machine: fills the
# git-ignored .carry/ with what the GPU machine lacks (name `.carry` in the device call's carry):
#   .carry/googletest   GoogleTest's sources (built there by the top-level CMakeLists.txt, where the
#                       GPU machine builds: NO_PREBUILT=1, or a prebuilt build it cannot unpack)
#   .carry/benchmark    Google Benchmark's headers and shared library
#   .carry/data         the CIFAR-10 pack and its unpack script (for accuracy runs)
#   .carry/prebuilt.tar.xz  the whole of build-cuda (every test, bench_gpu_kernels, staleprop,
#                       the CTest files and the two objects of the TMA kernels), built here first
#                       (sm_90a, each test limited to 120 s), in one xz stream whose 400 MiB window
#                       finds the device code the binaries share: 400 MB become about 14 MB.
#                       tools/gpu_env.sh unpacks it there as build-gpu/, the CTest files' paths
#                       moved to that tree, so the GPU machine builds nothing (the build took 172 s
#                       of a session's 560 on 2026-11-27c) and tools/gpu_session.sh starts its
#                       accuracy run at once. NO_PREBUILT=1 carries instead:
#   .carry/bin          build-cuda/tools/staleprop, xz-compressed (21 MB become 7 MB of the 64 MiB a
#                       call carries), and the GPU machine builds the rest; tools/gpu_accuracy.sh
#                       needs no build either way
#   .carry/commit       the commit being tested (the GPU machine gets no .git)
#   .carry/resume       with RESUME=FILE: that checkpoint, which tools/gpu_session.sh's accuracy
#                       run resumes (a train.safetensors an earlier session brought back; keep
#                       such files in the git-ignored gpu-state/, never in the repository)
#   .carry/state        with STATE_PARTS=DIR: the state-ID.tgz.NN parts an earlier tools/gpu_accuracy.sh
#                       call returned (unfinished cells' checkpoints), which it resumes
#   .carry/bin/compare.xz  with COMPARE_BIN=FILE: another commit's CUDA staleprop (say an older
#                       build-cuda/tools/staleprop), xz-compressed; tools/gpu_session.sh times the
#                       op-by-op fdg and backprop runs on it beside this commit's, on one machine
# ACCURACY=1 leaves out the prebuilt tests and Google Benchmark, which tools/gpu_accuracy.sh does
# not use, so that more checkpoints fit beside the binary and the data.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .carry && mkdir -p .carry/benchmark/lib .carry/benchmark/include .carry/data
if [ -z "${ACCURACY:-}" ]; then
  # The library bench_gpu_kernels loads, and what a build there needs: with NO_PREBUILT, and as
  # the fallback where the prebuilt build cannot be unpacked (4 MB).
  for f in /usr/lib/x86_64-linux-gnu/libbenchmark.so.*; do cp -L "$f" .carry/benchmark/lib/; done
  cp -r /usr/src/googletest .carry/googletest
  cp -r /usr/include/benchmark .carry/benchmark/include/
fi
if [ -f ../shared/data/cifar10-jpeg.pack.gz ]; then
  cp ../shared/data/cifar10-jpeg.pack.gz ../shared/data/unpack_cifar10.py ../shared/data/SHA256SUMS .carry/data/
fi
# Brought up to date here (ninja -n cannot tell: with CONFIGURE_DEPENDS globs it stops at
# re-running CMake and lists no stale object; a build that is current takes seconds).
clean=; [ -z "$(git status --porcelain --untracked-files=no)" ] && clean=1
if [ -z "${ACCURACY:-}" ] && [ -z "${NO_PREBUILT:-}" ]; then
  [ -n "$clean" ] || { echo "gpu_prepare.sh: commit first: the prebuilt tests must be the commit's" >&2; exit 1; }
  [ -d build-cuda ] || { echo "gpu_prepare.sh: no build-cuda/ (configure it with -DSTALEPROP_CUDA=ON)" >&2; exit 1; }
  # The GPU machine's limit for each test: a kernel that hangs fails its test alone.
  grep -q '^STALEPROP_TEST_TIMEOUT:STRING=120$' build-cuda/CMakeCache.txt ||
    cmake -DSTALEPROP_TEST_TIMEOUT=120 build-cuda > /dev/null || exit 1
  ninja -C build-cuda > /dev/null || { echo "gpu_prepare.sh: the build-cuda build failed" >&2; exit 1; }
  grep -q '^CMAKE_CUDA_ARCHITECTURES:[A-Z]*=90a$' build-cuda/CMakeCache.txt ||
    { echo "gpu_prepare.sh: build-cuda is not built for sm_90a" >&2; exit 1; }
  # Where the CTest files say the tree and the build are; tools/gpu_env.sh moves them there.
  printf '%s\n%s\n' "$PWD" "$PWD/build-cuda" > .carry/prebuilt.paths
  (cd build-cuda && find . -name CTestTestfile.cmake -o -path './tests/*.cmake' -o -path './tests/test_*' -type f \
     -perm -u+x -o -path './kernels/CMakeFiles/staleprop_kernels.dir/cuda/*_bf16.cu.o' | sed 's|^\./||' |
     grep -v '^tests/CMakeFiles' | sort > ../.carry/prebuilt.list)
  echo bench/bench_gpu_kernels tools/staleprop | tr ' ' '\n' >> .carry/prebuilt.list
  tar cf - -C build-cuda -T .carry/prebuilt.list | xz -T1 -6 --lzma2=dict=400MiB > .carry/prebuilt.tar.xz || exit 1
  rm .carry/prebuilt.list
elif [ -d build-cuda ] && [ -n "$clean" ] && ninja -C build-cuda tools/staleprop > /dev/null; then
  mkdir -p .carry/bin && xz -T0 -6 -c build-cuda/tools/staleprop > .carry/bin/staleprop.xz
else
  echo "gpu_prepare.sh: WARNING: no current build-cuda/tools/staleprop to carry (uncommitted changes, no" \
    "build-cuda, or its build failed): the accuracy run starts only after the build" >&2
fi
if [ -n "${RESUME:-}" ]; then
  mkdir -p .carry/resume && cp "$RESUME" .carry/resume/train.safetensors
fi
if [ -n "${COMPARE_BIN:-}" ]; then
  mkdir -p .carry/bin && xz -T0 -6 -c "$COMPARE_BIN" > .carry/bin/compare.xz
fi
if [ -n "${STATE_PARTS:-}" ]; then
  mkdir -p .carry/state && cp "$STATE_PARTS"/state-*.tgz.* .carry/state/
fi
# The commit, "-dirty" where tracked files differ from it (NO_PREBUILT=1 and ACCURACY=1 allow
# that): a build there names it (tools/build_info.cmake), as do the logs.
echo "$(git rev-parse HEAD)$([ -n "$clean" ] || echo -dirty)" > .carry/commit
du -sh .carry
# What a call carries: the tracked and untracked-not-ignored files, and .carry (at most 64 MiB).
travels=$(( $(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1) +
  $(du -sb .carry | cut -f1) ))
if [ "$travels" -gt $((64 * 1024 * 1024)) ]; then
  echo "gpu_prepare.sh: the tree and .carry come to $travels bytes, over the 64 MiB a device call carries" \
    "(ACCURACY=1 leaves out the test libraries; carry fewer checkpoints)" >&2
  exit 1
fi
echo "gpu_prepare.sh: $travels bytes travel (at most $((64 * 1024 * 1024)))"
