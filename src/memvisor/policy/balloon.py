"""Per-VM balloon controller: steer the balloon toward a target while the guest stays healthy.

The scheduler says how large each VM's balloon (or reservation program, C2) should be; this
controller moves the real target there in steps, and refuses to hurt the guest:

- Target guest conditions: the guest pages out reserved pages (the reservation program's
  pressure signal) slower than ``reserved_pageout_limit``, its own paging stays below
  ``guest_paging_limit``, and its free memory stays above a floor.
- Tracking: each step closes a fraction ``gain`` of the error (at least the dead band, never
  more than the error), bounded by a rate in bytes per second. An error within the dead band is
  left alone, so targets do not jitter.
- Floor: an inflation step never takes more than the guest can give without touching its
  working set: its free memory above the floor plus its idle memory (what it holds beyond its
  estimated active memory: page cache and cold pages it can drop or page out cheaply). If free
  memory is under the floor, the balloon deflates by the shortfall. The floor sits below a
  guest kernel's own free-memory watermark, so a guest that still has idle memory to reclaim
  stays above it by itself.
- Working set: a back-off releases at least what the guest's active set needs beside the
  balloon (the active estimate, which the scheduler passes peak-holding, plus the floor and a
  headroom), at most the deflate rate: a VM that turns busy and starts paging gets its room
  back at once instead of paging its working set out and in again for several ticks.
- Back-off: when a paging signal exceeds its limit, the balloon releases a fraction
  ``backoff`` of its size (multiplicative decrease) and does not inflate again for ``hold``
  seconds. The step is marked ``limited`` so the scheduler shifts the reclamation to other VMs
  or, in HARD and LOW states, to the VM's swap file.

Stability (``docs/policy.md`` has the argument): with a constant target and a guest that can
give the memory, the error shrinks by a factor (1 - gain) per step until it is inside the dead
band, then nothing moves. It never overshoots the target (each step is at most the error) and
never inflates past the floor (each step is at most the headroom above it; with an idle part
the guest refills its free memory from that idle memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from memvisor.errors import InputError
from memvisor.model import VMObservation, VMSpec
from memvisor.units import PAGE_SIZE, MiB


@dataclass(frozen=True, slots=True)
class BalloonSettings:
    gain: float = 0.5
    max_inflate_rate: int = 128 * MiB  # bytes per second
    max_deflate_rate: int = 256 * MiB
    dead_band: int = 4 * MiB
    guest_free_floor: float = 0.005  # of the guest's memory (below the guest's own watermark)
    guest_free_floor_min: int = 1 * MiB
    reserved_pageout_limit: float = 32.0  # reserved pages paged out by the guest, pages/s
    guest_paging_limit: float = 1024.0  # guest swap-out beyond what inflation explains, pages/s
    # fraction of the balloon released when a limit is exceeded: a guest that pages while
    # its balloon is held is usually a ballooned VM waking up (0.5 until 2026-11-28;
    # docs/policy.md, results: 0.75 wins pressure-150 in seeds 1-9 where 0.5 won 4 of 6)
    backoff: float = 0.75
    hold: float = 15.0  # seconds without inflating after a back-off
    nominal_tick: float = 1.0  # seconds assumed before the second observation
    working_set_headroom: int = 16 * MiB  # kept free beside the active memory and the floor

    def __post_init__(self) -> None:
        if not 0.0 < self.gain <= 1.0:
            raise InputError(f"balloon.gain must be in (0, 1], got {self.gain}")
        if not 0.0 < self.backoff <= 1.0:
            raise InputError(f"balloon.backoff must be in (0, 1], got {self.backoff}")
        for name in (
            "max_inflate_rate",
            "max_deflate_rate",
            "dead_band",
            "guest_free_floor_min",
            "working_set_headroom",
        ):
            if getattr(self, name) < 0:
                raise InputError(f"balloon.{name} must not be negative")
        if not 0.0 <= self.guest_free_floor < 1.0:
            raise InputError(
                f"balloon.guest_free_floor must be in [0, 1), got {self.guest_free_floor}"
            )

    def floor(self, memory: int) -> int:
        """Guest free memory below which the balloon must not push the guest."""
        return max(int(self.guest_free_floor * memory), self.guest_free_floor_min)


@dataclass(frozen=True, slots=True)
class BalloonStep:
    target: int  # the balloon size to ask for now
    limited: bool  # guest conditions stopped it short of the desired size
    note: str  # why, in words, for the decision's reason


@dataclass(slots=True)
class _VMState:
    last_time: float
    hold_until: float = -math.inf
    asked_rate: float = 0.0  # pages/s of inflation asked at the previous step


def guest_squeezed(vm: VMObservation, s: BalloonSettings, caused: float = 0.0) -> str:
    """Why the guest is outside its target paging conditions ('' when it is inside).

    ``caused`` is the inflation (pages/s) we asked for at the previous step: a guest that
    makes room for the balloon by paging out cold pages is doing what we asked, and may page
    out up to twice that (it also refills its own free-memory watermark); paging beyond that,
    or paging out the reserved pages themselves, is pressure."""
    why = []
    if vm.reserved_paged_out_rate > s.reserved_pageout_limit:
        why.append(
            f"guest pages out reserved pages at {vm.reserved_paged_out_rate:.0f}/s"
            f" > {s.reserved_pageout_limit:.0f}/s"
        )
    if vm.guest_swapped_out_rate - 2 * caused > s.guest_paging_limit:
        why.append(
            f"guest swaps out {vm.guest_swapped_out_rate:.0f} pages/s"
            f" > {s.guest_paging_limit:.0f}/s"
        )
    return "; ".join(why)


def idle_memory(vm: VMObservation, spec: VMSpec, active: float) -> int:
    """Guest memory in use beyond its active set: what the guest can give without paging out
    its working set (0 when the guest's free memory is unknown)."""
    if vm.guest_free is None:
        return 0
    in_use = spec.memory - max(vm.balloon_target, vm.ballooned) - vm.guest_free
    return max(in_use - int(min(max(active, 0.0), 1.0) * spec.memory), 0)


def expected_guest_free(vm: VMObservation) -> int | None:
    """Guest free memory once the balloon reaches its current target: an inflation still in
    flight will take it from the guest's free memory, so it must not be counted twice."""
    if vm.guest_free is None:
        return None
    return vm.guest_free - max(vm.balloon_target - vm.ballooned, 0)


class BalloonController:
    """One controller for all VMs; keeps each VM's hold timer between calls."""

    def __init__(self, settings: BalloonSettings | None = None) -> None:
        self.settings = settings or BalloonSettings()
        self._vm: dict[str, _VMState] = {}

    def step(
        self,
        vm: VMObservation,
        spec: VMSpec,
        desired: int,
        now: float,
        active: float | None = None,
    ) -> BalloonStep:
        """Next balloon target for ``vm`` given the size the scheduler would like.

        ``active`` is the VM's smoothed active fraction (default: the observed sample; none:
        treat all memory in use as active, so only free memory can be ballooned)."""
        s = self.settings
        st = self._vm.get(vm.name)
        dt = s.nominal_tick if st is None else max(now - st.last_time, 0.0)
        if st is None:
            st = self._vm[vm.name] = _VMState(now)
        st.last_time = now
        cur = max(vm.balloon_target, 0)
        cap = max(spec.memory - spec.reservation, 0)  # the reservation is never ballooned
        desired = min(max(desired, 0), cap)
        floor = s.floor(spec.memory)
        squeezed = guest_squeezed(vm, s, st.asked_rate)
        step = self._decide(vm, spec, st, cur, desired, floor, squeezed, dt, now, active)
        st.asked_rate = max(step.target - cur, 0) / PAGE_SIZE / max(dt, s.nominal_tick)
        return step

    def _decide(
        self,
        vm: VMObservation,
        spec: VMSpec,
        st: _VMState,
        cur: int,
        desired: int,
        floor: int,
        squeezed: str,
        dt: float,
        now: float,
        active: float | None,
    ) -> BalloonStep:
        s = self.settings
        free = expected_guest_free(vm)
        cap = max(spec.memory - spec.reservation, 0)
        if squeezed:
            st.hold_until = now + s.hold
            # the guest's paging rate is how fast it lacks memory: give back at least twice that
            rate = int(2 * max(vm.guest_swapped_out_rate, vm.reserved_paged_out_rate) * PAGE_SIZE)
            # and at least what its active set needs beside the balloon (a VM that turned busy
            # gets its room back at once instead of paging its working set out and in again)
            act = active if active is not None else vm.active_fraction
            ws = 0 if act is None else int(min(max(act, 0.0), 1.0) * spec.memory)
            need = ws + floor + s.working_set_headroom - (spec.memory - cur)
            if free is not None and free >= floor + s.working_set_headroom:
                need = 0  # the guest still has free memory: the paging is not its working set
            return self._back_off(free, cur, floor, dt, f"{squeezed}: back off", rate, need)
        if free is not None and free < floor:
            return self._back_off(
                free, cur, floor, dt, f"guest free {_mib(free)} < floor {_mib(floor)}"
            )
        if cur > cap:
            return BalloonStep(cap, False, f"balloon above memory - reservation {_mib(cap)}")
        act = active if active is not None else vm.active_fraction
        idle = idle_memory(vm, spec, 1.0 if act is None else act)
        return self._track(free, idle, st, cur, desired, floor, dt, now)

    def _back_off(
        self,
        free: int | None,
        cur: int,
        floor: int,
        dt: float,
        why: str,
        lack: int = 0,
        need: int = 0,
    ) -> BalloonStep:
        s = self.settings
        release = max(int(s.backoff * cur), s.dead_band, int(lack * max(dt, s.nominal_tick)), need)
        if free is not None:
            release = max(release, floor - free)
        release = min(release, int(s.max_deflate_rate * dt), cur)
        return BalloonStep(cur - release, True, why)

    def _track(
        self,
        free: int | None,
        idle: int,
        st: _VMState,
        cur: int,
        desired: int,
        floor: int,
        dt: float,
        now: float,
    ) -> BalloonStep:
        s = self.settings
        err = desired - cur
        if abs(err) <= s.dead_band:
            return BalloonStep(cur, False, "within dead band")
        step = min(max(math.ceil(s.gain * abs(err)), s.dead_band), abs(err))
        if err < 0:
            return BalloonStep(cur - min(step, int(s.max_deflate_rate * dt)), False, "deflate")
        if now < st.hold_until:
            return BalloonStep(cur, True, f"holding for {st.hold_until - now:.0f} s after back-off")
        step = min(step, int(s.max_inflate_rate * dt))
        if free is not None:
            headroom = free - floor + idle
            if step > headroom:
                room = max(headroom, 0)
                target = cur + room if room >= s.dead_band else cur
                return BalloonStep(
                    target, True, f"guest free {_mib(free)} near floor {_mib(floor)}"
                )
        return BalloonStep(cur + step, False, "inflate")

    def holding(self, vm: str, now: float) -> bool:
        """Whether ``vm``'s guest was backed off less than ``hold`` seconds ago."""
        st = self._vm.get(vm)
        return st is not None and now < st.hold_until

    def forget(self, vm: str) -> None:
        self._vm.pop(vm, None)


def _mib(b: int) -> str:
    return f"{b / MiB:.0f} MiB"
