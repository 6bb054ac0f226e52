"""Export a trained denoiser for inference without this package's Python code.

:func:`export_model` writes, next to each other:

- ``<prefix>.torchscript.pt``: ``torch.jit.script`` of the model (deprecated upstream since torch 2.11, still
  the format LibTorch's ``torch::jit::load`` reads; its deprecation warning is silenced here), loaded by the C++
  sampler ``examples/cpp/sample.cpp``;
- ``<prefix>.pt2``: ``torch.export.export`` of the model with a dynamic batch dimension, saved with
  ``torch.export.save`` (load with ``torch.export.load(path).module()``, or compile it with AOTInductor);
- ``<prefix>.schedule.txt``: the sampling contract. ``#``-comment header lines ``key value`` (``format``,
  ``prediction_type``, ``num_train_timesteps``, ``image_shape C H W``) and then ``alphas_cumprod`` of every training
  step, one float64 per line (``%.17g``, exact round trip). Storing ``alphas_cumprod`` rather than the
  schedule's parameters lets any schedule (linear, cosine, zero terminal SNR, a diffusers scheduler's) reach the
  C++ sampler, which only needs the cumulative alphas for DDPM and DDIM. A flow-matching model's file has
  ``process flow`` and ``shift`` in its header and no values: its sampler grid and the model's timestep input
  (``t * num_train_timesteps``) follow from them (:meth:`FlowMatchingSchedule.inference_times`).

A class-conditional model (:func:`~robust_diffusion.training.models.null_class_label` is not ``None``) is exported
as ``model(x_t, t, class_labels)`` with ``class_labels`` an int64 ``[B]`` (``0..K-1`` the classes, ``K`` the null
label), in both programs, and its schedule file's header adds ``num_classes K`` and ``null_label K``: the header is
where a consumer learns that the model wants labels and which one is unconditional, since a scripted UNet's
signature has the optional label argument either way. An unconditional model's files are unchanged.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..continuous import FlowMatchingSchedule
from ..schedules import NoiseSchedule, Schedule, canonical_prediction_type
from .models import null_class_label

__all__ = ["SCHEDULE_FORMAT", "export_model", "read_schedule_file", "script_model", "write_schedule_file"]

PathLike = Union[str, os.PathLike]
SCHEDULE_FORMAT = "robust_diffusion-schedule-v1"


def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script(model)`` with TorchScript's upstream deprecation warning silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return torch.jit.script(model)


def write_schedule_file(path: PathLike, schedule: Schedule, image_shape: Sequence[int],
                        prediction_type: Optional[str] = None, num_classes: Optional[int] = None) -> Path:
    """Write the schedule file described in the module docstring (a :class:`NoiseSchedule` or a
    :class:`FlowMatchingSchedule`); ``num_classes`` ``K`` marks a class-conditional model (null label ``K``)."""
    path = Path(path)
    shape = "# image_shape " + " ".join(str(int(s)) for s in image_shape)
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"write_schedule_file: num_classes must be a positive integer, got {num_classes!r}")
        shape += f"\n# num_classes {num_classes}\n# null_label {num_classes}"
    if isinstance(schedule, FlowMatchingSchedule):
        if (prediction_type or schedule.prediction_type) not in ("flow_prediction", "flow"):
            raise ValueError(f"write_schedule_file: a flow-matching model predicts the velocity "
                             f"('flow_prediction'), got prediction_type {prediction_type!r}")
        lines = [f"# format {SCHEDULE_FORMAT}", "# process flow", "# prediction_type flow_prediction",
                 f"# num_train_timesteps {schedule.num_train_timesteps}", f"# shift {schedule.shift:.17g}", shape]
        path.write_text("\n".join(lines) + "\n")
        return path
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"write_schedule_file: the samplers take a NoiseSchedule or a FlowMatchingSchedule, got "
                        f"{type(schedule).__name__}")
    kind = canonical_prediction_type(prediction_type or schedule.prediction_type)
    lines = [f"# format {SCHEDULE_FORMAT}",
             f"# prediction_type {kind}",
             f"# num_train_timesteps {schedule.num_timesteps}",
             shape]
    lines += [f"{value:.17g}" for value in schedule.alphas_cumprod.tolist()]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_schedule_file(path: PathLike) -> Tuple[Schedule, Dict[str, str]]:
    """Read a schedule file back: the :class:`NoiseSchedule` (or :class:`FlowMatchingSchedule`) and the header
    fields."""
    header: Dict[str, str] = {}
    values = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line.startswith("#"):
            key, _, value = line[1:].strip().partition(" ")
            header[key] = value
        elif line:
            values.append(float(line))
    if header.get("format") != SCHEDULE_FORMAT:
        raise ValueError(f"{path} is not a {SCHEDULE_FORMAT} file (format {header.get('format')!r})")
    if header.get("process") == "flow":
        return FlowMatchingSchedule(shift=float(header["shift"]),
                                    num_train_timesteps=int(header["num_train_timesteps"])), header
    abar = torch.tensor(values, dtype=torch.float64)
    return NoiseSchedule.from_alphas_cumprod(abar, prediction_type=header["prediction_type"]), header


def export_model(model: nn.Module, path_prefix: PathLike, example_inputs: Tuple[Tensor, ...], *,
                 schedule: Optional[Schedule] = None, prediction_type: Optional[str] = None,
                 dynamic_batch: bool = True, check: bool = True) -> Dict[str, Path]:
    """Export ``model`` (called as ``model(x_t, t)``, a class-conditional one as ``model(x_t, t, class_labels)``) as
    TorchScript and ``torch.export`` programs.

    Args:
        model: the denoiser (e.g. a trainer's EMA model). It is put in eval mode; its device is kept.
        path_prefix: ``<dir>/<name>``; the files are ``<prefix>.torchscript.pt``, ``<prefix>.pt2`` and
            ``<prefix>.schedule.txt`` (the latter only with ``schedule``).
        example_inputs: ``(x_t, t)``, e.g. ``(torch.randn(2, 1, 28, 28), torch.tensor([10, 500]))`` (flow
            matching: the model's float timestep input, ``schedule.model_timestep(torch.tensor([0.1, 0.9]))``);
            ``(x_t, t, class_labels)`` for a class-conditional model, ``class_labels`` int64 ``[B]`` in ``[0, K]``.
        schedule: the training schedule, written to the schedule file for samplers.
        prediction_type: defaults to the schedule's.
        dynamic_batch: export the batch dimension as dynamic (sizes 1..4096), so one ``.pt2`` serves any
            batch size.
        check: run both exported programs on ``example_inputs`` and require them to match the eager model.

    Returns the written paths by kind: ``torchscript``, ``exported``, and ``schedule``.
    """
    num_classes = null_class_label(model)  # K, the null label, for a conditional model; None otherwise
    example_inputs = tuple(example_inputs)
    wanted = 2 if num_classes is None else 3
    if len(example_inputs) != wanted:
        kind = "unconditional" if num_classes is None else f"class-conditional (num_classes={num_classes})"
        inputs = "(x_t, t)" if num_classes is None else "(x_t, t, class_labels)"
        raise ValueError(f"export_model: the model is {kind}, so example_inputs must be {inputs}, got "
                         f"{len(example_inputs)} tensors")
    if num_classes is not None and example_inputs[2].dtype != torch.int64:
        raise ValueError(f"export_model: class_labels must be int64 (the exported programs take int64 [B]), got "
                         f"{example_inputs[2].dtype}")
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    paths: Dict[str, Path] = {}
    try:
        scripted = script_model(model)
        paths["torchscript"] = prefix.with_name(prefix.name + ".torchscript.pt")
        scripted.save(str(paths["torchscript"]))

        dynamic_shapes = None
        if dynamic_batch:
            batch = torch.export.Dim("batch", min=1, max=4096)
            dynamic_shapes = tuple({0: batch} for _ in example_inputs)
        with torch.no_grad():
            program = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
        paths["exported"] = prefix.with_name(prefix.name + ".pt2")
        torch.export.save(program, str(paths["exported"]))

        if schedule is not None:
            paths["schedule"] = write_schedule_file(prefix.with_name(prefix.name + ".schedule.txt"), schedule,
                                                    example_inputs[0].shape[1:], prediction_type, num_classes)
        if check:
            with torch.no_grad():
                expected = model(*example_inputs)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", category=FutureWarning)
                    loaded_script = torch.jit.load(str(paths["torchscript"]), map_location=expected.device)
                from_script = loaded_script(*example_inputs)
                from_export = torch.export.load(str(paths["exported"])).module()(*example_inputs)
            for name, got in (("TorchScript", from_script), ("torch.export", from_export)):
                if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
                    raise RuntimeError(f"the {name} export differs from the eager model by up to "
                                       f"{(got - expected).abs().max().item():.3g}")
    finally:
        model.train(was_training)
    return paths
