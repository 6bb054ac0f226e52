#!/usr/bin/env bash
# The GPU checks of a session that is lent a device machine (H100/H200), as one call of the device tool:
#
#     run(command="bash tools/gpu_check.sh", timeout_s=570)
#
# Builds the extension in place with its CUDA kernels for Hopper (the machine has torch, nvcc, ninja and
# pytest, and no network), runs the tests that exercise CUDA tensors (CUDA/CPU parity for every operator,
# dtype and reduction, opcheck, torch.compile incl. CUDA graphs, determinism), then the benchmark. Everything
# lands in $OUT: device.txt, build.log, pytest.log, bench.md and train_step.md (benchmarks/RESULTS.md sections:
# append them there, with the device they name). Each stage has its own time limit so a slow one cannot eat the lease.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -1; date -u +%F; } 2>&1 | tee "$OUT/device.txt"

echo "== build (in place, CUDA $TORCH_CUDA_ARCH_LIST)"
if ! timeout 300 python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
python3 -c "import torch, robust_diffusion; assert torch._C._dispatch_has_kernel_for_dispatch_key(
    'robust_diffusion::kl_loss', 'CUDA'), 'built without CUDA kernels'; print('CUDA kernels registered')" || exit 1

echo "== tests on CUDA tensors"
# test_cuda.py is the GPU suite; the others parametrise over devices and so run on CUDA too.
timeout 240 python3 -m pytest tests/test_cuda.py tests/test_losses.py tests/test_risk.py tests/test_robust_loss.py \
  tests/test_adaptive_scale_ops.py \
  -q -p no:cacheprovider -rs --continue-on-collection-errors >"$OUT/pytest.log" 2>&1
echo "pytest exit $?"; tail -15 "$OUT/pytest.log"

echo "== benchmark"
# The four listed shapes (13-50 MB of 3N in float32, about an H100/H200's 50 MB L2) and one beyond any cache.
timeout 240 python3 benchmarks/bench_losses.py --device cuda --repeat 100 --out "$OUT/bench.md" \
  --shapes 128x3x32x32,64x4x64x64,16x16x128x128,256x3x64x64,2048x4x64x64 >"$OUT/bench.log" 2>&1
echo "bench exit $?"; tail -14 "$OUT/bench.md" 2>/dev/null || tail -20 "$OUT/bench.log"

echo "== training step (what robustness costs per step on the GPU)"
timeout 120 python3 benchmarks/bench_train_step.py --device cuda --budget 15 --out "$OUT/train_step.md" \
  >"$OUT/train_step.log" 2>&1
echo "train step exit $?"; tail -8 "$OUT/train_step.md" 2>/dev/null || tail -20 "$OUT/train_step.log"
