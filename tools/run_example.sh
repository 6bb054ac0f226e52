#!/usr/bin/env bash
# The README's main job: train the same small diffusion model on Fashion-MNIST with 30% of the training
# images replaced by noise, once per loss (the standard MSE, diffusers' pseudo-Huber, pseudo-Huber at the adaptive
# scale, NED with per-sample trust), then sample, evaluate, rank the training images by NED's influence weights
# (the audit) and write tables and figures to outputs/contaminated/ (summary.png is the README's figure). What it does in full, its results and
# how long it takes: docs/MAIN_JOB.md.
# Installs what it needs: Debian's dataset-fashion-mnist package, torch, and this package.
# Extra arguments go to the example, e.g. `bash tools/run_example.sh --contamination 0.1`.
set -euo pipefail
cd "$(dirname "$0")/.."

export PIP_ROOT_USER_ACTION=ignore DEBIAN_FRONTEND=noninteractive MAX_JOBS="${MAX_JOBS:-2}"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends dataset-fashion-mnist g++ >/dev/null

python3 -m pip install -q --upgrade pip
python3 -m pip install -q torch
# CUDA kernels only where a GPU can use them (tools/test.sh always compiles them).
export FORCE_CUDA="${FORCE_CUDA:-$(python3 -c 'import torch; print(int(torch.cuda.is_available()))')}"
python3 -m pip install -q ".[examples]"   # as a user types it: builds against that torch

python3 examples/cifar10_contaminated.py --dataset fashion-mnist --preset demo "$@"
