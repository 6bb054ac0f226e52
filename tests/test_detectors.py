"""Tests for robust_diffusion.training.detectors: hybrids, the two detectors, the held-out split, the calls file."""

import ast
import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from robust_diffusion.training import metrics
from robust_diffusion.training.data import contaminate, fashion_mnist_root, load_fashion_mnist
from robust_diffusion.training.detectors import (HYBRID_STYLES, contaminant_probability, count_shared,
                                                 hybrid_styles, make_hybrid_set, make_hybrids, region_mask,
                                                 silhouette_mask, train_detectors, write_calls)
from robust_diffusion.training.experiment import load_experiment_data

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "cifar10_contaminated.py"
HAS_FASHION_MNIST = (fashion_mnist_root() / "train-images-idx3-ubyte.gz").is_file()

pytestmark = pytest.mark.usefixtures("one_thread")


def _garments(n, seed, size=12, channels=1):
    """Bright noisy rectangles ("garments") of random size and place on a background of exactly -1."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.full((n, channels, size, size), -1.0)
    for i in range(n):
        top, left = torch.randint(0, 4, (2,), generator=generator).tolist()
        height, width = torch.randint(5, 9, (2,), generator=generator).tolist()
        images[i, :, top:top + height, left:left + width] = 0.2 + 0.1 * torch.randn(channels, height, width,
                                                                                    generator=generator)
    return images.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------- hybrids
def test_silhouette_hybrids_put_noise_inside_the_outline_and_keep_the_background():
    images = _garments(20, seed=0, channels=3)
    images[0, 1, 0, 0] = 0.5  # one channel off the background: the pixel is foreground
    mask = silhouette_mask(images)
    assert mask.shape == (20, 1, 12, 12) and mask.dtype == torch.bool
    assert mask[0, 0, 0, 0] and 0 < mask.float().mean() < 1
    hybrids = make_hybrids(images, "silhouette", torch.Generator().manual_seed(1))
    assert hybrids.shape == images.shape and hybrids.dtype == torch.float32
    background = ~mask.expand_as(images)
    assert torch.equal(hybrids[background], images[background])  # the background is kept exactly
    inside = hybrids[~background]
    assert inside.min() >= -1 and inside.max() <= 1 and (inside != images[~background]).all()
    assert inside.std() > 0.5  # uniform noise in [-1, 1] (std 0.577), not the garment (std 0.1)
    # Deterministic with the generator's state; another seed gives other noise.
    assert torch.equal(hybrids, make_hybrids(images, "silhouette", torch.Generator().manual_seed(1)))
    assert not torch.equal(hybrids, make_hybrids(images, "silhouette", torch.Generator().manual_seed(2)))


def test_region_mask_is_a_random_half_or_quarter():
    masks = region_mask(400, 12, 8, torch.Generator().manual_seed(0))
    assert masks.shape == (400, 1, 12, 8) and masks.dtype == torch.bool
    seen = set()
    for mask in masks[:, 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert mask.sum() == len(rows) * len(cols)  # a rectangle
        assert (len(rows), len(cols)) in ((6, 8), (12, 4), (6, 4))  # a half or a quarter
        assert rows[0] in (0, 6) and cols[0] in (0, 4)
        seen.add((rows[0].item(), len(rows), cols[0].item(), len(cols)))
    assert len(seen) == 8  # all four halves and all four quarters occur
    assert torch.equal(masks, region_mask(400, 12, 8, torch.Generator().manual_seed(0)))


def test_partial_hybrids_replace_a_half_or_quarter_by_noise():
    images = torch.full((50, 1, 8, 8), 0.25)  # no background: every replaced pixel is noise
    hybrids = make_hybrids(images, "partial", torch.Generator().manual_seed(3))
    changed = hybrids != images
    assert set(changed.flatten(1).sum(1).tolist()) <= {32, 16}
    assert hybrids.min() >= -1 and hybrids.max() <= 1
    assert torch.equal(hybrids, make_hybrids(images, "partial", torch.Generator().manual_seed(3)))


def test_hybrids_of_the_gaussian_and_dataset_kinds():
    images = _garments(16, seed=1)
    mask = silhouette_mask(images)
    noisy = make_hybrids(images, "silhouette", torch.Generator().manual_seed(0), kind="gaussian", noise_std=0.5)
    assert torch.equal(noisy[~mask], images[~mask])
    difference = (noisy - images)[mask]
    assert difference.std().item() == pytest.approx(0.5, rel=0.15)  # the image plus N(0, 0.5^2), not clipped
    contaminants = torch.linspace(-0.9, 0.9, 3).view(3, 1, 1, 1).expand(3, 1, 12, 12).contiguous()
    pasted = make_hybrids(images, "partial", torch.Generator().manual_seed(0), kind="dataset",
                          contaminants=contaminants)
    for hybrid, image in zip(pasted, images):
        replaced = hybrid != image
        assert replaced.sum() in (72, 36)  # half or a quarter of 12x12 (a garment pixel may match by chance: none do)
        assert any(torch.equal(hybrid[replaced], c[replaced]) for c in contaminants)  # one contaminant's pixels
    with pytest.raises(ValueError, match="silhouette hybrids need a noise contaminant"):
        make_hybrids(images, "silhouette", torch.Generator(), kind="dataset", contaminants=contaminants)
    with pytest.raises(ValueError, match="kind 'dataset' needs contaminants"):
        make_hybrids(images, "partial", torch.Generator(), kind="dataset")
    with pytest.raises(ValueError, match="unknown hybrid style 'half'"):
        make_hybrids(images, "half", torch.Generator())
    with pytest.raises(ValueError, match=r"images must be a float tensor \[N, C, H, W\]"):
        make_hybrids(images[0], "partial", torch.Generator())


def test_hybrid_set_shares_the_styles_out_evenly_and_deterministically():
    images = _garments(21, seed=2)
    hybrids, style_index = make_hybrid_set(images, HYBRID_STYLES, torch.Generator().manual_seed(5))
    assert hybrids.shape == images.shape and torch.bincount(style_index).tolist() == [11, 10]
    background = ~silhouette_mask(images)
    silhouettes = style_index == 0
    assert torch.equal(hybrids[silhouettes][background[silhouettes]], images[silhouettes][background[silhouettes]])
    again, again_index = make_hybrid_set(images, HYBRID_STYLES, torch.Generator().manual_seed(5))
    assert torch.equal(hybrids, again) and torch.equal(style_index, again_index)
    assert torch.equal(images, _garments(21, seed=2))  # the input is not modified


def test_hybrid_styles_per_dataset_and_kind():
    assert hybrid_styles("fashion-mnist", "noise") == ("silhouette", "partial")
    assert hybrid_styles("fashion-mnist", "gaussian") == ("silhouette", "partial")
    assert hybrid_styles("fashion-mnist", "dataset") == ("partial",)
    assert hybrid_styles("cifar10", "noise") == ("partial",)


# ---------------------------------------------------------------------------------------------- detectors
def test_train_detectors_measures_recall_on_hybrids_and_caches_under_new_names(tmp_path, monkeypatch):
    data = contaminate(_garments(200, seed=0), 0.5, "noise", seed=0)
    trained = train_detectors(data, seed=0, epochs=3, cache_dir=tmp_path, progress=False)
    assert (trained.num_train, trained.num_test) == (160, 40)
    assert trained.num_hybrids == int((~data.is_contaminated[160:]).sum())
    assert trained.styles == HYBRID_STYLES
    assert trained.pure.test_accuracy >= 0.9 and trained.hybrid.test_accuracy >= 0.9
    assert set(trained.recall) == {"pure", "hybrid"}
    assert set(trained.recall["pure"]) == {"silhouette", "partial", "all"}
    # The pure-contaminant detector misses most hybrids; the hybrid-aware one catches most.
    assert trained.recall["hybrid"]["all"] >= 0.7 > trained.recall["pure"]["all"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["detector_noise_heldout.safetensors",
                                                          "detector_noise_hybrid.safetensors"]

    def no_training(*args, **kwargs):
        raise AssertionError("the cached detectors should have been loaded")

    monkeypatch.setattr(metrics, "_fit", no_training)
    cached = train_detectors(data, seed=0, epochs=3, cache_dir=tmp_path, progress=False)
    assert cached.recall == trained.recall and cached.pure.test_accuracy == trained.pure.test_accuracy


def test_train_detectors_for_the_dataset_kind_pastes_contaminant_pixels():
    clean = _garments(60, seed=3)
    others = -_garments(60, seed=4)  # "another distribution": dark shapes on a white background
    data = contaminate(clean, 0.5, "dataset", seed=0, contaminant_images=others)
    trained = train_detectors(data, ("partial",), seed=0, epochs=1, progress=False)
    assert trained.styles == ("partial",) and set(trained.recall["pure"]) == {"partial", "all"}
    assert all(0 <= r <= 1 for r in trained.recall["hybrid"].values())


def test_contaminant_probability_matches_contaminant_fraction_and_the_calls_file(tmp_path):
    detector = metrics.FeatureClassifier(1, 2).eval()
    with torch.no_grad():
        detector.head.bias.copy_(torch.tensor([0.0, 0.02]))  # probabilities near 0.5: both calls occur
    samples = torch.rand(40, 1, 12, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1
    p = contaminant_probability(detector, samples)
    assert p.shape == (40,) and p.dtype == torch.float32
    assert (p > 0.5).float().mean().item() == metrics.contaminant_fraction(detector, samples)
    q = 1 - p
    path = write_calls(tmp_path / "detector_calls.csv", {"contaminant": p, "contaminant_hybrid": q})
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["sample", "p_contaminant", "p_contaminant_hybrid", "call_contaminant",
                             "call_contaminant_hybrid"]
    assert [int(r["sample"]) for r in rows] == list(range(40))
    np.testing.assert_allclose([float(r["p_contaminant"]) for r in rows], p.numpy(), atol=1e-6)
    assert [int(r["call_contaminant"]) for r in rows] == (p > 0.5).int().tolist()
    assert [int(r["call_contaminant_hybrid"]) for r in rows] == (q > 0.5).int().tolist()
    with pytest.raises(ValueError, match="detector must be a 2-class"):
        contaminant_probability(metrics.FeatureClassifier(1, 10), samples)
    with pytest.raises(ValueError, match="the same number of samples"):
        write_calls(tmp_path / "bad.csv", {"a": p, "b": p[:3]})


# ---------------------------------------------------------------------------------------------- held-out images
def test_from_end_takes_the_last_images_of_the_split(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (50, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "images.npy", array)
    first = load_experiment_data("folder", 0.0, root=tmp_path / "images.npy", num_train=20)
    last = load_experiment_data("folder", 0.5, root=tmp_path / "images.npy", num_train=20, from_end=True)
    assert first.train_indices.tolist() == list(range(20)) and last.train_indices.tolist() == list(range(30, 50))
    everything = load_experiment_data("folder", 0.0, root=tmp_path / "images.npy")
    clean = ~last.train.is_contaminated
    assert torch.equal(last.train.images[clean], everything.train.images[30:][clean])
    assert "20 training images (the last of its 50)" in last.description
    assert count_shared(last.train_indices, 20, 30) == 0
    assert count_shared(last.train_indices, 20, 35) == 5
    assert count_shared(last.train_indices, None) == 20  # a model trained on the whole split shares them all


def _example_presets():
    """The example's PRESETS, read from its source without running it."""
    tree = ast.parse(EXAMPLE.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "PRESETS")
    return eval(compile(ast.Expression(node.value), str(EXAMPLE), "eval"), {})


@pytest.mark.parametrize("dataset, total", [("fashion-mnist", 60000), ("cifar10", 50000)])
def test_example_presets_give_the_detectors_held_out_images(dataset, total):
    """Every preset that does not train on the whole split leaves the detectors images no other network sees."""
    for (name, preset), settings in _example_presets().items():
        if name != dataset:
            continue
        indices = torch.arange(total - settings["detector_train"], total)  # load_experiment_data(from_end=True)
        shared = count_shared(indices, settings["num_train"], settings["classifier_train"])
        if settings["num_train"] is None or settings["classifier_train"] is None:
            assert preset == "full" and shared == settings["detector_train"]  # reported in results.md
        else:
            assert shared == 0, (dataset, preset)


@pytest.mark.skipif(not HAS_FASHION_MNIST, reason="dataset-fashion-mnist is not installed")
def test_detector_images_are_disjoint_from_the_diffusion_and_classifier_images():
    """The smoke preset's draws, as the example makes them: the detectors' images are the split's last ones, none
    of them among the diffusion model's or the classifier's."""
    diffusion = load_experiment_data("fashion-mnist", 0.3, num_train=128)
    detector = load_experiment_data("fashion-mnist", 0.5, num_train=128, seed=0, from_end=True)
    classifier_indices = torch.arange(512)  # load_data(0.0, num_train=classifier_train): the first ones
    assert not torch.isin(detector.train_indices, diffusion.train_indices).any()
    assert not torch.isin(detector.train_indices, classifier_indices).any()
    assert detector.train_indices.tolist() == list(range(60000 - 128, 60000))
    train = load_fashion_mnist("train", pad_to=None)
    clean = ~detector.train.is_contaminated
    assert torch.equal(detector.train.images[clean], train.images[-128:][clean])
