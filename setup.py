"""Builds robust_diffusion._C against the PyTorch already installed.

    pip install --no-build-isolation .

Build isolation would download a second, multi-GB torch into a throwaway environment (and the
extension must match the torch it runs with), so this script refuses to run without torch.
CUDA kernels are compiled when a CUDA toolkit and a CUDA-enabled torch are present (a GPU is not
needed), or when FORCE_CUDA=1; FORCE_CUDA=0 builds the CPU kernels only. TORCH_CUDA_ARCH_LIST and
MAX_JOBS are honoured.
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # an isolated build environment, or no torch installed
    sys.exit(
        "robust_diffusion builds against your installed PyTorch, which this build environment cannot see.\n"
        "Install torch first, then build without isolation:\n"
        "    pip install --no-build-isolation .\n"
        "(A plain `pip install .` would need a second copy of torch inside an isolated environment.)"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(*patterns):
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join("csrc", pattern)))


def _build_cuda() -> bool:
    """FORCE_CUDA=1 forces the CUDA build, FORCE_CUDA=0 skips it; unset, it follows the toolchain (no GPU
    is needed to compile, so CI without one still catches CUDA compile errors)."""
    forced = os.environ.get("FORCE_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None and bool(_sources("cuda/*.cu"))


def extension():
    sources = _sources("*.cpp", "cpu/*.cpp", "autograd/*.cpp", "python/*.cpp")
    cxx_flags = ["-O3", "-fno-math-errno"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _build_cuda():
        return CUDAExtension(
            "robust_diffusion._C",
            sources + _sources("cuda/*.cu", "cuda/*.cpp"),
            include_dirs=include_dirs,
            define_macros=[("RD_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
        )
    return CppExtension("robust_diffusion._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx_flags})


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
