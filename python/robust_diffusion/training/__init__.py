"""The DDPM training kit, built on the loss library (:mod:`robust_diffusion`) and kept apart from it: the library
never imports this package.

- :mod:`~robust_diffusion.training.data`: Fashion-MNIST / CIFAR-10 loading, your own images (folders, arrays) and
  Huber epsilon-contamination.
- :mod:`~robust_diffusion.training.models`: a small UNet.
- :mod:`~robust_diffusion.training.trainer`: :class:`Trainer` and :class:`TrainConfig` (AdamW, EMA, AMP, exact resume, DDP),
  with :mod:`~robust_diffusion.training.checkpoint` (crash-safe files, RNG state), :mod:`~robust_diffusion.training.runlog`
  (``log.csv``) and :mod:`~robust_diffusion.training.distributed` (torchrun).
- :mod:`~robust_diffusion.training.sampling`: DDPM and DDIM samplers, Euler and Heun for flow matching.
- :mod:`~robust_diffusion.training.metrics`: offline evaluation (Frechet distance in a classifier's features, AUROC, ...).
- :mod:`~robust_diffusion.training.export`: TorchScript / torch.export of a trained model for the C++ sampler.
- :mod:`~robust_diffusion.training.train_command`: the command line, ``python -m robust_diffusion.train``.
- :mod:`~robust_diffusion.training.audit_command`: the data audit, ``python -m robust_diffusion.audit``.
"""

from .trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
