#!/usr/bin/env bash
# Puts the CIFAR-10 binary release (data_batch_1.bin ... data_batch_5.bin, test_batch.bin) into
# DEST_DIR (default data/cifar-10-batches-bin in the repository; data/ is git-ignored: never
# commit data).
#
#   tools/fetch_cifar10.sh [DEST_DIR]
#
# Source: the packed copy in ../shared/data next to the repository when there is one (machines
# without internet access), decoded with its unpack script; otherwise the official archive from
# https://www.cs.toronto.edu/~kriz/cifar.html, checked against its published md5.
# Does nothing when DEST_DIR already holds the six files at their exact size.
set -euo pipefail

repo=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
. "$repo/tools/deps.sh"  # staleprop_install
dest=${1:-$repo/data/cifar-10-batches-bin}
files=(data_batch_1.bin data_batch_2.bin data_batch_3.bin data_batch_4.bin data_batch_5.bin test_batch.bin)
file_bytes=30730000  # 10000 records of 1 label byte + 3072 pixel bytes

complete() {
  local f
  for f in "${files[@]}"; do
    [ -f "$dest/$f" ] && [ "$(stat -c %s "$dest/$f")" = "$file_bytes" ] || return 1
  done
}

# The trainer's default is ./data/cifar-10-batches-bin from the directory it runs in: say how to
# point it here where that is another directory.
where_trainer_looks() {
  local here
  here=$(readlink -f "$dest")
  [ "$here" = "$(readlink -f ./data/cifar-10-batches-bin 2>/dev/null || true)" ] && return 0
  if [ "$here" = "$(readlink -f "$repo/data/cifar-10-batches-bin")" ]; then
    echo "staleprop train finds it from $repo (its default, ./data/cifar-10-batches-bin), or anywhere with" \
      "--data $dest or CIFAR10_DIR=$dest"
  else
    echo "staleprop train finds it with --data $dest or CIFAR10_DIR=$dest"
  fi
}

if complete; then
  echo "CIFAR-10 already present in $dest"
  where_trainer_looks
  exit 0
fi
mkdir -p "$dest"

shared="$repo/../shared/data"
pack="$shared/cifar10-jpeg.pack.gz"
if [ -f "$pack" ]; then
  echo "== unpacking $pack into $dest"
  echo "NOTE: this copy of CIFAR-10 went through JPEG compression (quality 75): the pixels differ slightly"
  echo "      from the official release, and test accuracies come out somewhat lower (about 1-2 points)."
  # The unpack script needs Pillow: use an interpreter that has it, else install it (Debian's
  # python3-pil as root, else with pip).
  has_pil() { command -v "$1" >/dev/null && "$1" -c 'import PIL' 2>/dev/null; }
  py=""
  for candidate in python3 /usr/bin/python3; do
    if has_pil "$candidate"; then
      py=$candidate
      break
    fi
  done
  if [ -z "$py" ] && [ "$(id -u)" = 0 ] && staleprop_install python3-pil && has_pil /usr/bin/python3; then
    py=/usr/bin/python3
  fi
  if [ -z "$py" ]; then
    echo "== installing Pillow with pip"
    if python3 -m pip install --quiet pillow || python3 -m pip install --quiet --user pillow; then
      py=python3
    else
      echo "could not install Pillow; install it (python3 -m pip install pillow, or apt-get install python3-pil" >&2
      echo "and use /usr/bin/python3) and run this script again" >&2
      exit 1
    fi
  fi
  "$py" "$shared/unpack_cifar10.py" "$pack" "$dest"
else
  url=https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz
  md5=c32a1d4ab5d03f1284b67883e8d87530
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  if ! command -v curl >/dev/null && ! command -v wget >/dev/null; then
    staleprop_install curl ca-certificates || true  # said below
    command -v curl >/dev/null || {
      echo "no curl or wget to download $url with: install one (apt-get install curl ca-certificates)" >&2
      exit 1
    }
  fi
  echo "== downloading $url"
  if command -v curl >/dev/null; then
    curl -fL --retry 3 -o "$tmp/cifar-10-binary.tar.gz" "$url"
  else
    wget -O "$tmp/cifar-10-binary.tar.gz" "$url"
  fi
  got=$(md5sum "$tmp/cifar-10-binary.tar.gz" | cut -d' ' -f1)
  if [ "$got" != "$md5" ]; then
    echo "md5 mismatch for $url: got $got, expected $md5" >&2
    exit 1
  fi
  # The archive holds cifar-10-batches-bin/; DEST_DIR gets its files directly.
  tar -xzf "$tmp/cifar-10-binary.tar.gz" -C "$tmp"
  mv "$tmp"/cifar-10-batches-bin/* "$dest"/
fi

if ! complete; then
  echo "fetch_cifar10.sh: $dest is still missing files or holds files of the wrong size" >&2
  exit 1
fi
echo "CIFAR-10 ready in $dest"
where_trainer_looks
