"""`pip install .` as a user types it: the in-tree build backend (tools/build_backend/) lets pip's
isolated build see the torch already installed, so a plain `pip install .` builds against it and never downloads
a second copy; without torch, or under `--no-build-isolation` with a setuptools too old for pyproject.toml, it
stops at once with what to do; uv's isolated build (which cannot see the user's torch) gets the uv command that
works. The slow test installs into a fresh venv that sees the system torch, as a user's venv would."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import subprocess_pythonpath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = os.path.join(ROOT, "tools", "build_backend")


def clean_env(**extra) -> dict:
    """The environment of a user's shell: no PYTHONPATH pointing at this source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PIP_NO_BUILD_ISOLATION")}
    env.update(extra)
    return env


def make_venv(path: Path, system_site_packages: bool) -> Path:
    args = [sys.executable, "-m", "venv", str(path)] + (["--system-site-packages"] if system_site_packages else [])
    subprocess.run(args, check=True, env=clean_env(), timeout=300)
    return path / "bin" / "python"


def copy_source(tmp_path: Path) -> Path:
    """The build inputs, copied: a build that did not stop writes nothing into the repository."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "outputs", "*.so", "__pycache__",
                                                                "*.egg-info", "runs"))
    return source


def test_the_backend_hook_stops_at_once_without_torch(tmp_path):
    """What pip calls first in an isolated build: in a venv with no torch anywhere, the hook stops with the
    command that installs torch, before setup.py or the compiler run (well within the time limit)."""
    python = make_venv(tmp_path / "venv", system_site_packages=False)
    code = (f"import sys; sys.path.insert(0, {BACKEND!r}); import torch_build_backend as b; "
            f"print('requires:', b.get_requires_for_build_wheel())")
    result = subprocess.run([str(python), "-c", code], cwd=copy_source(tmp_path), env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "requires:" not in result.stdout, output
    assert "no PyTorch found" in output and "pip install torch" in output, output
    assert "Traceback" not in output, output  # one message, not a stack


def test_plain_pip_install_without_torch_says_what_to_install(tmp_path):
    """The same through pip itself, with its default build isolation."""
    python = make_venv(tmp_path / "venv", system_site_packages=False)
    result = subprocess.run([str(python), "-m", "pip", "install", "."], cwd=copy_source(tmp_path),
                            env=clean_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "no PyTorch found" in output and "pip install torch" in output, output


def test_no_build_isolation_with_an_old_setuptools_says_to_upgrade(tmp_path):
    """A fresh venv on Python 3.11 bundles setuptools 65, which cannot read pyproject.toml's license string:
    `pip install --no-build-isolation .` stops with the upgrade command instead of a metadata error."""
    python = make_venv(tmp_path / "venv", system_site_packages=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "setuptools==65.5.0"], env=clean_env(),
                   check=True, capture_output=True, timeout=600)
    result = subprocess.run([str(python), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "."],
                            cwd=copy_source(tmp_path), env=clean_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "setuptools 65.5.0 is too old" in output and "pip install -U 'setuptools>=77'" in output, output


def test_uv_isolated_build_says_to_build_without_isolation(tmp_path):
    """uv builds in an environment of its own that leads nowhere near the user's torch: the backend says which
    uv command works (uv pip install --no-build-isolation .)."""
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed (it is in the test extra)")
    python = make_venv(tmp_path / "venv", system_site_packages=True)
    # --no-deps: uv does not count packages seen through --system-site-packages, and would fetch torch
    result = subprocess.run([uv, "pip", "install", "--python", str(python), "--no-deps", "."],
                            cwd=copy_source(tmp_path), env=clean_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "uv pip install --no-build-isolation ." in output, output


def test_default_cuda_architectures_without_a_visible_gpu():
    """With nvcc but no visible GPU and TORCH_CUDA_ARCH_LIST unset, torch's extension builder crashes
    (IndexError); setup.py targets torch's own architecture list instead, in a form torch accepts."""
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch builds no CUDA kernels")
    spec = importlib.util.spec_from_file_location("robust_diffusion_setup", os.path.join(ROOT, "setup.py"))
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)  # not __main__: defines the helpers, builds nothing
    archs = setup._default_cuda_archs()
    assert re.fullmatch(r"(\d+\.\d+;)*\d+\.\d+\+PTX", archs), archs
    from torch.utils.cpp_extension import _get_cuda_arch_flags
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        flags = _get_cuda_arch_flags()
    finally:
        if old is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old
    assert any("compute_" in flag for flag in flags), flags


@pytest.mark.slow
def test_plain_pip_install_in_a_fresh_venv_builds_against_the_installed_torch(tmp_path):
    """A user's venv that sees the installed torch (--system-site-packages), its bundled old setuptools left
    as it is: plain `pip install .` builds (CPU kernels, to keep CI short), installs no second torch, and the
    result imports, computes a loss and provides the console scripts."""
    venv = tmp_path / "venv"
    python = make_venv(venv, system_site_packages=True)
    result = subprocess.run([str(python), "-m", "pip", "install", "."], cwd=copy_source(tmp_path),
                            env=clean_env(FORCE_CUDA="0", MAX_JOBS="2"), capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert not list(venv.glob("lib/python*/site-packages/torch")), "a second torch was installed into the venv"
    code = ("import torch, robust_diffusion as rd; x = torch.randn(4, 3, requires_grad=True); "
            "loss = rd.hellinger_loss(x, torch.zeros(4, 3)); loss.backward(); "
            "print(rd.__file__, torch.__file__, loss.grad_fn.name())")
    check = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                           timeout=300)
    assert check.returncode == 0, check.stderr
    module_file, torch_file, grad_fn = check.stdout.split()
    assert module_file.startswith(str(venv)) and torch_file == torch.__file__ and grad_fn == "HellingerLossBackward0"
    for script in ("robust-diffusion-train", "robust-diffusion-audit"):
        assert (venv / "bin" / script).is_file(), script


def test_build_requirements_do_not_list_torch():
    """An isolated build would install what [build-system] requires: never torch (a second, multi-GB copy)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        requires = tomllib.load(f)["build-system"]["requires"]
    names = [re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0].lower() for requirement in requires]
    assert names, requires
    assert not any(name == "torch" or name.startswith("torch") for name in names), requires


def test_the_library_and_the_training_kit_import_without_matplotlib():
    """matplotlib is the examples' extra (pip install ".[examples]"), not a dependency: nothing a user imports
    from the package may need it."""
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # any import of matplotlib now raises ImportError
            "import robust_diffusion, robust_diffusion.risk\n"
            "from robust_diffusion.training import arguments, checkpoint, data, distributed, experiment, export, metrics\n"
            "from robust_diffusion.training import audit_command, audit_report, models, runlog, train_command\n"
            "from robust_diffusion.training import sampling, trainer\n"
            "print('ok')")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(subprocess_pythonpath() + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    dependencies = tomllib.loads((Path(ROOT) / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(d.startswith("matplotlib") for d in dependencies)
