"""Argument types and option groups shared by the kit's command lines (the training command, the audit) and the
examples: numbers checked by argparse, so a bad value is a one-line usage error that names the option."""

from __future__ import annotations

import argparse

from ..continuous import FLOW_TIMESTEP_SAMPLING
from .experiment import OBJECTIVES

__all__ = ["add_objective_arguments", "non_negative_float", "non_negative_int", "positive_float", "positive_int"]


def _number(kind, lowest: float, inclusive: bool, what: str):
    """An argparse type: a number of ``kind`` above ``lowest`` (or equal when ``inclusive``); argparse turns the
    error into a one-line usage message naming the option."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not (value >= lowest if inclusive else value > lowest) or value != value or abs(value) == float("inf"):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


positive_int = _number(int, 0, False, "a positive integer")
non_negative_int = _number(int, 0, True, "a non-negative integer")
positive_float = _number(float, 0.0, False, "a positive number")
non_negative_float = _number(float, 0.0, True, "a non-negative number")


def add_objective_arguments(parser) -> None:
    """``--objective``, ``--shift`` and ``--timestep-sampling`` (for :func:`build_schedule`), shared by the training
    command and the example."""
    parser.add_argument("--objective", choices=OBJECTIVES, default="ddpm",
                        help="ddpm: the linear-beta DDPM (T = 1000, epsilon target, DDIM / DDPM sampling); flow: flow "
                             "matching (rectified flow, velocity target, Euler / Heun sampling), as SD3 / Flux train")
    parser.add_argument("--shift", type=positive_float, default=1.0, help="flow: SD3's timestep shift")
    parser.add_argument("--timestep-sampling", choices=FLOW_TIMESTEP_SAMPLING, default="uniform",
                        help="flow: how training times are drawn (diffusers' weighting_scheme names)")
