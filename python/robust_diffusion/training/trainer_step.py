"""The denoising step of :class:`~robust_diffusion.training.trainer.Trainer`: timesteps and noise of the global
batch, label dropout, the loss (risk-free, trust-weighted, with an ``influence_loss`` measuring alongside),
gradient accumulation, the optimizer and EMA steps, and the learning-rate schedule. A mixin, so that the Trainer's
file holds what a run is (construction, ``train``, resume, stop) and this one what a step does; it reads the
Trainer's attributes (``config``, ``schedule``, ``network``, ``noise_generator``, ...) set by its constructor."""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..adaptive_scale import log_snr_buckets
from ..robust_loss import RobustDiffusionLoss
from .models import model_prediction

__all__ = ["TrainingStep"]


class TrainingStep:
    """One optimizer step of a :class:`~robust_diffusion.training.trainer.Trainer` (see the module docstring)."""

    def _autocast_dtype(self, mode: str) -> Optional[torch.dtype]:
        if self.device.type != "cuda":
            if mode == "fp16":
                raise ValueError(f"mixed_precision='fp16' needs a CUDA device (its grad scaler), the trainer runs on "
                                 f"{self.device}: use 'bf16', which needs none")
            return torch.bfloat16 if mode == "bf16" else None
        if mode == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]

    def _train_step(self, x0: Tensor, indices: Tensor) -> None:
        config = self.config
        # Timesteps and noise of the global batch; this rank's samples are rows rank, rank + W, ... (the
        # DistributedSampler interleaving), so every world size sees the same (sample, t, noise) triples, and so
        # does every split into micro-batches.
        t = self._timesteps(indices)
        noise_all = torch.randn((config.batch_size, *x0.shape[1:]), device=self.device, dtype=x0.dtype,
                                generator=self.noise_generator)
        noise = noise_all[self.rank::self.world_size]
        labels = self._dropped_labels(indices) if self.labels is not None else None
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        parts = config.gradient_accumulation_steps
        size = x0.shape[0] // parts
        losses, influences, penalties = [], [], []
        for part in range(parts):
            rows = slice(part * size, (part + 1) * size)
            last = part == parts - 1
            sync = self.network.no_sync() if self.world_size > 1 and not last else contextlib.nullcontext()
            with sync:  # DDP all-reduces the gradients once, after the last micro-batch
                loss = self._loss(x0[rows], indices[rows], t[rows], noise[rows],
                                  labels[rows] if labels is not None else None)
                self.scaler.scale(loss if parts == 1 else loss / parts).backward()
            losses.append(loss.detach())
            influences.append(self._last_per_sample("last_influence", size, 1.0))
            penalties.append(self._last_per_sample("last_penalty", size, math.nan))
        grad_norm, finite = self._optimizer_step()
        self._record(torch.stack(losses).mean(), grad_norm.detach(), indices, torch.cat(influences),
                     torch.cat(penalties), self._noise_level(t), ~finite)

    def _dropped_labels(self, indices: Tensor) -> Tensor:
        """This rank's samples' labels, each replaced by the null label with probability ``label_dropout``, drawn
        for the global batch from the shared noise generator (as the timesteps), so every world size and a resumed
        run drop the same labels."""
        u = torch.rand(self.config.batch_size, device=self.device, dtype=torch.float64,
                       generator=self.noise_generator)[self.rank::self.world_size]
        labels = self.labels[indices]
        return torch.where(u < self.config.label_dropout, torch.full_like(labels, self.null_label), labels)

    def _loss(self, x0: Tensor, indices: Tensor, t: Tensor, noise: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """One (micro-)batch's loss: noising (risk-sensitive with ``risk_free``), the model under autocast (given the
        class labels of a conditional run), and the loss, weighted by each sample's trust with ``sample_trust``."""
        if self.risk is None:
            x_t = self.schedule.q_sample(x0, t, noise)
            target = self.schedule.training_target(x0, noise, t, self.prediction_type)
        else:
            from ..risk import risk_noising
            noising = risk_noising(x0, self.risk[indices], t, noise, schedule=self.schedule,
                                   prediction_type=self.prediction_type)
            x_t = noising.noisy
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            time = self.schedule.model_timestep(t)
            output = self.network(x_t, time) if labels is None else self.network(x_t, time, class_labels=labels)
            output = model_prediction(output, x_t)  # diffusers: .sample
        trust = (self.influence.trust(indices, low_noise=self.config.trust_low_noise) if self.config.sample_trust
                 else None)
        if self.influence_loss is not None:
            self.influence_loss(output.detach().float(), target, t)  # measured, not trained on
        if self.risk is not None:
            from ..risk import risk_free_loss
            return risk_free_loss(output.float(), noising, t, loss=self.loss_fn, schedule=self.schedule, weight=trust)
        if trust is None:
            return self.loss_fn(output.float(), target, t)
        return self.loss_fn(output.float(), target, t, trust)

    def _last_per_sample(self, name: str, size: int, fill: float) -> Tensor:
        """The measured loss's (``influence_loss`` or ``loss_fn``) per-sample ``last_influence`` / ``last_penalty``
        of its last call as float64, or ``fill`` for a loss that has none."""
        value = getattr(self.measure, name, None)
        if isinstance(value, Tensor):
            return value.detach().to(torch.float64)
        return torch.full((size,), fill, dtype=torch.float64, device=self.device)

    def _optimizer_step(self) -> Tuple[Tensor, Tensor]:
        """Unscale, clip, the optimizer and EMA steps, and the loss's commit; returns the gradient norm and whether
        it was finite (a step with non-finite gradients is skipped and leaves no trace)."""
        self.scaler.unscale_(self.optimizer)
        if self.config.grad_clip is not None:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([
                p.grad.detach().norm() for p in self.model.parameters() if p.grad is not None]))
        finite = torch.isfinite(grad_norm)  # the GradScaler's own test: it skips a step with non-finite gradients
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif finite:  # without a scaler (float32, bfloat16) skip such a step here, or AdamW writes NaN into the
            self.optimizer.step()  # weights, its moments and the EMA for good (one host sync, as the scaler's)
        for loss in (self.loss_fn, self.influence_loss):
            if isinstance(loss, RobustDiffusionLoss):
                loss.step(finite)
        self._update_ema()
        return grad_norm, finite

    def _check_risk(self, dataset: Dataset) -> Tensor:
        from ..risk import usable_samples

        risk = getattr(dataset, "risk", None)
        if risk is None:
            raise ValueError("risk_free=True needs a dataset with a per-sample `risk` tensor (the known noise std), "
                             "e.g. contaminate(images, p, kind='gaussian')")
        if not isinstance(self.loss_fn, RobustDiffusionLoss):
            raise ValueError("risk_free=True needs a RobustDiffusionLoss as loss_fn (risk_free_loss wraps it)")
        risk = torch.as_tensor(risk).to(self.device, torch.float32)
        unusable = int((~usable_samples(self.schedule, risk)).sum())
        if unusable:
            raise ValueError(f"{unusable} training samples have a risk too large for the schedule (no timestep "
                             f"where their noise is below the diffusion noise); drop them first "
                             f"(robust_diffusion.risk.usable_samples)")
        return risk

    def _timesteps(self, indices: Tensor) -> Tensor:
        """This rank's rows of the global batch's times, from the shared noise generator. Discrete: t uniform on
        [lower, T), lower = 0, or each sample's stability bound t_min(r) for the risk-free loss (0 where r = 0, so
        risk-free training on clean samples is bit-identical to standard training). Flow matching: the schedule's
        own sampler (SD3's densities), float32."""
        config = self.config
        if not self.schedule.discrete:
            return self.schedule.sample_timesteps(config.batch_size, device=self.device,
                                                  generator=self.noise_generator)[self.rank::self.world_size].float()
        steps = self.schedule.num_timesteps
        u = torch.rand(config.batch_size, device=self.device, dtype=torch.float64,
                       generator=self.noise_generator)[self.rank::self.world_size]
        if self.risk is None:
            return torch.floor(u * steps).long()
        lower = self.risk_lower[indices]
        return (lower + torch.floor(u * (steps - lower)).long()).clamp(max=steps - 1)

    def _noise_level(self, t: Tensor) -> Tensor:
        """What the tracker files a draw under: its step (discrete) or its log-SNR bucket (continuous)."""
        if self.schedule.discrete:
            return t
        return log_snr_buckets(self.schedule.log_snr(t), self.influence.num_buckets)

    def learning_rate(self, step: int) -> float:
        """Linear warm-up to ``lr`` over ``warmup_steps``, then constant."""
        warmup = self.config.warmup_steps
        return self.config.lr * min(1.0, (step + 1) / warmup) if warmup else self.config.lr

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.config.ema_decay
        if self.config.ema_warmup:
            decay = min(decay, (1 + self.step) / (10 + self.step))
        ema_params = list(self.ema.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in self.model.parameters()], 1.0 - decay)
        for ema_buffer, buffer in zip(self.ema.buffers(), self.model.buffers()):
            ema_buffer.copy_(buffer)
