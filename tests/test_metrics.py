"""Tests for robust_diffusion.training.metrics: Frechet distance, AUROC, sliced Wasserstein, MMD, classifiers."""

import itertools
import sys
import types

import pytest
import torch

import robust_diffusion.training.metrics as metrics
from robust_diffusion.training.data import contaminate
from robust_diffusion.training.metrics import (FeatureClassifier, auroc, classifier_accuracy, contaminant_fraction,
                                      extract_features, frechet_distance, frechet_distance_from_moments, mmd_rbf,
                                      sliced_wasserstein, train_classifier, train_contaminant_detector)


def _random_spd(dim: int, generator: torch.Generator, rank: int = None) -> torch.Tensor:
    factor = torch.randn(dim, rank or dim, generator=generator, dtype=torch.float64)
    return factor @ factor.T + (0 if rank else 0.1) * torch.eye(dim, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- Frechet distance
def test_frechet_distance_closed_form_for_diagonal_gaussians():
    mu_a, mu_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = 1 + 0 + 4 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0  # ||dmu||^2 + sum (sqrt(a) - sqrt(b))^2
    actual = frechet_distance_from_moments(mu_a, torch.diag(var_a), mu_b, torch.diag(var_b))
    assert actual == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_for_full_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    generator = torch.Generator().manual_seed(0)
    cov_a, cov_b = _random_spd(6, generator), _random_spd(6, generator)
    mu_a, mu_b = torch.randn(6, generator=generator, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    cross = linalg.sqrtm((cov_a @ cov_b).numpy()).real
    expected = ((mu_a - mu_b) ** 2).sum().item() + (cov_a + cov_b).trace().item() - 2 * cross.trace()
    assert frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_samples_converges_to_the_population_value():
    generator = torch.Generator().manual_seed(1)
    cov_a, cov_b = _random_spd(3, generator), _random_spd(3, generator)
    mu_b = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    a = torch.randn(40000, 3, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(cov_a).T
    b = torch.randn(40000, 3, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(cov_b).T + mu_b
    expected = frechet_distance_from_moments(torch.zeros(3), cov_a, mu_b, cov_b)
    assert frechet_distance(a.float(), b.float()) == pytest.approx(expected, rel=0.03)


def test_frechet_distance_is_zero_for_identical_sets_and_handles_singular_covariances():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(50, 8, generator=generator)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    few = torch.randn(5, 64, generator=generator)  # rank-4 covariance in 64 dimensions
    distance = frechet_distance(few, torch.randn(7, 64, generator=generator))
    assert distance > 0 and distance == distance and distance < float("inf")
    low_rank = _random_spd(5, generator, rank=2)
    same = frechet_distance_from_moments(torch.zeros(5), low_rank, torch.zeros(5), low_rank)
    assert same == pytest.approx(0, abs=1e-9)


def test_frechet_distance_errors():
    with pytest.raises(ValueError, match="features must be .* with the same F"):
        frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(4, 3))


# ---------------------------------------------------------------------------------------------- AUROC
@pytest.mark.parametrize("scores, labels, expected", [
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),    # 3 of the 4 positive/negative pairs ordered correctly
    ([1.0, 1.0, 1.0, 1.0], [0, 1, 0, 1], 0.5),      # all tied: every pair counts 1/2
    ([0.5, 0.5, 0.9], [0, 1, 1], 0.75),             # pairs (0.5 vs 0.5) -> 1/2, (0.9 vs 0.5) -> 1
    ([0.2, 0.3, 0.7, 0.9], [0, 0, 1, 1], 1.0),
    ([0.2, 0.3, 0.7, 0.9], [1, 1, 0, 0], 0.0),
    ([3, 1, 2, 2, 5, 1], [1, 0, 1, 0, 1, 0], 17 / 18),  # ties across classes: (2 vs 2) counts 1/2
])
def test_auroc_hand_computed(scores, labels, expected):
    assert auroc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(expected, abs=1e-12)


def test_auroc_matches_pairwise_definition_with_many_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=generator).float()
    labels = torch.rand(60, generator=generator) < 0.3
    pos, neg = scores[labels], scores[~labels]
    expected = sum(float(p > n) + 0.5 * float(p == n) for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))
    assert auroc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_auroc_errors():
    with pytest.raises(ValueError, match="needs both classes, got 0 positives and 3 negatives"):
        auroc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="labels must be binary"):
        auroc(torch.tensor([0.1, 0.2]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="same number of elements"):
        auroc(torch.tensor([0.1, 0.2]), torch.tensor([0, 1, 1]))


# ---------------------------------------------------------------------------------------------- toy metrics
def test_sliced_wasserstein_one_dimensional_is_exact():
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(37, 1, generator=generator), torch.rand(52, 1, generator=generator) * 3
    expected = stats.wasserstein_distance(x[:, 0].numpy(), y[:, 0].numpy())
    assert sliced_wasserstein(x, y, n_projections=3, p=1, generator=generator) == pytest.approx(expected, rel=1e-9)
    x2 = torch.randn(40, 1, generator=generator)
    w2 = (x2[:, 0].sort().values - y[:40, 0].sort().values).square().mean().sqrt().item()
    assert sliced_wasserstein(x2, y[:40], n_projections=2, generator=generator) == pytest.approx(w2, rel=1e-6)


def test_sliced_wasserstein_of_a_shift_in_two_dimensions():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(500, 2, generator=generator)
    shift = torch.tensor([3.0, 4.0])
    assert sliced_wasserstein(x, x.clone()) == 0.0
    # Projected on direction theta, the shift is <c, theta>; E[<c, theta>^2] = |c|^2 / 2 in 2-D.
    distance = sliced_wasserstein(x, x + shift, n_projections=4000, generator=generator)
    assert distance == pytest.approx(5 / 2 ** 0.5, rel=0.03)
    with pytest.raises(ValueError, match=r"point clouds, got \(500, 2\) and \(3,\)"):
        sliced_wasserstein(x, torch.zeros(3))


def test_mmd_rbf_matches_the_definition_and_separates_distributions():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    y = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    bandwidths = (0.5, 1.0)

    def k(a, b):
        return sum(torch.exp(-((a - b) ** 2).sum() / (2 * h * h)) for h in bandwidths).item()

    xx = sum(k(x[i], x[j]) for i in range(4) for j in range(4) if i != j) / 12
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(4) for j in range(5)) / 20
    assert mmd_rbf(x, y, bandwidths) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
    same = mmd_rbf(torch.randn(300, 2, generator=generator), torch.randn(300, 2, generator=generator))
    shifted = mmd_rbf(torch.randn(300, 2, generator=generator), torch.randn(300, 2, generator=generator) + 1)
    assert abs(same) < 0.05 < shifted
    with pytest.raises(ValueError, match="at least 2 points"):
        mmd_rbf(torch.zeros(1, 2), torch.zeros(3, 2))


# ---------------------------------------------------------------------------------------------- classifiers
def _two_class_images(n: int, seed: int):
    """Class 0 is bright on the left half, class 1 on the right half, plus noise: easily separable."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = 0.3 * torch.randn(n, 1, 12, 12, generator=generator) - 0.5
    images[labels == 0, :, :, :6] += 1.0
    images[labels == 1, :, :, 6:] += 1.0
    return images, labels


def test_train_classifier_learns_is_seeded_and_keeps_global_rng(tmp_path, monkeypatch):
    images, labels = _two_class_images(192, seed=0)
    test_images, test_labels = _two_class_images(64, seed=1)
    rng_before = torch.random.get_rng_state()
    kwargs = dict(test_images=test_images, test_labels=test_labels, epochs=2, batch_size=32, seed=3,
                  progress=False)
    first = train_classifier(images, labels, cache_path=tmp_path / "clf.pt", **kwargs)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert first.test_accuracy >= 0.95
    assert first.test_accuracy == classifier_accuracy(first.model, test_images, test_labels)
    assert isinstance(first.model, FeatureClassifier) and not first.model.training
    features = extract_features(first.model, test_images)
    assert features.shape == (64, FeatureClassifier.feature_dim) and features.dtype == torch.float32

    again = train_classifier(images, labels, **kwargs)  # same seed, no cache: identical weights
    for (name, a), b in zip(first.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(metrics, "_fit", no_training)
    cached = train_classifier(images, labels, cache_path=tmp_path / "clf.pt", **kwargs)
    assert cached.test_accuracy == first.test_accuracy
    with pytest.raises(ValueError, match=r"cached at .*clf.pt was trained with .* delete the file"):
        train_classifier(images, labels, cache_path=tmp_path / "clf.pt", **{**kwargs, "epochs": 3})


def test_contaminant_detector_flags_noise_images():
    clean, _ = _two_class_images(160, seed=4)
    clean = clean.clamp(-1, 1)
    data = contaminate(clean, 0.25, "noise", seed=0)
    detector = train_contaminant_detector(data.images, data.is_contaminated, epochs=10, batch_size=32, seed=0,
                                          progress=False).model
    held_out_clean = _two_class_images(50, seed=5)[0].clamp(-1, 1)
    held_out_noise = torch.rand(50, 1, 12, 12, generator=torch.Generator().manual_seed(6)) * 2 - 1
    assert contaminant_fraction(detector, held_out_noise) >= 0.9
    assert contaminant_fraction(detector, held_out_clean) <= 0.1
    mixed = torch.cat([held_out_clean[:30], held_out_noise[:10]])
    assert contaminant_fraction(detector, mixed) == pytest.approx(0.25, abs=0.05)


def test_contaminant_detector_errors():
    with pytest.raises(ValueError, match="must contain both clean and contaminated samples"):
        train_contaminant_detector(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="detector must be a 2-class"):
        contaminant_fraction(FeatureClassifier(1, 10), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"images must be \[N, C, H, W\] and labels \[N\]"):
        train_classifier(torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.long))


class _FakeFrechetInceptionDistance:
    """Stands in for torchmetrics' FrechetInceptionDistance: records what inception_fid feeds it."""

    instances = []

    def __init__(self, **kwargs):
        self.kwargs, self.updates, self.device = kwargs, [], torch.device("cpu")
        self.instances.append(self)

    def to(self, device):
        self.device = torch.device(device)
        return self

    def update(self, images, real):
        self.updates.append((tuple(images.shape), float(images.min()), float(images.max()), real))

    def compute(self):
        return torch.tensor(1.25)


@pytest.fixture
def inception_packages(tmp_path, monkeypatch):
    """Stub torchmetrics and torch-fidelity (whether or not they are installed), point torch.hub's cache at an
    empty directory and make any download fail the test; returns the directory the weights would be in."""
    _FakeFrechetInceptionDistance.instances = []
    fid = types.ModuleType("torchmetrics.image.fid")
    fid.FrechetInceptionDistance = _FakeFrechetInceptionDistance
    image = types.ModuleType("torchmetrics.image")
    image.fid = fid
    torchmetrics = types.ModuleType("torchmetrics")
    torchmetrics.image = image
    for name, module in (("torchmetrics", torchmetrics), ("torchmetrics.image", image),
                         ("torchmetrics.image.fid", fid), ("torch_fidelity", types.ModuleType("torch_fidelity"))):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("inception_fid tried to download weights"))
    return tmp_path / "hub" / "checkpoints"


def test_inception_fid_never_downloads(tmp_path, monkeypatch, inception_packages):
    """Without the Inception weights in torch.hub's cache there is no Inception FID, and no download, even with
    torchmetrics and torch-fidelity installed (stubbed here, so the weights check itself runs)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("inception_fid tried to download weights"))
    images = torch.rand(4, 1, 28, 28) * 2 - 1
    assert not metrics.inception_weights_available()
    assert metrics.inception_fid(images, images) is None
    assert _FakeFrechetInceptionDistance.instances == []  # the metric (which would download) is never built


def test_inception_fid_with_local_weights(inception_packages):
    inception_packages.mkdir(parents=True)
    (inception_packages / metrics.INCEPTION_WEIGHTS).write_bytes(b"weights")
    assert metrics.inception_weights_available()
    generated, reference = torch.rand(5, 1, 8, 8) * 2 - 1, torch.full((3, 1, 8, 8), -1.0)
    assert metrics.inception_fid(generated, reference, batch_size=2) == 1.25
    [metric] = _FakeFrechetInceptionDistance.instances
    assert metric.kwargs == {"feature": 2048, "normalize": True}
    # Reference first (real), then the generated images, in chunks, as 3-channel images in [0, 1].
    assert [(shape, real) for shape, _, _, real in metric.updates] == [
        ((2, 3, 8, 8), True), ((1, 3, 8, 8), True), ((2, 3, 8, 8), False), ((2, 3, 8, 8), False),
        ((1, 3, 8, 8), False)]
    assert all(0.0 <= low <= high <= 1.0 for _, low, high, _ in metric.updates)
    assert metric.updates[0][1:3] == (0.0, 0.0)  # -1 maps to 0


@pytest.mark.parametrize("missing", ["torch_fidelity", "torchmetrics.image.fid"])
def test_inception_fid_needs_both_packages(inception_packages, monkeypatch, missing):
    inception_packages.mkdir(parents=True)
    (inception_packages / metrics.INCEPTION_WEIGHTS).write_bytes(b"weights")
    monkeypatch.setitem(sys.modules, missing, None)  # makes the import fail
    assert not metrics.inception_weights_available()
    assert metrics.inception_fid(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)) is None
