"""Turbo's sigmas at any step count: fal's own 8 exactly, other counts read off the same curve."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipelines.contract.schedules import resample_sigmas
from pipelines.contract.specs import TURBO_SIGMAS


def test_the_published_count_gives_the_published_sigmas_exactly() -> None:
    assert resample_sigmas(TURBO_SIGMAS, 8) == list(TURBO_SIGMAS)


@pytest.mark.parametrize("steps", [2, 3, 4, 7, 9, 12, 28, 50])
def test_other_counts_keep_the_endpoints_and_decrease(steps: int) -> None:
    sigmas = resample_sigmas(TURBO_SIGMAS, steps)
    assert len(sigmas) == steps
    assert (sigmas[0], sigmas[-1]) == (TURBO_SIGMAS[0], TURBO_SIGMAS[-1])
    assert all(a > b for a, b in itertools.pairwise(sigmas))
    assert all(isinstance(s, float) for s in sigmas)


def test_points_lie_on_the_published_curve() -> None:
    # 15 steps put every other point on a published sigma and the rest halfway between two.
    sigmas = resample_sigmas(TURBO_SIGMAS, 15)
    assert sigmas[::2] == list(TURBO_SIGMAS)
    halfway = [(a + b) / 2 for a, b in itertools.pairwise(TURBO_SIGMAS)]
    assert np.allclose(sigmas[1::2], halfway, rtol=0, atol=1e-12)
    # 4 steps read the curve at positions 0, 7/3, 14/3 and 7 of the published 0..7.
    thirds = [0.4374 - (0.4374 - 0.2932) / 3, 0.1893 - 2 * (0.1893 - 0.1108) / 3]
    assert resample_sigmas(TURBO_SIGMAS, 4) == pytest.approx([1.0, *thirds, 0.00031], abs=1e-12)


def test_one_step_runs_the_first_sigma() -> None:
    assert resample_sigmas(TURBO_SIGMAS, 1) == [1.0]
    with pytest.raises(ValueError):
        resample_sigmas(TURBO_SIGMAS, 0)
