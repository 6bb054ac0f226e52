"""examples/audit_evidence.py: the protocol of docs/AUDIT.md, its data, its scoring and its tables."""

import csv

import numpy as np
import pytest
import torch

from conftest import example_module



@pytest.fixture(scope="module")
def audit_evidence():
    with example_module("audit_evidence") as module:
        yield module


def test_protocol_covers_the_issue(audit_evidence):
    """Both fractions of issue 16, every kind the kit has plus one that looks like data, budgets up to 10 minutes."""
    assert set(audit_evidence.FRACTIONS) == {0.1, 0.3}
    assert {"noise", "gaussian", "dataset"} <= set(audit_evidence.KINDS) and "inverted" in audit_evidence.KINDS
    assert list(audit_evidence.BUDGETS) == sorted(audit_evidence.BUDGETS)
    assert audit_evidence.SCORE_FROM_STEP < min(audit_evidence.BUDGETS)


def test_inverted_contamination_is_the_negative_of_the_same_images(audit_evidence):
    pytest.importorskip("robust_diffusion.training.data").fashion_mnist_root()
    images, flags = audit_evidence.contaminated_images("inverted", 0.1)
    clean, _ = audit_evidence.contaminated_images("noise", 0.0)
    assert images.shape == (audit_evidence.NUM_IMAGES, 1, 28, 28) and int(flags.sum()) == 200
    torch.testing.assert_close(images[flags], -clean[flags])
    torch.testing.assert_close(images[~flags], clean[~flags])


def test_score_ranks_by_influence_and_by_penalty(audit_evidence, tmp_path):
    """Four images, 1 and 3 contaminated; the influence ranking puts 3 and 0 first (precision 1/2), the penalty
    ranking puts 1 and 3 first (precision 1). ranking.csv is in rank order; one image was never drawn."""
    rows = [{"rank": 1, "index": 3, "file": "", "mean_influence": 0.1, "mean_penalty": 2.0, "times_seen": 5},
            {"rank": 2, "index": 0, "file": "", "mean_influence": 0.2, "mean_penalty": 0.5, "times_seen": 5},
            {"rank": 3, "index": 1, "file": "", "mean_influence": 0.3, "mean_penalty": 3.0, "times_seen": 5},
            {"rank": 4, "index": 2, "file": "", "mean_influence": "", "mean_penalty": "", "times_seen": 0}]
    path = tmp_path / "ranking.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    scored = audit_evidence.score(path, np.array([0, 1, 0, 1], dtype=np.uint8))
    assert scored["k"] == 2 and scored["seen"] == 3
    assert scored["precision"] == 0.5 and scored["baseline_precision"] == 1.0
    assert scored["auroc"] == 0.5 and scored["baseline_auroc"] == 1.0  # among the seen: 3 > 0 < 1 by influence


def test_tables_accumulate_minutes_and_write_between_the_markers(audit_evidence, tmp_path):
    rows = [{"run": "noise-0.3", "kind": "noise", "fraction": 0.3, "steps": s, "auroc": 0.99, "precision": 0.95,
             "baseline_auroc": 0.9, "baseline_precision": 0.8, "k": 600, "wall_s": 120} for s in (250, 500)]
    table = audit_evidence.tables(rows)
    assert "| noise 0.3 | 250 | 2.0 | 0.990 | 0.950 | 0.900 | 0.800 | 600 |" in table
    assert "| noise 0.3 | 500 | 4.0 |" in table
    doc = tmp_path / "AUDIT.md"
    doc.write_text(f"# A\n\n{audit_evidence.BEGIN}\nold\n{audit_evidence.END}\n\nafter\n")
    audit_evidence.write_tables(rows, doc)
    text = doc.read_text()
    assert "old" not in text and text.endswith("after\n") and "| noise 0.3 | 500 | 4.0 |" in text
