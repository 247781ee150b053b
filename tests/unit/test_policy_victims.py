"""Share-aware victim choice: yield per reclaimed page, order, and the spread of a need."""

from __future__ import annotations

import dataclasses

import pytest
from policy_snapshots import vm

from memvisor.policy.victims import Candidate, expected_yield, order, spread
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


def test_a_clearly_better_yield_gives_first_then_the_next() -> None:
    a = Candidate("a", 100 * MiB, 1.0, "", 1.0)
    b = Candidate("b", 500 * MiB, 0.5, "", 1.0)
    asks = spread([a, b], 200 * MiB, band=0.1)
    # a frees a page per page; b half a page: 100 MiB more freed costs it 200 MiB
    assert asks == {"a": 100 * MiB, "b": 200 * MiB}


def test_never_more_than_the_excess() -> None:
    a = Candidate("a", 10 * MiB, 1.0, "", 1.0)
    assert spread([a], 200 * MiB, band=0.1) == {"a": 10 * MiB}
    assert spread([a], 0, band=0.1) == {}


def test_victims_alike_give_down_to_a_common_level() -> None:
    """Three idle VMs of about the same yield: the one holding most above its entitlement
    gives first, and none is squeezed below the level the others keep; the order (names)
    does not single one out, as taking all from the first one did."""
    cs = order(
        [
            Candidate("a", 100 * MiB, 0.70, "", 1.0),
            Candidate("b", 300 * MiB, 0.65, "", 1.0),
            Candidate("c", 200 * MiB, 0.68, "", 1.0),
        ]
    )
    need = int(0.7 * 150 * MiB)
    asks = spread(cs, need, band=0.1)
    left = {c.name: c.excess - asks.get(c.name, 0) for c in cs}
    freed = sum(asks.get(c.name, 0) * c.freed_per_page for c in cs)
    assert need <= freed <= need + 3 * 4096
    assert asks.get("a", 0) == 0  # a holds least above entitlement: the level is above it
    assert abs(left["b"] - left["c"]) <= 4096  # b and c are left at the same level
    # one at a time in order (band None) takes it all from the first, the old rule
    one_by_one = spread(cs, need, band=None)
    assert one_by_one["a"] == 100 * MiB and set(one_by_one) == {"a", "c"}
