"""The memvisor policy: entitlements with an idle tax, free-memory states, balloon before swap.

Every call to :meth:`MemvisorScheduler.plan`:

1. updates each running VM's active-memory estimate and the host's free-memory state;
2. computes entitlements: ``capacity = total x (1 - high)`` divided by shares with the idle
   memory tax down the pool tree, each VM bounded by its reservation and by the smaller of its
   limit and its demand (what it holds or lent to the balloon or swap, plus some headroom);
3. by state:

   - HIGH: no reclamation. Free memory above the ``high`` threshold is given back: balloons
     deflate (VMs below entitlement first) and swap limits are lifted.
   - SOFT: bring free memory back to ``high`` by ballooning VMs above their entitlement, the
     VM that frees the most host memory per reclaimed page first (C1). No swapping.
   - HARD: the same, and what the balloons cannot take (the guest is at its floor or paging,
     or the balloon's rate limit) is swapped to the VMs' own swap files, in the same order.
   - LOW: in addition every VM above entitlement is swapped down to its entitlement at once,
     and VMs above entitlement get nothing back, even when their guests protest.

A VM's reservation is never reclaimed: balloons stay at or below memory - reservation, swap
limits at or above the reservation (and in SOFT/HARD above the entitlement). Decisions are made
only when a target moves by more than the dead band.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from memvisor.errors import InputError
from memvisor.model import (
    Decision,
    HostState,
    SetBalloon,
    SetSwapTarget,
    Snapshot,
    VMObservation,
    VMSpec,
)
from memvisor.policy.activity import ActivityEstimator, ActivitySettings
from memvisor.policy.balloon import BalloonController, BalloonSettings
from memvisor.policy.base import PoolInfo, build_tree, mib, running
from memvisor.policy.entitlement import (
    DEFAULT_TAX,
    Allocation,
    VMClaim,
    allocate,
    idle_cost_factor,
)
from memvisor.policy.states import FreeMemoryStates, StateThresholds
from memvisor.policy.victims import Candidate, expected_yield, order
from memvisor.units import MiB

VM = tuple[VMSpec, VMObservation]


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    tax: float = DEFAULT_TAX
    thresholds: StateThresholds = field(default_factory=StateThresholds)
    balloon: BalloonSettings = field(default_factory=BalloonSettings)
    activity: ActivitySettings = field(default_factory=ActivitySettings)
    pools: tuple[PoolInfo, ...] = ()
    demand_headroom: float = 0.05  # of memory, added to what a VM holds to get its demand
    swap_rate: int = 128 * MiB  # bytes per second per VM in HARD
    dead_band: int = 4 * MiB

    def __post_init__(self) -> None:
        idle_cost_factor(self.tax)  # validates the tax
        if self.demand_headroom < 0 or self.swap_rate < 0 or self.dead_band < 0:
            raise InputError("demand_headroom, swap_rate and dead_band must not be negative")


@dataclass
class _Tick:
    """What one plan() call works with."""

    snap: Snapshot
    state: HostState
    where: str  # e.g. "SOFT (free 3.1% < 4%)"
    alloc: Allocation
    dt: float
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
        self.last_allocation: Allocation | None = None

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
        alloc = self.entitlements(snapshot, vms)
        self.last_allocation = alloc
        tick = _Tick(snapshot, state, self.states.describe(host.free, host.total), alloc, dt)
        if state is HostState.HIGH:
            self._give_back(tick, vms)
        else:
            self._reclaim(tick, vms)
        return tick.decisions

    def entitlements(self, snapshot: Snapshot, vms: Sequence[VM]) -> Allocation:
        capacity = int(snapshot.host.total * (1.0 - self.settings.thresholds.high))
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

    # --- HIGH: give memory back --------------------------------------------------------------

    def _give_back(self, t: _Tick, vms: Sequence[VM]) -> None:
        host = t.snap.host
        pending = sum(max(o.ballooned - o.balloon_target, 0) for _, o in vms)
        surplus = host.free - int(self.settings.thresholds.high * host.total) - pending
        # below-entitlement VMs first, the most deserving (highest ratio) first among them
        ranked = sorted(
            vms,
            key=lambda v: (v[1].consumed > t.alloc.of(v[0].name), -t.alloc.ratio[v[0].name]),
        )
        for spec, obs in ranked:
            cur = obs.balloon_target
            give = min(cur, max(surplus, 0))
            step = self.balloon.step(obs, spec, cur - give, host.time)
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
        need = int(self.settings.thresholds.high * host.total) - host.free - in_flight
        victims = order(self._candidates(t, vms))
        by_name = {s.name: (s, o) for s, o in vms}
        left, short = self._balloon_victims(t, victims, by_name, need)
        chosen = {c.name for c in victims}
        for spec, obs in vms:  # everyone else: only guest protection, or back to entitlement
            if spec.name not in chosen:
                self._hold_or_release(t, spec, obs)
        if t.state in (HostState.HARD, HostState.LOW):
            self._swap_victims(t, victims, by_name, left, short)
        if t.state is HostState.SOFT:
            for spec, _obs in vms:
                self._lift_swap(t, spec, t.alloc.of(spec.name), "back to its entitlement")

    def _candidates(self, t: _Tick, vms: Sequence[VM]) -> list[Candidate]:
        out = []
        for spec, obs in vms:
            excess = obs.consumed - max(t.alloc.of(spec.name), spec.reservation)
            if excess > self.settings.dead_band:
                y, stat = expected_yield(obs)
                out.append(Candidate(spec.name, excess, y, stat, t.alloc.ratio[spec.name]))
        return out

    def _balloon_victims(
        self, t: _Tick, victims: list[Candidate], by_name: dict[str, VM], need: int
    ) -> tuple[int, set[str]]:
        """Balloon the victims in order until ``need`` host bytes are on their way; returns the
        host bytes still needed and the victims whose guests stopped the balloon."""
        left, short = need, set()
        for c in victims:
            spec, obs = by_name[c.name]
            cur = obs.balloon_target
            ask = min(c.excess, int(max(left, 0) / max(c.freed_per_page, 0.01)))
            step = self.balloon.step(obs, spec, cur + ask, t.snap.host.time)
            target = step.target
            if target < cur and t.state is HostState.LOW:
                target = cur  # LOW: nothing goes back to a VM above its entitlement
            # only what the guest refuses moves on to the next victim; what the gain and the
            # rate limit defer is still this VM's to give on the next ticks
            got = max(target - cur, 0) if step.limited else ask
            if step.limited:
                short.add(c.name)
            left -= int(got * c.freed_per_page)
            why = self._victim_reason(t, c, step.note)
            self._emit_balloon(t, spec, obs, target, why, "")
        return left, short

    def _hold_or_release(self, t: _Tick, spec: VMSpec, obs: VMObservation) -> None:
        """A VM that is not asked to give: its balloon stays, unless its guest needs memory back
        or it sits below its entitlement with a balloon (then deflate toward the entitlement)."""
        cur = obs.balloon_target
        room = t.alloc.of(spec.name) - obs.consumed
        desired = cur - max(min(room, cur), 0) if room > self.settings.dead_band else cur
        step = self.balloon.step(obs, spec, desired, t.snap.host.time)
        self._emit_balloon(t, spec, obs, step.target, step.note, "below entitlement")

    def _swap_victims(
        self,
        t: _Tick,
        victims: list[Candidate],
        by_name: dict[str, VM],
        left: int,
        short: set[str],
    ) -> None:
        """HARD: swap what the balloons could not take because the guest stopped them; LOW: swap
        every victim down to its entitlement. Never below the reservation or the entitlement."""
        for c in victims:
            spec, obs = by_name[c.name]
            bottom = max(spec.reservation, t.alloc.of(spec.name))
            if t.state is HostState.LOW:
                limit, note = bottom, "LOW: swapped down to its entitlement"
            elif left > 0 and c.name in short:
                y = max(c.freed_per_page, 0.01)
                take = min(c.excess, int(self.settings.swap_rate * t.dt), int(left / y) + 1)
                limit = max(bottom, obs.consumed - take)
                left -= int((obs.consumed - limit) * y)
                note = "its guest stopped the balloon, the rest goes to swap"
            else:
                continue
            why = self._victim_reason(t, c, note)
            self._emit_swap(t, spec, limit, why)

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
