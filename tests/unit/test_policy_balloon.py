"""The per-VM balloon controller: tracking, dead band, rate, floor, back-off, step response."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from policy_snapshots import vm

from memvisor.errors import InputError
from memvisor.model import VMObservation, VMSpec
from memvisor.policy.balloon import BalloonController, BalloonSettings
from memvisor.units import MiB

BIG = BalloonSettings(max_inflate_rate=10_000 * MiB, max_deflate_rate=10_000 * MiB)


def test_inflates_by_gain_times_error() -> None:
    spec, obs = vm("a", guest_free=900 * MiB)
    step = BalloonController(BIG).step(obs, spec, 400 * MiB, 0.0)
    assert step.target == 200 * MiB and not step.limited


def test_error_inside_dead_band_changes_nothing() -> None:
    spec, obs = vm("a", balloon=100 * MiB)
    step = BalloonController(BIG).step(obs, spec, 103 * MiB, 0.0)
    assert step.target == 100 * MiB and step.note == "within dead band"


def test_inflation_is_rate_limited_per_second() -> None:
    s = dataclasses.replace(BIG, max_inflate_rate=32 * MiB)
    c = BalloonController(s)
    spec, obs = vm("a", guest_free=900 * MiB)
    assert c.step(obs, spec, 800 * MiB, 0.0).target == 32 * MiB  # nominal 1 s first tick
    assert c.step(obs, spec, 800 * MiB, 2.0).target == 64 * MiB  # 2 s later


def test_never_inflates_past_the_guest_free_floor() -> None:
    spec, obs = vm("a", guest_free=100 * MiB)  # floor: 5% of 1 GiB = 51 MiB
    step = BalloonController(BIG).step(obs, spec, 800 * MiB, 0.0)
    floor = BIG.floor(spec.memory)
    assert step.target == 100 * MiB - floor and step.limited


def test_deflates_when_guest_free_is_under_the_floor() -> None:
    spec, obs = vm("a", balloon=300 * MiB, guest_free=2 * MiB)
    step = BalloonController(BIG).step(obs, spec, 600 * MiB, 0.0)
    assert step.target < 300 * MiB and step.limited
    assert 300 * MiB - step.target >= BIG.floor(spec.memory) - 2 * MiB


def test_idle_guest_memory_counts_as_headroom() -> None:
    # 1 GiB guest, 20 MiB free, 30% active: about 700 MiB of cache and cold pages it can give
    spec, obs = vm("a", guest_free=20 * MiB, active=0.3)
    step = BalloonController(BIG).step(obs, spec, 600 * MiB, 0.0)
    assert step.target == 300 * MiB and not step.limited
    step = BalloonController(BIG).step(obs, spec, 600 * MiB, 0.0, active=0.99)
    assert step.target < 20 * MiB and step.limited


def test_backs_off_and_holds_when_guest_pages_out_reserved_pages() -> None:
    c = BalloonController(BIG)
    spec, obs = vm("a", balloon=400 * MiB, reserved_rate=100.0)
    step = c.step(obs, spec, 600 * MiB, 0.0)
    # multiplicative decrease: three quarters of the balloon go back (backoff 0.75)
    assert step.target == 100 * MiB and step.limited and "reserved pages" in step.note
    calm = dataclasses.replace(obs, reserved_paged_out_rate=0.0, balloon_target=step.target)
    held = c.step(calm, spec, 600 * MiB, 10.0)
    assert held.target == 100 * MiB and held.limited and "holding" in held.note
    later = c.step(calm, spec, 600 * MiB, 16.0)
    assert later.target > 100 * MiB


def test_back_off_gives_back_at_least_twice_what_the_guest_pages() -> None:
    spec, obs = vm("a", balloon=400 * MiB, reserved_rate=100_000.0)  # 390 MiB/s
    step = BalloonController(BIG).step(obs, spec, 600 * MiB, 0.0)
    assert step.target == 0


def test_guest_paging_also_backs_off() -> None:
    spec, obs = vm("a", balloon=400 * MiB, guest_paging=5000.0)
    step = BalloonController(BIG).step(obs, spec, 600 * MiB, 0.0)
    assert step.target < 400 * MiB and "swaps out" in step.note


def test_guest_paging_caused_by_our_own_inflation_is_not_pressure() -> None:
    c = BalloonController(BIG)
    spec, obs = vm("a", guest_free=900 * MiB, active=0.1)
    first = c.step(obs, spec, 400 * MiB, 0.0)  # asks 200 MiB: 51200 pages in 1 s
    paging = dataclasses.replace(
        obs, balloon_target=first.target, ballooned=first.target, guest_swapped_out_rate=40000.0
    )
    assert c.step(paging, spec, 400 * MiB, 1.0).target > first.target


def test_reservation_is_never_ballooned() -> None:
    spec, obs = vm("a", reservation=768 * MiB, guest_free=1000 * MiB)
    c = BalloonController(dataclasses.replace(BIG, gain=1.0))
    assert c.step(obs, spec, 1000 * MiB, 0.0).target == 256 * MiB


def test_bad_settings_are_refused() -> None:
    with pytest.raises(InputError, match="gain"):
        BalloonSettings(gain=0.0)


class ToyGuest:
    """A guest whose free memory is what the balloon and its own use leave; a balloon request
    is honoured one tick later (in flight for a tick)."""

    def __init__(self, memory: int, used: int) -> None:
        self.spec = VMSpec("g", memory)
        self.used = used
        self.balloon = 0
        self.requested = 0

    def observe(self, t: float) -> VMObservation:
        return vm(
            "g",
            self.spec.memory,
            consumed=self.used,
            balloon=self.balloon,
            guest_free=self.spec.memory - self.used - self.balloon,
            time=t,
        )[1]

    def tick(self, target: int) -> None:
        self.balloon = self.requested
        self.requested = target


@pytest.mark.parametrize("desired_mib", [200, 600, 900])
def test_step_response_settles_without_oscillation_or_floor_overshoot(desired_mib: int) -> None:
    guest = ToyGuest(1024 * MiB, used=300 * MiB)
    c = BalloonController()
    floor = c.settings.floor(guest.spec.memory)
    targets = []
    for t in range(40):
        obs = guest.observe(float(t))
        obs = dataclasses.replace(obs, balloon_target=guest.requested)
        step = c.step(obs, guest.spec, desired_mib * MiB, float(t))
        guest.tick(step.target)
        targets.append(step.target)
        assert guest.spec.memory - guest.used - guest.requested >= floor  # never past the floor
    reachable = min(desired_mib * MiB, guest.spec.memory - guest.used - floor)
    settled = next(i for i, x in enumerate(targets) if x == targets[-1])
    assert settled <= 12  # stated bound: ceil(log2(err0 / dead band)) + 2 ticks
    assert abs(targets[-1] - reachable) <= c.settings.dead_band
    diffs = [b - a for a, b in itertools.pairwise(targets)]
    assert all(d >= 0 for d in diffs)  # monotone: no overshoot, no oscillation
