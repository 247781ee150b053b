"""One simulated VM's own state: its workload's logical pages, targets and counters.

The workload addresses *logical* pages: ``[0, anon)`` anonymous memory, then
``[anon, anon + cache)`` page-cache file pages. The guest OS maps each logical page to a
guest-physical page (``l2g``) or keeps it out of memory: never touched yet (NEW), in the
guest's own swap (GSWAPPED) or dropped from the page cache (DROPPED, read again from the file).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from memvisor.backends.sim.config import SimVMConfig
from memvisor.model import SharingSample
from memvisor.units import PAGE_SIZE

L_NEW, L_MEM, L_GSWAPPED, L_DROPPED = 0, 1, 2, 3
K_ZERO, K_COMMON, K_UNIQUE = 0, 1, 2


@dataclass
class ContentUniverse:
    """Initial content of the logical pages shared by VMs of one image and workload."""

    base: int  # first content slot of this universe (slot = base + logical page)
    kinds: npt.NDArray[np.uint8]  # K_ZERO / K_COMMON / K_UNIQUE per logical page


@dataclass
class TickStats:
    """What one VM did in the last tick (reset every tick)."""

    accesses: int = 0  # touches made
    asked: int = 0  # touches the workload asked for (more if the VM was still stalled)
    stall: float = 0.0
    host_swap_ins: int = 0
    guest_swap_ins: int = 0
    guest_swap_outs: int = 0
    guest_prefetched: int = 0  # pages the agent read back from the guest's swap in bulk
    reserved_paged_out: int = 0
    blocked: int = 0
    direct_reclaimed: int = 0  # pages this VM evicted itself (direct reclaim, its limit)
    io_wait: float = 0.0  # seconds of stall already charged waiting for swap writes


@dataclass
class VMRun:
    index: int
    cfg: SimVMConfig
    offset: int  # first global page index
    pages: int
    kernel_pages: int
    anon_pages: int
    cache_pages: int
    universe: ContentUniverse
    kernel_base: int  # content slot of kernel page 0 for this image
    rng: np.random.Generator  # workload and guest decisions
    sample_rng: np.random.Generator  # working-set sampling (independent of the workload)
    ws_order: npt.NDArray[np.int64]  # anonymous pages in working-set order (hottest first)
    l2g: npt.NDArray[np.int64]  # a view into the host's array of all VMs' logical pages
    logical_offset: int  # where this VM's logical pages start in the host's array
    lstate: npt.NDArray[np.uint8] = field(init=False)
    lcontent: npt.NDArray[np.int64] = field(init=False)
    balloon_target: int = 0  # pages the reservation program is asked to hold
    reserved_swapped: int = 0  # of those, pages the guest OS paged out to its swap
    guest_swap_used: int = 0  # pages in the guest's swap device
    resident_limit: int | None = None  # pages (SetSwapTarget), None: no limit
    balloon_budget: int = 0  # pages the reservation program may still move this tick
    read_back: int = 0  # pages of a release the agent has still to read back (paced)
    read_back_budget: int = 0  # pages the agent may still read back this tick
    swap_budget: int = 0  # pages the host may still swap out this tick
    access_carry: float = 0.0
    phase: int = -1  # index of the workload phase of the last tick (-1: before the first)
    kernel_carry: float = 0.0
    trace_pos: int = 0
    stats: TickStats = field(default_factory=TickStats)
    last: TickStats = field(default_factory=TickStats)
    stall_debt: float = 0.0  # seconds of stall not yet served (stalls longer than a tick)
    fault_time: float = 0.0  # seconds of this tick's faults already served within the tick
    throughput: float = 0.0  # accesses per second completed in the last tick
    demand: float = 0.0  # accesses per second asked for in the last tick
    active_estimate: float | None = None
    sample_idx: npt.NDArray[np.int64] | None = None
    sample_start: int = 0
    sharing: SharingSample | None = None  # the latest sharing sample (C1)
    sharing_time: float = -1e300

    def __post_init__(self) -> None:
        n = self.anon_pages + self.cache_pages
        self.lstate = np.full(n, L_NEW, dtype=np.uint8)
        self.lcontent = np.zeros(n, dtype=np.int64)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def sl(self) -> slice:
        return slice(self.offset, self.offset + self.pages)

    @property
    def reservation_pages(self) -> int:
        return self.cfg.reservation // PAGE_SIZE

    @property
    def min_free_pages(self) -> int:
        return int(self.cfg.guest.min_free * self.pages)

    @property
    def guest_swap_pages(self) -> int:
        return self.cfg.guest.swap // PAGE_SIZE

    def initial_content(
        self, logical: npt.NDArray[np.int64], pt_new_unique: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        """Content of logical pages touched for the first time (``pt_new_unique`` supplies
        fresh unique ids, one per page)."""
        kinds = self.universe.kinds[logical]
        out = np.where(kinds == K_COMMON, self.universe.base + logical, pt_new_unique)
        out[kinds == K_ZERO] = 0
        return out
