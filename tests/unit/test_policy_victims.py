"""Share-aware victim choice: yield per reclaimed page, order, and the split of a need."""

from __future__ import annotations

import dataclasses

import pytest
from policy_snapshots import vm

from memvisor.policy.victims import Candidate, expected_yield, order, split
from memvisor.units import MiB


def test_yield_comes_from_the_sample() -> None:
    _, obs = vm("a", freed_per_page=0.4)
    y, stat = expected_yield(obs)
    assert y == pytest.approx(0.4) and "harmonic" in stat and "1000 sampled" in stat


def test_yield_without_sample_is_estimated_from_shared_bytes() -> None:
    _, obs = vm("a", consumed=1000 * MiB, shared=500 * MiB)
    y, stat = expected_yield(obs)
    assert y == pytest.approx(0.75) and "no sample" in stat


def test_untrusted_sample_values_are_clamped() -> None:
    _, obs = vm("a", freed_per_page=0.5)
    assert obs.sharing is not None
    bad = dataclasses.replace(
        obs, sharing=dataclasses.replace(obs.sharing, expected_freed_per_page=9.0)
    )
    assert expected_yield(bad)[0] == 1.0


def test_order_highest_yield_then_lowest_ratio_then_largest_excess() -> None:
    cs = [
        Candidate("shared", 100, 0.2, "", 1.0),
        Candidate("rich", 100, 1.0, "", 50.0),
        Candidate("poor", 100, 1.0, "", 5.0),
        Candidate("poor-big", 200, 1.0, "", 5.0),
    ]
    assert [c.name for c in order(cs)] == ["poor-big", "poor", "rich", "shared"]


def test_idle_vm_goes_before_a_busy_one_with_a_slightly_better_yield() -> None:
    busy = Candidate("busy", 100, 0.9, "", 1.0, active=0.8)  # net 0.18
    idle = Candidate("idle", 100, 0.7, "", 1.0, active=0.03)  # net 0.68
    assert [c.name for c in order([busy, idle])] == ["idle", "busy"]
    assert "net freed/page 0.68" in idle.describe() and "idle 97%" in idle.describe()


def test_split_takes_from_the_first_victim_then_the_next() -> None:
    a = Candidate("a", 100 * MiB, 1.0, "", 1.0)
    b = Candidate("b", 500 * MiB, 0.5, "", 1.0)
    shares = split([a, b], 200 * MiB)
    assert [(s.candidate.name, s.reclaim) for s in shares] == [("a", 100 * MiB), ("b", 200 * MiB)]
    assert sum(s.expected_freed for s in shares) == 200 * MiB


def test_split_never_takes_more_than_the_excess() -> None:
    a = Candidate("a", 10 * MiB, 1.0, "", 1.0)
    shares = split([a], 200 * MiB)
    assert shares[0].reclaim == 10 * MiB
