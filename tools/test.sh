#!/usr/bin/env bash
# The README's test command, and what CI runs (.ci/run). Installs everything the tests need on a fresh
# machine (Debian packages, torch and the test dependencies from PyPI), builds and installs the
# extension against that torch (CUDA kernels too when nvcc is present: a CUDA compile error fails here
# even without a GPU), then runs the Python tests and the C++ (Catch2 / ctest) tests; last, it builds the CPU
# kernels against the oldest torch pyproject.toml accepts and runs the operator tests there.
set -euo pipefail
cd "$(dirname "$0")/.."

export PIP_ROOT_USER_ACTION=ignore DEBIAN_FRONTEND=noninteractive MAX_JOBS="${MAX_JOBS:-2}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0+PTX}"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends catch2 dataset-fashion-mnist cmake g++ >/dev/null

python3 -m pip install -q --upgrade pip
python3 -m pip install -q torch
python3 -m pip install -q ".[test]"   # as a user types it: builds against that torch
python3 -c "import torch, robust_diffusion; print('torch', torch.__version__, '| CUDA kernels built:', \
hasattr(torch.ops.robust_diffusion.kl_loss, 'default') and torch._C._dispatch_has_kernel_for_dispatch_key('robust_diffusion::kl_loss', 'CUDA'))"

python3 -m pytest tests -q -p no:cacheprovider

cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/cmake -j"$MAX_JOBS"
ctest --test-dir build/cmake --output-on-failure

# The oldest torch pyproject.toml accepts, which the GPU machines carry (its autograd nodes are std::shared_ptr, its
# extensions C++17, its dynamo stricter): the extension must build against it and its operators pass
# their tests. A venv of its own and a copy of the sources, so the build above is left as it was; CPU kernels only
# (the build above compiles the CUDA ones).
MIN_TORCH=$(sed -n 's/.*"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml)
MIN=build/min-torch
rm -rf "$MIN" && mkdir -p "$MIN/src"
python3 -m venv "$MIN/venv"
"$MIN/venv/bin/python" -m pip install -q --upgrade pip setuptools wheel  # a venv's own setuptools is too old
"$MIN/venv/bin/python" -m pip install -q "torch==$MIN_TORCH.*" numpy tqdm pytest scipy mpmath ninja
git ls-files -z | xargs -0 cp --parents -t "$MIN/src"
(cd "$MIN/src" && FORCE_CUDA=0 ../venv/bin/python setup.py -q build_ext --inplace >build.log 2>&1 || { tail -40 build.log; exit 1; }
 ../venv/bin/python -c "import torch; print('oldest supported torch:', torch.__version__)"
 PYTHONPATH=python:tests ../venv/bin/python -m pytest tests/test_losses.py tests/test_fused_gradient.py \
   tests/test_robust_loss.py tests/test_adaptive_scale_ops.py tests/test_risk.py -q -p no:cacheprovider)
