"""The label-noise example (examples/label_noise.py) end to end at its smoke preset, and its argument checks."""

import csv
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import subprocess_pythonpath

from robust_diffusion.training.data import fashion_mnist_root
from robust_diffusion.training.experiment import load_experiment_data

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "label_noise.py"
needs_fashion_mnist = pytest.mark.skipif(not (fashion_mnist_root() / "train-images-idx3-ubyte.gz").is_file(),
                                         reason="dataset-fashion-mnist is not installed")
SIGNALS = ["margin", "contrast", "mistrust", "influence", "trust", "confident learning"]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@needs_fashion_mnist
def test_smoke_run_writes_accuracy_pairs_and_figures(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join(subprocess_pythonpath() + [os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(EXAMPLE), "--preset", "smoke", "--out", str(out), "--threads", "1",
                             "--label-noise", "0.4", "--label-noise-kind", "symmetric", "--seed", "3",
                             "--rare-class", "1", "--rare-fraction", "0.1"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _rows(out / "results.csv")
    assert [row["run"] for row in runs] == ["noisy", "clean"]
    for row in runs:
        assert 0 <= float(row["conditional_accuracy"]) <= 1 and float(row["frechet_distance"]) >= 0
        assert all(0 <= float(row[f"accuracy_{k}"]) <= 1 for k in range(10))
        assert row["rare_accuracy"] == row["accuracy_1"]  # the rare class's own column
    data = load_experiment_data("fashion-mnist", 0.0, num_train=128, seed=3, label_noise=0.4,
                                label_noise_kind="symmetric", rare_class=1, rare_fraction=0.1)
    assert int((data.train_labels == 1).sum()) == 13  # the run's data: Trouser at a tenth
    flipped = data.label_flipped
    signals = _rows(out / "pair_signals.csv")
    assert [row["signal"] for row in signals] == SIGNALS
    for row in signals:
        assert int(row["flipped"]) == int(flipped.sum()) > 0
        assert 0 <= float(row["auroc"]) <= 1 and 0 <= float(row["precision_at_k"]) <= 1
    samples = load_file(str(out / "runs" / "noisy" / "samples.safetensors"))
    assert samples["samples"].shape == (20, 1, 28, 28) and samples["requested"].tolist() == [
        k for k in range(10) for _ in range(2)]
    for name in ("summary.png", "suspected_pairs.png", "flipped_pairs.png", "results.md"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--label-noise", "1.5"], "--label-noise must be a fraction in [0, 1), got 1.5"),
    (["--per-class", "0"], "--per-class must be at least 1, got 0"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--guidance-scale", "-1"], "--guidance-scale must be non-negative, got -1.0"),
    (["--runs", "noisy", "ceiling"], "invalid choice: 'ceiling'"),
    (["--rare-class", "10"], "--rare-class must be a Fashion-MNIST class in [0, 10), got 10"),
    (["--rare-fraction", "1"], "--rare-fraction must be a fraction in (0, 1), got 1.0"),
])
def test_argument_errors_name_the_option(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), "--out", str(tmp_path), *argv])
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
