// What the diagnostic operators (diagnostics.cpp) report or switch, each defined by the file that owns it. The
// fourth, the last-level cache size the CPU kernels assume, is cpu::last_level_cache_bytes (cpu/chunks.h).
#pragma once

#include <string>

namespace robust_diffusion {
namespace cpu {

// The CPU loss kernel build this process runs: "avx512", "avx2" or "default" (cpu/loss_kernel.cpp).
std::string instruction_set();

// How the CPU kernels use torch's threads: "openmp", or "serial" in a build without OpenMP (cpu/loss_kernel.cpp).
std::string parallel_backend();

}  // namespace cpu

// Turns the one-pass CPU gradient of the loss operators on or off for the whole process; returns the previous
// setting (autograd/loss_autograd.cpp).
bool set_cpu_one_pass(bool enabled);

}  // namespace robust_diffusion
