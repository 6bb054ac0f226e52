"""The PEP 517 build backend of robust_diffusion: setuptools, plus the torch you already have.

`pip install .` builds in an isolated environment that holds only the build requirements of
pyproject.toml. The extension must be compiled against the torch it will run with, and listing torch
there would download a second, multi-GB copy into that throwaway environment. So this backend asks the
interpreter that runs the build, started without pip's isolation, for its module search path (a venv,
conda, system or user site) and appends it to its own: the isolated setuptools still comes first, torch
and its dependencies are found where they are installed. Everything else is setuptools.build_meta.

With `--no-build-isolation` nothing is appended (torch is importable already). Without any torch, or
with a setuptools too old for pyproject.toml's metadata, the build stops at once with what to install.
"""

import json
import os
import re
import subprocess
import sys

_PYPROJECT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "pyproject.toml")


def _floor(name):
    """The version floor of `name` ("2.11" for "torch>=2.11") as pyproject.toml writes it, the one place it is
    written: torch in project.dependencies, setuptools in build-system.requires."""
    with open(_PYPROJECT, encoding="utf-8") as f:
        return re.search(rf'"{re.escape(name)}>=([0-9.]+)"', f.read()).group(1)


MIN_TORCH = _floor("torch")
MIN_SETUPTOOLS = _floor("setuptools")

_ISOLATION_VARIABLES = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONNOUSERBASE")
_PROBE = "import json, sys; import torch; print(json.dumps([torch.__version__, sys.path]))"


def _release(version):
    """(major, minor, ...) of a version string such as '2.15.0+cu132' or '2.16.0.dev20261101'."""
    numbers = []
    for part in version.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def _stop(message):
    # SystemExit prints the message alone (no traceback) and pip shows it under the failed step.
    raise SystemExit("\nrobust_diffusion: " + message + "\n")


def _check_setuptools():
    import setuptools

    if _release(setuptools.__version__) < _release(MIN_SETUPTOOLS):
        _stop(f"setuptools {setuptools.__version__} is too old to read pyproject.toml (it needs >= "
              f"{MIN_SETUPTOOLS}). Upgrade it in this environment:\n"
              f"    {sys.executable} -m pip install -U 'setuptools>={MIN_SETUPTOOLS}'\n"
              f"or let pip build in isolation (plain `pip install .`), which fetches a recent one.")


def _find_installed_torch():
    """Make the invoking environment's torch importable here; stop with advice when there is none."""
    try:
        import torch
        version = torch.__version__
    except ImportError:
        env = {k: v for k, v in os.environ.items() if k not in _ISOLATION_VARIABLES}
        probe = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=os.path.expanduser("~"),
                               capture_output=True, text=True)
        if probe.returncode != 0:
            if "UV" in os.environ:  # uv builds in its own environment, which does not lead back to yours
                _stop("uv's isolated build environment cannot see your torch, and robust_diffusion must compile "
                      f"against it. Build without isolation (torch, setuptools>={MIN_SETUPTOOLS} and ninja installed "
                      "first):\n    uv pip install --no-build-isolation .")
            _stop(f"no PyTorch found for {sys.executable}. robust_diffusion compiles against the torch you "
                  f"train with, so install that first (https://pytorch.org/get-started/locally/, for example "
                  f"`{sys.executable} -m pip install torch`), then run `pip install .` again.")
        version, search_path = json.loads(probe.stdout.strip().splitlines()[-1])
        sys.path.extend(p for p in search_path if p and p not in sys.path)
    if _release(version) < _release(MIN_TORCH):
        _stop(f"torch {version} is installed; robust_diffusion needs torch >= {MIN_TORCH}. "
              f"Upgrade it deliberately (`pip install -U torch`): this build never replaces your torch itself.")


def _prepared(hook_name):
    def hook(*args, **kwargs):
        _find_installed_torch()
        _check_setuptools()
        from setuptools import build_meta
        return getattr(build_meta, hook_name)(*args, **kwargs)
    hook.__name__ = hook_name
    return hook


get_requires_for_build_wheel = _prepared("get_requires_for_build_wheel")
get_requires_for_build_editable = _prepared("get_requires_for_build_editable")
get_requires_for_build_sdist = _prepared("get_requires_for_build_sdist")
prepare_metadata_for_build_wheel = _prepared("prepare_metadata_for_build_wheel")
prepare_metadata_for_build_editable = _prepared("prepare_metadata_for_build_editable")
build_wheel = _prepared("build_wheel")
build_editable = _prepared("build_editable")
build_sdist = _prepared("build_sdist")
