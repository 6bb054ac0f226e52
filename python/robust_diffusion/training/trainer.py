"""Training with a robust loss (DDPM or flow matching): AdamW, EMA, clipping, mixed precision, exact resume, DDP.

:class:`Trainer` runs the standard denoising objective (docs/DESIGN.md, Notation) with any loss callable as
``loss_fn(model_output, target, t)``, normally a :class:`~robust_diffusion.RobustDiffusionLoss`, whose
``last_influence`` (per-sample influence weights) it logs against the dataset's contamination labels.

What a run writes into ``out_dir``:

- ``checkpoint.safetensors``: model, EMA model, optimizer, grad scaler, the loss module's buffers (the adaptive
  scale's running medians), the RNG states of every rank (torch CPU/CUDA, Python, NumPy, the shared
  diffusion-noise generator), the data position, the step, the per-sample influence statistics (an
  :class:`~robust_diffusion.InfluenceTracker`'s state) and the log accumulators. A safetensors file with the rest
  as JSON in its header (:mod:`~robust_diffusion.training.checkpoint`): opening it runs no code, and it names its
  format version. It is written atomically, so a run killed at any moment leaves either the previous or the new
  checkpoint, never a torn one (a temporary file left by a kill during the write is removed by
  :meth:`Trainer.resume`). Resuming from it continues exactly where the
  checkpoint left off: on the CPU bit for bit as if the run had not been interrupted; on a GPU bit for bit only
  with deterministic kernels (``torch.use_deterministic_algorithms(True)``, cuDNN benchmarking off), otherwise
  up to the run-to-run float differences that an uninterrupted GPU run shows too.
- ``log.csv``: one row per ``log_every`` steps: loss, mean per-sample penalty R_b (the squared error for the
  divergence losses: unlike the loss, it does not depend on the scale, so it shows the model learning under the
  adaptive scale too), learning rate, gradient norm, throughput and the mean influence weight of all / clean /
  contaminated samples seen in the interval.

Reproducibility and data parallelism. Each step's timesteps and noise are drawn for the whole global batch
from one generator that every rank holds in the same state, and each rank takes the rows of its samples. With
:class:`~torch.utils.data.distributed.DistributedSampler`'s interleaving the global batch of step k is the same
set of samples for any number of ranks, so (up to float summation order in the gradient all-reduce) training
on W ranks with local batch B / W equals one process with batch B, and the result does not depend on W.
Exceptions: dropout masks (drawn from each rank's own stream) and the adaptive scale, whose per-bucket medians
are averaged over ranks rather than taken over the global batch.

Launch data-parallel runs with ``torchrun --nproc_per_node N``; :func:`~robust_diffusion.training.distributed.init_distributed` reads torchrun's
environment and picks gloo on the CPU, nccl on GPUs. Only rank 0 writes logs, checkpoints and progress bars.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..continuous import as_schedule
from ..influence import InfluenceTracker
from ..robust_loss import RobustDiffusionLoss
from ..schedules import NoiseSchedule, Schedule, prediction_type_for
from .distributed import rank_and_world_size
from .models import checked_labels, null_class_label
from .runlog import LogInterval, TensorBoardLog, append_row
from .train_config import TrainConfig
from .trainer_checkpoint import CHECKPOINT_NAME, resume_trainer, save_trainer
from .trainer_step import TrainingStep

__all__ = ["TrainConfig", "Trainer", "derive_seed"]

PathLike = Union[str, os.PathLike]

LOG_NAME = "log.csv"


# ---------------------------------------------------------------------------------------------- trainer
class Trainer(TrainingStep):
    """DDPM training of ``model`` on ``dataset`` with ``loss_fn``; see the module docstring.

    The per-sample influence weights and penalties go into :attr:`influence`, an
    :class:`~robust_diffusion.InfluenceTracker` (``trainer.influence.table()``: the samples the loss trusts least
    first). Under DDP each step's indices, weights, penalties and timesteps are all-gathered (the logs need them
    too) and every rank's tracker takes in the whole global batch (``gathered=True``): it holds the global
    statistics on every rank and needs no ``sync``.

    Args:
        model: called as ``model(x_t, t)`` (``model(x_t, t, class_labels=y)`` with ``config.conditional``; each label
            replaced by the model's null label with probability ``config.label_dropout``) and returning the prediction of ``schedule``'s prediction type (a
            tensor, or a diffusers output with ``.sample``: a ``UNet2DModel`` works as it is).
        loss_fn: ``loss_fn(model_output, target, t) -> scalar``, e.g. a
            :class:`~robust_diffusion.RobustDiffusionLoss` (its buffers are checkpointed, its
            ``last_influence`` is logged; other callables count as influence 1).
        dataset: a map-style dataset whose items are an image tensor or a tuple starting with one (e.g. a
            :class:`~robust_diffusion.training.data.ContaminatedDataset`). If it has an ``is_contaminated`` [N] bool
            tensor, the influence weights are logged separately for clean and contaminated samples. With
            ``config.conditional`` its ``labels`` [N] int tensor holds each sample's class (read by index).
        schedule: the noise schedule (default: linear, T = 1000): a discrete :class:`NoiseSchedule`, or a
            :class:`~robust_diffusion.FlowMatchingSchedule` for flow matching, or the diffusers scheduler of either
            (:func:`~robust_diffusion.schedule_from_diffusers` maps it) (times drawn by its sampler, the
            network given ``schedule.model_timestep(t)``, the velocity target, noise-level buckets in log-SNR).
        config: a :class:`TrainConfig`.
        out_dir: where the checkpoint and the log go (``None``: write nothing).
        influence_loss: a :class:`~robust_diffusion.RobustDiffusionLoss` that measures each sample's influence
            weight on the same predictions without being trained on (its adaptive scale follows the run and is
            checkpointed); the tracker, the log and ``sample_trust`` read it instead of ``loss_fn``. Lets a run
            train with the MSE or pseudo-Huber (whose weights are all 1) and still rank its data by NED's weights
            or weigh its samples by NED's trust.
        device: defaults to the model's device.
        prediction_type: defaults to the schedule's.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor], dataset: Dataset,
                 schedule: Optional[Schedule] = None, config: Optional[TrainConfig] = None,
                 out_dir: Optional[PathLike] = None, device: Optional[Union[str, torch.device]] = None,
                 prediction_type: Optional[str] = None, influence_loss: Optional[RobustDiffusionLoss] = None):
        self.config = config = config or TrainConfig()
        self.rank, self.world_size = rank_and_world_size()
        self.is_main = self.rank == 0
        parts = self.world_size * config.gradient_accumulation_steps
        if config.batch_size % parts:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the number of data-parallel ranks "
                             f"({self.world_size}) times gradient_accumulation_steps "
                             f"({config.gradient_accumulation_steps})")
        self.local_batch = config.batch_size // self.world_size
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.schedule = NoiseSchedule.linear() if schedule is None else as_schedule(schedule, "Trainer")
        if not (self.schedule.discrete or self.schedule.process == "flow"):
            raise ValueError(f"the Trainer trains a discrete NoiseSchedule or flow matching (FlowMatchingSchedule), "
                             f"got {self.schedule!r} (EDM and the continuous VP / VE processes need their own "
                             f"preconditioning and sampler)")
        self.prediction_type = prediction_type_for(self.schedule, prediction_type, "Trainer")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._build_model(model, loss_fn, influence_loss)
        self._build_data(dataset)
        if config.risk_free and not self.schedule.discrete:
            raise ValueError("risk_free=True: the Trainer's risk-free training draws integer steps; with a continuous "
                             "schedule call robust_diffusion.risk_noising / risk_free_loss in your own loop")
        self.risk = self._check_risk(dataset) if config.risk_free else None
        # Each sample's stability bound t_min(r), computed once: a step indexes it (no per-step validation sync).
        self.risk_lower = None
        if self.risk is not None:
            from ..risk import timestep_lower_bound
            self.risk_lower = timestep_lower_bound(self.schedule, self.risk)
        if config.sample_trust:
            _check_trust(self.measure)
        if config.risk_free and self.influence_loss is not None:
            raise ValueError("influence_loss measures plain denoising draws; risk_free=True scores another objective "
                             "(risk_free_loss): leave influence_loss out and let loss_fn's weights be measured")

        # Every rank holds the same noise generator (the noise of the global batch); torch's global RNG
        # (dropout) gets one stream per rank.
        self.noise_generator = torch.Generator(device=self.device).manual_seed(derive_seed(config.seed, "noise"))
        torch.manual_seed(derive_seed(config.seed, f"rank {self.rank}"))
        self.step = 0
        self._stop_requested = threading.Event()
        self.train_time = 0.0  # seconds spent in train() over all (resumed) sessions
        # The same noise-level buckets as the adaptive scale's when the loss has them. On a continuous schedule
        # the tracker takes each draw's log-SNR bucket (num_timesteps=None).
        steps = self.schedule.num_timesteps if self.schedule.discrete else None
        buckets = getattr(self.measure, "num_buckets", 10)
        self.influence = InfluenceTracker(self.num_samples, num_buckets=min(buckets, steps or buckets),
                                          num_timesteps=steps, gathered=True).to(self.device)
        if config.trust_coherence:
            from ..coherence import coherence
            self.influence.set_coherence(coherence(_all_images(dataset)))
        self.interval = LogInterval(self.device, self.is_contaminated)
        self.tensorboard = None
        if config.report_to == "tensorboard" and self.is_main and self.out_dir is not None:
            self.tensorboard = TensorBoardLog(self.out_dir / "tensorboard")

    def _build_model(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
                     influence_loss: Optional[RobustDiffusionLoss]) -> None:
        """The model on the device, its EMA copy, DDP's wrapper, the losses, AdamW and the grad scaler."""
        config = self.config
        self.autocast_dtype = self._autocast_dtype(config.mixed_precision)
        self.model = model.to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.network = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.network = self.model
        self.loss_fn = loss_fn.to(self.device) if isinstance(loss_fn, nn.Module) else loss_fn
        if isinstance(self.loss_fn, RobustDiffusionLoss):
            _check_robust_loss(self.loss_fn, self.schedule)
        if influence_loss is not None and not isinstance(influence_loss, RobustDiffusionLoss):
            raise ValueError(f"influence_loss must be a RobustDiffusionLoss (its last_influence is what is measured), "
                             f"got {type(influence_loss).__name__}")
        self.influence_loss = influence_loss.to(self.device) if influence_loss is not None else None
        if self.influence_loss is not None:
            _check_robust_loss(self.influence_loss, self.schedule)
        #: the loss whose per-sample weights the tracker, the log and the trust read
        self.measure = self.influence_loss if self.influence_loss is not None else self.loss_fn
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, betas=config.adam_betas,
                                           weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.autocast_dtype == torch.float16)

    def _build_data(self, dataset: Dataset) -> None:
        """The sampler that fixes the data order of every world size, and the contamination labels for the log."""
        self.dataset = dataset
        self.num_samples = len(dataset)
        self.sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                          seed=derive_seed(self.config.seed, "data order"), drop_last=True)
        self.batches_per_epoch = len(self.sampler) // self.local_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"the dataset has {self.num_samples} samples, fewer than one global batch of "
                             f"{self.config.batch_size}")
        flags = getattr(dataset, "is_contaminated", None)
        self.is_contaminated = torch.as_tensor(flags).to(self.device, torch.bool) if flags is not None else None
        self.labels, self.null_label = _class_labels(self.model, dataset, self.config, self.num_samples, self.device)
        #: whether :meth:`relabel` replaced the dataset's labels (then the checkpoint carries the labels trained on)
        self.relabelled = False

    # ------------------------------------------------------------------ public API
    @property
    def checkpoint_path(self) -> Optional[Path]:
        return self.out_dir / CHECKPOINT_NAME if self.out_dir is not None else None

    @property
    def log_path(self) -> Optional[Path]:
        return self.out_dir / LOG_NAME if self.out_dir is not None else None

    def train(self) -> "Trainer":
        """Train until ``config.steps`` (from the current step: call :meth:`resume` first to continue), or until
        :meth:`stop` is called."""
        config = self.config
        bar = None
        if config.progress and self.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=config.steps, initial=self.step, desc=config.progress_label, unit="step",
                       dynamic_ncols=True)
        self.model.train()
        session_start, interval_start = time.perf_counter(), time.perf_counter()
        time_before = self.train_time
        saved_at = None
        while self.step < config.steps and not self._stop_requested.is_set():
            epoch = self.step // self.batches_per_epoch
            batches, loader = self._rest_of_epoch()
            for indices, batch in zip(batches, loader):
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                self._train_step(images.to(self.device, non_blocking=True),
                                 torch.as_tensor(indices, device=self.device))
                self.step += 1
                self.train_time = time_before + time.perf_counter() - session_start
                if self.step % config.log_every == 0 or self.step == config.steps:
                    row = self._log_row(epoch, time.perf_counter() - interval_start)
                    interval_start = time.perf_counter()
                    if bar is not None and self.is_contaminated is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", w_clean=_fmt(row["influence_clean"]),
                                        w_cont=_fmt(row["influence_contaminated"]))
                    elif bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", w_mean=_fmt(row["influence_mean"]))
                if self.tensorboard is not None and config.sample_every and self.step % config.sample_every == 0:
                    self._log_samples()
                if bar is not None:
                    bar.update(1)
                if (config.checkpoint_every and self.step % config.checkpoint_every == 0) or self.step == config.steps:
                    self.save_checkpoint()
                    saved_at = self.step
                if self._stop_requested.is_set():
                    break
        if self._stop_requested.is_set():
            self._stop_requested.clear()
            if self.out_dir is not None and saved_at != self.step:
                self.save_checkpoint()  # so that resume() continues from here
        if bar is not None:
            bar.close()
        return self

    def _rest_of_epoch(self) -> Tuple[List[List[int]], DataLoader]:
        """This rank's batches from the current step to the end of its epoch (or of the run), and their loader."""
        epoch, position = divmod(self.step, self.batches_per_epoch)
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        batches = [order[i * self.local_batch:(i + 1) * self.local_batch]
                   for i in range(position, self.batches_per_epoch)]
        batches = batches[:self.config.steps - self.step]
        # Its own generator: a DataLoader otherwise draws its worker seed from torch's global RNG, and a resumed run
        # (one more loader, mid-epoch) would then diverge from an uninterrupted one.
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.config.num_workers,
                            pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(
                                derive_seed(self.config.seed, f"loader {epoch} {self.rank}")))
        return batches, loader

    def stop(self) -> None:
        """Ask :meth:`train`, running in another thread (or interrupted by a signal handler), to return after the
        step it is in (or the next call to return at once); it writes a checkpoint there (with ``out_dir``), so
        :meth:`resume` continues the run.
        Single-process runs only: data-parallel ranks must stop at the same step, which one rank cannot
        arrange."""
        if self.world_size > 1:
            raise RuntimeError("Trainer.stop: a data-parallel run cannot be stopped from one rank; end it on every "
                               "rank at the same step (e.g. lower config.steps and resume)")
        self._stop_requested.set()

    def average_influence(self) -> Tuple[Tensor, Tensor]:
        """Per training sample: the mean influence weight over the steps it was drawn in (NaN if never,
        counting from ``config.influence_from_step``) and how many times it was drawn; float64, CPU. Draws whose
        influence weight was not finite are left out of both. :attr:`influence` has more (penalties, noise
        levels, the ranking)."""
        return self.influence.mean_influence(), self.influence.counts().to(torch.float64)

    def relabel(self, labels: Tensor) -> None:
        """Train a conditional run on these labels from its next step on: ``labels`` [N] ints, one per dataset
        sample, each a class or :attr:`null_label` (a pair to keep out of the conditional model: its image still
        trains the unconditional one). For label correction, e.g. with the label the model prefers
        (:func:`~robust_diffusion.training.pairs.pair_scores`). Saved in the checkpoint, so a resume continues on
        them (a run never relabelled takes its dataset's labels on resume); every rank must pass the same
        labels."""
        if self.labels is None:
            raise ValueError("relabel changes a conditional run's class labels; this run is unconditional")
        self.labels = checked_labels(labels, self.num_samples, self.null_label, "relabel: labels",
                                     allow_null=True).to(self.device)
        self.relabelled = True

    def save_checkpoint(self, path: Optional[PathLike] = None) -> None:
        """Write the full training state to ``path`` (default :attr:`checkpoint_path`); every rank must call it (RNG
        states are gathered from all). What it holds: :mod:`~robust_diffusion.training.trainer_checkpoint`."""
        save_trainer(self, Path(path) if path is not None else self.checkpoint_path)

    def resume(self, path: Optional[PathLike] = None) -> bool:
        """Load the checkpoint at ``path`` (default :attr:`checkpoint_path`) if it exists; returns whether it did.
        Log rows written after that checkpoint (by a run that died later) are dropped from ``log.csv``, and
        temporary files of a checkpoint or log write that was killed midway are deleted. A file that is not a
        checkpoint of this version (another format version, a pickle, a damaged or foreign file) or one written
        for another run (objective, batch, data, trust or risk-free training) is refused with a one-line reason
        before anything is loaded."""
        return resume_trainer(self, Path(path) if path is not None else self.checkpoint_path)

    # ------------------------------------------------------------------ bookkeeping
    def _record(self, loss: Tensor, grad_norm: Tensor, indices: Tensor, influence: Tensor, penalty: Tensor,
                t: Tensor, skipped: Tensor) -> None:
        """Accumulate the step into the log interval and the per-sample statistics of :attr:`influence` (on the
        device, no host sync). Indices, influence weights, penalties and timesteps (log-SNR buckets on a continuous
        schedule) are gathered from every rank so that all ranks hold the complete, identical statistics."""
        if self.world_size > 1:
            local = torch.stack([indices.to(torch.float64), influence, penalty, t.to(torch.float64)])
            gathered = [torch.empty_like(local) for _ in range(self.world_size)]
            dist.all_gather(gathered, local)
            stacked = torch.cat(gathered, dim=1)
            indices, influence, penalty = stacked[0].to(torch.int64), stacked[1], stacked[2]
            t = stacked[3].to(torch.int64)
        self.interval.add(loss, grad_norm, indices, influence, penalty, skipped)
        if self.step >= self.config.influence_from_step:
            if self.schedule.discrete:
                self.influence.update(indices, influence, penalty, t)
            else:
                self.influence.update(indices, influence, penalty, bucket=t)

    def _log_row(self, epoch: int, seconds: float) -> Dict[str, float]:
        loss = self.interval.sums["loss"]
        if self.world_size > 1:
            loss = loss.clone()
            dist.all_reduce(loss)
            loss /= self.world_size
        scale = self.loss_fn.adaptive_scale if isinstance(self.loss_fn, RobustDiffusionLoss) else None
        row = {"step": self.step, "epoch": epoch, "lr": self.learning_rate(self.step - 1), "elapsed_s": self.train_time,
               **self.interval.row(self.step, loss, seconds, scale, warn=self.is_main)}
        if self.is_main and self.log_path is not None:
            append_row(self.log_path, row)
        if self.tensorboard is not None:
            self.tensorboard.add_row(row, scale)
        self.interval.reset()
        return row

    @torch.no_grad()
    def _log_samples(self) -> None:
        """A grid of the EMA model's samples for TensorBoard: 20 DDIM (or Euler) steps from a fixed seed, on their
        own generator, so training draws nothing less or more. Rows of 8 (TensorBoard's grid width): two rows, or for
        a conditional model one row per class (the first 16 classes), guided by ``config.guidance_scale``."""
        from .sampling import ddim_sample, flow_sample

        first = self.dataset[0]
        per_row = 8
        guidance = {}
        if self.labels is not None:
            classes = torch.arange(min(self.null_label, 16), device=self.device)
            guidance = dict(class_labels=classes.repeat_interleave(per_row), guidance_scale=self.config.guidance_scale,
                            null_label=self.null_label)
        rows = len(guidance["class_labels"]) // per_row if guidance else 2
        shape = (rows * per_row, *(first[0] if isinstance(first, (tuple, list)) else first).shape)
        generator = torch.Generator(device=self.device).manual_seed(derive_seed(self.config.seed, "samples"))
        if self.schedule.discrete:
            images = ddim_sample(self.ema, self.schedule, shape, num_steps=20, prediction_type=self.prediction_type,
                                 generator=generator, device=self.device, **guidance)
        else:
            images = flow_sample(self.ema, self.schedule, shape, num_steps=20, generator=generator, device=self.device,
                                 **guidance)
        self.tensorboard.add_samples(images, self.step)


# ---------------------------------------------------------------------------------------------- helpers
def _class_labels(model: nn.Module, dataset: Dataset, config: TrainConfig, num_samples: int,
                  device: torch.device) -> Tuple[Optional[Tensor], Optional[int]]:
    """The dataset's labels on ``device`` and the model's null label for a conditional run; (None, None) otherwise.
    A model, config and dataset that disagree on conditioning are refused."""
    null = null_class_label(model)
    if not config.conditional:
        if null is not None:
            raise ValueError(f"the model is class-conditional ({null} classes and a null label): set "
                             f"TrainConfig.conditional=True (--conditional), or train an unconditional model")
        return None, None
    if null is None:
        raise ValueError("TrainConfig.conditional needs a class-conditional model: UNet(num_classes=K) or "
                         "diffusers' UNet2DModel(num_class_embeds=K + 1)")
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise ValueError("TrainConfig.conditional needs a dataset with a `labels` [N] tensor of class labels, "
                         "e.g. contaminate(images, p, labels=labels) or load_experiment_data on labelled data")
    return checked_labels(labels, num_samples, null, "the dataset's labels").to(device), null


def _check_robust_loss(loss_fn: RobustDiffusionLoss, schedule: Schedule) -> None:
    """A RobustDiffusionLoss fit for the Trainer: the Trainer's kind of schedule, and its adaptive state updated at
    the optimizer step (``update="step"``), so a step skipped for non-finite gradients leaves no trace in it. The
    Trainer does not change the module: it says what to build."""
    if loss_fn.discrete != schedule.discrete:
        raise ValueError(f"loss_fn was built for a {'discrete' if loss_fn.discrete else 'continuous'} schedule, the "
                         f"Trainer's is {schedule!r}: build it with the same schedule")
    if loss_fn.scale_mode == "adaptive" and loss_fn.adaptive_scale.update != "step":
        raise ValueError("loss_fn must commit its adaptive scale after the optimizer step, so that a skipped step "
                         "leaves no trace in it: build it with RobustDiffusionLoss(..., update='step') (the Trainer "
                         "calls loss_fn.step(ok) after each optimizer step)")


def _all_images(dataset: Dataset) -> Tensor:
    """Every training image, ``[N, ...]`` on the CPU (the dataset's ``images`` tensor when it has one), for
    ``trust_coherence``."""
    images = getattr(dataset, "images", None)
    if isinstance(images, Tensor) and images.shape[0] == len(dataset):
        return images
    loader = DataLoader(dataset, batch_size=256)
    return torch.cat([batch[0] if isinstance(batch, (tuple, list)) else batch for batch in loader])


def _check_trust(loss_fn) -> None:
    """``sample_trust=True`` needs a RobustDiffusionLoss whose influence weights differ between samples."""
    from ..ops import LOSS_TABLE

    if not isinstance(loss_fn, RobustDiffusionLoss):
        raise ValueError("sample_trust=True needs a RobustDiffusionLoss as loss_fn or influence_loss (its "
                         "per-sample influence weights are what the trust is made of)")
    if not next(entry.weighs_samples for entry in LOSS_TABLE if entry.name == loss_fn.loss):
        raise ValueError(f"sample_trust=True needs a loss whose influence weights differ between samples; "
                         f"{loss_fn.loss!r} gives every sample weight 1, so every trust would stay 1 "
                         f"(use a divergence such as 'ned' or 'hellinger', or clipped_mse, or pass one as "
                         f"influence_loss to measure the trust while training with {loss_fn.loss!r})")


def derive_seed(seed: int, purpose: str) -> int:
    """An independent 63-bit seed for each purpose. Using ``seed`` itself everywhere would correlate streams:
    e.g. :func:`~robust_diffusion.training.data.contaminate` and the data order would draw the same permutation, and
    every contaminated sample would come first in each epoch."""
    digest = hashlib.sha256(f"robust_diffusion:{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"
