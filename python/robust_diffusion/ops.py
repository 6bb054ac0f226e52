"""The compiled operators (``torch.ops.robust_diffusion.*``).

Importing this module loads ``robust_diffusion._C``, whose C++ static initialisers register every
operator, its backward operator, CPU (and CUDA) kernels, C++ autograd and Meta kernels. The Meta kernels
(csrc/meta_kernels.cpp) are what meta tensors, FakeTensorMode, torch.compile and torch.export run: they
compute output shapes and dtypes only, after the same argument checks as the real kernels, so a bad argument
fails while tracing with its eager message.

Every loss operator has the schema::

    <name>(Tensor input, Tensor target, Tensor scale, Tensor? weight, str dim_reduction,
           str reduction, <its parameters>) -> (Tensor loss, Tensor penalty, Tensor influence)
    <name>_with_grad(<the arguments of <name>>)
        -> (Tensor loss, Tensor penalty, Tensor influence, Tensor grad_input)
    <name>_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor scale, Tensor? weight,
                    Tensor influence, str dim_reduction, str reduction, <its parameters>) -> Tensor

``<name>_with_grad`` also returns the input's gradient for an upstream gradient of 1, computed in the
forward's pass; autograd uses it for eager CPU calls whose input requires grad (docs/DESIGN.md, Kernels).

``scale`` and ``weight`` hold one value per sample; ``penalty`` is the per-sample reduced penalty
R_b and ``influence`` the per-sample weight w(scale_b R_b). Outputs are float32 (float64 for float64
inputs).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, NamedTuple

import torch  # noqa: F401  (loads libtorch, which _C links against)

from . import _C  # noqa: F401  (registers the operators)

class LossEntry(NamedTuple):
    """One loss of the library."""

    name: str  #: its short name (``RobustDiffusionLoss("ned")``); the operator is ``<name>_loss``
    kind: str  #: ``"divergence"`` (an f-divergence, docs/DESIGN.md, Divergences) or ``"baseline"``
    defaults: Dict[str, Any]  #: the values RobustDiffusionLoss gives its own parameters unless told otherwise
    #: whether its influence weight differs between samples (a per-sample transform); KL, Huber (per element)
    #: and pseudo-Huber give every sample weight 1, so they rank nothing and give no sample trust
    weighs_samples: bool = True


#: The losses, in the order of csrc/losses.h (the C++ list that registers the operators; a test checks the two
#: agree). Everything else on the Python side (DIVERGENCES, LOSSES, LOSS_OPS, the functional API's table, the CLI's
#: names) is derived from this one table.
LOSS_TABLE = (
    LossEntry("kl", "divergence", {}, weighs_samples=False),
    LossEntry("hellinger", "divergence", {}),
    LossEntry("ned", "divergence", {}),
    LossEntry("alpha", "divergence", {"alpha": 0.25}),
    LossEntry("js", "divergence", {}),
    LossEntry("lecam", "divergence", {}),
    LossEntry("tv", "divergence", {}),
    LossEntry("chi2", "divergence", {}),
    LossEntry("huber", "baseline", {"delta": 1.0}, weighs_samples=False),
    LossEntry("pseudo_huber", "baseline", {"c": 0.1, "c_schedule": "snr", "c_scale": 1.0, "form": "huber"},
              weighs_samples=False),
    LossEntry("clipped_mse", "baseline", {"tau": 1.0, "mode": "sample"}),
)

#: Every loss operator, by its name in ``torch.ops.robust_diffusion``.
LOSS_OPS = tuple(f"{entry.name}_loss" for entry in LOSS_TABLE)


@contextlib.contextmanager
def cpu_one_pass(enabled: bool) -> Iterator[None]:
    """Turns the one-pass CPU gradient (docs/DESIGN.md, Kernels) on or off inside the block, for the whole
    process: ``with cpu_one_pass(False):`` runs the forward and backward operators as two passes, e.g. to
    compare the two. Values are the same either way and gradients bitwise the same for ``loss.backward()``."""
    previous = torch.ops.robust_diffusion._set_cpu_one_pass(enabled)
    try:
        yield
    finally:
        torch.ops.robust_diffusion._set_cpu_one_pass(previous)
