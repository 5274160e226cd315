"""Custom sigma schedules at any step count. Pure functions, no torch: unit-tested on their own."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def resample_sigmas(sigmas: Sequence[float], steps: int) -> list[float]:
    """A schedule published for `len(sigmas)` steps, at `steps` steps.

    The published sigmas are read as a curve over evenly spaced positions (linear between them) and the curve
    is sampled at `steps` evenly spaced positions from its first point to its last: both endpoints are kept,
    a decreasing schedule stays strictly decreasing, and at the published count the sigmas come back exactly
    as published (so Turbo's 8 steps run fal's own sigmas, bit for bit). One step runs the first sigma alone.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if steps == len(sigmas):
        return list(sigmas)
    knots = np.arange(len(sigmas))
    return [float(s) for s in np.interp(np.linspace(0, len(sigmas) - 1, steps), knots, sigmas)]
