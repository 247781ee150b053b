"""SimHost: a simulated host with many VMs behind the :class:`HostBackend` interface.

Time moves only in :meth:`SimHost.step`, which advances the :class:`ManualClock` by one tick:

1. each VM's reservation program moves toward its balloon target and the hypervisor swaps
   pages out toward each VM's resident limit (within this tick's rate budgets);
2. each VM's workload touches its pages: faults are served (first touch, guest swap-in,
   page-cache re-read, host swap-in, copy-on-write) and their latencies become stall time;
   a VM's stall is time it cannot work: stall beyond what fits in a tick is carried over
   and cuts the touches it makes in the next ticks; its throughput is touches per second;
3. the sharing scanner merges pages of equal content;
4. the working-set sampler updates each VM's active-fraction estimate.

When a fault needs a frame and the host has none free, the host kernel reclaims: it swaps
the least recently used pages (sampled approximate LRU of host-side accesses: it cannot know
which guest pages are free) of VMs above their reservation. So frames used never exceed host
frames, with or without a policy. That reclaim is *direct*: the VM whose fault triggered it
stalls for the CPU work of every page it evicts and until the swap disk has written them
(:mod:`memvisor.backends.sim.disk`: one device of bounded bandwidth that every swap write and
read shares, so heavy writing also slows every swap-in).
``apply`` acts at once within the current tick's budgets; the rest follows in ``step``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from memvisor.backends.base import ManualClock
from memvisor.backends.sim import actions, guest, observe
from memvisor.backends.sim.config import (
    GuestConfig,
    SimHostConfig,
    SimVMConfig,
    Workload,
    default_workload,
)
from memvisor.backends.sim.disk import SwapDisk
from memvisor.backends.sim.pages import (
    G_KERNEL,
    PRIVATE,
    SHARED,
    SWAPPED,
    UNTOUCHED,
    PageTable,
    uniq,
)
from memvisor.backends.sim.scanner import Scanner
from memvisor.backends.sim.validate import check_setup
from memvisor.backends.sim.vm import (
    K_COMMON,
    K_UNIQUE,
    K_ZERO,
    L_DROPPED,
    L_GSWAPPED,
    ContentUniverse,
    TickStats,
    VMRun,
)
from memvisor.backends.sim.workload import draw, kernel_touches
from memvisor.errors import InputError, NotFoundError
from memvisor.model import (
    Action,
    ActionResult,
    Backing,
    HostObservation,
    SetBalloon,
    SetKsm,
    SetSwapTarget,
    VMObservation,
    VMSpec,
)
from memvisor.units import PAGE_SIZE

IntArray = observe.IntArray


BoolArray = npt.NDArray[np.bool_]


def _by_vm(owner: IntArray, mask: BoolArray) -> list[tuple[int, IntArray]]:
    """Indices where ``mask`` holds, grouped by the VM that owns them."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return []
    vms = owner[idx]
    order = np.argsort(vms, kind="stable")
    idx, vms = idx[order], vms[order]
    cuts = np.flatnonzero(np.diff(vms)) + 1
    return [
        (int(part_vms[0]), part)
        for part, part_vms in zip(np.split(idx, cuts), np.split(vms, cuts), strict=True)
    ]


def _stable_seed(*parts: object) -> int:
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode())


class SimHost:
    """A simulated host; implements :class:`memvisor.backends.base.HostBackend`."""

    def __init__(
        self,
        host: SimHostConfig,
        vms: Sequence[SimVMConfig],
        *,
        seed: int = 0,
        tick: float = 1.0,
        clock: ManualClock | None = None,
    ) -> None:
        check_setup(host, vms, tick)
        self.cfg = host
        self.seed = seed
        self.dt = tick
        self.clock = clock if clock is not None else ManualClock()
        self.tick = 0
        self.start_time = self.clock.now()  # workload phases and traces count from here
        self.rng = np.random.default_rng([seed, 1])
        self.obs_rng = np.random.default_rng([seed, 2])
        self.ksm_run = host.ksm_run
        self.ksm_pages_to_scan = host.ksm_pages_to_scan
        self.ksm_sleep = host.ksm_sleep_millisecs
        self.disk = SwapDisk(host.disk_bandwidth)
        self.background_reclaimed = 0  # pages the host kernel reclaimed in the background
        slots, universes, kernel_bases = self._content_layout(vms)
        self.pt = PageTable([v.memory // PAGE_SIZE for v in vms], host.memory // PAGE_SIZE, slots)
        logical = [(v.workload.footprint + v.workload.page_cache) // PAGE_SIZE for v in vms]
        self.logical_offsets = np.zeros(len(vms) + 1, dtype=np.int64)
        self.logical_offsets[1:] = np.cumsum(logical)
        # logical page -> global guest page (-1: not in guest memory), all VMs in one array so
        # the common path of every VM's accesses is a few vectorized operations per tick
        self.l2g = np.full(int(self.logical_offsets[-1]), -1, dtype=np.int64)
        self.vms = [self._make_vm(i, c, universes, kernel_bases) for i, c in enumerate(vms)]
        self._by_name = {v.name: v for v in self.vms}
        self.scanner = Scanner(
            self.pt, np.array([c.merge for c in vms], dtype=np.bool_), [c.scan_rate for c in vms]
        )
        for vm in self.vms:
            self._boot(vm)
            self._reset_tick(vm)
        self.disk.reset()  # boot happened "long ago": its writes are done
        self.background_reclaimed = 0

    @classmethod
    def from_specs(
        cls,
        specs: Sequence[VMSpec],
        capacity: int,
        *,
        workloads: Mapping[str, Workload] | None = None,
        host: SimHostConfig | None = None,
        guest: GuestConfig | None = None,
        seed: int = 0,
        tick: float = 1.0,
        clock: ManualClock | None = None,
    ) -> SimHost:
        """A simulated host for VMs configured as for real QEMU (e.g. the daemon's host file
        with ``--backend sim``): each VM runs ``workloads[name]`` or a default workload."""
        g = guest or GuestConfig()
        vms = [
            SimVMConfig(
                name=s.name,
                memory=s.memory,
                workload=(workloads or {}).get(s.name) or default_workload(s.memory, g),
                reservation=s.reservation,
                limit=s.limit,
                shares=s.shares,
                pool=s.pool,
                merge=s.backing is Backing.ANON,
                swap_file=s.backing is Backing.FILE,
                guest=g,
            )
            for s in specs
        ]
        cfg = replace(host or SimHostConfig(), memory=capacity // PAGE_SIZE * PAGE_SIZE)
        return cls(cfg, vms, seed=seed, tick=tick, clock=clock)

    # --- construction ----------------------------------------------------------------------

    def _content_layout(
        self, vms: Sequence[SimVMConfig]
    ) -> tuple[int, dict[tuple[str, str], ContentUniverse], dict[str, int]]:
        """Content slots: 0 is the zero page; then each image's kernel pages; then each
        (image, workload) universe of logical pages."""
        next_slot = 1
        kernel_bases: dict[str, int] = {}
        for image in sorted({v.image for v in vms}):
            kernel_bases[image] = next_slot
            next_slot += max(v.guest.kernel // PAGE_SIZE for v in vms if v.image == image)
        universes: dict[tuple[str, str], ContentUniverse] = {}
        for key in sorted({(v.image, v.workload.name) for v in vms}):
            members = [v for v in vms if (v.image, v.workload.name) == key]
            size = max((v.workload.footprint + v.workload.page_cache) // PAGE_SIZE for v in members)
            wl = members[0].workload
            u = np.random.default_rng([self.seed, _stable_seed(*key)]).random(size)
            kinds = np.full(size, K_UNIQUE, dtype=np.uint8)
            kinds[u < wl.zero_fraction + wl.common_fraction] = K_COMMON
            kinds[u < wl.zero_fraction] = K_ZERO
            universes[key] = ContentUniverse(base=next_slot, kinds=kinds)
            next_slot += size
        return next_slot, universes, kernel_bases

    def _make_vm(
        self,
        index: int,
        cfg: SimVMConfig,
        universes: dict[tuple[str, str], ContentUniverse],
        kernel_bases: dict[str, int],
    ) -> VMRun:
        rng = np.random.default_rng([self.seed, 3, _stable_seed(cfg.name)])
        anon = cfg.workload.footprint // PAGE_SIZE
        return VMRun(
            index=index,
            cfg=cfg,
            offset=int(self.pt.offsets[index]),
            pages=cfg.memory // PAGE_SIZE,
            kernel_pages=cfg.guest.kernel // PAGE_SIZE,
            anon_pages=anon,
            cache_pages=cfg.workload.page_cache // PAGE_SIZE,
            universe=universes[(cfg.image, cfg.workload.name)],
            kernel_base=kernel_bases[cfg.image],
            rng=rng,
            sample_rng=np.random.default_rng([self.seed, 4, _stable_seed(cfg.name)]),
            ws_order=rng.permutation(anon).astype(np.int64),
            l2g=self.l2g[self.logical_offsets[index] : self.logical_offsets[index + 1]],
            logical_offset=int(self.logical_offsets[index]),
        )

    def _boot(self, vm: VMRun) -> None:
        """Kernel pages, then the workload's anonymous memory and page cache, touched once
        "long ago" (so they are the oldest pages for every LRU)."""
        pt = self.pt
        kernel = np.arange(vm.offset, vm.offset + vm.kernel_pages, dtype=np.int64)
        done = self.fault_in(vm, kernel)
        pt.content[done] = vm.kernel_base + (done - vm.offset)
        pt.use[kernel] = G_KERNEL
        prefill = vm.cfg.workload.prefill
        anon = vm.anon_pages if prefill is None else min(vm.anon_pages, prefill // PAGE_SIZE)
        cache = np.arange(vm.anon_pages, vm.anon_pages + vm.cache_pages, dtype=np.int64)
        logical = np.concatenate((np.sort(vm.ws_order[:anon]), cache))
        g = guest.alloc(self, vm, logical.size)
        guest.place(self, vm, logical[: g.size], g)
        touched = np.flatnonzero(pt.last_access[vm.sl] == self.tick) + vm.offset
        pt.last_access[touched] = -1
        pt.last_write[touched] = -1

    # --- host memory -------------------------------------------------------------------------

    def fault_in(self, vm: VMRun, g: IntArray) -> IntArray:
        """Back pages ``g`` of ``vm`` (unique) with frames of their own; return those done
        (all, unless the host cannot free enough memory)."""
        pt = self.pt
        if g.size == 0:
            return g
        pt.last_access[g] = self.tick  # protects them from the reclaim below
        need = pt.frames_needed(g)
        evicted = 0
        if vm.resident_limit is not None:
            st = pt.state[g]
            incoming = int(np.count_nonzero((st != PRIVATE) & (st != SHARED)))
            evicted += self._keep_within_limit(vm, incoming)
        if need > pt.free_frames():
            headroom = int(self.cfg.reclaim_headroom * pt.capacity)
            if self.cfg.background_reclaim:
                self._kswapd(need - pt.free_frames() + headroom)
            if need > pt.free_frames():
                evicted += self._host_reclaim(need - pt.free_frames() + headroom)
        self._direct_reclaim_stall(vm, evicted)
        free = pt.free_frames()
        if need > free:
            needing = np.flatnonzero(pt.state[g] != PRIVATE)
            drop = needing[max(0, free) :]
            vm.stats.blocked += int(drop.size)
            g = np.delete(g, drop)
        pt.set_state(g, PRIVATE, vm.index)
        return g

    def _direct_reclaim_stall(self, vm: VMRun, evicted: int) -> None:
        """``vm`` reclaimed ``evicted`` pages itself (direct reclaim): it pays the CPU work per
        page and waits until the disk has written them (after what was queued before)."""
        if evicted <= 0:
            return
        done = self.disk.write(evicted)
        vm.stats.stall += evicted * self.cfg.reclaim_cost + max(0.0, done - vm.stats.io_wait)
        vm.stats.io_wait = max(vm.stats.io_wait, done)
        vm.stats.direct_reclaimed += evicted

    def read_stall(self, vm: VMRun, pages: int, latency: float) -> float:
        """Stall of ``vm`` reading ``pages`` pages back from a swap device or file: base
        ``latency`` each plus the disk's queueing delay, after the work the disk carried over
        from earlier ticks (waited for once per tick)."""
        if pages <= 0:
            return 0.0
        backlog = max(0.0, self.disk.carried - vm.stats.io_wait)
        vm.stats.io_wait = max(vm.stats.io_wait, self.disk.carried)
        return backlog + self.disk.read(pages, latency)

    def _kswapd(self, frames: int) -> None:
        """The host kernel's background reclaim: up to ``frames`` pages, as many as the swap
        disk can still write this tick; no VM waits for it (Linux's kswapd, woken when free
        memory falls below its low watermark)."""
        k = min(frames, self.disk.room(self.dt))
        if k <= 0:
            return
        done = self._host_reclaim(k)
        self.disk.write(done)
        self.background_reclaimed += done

    def _host_reclaim(self, frames: int) -> int:
        """The host kernel frees ``frames`` frames by swapping the least recently used pages
        of VMs above their reservations (sampled approximate LRU of host-side accesses);
        returns the pages it swapped out."""
        pt = self.pt
        target = pt.free_frames() + frames
        evicted = 0
        for attempt in range(6):
            short = target - pt.free_frames()
            if short <= 0:
                break
            victims = self._lru_victims(short, full=attempt >= 4)
            if victims.size == 0 and attempt >= 4:
                break
            pt.set_state(victims, SWAPPED)
            evicted += int(victims.size)
        return evicted

    def _lru_victims(self, n: int, *, full: bool) -> IntArray:
        pt = self.pt
        if full:
            cand = np.flatnonzero((pt.state == PRIVATE) | (pt.state == SHARED))
        else:
            m = min(pt.total_pages, max(8 * n, 65536))
            cand = uniq(self.rng.integers(0, pt.total_pages, m))
            st = pt.state[cand]
            cand = cand[(st == PRIVATE) | (st == SHARED)]
        cand = cand[pt.last_access[cand] < self.tick]
        resident = pt.counts[:, PRIVATE] + pt.counts[:, SHARED]
        allowance = np.maximum(0, resident - [v.reservation_pages for v in self.vms])
        cand = cand[allowance[pt.vm_of(cand)] > 0]
        if cand.size > n:
            cand = cand[np.argpartition(pt.last_access[cand], n - 1)[:n]]
        return observe.cap_per_vm(pt, cand, allowance)

    def _keep_within_limit(self, vm: VMRun, incoming: int) -> int:
        """A VM with a resident limit swaps its own pages to make room for ``incoming`` ones
        (like a memory cgroup's limit, reclaimed by the faulting task): the limit holds after
        every fault, not only per tick. Returns the pages swapped out."""
        if vm.resident_limit is None or incoming <= 0:
            return 0
        pt = self.pt
        resident = int(pt.counts[vm.index, PRIVATE] + pt.counts[vm.index, SHARED])
        limit = max(vm.resident_limit, vm.reservation_pages)
        over = resident + incoming - limit
        if over <= 0:
            return 0
        victims = self._own_victims(vm, over)
        pt.set_state(victims, SWAPPED, vm.index)
        return int(victims.size)

    def _own_victims(self, vm: VMRun, k: int) -> IntArray:
        """``k`` resident pages of ``vm`` not touched this tick: random (the hypervisor does
        not know what the guest uses) or least recently used, as configured."""
        pt = self.pt
        st = pt.state[vm.sl]
        cand = np.flatnonzero((st == PRIVATE) | (st == SHARED)) + vm.offset
        cand = cand[pt.last_access[cand] < self.tick]
        if k >= cand.size:
            return cand
        if self.cfg.swap_victims == "lru":
            return guest.oldest(pt.last_access, cand, k)
        return np.sort(vm.rng.choice(cand, size=k, replace=False))

    def swap_step(self, vm: VMRun) -> None:
        """Hypervisor swapping toward the VM's resident limit (never below its reservation)."""
        if vm.resident_limit is None:
            return
        pt = self.pt
        resident = int(pt.counts[vm.index, PRIVATE] + pt.counts[vm.index, SHARED])
        limit = max(vm.resident_limit, vm.reservation_pages)
        # a background writer: no VM waits for it, but it can use only the disk time left
        k = min(resident - limit, vm.swap_budget, self.disk.room(self.dt))
        if k <= 0:
            return
        victims = self._own_victims(vm, k)
        pt.set_state(victims, SWAPPED, vm.index)
        self.disk.write(int(victims.size))
        vm.swap_budget -= int(victims.size)

    # --- time --------------------------------------------------------------------------------

    def step(self, dt: float | None = None) -> None:
        """Advance the host by one tick of ``dt`` seconds (default: the configured tick)."""
        dt = self.dt if dt is None else dt
        if dt <= 0:
            raise InputError(f"tick must be positive, got {dt}")
        self.tick += 1
        t = self.clock.now() - self.start_time
        for vm in self.vms:
            self._phase_change(vm, t)
            guest.balloon_step(self, vm)
            self.swap_step(vm)
        cap = self.cfg.max_accesses_per_tick
        draws = [self._runnable(vm, draw(vm, t, dt, cap), dt) for vm in self.vms]
        self._access_all(draws)
        for vm in self.vms:
            self._kernel_access(vm, kernel_touches(vm, dt))
        if self.ksm_run == 1:
            n = self.scanner.pages_this_tick(self.ksm_pages_to_scan, self.ksm_sleep, dt)
            self.scanner.scan(n, self.tick, self.cfg.ksm_stable_ticks)
        for vm in self.vms:
            observe.sample_active(self, vm, dt)
            vm.demand = vm.stats.asked / dt
            vm.throughput = vm.stats.accesses / dt
            # the faults served within the tick took touches from it (_runnable); the rest of
            # the stall (queueing on the disk, reclaim, writes) is served in the next ticks
            vm.stall_debt += max(0.0, vm.stats.stall - vm.fault_time)
            self._reset_tick(vm, dt)
        self.disk.end_tick(dt)
        self.clock.advance(dt)

    def _phase_change(self, vm: VMRun, t: float) -> None:
        """A workload entering a phase with ``release`` frees what lies beyond its new
        working set."""
        wl = vm.cfg.workload
        if wl.trace is not None:
            return
        index = wl.phase_index(t)
        if index == vm.phase:
            return
        vm.phase = index
        phase = wl.phases[index]
        if phase.release:
            guest.release(self, vm, min(phase.working_set // PAGE_SIZE, vm.anon_pages))

    def _runnable(
        self, vm: VMRun, touches: tuple[IntArray, BoolArray], dt: float
    ) -> tuple[IntArray, BoolArray]:
        """The touches ``vm`` gets to make this tick. A VM that stalled longer than a tick
        first works off that stall and does the rest of its tick's work only in the time
        left. In that time each touch takes its share of the tick (its workload asks for
        ``dt`` worth) and a touch that faults also its fault's latency: the VM gets through
        the touches, in order, that fit. A VM waking up to a swapped working set thus faults
        about a tick's worth of pages per tick, as a real one does, and the host's policy acts
        between ticks, instead of the VM faulting the whole tick's pages first (seconds of
        stall) before any policy could react."""
        pages, writes = touches
        asked = int(pages.size)
        vm.stats.asked = asked
        vm.fault_time = 0.0
        budget = max(0.0, dt - vm.stall_debt)
        vm.stall_debt = max(0.0, vm.stall_debt - dt)
        keep = round(asked * budget / dt)
        pages, writes = pages[:keep], writes[:keep]
        cost = self._fault_latency(vm, pages)
        if cost is None:
            return pages, writes
        spent = np.cumsum(cost)
        took = np.arange(1, keep + 1) * (dt / asked) + spent
        k = int(np.searchsorted(took, budget, side="right"))
        vm.fault_time = float(spent[k - 1]) if k else 0.0
        return pages[:k], writes[:k]

    def _fault_latency(self, vm: VMRun, pages: IntArray) -> npt.NDArray[np.float64] | None:
        """Each touch's nominal fault latency (0 for a hit and for a page already touched
        earlier in the list): guest swap, dropped page cache, host swap, first touch. None
        when nothing faults (most ticks of most VMs: checked first, cheaply)."""
        if pages.size == 0:
            return None
        g = vm.l2g[pages]
        state = self.pt.state[g]  # g = -1 (not in the guest) reads a stray entry: masked below
        out = g < 0
        faulting = np.flatnonzero(out | (state == SWAPPED) | (state == UNTOUCHED))
        if faulting.size == 0:
            return None
        gcfg, cfg = vm.cfg.guest, self.cfg
        c = np.full(faulting.size, cfg.minor_fault_cost)  # first touch: guest or host
        c[~out[faulting] & (state[faulting] == SWAPPED)] = cfg.swap_in_latency
        ls = vm.lstate[pages[faulting]]
        c[ls == L_GSWAPPED] = gcfg.swap_in_latency
        c[ls == L_DROPPED] = gcfg.file_read_latency
        _, first = np.unique(pages[faulting], return_index=True)
        cost = np.zeros(pages.size)
        cost[faulting[first]] = c[first]
        return cost

    def _reset_tick(self, vm: VMRun, dt: float | None = None) -> None:
        dt = self.dt if dt is None else dt
        vm.last, vm.stats = vm.stats, TickStats()
        vm.balloon_budget = int(self.cfg.balloon_rate * dt) // PAGE_SIZE
        vm.swap_budget = int(self.cfg.swap_out_rate * dt) // PAGE_SIZE
        vm.read_back_budget = int(vm.cfg.guest.prefetch_rate * dt) // PAGE_SIZE

    def _access_all(self, draws: list[tuple[IntArray, BoolArray]]) -> None:
        """Every VM's touches of this tick at once: the hits (the common case) in a few
        vectorized steps over all VMs; faults per VM, only for the VMs that have any."""
        pt = self.pt
        sizes = np.array([d[0].size for d in draws], dtype=np.int64)
        if not sizes.any():
            return
        owner = np.repeat(np.arange(len(draws)), sizes)
        logical = np.concatenate([d[0] for d in draws]) + self.logical_offsets[owner]
        writes = np.concatenate([d[1] for d in draws])
        for vm, n in zip(self.vms, sizes.tolist(), strict=True):
            vm.stats.accesses += n
        g = self.l2g[logical]
        hit = g >= 0
        pt.last_access[g[hit]] = self.tick
        swapped = hit.copy()
        swapped[hit] = pt.state[g[hit]] == SWAPPED
        for v, idx in _by_vm(owner, swapped | ~hit):
            self._faults(self.vms[v], g[idx], logical[idx] - self.logical_offsets[v])
        if writes.any():
            self._write_all(logical[writes], owner[writes])
        for vm in self.vms:
            vm.stats.stall += vm.stats.blocked * self.cfg.blocked_cost

    def _faults(self, vm: VMRun, g: IntArray, logical: IntArray) -> None:
        """Touches of ``vm`` that fault: host-swapped guest pages and pages not in the guest."""
        in_guest = g >= 0
        done = self.fault_in(vm, uniq(g[in_guest]))
        vm.stats.host_swap_ins += int(done.size)
        vm.stats.stall += self.read_stall(vm, int(done.size), self.cfg.swap_in_latency)
        missing = uniq(logical[~in_guest])
        if missing.size:
            free = guest.alloc(self, vm, missing.size)
            vm.stats.blocked += int(missing.size - free.size)
            guest.place(self, vm, missing[: free.size], free)

    def _write_all(self, logical: IntArray, owner: IntArray) -> None:
        """Writes give pages new unique content; shared pages are copied first (CoW)."""
        pt = self.pt
        g = self.l2g[logical]
        placed = g >= 0
        g, owner = g[placed], owner[placed]
        cow = pt.state[g] == SHARED
        for v, idx in _by_vm(owner, cow):
            done = self.fault_in(self.vms[v], uniq(g[idx]))
            self.vms[v].stats.stall += done.size * self.cfg.cow_cost
        g = g[pt.state[g] == PRIVATE]
        pt.content[g] = pt.new_unique(g.size)  # a page written twice keeps the last id
        pt.last_write[g] = self.tick

    def write(self, vm: VMRun, logical: IntArray) -> None:
        """``vm`` writes its logical pages ``logical`` (those in guest memory)."""
        owner = np.full(logical.size, vm.index, dtype=np.int64)
        self._write_all(logical + vm.logical_offset, owner)

    def _kernel_access(self, vm: VMRun, g: IntArray) -> None:
        if g.size == 0:
            return
        self.pt.last_access[g] = self.tick
        done = self.fault_in(vm, g[self.pt.state[g] == SWAPPED])
        vm.stats.host_swap_ins += int(done.size)
        vm.stats.stall += self.read_stall(vm, int(done.size), self.cfg.swap_in_latency)

    # --- HostBackend ---------------------------------------------------------------------------

    def vm(self, name: str) -> VMRun:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise NotFoundError(f"no simulated VM named {name!r} (VMs: {known})") from None

    def specs(self) -> list[VMSpec]:
        return [observe.spec_of(vm) for vm in self.vms]

    def observe_host(self) -> HostObservation:
        return observe.host_observation(self)

    def observe_vms(self) -> list[VMObservation]:
        return [observe.vm_observation(self, vm) for vm in self.vms]

    def apply(self, action: Action) -> ActionResult:
        before = self.pt.frames_used()
        if isinstance(action, SetBalloon):
            ok, message = actions.set_balloon(self, action)
        elif isinstance(action, SetSwapTarget):
            ok, message = actions.set_swap_target(self, action)
        elif isinstance(action, SetKsm):
            ok, message = actions.set_ksm(self, action)
        else:
            raise InputError(f"the simulator cannot apply {action!r}")
        if not ok:
            return ActionResult(action=action, ok=False, message=message)
        freed = max(0, before - self.pt.frames_used()) * PAGE_SIZE
        return ActionResult(action=action, ok=True, achieved=freed, message=message)

    # --- checks ---------------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Every conservation invariant, recomputed from the page arrays; [] when all hold."""
        return self.pt.check() + [p for vm in self.vms for p in observe.check_vm(self, vm)]
