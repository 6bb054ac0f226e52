"""The build refuses an isolated build environment at once (issue 2): a plain `pip install .` runs setup.py where
torch cannot be imported, and must stop with advice to use --no-build-isolation instead of downloading a second
torch. Simulated without pip or a network: torch is made unimportable (sys.modules["torch"] = None) before
setup.py runs, both directly and through the PEP 517 hook pip calls first."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import subprocess_pythonpath

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs setup.py as `python setup.py --version` would (a command that builds nothing, so a setup.py that failed to
# stop would exit 0 and write no files), with torch unimportable, as in an isolated build environment.
WITHOUT_TORCH_SETUP = """
import runpy, sys
sys.modules["torch"] = None
sys.argv = ["setup.py", "--version"]
runpy.run_path("setup.py", run_name="__main__")
"""

# What pip does first in an isolated environment: ask the build backend for the build requirements, which
# executes setup.py.
WITHOUT_TORCH_PEP517 = """
import sys
sys.modules["torch"] = None
from setuptools import build_meta
print("requires:", build_meta.get_requires_for_build_wheel())
"""


def run_without_torch(script: str, tmp_path) -> subprocess.CompletedProcess:
    """Runs ``script`` in a copy of the build inputs, so that a setup.py that did not stop writes nothing here."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    shutil.copytree(os.path.join(ROOT, "csrc"), source / "csrc")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    # A time limit far below any compile: stopping "at once" means before building anything.
    return subprocess.run([sys.executable, "-c", script], cwd=source, env=env, capture_output=True, text=True,
                          timeout=120)


def test_setup_py_stops_at_once_without_torch(tmp_path):
    result = run_without_torch(WITHOUT_TORCH_SETUP, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "--no-build-isolation" in output, output


def test_pep517_build_requirements_hook_stops_without_torch(tmp_path):
    result = run_without_torch(WITHOUT_TORCH_PEP517, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "--no-build-isolation" in output, output
    assert "requires:" not in result.stdout


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
            "from robust_diffusion.ddpm import checkpoint, cli, data, distributed, export, metrics, models, runlog\n"
            "from robust_diffusion.ddpm import sampling, trainer\n"
            "print('ok')")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(subprocess_pythonpath() + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    dependencies = tomllib.loads((Path(ROOT) / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(d.startswith("matplotlib") for d in dependencies)
