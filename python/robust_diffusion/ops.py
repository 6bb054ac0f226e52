"""The compiled operators (``torch.ops.robust_diffusion.*``).

Importing this module loads ``robust_diffusion._C``, whose C++ static initialisers register every
operator, its backward operator, CPU (and CUDA) kernels, C++ autograd and Meta kernels. The Meta kernels
(csrc/meta_kernels.cpp) are what meta tensors, FakeTensorMode, torch.compile and torch.export run: they
compute output shapes and dtypes only, after the same argument checks as the real kernels, so a bad argument
fails while tracing with its eager message.

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

import torch  # noqa: F401  (loads libtorch, which _C links against)

from . import _C  # noqa: F401  (registers the operators)

#: Every loss operator, by its name in ``torch.ops.robust_diffusion``.
LOSS_OPS = (
    "kl_loss", "hellinger_loss", "ned_loss", "alpha_loss", "js_loss", "lecam_loss", "tv_loss", "chi2_loss",
    "huber_loss", "pseudo_huber_loss", "clipped_mse_loss",
)
