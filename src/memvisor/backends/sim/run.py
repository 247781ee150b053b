"""Run a scenario: the control loop (observe -> plan -> apply) over a :class:`SimHost`.

:func:`simulate` takes any policy object with ``plan(snapshot) -> list[Decision]`` (default:
the scenario's ``[policy]``, which is ``none``: no management, the host kernel alone) and
records, every tick, per VM and for the host, the figures in :data:`VM_SERIES` and
:data:`HOST_SERIES`. If the policy can name the host state (``host_state(snapshot)``) or the
entitlements (``entitlements(snapshot)``), those are recorded; otherwise the host state is
classified from free memory with the scheduler's default thresholds and entitlements are NaN.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from memvisor.backends.base import ManualClock
from memvisor.backends.sim.host import SimHost
from memvisor.backends.sim.scenario import Scenario
from memvisor.errors import BackendError, InputError
from memvisor.model import Decision, HostState, Snapshot
from memvisor.units import PAGE_SIZE

VM_SERIES = (
    "consumed",
    "shared",
    "swapped",
    "ballooned",
    "guest_swapped",
    "active",
    "entitlement",
    "throughput",
    "demand",
)
HOST_SERIES = ("free", "used", "shared_frames")
FloatArray = npt.NDArray[np.float64]


class PlanningPolicy(Protocol):
    def plan(self, snapshot: Snapshot) -> list[Decision]: ...


class NoManagement:
    """No memory management: the host kernel alone reclaims (by swapping) when it must."""

    name = "none"

    def plan(self, snapshot: Snapshot) -> list[Decision]:
        return []


def policy_for(scenario: Scenario) -> PlanningPolicy:
    """The policy the scenario's ``[policy]`` table names (``memvisor.policy.get_policy``)."""
    settings = scenario.policy
    if settings.name == "none" and not settings.options:
        return NoManagement()
    from memvisor.policy import PoolInfo, get_policy

    options: dict[str, Any] = dict(settings.options)
    if settings.name == "memvisor" and scenario.pools and "pools" not in options:
        options["pools"] = tuple(
            PoolInfo(p.name, p.parent, p.shares, p.reservation, p.limit, p.expandable)
            for p in scenario.pools
        )
    try:
        policy: PlanningPolicy = get_policy(settings.name, **options)
    except InputError as exc:
        raise InputError(f"{scenario.source}: policy: {exc}") from None
    return policy


@dataclass
class SimResult:
    """Time series of one run. ``vm[metric]`` is [ticks, VMs]; ``host[metric]`` is [ticks]."""

    scenario: Scenario
    policy: str
    times: FloatArray
    vm_names: list[str]
    memory: list[int]
    host_total: int
    vm: dict[str, FloatArray]
    host: dict[str, FloatArray]
    host_state: list[str]
    decisions: int = 0
    failed_actions: int = 0
    wall_seconds: float = 0.0
    reasons: list[tuple[float, str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Per-VM and host figures over the whole run (means, finals, worst)."""
        rel = _relative_throughput(self.vm["throughput"], self.vm["demand"])
        vms = []
        for i, name in enumerate(self.vm_names):
            vms.append(
                {
                    "name": name,
                    "memory": self.memory[i],
                    "mean_throughput": float(np.mean(self.vm["throughput"][:, i])),
                    "relative_throughput": float(rel[i]),
                    "final_consumed": float(self.vm["consumed"][-1, i]),
                    "final_shared": float(self.vm["shared"][-1, i]),
                    "final_swapped": float(self.vm["swapped"][-1, i]),
                    "final_ballooned": float(self.vm["ballooned"][-1, i]),
                    "final_guest_swapped": float(self.vm["guest_swapped"][-1, i]),
                    "peak_swapped": float(np.max(self.vm["swapped"][:, i])),
                }
            )
        total_tp = float(np.sum(np.mean(self.vm["throughput"], axis=0)))
        return {
            "policy": self.policy,
            "ticks": len(self.times),
            "simulated_seconds": float(self.times[-1]) if len(self.times) else 0.0,
            "wall_seconds": self.wall_seconds,
            "total_throughput": total_tp,
            "worst_relative_throughput": float(np.min(rel)) if len(rel) else 1.0,
            "host_total": self.host_total,
            "final_free": float(self.host["free"][-1]),
            "min_free": float(np.min(self.host["free"])),
            "final_saved_by_sharing": float(
                self.vm["shared"][-1].sum() - self.host["shared_frames"][-1]
            ),
            "decisions": self.decisions,
            "failed_actions": self.failed_actions,
            "vms": vms,
        }

    def to_json(self) -> dict[str, Any]:
        """Summary plus the full time series (bytes, fractions and accesses per second)."""

        def clean(a: FloatArray) -> list[float | None]:
            return [None if not math.isfinite(x) else float(x) for x in a.tolist()]

        return {
            "scenario": self.scenario.source,
            "seed": self.scenario.seed,
            "tick": self.scenario.tick,
            "summary": self.summary(),
            "time": clean(self.times),
            "host": {
                "total": self.host_total,
                **{k: clean(v) for k, v in self.host.items()},
                "state": self.host_state,
            },
            "vms": {
                name: {k: clean(v[:, i]) for k, v in self.vm.items()}
                for i, name in enumerate(self.vm_names)
            },
        }


def _relative_throughput(tp: FloatArray, demand: FloatArray) -> FloatArray:
    asked = demand.sum(axis=0)
    done = tp.sum(axis=0)
    return np.where(asked > 0, done / np.maximum(asked, 1e-12), 1.0)


Progress = Callable[[int, int], None]


def simulate(
    scenario: Scenario,
    policy: PlanningPolicy | None = None,
    *,
    duration: float | None = None,
    seed: int | None = None,
    progress: Progress | None = None,
    check_invariants: bool = False,
    keep_reasons: int = 200,
) -> SimResult:
    """Run ``scenario`` for ``duration`` simulated seconds; return the recorded series."""
    import time as wallclock

    scenario = scenario.with_overrides(duration=duration, seed=seed)
    if policy is None:
        policy = policy_for(scenario)
    started = wallclock.perf_counter()
    clock = ManualClock()
    host = SimHost(scenario.host, scenario.vms, seed=scenario.seed, tick=scenario.tick, clock=clock)
    ticks = max(1, round(scenario.duration / scenario.tick))
    rec = _Recorder(host, ticks)
    states = _DefaultStates()
    snapshot = _snapshot(host)
    for i in range(ticks):
        decisions = list(policy.plan(snapshot))
        for d in decisions:
            if not host.apply(d.action).ok:
                rec.failed += 1
            if len(rec.reasons) < keep_reasons:
                rec.reasons.append((snapshot.host.time, d.reason))
        rec.decisions += len(decisions)
        state = _host_state(policy, snapshot, states)
        entitlements = _entitlements(policy, snapshot)
        host.step()
        if check_invariants:
            problems = host.check()
            if problems:
                raise BackendError(f"tick {i + 1}: invariant broken: " + "; ".join(problems))
        snapshot = _snapshot(host)
        rec.record(i, snapshot, state, entitlements)
        if progress is not None:
            progress(i + 1, ticks)
    return rec.result(
        scenario, getattr(policy, "name", type(policy).__name__), wallclock.perf_counter() - started
    )


def _snapshot(host: SimHost) -> Snapshot:
    return Snapshot(host.observe_host(), tuple(host.specs()), tuple(host.observe_vms()))


class _DefaultStates:
    """Free-memory state by the scheduler's default thresholds, for policies that have none."""

    def __init__(self) -> None:
        from memvisor.policy.states import FreeMemoryStates

        self.states = FreeMemoryStates()

    def update(self, free: int, total: int) -> str:
        return str(self.states.update(free, total)[1].value)


def _host_state(policy: object, snapshot: Snapshot, states: _DefaultStates) -> str:
    """The policy's own view of the host state if it exposes one, else the default one."""
    report = getattr(policy, "host_state", None)
    if callable(report) and _arity(report) == 1:
        return str(report(snapshot))
    machine = getattr(policy, "states", None)
    own = getattr(machine, "state", None)
    if isinstance(own, HostState):
        states.update(snapshot.host.free, snapshot.host.total)
        return own.value
    return states.update(snapshot.host.free, snapshot.host.total)


def _entitlements(policy: object, snapshot: Snapshot) -> Mapping[str, int]:
    """Entitlements the policy computed for this snapshot (bytes per VM), if it says."""
    alloc = getattr(policy, "last_allocation", None)
    ent = getattr(alloc, "entitlement", None)
    if isinstance(ent, Mapping):
        return ent
    report = getattr(policy, "entitlements", None)
    if callable(report) and _arity(report) == 1:
        return dict(report(snapshot))
    return {}


def _arity(fn: Callable[..., object]) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return -1
    return sum(1 for p in params if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD)


class _Recorder:
    def __init__(self, host: SimHost, ticks: int) -> None:
        self.host = host
        n = len(host.vms)
        self.times = np.zeros(ticks)
        self.vm = {k: np.zeros((ticks, n)) for k in VM_SERIES}
        self.hs = {k: np.zeros(ticks) for k in HOST_SERIES}
        self.state: list[str] = []
        self.decisions = 0
        self.failed = 0
        self.reasons: list[tuple[float, str]] = []

    def record(self, i: int, snap: Snapshot, state: str, ent: Mapping[str, int]) -> None:
        self.times[i] = snap.host.time
        for j, (o, vm) in enumerate(zip(snap.vms, self.host.vms, strict=True)):
            row = (
                o.consumed,
                o.shared,
                o.swapped,
                o.ballooned,
                vm.guest_swap_used * PAGE_SIZE,
                math.nan if o.active_fraction is None else o.active_fraction,
                ent.get(o.name, math.nan),
                o.throughput or 0.0,
                vm.demand,
            )
            for k, value in zip(VM_SERIES, row, strict=True):
                self.vm[k][i, j] = value
        self.hs["free"][i] = snap.host.free
        self.hs["used"][i] = snap.host.total - snap.host.free
        self.hs["shared_frames"][i] = snap.host.ksm.pages_shared * PAGE_SIZE
        self.state.append(state if state in {s.value for s in HostState} else str(state))

    def result(self, scenario: Scenario, policy: str, wall: float) -> SimResult:
        return SimResult(
            scenario=scenario,
            policy=policy,
            times=self.times,
            vm_names=[v.name for v in self.host.vms],
            memory=[v.cfg.memory for v in self.host.vms],
            host_total=self.host.pt.capacity * PAGE_SIZE,
            vm=self.vm,
            host=self.hs,
            host_state=self.state,
            decisions=self.decisions,
            failed_actions=self.failed,
            wall_seconds=wall,
            reasons=self.reasons,
        )
