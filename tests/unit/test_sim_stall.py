"""Time within a tick: a VM makes the touches that fit in the tick, faults included, and the
host's policy acts between ticks (SimHost._runnable)."""

from __future__ import annotations

from dataclasses import replace

from simhelpers import SMALL_GUEST, host, vm, workload

from memvisor.backends.sim.config import Phase
from memvisor.model import SetBalloon
from memvisor.units import MiB


def woken(**guest: object):  # type: ignore[no-untyped-def]
    """A 128 MiB guest whose workload touches 100 MiB, goes idle, is ballooned 64 MiB (its
    guest pages the working set out to its own swap), gets the balloon back while still idle
    (no read-back: no agent) and wakes up at 14 s to its whole working set in swap."""
    g = replace(SMALL_GUEST, **guest)  # type: ignore[arg-type]
    busy = Phase(working_set=100 * MiB, access_rate=40_000)
    idle = Phase(working_set=1 * MiB, access_rate=10)
    wl = replace(
        workload(footprint=100 * MiB),
        phases=(replace(busy, duration=4.0), replace(idle, duration=10.0), busy),
    )
    h = host(512 * MiB, [replace(vm("v", wl), guest=g)])
    for t in range(14):
        if t == 5:
            h.apply(SetBalloon("v", 64 * MiB))
        if t == 12:
            h.apply(SetBalloon("v", 0))
        h.step()
    h.step()  # the first busy tick
    return h, h.vm("v")


def test_a_vm_faults_about_a_ticks_worth_of_swap_per_tick() -> None:
    """At 200 us a page a VM can read back at most ~5,000 pages from its swap in a 1 s tick;
    it makes the touches that fit and carries (almost) no stall into the next tick, so the
    next tick it works again: no policy has to wait seconds for it."""
    h, v = woken()
    latency = v.cfg.guest.swap_in_latency
    ins, made = v.last.guest_swap_ins, v.last.accesses
    print(f"swap-ins {ins}, touches made {made} of {v.last.asked}, carried {v.stall_debt:.3f} s")
    assert 0 < ins <= h.dt / latency * 1.01  # what fits in the tick, not the 20,000 asked
    assert made < v.last.asked  # the faults took the time of the other touches
    assert v.stall_debt < 0.2  # only the disk's queueing beyond the latency carries over
    h.step()
    assert v.last.accesses > 0  # the next tick it works again


def test_the_fault_time_is_not_free() -> None:
    """The same wake-up costs the workload touches whatever the latency: slower swap, fewer
    touches made (the time went to the faults, within the tick or carried)."""
    fast, slow = woken(swap_in_latency=50e-6), woken(swap_in_latency=400e-6)
    made = []
    for h, v in (fast, slow):
        total = v.last.accesses
        for _ in range(4):
            h.step()
            total += v.last.accesses
        made.append(total)
    assert made[0] > made[1]


def test_a_vm_without_faults_makes_every_touch() -> None:
    wl = workload(footprint=32 * MiB, working_set=16 * MiB, access_rate=10_000)
    h = host(512 * MiB, [vm("v", wl)])
    for _ in range(3):
        h.step()
    v = h.vm("v")
    assert v.last.accesses == v.last.asked and v.stall_debt == 0.0
