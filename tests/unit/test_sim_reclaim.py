"""Known results of reclamation, with the allocation computed in the test (not the scheduler):

- idle memory tax: two VMs with equal shares, one idle and one active, host overcommitted. With
  tax 0 memory splits evenly; with tax 0.75 the idle VM gives memory to the active one and the
  active VM's throughput rises (Waldspurger 2002, section 5.2);
- ballooning costs the VM less throughput than hypervisor swapping of the same amount.
"""

from __future__ import annotations

import numpy as np
import pytest
from simhelpers import host, vm, workload

from memvisor.backends.sim.host import SimHost
from memvisor.model import SetBalloon, SetSwapTarget
from memvisor.units import MiB

MEMORY = 256 * MiB


def idle_and_busy() -> SimHost:
    idle = workload("idle", footprint=200 * MiB, working_set=4 * MiB, access_rate=50)
    busy = workload("busy", footprint=200 * MiB, working_set=200 * MiB, access_rate=20000)
    vms = [vm("idle", idle, MEMORY), vm("busy", busy, MEMORY)]
    return host(340 * MiB, vms, seed=3, active_sample_pages=400, active_sample_period=5.0)


def taxed_allocation(h: SimHost, budget: int, tax: float, step: int = MiB) -> dict[str, int]:
    """Iterative reclaim: take memory from the VM with the lowest shares per taxed page
    rho = S / (P (f + k (1 - f))), k = 1 / (1 - tax), until the VMs fit in ``budget``."""
    k = 1.0 / (1.0 - tax)
    obs = {o.name: o for o in h.observe_vms()}
    shares = {s.name: s.effective_shares for s in h.specs()}
    held = {name: MEMORY for name in obs}
    while sum(held.values()) > budget:

        def rho(name: str) -> float:
            f = obs[name].active_fraction or 0.0
            return shares[name] / (held[name] * (f + k * (1.0 - f)))

        victim = min(held, key=rho)
        held[victim] -= step
    return held


def run_with_tax(tax: float) -> tuple[dict[str, int], dict[str, float], SimHost]:
    h = idle_and_busy()
    for _ in range(12):  # long enough for two working-set samples
        h.step()
    alloc = taxed_allocation(h, 320 * MiB, tax)
    for name, entitled in alloc.items():  # balloon toward the entitlement, swap the rest
        h.apply(SetBalloon(name, MEMORY - entitled))
        h.apply(SetSwapTarget(name, entitled))
    tp: dict[str, list[float]] = {"idle": [], "busy": []}
    for i in range(30):
        h.step()
        if i >= 15:
            for o in h.observe_vms():
                tp[o.name].append(o.throughput or 0.0)
        assert h.check() == []
    return alloc, {k: float(np.mean(v)) for k, v in tp.items()}, h


@pytest.mark.timeout(120)
def test_idle_memory_tax_moves_memory_to_the_active_vm() -> None:
    even, tp0, h0 = run_with_tax(0.0)
    taxed, tp75, h75 = run_with_tax(0.75)
    # the estimate is sampled: the idle VM looks idle, the busy one busy
    obs = {o.name: o for o in h75.observe_vms()}
    assert obs["idle"].active_fraction is not None and obs["idle"].active_fraction < 0.2
    assert obs["busy"].active_fraction is not None and obs["busy"].active_fraction > 0.5
    # tax 0: an even split, and the host really holds them evenly
    assert abs(even["idle"] - even["busy"]) <= MiB
    c0 = {o.name: o.consumed for o in h0.observe_vms()}
    assert all(c0[name] <= even[name] for name in c0)
    assert c0["busy"] > even["busy"] - 8 * MiB  # the busy VM uses all it is given
    # tax 0.75: the idle VM gives memory to the busy one, whose throughput rises
    assert taxed["busy"] > even["busy"] + 40 * MiB
    c75 = {o.name: o.consumed for o in h75.observe_vms()}
    assert c75["busy"] > c0["busy"] + 40 * MiB
    assert tp75["busy"] > 1.5 * tp0["busy"]
    assert tp75["idle"] > 0.9 * tp0["idle"]  # and the idle VM barely notices


def reclaim_case() -> SimHost:
    # guest RAM is full of page cache and anonymous memory, as after a long uptime
    wl = workload(footprint=150 * MiB, page_cache=90 * MiB, working_set=96 * MiB, access_rate=5000)
    return host(512 * MiB, [vm("v", wl, MEMORY)], seed=5)


def run_reclaim(action_for: object, ticks: int = 20) -> tuple[int, float]:
    h = reclaim_case()
    h.step()
    before = h.observe_vms()[0].consumed
    h.apply(action_for(before))  # type: ignore[operator]
    tps = []
    for i in range(ticks):
        h.step()
        assert h.check() == []
        if i >= 5:
            tps.append(h.observe_vms()[0].throughput or 0.0)
    return before - h.observe_vms()[0].consumed, float(np.mean(tps))


@pytest.mark.timeout(120)
def test_balloon_costs_less_throughput_than_hypervisor_swap_of_the_same_amount() -> None:
    ballooned, tp_balloon = run_reclaim(lambda before: SetBalloon("v", 96 * MiB))
    assert ballooned > 80 * MiB
    swapped, tp_swap = run_reclaim(lambda before: SetSwapTarget("v", before - ballooned))
    assert swapped == pytest.approx(ballooned, rel=0.05)
    assert tp_balloon > 0.95 * 5000  # the guest gave its page cache and cold pages
    # the host swapped blindly, hot pages included: 4,712 vs 4,996 touches/s with the measured
    # 125 us swap-in (the margin was 0.9 when swap-in was an assumed 300 us)
    assert tp_swap < 0.97 * tp_balloon


def test_guest_pages_out_reserved_pages_under_pressure() -> None:
    h = reclaim_case()
    h.apply(SetBalloon("v", 200 * MiB))  # more than the guest can give without its working set
    paged_out = 0.0
    for _ in range(10):  # the guest stalls on its own paging first (tick 5 here), then it shows
        h.step()
        paged_out += h.observe_vms()[0].reserved_paged_out_rate
    obs = h.observe_vms()[0]
    assert paged_out > 0  # the reservation program reports the pressure
    assert obs.ballooned < 200 * MiB
    assert obs.guest_swapped_out_rate >= 0 and h.check() == []
