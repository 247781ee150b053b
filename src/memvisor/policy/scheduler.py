"""The memvisor policy: entitlements with an idle tax, free-memory states, balloon before swap.

Every call to :meth:`MemvisorScheduler.plan`:

1. updates each running VM's active-memory estimate and the host's free-memory state;
2. computes entitlements: ``capacity = total x (1 - free_target)`` (default: the ``high``
   threshold, 6%, which reclamation aims to restore) divided by shares with the idle memory
   tax down the pool tree, each VM bounded by its reservation and by the smaller of its limit
   and its demand (what it holds or lent to the balloon or swap, plus some headroom);
3. by state:

   - HIGH: no reclamation. Free memory above the free target is given back: balloons
     deflate (VMs below entitlement first) and swap limits are lifted.
   - SOFT: bring free memory back to the target by ballooning VMs above their entitlement, the
     VM that frees the most host memory per reclaimed page first (C1, net of idleness; VMs of
     about the same net yield give together, down to a common level: victims.spread), among
     the VMs whose activity estimate (peak-holding) is at most ``max_active``: squeezing a busy
     VM's working set to keep a free-memory margin costs more than it saves. No swapping:
     swap limits set in HARD or LOW are lifted (a kept limit would make the hypervisor swap
     the VM's pages again each time it faults them back).
   - HARD: the same victims, and what their balloons cannot take (the guest is at
     its floor or paging, or the balloon's rate limit) is swapped to their own swap files, in
     the same order. Swap limits of VMs that are no longer victims are lifted.
   - LOW: swap harder: what the balloons do not free this tick is swapped from the same
     victims in order at four times the HARD rate, and VMs above entitlement are given nothing
     back except what their own guest's protection (balloon back-off, working set) releases.

   Busy VMs are not squeezed in any state: their pages come back at once, through the guest's
   swap or the hypervisor's blind swap, at a higher cost than the host kernel's own LRU
   reclaim, which stays the last resort when the idle VMs have nothing left to give (measured
   in docs/policy.md: squeezing them lost 7-10% of the throughput under sustained pressure).
   Nor is a VM whose balloon backed off in the last ``hold`` seconds (the controller's): its
   guest just showed that it needs its memory, typically a VM that woke up and whose sampled
   activity has not caught up yet. In the tick of the back-off itself, what the guest refused
   still goes to its swap file in HARD and LOW (C2); from the next tick the other victims give.

A VM's reservation is never reclaimed: balloons stay at or below memory - reservation, swap
limits at or above the reservation (and in SOFT/HARD above the entitlement). Decisions are made
only when a target moves by more than the dead band.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from memvisor.errors import InputError
from memvisor.model import (
    Backing,
    Decision,
    HostState,
    SetBalloon,
    SetSwapTarget,
    Snapshot,
    VMObservation,
    VMSpec,
)
from memvisor.policy.activity import ActivityEstimator, ActivitySettings
from memvisor.policy.balloon import BalloonController, BalloonSettings, BalloonStep
from memvisor.policy.base import PoolInfo, build_tree, mib, running
from memvisor.policy.entitlement import (
    DEFAULT_TAX,
    Allocation,
    VMClaim,
    allocate,
    idle_cost_factor,
)
from memvisor.policy.states import FreeMemoryStates, StateThresholds
from memvisor.policy.victims import MIN_YIELD, Candidate, expected_yield, order, spread
from memvisor.units import MiB

VM = tuple[VMSpec, VMObservation]


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    tax: float = DEFAULT_TAX
    thresholds: StateThresholds = field(default_factory=StateThresholds)
    balloon: BalloonSettings = field(default_factory=BalloonSettings)
    activity: ActivitySettings = field(default_factory=ActivitySettings)
    pools: tuple[PoolInfo, ...] = ()
    free_target: float | None = None  # None: the high threshold
    demand_headroom: float = 0.05  # of memory, added to what a VM holds to get its demand
    swap_rate: int = 128 * MiB  # bytes per second per VM in HARD
    dead_band: int = 4 * MiB
    max_active: float = 0.5  # every state reclaims only from VMs at most this active
    growth_guard: int = 4 * MiB  # bytes/s of host memory growth that exempts a VM this tick
    # victims whose net yields differ by at most this much give together (victims.spread);
    # None: one at a time in order
    spread_band: float | None = 0.1

    def __post_init__(self) -> None:
        idle_cost_factor(self.tax)  # validates the tax
        if self.free_target is not None and not 0.0 <= self.free_target < 1.0:
            raise InputError(f"free_target must be in [0, 1), got {self.free_target}")
        if self.demand_headroom < 0 or self.swap_rate < 0 or self.dead_band < 0:
            raise InputError("demand_headroom, swap_rate and dead_band must not be negative")
        if not 0.0 <= self.max_active <= 1.0:
            raise InputError(f"max_active must be in [0, 1], got {self.max_active}")
        if self.spread_band is not None and not 0.0 <= self.spread_band <= 1.0:
            raise InputError(f"spread_band must be in [0, 1] or None, got {self.spread_band}")


@dataclass
class _Tick:
    """What one plan() call works with."""

    snap: Snapshot
    state: HostState
    where: str  # e.g. "SOFT (free 3.1% < 4%)"
    alloc: Allocation
    dt: float
    growth: dict[str, float]  # bytes/s each VM's host memory grew since the last plan
    decisions: list[Decision] = field(default_factory=list)


class MemvisorScheduler:
    """The memvisor memory scheduler (policy name ``memvisor``)."""

    name = "memvisor"

    def __init__(self, settings: SchedulerSettings | None = None) -> None:
        self.settings = s = settings or SchedulerSettings()
        self.states = FreeMemoryStates(s.thresholds)
        self.activity = ActivityEstimator(s.activity)
        self.balloon = BalloonController(s.balloon)
        self.swap_limit: dict[str, int] = {}  # resident limits we asked for
        self._last_time: float | None = None
        self._consumed: dict[str, tuple[int, int]] = {}  # consumed, swapped
        self.last_allocation: Allocation | None = None

    @property
    def free_target(self) -> float:
        """Fraction of host memory reclamation aims to keep free (default: the ``high``
        threshold, the top of the SOFT band, so reclamation does not flip the state)."""
        t = self.settings.free_target
        return self.settings.thresholds.high if t is None else t

    # --- the plan ----------------------------------------------------------------------------

    def plan(self, snapshot: Snapshot) -> list[Decision]:
        host = snapshot.host
        now = host.time
        dt = 1.0 if self._last_time is None else max(now - self._last_time, 0.0)
        self._last_time = now
        vms = running(snapshot)
        _, state = self.states.update(host.free, host.total)
        for _spec, obs in vms:
            self.activity.update(obs.name, now, obs.active_fraction)
            # the backend's standing limit is the truth: a restarted manager, which did not
            # set it, still lifts it when the VM is no longer a victim
            if obs.resident_limit is not None:
                self.swap_limit[obs.name] = obs.resident_limit
        # a VM powered off or gone starts afresh when it comes back (its memory is new)
        self.activity.retain({obs.name for _spec, obs in vms})
        alloc = self.entitlements(snapshot, vms)
        self.last_allocation = alloc
        growth = self._growth(vms, dt)
        where = self.states.describe(host.free, host.total)
        tick = _Tick(snapshot, state, where, alloc, dt, growth)
        if state is HostState.HIGH:
            self._give_back(tick, vms)
        else:
            self._reclaim(tick, vms)
        return tick.decisions

    def _growth(self, vms: Sequence[VM], dt: float) -> dict[str, float]:
        """Bytes/s each VM's host memory grew, or its swapped memory shrank (it faults its
        pages back: a working set coming back, throttled by swap-in latency)."""
        growth = {}
        for _spec, obs in vms:
            before = self._consumed.get(obs.name)
            if before is not None and dt > 0:
                grew = max(obs.consumed - before[0], before[1] - obs.swapped)
                growth[obs.name] = grew / dt
            self._consumed[obs.name] = (obs.consumed, obs.swapped)
        return growth

    def entitlements(self, snapshot: Snapshot, vms: Sequence[VM]) -> Allocation:
        capacity = int(snapshot.host.total * (1.0 - self.free_target))
        tree = build_tree(vms, self.settings.pools, self._claim)
        return allocate(tree, capacity, self.settings.tax)

    def _claim(self, spec: VMSpec, obs: VMObservation) -> VMClaim:
        held = obs.consumed + max(obs.balloon_target, obs.ballooned) + obs.swapped
        demand = held + int(self.settings.demand_headroom * spec.memory)
        return VMClaim(
            name=spec.name,
            shares=spec.effective_shares,
            reservation=spec.reservation,
            limit=spec.effective_limit,
            active=int(self.activity.estimate(spec.name) * spec.memory),
            demand=min(demand, spec.memory),
        )

    def _step(self, obs: VMObservation, spec: VMSpec, desired: int, now: float) -> BalloonStep:
        return self.balloon.step(obs, spec, desired, now, self.activity.estimate(spec.name))

    # --- HIGH: give memory back --------------------------------------------------------------

    def _give_back(self, t: _Tick, vms: Sequence[VM]) -> None:
        host = t.snap.host
        pending = sum(max(o.ballooned - o.balloon_target, 0) for _, o in vms)
        surplus = host.free - int(self.free_target * host.total) - pending
        # below-entitlement VMs first, the most deserving (highest ratio) first among them
        ranked = sorted(
            vms,
            key=lambda v: (v[1].consumed > t.alloc.of(v[0].name), -t.alloc.ratio[v[0].name]),
        )
        for spec, obs in ranked:
            cur = obs.balloon_target
            give = min(cur, max(surplus, 0))
            step = self._step(obs, spec, cur - give, host.time)
            surplus -= max(cur - step.target, 0)
            self._emit_balloon(t, spec, obs, step.target, step.note, "free memory above target")
            self._lift_swap(t, spec, spec.memory, "host has free memory")

    # --- SOFT / HARD / LOW: reclaim ----------------------------------------------------------

    def _reclaim(self, t: _Tick, vms: Sequence[VM]) -> None:
        host = t.snap.host
        in_flight = sum(max(o.balloon_target - o.ballooned, 0) for _, o in vms)
        in_flight += sum(
            max(o.consumed - self.swap_limit[o.name], 0)
            for _, o in vms
            if o.name in self.swap_limit
        )
        need = int(self.free_target * host.total) - host.free - in_flight
        victims = order(self._candidates(t, vms))
        # Only where reclaiming pays: a page taken from a VM that is busy (or was busy minutes
        # ago, or whose guest had to be backed off just now) is faulted back soon, at a cost
        # above the host kernel's own LRU reclaim, which remains the last resort (measured:
        # docs/policy.md, pressure-150 and the cold starts)
        victims = [
            c
            for c in victims
            if c.active <= self.settings.max_active and not self.balloon.holding(c.name, host.time)
        ]
        by_name = {s.name: (s, o) for s, o in vms}
        left, short = self._balloon_victims(t, victims, by_name, need)
        chosen = {c.name for c in victims}
        swapping = t.state in (HostState.HARD, HostState.LOW)
        for spec, obs in vms:  # everyone else: only guest protection, or back to entitlement
            if spec.name not in chosen:
                self._hold_or_release(t, spec, obs)
                if swapping:  # a limit set on a VM that is no longer a victim goes
                    self._lift_swap(t, spec, spec.memory, "no longer a victim")
        if swapping:
            self._swap_victims(t, victims, by_name, left, short)
        if t.state is HostState.SOFT:  # swap is for HARD and LOW; in SOFT balloons do it all
            for spec, _obs in vms:
                self._lift_swap(t, spec, spec.memory, "SOFT state reclaims by balloon only")

    def _candidates(self, t: _Tick, vms: Sequence[VM]) -> list[Candidate]:
        """VMs above entitlement that can give now. A VM whose host memory grows fast is
        building its working set (its sampled activity lags behind): squeezing it would make
        its guest page out what it is faulting in, so it is left alone this tick."""
        out = []
        for spec, obs in vms:
            excess = obs.consumed - max(t.alloc.of(spec.name), spec.reservation)
            if excess > self.settings.dead_band and t.growth.get(spec.name, 0.0) < (
                self.settings.growth_guard
            ):
                y, stat = expected_yield(obs)
                ratio = t.alloc.ratio[spec.name]
                # is a page reclaimed now needed soon? A VM that was busy minutes ago is likely to
                # be busy again (batch jobs, periodic load): the protective estimate says so
                active = self.activity.estimate(spec.name)
                out.append(Candidate(spec.name, excess, y, stat, ratio, active))
        return out

    def _balloon_victims(
        self, t: _Tick, victims: list[Candidate], by_name: dict[str, VM], need: int
    ) -> tuple[int, set[str]]:
        """Balloon the victims in order until ``need`` host bytes are on their way, victims of
        about the same net yield together (:func:`victims.spread`); returns the host bytes
        still needed and the victims whose guests stopped the balloon."""
        left, short = need, set()
        asks = spread(victims, max(need, 0), self.settings.spread_band)
        for c in victims:
            spec, obs = by_name[c.name]
            cur = obs.balloon_target
            ask = asks.get(c.name, 0)
            step = self._step(obs, spec, cur + ask, t.snap.host.time)
            target = step.target
            # what the guest refuses is still needed: swap covers it in HARD and LOW, and the
            # next tick shares it among the victims left; what the gain and the rate limit
            # defer is still this VM's to give on the next ticks
            # (in LOW only what is really asked counts: swap covers the rest at once)
            deferred_ok = not step.limited and t.state is not HostState.LOW
            got = ask if deferred_ok else max(target - cur, 0)
            if step.limited:
                short.add(c.name)
            left -= int(got * c.freed_per_page)
            why = self._victim_reason(t, c, step.note)
            self._emit_balloon(t, spec, obs, target, why, "")
        return left, short

    def _hold_or_release(self, t: _Tick, spec: VMSpec, obs: VMObservation) -> None:
        """A VM that is not asked to give keeps its balloon while the host is short of memory,
        unless its guest needs memory back (the controller's floor and back-off). Giving back
        what it does not ask for would only be reclaimed again from someone else."""
        cur = obs.balloon_target
        step = self._step(obs, spec, cur, t.snap.host.time)
        self._emit_balloon(t, spec, obs, step.target, step.note, "its guest needs memory")

    def _swap_victims(
        self,
        t: _Tick,
        victims: list[Candidate],
        by_name: dict[str, VM],
        left: int,
        short: set[str],
    ) -> None:
        """Swap to the VMs' own files what the balloons do not cover. HARD: only from VMs whose
        guests stopped their balloon; LOW: from every victim in order, four times faster.
        Never below the reservation or the entitlement. A VM with anonymous backing has no
        swap file (C4): it is skipped and the next victim swaps instead."""
        low = t.state is HostState.LOW
        rate = self.settings.swap_rate * (4 if low else 1)
        for c in victims:
            if left <= 0:
                break
            if not low and c.name not in short:
                continue
            if by_name[c.name][0].backing is not Backing.FILE:
                continue
            spec, obs = by_name[c.name]
            bottom = max(spec.reservation, t.alloc.of(spec.name))
            y = max(c.freed_per_page, MIN_YIELD)
            take = min(c.excess, int(rate * t.dt), int(left / y) + 1)
            limit = max(bottom, obs.consumed - take)
            if limit >= obs.consumed:
                continue
            left -= int((obs.consumed - limit) * y)
            note = (
                "LOW: the balloon is not fast enough, swap the rest"
                if low and c.name not in short
                else "its guest stopped the balloon, the rest goes to swap"
            )
            self._emit_swap(t, spec, limit, self._victim_reason(t, c, note))

    # --- decisions ---------------------------------------------------------------------------

    def _victim_reason(self, t: _Tick, c: Candidate, note: str) -> str:
        ent = t.alloc.of(c.name)
        return (
            f"above entitlement {mib(ent)} MiB by {mib(c.excess)} MiB; chosen by {c.describe()}, "
            f"shares-per-active-page {c.ratio:.1f}; {note}"
        )

    def _emit_balloon(
        self, t: _Tick, spec: VMSpec, obs: VMObservation, target: int, note: str, why: str
    ) -> None:
        cur = obs.balloon_target
        target = min(max(target, 0), max(spec.memory - spec.reservation, 0))
        if target == cur:
            return
        text = f"{spec.name}: host in {t.where}, balloon {mib(cur)}→{mib(target)} MiB"
        text += f", {why}" if why else ""
        text += f" ({note})" if note else ""
        t.decisions.append(Decision(SetBalloon(spec.name, target), text))

    def _emit_swap(self, t: _Tick, spec: VMSpec, limit: int, why: str) -> None:
        limit = min(max(limit, spec.reservation), spec.memory)
        prev = self.swap_limit.get(spec.name, spec.memory)
        if abs(prev - limit) <= self.settings.dead_band and limit != spec.reservation:
            return
        if prev == limit:
            return
        self.swap_limit[spec.name] = limit
        text = (
            f"{spec.name}: host in {t.where}, swap to own file: resident "
            f"{mib(prev)}→{mib(limit)} MiB, {why}"
        )
        t.decisions.append(Decision(SetSwapTarget(spec.name, limit), text))

    def _lift_swap(self, t: _Tick, spec: VMSpec, up_to: int, why: str) -> None:
        prev = self.swap_limit.get(spec.name)
        if prev is None or up_to <= prev + self.settings.dead_band:
            return
        limit = min(up_to, spec.memory)
        if limit >= spec.memory:
            del self.swap_limit[spec.name]
        else:
            self.swap_limit[spec.name] = limit
        text = (
            f"{spec.name}: host in {t.where}, swap limit lifted: resident "
            f"{mib(prev)}→{mib(limit)} MiB, {why}"
        )
        t.decisions.append(Decision(SetSwapTarget(spec.name, limit), text))
