#!/usr/bin/env bash
# Run on the development machine before sending the tree to the lent GPU machine: fills the
# git-ignored .carry/ with what the GPU machine lacks (name `.carry` in the device call's carry):
#   .carry/googletest   GoogleTest's sources (built there by the top-level CMakeLists.txt)
#   .carry/benchmark    Google Benchmark's headers and shared library
#   .carry/data         the CIFAR-10 pack and its unpack script (for accuracy runs)
#   .carry/bin          build-cuda/tools/staleprop, built here first, xz-compressed (21 MB
#                       becomes 7 MB of the 64 MiB a call carries); tools/gpu_env.sh unpacks it there.
#                       tools/gpu_session.sh starts its accuracy run on it while the GPU machine
#                       builds, and tools/gpu_accuracy.sh needs no build at all
#   .carry/commit       the commit being tested (the GPU machine gets no .git)
#   .carry/resume       with RESUME=FILE: that checkpoint, which tools/gpu_session.sh's accuracy
#                       run resumes (a train.safetensors an earlier session brought back; keep
#                       such files in the git-ignored gpu-state/, never in the repository)
#   .carry/state        with STATE_PARTS=DIR: the state-ID.tgz.NN parts an earlier tools/gpu_accuracy.sh
#                       call returned (unfinished cells' checkpoints), which it resumes
#   .carry/bin/compare.xz  with COMPARE_BIN=FILE: another commit's CUDA staleprop (say an older
#                       build-cuda/tools/staleprop), xz-compressed; tools/gpu_session.sh times the
#                       op-by-op fdg and backprop runs on it beside this commit's, on one machine
# ACCURACY=1 leaves out GoogleTest and Google Benchmark, which tools/gpu_accuracy.sh does not use,
# so that more checkpoints fit beside the binary and the data.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .carry && mkdir -p .carry/benchmark/lib .carry/benchmark/include .carry/data
if [ -z "${ACCURACY:-}" ]; then
  cp -r /usr/src/googletest .carry/googletest
  cp -r /usr/include/benchmark .carry/benchmark/include/
  for f in /usr/lib/x86_64-linux-gnu/libbenchmark.so.*; do cp -L "$f" .carry/benchmark/lib/; done
fi
if [ -f ../shared/data/cifar10-jpeg.pack.gz ]; then
  cp ../shared/data/cifar10-jpeg.pack.gz ../shared/data/unpack_cifar10.py ../shared/data/SHA256SUMS .carry/data/
fi
# Brought up to date here (ninja -n cannot tell: with CONFIGURE_DEPENDS globs it stops at
# re-running CMake and lists no stale object; a build that is current takes seconds).
if [ -d build-cuda ] && [ -z "$(git status --porcelain --untracked-files=no)" ] &&
   ninja -C build-cuda tools/staleprop > /dev/null; then
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
git rev-parse HEAD > .carry/commit
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
