"""The example's longer runs, apart from tests/test_example.py so that the two files run side by side: an
interrupted run resumed, the demo preset, flow matching with the rare-class control (the notebook form:
tests/test_example_notebook.py)."""

import pytest

from robust_diffusion.training.runlog import read_log
from robust_diffusion.training.trainer_checkpoint import read_checkpoint
from test_example import _results, _run_example, needs_fashion_mnist

pytestmark = pytest.mark.usefixtures("one_thread")


@needs_fashion_mnist
@pytest.mark.slow
def test_example_resume_continues_an_interrupted_run(tmp_path):
    """A run stopped after 2 of its 3 steps (here: a run with --steps 2, whose checkpoint is the state at step 2
    of the 3-step run: nothing in the training depends on the total) continues from its checkpoint under
    --resume and ends with exactly the results of an uninterrupted run."""
    cache = tmp_path / "cache"  # the same evaluation networks for all three runs (and trained once)
    common = ["--preset", "smoke", "--losses", "kl", "ned", "--no-export", "--eval-cache", cache]
    # The reference trains both losses at once (two threads): the results must not depend on it.
    reference = _run_example(*common, "--out", tmp_path / "reference", "--jobs", "2")
    assert reference.returncode == 0, reference.stderr[-4000:]
    out = tmp_path / "interrupted"
    first = _run_example(*common, "--out", out, "--steps", "2")
    assert first.returncode == 0, first.stderr[-4000:]
    resumed = _run_example(*common, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "kl: resumed at step 2" in resumed.stdout and "ned: resumed at step 2" in resumed.stdout
    for loss in ("kl", "ned"):
        assert [r["step"] for r in read_log(out / "runs" / loss / "log.csv")] == [1, 2, 3]
    expected, actual = _results(tmp_path / "reference"), _results(out)
    assert [r["loss"] for r in actual] == [r["loss"] for r in expected]
    for a, e in zip(actual, expected):
        for column in ("steps", "final_penalty", "influence_clean", "influence_contaminated", "auroc",
                       "frechet_distance", "contaminant_fraction", "contaminant_fraction_hybrid"):
            assert a[column] == e[column], (a["loss"], column)
    # A finished run is reused as it is: resuming again trains nothing and gives the same table.
    again = _run_example(*common, "--out", out, "--resume")
    assert again.returncode == 0 and "ned: resumed at step 3" in again.stdout
    assert [r["frechet_distance"] for r in _results(out)] == [r["frechet_distance"] for r in expected]


@needs_fashion_mnist
@pytest.mark.slow
def test_example_defaults_to_the_demo_preset(tmp_path):
    """No --preset on Fashion-MNIST is the main job's demo: its four losses at temperature 0.25 (pseudo-Huber at the
    adaptive scale, NED with per-sample trust), two training at a time (here shrunk to seconds, its evaluation
    networks too)."""
    result = _run_example("--out", tmp_path / "out", "--steps", "2", "--num-train", "64", "--samples", "8",
                          "--ddim-steps", "1", "--no-export", "--eval-train", "512")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "preset demo, losses ['mse', 'diffusers_huber', 'pseudo_huber', 'ned+trust']" in result.stdout
    assert "training 4 loss(es), 2 at a time" in result.stdout
    rows = _results(tmp_path / "out")
    assert [r["settings"] for r in rows[:4]] == ["scale=1", "scale=1 form=huber",
                                                 "scale=adaptive temperature=0.25 form=huber",
                                                 "scale=adaptive temperature=0.25"]
    assert (tmp_path / "out" / "summary.png").stat().st_size > 1000
    assert (tmp_path / "out" / "audit_ranking_ned+trust.csv").is_file()  # the audit reads NED's run
    for name, trust in (("pseudo_huber", False), ("ned+trust", True)):
        config = read_checkpoint(tmp_path / "out" / "runs" / name / "checkpoint.safetensors")["config"]
        assert config["sample_trust"] == trust


@needs_fashion_mnist
@pytest.mark.slow
def test_example_trains_flow_matching(tmp_path):
    """--objective flow: the same example with flow matching (velocity target, Euler sampling, log-SNR buckets)."""
    result = _run_example("--preset", "smoke", "--objective", "flow", "--timestep-sampling", "logit_normal",
                          "--losses", "mse", "ned", "--out", tmp_path / "out", "--rare-class", "1")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "objective flow" in result.stdout
    assert "# process flow" in (tmp_path / "out" / "export" / "ned.schedule.txt").read_text()
    rows = _results(tmp_path / "out")
    assert [r["loss"] for r in rows[:2]] == ["mse", "ned"]
    assert all(0 <= float(r["contaminant_fraction"]) <= 1 and float(r["frechet_distance"]) >= 0 for r in rows[:2])
    # the rare-class control (here with flow matching): class 1 capped at 3% of the 128 images, its share reported
    assert "class 1 rare (4 images, 3%)" in result.stdout
    assert all(0 <= float(r["rare_confident"]) <= float(r["rare_share"]) <= 1 for r in rows)
    assert all(float(r["rare_error_ratio"]) > 0 for r in rows[:2])  # how well each model learnt the class
    # 3 smoke steps may draw none of the 4 rare images: then there is nothing to rank (blank, never "nan")
    assert rows[0]["rare_auroc"] in ("", "0.5") and rows[1]["rare_auroc"] != "nan"  # the MSE weighs all alike
    report = (tmp_path / "out" / "results.md").read_text()
    assert "| log-SNR | clean | contaminated | ratio |" in report and "| 10 to 8 |" in report
    state = read_checkpoint(tmp_path / "out" / "runs" / "ned" / "checkpoint.safetensors")
    assert state["influence"]["_extra_state"]["num_timesteps"] is None  # the tracker's buckets are log-SNR ranges
