"""The experiments' building blocks, shared by the training command, the audit, the examples and the benchmarks:
the (contaminated) datasets, the UNet presets, loss names such as ``ned+debias+trust`` and the schedules of the
training objectives. The command lines (:mod:`.train_command`, :mod:`.audit_command`) only parse arguments into
these."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from ..continuous import FlowMatchingSchedule
from ..ops import LOSS_TABLE
from ..robust_loss import LOSSES, RobustDiffusionLoss
from ..schedules import NoiseSchedule, Schedule
from ..weighting import WEIGHTING_SCHEMES
from .data import (CONTAMINATION_KINDS, FASHION_MNIST_CLASSES, ContaminatedDataset, LabelledImages, contaminate,
                   load_cifar10, load_fashion_mnist, load_images)
from .label_noise import flip_labels
from .models import UNET_PRESETS, UNet

__all__ = ["BASELINE_PARAMS", "DATASETS", "LOSS_NAMES", "LOSS_WEIGHTINGS", "MODEL_PRESETS", "OBJECTIVES",
           "STANDARD_LOSSES", "TRAIN_DATASETS", "TRUST_MEASURE", "ExperimentData", "LossChoice",
           "build_influence_loss", "build_loss", "build_model", "build_schedule", "load_experiment_data",
           "loss_settings", "parse_loss_name", "parse_scale"]

#: The benchmark datasets: a training and a clean test split (what the experiments evaluate against).
DATASETS = ("fashion-mnist", "cifar10")
#: What the training command takes: the benchmarks, or your own images (``folder``: no test split).
TRAIN_DATASETS = DATASETS + ("folder",)
#: Timestep weightings a loss name may carry as a suffix: ``ned+debias``.
LOSS_WEIGHTINGS = tuple(scheme for scheme in WEIGHTING_SCHEMES if scheme != "constant")
#: Losses as other libraries train them, whatever ``--scale`` says: a fixed scale of 1 and their parameters.
#: ``mse`` is the standard MSE (``kl`` at scale 1, ``F.mse_loss``), the baseline users know (``kl`` at the adaptive
#: scale is the MSE normalised per noise level, RobustDiffusionLoss docs); ``diffusers_huber`` is diffusers'
#: pseudo-Huber loss with its training scripts' defaults (``loss_type="huber"``, ``huber_schedule="snr"``,
#: ``huber_c=0.1``).
STANDARD_LOSSES = {"mse": ("kl", {}),
                   "diffusers_huber": ("pseudo_huber", {"c": 0.1, "c_schedule": "snr", "form": "huber"})}
#: Every loss name the training commands take: the standard forms, then :data:`robust_diffusion.LOSSES`.
LOSS_NAMES = tuple(STANDARD_LOSSES) + LOSSES
#: Baseline parameters used with the adaptive scale, where delta = 1 is a median sample: clipped MSE drops
#: samples whose penalty exceeds 3 times the median at their noise level.
BASELINE_PARAMS = {"clipped_mse": {"tau": 3.0, "mode": "sample"}, "huber": {"delta": 1.0}}

#: UNet configurations: the package's presets plus ``quick``, sized for the CPU example (15-minute budget).
MODEL_PRESETS = {
    **UNET_PRESETS,
    "quick": dict(base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, attention_levels=(2,),
                  dropout=0.0, norm_groups=8),
    "micro": dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(),
                  dropout=0.0, norm_groups=4),
}
# Fashion-MNIST classes that are held out as the "other distribution" for --kind dataset.
_HELD_OUT_CLASSES = (FASHION_MNIST_CLASSES.index("Bag"), FASHION_MNIST_CLASSES.index("Ankle boot"))


# ---------------------------------------------------------------------------------------------- data
@dataclass
class ExperimentData:
    """A contaminated training set and the clean data to evaluate against.

    Attributes:
        train: the contaminated training set (items ``(image, is_contaminated, risk, index)``; its ``labels`` are
            ``train_labels`` where the data has classes, else ``None``).
        train_labels: class labels of the training images before contamination (zeros for a folder without classes).
        test_images, test_labels: the clean test split (only clean classes), for the feature classifier and
            the Frechet distance (empty for ``folder``).
        description: one line saying what the data is.
        notes: for ``folder``: what the loader found and did (value range, resizing, channels).
        unreadable: for ``folder``: ``(file, reason)`` of every image file that could not be read (left out).
        train_indices: where each training image sits in the dataset's training split (its clean classes for
            Fashion-MNIST's ``kind="dataset"``), so that two draws can be checked for shared images.
        num_classes: how many classes the labels index (what a class-conditional model is built for): 10 for the
            benchmarks (8 for Fashion-MNIST's ``kind="dataset"``, whose last two classes are the contaminants), the
            class sub-folders or the ``.npz`` labels of a folder; ``None`` for data without classes.
        label_flipped: with ``label_noise``, which training labels were flipped (``train.labels`` holds the noisy
            ones, ``train_labels`` the true ones); for evaluation only. ``None`` without label noise.
    """

    train: ContaminatedDataset
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    description: str
    notes: Tuple[str, ...] = ()
    unreadable: Tuple[Tuple[str, str], ...] = ()
    train_indices: Optional[Tensor] = None
    num_classes: Optional[int] = None
    label_flipped: Optional[Tensor] = None

    @property
    def image_shape(self) -> Tuple[int, ...]:
        return tuple(self.train.images.shape[1:])


def load_experiment_data(dataset: str, contamination: float, kind: str = "noise", *,
                         root: Optional[Union[str, os.PathLike]] = None, num_train: Optional[int] = None,
                         image_size: Optional[int] = None, noise_std: float = 0.5, seed: int = 0,
                         download: bool = False, channels: Optional[int] = None,
                         from_end: bool = False, rare_class: Optional[int] = None, label_noise: float = 0.0,
                         label_noise_kind: str = "symmetric",
                         rare_fraction: float = 0.03) -> ExperimentData:
    """Load ``dataset`` and contaminate a fraction ``contamination`` of its training images (docs/DESIGN.md, Evidence).

    Args:
        dataset: ``"fashion-mnist"`` (Debian's ``dataset-fashion-mnist``, offline), ``"cifar10"``
            (torchvision's layout under ``root``) or ``"folder"``: your images at ``root``, a folder of image
            files or a ``.npy``/``.npz``/IDX file (:func:`~robust_diffusion.training.data.load_images`; no test split).
        contamination: the fraction p in [0, 1) (0: train on the data as it is).
        kind: ``"noise"`` (uniform noise images), ``"gaussian"`` (images plus N(0, noise_std^2) noise, with the
            known std as risk) or ``"dataset"`` (images of another distribution: for Fashion-MNIST the held-out
            classes Bag and Ankle boot, which are then removed from the clean data; for CIFAR-10 Fashion-MNIST
            images, grey, padded to 32x32; not for ``folder``).
        root: the dataset directory (default: Debian's path for Fashion-MNIST; required for CIFAR-10 and folder).
        num_train: use the first ``num_train`` (clean-class) training images (default: all).
        from_end: take the last ``num_train`` training images instead of the first: images that a model trained
            on the first ones never saw (the example's contaminant detectors learn from them).
        image_size: Fashion-MNIST: 28 (native, the default) or 32 (padded with the background); CIFAR-10: 32;
            folder: any (default 32 for a folder of files, an array's own size for an array file).
        noise_std: the std of ``kind="gaussian"``.
        seed: seeds the contamination.
        download: CIFAR-10 only: let torchvision download it into ``root``.
        channels: folder only: 1 (grey) or 3 (RGB); default what the images are.
        rare_class: make this class legitimately rare, a control for what a robust recipe does to rare but valid
            data: the training images are taken in order as before, but those of ``rare_class`` only until they
            make ``rare_fraction`` of ``num_train`` (rounded, at least 1); the others fill the rest. Applied
            before contamination, which may replace rare images like any others. The test split is unchanged.
        rare_fraction: the rare class's share of the training images, in (0, 1).
        label_noise: flip this share of the training labels (:func:`~robust_diffusion.training.label_noise.flip_labels`,
            seeded by ``seed``): the images stay as they are, the pairs no longer match.
        label_noise_kind: ``"symmetric"`` or ``"asymmetric"`` (the dataset's confusable classes).
    """
    if dataset not in TRAIN_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(TRAIN_DATASETS)}")
    if isinstance(contamination, bool) or not isinstance(contamination, (int, float)) \
            or not 0.0 <= contamination < 1.0:
        raise ValueError(f"contamination must be a fraction in [0, 1), got {contamination!r}")
    if kind not in CONTAMINATION_KINDS:
        raise ValueError(f"unknown contamination kind {kind!r}; expected one of {', '.join(CONTAMINATION_KINDS)}")
    if num_train is not None and num_train < 2:
        raise ValueError(f"num_train must be at least 2, got {num_train!r}")
    if rare_class is not None and not 0.0 < rare_fraction < 1.0:
        raise ValueError(f"rare_fraction must be a fraction in (0, 1), got {rare_fraction!r}")
    if rare_class is not None and from_end:
        raise ValueError("rare_class thins the images a model trains on; from_end takes held-out ones: pick one")

    if dataset == "folder":
        source = _load_folder(root, kind, image_size, channels)
    elif dataset == "fashion-mnist":
        source = _load_fashion_mnist(root, kind, image_size)
    else:
        source = _load_cifar10(root, kind, image_size, download)
    train, test, contaminant_images, name = source.train, source.test, source.contaminant_images, source.name
    notes, unreadable = source.notes, source.unreadable

    images, labels = train
    total = images.shape[0]
    if rare_class is not None:
        indices = _with_rare_class(labels, rare_class, rare_fraction, num_train, dataset)
    else:
        count = total if num_train is None else min(num_train, total)
        start = total - count if from_end else 0
        indices = torch.arange(start, start + count)
    images, labels = images[indices], labels[indices]
    flipped = None
    given = labels
    if label_noise:
        if source.num_classes is None:
            raise ValueError("label_noise flips class labels; these images have none (a folder of class "
                             "sub-folders or an .npz with labels has)")
        given, flipped = flip_labels(labels, label_noise, label_noise_kind, num_classes=source.num_classes,
                                     seed=seed, dataset=dataset)
        name += f", {label_noise:.0%} {label_noise_kind} label noise ({int(flipped.sum())} labels flipped)"
    contaminated = contaminate(images, contamination, kind, seed=seed, noise_std=noise_std,
                               contaminant_images=contaminant_images,
                               labels=given if source.num_classes is not None else None)
    what = {"noise": "uniform noise images", "gaussian": f"images + N(0, {noise_std}^2) noise",
            "dataset": ("held-out classes Bag/Ankle boot" if dataset == "fashion-mnist"
                        else "Fashion-MNIST images")}[kind]
    if rare_class is not None:
        name += f", class {rare_class} rare ({int((labels == rare_class).sum())} images, {rare_fraction:.0%})"
    description = (f"{name}, {len(contaminated)} training images"
                   + (f" (the last of its {total})" if from_end else "") + ", "
                   + (f"{contaminated.num_contaminated} ({contamination:.0%}) replaced by {what}"
                      if contaminated.num_contaminated else "none replaced (no contamination)"))
    return ExperimentData(contaminated, labels, test.images, test.labels, description, notes, unreadable, indices,
                          source.num_classes, flipped)


def _with_rare_class(labels: Tensor, rare_class: int, fraction: float, num_train: Optional[int],
                     dataset: str) -> Tensor:
    """The positions of the first ``num_train`` images in order, with ``rare_class`` capped at ``fraction``."""
    if dataset == "folder":
        raise ValueError("rare_class is a control on a benchmark dataset (fashion-mnist, cifar10), not on a folder "
                         "of your own images")
    classes = sorted(int(c) for c in labels.unique())
    if rare_class not in classes:
        raise ValueError(f"rare_class must be one of the dataset's classes {classes}, got {rare_class!r}")
    total = labels.numel() if num_train is None else min(num_train, labels.numel())
    quota = max(1, round(fraction * total))
    is_rare = labels == rare_class
    rare = torch.nonzero(is_rare).flatten()[:quota]
    common = torch.nonzero(~is_rare).flatten()[:total - rare.numel()]
    if rare.numel() < quota or common.numel() < total - quota:
        raise ValueError(f"the dataset has too few images for {total} training images with class {rare_class} at "
                         f"{fraction:.0%}")
    return torch.cat([rare, common]).sort().values  # the dataset's own order


class _CleanData(NamedTuple):
    """A dataset before contamination: its splits, the images ``kind="dataset"`` draws from, and what was read."""

    train: LabelledImages
    test: LabelledImages
    contaminant_images: Optional[Tensor]
    name: str
    notes: Tuple[str, ...] = ()
    unreadable: Tuple[Tuple[str, str], ...] = ()
    num_classes: Optional[int] = None


def _load_folder(root, kind: str, image_size: Optional[int], channels: Optional[int]) -> _CleanData:
    if root is None:
        raise ValueError("--dataset folder needs --data-root: a folder of your images (or a .npy/.npz/IDX file)")
    if kind == "dataset":
        raise ValueError("contamination kind 'dataset' (images of another distribution) needs a benchmark "
                         "dataset; for your own images use noise or gaussian")
    loaded = load_images(root, image_size, channels)
    count, shape = loaded.images.shape[0], tuple(loaded.images.shape[1:])
    labels = loaded.labels if loaded.labels is not None else torch.zeros(count, dtype=torch.int64)
    train = LabelledImages(loaded.images, labels)
    test = LabelledImages(torch.zeros((0, *shape)), torch.zeros(0, dtype=torch.int64))
    return _CleanData(train, test, None, f"{root} ({shape[0]}x{shape[1]}x{shape[2]})", tuple(loaded.notes),
                      tuple(loaded.unreadable), len(loaded.classes) if loaded.labels is not None else None)


def _load_fashion_mnist(root, kind: str, image_size: Optional[int]) -> _CleanData:
    if image_size not in (None, 28, 32):
        raise ValueError(f"image_size must be 28 or 32 for Fashion-MNIST, got {image_size!r}")
    pad_to = 32 if image_size == 32 else None
    if root is not None and not Path(root).is_dir():
        raise FileNotFoundError(f"Fashion-MNIST directory not found: {root} (it should hold the IDX files "
                                f"train-images-idx3-ubyte.gz, ...; Debian's dataset-fashion-mnist installs "
                                f"them in /usr/share/datasets/fashion-mnist)")
    train = load_fashion_mnist("train", root, pad_to=pad_to)
    test = load_fashion_mnist("test", root, pad_to=pad_to)
    contaminant_images = None
    if kind == "dataset":  # the held-out classes are the other distribution, and leave the clean data
        held_out_train = torch.isin(train.labels, torch.tensor(_HELD_OUT_CLASSES))
        held_out_test = torch.isin(test.labels, torch.tensor(_HELD_OUT_CLASSES))
        contaminant_images = train.images[held_out_train]
        train = type(train)(train.images[~held_out_train], train.labels[~held_out_train])
        test = type(test)(test.images[~held_out_test], test.labels[~held_out_test])
    side = train.images.shape[-1]
    num_classes = len(FASHION_MNIST_CLASSES) - (len(_HELD_OUT_CLASSES) if kind == "dataset" else 0)
    return _CleanData(train, test, contaminant_images, f"Fashion-MNIST {side}x{side}", num_classes=num_classes)


def _load_cifar10(root, kind: str, image_size: Optional[int], download: bool) -> _CleanData:
    if root is None:
        raise ValueError("CIFAR-10 needs --data-root: the directory holding cifar-10-batches-py")
    if image_size not in (None, 32):
        raise ValueError(f"image_size must be 32 for CIFAR-10, got {image_size!r}")
    train = load_cifar10(root, "train", download=download)
    test = load_cifar10(root, "test", download=download)
    contaminant_images = None
    if kind == "dataset":  # Fashion-MNIST, grey, padded to 32x32
        contaminant_images = load_fashion_mnist("train", pad_to=32).images.expand(-1, 3, -1, -1).contiguous()
    return _CleanData(train, test, contaminant_images, "CIFAR-10 32x32", num_classes=10)


# ---------------------------------------------------------------------------------------------- model / loss
def build_model(preset: str, in_channels: int, **overrides) -> UNet:
    """A :class:`~robust_diffusion.training.models.UNet` from :data:`MODEL_PRESETS`."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; expected one of {', '.join(MODEL_PRESETS)}")
    return UNet(in_channels=in_channels, **{**MODEL_PRESETS[preset], **overrides})


class LossChoice(NamedTuple):
    """A parsed loss name: ``loss`` (one of :data:`LOSS_NAMES`), a timestep ``weighting``, whether to train
    with the ``risk_free`` loss of :mod:`robust_diffusion.risk` (for data with known noise, ``--kind gaussian``),
    whether to weight each sample by its ``trust`` (``TrainConfig.sample_trust``; on a loss whose weights are all 1,
    such as ``mse``, ``kl`` or ``pseudo_huber``, the trust is NED's, measured on the same predictions:
    :func:`build_influence_loss`), whether to gate that trust by each sample's coherence (``coherent``:
    ``TrainConfig.trust_coherence``) and whether to divide the loss by the batch's mean influence weight
    (``normalized``: ``RobustDiffusionLoss(normalize_influence=True)``)."""

    loss: str
    weighting: str = "constant"
    risk_free: bool = False
    trust: bool = False
    coherent: bool = False
    normalized: bool = False

    @property
    def name(self) -> str:
        parts = [self.loss] + ([self.weighting] if self.weighting != "constant" else [])
        return "+".join(parts + [flag for flag in LOSS_FLAGS if getattr(self, flag)])


#: On/off suffixes of a loss name, in the order its name lists them (``ned+debias+trust+coherent+normalized``).
LOSS_FLAGS = ("risk_free", "trust", "coherent", "normalized")


def parse_loss_name(spec: str) -> LossChoice:
    """Parse ``"<loss>[+<weighting>][+risk_free][+trust][+coherent][+normalized]"`` (e.g. ``"ned"``,
    ``"ned+debias"``, ``"kl+risk_free"``, ``"ned+trust"``, ``"kl+trust+coherent"``, ``"ned+normalized"``), with a
    clear error."""
    loss, *suffixes = str(spec).strip().split("+")
    if loss not in LOSS_NAMES:
        raise ValueError(f"unknown loss {loss!r} in {spec!r}; expected one of {', '.join(LOSS_NAMES)}, "
                         f"optionally with a timestep weighting suffix +{'/+'.join(LOSS_WEIGHTINGS)} "
                         f"(e.g. 'ned+debias'), +risk_free, +trust, +coherent and/or +normalized")
    weighting, flags = "constant", {}
    for suffix in suffixes:
        if suffix in LOSS_FLAGS and suffix not in flags:
            flags[suffix] = True
        elif suffix in LOSS_WEIGHTINGS and weighting == "constant":
            weighting = suffix
        else:
            raise ValueError(f"unknown or repeated suffix {suffix!r} in loss {spec!r}; expected at most one "
                             f"weighting of {', '.join(LOSS_WEIGHTINGS)}, and each of {', '.join(LOSS_FLAGS)} "
                             f"at most once")
    if flags.get("coherent") and not flags.get("trust"):
        raise ValueError(f"loss {spec!r}: +coherent gates the per-sample trust; write +trust+coherent")
    if flags.get("trust") and flags.get("risk_free") and not _weighs_samples(loss):
        raise ValueError(f"loss {spec!r}: the risk-free loss weighs samples by {loss}'s own influence weights, which "
                         f"are all 1; use a divergence such as ned+risk_free+trust")
    return LossChoice(loss, weighting, **flags)


def _weighs_samples(loss: str) -> bool:
    """Whether a loss name's influence weights differ between samples (not mse, kl, huber, pseudo-Huber)."""
    return LOSS_TABLE[LOSSES.index(STANDARD_LOSSES.get(loss, (loss,))[0])].weighs_samples


#: The loss whose influence weights make the trust of a loss whose own weights are all 1 (``mse+trust``).
TRUST_MEASURE = "ned"


def build_influence_loss(spec: Union[str, LossChoice], schedule: Schedule, *,
                         temperature: float = 1.0) -> Optional[RobustDiffusionLoss]:
    """The :class:`~robust_diffusion.RobustDiffusionLoss` whose weights the Trainer measures when it is not the
    trained loss (``Trainer(influence_loss=...)``): NED at the adaptive scale and ``temperature`` for a loss with
    ``+trust`` whose own weights are all 1; ``None`` otherwise (the trained loss measures itself)."""
    spec = parse_loss_name(spec) if isinstance(spec, str) else spec
    if not spec.trust or _weighs_samples(spec.loss):
        return None
    return RobustDiffusionLoss(TRUST_MEASURE, schedule, temperature=temperature, update="step")


def parse_scale(value: Union[str, float]) -> Union[str, float]:
    """``"adaptive"``, ``"vlb"``, ``"batch"`` or a non-negative float."""
    if value in ("adaptive", "vlb", "batch"):
        return value
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be 'adaptive', 'vlb', 'batch' or a non-negative number, got {value!r}") from None
    if not scale >= 0:
        raise ValueError(f"scale must be 'adaptive', 'vlb', 'batch' or a non-negative number, got {value!r}")
    return scale


#: The training objectives of the command line: DDPM (discrete, epsilon) and flow matching.
OBJECTIVES = ("ddpm", "flow")


def build_schedule(objective: str = "ddpm", shift: float = 1.0, timestep_sampling: str = "uniform") -> Schedule:
    """The schedule of an objective: DDPM's linear :class:`NoiseSchedule`, or a :class:`FlowMatchingSchedule` with
    ``shift`` and ``timestep_sampling`` (which only flow matching takes)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective == "flow":
        return FlowMatchingSchedule(shift=shift, timestep_sampling=timestep_sampling)
    if shift != 1.0 or timestep_sampling != "uniform":
        raise ValueError("--shift and --timestep-sampling apply to --objective flow only")
    return NoiseSchedule.linear()


def build_loss(spec: Union[str, LossChoice], schedule: Schedule, *, scale: Union[str, float] = "adaptive",
               temperature: float = 1.0, weighting_params: Optional[Dict[str, float]] = None) -> RobustDiffusionLoss:
    """The :class:`~robust_diffusion.RobustDiffusionLoss` for a loss name such as ``"hellinger"`` or
    ``"ned+min_snr"`` (``weighting_params``: the weighting's parameters, e.g. ``{"gamma": 5.0}``), with
    :data:`BASELINE_PARAMS` for the baselines, built for the :class:`~robust_diffusion.training.trainer.Trainer`
    (``update="step"``)."""
    spec = parse_loss_name(spec) if isinstance(spec, str) else spec
    if weighting_params and spec.weighting == "constant":
        raise ValueError(f"weighting parameters {sorted(weighting_params)} need a weighting: name one in the loss, "
                         f"e.g. {spec.loss}+min_snr")
    weighting = dict(weighting=spec.weighting, weighting_params=weighting_params)
    if spec.normalized and not _weighs_samples(spec.loss):
        raise ValueError(f"loss {spec.name!r}: +normalized divides by the batch's mean influence weight, which is 1 "
                         f"for {spec.loss} (every sample weighs the same): drop +normalized")
    if spec.loss in STANDARD_LOSSES:
        loss, params = STANDARD_LOSSES[spec.loss]
        return RobustDiffusionLoss(loss, schedule, scale=1.0, update="step", **weighting, **params)
    params = dict(BASELINE_PARAMS.get(spec.loss, {}))
    return RobustDiffusionLoss(spec.loss, schedule, scale=parse_scale(scale), temperature=temperature,
                               update="step", normalize_influence=spec.normalized, **weighting, **params)


def loss_settings(loss_fn: RobustDiffusionLoss) -> str:
    """A short description of a loss module's settings, for results tables."""
    scale = loss_fn.scale_mode if loss_fn.scale_mode != "fixed" else f"{loss_fn.fixed_scale:g}"
    parts = [f"scale={scale}"]
    if loss_fn.scale_mode == "adaptive":
        parts.append(f"temperature={loss_fn.temperature:g}")
    if loss_fn.loss == "clipped_mse":
        parts.append(f"tau={loss_fn.tau:g}")
    if loss_fn.loss == "huber":
        parts.append(f"delta={loss_fn.delta:g}")
    if loss_fn.loss == "pseudo_huber":
        parts.append(f"form={loss_fn.form}")
    return " ".join(parts)
