"""Workloads that free memory (a phase with ``release``): the guest knows the pages are free,
the host does not. The balloon takes them without any I/O; the host kernel can only swap them
out (writing garbage) and, when the guest reuses them, read the garbage back."""

from __future__ import annotations

import dataclasses

import pytest
from simhelpers import host, vm

from memvisor.backends.sim.config import Phase, Workload
from memvisor.backends.sim.host import SimHost
from memvisor.model import SetBalloon
from memvisor.units import MiB

MEMORY = 256 * MiB


def job_then_exit(release: bool) -> Workload:
    """200 MiB touched for 5 s, then a phase that keeps 8 MiB (and frees the rest if asked)."""
    return Workload(
        name="job",
        footprint=200 * MiB,
        phases=(
            Phase(duration=5.0, working_set=200 * MiB, access_rate=20_000),
            Phase(working_set=8 * MiB, access_rate=100, release=release),
        ),
    )


def run(release: bool, seconds: int = 8, memory: int = 1024 * MiB) -> SimHost:
    h = host(memory, [vm("a", job_then_exit(release), MEMORY)], seed=1)
    for _ in range(seconds):
        h.step()
    assert h.check() == []  # conservation, guest and host views agree
    return h


def test_released_pages_are_free_in_the_guest_but_still_backed_on_the_host() -> None:
    kept, freed = run(False), run(True)
    ok, of = kept.observe_vms()[0], freed.observe_vms()[0]
    assert ok.guest_free is not None and of.guest_free is not None
    # the guest got ~192 MiB back on its free list...
    assert of.guest_free - ok.guest_free == pytest.approx(192 * MiB, abs=8 * MiB)
    # ... which the host still backs: it cannot tell
    assert of.consumed == pytest.approx(ok.consumed, abs=4 * MiB)


def test_the_balloon_takes_released_memory_without_paging() -> None:
    h = run(True)
    before = h.observe_vms()[0]
    result = h.apply(SetBalloon("a", 160 * MiB))
    for _ in range(3):
        h.step()
    after = h.observe_vms()[0]
    assert after.ballooned == pytest.approx(160 * MiB, abs=4 * MiB)
    assert before.consumed - after.consumed >= 150 * MiB  # host frames freed
    assert h.vm("a").guest_swap_used == 0  # the guest paged nothing out
    assert result.ok
    assert h.check() == []


def test_without_release_the_same_balloon_makes_the_guest_page() -> None:
    h = run(False)
    h.apply(SetBalloon("a", 160 * MiB))
    for _ in range(3):
        h.step()
    assert h.vm("a").guest_swap_used * 4096 >= 100 * MiB


def test_reused_pages_the_host_swapped_are_read_back() -> None:
    """The host swaps the released (garbage) pages under pressure; when the job runs again the
    guest allocates those free pages and the host must read the garbage back first."""
    wl = job_then_exit(True)
    again = dataclasses.replace(
        wl,
        phases=(
            *wl.phases[:1],
            dataclasses.replace(wl.phases[1], duration=5.0),
            Phase(working_set=200 * MiB, access_rate=20_000),
        ),
    )
    # a VM that grows after the job has exited: the host must reclaim, and the oldest pages
    # it can find are the released garbage
    hog = Workload(
        name="hog", footprint=240 * MiB, prefill=40 * MiB, phases=(Phase(working_set=240 * MiB),)
    )
    h = host(
        400 * MiB, [vm("a", again, MEMORY), vm("hog", hog, MEMORY)], seed=2, swap_victims="lru"
    )
    swap_ins = 0
    for t in range(16):
        h.step()
        if t >= 10:
            swap_ins += h.vm("a").last.host_swap_ins
        assert h.check() == []
    assert swap_ins > 10 * 256  # more than 10 MiB of garbage read back from host swap
