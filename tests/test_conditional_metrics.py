"""Metrics of class-conditional samples (robust_diffusion.training.conditional_metrics): accuracy per requested
class and per-class Frechet distance, against hand-computed cases."""

import math

import pytest
import torch

from conftest import FixedLogits

from robust_diffusion.training import conditional_metrics as cm
from robust_diffusion.training.metrics import frechet_distance


def one_hot_images(classes):
    return torch.nn.functional.one_hot(torch.tensor(classes), 3).float().reshape(-1, 1, 1, 3)


def test_accuracy_counts_the_samples_judged_as_requested():
    # requested 0 0 0 0 1 1 ; judged 0 0 1 2 1 1 -> class 0: 2/4, class 1: 2/2, class 2 not requested
    samples = one_hot_images([0, 0, 1, 2, 1, 1])
    result = cm.conditional_accuracy(FixedLogits(), samples, torch.tensor([0, 0, 0, 0, 1, 1]), 3, batch_size=4)
    assert result.per_class[:2].tolist() == [0.5, 1.0]
    assert math.isnan(result.per_class[2])
    assert result.mean == pytest.approx(0.75)  # the mean over requested classes, not over samples (4/6)
    assert result.counts.tolist() == [4, 2, 0]


def test_requested_labels_are_class_balanced():
    assert cm.requested_labels(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="per_class"):
        cm.requested_labels(3, 0)


def test_class_frechet_distances_compare_each_class_with_its_own_images():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 4, generator=generator, dtype=torch.float64)
    labels = torch.arange(4).repeat_interleave(10)
    reference = torch.randn(30, 4, generator=generator, dtype=torch.float64) + 1
    reference_labels = torch.tensor([0] * 10 + [1] * 19 + [3])  # class 2 absent, class 3 has one image
    distances = cm.class_frechet_distances(features, labels, reference, reference_labels, 4)
    assert distances[0].item() == pytest.approx(frechet_distance(features[:10], reference[:10]))
    assert distances[1].item() == pytest.approx(frechet_distance(features[10:20], reference[10:29]))
    assert math.isnan(distances[2]) and math.isnan(distances[3])


def test_bad_arguments_name_themselves():
    samples = one_hot_images([0, 1])
    with pytest.raises(ValueError, match="requested must be"):
        cm.conditional_accuracy(FixedLogits(), samples, torch.tensor([0]), 3)
    with pytest.raises(ValueError, match="requested must lie in"):
        cm.conditional_accuracy(FixedLogits(), samples, torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="samples must be"):
        cm.conditional_accuracy(FixedLogits(), samples[:0], torch.tensor([], dtype=torch.long), 3)
    with pytest.raises(ValueError, match="reference_labels must be"):
        cm.class_frechet_distances(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.zeros(4, 2),
                                   torch.zeros(4), 2)
