"""The compiled operators (``torch.ops.robust_diffusion.*``) and their fake kernels.

Importing this module loads ``robust_diffusion._C``, whose C++ static initialisers register every
operator, its backward operator, CPU (and CUDA) kernels and C++ autograd. The fake kernels below give
torch.compile / torch.export the output metadata without running anything; the C++ library names this
module as their home (``m.set_python_module``), so PyTorch imports it when it needs them.

Every loss operator has the schema::

    <name>(Tensor input, Tensor target, Tensor scale, Tensor? weight, str dim_reduction,
           str reduction, <its parameters>) -> (Tensor loss, Tensor penalty, Tensor influence)
    <name>_backward(Tensor grad_loss, Tensor input, Tensor target, Tensor scale, Tensor? weight,
                    Tensor influence, str dim_reduction, str reduction, <its parameters>) -> Tensor

``scale`` and ``weight`` hold one value per sample; ``penalty`` is the per-sample reduced penalty
R_b and ``influence`` the per-sample weight w(scale_b R_b). Outputs are float32 (float64 for float64
inputs).
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the operators)

#: Every loss operator, by its name in ``torch.ops.robust_diffusion``.
LOSS_OPS = (
    "kl_loss", "hellinger_loss", "ned_loss", "alpha_loss", "js_loss", "lecam_loss", "tv_loss", "chi2_loss",
    "huber_loss", "pseudo_huber_loss", "clipped_mse_loss",
)


def compute_dtype(input: torch.Tensor, target: torch.Tensor) -> torch.dtype:
    """The dtype of the per-sample outputs: float64 if either side is float64, else float32."""
    return torch.float64 if torch.promote_types(input.dtype, target.dtype) == torch.float64 else torch.float32


def _check_devices(name: str, input: torch.Tensor, **tensors) -> None:
    """What the real kernels check first (csrc/loss_spec.cpp): every tensor argument on input's device. The
    dispatcher sends a call that mixes a meta tensor with real ones here, so without this check a device
    mismatch would return uninitialised data instead of an error."""
    for argument, value in tensors.items():
        if isinstance(value, torch.Tensor):
            torch._check_value(value.device == input.device,
                               lambda: f"{name}: {argument} must be on input's device ({input.device}), "
                                       f"got {value.device}")


def _tensor_params(params) -> dict:
    """The operator's own tensor parameters (pseudo_huber_loss's c), by name."""
    return {"c": p for p in params if isinstance(p, torch.Tensor)}


def _fake_forward_of(name: str):
    def fake_forward(input, target, scale, weight, dim_reduction, reduction, *params):
        _check_devices(name, input, target=target, scale=scale, weight=weight, **_tensor_params(params))
        batch = input.shape[0]
        dtype = compute_dtype(input, target)
        loss = input.new_empty((batch,) if reduction == "none" else (), dtype=dtype)
        return loss, input.new_empty((batch,), dtype=dtype), input.new_empty((batch,), dtype=dtype)

    return fake_forward


def _fake_backward_of(name: str):
    def fake_backward(grad_loss, input, target, scale, weight, influence, dim_reduction, reduction, *params):
        _check_devices(name, input, grad_loss=grad_loss, target=target, scale=scale, weight=weight,
                       influence=influence, **_tensor_params(params))
        return input.new_empty(input.shape)  # contiguous, like the real kernels

    return fake_backward


for _name in LOSS_OPS:
    torch.library.register_fake(f"robust_diffusion::{_name}")(_fake_forward_of(_name))
    torch.library.register_fake(f"robust_diffusion::{_name}_backward")(_fake_backward_of(_name))
