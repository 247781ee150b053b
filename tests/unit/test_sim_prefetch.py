"""The simulated agent's bulk read-back of guest swap (GuestConfig.prefetch), as the real
agent does it (tests/e2e/test_agent_e2e.py): only on a release while the guest pages in."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from simhelpers import SMALL_GUEST, host, vm, workload

from memvisor.backends.sim.config import GuestConfig
from memvisor.backends.sim.vm import L_GSWAPPED
from memvisor.model import SetBalloon
from memvisor.sim import SimHost
from memvisor.units import MiB


def released(guest: GuestConfig, working_set: int) -> SimHost:
    """A 128 MiB guest whose workload (100 MiB touched) had 64 MiB ballooned for 5 ticks (it
    paged out), just released: the host before the next tick."""
    wl = workload(footprint=100 * MiB, working_set=working_set, access_rate=20_000)
    h = host(512 * MiB, [replace(vm("v", wl), guest=guest)])
    h.step()
    h.apply(SetBalloon("v", 64 * MiB))
    for _ in range(5):
        h.step()
    h.apply(SetBalloon("v", 0))
    return h


def run(prefetch: bool, working_set: int) -> tuple[int, int, int]:
    """Release (above); returns (pages prefetched, guest swap-ins in the 3 ticks after, pages
    still swapped). A tick's stats include what an action just before it did."""
    h = released(replace(SMALL_GUEST, prefetch=prefetch), working_set)
    v = h.vm("v")
    prefetched = swapins = 0
    for _ in range(3):
        h.step()
        prefetched += v.last.guest_prefetched
        swapins += v.last.guest_swap_ins
    assert not h.check()
    return prefetched, swapins, int(np.count_nonzero(v.lstate == L_GSWAPPED))


def test_a_release_while_the_workload_faults_back_reads_the_swap_in_bulk() -> None:
    plain = run(prefetch=False, working_set=100 * MiB)
    agent = run(prefetch=True, working_set=100 * MiB)
    print(f"plain balloon: {plain}, agent: {agent} (prefetched, swap-ins after, still swapped)")
    assert plain[0] == 0 and plain[1] > 1000  # faulted back one page at a time
    assert agent[0] > 1000 and agent[1] < plain[1] // 4 and agent[2] <= plain[2]


def test_no_read_back_when_the_guest_is_not_paging_in() -> None:
    idle = run(prefetch=True, working_set=4 * MiB)  # the balloon took only cold pages
    assert idle[0] == 0 and idle[2] > 0  # they stay in the guest's swap


def paced(rate: int, reinflate: bool = False) -> list[int]:
    """Pages read back in each tick after the release (above), the busy workload faulting its
    pages back, with the agent paced at ``rate`` bytes/s (0: all at once); with
    ``reinflate`` the host asks for 32 MiB again one tick after the release."""
    h = released(replace(SMALL_GUEST, prefetch=True, prefetch_rate=rate), 100 * MiB)
    v = h.vm("v")
    per_tick = []
    for k in range(5):
        if reinflate and k == 1:
            h.apply(SetBalloon("v", 32 * MiB))
        h.step()
        per_tick.append(v.last.guest_prefetched)
    assert not h.check()
    return per_tick


def test_the_read_back_is_paced_and_a_new_inflation_stops_it() -> None:
    at_once, slow = paced(0), paced(4 * MiB)
    print(f"pages read back per tick: at once {at_once}, at 4 MiB/s {slow}")
    step = 4 * MiB // 4096
    assert at_once[0] > 2 * step and sum(at_once[1:]) < step // 4  # one tick does it all
    assert all(n <= step for n in slow)  # never above the rate
    assert slow[0] == step and slow[1] > step // 2  # the rest on the next ticks
    stopped = paced(4 * MiB, reinflate=True)
    assert stopped[0] == step and sum(stopped[1:]) == 0  # the host reserved again: it stops
