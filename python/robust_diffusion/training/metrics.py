"""Offline evaluation metrics for the robustness experiments (docs/DESIGN.md, Evidence).

- :class:`FeatureClassifier` / :func:`train_classifier`: a small CNN trained on the clean dataset; its
  penultimate layer (128 features) is the feature space of :func:`frechet_distance` (an "FID" that needs no
  downloaded Inception weights). Report which network and its test accuracy next to any number it produces.
- :func:`train_contaminant_detector` / :func:`contaminant_fraction`: the fraction of generated samples that
  look like the contaminant, judged by the same CNN architecture trained to tell the clean training images
  from the contaminated ones (the ground truth a :class:`~robust_diffusion.training.data.ContaminatedDataset` keeps).
  It works for every contamination kind alike, noise, noisy images or another dataset.
- :func:`auroc`: area under the ROC curve with ties, e.g. of ``-mean_influence_weight`` as a detector of the
  contaminated training samples.
- :func:`inception_fid`: the standard Inception-v3 FID (torchmetrics), only when its weights are already on
  disk (:func:`inception_weights_available`); nothing is ever downloaded.
- :func:`sliced_wasserstein` and :func:`mmd_rbf` for 2-D toy distributions.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_state, save_state

__all__ = [
    "FeatureClassifier",
    "TrainedClassifier",
    "auroc",
    "classifier_accuracy",
    "contaminant_fraction",
    "extract_features",
    "frechet_distance",
    "frechet_distance_from_moments",
    "inception_fid",
    "inception_weights_available",
    "mmd_rbf",
    "sliced_wasserstein",
    "train_classifier",
    "train_contaminant_detector",
]

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------- classifier
class FeatureClassifier(nn.Module):
    """A small CNN: three conv-GroupNorm-ReLU stages (16, 32, 64 channels; 2x2 max-pooling after the first two),
    adaptive average pooling to 4x4, a 128-unit hidden layer (the features) and a linear head.

    Takes ``[B, C, H, W]`` images in ``[-1, 1]`` with H, W >= 8 (28x28 and 32x32 both work). About 0.16M
    parameters, sized to train on a CPU: the defaults of :func:`train_classifier` (2 epochs, seed 0) on the
    60000 Fashion-MNIST training images (32x32) reach 89.9% test accuracy in about 2.5 minutes on one CPU core.
    """

    feature_dim = 128

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes

        def stage(cin: int, cout: int) -> nn.Sequential:
            # GroupNorm, not BatchNorm: no running statistics, so eval-mode features do not depend on how
            # long the network trained or on batch composition.
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.ReLU())

        self.body = nn.Sequential(stage(in_channels, 16), nn.MaxPool2d(2), stage(16, 32), nn.MaxPool2d(2),
                                  stage(32, 64), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                  nn.Linear(64 * 16, self.feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """The penultimate-layer activations ``[B, 128]``."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.features(x)))


class TrainedClassifier(NamedTuple):
    """A trained :class:`FeatureClassifier` (in eval mode) and its accuracy on the given test set (or None)."""

    model: FeatureClassifier
    test_accuracy: Optional[float]


#: What an evaluation classifier's cache file says it is (training/checkpoint.py's state-file format).
_CLASSIFIER_KIND = "robust_diffusion.training feature classifier"


def train_classifier(images: Tensor, labels: Tensor, *, test_images: Optional[Tensor] = None,
                     test_labels: Optional[Tensor] = None, num_classes: Optional[int] = None, epochs: int = 2,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0, class_balanced: bool = False,
                     cache_path: Optional[PathLike] = None, device: Optional[Union[str, torch.device]] = None,
                     progress: bool = True) -> TrainedClassifier:
    """Train a :class:`FeatureClassifier` with Adam and cross-entropy, reproducibly for a given ``seed``.

    Args:
        images, labels: ``[N, C, H, W]`` in ``[-1, 1]`` and int class labels ``[N]``.
        test_images, test_labels: if given, the returned ``test_accuracy`` is measured on them.
        num_classes: defaults to ``labels.max() + 1``.
        class_balanced: weight the loss by inverse class frequency (for the rare-class contaminant detector).
        cache_path: if the file exists, load the network from it instead of training (after checking it was
            trained with the same settings and number of images; the images themselves are not hashed, so
            use one path per dataset); otherwise train and save it there.
        device: where to train; defaults to ``images.device``.
        progress: show a tqdm bar over the training steps.
    """
    if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"images must be [N, C, H, W] and labels [N] with N > 0, got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    settings: Dict[str, object] = dict(in_channels=images.shape[1], num_classes=num_classes, epochs=epochs,
                                       batch_size=batch_size, lr=lr, seed=seed, class_balanced=class_balanced,
                                       num_train=images.shape[0])
    device = torch.device(device) if device is not None else images.device
    cache_path = Path(cache_path) if cache_path is not None else None
    if cache_path is not None and cache_path.is_file():
        saved = load_state(cache_path, _CLASSIFIER_KIND, 1)
        if saved["settings"] != settings:
            raise ValueError(f"the classifier cached at {cache_path} was trained with {saved['settings']}, "
                             f"but {settings} was asked for; delete the file or pass another cache_path")
        model = FeatureClassifier(images.shape[1], num_classes)
        model.load_state_dict(saved["state_dict"])
        model.to(device)
    else:
        # Seed initial weights and dropout masks without disturbing the caller's global RNG streams.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            model = FeatureClassifier(images.shape[1], num_classes).to(device)
            _fit(model, images, labels, epochs, batch_size, lr, seed, class_balanced, device, progress)
        if cache_path is not None:  # atomically: parallel runs may share the cache
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            save_state({"settings": settings, "state_dict": state}, cache_path, _CLASSIFIER_KIND, 1)
    model.eval()
    accuracy = None
    if test_images is not None and test_labels is not None:
        accuracy = classifier_accuracy(model, test_images, test_labels)
    return TrainedClassifier(model, accuracy)


def _fit(model: FeatureClassifier, images: Tensor, labels: Tensor, epochs: int, batch_size: int, lr: float,
         seed: int, class_balanced: bool, device: torch.device, progress: bool) -> None:
    labels = labels.to(torch.int64)
    weight = None
    if class_balanced:
        counts = torch.bincount(labels, minlength=model.num_classes).to(torch.float32)
        weight = (counts.sum() / (model.num_classes * counts.clamp_min(1))).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs * steps_per_epoch, desc="training classifier", unit="step")
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            batch = order[start:start + batch_size].to(images.device)
            x = images[batch].to(device=device, dtype=torch.float32)
            y = labels[batch].to(device)
            loss = F.cross_entropy(model(x), y, weight=weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    model.eval()


@torch.no_grad()
def _batched(model: nn.Module, images: Tensor, batch_size: int, fn) -> Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = [fn(images[i:i + batch_size].to(device=device, dtype=torch.float32)).cpu()
               for i in range(0, images.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def classifier_accuracy(model: FeatureClassifier, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(images, labels)``."""
    logits = _batched(model, images, batch_size, model)
    return (logits.argmax(1) == labels.cpu()).float().mean().item()


def extract_features(model: FeatureClassifier, images: Tensor, batch_size: int = 512) -> Tensor:
    """Penultimate-layer features ``[N, 128]`` (float32, CPU) of ``images`` in ``[-1, 1]``."""
    return _batched(model, images, batch_size, model.features)


# ---------------------------------------------------------------------------------------------- Frechet distance
def frechet_distance_from_moments(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """Frechet (2-Wasserstein) distance between N(mu_a, cov_a) and N(mu_b, cov_b), in float64:

        ||mu_a - mu_b||^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a^(1/2) cov_b cov_a^(1/2))^(1/2))

    Both square roots are of symmetric PSD matrices, taken by eigen-decomposition with negative round-off
    eigenvalues clamped to 0, so singular covariances (fewer samples than features) are fine.
    """
    mu_a, mu_b = mu_a.to(torch.float64), mu_b.to(torch.float64)
    cov_a, cov_b = _symmetric(cov_a.to(torch.float64)), _symmetric(cov_b.to(torch.float64))
    eigenvalues, eigenvectors = torch.linalg.eigh(cov_a)
    sqrt_a = (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T
    middle = _symmetric(sqrt_a @ cov_b @ sqrt_a)
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2.0 * trace_sqrt
    return max(distance.item(), 0.0)  # round-off can make identical distributions slightly negative


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted (mean, unbiased covariance) to two feature sets ``[N, F]``."""
    if features_a.dim() != 2 or features_b.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"features must be [N, F] matrices with the same F, got {tuple(features_a.shape)} "
                         f"and {tuple(features_b.shape)}")
    if features_a.shape[0] < 2 or features_b.shape[0] < 2:
        raise ValueError("each feature set needs at least 2 samples to estimate a covariance")
    a, b = features_a.to(torch.float64), features_b.to(torch.float64)
    return frechet_distance_from_moments(a.mean(0), torch.cov(a.T).reshape(a.shape[1], a.shape[1]),
                                         b.mean(0), torch.cov(b.T).reshape(b.shape[1], b.shape[1]))


def _symmetric(matrix: Tensor) -> Tensor:
    return 0.5 * (matrix + matrix.T)


# ---------------------------------------------------------------------------------------------- contaminant fraction
def train_contaminant_detector(images: Tensor, is_contaminated: Tensor, **train_kwargs) -> TrainedClassifier:
    """Train a :class:`FeatureClassifier` to tell contaminants (class 1) from clean images (class 0).

    Pass a contaminated training set's ``images`` and ``is_contaminated`` (at some p > 0; the detector for
    a p = 0 model comes from a set with the same contamination kind). The loss is class-balanced, so the
    0.5 threshold of :func:`contaminant_fraction` is not biased toward the majority. Keyword arguments go
    to :func:`train_classifier` (hold out some samples as ``test_images``/``test_labels`` to report the
    detector's accuracy).
    """
    labels = is_contaminated.to(torch.int64)
    if labels.min() == labels.max():
        raise ValueError("is_contaminated must contain both clean and contaminated samples to train a detector")
    train_kwargs.setdefault("class_balanced", True)
    if train_kwargs.get("test_labels") is not None:
        train_kwargs["test_labels"] = train_kwargs["test_labels"].to(torch.int64)
    return train_classifier(images, labels, num_classes=2, **train_kwargs)


def contaminant_fraction(detector: FeatureClassifier, samples: Tensor, threshold: float = 0.5,
                         batch_size: int = 512) -> float:
    """Fraction of ``samples`` whose detector probability of being a contaminant exceeds ``threshold``.

    The detector (from :func:`train_contaminant_detector`) only knows clean vs contaminant training images;
    generated samples unlike both (blurry, broken) get an arbitrary call, so read this next to the Frechet
    distance, not instead of it.
    """
    if detector.num_classes != 2:
        raise ValueError(f"detector must be a 2-class (clean, contaminant) classifier, got {detector.num_classes} "
                         f"classes; build it with train_contaminant_detector")
    if samples.shape[0] == 0:
        raise ValueError("samples is empty")
    probability = _batched(detector, samples, batch_size, lambda x: detector(x).softmax(1)[:, 1])
    return (probability > threshold).float().mean().item()


# ---------------------------------------------------------------------------------------------- AUROC
def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of ``scores`` (higher = more likely positive) for binary ``labels``.

    Computed as the Mann-Whitney statistic with mid-ranks, so a tied positive/negative pair counts 1/2:
    ``P(score_pos > score_neg) + 0.5 P(score_pos = score_neg)``. To score "low average influence weight"
    as a detector of contaminated samples, pass ``scores = -mean_weight``, ``labels = is_contaminated``.
    """
    scores = torch.as_tensor(scores).detach().flatten().to(device="cpu", dtype=torch.float64)
    labels = torch.as_tensor(labels).detach().flatten().cpu()
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same number of elements, got {scores.numel()} "
                         f"and {labels.numel()}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if not ((labels == 0) | (labels == 1)).all():
        raise ValueError("labels must be binary (0/1 or bool)")
    positive = labels.bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs both classes, got {n_pos} positives and {n_neg} negatives")
    sorted_scores, order = scores.sort()
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)  # 1-based rank of each tie group's last member
    mid_ranks = torch.repeat_interleave(ends - (counts.to(torch.float64) - 1) / 2, counts)
    ranks = torch.empty_like(mid_ranks).scatter_(0, order, mid_ranks)
    rank_sum = ranks[positive].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


# ---------------------------------------------------------------------------------------------- 2-D toy metrics
def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 256, generator: Optional[torch.Generator] = None,
                       p: int = 2) -> float:
    """Sliced p-Wasserstein distance between point clouds ``x [N, D]`` and ``y [M, D]`` (N, M may differ).

    ``SW_p = (mean over random unit directions theta of W_p^p(<x, theta>, <y, theta>))^(1/p)``, each 1-D
    ``W_p`` exact between the two empirical distributions (integral over merged quantile levels).
    ``generator`` (CPU) fixes the directions. Computed in float64.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be [N, D] and [M, D] point clouds, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError("x and y must be non-empty")
    if n_projections < 1 or p < 1:
        raise ValueError(f"n_projections and p must be >= 1, got {n_projections} and {p}")
    x, y = x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)
    directions = torch.randn(x.shape[1], n_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    px = (x @ directions).sort(dim=0).values  # [N, P] sorted projections = quantile functions
    py = (y @ directions).sort(dim=0).values
    n, m = px.shape[0], py.shape[0]
    # Both empirical quantile functions are constant on the intervals between the merged levels i/n and j/m.
    levels = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                        torch.arange(1, m + 1, dtype=torch.float64) / m]).unique()
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    midpoints = levels - widths / 2
    index_x = torch.clamp((midpoints * n).floor().long(), max=n - 1)
    index_y = torch.clamp((midpoints * m).floor().long(), max=m - 1)
    cost = (px[index_x] - py[index_y]).abs().pow(p)  # [L, P]
    return (widths @ cost).mean().pow(1.0 / p).item()


def mmd_rbf(x: Tensor, y: Tensor, bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0)) -> float:
    """Unbiased squared MMD between ``x [N, D]`` and ``y [M, D]`` with the kernel
    ``sum_h exp(-||a - b||^2 / (2 h^2))`` over ``bandwidths`` (a multi-scale mixture needs no tuning).
    Can be slightly negative when the distributions match. Needs N, M >= 2. Computed in float64.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be [N, D] and [M, D] point clouds, got {tuple(x.shape)} and {tuple(y.shape)}")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd_rbf needs at least 2 points in each set, got {n} and {m}")
    x, y = x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        squared = torch.cdist(a, b).square()
        return sum(torch.exp(-squared / (2.0 * h * h)) for h in bandwidths)

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return (within_x + within_y - 2.0 * k_xy.mean()).item()


#: torch-fidelity's Inception-v3 weights (the ones torchmetrics' FID uses), as torch.hub caches them.
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def inception_weights_available() -> bool:
    """Whether :func:`inception_fid` can run offline: torchmetrics and torch-fidelity are installed and the
    Inception weights are already in torch.hub's cache (``<torch.hub.get_dir()>/checkpoints``)."""
    try:
        import torch_fidelity  # noqa: F401
        import torchmetrics.image.fid  # noqa: F401
    except ImportError:
        return False
    return (Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS).is_file()


def inception_fid(generated: Tensor, reference: Tensor, *, batch_size: int = 100,
                  device: Optional[Union[str, torch.device]] = None) -> Optional[float]:
    """The Inception-v3 FID (torchmetrics' ``FrechetInceptionDistance``, 2048 features) between ``generated``
    and ``reference`` images in [-1, 1] (grey images are repeated to 3 channels), or None when the weights
    are not available locally (:func:`inception_weights_available`): it never downloads them."""
    if not inception_weights_available():
        return None
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, normalize=True).to(device or "cpu")
    for images, real in ((reference, True), (generated, False)):
        for chunk in images.split(batch_size):
            chunk = chunk.to(metric.device).float().clamp(-1, 1).add(1).div(2)
            metric.update(chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk, real=real)
    return float(metric.compute())
