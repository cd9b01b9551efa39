#!/usr/bin/env bash
# The main job: builds staleprop, fetches CIFAR-10 into ./data (from ../shared/data when it is
# there, else the official archive), and trains a CIFAR ResNet-20 with standard backprop.
#
# The default is sized for a 2-core machine without a GPU (about 5 minutes of training): 4
# epochs over the first 20,000 training images, evaluated on all 10,000 test images. Any extra
# arguments are passed to `staleprop train` and override the defaults, for example
#   tools/quickstart.sh --train-limit 50000 --test-limit 10000 --epochs 30      (all data)
# (see README.md for the full recipes, and `build/tools/staleprop train --help`).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
. tools/deps.sh
staleprop_deps
tools/fetch_cifar10.sh data/cifar-10-batches-bin  # first: a failure here is seen before a build of minutes
staleprop_build build staleprop  # the command line only; tools/run_tests.sh builds the rest
exec build/tools/staleprop train --data data/cifar-10-batches-bin --model resnet20 --epochs 4 \
  --train-limit 20000 --batch-size 128 --lr 0.1 --schedule onecycle --warmup-epochs 0.5 \
  --metrics data/quickstart-metrics.jsonl "$@"
