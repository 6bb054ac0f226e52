#!/usr/bin/env bash
# The README's test command, and what CI runs (.ci/run). Installs everything the tests need on a fresh
# machine (Debian packages, torch and the test dependencies from PyPI), builds and installs the
# extension against that torch (CUDA kernels too when nvcc is present: a CUDA compile error fails here
# even without a GPU), then runs the Python tests and the C++ (Catch2 / ctest) tests, and builds the CPU
# kernels against the oldest torch pyproject.toml accepts and runs the operator tests there.
#
# Most of the pytest run leaves one of two cores idle (its tests run on one thread), so the oldest-torch build and
# its tests, and the CMake build, run beside it on one job each; their logs are in build/*.log, printed on failure.
# ccache keeps the compiled objects, so a test that builds the same sources again (tests/test_build.py's fresh
# venv) reuses them: its temporary directory is under the repository (build/pytest) and ccache's base
# directory is the repository, so both builds compile the same relative paths.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

export PIP_ROOT_USER_ACTION=ignore DEBIAN_FRONTEND=noninteractive MAX_JOBS="${MAX_JOBS:-2}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0+PTX}"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends catch2 dataset-fashion-mnist cmake g++ ccache >/dev/null
export PATH="/usr/lib/ccache:$PATH" CCACHE_BASEDIR="$ROOT" CCACHE_NOHASHDIR=1 CCACHE_DIR="${CCACHE_DIR:-$ROOT/build/ccache}" \
  CCACHE_SLOPPINESS=file_macro,time_macros  # __FILE__ is the same relative path in both builds
mkdir -p build

stage() { echo "== $(date -u +%H:%M:%S) $*"; }
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # no background build outlives a failed run

# The oldest torch pyproject.toml accepts, which the GPU machines carry (its autograd nodes are std::shared_ptr, its
# extensions C++17, its dynamo stricter): the extension must build against it and its operators pass their tests.
# A venv of its own and a copy of the sources, so the main build is left as it is; CPU kernels only (the main build
# compiles the CUDA ones). Downloaded and built in the background from the start.
MIN_TORCH=$(sed -n 's/.*"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml)
MIN=build/min-torch
rm -rf "$MIN" && mkdir -p "$MIN/src"
git ls-files -z | xargs -0 cp --parents -t "$MIN/src"
(
  python3 -m venv "$MIN/venv"
  "$MIN/venv/bin/python" -m pip install -q --upgrade pip setuptools wheel  # a venv's own setuptools is too old
  "$MIN/venv/bin/python" -m pip install -q "torch==$MIN_TORCH.*" numpy tqdm pytest scipy mpmath ninja
  cd "$MIN/src"
  CCACHE_BASEDIR="$PWD" FORCE_CUDA=0 MAX_JOBS=1 ../venv/bin/python setup.py -q build_ext --inplace
  ../venv/bin/python -c "import torch; print('oldest supported torch:', torch.__version__)"
  OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python:tests ../venv/bin/python -m pytest tests/test_losses.py \
    tests/test_fused_gradient.py tests/test_robust_loss.py tests/test_adaptive_scale_ops.py tests/test_risk.py -q \
    -p no:cacheprovider
) >build/min-torch.log 2>&1 &
MIN_TORCH_RUN=$!

stage "installing torch and building the extension"
python3 -m pip install -q --upgrade pip
python3 -m pip install -q torch
python3 -m pip install -q ".[test]"   # as a user types it: builds against that torch
python3 -c "import torch, robust_diffusion; print('torch', torch.__version__, '| CUDA kernels built:', \
hasattr(torch.ops.robust_diffusion.kl_loss, 'default') and torch._C._dispatch_has_kernel_for_dispatch_key('robust_diffusion::kl_loss', 'CUDA'))"

# The C++ library, tests and sampler, built beside the pytest run (nothing in pytest uses build/cmake).
(cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release && cmake --build build/cmake -j1) >build/cmake.log 2>&1 &
CMAKE_BUILD=$!

# Two workers, a test file each at a time (its fixtures built once): the background builds leave idle time. torch's
# threads wait passively, so that no worker spins while another process holds the core it waits for.
stage "pytest"
rm -rf build/pytest
OMP_WAIT_POLICY=PASSIVE python3 -m pytest tests -q -p no:cacheprovider --basetemp=build/pytest -n 2 --dist loadfile \
  --durations=12

stage "ctest"
wait "$CMAKE_BUILD" || { tail -60 build/cmake.log; exit 1; }
ctest --test-dir build/cmake --output-on-failure

stage "the oldest supported torch"
wait "$MIN_TORCH_RUN" || { tail -60 build/min-torch.log; exit 1; }
grep -E "^oldest supported torch|passed|failed" build/min-torch.log
stage "done"
