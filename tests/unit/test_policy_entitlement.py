"""Entitlement: share-based water-filling with the idle memory tax, bounds and the pool tree."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memvisor.errors import InputError
from memvisor.policy.entitlement import (
    PoolClaim,
    VMClaim,
    allocate,
    idle_cost_factor,
    iterative_reclaim,
    shares_per_page,
    water_fill,
)
from memvisor.units import GiB, MiB


def test_equal_shares_no_tax_split_evenly() -> None:
    got = water_fill(1000.0, [1, 1], [0, 0], [1000, 1000], [0, 0], tax=0.0)
    assert got.tolist() == pytest.approx([500, 500])


def test_shares_divide_proportionally() -> None:
    got = water_fill(900.0, [2, 1], [0, 0], [1000, 1000], [1000, 1000], tax=0.75)
    assert got.tolist() == pytest.approx([600, 300])


def test_idle_tax_moves_memory_from_idle_to_active_by_the_formula() -> None:
    # idle VM: 100 MiB active; active VM: all active. k = 4. Equal ratios: P_a = 4 P_i - 300,
    # P_a + P_i = 1500  =>  P_i = (1500 + 300) / 5 = 360, P_a = 1140.
    got = water_fill(1500.0, [1, 1], [0, 0], [2048, 2048], [100, 2048], tax=0.75)
    assert got.tolist() == pytest.approx([360, 1140])
    untaxed = water_fill(1500.0, [1, 1], [0, 0], [2048, 2048], [100, 2048], tax=0.0)
    assert untaxed.tolist() == pytest.approx([750, 750])


def test_ratio_is_waldspurgers_formula() -> None:
    s, p, f, tax = 1000.0, 512 * MiB, 0.3, 0.75
    k = 1 / (1 - tax)
    expected = s / ((p / MiB) * (f + k * (1 - f)))
    assert shares_per_page(s, p, f * p, tax) == pytest.approx(expected)
    assert idle_cost_factor(0.75) == pytest.approx(4.0)


def test_reservation_is_a_floor_and_limit_a_ceiling() -> None:
    got = water_fill(1000.0, [1, 100, 1], [300, 0, 0], [1000, 200, 1000], [0, 0, 0], tax=0.0)
    # VM1 gets its reservation although its ratio is low; VM2 is capped at its limit; the rest
    # goes to VM3 up to its fair level
    assert got[0] >= 300 and got[1] == pytest.approx(200)
    assert got.sum() == pytest.approx(1000)


def test_capacity_below_reservations_gives_reservations() -> None:
    got = water_fill(100.0, [1, 1], [80, 80], [200, 200], [0, 0])
    assert got.tolist() == [80, 80]


def test_capacity_above_limits_gives_limits() -> None:
    got = water_fill(10_000.0, [1, 1], [0, 0], [200, 300], [0, 0])
    assert got.tolist() == [200, 300]


def test_zero_shares_gets_only_its_reservation() -> None:
    got = water_fill(1000.0, [0, 1], [50, 0], [1000, 1000], [0, 0])
    assert got.tolist() == pytest.approx([50, 950])


def test_bad_tax_is_refused() -> None:
    with pytest.raises(InputError, match="tax"):
        water_fill(1.0, [1], [0], [1], [0], tax=1.0)


def test_a_holder_pinned_at_zero_does_not_inflate_the_others() -> None:
    """Found by the property test below: a VM whose limit and activity are 0 (lo == hi ==
    active) made the level solver overshoot, and its neighbour got 104 MiB of 100."""
    vms = [
        VMClaim("vm0", 100, 0, 0, 0, demand=None),
        VMClaim("vm1", 100, 0, 104 * MiB, 0, demand=None),
    ]
    got = allocate(vms, 100 * MiB, tax=0.75).entitlement
    assert got["vm0"] == 0 and got["vm1"] == pytest.approx(100 * MiB)


claims = st.lists(
    st.tuples(
        st.integers(1, 50),  # shares
        st.integers(0, 300),  # reservation MiB
        st.integers(0, 1200),  # limit above reservation MiB
        st.floats(0.0, 1.0),  # active fraction of the limit
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(claims, st.integers(100, 4000))
def test_water_fill_equals_iterative_min_ratio_reclaim(spec: list, cap_mib: int) -> None:
    vms = [
        VMClaim(f"vm{i}", s * 100, r * MiB, (r + x) * MiB, int(f * (r + x) * MiB), demand=None)
        for i, (s, r, x, f) in enumerate(spec)
    ]
    capacity = cap_mib * MiB
    fast = allocate(list(vms), capacity, tax=0.75).entitlement
    slow = iterative_reclaim(capacity, vms, tax=0.75, step=MiB)
    for v in vms:
        # the page-by-page rule moves 1 MiB at a time, so it can differ by a step per VM
        assert abs(fast[v.name] - slow[v.name]) <= (len(vms) + 1) * MiB, v


def test_pool_tree_divides_pool_allocation_among_children() -> None:
    a = PoolClaim(
        "a",
        2,
        0,
        None,
        (VMClaim("a1", 1, 0, 4 * GiB, 4 * GiB), VMClaim("a2", 1, 0, 4 * GiB, 4 * GiB)),
    )
    b = PoolClaim("b", 1, 0, None, (VMClaim("b1", 1, 0, 4 * GiB, 4 * GiB),))
    alloc = allocate(PoolClaim("root", 1, 0, None, (a, b)), 3 * GiB, tax=0.0)
    assert alloc.of("a") == pytest.approx(2 * GiB, abs=2)
    assert alloc.of("b") == pytest.approx(1 * GiB, abs=2)
    assert alloc.of("a1") == pytest.approx(1 * GiB, abs=2)
    assert alloc.of("b1") == pytest.approx(1 * GiB, abs=2)


def test_pool_limit_caps_and_surplus_goes_to_sibling() -> None:
    a = PoolClaim("a", 1, 0, 1 * GiB, (VMClaim("a1", 1, 0, 4 * GiB, 4 * GiB),))
    b = PoolClaim("b", 1, 0, None, (VMClaim("b1", 1, 0, 4 * GiB, 4 * GiB),))
    alloc = allocate([a, b], 3 * GiB, tax=0.0)
    assert alloc.of("a1") == pytest.approx(1 * GiB, abs=2)
    assert alloc.of("b1") == pytest.approx(2 * GiB, abs=2)


def test_pool_reservation_is_kept_for_its_children() -> None:
    a = PoolClaim("a", 1, 2 * GiB, None, (VMClaim("a1", 1, 0, 4 * GiB, 4 * GiB),))
    b = PoolClaim("b", 100, 0, None, (VMClaim("b1", 1, 0, 4 * GiB, 4 * GiB),))
    alloc = allocate([a, b], 3 * GiB, tax=0.0)
    assert alloc.of("a1") >= 2 * GiB - 2


def test_demand_caps_the_claim() -> None:
    alloc = allocate(
        [VMClaim("x", 1, 0, 4 * GiB, 0, demand=GiB), VMClaim("y", 1, 0, 4 * GiB, 0)],
        4 * GiB,
        tax=0.0,
    )
    assert alloc.of("x") == GiB and alloc.of("y") == 3 * GiB


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(InputError, match="twice"):
        allocate([VMClaim("x", 1, 0, 1, 0), VMClaim("x", 1, 0, 1, 0)], 1)


def test_ratio_reported_is_infinite_for_empty_holder() -> None:
    assert math.isinf(shares_per_page(1, 0, 0, 0.75))
