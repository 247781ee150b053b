"""Active-memory estimates (fast/slow averages) and the free-memory state machine."""

from __future__ import annotations

import pytest

from memvisor.errors import InputError
from memvisor.model import HostState
from memvisor.policy.activity import ActivityEstimator, ActivitySettings
from memvisor.policy.states import FreeMemoryStates, StateThresholds, next_state

H, S, D, L = HostState.HIGH, HostState.SOFT, HostState.HARD, HostState.LOW


def test_first_sample_is_the_estimate_and_unknown_is_fully_active() -> None:
    est = ActivityEstimator()
    assert est.estimate("a") == 1.0
    assert est.update("a", 0.0, 0.3) == pytest.approx(0.3)


def test_growth_is_followed_at_once_and_the_fast_average_by_its_half_life() -> None:
    est = ActivityEstimator(ActivitySettings(fast_half_life=10, slow_half_life=120))
    est.update("a", 0.0, 0.1)
    got = est.update("a", 10.0, 0.9)  # one fast half-life later
    assert got == pytest.approx(0.9)  # the slow average holds the new peak
    assert est.recent("a") == pytest.approx(0.1 + 0.5 * 0.8)


def test_a_periodic_vm_keeps_its_busy_working_set_through_its_pauses() -> None:
    """Busy (0.8) and idle (0.05) for 60 s each, ten times: with a plain slow average the
    estimate would settle near the mean (~0.43) and the working set would be reclaimed in
    every pause; the peak-holding average keeps it above 0.7 at the end of every pause."""
    est = ActivityEstimator()
    lowest_in_pauses = 1.0
    for t in range(0, 1200, 10):
        busy = (t // 60) % 2 == 0
        got = est.update("p", float(t), 0.8 if busy else 0.05)
        if not busy and t >= 120:
            lowest_in_pauses = min(lowest_in_pauses, got)
    assert lowest_in_pauses > 0.7
    assert est.recent("p") < 0.1  # the fast average alone says idle


def test_decay_is_followed_slowly() -> None:
    est = ActivityEstimator(ActivitySettings(fast_half_life=10, slow_half_life=120))
    est.update("a", 0.0, 0.9)
    for t in range(1, 61):
        got = est.update("a", float(t), 0.1)
    # after 60 s the slow average has lost only 1 - 2**-0.5 of the gap
    assert got == pytest.approx(0.1 + 0.8 * 2 ** (-0.5), rel=1e-6)


def test_default_fast_average_reacts_within_seconds() -> None:
    est = ActivityEstimator()
    est.update("a", 0.0, 0.0)
    assert est.update("a", 4.0, 1.0) >= 0.75


def test_weights_depend_on_elapsed_time_not_call_count() -> None:
    a, b = ActivityEstimator(), ActivityEstimator()
    a.update("x", 0.0, 0.0)
    b.update("x", 0.0, 0.0)
    a.update("x", 20.0, 1.0)
    for t in (5.0, 10.0, 15.0, 20.0):
        b.update("x", t, 1.0)
    assert a.estimate("x") == pytest.approx(b.estimate("x"))


def test_missing_and_repeated_and_bad_samples() -> None:
    est = ActivityEstimator()
    est.update("a", 0.0, 0.5)
    assert est.update("a", 5.0, None) == pytest.approx(0.5)
    assert est.update("a", 0.0, 1.0) == pytest.approx(0.5)  # not newer: ignored
    est.update("b", 0.0, 7.5)  # untrusted guest value: clamped
    assert est.estimate("b") == 1.0
    with pytest.raises(InputError):
        ActivitySettings(fast_half_life=100, slow_half_life=10)


@pytest.mark.parametrize(
    ("current", "free", "expected"),
    [
        (H, 0.050, H),  # 4-6% band: stays HIGH coming from above
        (H, 0.039, S),
        (H, 0.019, D),
        (H, 0.009, L),
        (S, 0.050, S),  # ... and stays SOFT coming from below
        (S, 0.060, H),
        (S, 0.030, S),
        (D, 0.039, D),
        (D, 0.040, S),
        (D, 0.070, H),
        (D, 0.015, D),
        (L, 0.015, L),
        (L, 0.020, D),
        (L, 0.045, S),
    ],
)
def test_state_transitions_with_hysteresis(
    current: HostState, free: float, expected: HostState
) -> None:
    assert next_state(current, free, StateThresholds()) is expected


def test_state_machine_remembers_and_describes() -> None:
    m = FreeMemoryStates()
    assert m.update(31, 1000) == (H, S)
    assert m.describe(31, 1000) == "SOFT (free 3.1% < 4%)"
    assert m.update(50, 1000) == (S, S)
    assert m.describe(50, 1000) == "SOFT (free 5.0%, leaves at 6%)"
    assert m.update(60, 1000) == (S, H)


def test_bad_thresholds_are_refused() -> None:
    with pytest.raises(InputError, match="high > soft"):
        StateThresholds(high=0.03, soft=0.04)
    with pytest.raises(InputError):
        FreeMemoryStates().update(0, 0)
