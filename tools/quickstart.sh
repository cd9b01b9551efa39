#!/usr/bin/env bash
# The main job: builds staleprop and trains. Until the CIFAR-10 trainer lands this trains a
# tiny CNN on synthetic data on the CPU (staleprop demo) and prints its falling loss.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/deps.sh
staleprop_deps
staleprop_build build
exec build/tools/staleprop demo "$@"
