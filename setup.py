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
import platform
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


# The CPU kernels are compiled once per instruction set (csrc/cpu/isa/loss_kernel_<isa>.cpp, as in ATen);
# these are the flags of each file that needs its own. cpu/loss_kernel.cpp picks the build at run time.
ISA_FLAGS = {"_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"]} if platform.machine().lower() in ("x86_64", "amd64") else {}


class BuildExtensionPerISA(BuildExtension):
    """torch's BuildExtension, with the per-instruction-set flags above added to those files alone."""

    def build_extension(self, ext):
        compile_all = self.compiler.compile  # torch's (ninja) compile, set up by BuildExtension

        def compile_by_isa(sources, *args, extra_postargs=None, **kwargs):
            groups = {}
            for source in sources:
                suffix = next((s for s in ISA_FLAGS if source.endswith(s)), None)
                groups.setdefault(suffix, []).append(source)
            objects = []
            for suffix, group in groups.items():
                postargs = extra_postargs
                if suffix is not None:
                    postargs = dict(extra_postargs) if isinstance(extra_postargs, dict) else \
                        {"cxx": list(extra_postargs or [])}
                    postargs["cxx"] = list(postargs.get("cxx", [])) + ISA_FLAGS[suffix]
                objects += compile_all(group, *args, extra_postargs=postargs, **kwargs)
            return objects

        self.compiler.compile = compile_by_isa
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_all


def extension():
    sources = _sources("*.cpp", "cpu/*.cpp", "cpu/isa/*.cpp", "autograd/*.cpp", "python/*.cpp")
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
    cmdclass={"build_ext": BuildExtensionPerISA.with_options(use_ninja=True)},
)
