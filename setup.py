"""Builds robust_diffusion._C against the PyTorch already installed.

    pip install .

pip runs this through the in-tree backend tools/build_backend/torch_build_backend.py, which lets the
isolated build see your torch (a second copy would be a multi-GB download, and the extension must match
the torch it runs with). `pip install --no-build-isolation .` works too.

CUDA kernels are compiled when a CUDA toolkit and a CUDA-enabled torch are present (a GPU is not needed),
or when FORCE_CUDA=1; FORCE_CUDA=0 builds the CPU kernels only. TORCH_CUDA_ARCH_LIST chooses the GPU
architectures; unset, torch targets the visible GPUs, and without a visible GPU this script targets every
architecture your torch itself was built for. MAX_JOBS limits parallel compiles.
"""

import glob
import os
import platform
import subprocess
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # `python setup.py ...` run by hand without torch
    sys.exit("robust_diffusion builds against your installed PyTorch and found none: install torch first "
             "(https://pytorch.org/get-started/locally/), then `pip install .`")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(*patterns):
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join("csrc", pattern)))


def _build_cuda() -> bool:
    """FORCE_CUDA=1 forces the CUDA build, FORCE_CUDA=0 skips it; unset, it follows the toolchain (no GPU
    is needed to compile, so CI without one still catches CUDA compile errors)."""
    forced = os.environ.get("FORCE_CUDA")
    if forced is not None:
        return forced == "1"
    if torch.version.cuda is None or not _sources("cuda/*.cu"):
        return False
    if CUDA_HOME is None:
        print(f"robust_diffusion: torch {torch.__version__} has CUDA but no CUDA toolkit (nvcc) was found; "
              f"building the CPU kernels only (set CUDA_HOME to build the CUDA ones)", file=sys.stderr)
        return False
    return True


def _default_cuda_archs() -> str:
    """Without a visible GPU torch's extension builder cannot pick an architecture (it would fail with an
    IndexError). Target what this torch was built for, so the extension runs wherever torch does, the newest
    as PTX too for GPUs newer than both. Narrow it with TORCH_CUDA_ARCH_LIST=9.0 to compile faster."""
    archs = [flag[3:] for flag in torch._C._cuda_getArchFlags().split() if flag.startswith("sm_")]
    try:  # keep those this nvcc can compile
        listed = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True,
                                text=True, check=True).stdout.split()
        archs = [a for a in archs if f"compute_{a}" in listed]
    except (OSError, subprocess.CalledProcessError):
        pass
    archs = [f"{a[:-1]}.{a[-1]}" for a in archs if a.isdigit()] or ["8.0", "9.0"]
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def _isa_flags() -> dict:
    """The CPU kernels are compiled once per instruction set (csrc/cpu/isa/loss_kernel_<isa>.cpp, as in ATen;
    cpu/loss_kernel.cpp picks the build at run time). The flags of each file that needs its own are written once,
    in csrc/cpu/isa/flags.txt (CMakeLists.txt reads it too): {real path of the source: flags}, empty off x86-64."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    isa_dir = os.path.realpath(os.path.join(ROOT, "csrc", "cpu", "isa"))
    with open(os.path.join(isa_dir, "flags.txt"), encoding="utf-8") as table:
        rows = [line.split() for line in table if line.strip() and not line.startswith("#")]
    return {os.path.join(isa_dir, name): flags for name, *flags in rows}


ISA_FLAGS = _isa_flags()


class BuildExtensionPerISA(BuildExtension):
    """torch's BuildExtension, with the per-instruction-set flags of csrc/cpu/isa/flags.txt added to those files
    alone."""

    def build_extension(self, ext):
        compile_all = self.compiler.compile  # torch's (ninja) compile, set up by BuildExtension

        def compile_by_isa(sources, *args, extra_postargs=None, **kwargs):
            groups = {}
            for source in sources:
                path = os.path.realpath(source)
                groups.setdefault(path if path in ISA_FLAGS else None, []).append(source)
            objects = []
            for isa_source, group in groups.items():
                postargs = extra_postargs
                if isa_source is not None:
                    postargs = dict(extra_postargs) if isinstance(extra_postargs, dict) else \
                        {"cxx": list(extra_postargs or [])}
                    postargs["cxx"] = list(postargs.get("cxx", [])) + ISA_FLAGS[isa_source]
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
    # at::parallel_for is inline: without OpenMP here the CPU kernels would run on one thread whatever
    # torch.get_num_threads() says. The pip wheels' own libgomp.so.1 is the one loaded (same soname).
    link_flags = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _build_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = _default_cuda_archs()
            print(f"robust_diffusion: no GPU visible and TORCH_CUDA_ARCH_LIST unset; building CUDA kernels for "
                  f"{os.environ['TORCH_CUDA_ARCH_LIST']} (torch's own list)", file=sys.stderr)
        return CUDAExtension(
            "robust_diffusion._C",
            sources + _sources("cuda/*.cu", "cuda/*.cpp"),
            include_dirs=include_dirs,
            define_macros=[("RD_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    return CppExtension("robust_diffusion._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


if __name__ == "__main__":  # pip's backend runs this file as __main__; tests import its helpers
    setup(
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtensionPerISA.with_options(use_ninja=True)},
    )
