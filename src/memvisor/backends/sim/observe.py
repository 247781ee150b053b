"""What the simulator lets a policy see, measured the way a real host would measure it.

Nothing here peeks at the workload's truth: the active fraction comes from sampling random
guest pages and checking later whether they were touched (like a hypervisor that clears the
accessed bit of a few pages per period), and the sharing metric from sampling pages and reading
their frame's reference count (like ``/proc/kpagecount``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from memvisor.backends.sim.pages import (
    BALLOONED,
    G_ANON,
    G_CACHE,
    G_FREE,
    G_RESERVED,
    PRIVATE,
    SHARED,
    SWAPPED,
    PageTable,
)
from memvisor.backends.sim.vm import L_GSWAPPED, L_MEM, VMRun
from memvisor.model import (
    Backing,
    HostObservation,
    KsmStats,
    PowerState,
    SharingSample,
    VMObservation,
    VMSpec,
)
from memvisor.sharing.metric import PageSample, compute_stats
from memvisor.sharing.procfs import KPF_KSM
from memvisor.units import PAGE_SIZE

if TYPE_CHECKING:
    from memvisor.backends.sim.host import SimHost

IntArray = npt.NDArray[np.int64]


def spec_of(vm: VMRun) -> VMSpec:
    c = vm.cfg
    return VMSpec(
        name=c.name,
        memory=c.memory,
        reservation=c.reservation,
        limit=c.limit,
        shares=c.shares,
        pool=c.pool,
        # a per-VM swap file is what file backing means (C4); without one the VM is anonymous
        backing=Backing.FILE if c.swap_file else Backing.ANON,
    )


def host_observation(host: SimHost) -> HostObservation:
    pt = host.pt
    sharing = int(pt.counts[:, SHARED].sum())
    ksm = KsmStats(
        run=host.ksm_run,
        pages_shared=pt.shared_frames,
        pages_sharing=sharing - pt.shared_frames,
        pages_to_scan=host.ksm_pages_to_scan,
        sleep_millisecs=host.ksm_sleep,
        full_scans=host.scanner.full_scans,
    )
    return HostObservation(
        time=host.clock.now(),
        total=pt.capacity * PAGE_SIZE,
        free=pt.free_frames() * PAGE_SIZE,
        ksm=ksm,
    )


def vm_observation(host: SimHost, vm: VMRun) -> VMObservation:
    counts = host.pt.counts[vm.index]
    dt = host.dt
    return VMObservation(
        name=vm.name,
        time=host.clock.now(),
        power=PowerState.ON,
        memory=vm.cfg.memory,
        consumed=int(counts[PRIVATE] + counts[SHARED]) * PAGE_SIZE,
        shared=int(counts[SHARED]) * PAGE_SIZE,
        swapped=int(counts[SWAPPED]) * PAGE_SIZE,
        ballooned=int(counts[BALLOONED]) * PAGE_SIZE,
        balloon_target=vm.balloon_target * PAGE_SIZE,
        guest_free=int(np.count_nonzero(host.pt.use[vm.sl] == G_FREE)) * PAGE_SIZE,
        guest_swapped_out_rate=vm.last.guest_swap_outs / dt,
        reserved_paged_out_rate=vm.last.reserved_paged_out / dt,
        active_fraction=vm.active_estimate,
        sharing=_latest_sharing(host, vm),
        throughput=vm.throughput,
        resident_limit=None if vm.resident_limit is None else vm.resident_limit * PAGE_SIZE,
    )


def _latest_sharing(host: SimHost, vm: VMRun) -> SharingSample:
    now = host.clock.now()
    if vm.sharing is None or now - vm.sharing_time >= host.cfg.sharing_sample_period - 1e-9:
        vm.sharing, vm.sharing_time = sharing_sample(host, vm), now
    return vm.sharing


def sharing_sample(host: SimHost, vm: VMRun) -> SharingSample:
    """Sample pages of ``vm`` and read how many mappings share each one's frame (C1), then
    compute the metric with the same code as for real VMs (:mod:`memvisor.sharing.metric`)."""
    pt = host.pt
    n = host.cfg.sharing_sample_pages
    idx = host.obs_rng.integers(vm.offset, vm.offset + vm.pages, n)
    st = pt.state[idx]
    present = idx[(st == PRIVATE) | (st == SHARED)]
    shared = pt.state[present] == SHARED
    counts = np.ones(present.size, dtype=np.uint64)
    counts[shared] = pt.refs[pt.content[present[shared]]].astype(np.uint64)
    flags = np.where(shared, np.uint64(1 << KPF_KSM), np.uint64(0)).astype(np.uint64)
    swapped = int(np.count_nonzero(st == SWAPPED))
    sample = PageSample.from_counts(
        counts,
        flags=flags,
        swapped=swapped,
        absent=n - present.size - swapped,
        context_pages=vm.pages,
        label=vm.name,
    )
    return compute_stats(sample).to_model()


def sample_active(host: SimHost, vm: VMRun, dt: float) -> None:
    """Working-set sampling: every period, check which of the pages sampled at its start
    were touched since, then draw a new sample."""
    period = max(1, round(host.cfg.active_sample_period / dt))
    if vm.sample_idx is not None and host.tick - vm.sample_start + 1 < period:
        return
    if vm.sample_idx is not None:
        touched = host.pt.last_access[vm.sample_idx] >= vm.sample_start
        # the reservation program's pages are touched when it takes them: not working set
        touched &= host.pt.use[vm.sample_idx] != G_RESERVED
        vm.active_estimate = float(np.count_nonzero(touched)) / vm.sample_idx.size
    n = host.cfg.active_sample_pages
    vm.sample_idx = vm.sample_rng.integers(vm.offset, vm.offset + vm.pages, n)
    vm.sample_start = host.tick + 1


def cap_per_vm(pt: PageTable, victims: IntArray, allowance: IntArray) -> IntArray:
    """Keep at most ``allowance[v]`` of ``victims`` per VM (victims in preference order)."""
    if victims.size == 0:
        return victims
    vm = pt.vm_of(victims)
    order = np.argsort(vm, kind="stable")
    sorted_vm = vm[order]
    first = np.searchsorted(sorted_vm, sorted_vm, side="left")
    rank = np.arange(sorted_vm.size) - first
    keep = order[rank < allowance[sorted_vm]]
    return np.sort(victims[keep])


def check_vm(host: SimHost, vm: VMRun) -> list[str]:
    """Guest-side invariants of one VM: the guest's page map agrees with the host's."""
    pt = host.pt
    problems: list[str] = []
    use = pt.use[vm.sl]
    mapped = np.flatnonzero((use == G_ANON) | (use == G_CACHE)) + vm.offset
    logical = pt.g2l[mapped].astype(np.int64)
    if np.any(logical < 0) or np.any(vm.l2g[logical] != mapped):
        problems.append(f"{vm.name}: guest page map and workload map disagree")
    in_mem = np.flatnonzero(vm.lstate == L_MEM)
    if in_mem.size != mapped.size or np.any(vm.l2g[in_mem] < 0):
        problems.append(f"{vm.name}: {in_mem.size} resident workload pages, {mapped.size} mapped")
    gswapped = int(np.count_nonzero(vm.lstate == L_GSWAPPED)) + vm.reserved_swapped
    if gswapped != vm.guest_swap_used or gswapped > vm.guest_swap_pages:
        problems.append(
            f"{vm.name}: guest swap holds {gswapped} pages, accounted {vm.guest_swap_used}, "
            f"device {vm.guest_swap_pages}"
        )
    held = int(np.count_nonzero(use == G_RESERVED))
    if held != int(pt.counts[vm.index, BALLOONED]):
        problems.append(f"{vm.name}: reservation holds {held} pages, ballooned counter differs")
    return problems
