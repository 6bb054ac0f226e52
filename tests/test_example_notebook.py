"""The example's notebook form: it converts with jupytext and its cells run in a Jupyter kernel (apart from
tests/test_example_runs.py so that the long files run side by side)."""

import importlib.util
import json
import subprocess
import sys
import warnings

import pytest

from test_example import EXAMPLE, IN_CI, _env, needs_fashion_mnist

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- notebook
def _notebook(tmp_path):
    jupytext = pytest.importorskip("jupytext")
    notebook = jupytext.read(EXAMPLE)
    path = tmp_path / "cifar10_contaminated.ipynb"
    jupytext.write(notebook, path)
    return jupytext, path


def test_example_converts_to_a_notebook(tmp_path):
    jupytext, path = _notebook(tmp_path)
    notebook = json.loads(path.read_text())
    kinds = [cell["cell_type"] for cell in notebook["cells"]]
    assert kinds[0] == "markdown" and kinds.count("markdown") >= 6 and kinds.count("code") >= 6
    # Round trip: the notebook holds exactly the script's cells.
    assert [(c.cell_type, c.source) for c in jupytext.read(path).cells] == [
        (c.cell_type, c.source) for c in jupytext.read(EXAMPLE).cells]


def _kernel_start_error(kernel_name="python3"):
    """Why a Jupyter kernel cannot start here (None when it can): start one and shut it down again."""
    try:
        from jupyter_client.manager import start_new_kernel
        manager, client = start_new_kernel(kernel_name=kernel_name, startup_timeout=120)
    except Exception as error:  # NoSuchKernel, a kernel that dies or never answers, ...
        return f"{type(error).__name__}: {error}"
    client.stop_channels()
    manager.shutdown_kernel(now=True)
    return None


def _run_cells_without_a_kernel(path, env, tmp_path):
    """The notebook's code cells in order in a fresh interpreter whose argv is a kernel's (``-f kernel.json``,
    the argv that must not reach argparse)."""
    runner = tmp_path / "run_cells.py"
    runner.write_text(
        "import json, sys\n"
        "sys.argv = ['/usr/lib/python3/dist-packages/ipykernel_launcher.py', '-f', '/tmp/kernel-1234.json']\n"
        f"cells = json.load(open({str(path)!r}))['cells']\n"
        "namespace = {'__name__': '__main__'}\n"
        "for i, cell in enumerate(c for c in cells if c['cell_type'] == 'code'):\n"
        "    print(f'--- cell {i}', flush=True)\n"
        "    exec(compile(''.join(cell['source']), f'<cell {i}>', 'exec'), namespace)\n")
    result = subprocess.run([sys.executable, str(runner)], env=env, capture_output=True, text=True,
                            timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]


@needs_fashion_mnist
@pytest.mark.slow
def test_notebook_cells_run(tmp_path, monkeypatch):
    """jupytext -> .ipynb -> nbclient: every cell of the notebook runs in a real IPython kernel (smoke preset,
    options from RD_EXAMPLE_ARGS). Only where no kernel can start (nbclient / ipykernel missing, or a kernel that
    does not come up) do the cells run in a plain interpreter instead, and under CI that is a failure."""
    _, path = _notebook(tmp_path)
    out = tmp_path / "out"
    env = _env(RD_EXAMPLE_ARGS=f"--preset smoke --losses kl ned --out {out}")
    for key, value in env.items():  # the kernel inherits this process's environment
        monkeypatch.setenv(key, value)
    try:
        import nbclient
        import nbformat
        if importlib.util.find_spec("ipykernel") is None:  # (not imported here: the example checks sys.modules)
            raise ImportError("No module named 'ipykernel'")
        reason = _kernel_start_error()
    except ImportError as error:
        reason = f"nbclient / ipykernel are not installed ({error})"
    if reason is not None:
        if IN_CI:
            pytest.fail(f"no Jupyter kernel can run the notebook: {reason} (CI=true: required there)")
        warnings.warn(f"no Jupyter kernel ({reason}): running the notebook's cells in a plain interpreter")
        _run_cells_without_a_kernel(path, env, tmp_path)
    else:
        notebook = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
        outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                          for o in c.get("outputs", []) if o.get("output_type") == "stream")
        assert "results in" in outputs and f"out {out}" in outputs  # RD_EXAMPLE_ARGS reached the kernel
        assert notebook.metadata["language_info"]["name"] == "python"
    assert (out / "results.md").is_file() and (out / "export" / "ned.torchscript.pt").is_file()
