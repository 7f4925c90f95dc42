#!/usr/bin/env bash
# One entry point for a fresh machine:
#   ./dev.sh bench [harness args]   set everything up, run the benchmark harness (default workload)
#   ./dev.sh test                   set everything up, run all tests (pytest + ctest, and the
#                                   allocator core under ASan+UBSan and its stress test under TSan); what CI runs
#   ./dev.sh setup                  set everything up only
#   ./dev.sh test-torch VERSION     pytest against another torch (e.g. 2.13.0; CI runs it): its own venv in
#                                   .venv-torchVERSION, the extension built CPU-only in a copy of the tree
#                                   (build-torchVERSION/); .venv and the in-place build are not touched
#   ./dev.sh compile-torch VERSION  compile every C++/CUDA source against another torch's headers (e.g. 2.11.0,
#                                   the GPU machine's; 2.8.0, the oldest supported): the wheel is downloaded once
#                                   into .cache/ (no install), the main build's compile commands are reused
#   ./dev.sh gpu-check [OUT_DIR]    on a machine with an NVIDIA GPU: build in place for its architecture, run the
#                                   CUDA tests, some under compute-sanitizer, and the benchmarks (< 8 min); summary in
#                                   OUT_DIR (gpu-check-results/). No venv, no network: PYTHON (python3) must have torch.
#                                   --dry-run lists the steps (see tools/gpu_check.py)
# Setting up is idempotent: apt packages if missing, a venv in .venv with
# requirements-dev.txt, the extension built in place (pip -e, with CUDA
# kernels when a CUDA toolkit is found), and the C++ test suite in build/.
# Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST, FORCE_CUDA,
# TORCH_WSL_CPU_ONLY, MAX_JOBS (see setup.py).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

log() { printf '\n==> %s\n' "$*"; }

# Packages every path needs, plus the ones named as arguments.
ensure_apt_packages() {
  local missing=()
  for pkg in libgtest-dev cmake ccache "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return
  log "installing ${missing[*]} (apt)"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_venv() {
  if [ ! -x "$PY" ]; then
    log "creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  log "installing Python requirements (torch 2.14.1 and test tools)"
  "$PY" -m pip install -q -r requirements-dev.txt
}

build_extension() {
  log "building torch_wsl._C (CUDA kernels if a CUDA toolkit is found; TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})"
  # ccache, when installed, makes rebuilds near-instant. pip compiles in a new
  # temporary folder each time, and -g puts the working directory into
  # ccache's hash unless CCACHE_NOHASHDIR is set.
  [ -d /usr/lib/ccache ] && export PATH="/usr/lib/ccache:$PATH" CCACHE_NOHASHDIR=1
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  "$PY" -m pip install -q --no-build-isolation -e . 
  "$PY" -c "import torch_wsl, json; print('built:', json.dumps(torch_wsl.build_info()))"
}

build_cpp_tests() {
  log "building the C++ library and GoogleTest suite (build/)"
  local gen=()
  command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
  [ -f build/CMakeCache.txt ] && gen=()
  cmake -S . -B build "${gen[@]}" -DPython_EXECUTABLE="$PY" >/dev/null
  cmake --build build -j "$(nproc)" >/dev/null
}

# The allocator core (csrc/alloc/core) has no torch inside, so its own small
# test binary is built a second and third time with sanitizers: every core
# test under AddressSanitizer + UndefinedBehaviorSanitizer, and the
# multi-threaded stress test under ThreadSanitizer.
sanitized_core_tests() {
  local gen=()
  command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
  local dir
  for dir in build-asan build-tsan; do
    [ -f "$dir/CMakeCache.txt" ] && continue
    local flag=-DTORCH_WSL_SANITIZE=ON
    [ "$dir" = build-tsan ] && flag=-DTORCH_WSL_TSAN=ON
    cmake -S . -B "$dir" "${gen[@]}" -DTORCH_WSL_CORE_ONLY=ON "$flag" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  done
  log "allocator core tests under AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/)"
  cmake --build build-asan -j "$(nproc)" --target torch_wsl_alloc_tests >/dev/null
  ctest --test-dir build-asan --output-on-failure
  log "allocator stress test under ThreadSanitizer (build-tsan/)"
  cmake --build build-tsan -j "$(nproc)" --target torch_wsl_alloc_tests >/dev/null
  # TSan cannot start under the high mmap randomization of some kernels
  # ("unexpected memory mapping"); running without ASLR avoids that.
  local norand=()
  setarch "$(uname -m)" -R true 2>/dev/null && norand=(setarch "$(uname -m)" -R)
  TSAN_OPTIONS="halt_on_error=1" "${norand[@]}" build-tsan/torch_wsl_alloc_tests --gtest_filter='AllocStress.*'
}

# Another torch release, without touching .venv or the in-place build: its own
# venv, and a fresh copy of the tree (tracked files and untracked ones git does
# not ignore) where the extension is built CPU-only.
test_other_torch() {
  local version="${1:-}"
  [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "usage: ./dev.sh test-torch VERSION [pytest args], e.g. 2.13.0" >&2; exit 2; }
  shift
  local start=$SECONDS venv="$ROOT/.venv-torch$version" tree="$ROOT/build-torch$version"
  local py="$venv/bin/python"
  if [ ! -x "$py" ]; then
    log "creating $venv"
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  # requirements-dev.txt with that torch, and without torchvision: its wheels on
  # PyPI are CUDA builds, which fail to load against a CPU-only torch (the one
  # test that uses it skips without it).
  sed -e "s/^torch==.*/torch==$version/" -e '/^torchvision\b/d' requirements-dev.txt >"$venv/requirements.txt"
  if ! cmp -s "$venv/requirements.txt" "$venv/installed.txt"; then
    log "installing torch==$version and the test tools into $venv"
    "$venv/bin/pip" install -q -r "$venv/requirements.txt"
    cp "$venv/requirements.txt" "$venv/installed.txt"
  fi
  "$py" -c "import sys, torch; v = torch.__version__.split('+')[0]; sys.exit(None if v == sys.argv[1] else f'{sys.argv[2]} has torch {v}, not {sys.argv[1]}')" "$version" "$venv"

  log "copying the tree to $tree"
  git rev-parse --is-inside-work-tree >/dev/null 2>&1 || { echo "test-torch copies the tree with git: run it in a git checkout" >&2; exit 2; }
  rm -rf "$tree"
  mkdir -p "$tree"
  # Listed files that no longer exist (deleted, not yet committed) are left out.
  git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf - | tar -xf - -C "$tree"

  log "building torch_wsl._C CPU-only against torch $version (in $tree)"
  cd "$tree"
  # ccache, when installed, makes rebuilds near-instant. pip compiles in a new
  # temporary directory each time, and Python's flags include -g, which puts
  # the working directory into ccache's hash unless CCACHE_NOHASHDIR is set.
  [ -d /usr/lib/ccache ] && export PATH="/usr/lib/ccache:$PATH" CCACHE_NOHASHDIR=1
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  TORCH_WSL_CPU_ONLY=1 "$py" -m pip install -q --no-build-isolation -e .
  "$py" -c "import sys, json, torch_wsl; b = torch_wsl.build_info(); print('built:', json.dumps(b), 'at', torch_wsl.__file__); sys.exit(None if b['torch_version'] == sys.argv[1] and torch_wsl.__file__.startswith(sys.argv[2]) else 'not the build asked for')" "$version" "$tree/"

  log "pytest against torch $version"
  local rc=0
  "$py" -m pytest tests -q -rs "$@" || rc=$?
  # Exit status 5 is "no tests collected": a failure here, as any other non-zero status.
  [ "$rc" -eq 5 ] && echo "error: pytest collected no tests against torch $version" >&2
  log "torch $version: pytest exit status $rc, $((SECONDS - start)) s in all"
  return "$rc"
}

setup() {
  ensure_apt_packages "$@"
  ensure_venv
  build_extension
  build_cpp_tests
}

# The C++/CUDA sources against the headers of another torch release, with
# the main build's own compile commands (setup.py writes them to a ninja
# file): a GPU machine with an older torch must not find out first. Nothing
# is installed or linked; the wheel (~0.5 GB) is downloaded once.
compile_against_torch() {
  local version="${1:?usage: ./dev.sh compile-torch VERSION}"
  local cache="$ROOT/.cache/torch-$version"
  [ -x "$PY" ] || setup
  if [ ! -d "$cache/torch/include" ]; then
    log "downloading torch $version (headers only are kept)"
    rm -rf "$cache" && mkdir -p "$cache/wheel"
    "$PY" -m pip download -q --no-deps "torch==$version" -d "$cache/wheel"
    "$PY" -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith('torch/include/')])" "$cache"/wheel/torch-*.whl "$cache"
    rm -rf "$cache/wheel"
  fi
  local work="$ROOT/build-compile-torch$version"
  rm -rf "$work"
  [ -d /usr/lib/ccache ] && export PATH="/usr/lib/ccache:$PATH" CCACHE_NOHASHDIR=1
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  log "compile commands of the main build (setup.py build_ext into $work; ccache makes it quick after ./dev.sh setup)"
  "$PY" setup.py -q build_ext --build-temp "$work/main" --build-lib "$work/lib" >/dev/null
  local mine
  mine=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
  sed "s#$mine#$cache/torch/include#g; s#$work/main#$work/other#g" "$work/main/build.ninja" > "$work/other.ninja"
  log "compiling every source against torch $version's headers"
  ninja -C "$work" -f "$work/other.ninja" -j "$MAX_JOBS" -k 0 >"$work/log" 2>&1 || {
    grep -E "error|FAILED" "$work/log" | head -40
    echo "torch_wsl does not compile against torch $version (full log: $work/log)" >&2
    return 1
  }
  echo "every source compiles against torch $version's headers"
}

cmd="${1:-help}"
shift || true
case "$cmd" in
  setup)
    setup
    ;;
  test)
    setup
    log "pytest"
    "$PY" -m pytest tests -q -rs "$@"
    log "ctest"
    ctest --test-dir build --output-on-failure
    sanitized_core_tests
    ;;
  gpu-check)
    # The system Python that has torch, not .venv's: the GPU machine is offline (nothing to install).
    exec "${PYTHON:-python3}" tools/gpu_check.py "$@"
    ;;
  test-torch)
    test_other_torch "$@"
    ;;
  compile-torch)
    compile_against_torch "$@"
    ;;
  bench)
    # The allocator suite compares against jemalloc and tcmalloc (LD_PRELOAD).
    setup libjemalloc2 libtcmalloc-minimal4
    log "benchmark harness (python -m benchmarks $*)"
    "$PY" -m benchmarks "$@"
    ;;
  *)
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
    [ "$cmd" = help ] || exit 2
    ;;
esac
