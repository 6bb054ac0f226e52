"""Float64 references for every loss operator, written with plain torch ops (and quadrature for the
divergences with no closed form). Independent of the C++ code: nothing here calls robust_diffusion."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Tuple

import torch

from divergence_reference import reference_phi_w

CHI2_MAX_DELTA = 44.0


@dataclass
class LossCase:
    """One operator with concrete parameters (what the parametrised tests iterate over)."""

    op: str
    params: Tuple = ()
    kind: str = ""  # the divergence / baseline name used by the reference
    id: str = field(default="")

    def __post_init__(self):
        self.kind = self.kind or self.op[: -len("_loss")]
        self.id = self.id or self.kind


def loss_cases(batch: int, generator: torch.Generator):
    """Every operator, with per-sample parameters (pseudo-Huber's c) for a batch of ``batch``."""
    c = torch.rand(batch, generator=generator, dtype=torch.float64) * 0.5 + 0.05
    return [
        LossCase("kl_loss"), LossCase("hellinger_loss"), LossCase("ned_loss"), LossCase("alpha_loss", (0.3,)),
        LossCase("js_loss"), LossCase("lecam_loss"), LossCase("tv_loss"), LossCase("chi2_loss"),
        LossCase("huber_loss", (0.7,)),
        LossCase("pseudo_huber_loss", (c, "huber"), id="pseudo_huber-huber"),
        LossCase("pseudo_huber_loss", (c, "smooth_l1"), id="pseudo_huber-smooth_l1"),
        LossCase("clipped_mse_loss", (0.8, "sample"), id="clipped-sample"),
        LossCase("clipped_mse_loss", (0.5, "element"), id="clipped-element"),
    ]


CASE_IDS = [case.id for case in loss_cases(1, torch.Generator().manual_seed(0))]


def penalty(case: LossCase, r: torch.Tensor) -> torch.Tensor:
    """e(r) elementwise, r of shape [B, D] in float64."""
    if case.kind == "huber":
        d = case.params[0]
        return torch.where(r.abs() <= d, 0.5 * r ** 2, d * (r.abs() - 0.5 * d))
    if case.kind == "pseudo_huber":
        c, form = case.params
        c = c.to(r).reshape(-1, 1)
        k = 2 * c if form == "huber" else 2.0
        return k * (torch.sqrt(r ** 2 + c ** 2) - c)
    if case.kind == "clipped_mse" and case.params[1] == "element":
        return r.clamp(-case.params[0], case.params[0]) ** 2
    return r ** 2


def phi_w(case: LossCase, delta: torch.Tensor):
    """(phi(delta), w(delta)) per sample in float64."""
    d = delta.double()
    if case.kind in ("kl", "huber", "pseudo_huber") or (case.kind == "clipped_mse" and case.params[1] == "element"):
        return d, torch.ones_like(d)
    if case.kind in ("hellinger", "alpha"):
        kappa = 0.25 if case.kind == "hellinger" else case.params[0] * (1 - case.params[0])
        return -torch.expm1(-kappa * d) / kappa, torch.exp(-kappa * d)
    if case.kind == "tv":
        w = torch.where(d > 0, torch.exp(-d / 4) / (2 * torch.sqrt(math.pi * d.clamp_min(1e-300))), torch.zeros_like(d))
        return torch.erf(torch.sqrt(d) / 2), w
    if case.kind == "chi2":
        dc = d.clamp(max=CHI2_MAX_DELTA)
        return torch.expm1(2 * dc) / 2, torch.exp(2 * dc)
    if case.kind == "clipped_mse":
        tau = case.params[0]
        return d.clamp(max=tau), (d <= tau).double()
    values = [reference_phi_w(case.kind, float(v)) for v in d.tolist()]
    return (torch.tensor([v[0] for v in values], dtype=torch.float64),
            torch.tensor([v[1] for v in values], dtype=torch.float64))


def reference(case: LossCase, input, target, scale, weight=None, dim_reduction="mean", reduction="mean"):
    """(loss, penalty R_b, influence w_b) in float64, following docs/DESIGN.md, Losses."""
    batch = input.shape[0]
    r = (input.double() - target.double()).reshape(batch, -1)
    e = penalty(case, r)
    R = e.mean(1) if dim_reduction == "mean" else e.sum(1)
    phi, w = phi_w(case, scale.double() * R)
    loss_b = phi if weight is None else weight.double() * phi
    out = {"mean": loss_b.mean(), "sum": loss_b.sum(), "none": loss_b}[reduction]
    return out, R, w
