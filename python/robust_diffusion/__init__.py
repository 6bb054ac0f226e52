"""robust_diffusion: robust losses for diffusion-model training on data you cannot fully trust.

Swap one line of a training loop::

    loss_fn = robust_diffusion.RobustDiffusionLoss("ned", schedule)   # once, next to the model
    loss = loss_fn(eps_hat, eps, t)                                    # was F.mse_loss(eps_hat, eps)

Which to use when: :class:`RobustDiffusionLoss` delivers the robustness (its adaptive per-noise-level scale
is running state, kept in buffers and checkpointed with the model). The functional losses
(``hellinger_loss(eps_hat, eps, t)``, ...) are stateless; at their default ``scale=1.0`` they are drop-ins
for ``F.mse_loss`` that down-weight little, ``scale="batch"`` gives them a stateless robust scale
(docs/RESULTS.md says how it compares), and they are what to reach for to reproduce a known loss exactly
(docs/INTEGRATION.md).

Every loss is a fused C++/CUDA operator (``torch.ops.robust_diffusion.*``) with C++ autograd; this
package adds the functional API, noise schedules, timestep weighting and :class:`InfluenceTracker` (which
training samples the loss trusts least).
"""

from . import ops
from .functional import (
    DIVERGENCES,
    alpha_loss,
    batch_scale,
    chi2_loss,
    clipped_mse_loss,
    default_schedule,
    divergence_loss,
    hellinger_loss,
    huber_loss,
    influence_weights,
    js_loss,
    kl_loss,
    lecam_loss,
    ned_loss,
    pseudo_huber_loss,
    tv_loss,
)
from .continuous import (ContinuousVPSchedule, CosineVPSchedule, EDMSchedule, FlowMatchingSchedule, VESchedule,
                         schedule_from_diffusers)
from .coherence import coherence
from .influence import InfluenceTracker
from .robust_loss import BUCKET_LOG_SNR_RANGE, LOSSES, RobustDiffusionLoss
from . import risk
from .risk import risk_free_loss, risk_noising
from .schedules import NoiseSchedule, Schedule
from .weighting import loss_weights, pseudo_huber_c, weight_table

__version__ = "0.1.0"

__all__ = [
    "BUCKET_LOG_SNR_RANGE", "ContinuousVPSchedule", "CosineVPSchedule", "DIVERGENCES", "EDMSchedule",
    "FlowMatchingSchedule", "InfluenceTracker", "LOSSES", "NoiseSchedule", "RobustDiffusionLoss", "Schedule", "VESchedule", "alpha_loss", "batch_scale", "chi2_loss", "clipped_mse_loss",
    "coherence", "default_schedule", "divergence_loss", "hellinger_loss", "huber_loss", "influence_weights", "js_loss", "kl_loss",
    "lecam_loss", "loss_weights", "ned_loss", "ops", "pseudo_huber_c", "pseudo_huber_loss", "risk",
    "risk_free_loss", "risk_noising", "schedule_from_diffusers", "tv_loss", "weight_table",
]
