"""The benchmark scripts run and write their section (tiny budgets: the numbers themselves are not tested)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_pythonpath

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_training_step_benchmark_writes_its_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(subprocess_pythonpath() + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train_step.py"), "--models", "quick",
                             "--batches", "4", "--budget", "0.5", "--out", str(out)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmark results\n\n## Training step, ")
    rows = [line for line in text.splitlines() if line.startswith("| quick (")]
    assert len(rows) == 1 and rows[0].startswith("| quick (0.") and "x28) | 4 | " in rows[0]
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert float(cells[2]) > 0 and float(cells[3]) > 0 and float(cells[5]) > 0 and float(cells[6]) > 0


@pytest.mark.slow
def test_loss_benchmark_writes_its_section(tmp_path):
    out = tmp_path / "RESULTS.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(subprocess_pythonpath() + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("GLIBC_TUNABLES", None)
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_losses.py"), "--shapes", "4x3x8x8",
                             "--dtypes", "float32,bfloat16", "--repeat", "3", "--no-compile", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "GLIBC_TUNABLES=glibc.malloc.mmap_threshold" in text  # it re-ran itself with freed memory kept
    rows = [line for line in text.splitlines() if line.startswith("| (4, 3, 8, 8) |")]
    assert [row.split("|")[2].strip() for row in rows] == ["float32", "bfloat16"]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 17 and all(float(c) > 0 for c in cells[2:6]) and cells[6] == "-"
        assert float(cells[2]) == pytest.approx(3 * 4 * 3 * 8 * 8 * {"float32": 4, "bfloat16": 2}[cells[1]] / 1e6, rel=1e-2)
        assert float(cells[8]) > 0 and cells[10].endswith("%") and cells[11].endswith("%")
        assert float(cells[15]) > 0 and cells[16].endswith("%")
    fixed = re.search(r"Fixed cost of one call .*: ours (\d+) us, F.mse_loss (\d+) us", text)
    assert fixed and int(fixed.group(1)) > 0 and int(fixed.group(2)) > 0
