// The diagnostic operators: how this build runs, for tests and benchmarks rather than for training code, so their
// names start with "_" (torch.ops.robust_diffusion._cpu_instruction_set(), ...). Python's
// robust_diffusion.ops.cpu_one_pass(enabled) wraps _set_cpu_one_pass as a context manager.
#include "diagnostics.h"

#include <torch/library.h>

#include "cpu/chunks.h"

namespace robust_diffusion {

TORCH_LIBRARY_FRAGMENT(robust_diffusion, m) {
  // Which CPU loss kernel build runs here: "avx512", "avx2" or "default".
  m.def("_cpu_instruction_set() -> str", &cpu::instruction_set);
  // "openmp" when the CPU kernels use torch's threads, "serial" when built without OpenMP.
  m.def("_cpu_parallel_backend() -> str", &cpu::parallel_backend);
  // The last-level cache the kernels assume (bytes): a call whose input, target and gradient exceed it streams
  // the gradient past the caches.
  m.def("_cpu_last_level_cache_bytes() -> int", &cpu::last_level_cache_bytes);
  // Turns the one-pass CPU gradient on or off for the whole process; returns the previous setting.
  m.def("_set_cpu_one_pass(bool enabled) -> bool", &set_cpu_one_pass);
}

}  // namespace robust_diffusion
