"""The guest OS inside a simulated VM: page allocation and approximate-LRU reclaim.

When it needs free pages (the workload faults, the reservation program inflates) the guest
keeps ``min_free`` of its memory free by, in order:

1. dropping the least recently used page-cache pages (clean: free, no I/O);
2. paging out the least recently used anonymous pages to its own swap device. The pages of
   the reservation program are anonymous too and take part; when one of them is paged out the
   program reports it (the pressure signal of C2).

Reading a page to write it to the guest's swap faults it in on the host if the host had
swapped it (double paging); the guest cannot know. "Least recently used" is the guest's view:
per-page last-access ticks, as an approximation of Linux's active/inactive lists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from memvisor.agent.prefetch import SWAPIN_RATE
from memvisor.backends.sim.pages import (
    BALLOONED,
    G_ANON,
    G_CACHE,
    G_FREE,
    G_RESERVED,
    SHARED,
    SWAPPED,
    UNTOUCHED,
)
from memvisor.backends.sim.vm import L_DROPPED, L_GSWAPPED, L_MEM, L_NEW, VMRun

if TYPE_CHECKING:
    from memvisor.backends.sim.host import SimHost

IntArray = npt.NDArray[np.int64]


def oldest(last_access: npt.NDArray[np.int32], cands: IntArray, k: int) -> IntArray:
    if k >= cands.size:
        return cands
    part = np.argpartition(last_access[cands], k - 1)[:k]
    return cands[part]


def alloc(host: SimHost, vm: VMRun, k: int) -> IntArray:
    """Up to ``k`` free guest pages (global indices), reclaiming first if the guest is short."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    use = host.pt.use[vm.sl]
    free = np.flatnonzero(use == G_FREE)
    short = k + vm.min_free_pages - free.size
    if short > 0:
        reclaim(host, vm, short)
        free = np.flatnonzero(use == G_FREE)
    return free[:k] + vm.offset


def reclaim(host: SimHost, vm: VMRun, k: int) -> int:
    """Free ``k`` guest pages: drop page cache, then page out anonymous memory."""
    pt = host.pt
    use = pt.use[vm.sl]
    cache = np.flatnonzero(use == G_CACHE) + vm.offset
    dropped = _drop_cache(host, vm, oldest(pt.last_access, cache, k))
    if dropped >= k:
        return dropped
    room = vm.guest_swap_pages - vm.guest_swap_used
    want = min(k - dropped, room)
    if want <= 0:
        return dropped
    anon = np.flatnonzero((use == G_ANON) | (use == G_RESERVED)) + vm.offset
    return dropped + _page_out(host, vm, oldest(pt.last_access, anon, want))


def _drop_cache(host: SimHost, vm: VMRun, g: IntArray) -> int:
    pt = host.pt
    logical = pt.g2l[g].astype(np.int64)
    vm.lcontent[logical] = pt.content[g]  # file content survives; it is read back on access
    vm.lstate[logical] = L_DROPPED
    vm.l2g[logical] = -1
    pt.g2l[g] = -1
    pt.use[g] = G_FREE
    return int(g.size)


def _page_out(host: SimHost, vm: VMRun, g: IntArray) -> int:
    pt = host.pt
    reserved = g[pt.use[g] == G_RESERVED]
    anon = g[pt.use[g] == G_ANON]
    if reserved.size:
        # the guest reads zeros (no host frame needed) and writes them to its swap
        pt.set_state(reserved, UNTOUCHED, vm.index)
        pt.use[reserved] = G_FREE
        vm.reserved_swapped += int(reserved.size)
        vm.stats.reserved_paged_out += int(reserved.size)
    if anon.size:
        host_swapped = anon[pt.state[anon] == SWAPPED]
        if host_swapped.size:  # double paging: the host must read it back first
            done = host.fault_in(vm, host_swapped)
            vm.stats.stall += host.read_stall(vm, int(done.size), host.cfg.swap_in_latency)
            vm.stats.host_swap_ins += int(done.size)
            anon = anon[pt.state[anon] != SWAPPED]
        logical = pt.g2l[anon].astype(np.int64)
        vm.lcontent[logical] = pt.content[anon]
        vm.lstate[logical] = L_GSWAPPED
        vm.l2g[logical] = -1
        pt.g2l[anon] = -1
        pt.use[anon] = G_FREE
    n = int(reserved.size + anon.size)
    host.disk.write(n)  # the guest's swap device is a host disk too; the guest does not wait
    vm.guest_swap_used += n
    vm.stats.guest_swap_outs += n
    vm.stats.stall += n * vm.cfg.guest.swap_out_cost
    return n


def place(host: SimHost, vm: VMRun, logical: IntArray, g: IntArray, *, bulk: bool = False) -> None:
    """Bring logical pages into the free guest pages ``g`` (same length), charging the cost
    of where each came from: first touch, guest swap, page-cache re-read, host swap. With
    ``bulk`` the guest's swap is read in bulk by the agent: the disk's time, no per-page
    latency for the workload (see :func:`prefetch`)."""
    pt = host.pt
    before = pt.state[g]
    done = host.fault_in(vm, g)
    if done.size < g.size:  # the host could not back every page: place those it could
        keep = np.isin(g, done, assume_unique=True)
        g, logical, before = g[keep], logical[keep], before[keep]
    lstate = vm.lstate[logical]
    new = lstate == L_NEW
    content = vm.lcontent[logical]
    if np.any(new):
        content[new] = vm.initial_content(logical[new], pt.new_unique(int(np.count_nonzero(new))))
    pt.content[g] = content
    pt.last_write[g] = host.tick
    pt.last_access[g] = host.tick
    pt.use[g] = np.where(logical < vm.anon_pages, G_ANON, G_CACHE).astype(np.uint8)
    pt.g2l[g] = logical.astype(np.int32)
    vm.l2g[logical] = g
    vm.lstate[logical] = L_MEM
    n_swapin = int(np.count_nonzero(lstate == L_GSWAPPED))
    vm.guest_swap_used -= n_swapin
    guest = vm.cfg.guest
    cost = host.cfg
    if bulk:
        host.disk.read(n_swapin, 0.0)  # queued on the device; nobody waits per page
        vm.stats.guest_prefetched += n_swapin
        n_swapin = 0
    vm.stats.guest_swap_ins += n_swapin
    host_swapins = int(np.count_nonzero(before == SWAPPED))
    vm.stats.host_swap_ins += host_swapins
    vm.stats.stall += (
        host.read_stall(vm, n_swapin, guest.swap_in_latency)
        + host.read_stall(vm, int(np.count_nonzero(lstate == L_DROPPED)), guest.file_read_latency)
        + int(np.count_nonzero(before == UNTOUCHED)) * cost.minor_fault_cost
        + int(np.count_nonzero(before == SHARED)) * cost.cow_cost
        + host.read_stall(vm, host_swapins, cost.swap_in_latency)  # double paging of free pages
    )


def prefetch(host: SimHost, vm: VMRun, k: int) -> int:
    """The agent reads up to ``k`` pages of the workload's memory back from the guest's swap
    into free guest memory (above the guest's free watermark), in address order, the way
    ``process_madvise(MADV_WILLNEED)`` over the workload's mappings does; returns the pages."""
    swapped = np.flatnonzero(vm.lstate[: vm.anon_pages] == L_GSWAPPED)
    free = np.flatnonzero(host.pt.use[vm.sl] == G_FREE)
    n = min(k, swapped.size, free.size - vm.min_free_pages)
    if n <= 0:
        return 0
    place(host, vm, swapped[:n], free[:n] + vm.offset, bulk=True)
    return n


def balloon_step(host: SimHost, vm: VMRun) -> None:
    """Move the reservation program toward its target within this tick's budget."""
    held = int(host.pt.counts[vm.index, BALLOONED]) + vm.reserved_swapped
    if held < vm.balloon_target:
        _inflate(host, vm, min(vm.balloon_target - held, vm.balloon_budget))
    elif held > vm.balloon_target:
        _deflate(host, vm, min(held - vm.balloon_target, vm.balloon_budget))
    if vm.read_back > 0 and vm.read_back_budget > 0:
        n = min(vm.read_back, vm.read_back_budget)
        vm.read_back -= n
        vm.read_back_budget -= n
        if prefetch(host, vm, n) == 0:
            vm.read_back = 0  # nothing left in swap, or no room: the release is done


def _inflate(host: SimHost, vm: VMRun, k: int) -> None:
    if k <= 0:
        return
    pt = host.pt
    g = alloc(host, vm, k)
    pt.set_state(g, BALLOONED, vm.index)  # the host releases the backing at once
    pt.use[g] = G_RESERVED
    pt.content[g] = 0
    pt.last_access[g] = host.tick
    vm.balloon_budget -= int(g.size)
    vm.read_back = 0  # the host asks for memory again: the agent stops reading back


def _deflate(host: SimHost, vm: VMRun, k: int) -> None:
    if k <= 0:
        return
    pt = host.pt
    swapped = min(k, vm.reserved_swapped)  # give back paged-out reservations first: no I/O
    vm.reserved_swapped -= swapped
    vm.guest_swap_used -= swapped
    rest = k - swapped
    if rest > 0:
        g = np.flatnonzero(pt.use[vm.sl] == G_RESERVED)[:rest] + vm.offset
        pt.set_state(g, UNTOUCHED, vm.index)
        pt.use[g] = G_FREE
    vm.balloon_budget -= k
    if (
        vm.cfg.guest.prefetch and vm.last.guest_swap_ins >= SWAPIN_RATE * host.dt
    ):  # the agent's rule, paced (GuestConfig.prefetch_rate; 0: all at once)
        if vm.cfg.guest.prefetch_rate:
            vm.read_back += k
        else:
            prefetch(host, vm, k)


def release(host: SimHost, vm: VMRun, keep: int) -> None:
    """The workload frees its anonymous pages beyond the first ``keep`` of its working-set
    order: resident ones go to the guest's free list (the host still backs them), paged-out
    ones leave the guest's swap; all are new allocations when touched again."""
    pt = host.pt
    logical = vm.ws_order[keep:]
    state = vm.lstate[logical]
    resident = logical[state == L_MEM]
    g = vm.l2g[resident]
    pt.use[g] = G_FREE
    pt.g2l[g] = -1
    vm.l2g[resident] = -1
    vm.guest_swap_used -= int(np.count_nonzero(state == L_GSWAPPED))
    vm.lstate[logical] = L_NEW
