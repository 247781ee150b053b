"""Parameters of a simulated host, its VMs and their workloads (plain frozen dataclasses).

Sizes are bytes, rates are per simulated second, latencies are seconds. The scenario loader
(:mod:`memvisor.backends.sim.scenario`) builds these from TOML with key-path errors; tests and
scripts may build them directly. Defaults are orders of magnitude measured on our machines
(see ``docs/simulator.md``), not claims about any particular host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from memvisor.agent.prefetch import READ_RATE
from memvisor.units import GiB, MiB


@dataclass(frozen=True, slots=True)
class Phase:
    """A stretch of time during which a workload behaves the same way.

    ``access_rate`` is page touches per second when the VM runs at full speed; the touched
    pages are drawn from the first ``working_set`` bytes of the workload's anonymous memory
    (in a fixed random order), with Zipf exponent ``skew`` (0 is uniform).

    With ``release``, the workload frees its anonymous memory beyond this phase's working set
    when the phase starts (a job that exits, a process that shrinks): the guest puts those
    pages on its free list and forgets their content; the host keeps backing them (it cannot
    know they are free) until it reclaims them; touched again later they are new allocations.
    """

    duration: float | None = None  # None: until the end of the run (only for the last phase)
    working_set: int = 256 * MiB
    skew: float = 0.0
    access_rate: float = 10_000.0
    write_fraction: float = 0.1
    release: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class TraceAccesses:
    """Page accesses of one VM replayed from a CSV trace, sorted by time."""

    times: npt.NDArray[np.float64]
    pages: npt.NDArray[np.int64]  # logical page of the workload (anon first, then page cache)
    writes: npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True)
class Workload:
    """What runs in a VM: its memory layout, content mix and behaviour over time.

    At boot the guest touches ``prefill`` bytes (default: all) of its ``footprint`` of
    anonymous memory, the rest on first use, and reads ``page_cache`` bytes of files. A
    fraction ``zero_fraction`` of the pages is zero-filled and ``common_fraction`` has the same
    content in every VM of the same image and workload (libraries, shared data); the rest is
    unique. Writes give a page new unique content.
    With ``trace`` set, the trace's accesses replace the phases.
    """

    name: str = "default"
    footprint: int = 256 * MiB
    page_cache: int = 0
    prefill: int | None = None  # anonymous bytes touched at boot (hottest first); None: all
    zero_fraction: float = 0.0
    common_fraction: float = 0.0
    phases: tuple[Phase, ...] = (Phase(),)
    trace: TraceAccesses | None = None  # this VM's accesses (split from trace_file)
    trace_file: str | None = None  # the CSV file the trace came from (docs/simulator.md)

    def phase_at(self, t: float) -> Phase:
        return self.phases[self.phase_index(t)]

    def phase_index(self, t: float) -> int:
        start = 0.0
        for i, phase in enumerate(self.phases):
            if phase.duration is None or t < start + phase.duration:
                return i
            start += phase.duration
        return len(self.phases) - 1


@dataclass(frozen=True, slots=True)
class GuestConfig:
    """The guest OS: kernel footprint, its own swap device, reclaim watermark and costs."""

    kernel: int = 64 * MiB  # touched at boot, content common to the image
    swap: int = 1 * GiB  # the guest's own swap device
    min_free: float = 0.01  # fraction of guest memory the guest keeps free
    swap_in_latency: float = 200e-6  # per page read back from the guest's swap
    swap_out_cost: float = 20e-6  # per page written to the guest's swap (CPU + I/O)
    file_read_latency: float = 150e-6  # per dropped page-cache page read again
    kernel_access_rate: float = 20.0  # background touches per second of kernel pages
    # memvisor's agent in the guest: when its reservation is released while the guest is
    # faulting pages back from its swap, it reads the swapped pages back in bulk
    # (process_madvise MADV_WILLNEED) into the memory just released, instead of one fault at a
    # time (off: a plain balloon driver, as the baselines use)
    prefetch: bool = False
    # bytes/s it reads back, as the agent paces it (agent.prefetch.READ_RATE); 0: all of a
    # release at once, as the agent did until its pacing (kept for comparison)
    prefetch_rate: int = READ_RATE


@dataclass(frozen=True, slots=True)
class SimVMConfig:
    name: str
    memory: int
    workload: Workload = field(default_factory=Workload)
    image: str = "default"
    reservation: int = 0
    limit: int | None = None
    shares: int = 0
    pool: str = "root"
    merge: bool = True  # guest RAM may be merged by the sharing scanner (QEMU mem-merge)
    # False: no per-VM swap file, as QEMU's anonymous backing; SetSwapTarget is refused
    swap_file: bool = True
    scan_rate: float | None = None  # at most this many pages/s scanned (None: host's share)
    guest: GuestConfig = field(default_factory=GuestConfig)


@dataclass(frozen=True, slots=True)
class SimHostConfig:
    """The host: capacity for guest RAM, reclamation speeds and costs, scanner, sampling."""

    memory: int = 16 * GiB  # frames available to guest RAM
    # per page faulted back from swap: one 4 KiB fault read back without readahead measured
    # 124.5 us on our host (bench/results/qemu.md); the disk queue can only make it longer
    swap_in_latency: float = 125e-6
    # the swap disk shared by every swap write and read: measured 512 MiB/s swapping out
    # freshly written guest pages, 562 MiB/s sequential writes (bench/results/qemu.md), a SATA
    # SSD's order of magnitude
    disk_bandwidth: int = 512 * MiB
    # CPU work of reclaiming one page (LRU scan, unmap, TLB flush): evicting pages already
    # written back ran at 1040 MiB/s, 3.8 us per page (bench/results/qemu.md)
    reclaim_cost: float = 4e-6
    minor_fault_cost: float = 2e-6  # first touch of a page (zero-fill)
    cow_cost: float = 3e-6  # breaking a shared page on write
    blocked_cost: float = 5e-3  # an access that waited for memory the host could not free
    balloon_rate: int = 365 * MiB  # reservation program inflate/deflate, bytes/s
    swap_out_rate: int = 400 * MiB  # hypervisor swap-out bandwidth per VM, bytes/s
    swap_victims: str = "random"  # "random" (hypervisor cannot see guest use) or "lru"
    reclaim_headroom: float = 0.005  # host kernel reclaims this fraction beyond the need
    # kswapd: the host kernel reclaims in the background, in the swap disk's spare time of the
    # tick, and a faulting VM reclaims (and waits) itself only for what that cannot free;
    # False: every reclaim is direct (the model until this option existed)
    background_reclaim: bool = True
    ksm_run: int = 1
    ksm_pages_to_scan: int = 5000
    ksm_sleep_millisecs: int = 20
    ksm_stable_ticks: int = 1  # a page must be unwritten this many ticks to be merged
    active_sample_pages: int = 100  # pages sampled per VM for the working-set estimate
    active_sample_period: float = 10.0  # seconds per working-set sample
    sharing_sample_pages: int = 256  # pages sampled per VM for the sharing metric (C1)
    sharing_sample_period: float = 10.0  # seconds between sharing samples of a VM
    max_accesses_per_tick: int = 200_000  # cap on simulated touches per VM per tick


def default_workload(memory: int, guest: GuestConfig) -> Workload:
    """For a VM without a workload: half of its memory above the kernel, a quarter active."""
    footprint = max(0, (memory - guest.kernel) // 2) // 4096 * 4096
    working_set = footprint // 2 // 4096 * 4096
    return Workload(name="default", footprint=footprint, phases=(Phase(working_set=working_set),))
