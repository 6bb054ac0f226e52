"""The training kit (DDPM and flow matching), built on the loss library (:mod:`robust_diffusion`) and kept apart from
it: the library never imports this package.

- :mod:`~robust_diffusion.training.trainer`: :class:`Trainer` (AdamW, EMA, AMP, exact resume, DDP) with its
  :class:`TrainConfig` (:mod:`~robust_diffusion.training.train_config`), its checkpoint
  (:mod:`~robust_diffusion.training.trainer_checkpoint`, written through
  :mod:`~robust_diffusion.training.checkpoint`: crash-safe files that run no code when opened, RNG state), its log
  (:mod:`~robust_diffusion.training.runlog`, ``log.csv``) and torchrun (:mod:`~robust_diffusion.training.distributed`).
- :mod:`~robust_diffusion.training.data`: Fashion-MNIST / CIFAR-10 loading, your own images (folders, arrays) and
  Huber epsilon-contamination.
- :mod:`~robust_diffusion.training.models`: a small UNet.
- :mod:`~robust_diffusion.training.sampling`: DDPM and DDIM samplers, Euler and Heun for flow matching.
- :mod:`~robust_diffusion.training.metrics`: offline evaluation (Frechet distance in a classifier's features, AUROC, ...).
- :mod:`~robust_diffusion.training.detectors`: the contaminant detectors' hybrids (noise inside a garment, a noisy
  half or quarter), a hybrid-aware detector and per-sample calls.
- :mod:`~robust_diffusion.training.export`: TorchScript / torch.export of a trained model for the C++ sampler.
- :mod:`~robust_diffusion.training.experiment`: what the commands and examples build (datasets, models, losses by
  name, schedules); :mod:`~robust_diffusion.training.arguments`: their shared options.
- The commands: :mod:`~robust_diffusion.training.train_command` (``python -m robust_diffusion.train``) and
  :mod:`~robust_diffusion.training.audit_command` (``python -m robust_diffusion.audit``, the data audit).
"""

from .train_config import TrainConfig
from .trainer import Trainer

__all__ = ["TrainConfig", "Trainer"]
