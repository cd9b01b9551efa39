# Sourced by the quick-start scripts: makes sure the tools and libraries the build needs are
# present, installing the missing Debian packages when running as root (with apt-get),
# otherwise naming them and stopping.

# staleprop_install PKG...: installs Debian packages as root with apt-get; otherwise names them
# and fails.
staleprop_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing Debian packages: $*"
    if ! apt-get update -qq; then
      echo "apt-get update failed (no network, or a broken package source): cannot install $*" >&2
      return 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || {
      echo "apt-get install $* failed" >&2
      return 1
    }
  else
    echo "missing: $*" >&2
    echo "install them with: sudo apt-get install $*" >&2
    return 1
  fi
}

staleprop_deps() {
  local missing=() p
  # Tools found on the PATH, whichever way they were installed (a newer CMake from pip or
  # Kitware counts); libraries by their headers. Each with the Debian package that provides it.
  local tools=(cmake:cmake ninja:ninja-build g++:g++ python3:python3)
  for p in "${tools[@]}"; do command -v "${p%%:*}" >/dev/null || missing+=("${p#*:}"); done
  [ -f /usr/include/gtest/gtest.h ] || [ -f /usr/local/include/gtest/gtest.h ] || missing+=(libgtest-dev)
  [ -f /usr/include/benchmark/benchmark.h ] || [ -f /usr/local/include/benchmark/benchmark.h ] ||
    missing+=(libbenchmark-dev)
  if ((${#missing[@]})); then
    staleprop_install "${missing[@]}" || return 1
  fi
  # ccache only speeds up rebuilds: installed where it can be, never required.
  if ! command -v ccache >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    staleprop_install ccache 2>/dev/null || echo "note: ccache could not be installed; building without it" >&2
  fi
  # CMakeLists.txt needs CMake 3.24 (Ubuntu 22.04's package is 3.22).
  local version
  version=$(cmake --version | sed -n '1s/[^0-9]*\([0-9][0-9.]*\).*/\1/p')
  if ! printf '3.24\n%s\n' "$version" | sort -V -C; then
    echo "CMake 3.24 or newer is needed, found $version: install a newer one (e.g. python3 -m pip install" >&2
    echo "cmake, or Kitware's apt repository) and put it first on the PATH" >&2
    return 1
  fi
  if [ ! -x /usr/local/cuda/bin/nvcc ] && ! command -v nvcc >/dev/null; then
    echo "note: no CUDA toolkit found; building the CPU-only configuration" >&2
  fi
}

# staleprop_build DIR [TARGET...]: configures DIR (Release, Ninja, tests on, no sanitizer: what
# the quick-start scripts need, whatever DIR was configured with before) and builds the targets
# (default: everything).
staleprop_build() {
  local dir=$1
  shift
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=ON -DSTALEPROP_TSAN=OFF \
    -DSTALEPROP_ASAN=OFF
  local targets=()
  for t in "$@"; do targets+=(--target "$t"); done
  cmake --build "$dir" -j "$(nproc)" "${targets[@]}"
}
