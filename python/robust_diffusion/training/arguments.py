"""Argument types and option groups shared by the kit's command lines (the training command, the audit) and the
examples: numbers checked by argparse, so a bad value is a one-line usage error that names the option."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ..continuous import FLOW_TIMESTEP_SAMPLING
from .experiment import OBJECTIVES

__all__ = ["HelpFormatter", "add_objective_arguments", "command_name", "default_threads", "name_equals_number",
           "non_negative_float", "non_negative_int", "positive_float", "positive_int", "stop_on_interrupt"]


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` that shows each option's default where it has one and its line does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def default_threads() -> int:
    """Half the cores this process may use, at least one. torch's default (all of them) makes its OpenMP threads
    spin-wait for each other, which collapses when other work shares the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


class stop_on_interrupt:
    """``with stop_on_interrupt(trainer) as interrupted:`` around ``trainer.train()``: Ctrl-C (SIGINT) asks the
    trainer to stop after its current step, which writes a checkpoint there; a second Ctrl-C interrupts at once.
    ``bool(interrupted)`` says whether it happened. Single-process runs only: under DDP the default handler stays."""

    def __init__(self, trainer):
        self.trainer, self.happened, self._previous = trainer, False, None

    def __bool__(self) -> bool:
        return self.happened

    def __enter__(self) -> "stop_on_interrupt":
        if self.trainer.world_size == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._stop)
        return self

    def _stop(self, signum, frame) -> None:
        self.happened = True
        self.trainer.stop()
        signal.signal(signal.SIGINT, self._previous)  # the next Ctrl-C interrupts at once
        print("\nstopping after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def command_name(module: str, script: str) -> str:
    """How the user called a command, for its usage lines: the console script (``robust-diffusion-train``) or
    ``python -m <module>``."""
    return script if os.path.basename(sys.argv[0]) == script else f"python -m {module}"


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


def name_equals_number(text: str):
    """An argparse type: ``NAME=NUMBER`` (``gamma=5``) as a (name, float) pair."""
    name, sep, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or not name.strip().isidentifier() or number is None:
        raise argparse.ArgumentTypeError(f"must be NAME=NUMBER, e.g. gamma=5, got {text!r}")
    return name.strip(), number


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
