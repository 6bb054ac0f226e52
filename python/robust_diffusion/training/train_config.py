"""TrainConfig: the Trainer's hyper-parameters, each checked when the config is made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["MIXED_PRECISION", "REPORT_TO", "TrainConfig"]

#: TrainConfig.mixed_precision's choices.
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
#: Where TrainConfig.report_to sends the log besides log.csv.
REPORT_TO = (None, "tensorboard")


@dataclass
class TrainConfig:
    """Hyper-parameters of :class:`Trainer`.

    Attributes:
        steps: optimizer steps of the whole run (a resumed run continues up to it).
        batch_size: the global batch of one optimizer step, split evenly over data-parallel ranks.
        gradient_accumulation_steps: each rank's share of the batch is processed in this many equal micro-batches
            whose gradients add up before the step (less memory, the same step: the same samples, timesteps and
            noise as one pass; only the adaptive scale sees each micro-batch's medians, averaged).
        lr: AdamW's peak learning rate, reached linearly over ``warmup_steps``.
        weight_decay, adam_betas: AdamW's.
        grad_clip: clip the global gradient norm to this (``None``: no clipping).
        ema_decay: decay of the exponential moving average of the weights. With ``ema_warmup`` the decay at
            step k is ``min(ema_decay, (1 + k) / (10 + k))``, so short runs are not dominated by the
            initial weights.
        mixed_precision: ``"auto"`` (bf16 autocast on GPUs that support it, else fp16 with a grad scaler;
            off on the CPU), ``"no"``, ``"bf16"`` (GPU or CPU) or ``"fp16"`` (GPU only).
        log_every: steps per ``log.csv`` row (and progress-bar update).
        report_to: ``"tensorboard"`` also writes each row, the adaptive scale's buckets and sample grids to
            TensorBoard (``<out_dir>/tensorboard``; needs the ``tensorboard`` package); ``None`` (default): log.csv
            only.
        sample_every: with ``report_to``, steps between grids of 16 samples of the EMA model (DDIM or Euler, 20
            steps, a fixed seed); 0: none.
        checkpoint_every: steps between checkpoints (0: only at the end); the last step always writes one.
        influence_from_step: start the per-sample statistics of :attr:`Trainer.influence` at this step
            (the first steps, with an untrained model, say little about which samples are outliers).
        risk_free: train with the risk-free loss of :mod:`robust_diffusion.risk` (docs/DESIGN.md, Risk) on a
            dataset with a per-sample ``risk`` tensor (the known noise std, e.g. ``contaminate(kind="gaussian")``):
            each sample's timestep is drawn on its stability interval, noised by ``risk_noising`` and scored by
            ``risk_free_loss`` with ``loss_fn`` (a :class:`~robust_diffusion.RobustDiffusionLoss`). Samples with
            risk 0 train exactly as without it.
        sample_trust: multiply each sample's loss by its trust, :meth:`InfluenceTracker.trust` of
            :attr:`Trainer.influence` (its low-noise influence weights relative to the training set's, applied at
            every noise level; docs/DESIGN.md, Data audit). Needs a RobustDiffusionLoss whose influence weights
            differ between samples (not KL, Huber or pseudo-Huber). Counts from ``influence_from_step``: every
            sample has trust 1 until the tracker has seen it at low noise.
        trust_coherence: with ``sample_trust``, gate each sample's trust by its coherence
            (:func:`robust_diffusion.coherence` of the flattened training images, computed once;
            :meth:`InfluenceTracker.set_coherence`): a sample as close to its 5th nearest neighbour as the typical
            one keeps weight 1, so a rare but coherent part of the data is not silenced with the junk
            (docs/DESIGN.md, Data audit).
        trust_low_noise: with ``sample_trust``, the draws trust is measured on: timesteps below this fraction of
            the schedule's (``InfluenceTracker.trust``'s ``low_noise``; 0.5, the default, is where junk stands out
            on the demo's noise images; docs/RESULTS.md says on which kinds each setting was validated).
        conditional: train a class-conditional model (``UNet(num_classes=K)``, or diffusers'
            ``UNet2DModel(num_class_embeds=K + 1)``) on the dataset's ``labels``, called as
            ``model(x_t, t, class_labels=...)``.
        label_dropout: with ``conditional``, the probability that a sample's label is replaced by the null label, so
            that the one network learns the unconditional model too, which classifier-free guidance needs (0.1 as in
            Ho & Salimans 2022). Drawn from the shared noise generator: resume and data parallelism stay exact.
        guidance_scale: with ``conditional``, the classifier-free guidance scale of the sample grids (1: none).
        seed: seeds the data order, the diffusion noise and torch's global RNG (one stream per rank), each
            through :func:`derive_seed`.
        num_workers: DataLoader worker processes.
        progress: show a tqdm progress bar (rank 0).
        progress_label: the bar's label (e.g. the loss's name, when several runs train at once).
    """

    steps: int = 1000
    batch_size: int = 64
    gradient_accumulation_steps: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: Tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: Optional[float] = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    mixed_precision: str = "auto"
    log_every: int = 50
    report_to: Optional[str] = None
    sample_every: int = 0
    checkpoint_every: int = 0
    influence_from_step: int = 0
    risk_free: bool = False
    sample_trust: bool = False
    trust_coherence: bool = False
    trust_low_noise: float = 0.5
    conditional: bool = False
    label_dropout: float = 0.1
    guidance_scale: float = 1.0
    seed: int = 0
    num_workers: int = 0
    progress: bool = True
    progress_label: str = "training"

    def __post_init__(self):
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"TrainConfig.report_to must be one of {REPORT_TO}, got {self.report_to!r}")
        for name in ("warmup_steps", "sample_every", "checkpoint_every", "influence_from_step", "num_workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"TrainConfig.ema_decay must lie in [0, 1), got {self.ema_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be positive or None, got {self.grad_clip!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"TrainConfig.mixed_precision must be one of {MIXED_PRECISION}, "
                             f"got {self.mixed_precision!r}")
        if isinstance(self.label_dropout, bool) or not isinstance(self.label_dropout, (int, float)) \
                or not 0 <= self.label_dropout < 1:
            raise ValueError(f"TrainConfig.label_dropout must be a probability in [0, 1), got {self.label_dropout!r}")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)) \
                or not 0 <= self.guidance_scale < float("inf"):
            raise ValueError(f"TrainConfig.guidance_scale must be a finite number >= 0 (1: no guidance), got "
                             f"{self.guidance_scale!r}")
        if self.guidance_scale != 1 and not self.conditional:
            raise ValueError("TrainConfig.guidance_scale guides a class-conditional model's samples: set "
                             "conditional=True (--conditional), or leave guidance_scale at 1")
        if isinstance(self.trust_low_noise, bool) or not isinstance(self.trust_low_noise, (int, float)) \
                or not 0 < self.trust_low_noise <= 1:
            raise ValueError(f"TrainConfig.trust_low_noise must be a fraction of the timesteps in (0, 1], got "
                             f"{self.trust_low_noise!r}")
        if self.trust_low_noise != 0.5 and not self.sample_trust:
            raise ValueError("TrainConfig.trust_low_noise sets the draws the per-sample trust is measured on: set "
                             "sample_trust=True too, or leave it at 0.5")
        if self.trust_coherence and not self.sample_trust:
            raise ValueError("TrainConfig.trust_coherence gates the per-sample trust: set sample_trust=True too")
        if self.sample_every and self.report_to is None:
            raise ValueError("TrainConfig.sample_every draws sample grids for TensorBoard: set report_to='tensorboard'")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
