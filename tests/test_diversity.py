"""Diversity and mode coverage (robust_diffusion.training.diversity): precision/recall, density/coverage and class
histograms, against hand-computed cases and a brute-force float64 reference."""

import math

import pytest
import torch

from conftest import FixedLogits

from robust_diffusion.training import diversity


def brute_force(real, generated, k):
    """The papers' definitions written out point by point."""
    def radius(points, i):
        return sorted(math.dist(points[i], p) for j, p in enumerate(points) if j != i)[k - 1]

    real_r = [radius(real, i) for i in range(len(real))]
    gen_r = [radius(generated, j) for j in range(len(generated))]
    inside = [[math.dist(g, r) <= real_r[i] for i, r in enumerate(real)] for g in generated]
    return {"precision": sum(any(row) for row in inside) / len(generated),
            "recall": sum(any(math.dist(r, g) <= gen_r[j] for j, g in enumerate(generated)) for r in real) / len(real),
            "density": sum(map(sum, inside)) / (k * len(generated)),
            "coverage": sum(any(inside[j][i] for j in range(len(generated))) for i in range(len(real))) / len(real)}


def test_a_hand_computed_case():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    generated = torch.tensor([[0.5], [10.0]])
    # k = 1: every real ball has radius 1; 0.5 lies in the balls of 0 and 1, 10 in none; the generated radius is
    # 9.5, so 0.5's ball holds every real point.
    assert diversity.manifold_metrics(real, generated, k=1) == {
        "precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_the_definitions_point_by_point(k):
    g = torch.Generator().manual_seed(k)
    real = torch.randn(40, 3, generator=g, dtype=torch.float64)
    generated = 0.7 * torch.randn(30, 3, generator=g, dtype=torch.float64) + 0.4
    got = diversity.manifold_metrics(real, generated, k=k)
    want = brute_force(real.tolist(), generated.tolist(), k)
    assert got == pytest.approx(want, abs=1e-12)


def test_identical_sets_and_a_dropped_mode():
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(300, 4, generator=g), torch.randn(300, 4, generator=g) + 20.0])
    same = diversity.manifold_metrics(real, real, k=5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["density"] == pytest.approx(6 / 5)
    # a model that generates only the first mode: realistic (precision near 1) but half the data is missed
    one_mode = torch.randn(600, 4, generator=g)
    dropped = diversity.manifold_metrics(real, one_mode, k=5)
    assert dropped["precision"] > 0.9 and dropped["recall"] < 0.55 and dropped["coverage"] < 0.55
    both = diversity.manifold_metrics(real, torch.cat([torch.randn(300, 4, generator=g),
                                                       torch.randn(300, 4, generator=g) + 20.0]), k=5)
    assert both["recall"] > 0.9 and both["coverage"] > 0.9 and 0.7 < both["density"] < 1.3


def test_bad_arguments_are_refused_with_their_name():
    with pytest.raises(ValueError, match="feature matrices"):
        diversity.manifold_metrics(torch.zeros(10, 3), torch.zeros(10, 4))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        diversity.manifold_metrics(torch.zeros(10, 3), torch.zeros(10, 3), k=0)
    with pytest.raises(ValueError, match="more than k samples"):
        diversity.manifold_metrics(torch.zeros(5, 3), torch.zeros(10, 3), k=5)


def test_class_shares_count_argmax_and_confident_calls():
    images = torch.tensor([[10.0, 0.0, 0.0],   # class 0, confident
                           [1.0, 0.8, 0.0],    # class 0, not confident
                           [0.0, 10.0, 0.0],   # class 1, confident
                           [0.0, 0.0, 10.0]])  # class 2, confident
    shares = diversity.class_shares(FixedLogits(), images.reshape(4, 1, 1, 3), num_classes=3, batch_size=3)
    assert shares.argmax.tolist() == [0.5, 0.25, 0.25]
    assert shares.confident.tolist() == [0.25, 0.25, 0.25]
    reference = diversity.label_shares(torch.tensor([0, 1, 2, 2]), 3)
    assert reference.tolist() == [0.25, 0.25, 0.5]
    assert diversity.total_variation(shares.argmax, reference) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="gives 3 classes, num_classes is 10"):
        diversity.class_shares(FixedLogits(), images.reshape(4, 1, 1, 3), num_classes=10)
    with pytest.raises(ValueError, match="threshold"):
        diversity.class_shares(FixedLogits(), images.reshape(4, 1, 1, 3), num_classes=3, threshold=1.5)
