"""virtio-balloon inflation is bounded by what the guest says it can give (the guest cannot
refuse the driver: inflating past its available memory OOM-kills /init and panics it)."""

from __future__ import annotations

from memvisor.backends.qemu.actions import GUEST_KEEP, guest_room
from memvisor.units import MiB


def test_growth_is_limited_to_reported_available_less_the_keep() -> None:
    stats = {"stat-available-memory": 100 * MiB}
    assert guest_room(192 * MiB, 0, stats) == (100 * MiB - GUEST_KEEP, True)
    # growing from an existing balloon: what it holds plus what the guest can still give
    assert guest_room(192 * MiB, 64 * MiB, stats) == (64 * MiB + 100 * MiB - GUEST_KEEP, True)


def test_within_room_shrinking_and_unknown_stats_pass_unchanged() -> None:
    stats = {"stat-available-memory": 300 * MiB}
    assert guest_room(96 * MiB, 0, stats) == (96 * MiB, False)
    assert guest_room(0, 192 * MiB, {"stat-available-memory": 0}) == (0, False)  # deflate
    assert guest_room(192 * MiB, 0, {}) == (192 * MiB, False)  # no statistics yet


def test_a_guest_with_less_than_the_keep_gets_no_more_balloon() -> None:
    assert guest_room(128 * MiB, 32 * MiB, {"stat-available-memory": 16 * MiB}) == (32 * MiB, True)
