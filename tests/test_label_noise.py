"""Label noise as an experiment knob (robust_diffusion.training.label_noise)."""

import pytest
import torch

from robust_diffusion.training.data import FASHION_MNIST_ROOT
from robust_diffusion.training.experiment import load_experiment_data
from robust_diffusion.training.label_noise import CONFUSABLE, flip_labels

FASHION_TEST_IMAGES = FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz"


def test_symmetric_noise_flips_the_rate_to_other_classes_uniformly():
    labels = torch.arange(10).repeat(4000)  # 40,000 labels, balanced
    noisy = flip_labels(labels, 0.4, "symmetric", num_classes=10, seed=3)
    assert torch.equal(noisy.flipped, noisy.labels != labels)
    assert noisy.flipped.double().mean().item() == pytest.approx(0.4, abs=0.01)
    moved = noisy.labels[noisy.flipped]
    counts = torch.bincount((moved - labels[noisy.flipped]) % 10, minlength=10)
    assert counts[0] == 0  # never its own class
    assert (counts[1:].double() / counts[1:].sum()).sub(1 / 9).abs().max() < 0.01  # the other nine alike
    again = flip_labels(labels, 0.4, "symmetric", num_classes=10, seed=3)
    assert torch.equal(again.labels, noisy.labels)  # reproducible
    assert not torch.equal(flip_labels(labels, 0.4, "symmetric", num_classes=10, seed=4).labels, noisy.labels)
    assert not flip_labels(labels, 0.0, "symmetric", num_classes=10).flipped.any()


@pytest.mark.parametrize("dataset", sorted(CONFUSABLE))
def test_asymmetric_noise_flips_only_confusable_classes_to_their_partner(dataset):
    labels = torch.arange(10).repeat(2000)
    noisy = flip_labels(labels, 0.3, "asymmetric", num_classes=10, seed=0, dataset=dataset)
    mapping = CONFUSABLE[dataset]
    for source in range(10):
        mine = labels == source
        if source not in mapping:
            assert not noisy.flipped[mine].any()
            continue
        assert noisy.flipped[mine].double().mean().item() == pytest.approx(0.3, abs=0.03)
        assert set(noisy.labels[mine & noisy.flipped].tolist()) == {mapping[source]}


def test_bad_arguments_are_refused_with_their_name():
    labels = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="label noise kind must be one of symmetric, asymmetric"):
        flip_labels(labels, 0.2, "pairs", num_classes=3)
    with pytest.raises(ValueError, match="label noise rate must be a fraction in"):
        flip_labels(labels, 1.0, num_classes=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        flip_labels(labels, 0.2, num_classes=2)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        flip_labels(labels.float(), 0.2, num_classes=3)
    with pytest.raises(ValueError, match="not for 'folder'; use symmetric"):
        flip_labels(labels, 0.2, "asymmetric", num_classes=3, dataset="folder")


@pytest.mark.skipif(not FASHION_TEST_IMAGES.is_file(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_experiment_data_trains_on_noisy_labels_and_keeps_the_truth_for_evaluation():
    data = load_experiment_data("fashion-mnist", 0.0, num_train=500, label_noise=0.2, seed=1)
    clean = load_experiment_data("fashion-mnist", 0.0, num_train=500, seed=1)
    assert torch.equal(data.train_labels, clean.train_labels)  # the truth
    assert torch.equal(data.label_flipped, data.train.labels != data.train_labels)
    assert 0.12 < data.label_flipped.double().mean().item() < 0.28 and "20% symmetric label noise" in data.description
    assert torch.equal(data.train.images, clean.train.images) and clean.label_flipped is None
