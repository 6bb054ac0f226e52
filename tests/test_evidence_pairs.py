"""examples/evidence_pairs.py: the mismatched-pair protocol's commands, and the table and verdict it writes."""

import csv

import pytest

from conftest import example_module


@pytest.fixture(scope="module")
def evidence_pairs():
    with example_module("evidence_pairs") as module:
        yield module


def write_signals(folder, values, flipped=480):
    """values: {signal: (auroc, precision_at_k)}"""
    folder.mkdir(parents=True)
    with open(folder / "pair_signals.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["signal", "auroc", "precision_at_k", "flipped", "restored"])
        for signal, (auroc, precision) in values.items():
            writer.writerow([signal, auroc, precision, flipped, 0.5])


def fill(evidence_pairs, out, conditions=None, seeds=None, margin=(0.95, 0.8)):
    for condition in conditions or evidence_pairs.CONDITIONS:
        for seed in seeds or evidence_pairs.SEEDS:
            write_signals(evidence_pairs.run_dir(out, condition, seed),
                          {"margin": margin, "contrast": (0.9, 0.7), "mistrust": (0.93, 0.75),
                           "influence": (0.5, 0.2), "trust": (0.52, 0.21), "confident learning": (0.85, 0.7)})


def test_command_is_the_rules_protocol(evidence_pairs, tmp_path):
    cmd = evidence_pairs.command("asymmetric-0.3", 4, tmp_path, 1)
    assert cmd[1].endswith("label_noise.py")
    joined = " ".join(cmd[2:])
    assert "--preset pairs --runs noisy --label-noise 0.3 --label-noise-kind asymmetric --seed 4" in joined
    assert joined.endswith("--threads 1")
    assert set(evidence_pairs.CONDITIONS.values()) == {(0.2, "symmetric"), (0.4, "symmetric"), (0.3, "asymmetric")}


def test_verdict_waits_for_every_condition_and_seed(evidence_pairs, tmp_path):
    fill(evidence_pairs, tmp_path, seeds=(0, 1, 2, 3))
    text = evidence_pairs.mismatched_pair_rule(evidence_pairs.read_signals(tmp_path))
    assert "Not decided" in text and "Winner" not in text


def test_winner_and_target(evidence_pairs, tmp_path):
    fill(evidence_pairs, tmp_path)
    text = evidence_pairs.mismatched_pair_rule(evidence_pairs.read_signals(tmp_path))
    assert "**Winner: margin**" in text
    assert text.count("| yes |") == 3
    # the precision at k below confident learning's fails the target even with a high AUROC
    other = tmp_path / "low"
    fill(evidence_pairs, other, margin=(0.97, 0.6))
    text = evidence_pairs.mismatched_pair_rule(evidence_pairs.read_signals(other))
    assert "**Winner: margin**" in text and text.count("| no |") == 3


def test_report_goes_between_the_markers(evidence_pairs, tmp_path):
    fill(evidence_pairs, tmp_path / "runs", conditions=["symmetric-0.2"], seeds=(0, 1))
    results = tmp_path / "RESULTS.md"
    results.write_text(f"head\n{evidence_pairs.BEGIN}\nold\n{evidence_pairs.END}\ntail\n")
    evidence_pairs.write_report(tmp_path / "runs", results)
    text = results.read_text()
    assert text.startswith("head\n") and text.endswith("tail\n") and "old" not in text
    assert "### symmetric-0.2: seeds 0, 1 (480, 480 of 2,400" in text
    assert "| margin | 0.950 (0.950, 0.950) | 0.800 (0.800, 0.800) |" in text
    assert "Not decided" in text
    unmarked = tmp_path / "unmarked.md"
    unmarked.write_text("no markers\n")
    with pytest.raises(SystemExit, match="lacks the markers"):
        evidence_pairs.write_report(tmp_path / "runs", unmarked)
