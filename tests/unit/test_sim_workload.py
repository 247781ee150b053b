"""Synthetic workload draws: the Zipf law of the touches, phases and rates."""

from __future__ import annotations

import numpy as np
import pytest

from memvisor.backends.sim.workload import zipf_ranks


@pytest.mark.parametrize("skew", [0.5, 1.0, 1.5])
def test_zipf_ranks_follow_the_power_law(skew: float) -> None:
    rng = np.random.default_rng(0)
    n_items = 1000
    ranks = zipf_ranks(rng, n_items, skew, 400_000)
    assert ranks.min() >= 0 and ranks.max() < n_items
    freq = np.bincount(ranks, minlength=n_items).astype(float)
    # the frequency ratio between ranks r1 and r2 is about ((r2 + 1) / (r1 + 1)) ** skew
    for r1, r2 in ((9, 99), (49, 499)):
        lo, hi = freq[r1 - 2 : r1 + 3].mean(), freq[r2 - 2 : r2 + 3].mean()
        expected = ((r2 + 1) / (r1 + 1)) ** skew
        assert lo / hi == pytest.approx(expected, rel=0.25)


def test_zero_skew_is_uniform() -> None:
    ranks = zipf_ranks(np.random.default_rng(1), 100, 0.0, 200_000)
    freq = np.bincount(ranks, minlength=100)
    assert freq.min() > 0.85 * 2000 and freq.max() < 1.15 * 2000


def test_empty_draws() -> None:
    rng = np.random.default_rng(2)
    assert zipf_ranks(rng, 0, 1.0, 10).size == 0
    assert zipf_ranks(rng, 10, 1.0, 0).size == 0
