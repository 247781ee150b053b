"""The control loop: observe -> plan -> apply -> record, once per interval.

The same loop drives real QEMU VMs and the simulator: it only sees a
:class:`~memvisor.backends.base.HostBackend`, a policy (``plan(snapshot) -> decisions``) and a
:class:`~memvisor.backends.base.Clock`. Each tick is isolated: an observation or a plan that
raises is recorded as a ``loop.error`` event and the tick is skipped; an action that raises or
fails is recorded with its outcome and the other actions still run. The loop never dies of a
backend error, only when told to stop.

Observations and decisions are committed before any action is applied, so after a crash the
record shows what was about to be done; action outcomes are committed right after. The policy's
activity averages (the memvisor scheduler's) are committed with each tick and taken up by the
next run at its first tick, if they were saved on the same clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from memvisor.backends.base import Clock, HostBackend, RealClock
from memvisor.model import (
    ActionResult,
    Decision,
    HostState,
    PowerState,
    Snapshot,
    VMObservation,
    VMSpec,
)
from memvisor.policy.activity import ActivityEstimator
from memvisor.policy.states import FreeMemoryStates, StateThresholds
from memvisor.store import Retention, Store, VMExtras

log = logging.getLogger(__name__)

# Saved activity history is taken up only if the backend's clock and the wall clock agree on
# how long ago it was saved, within this many seconds.
HISTORY_CLOCK_SLACK = 60.0


class Policy(Protocol):
    def plan(self, snapshot: Snapshot) -> list[Decision]: ...


@dataclass(frozen=True, slots=True)
class TickReport:
    tick: int | None  # store id of the tick, None if the tick was skipped
    decisions: int = 0
    failed_actions: int = 0
    error: str | None = None
    duration: float = 0.0


SpecsOverlay = Callable[[list[VMSpec]], list[VMSpec]]


def with_reservations(reservations: Mapping[str, int]) -> SpecsOverlay:
    """An overlay that replaces the configured reservations with live ones (set at run time)."""

    def overlay(specs: list[VMSpec]) -> list[VMSpec]:
        return [
            replace(s, reservation=reservations[s.name]) if s.name in reservations else s
            for s in specs
        ]

    return overlay


def thresholds_of(policy: object) -> StateThresholds:
    """The policy's free-memory thresholds (the scheduler's settings), else the defaults."""
    found = getattr(getattr(policy, "settings", None), "thresholds", None)
    return found if isinstance(found, StateThresholds) else StateThresholds()


class ControlLoop:
    """Runs ticks against one backend; thread-safe with respect to :attr:`lock`."""

    def __init__(
        self,
        backend: HostBackend,
        policy: Policy,
        store: Store,
        clock: Clock,
        *,
        interval: float = 1.0,
        retention: Retention | None = None,
        specs_overlay: SpecsOverlay | None = None,
        prune_every: int = 60,
        events: Callable[[], list[str]] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"loop interval must be positive, got {interval}")
        self.backend, self.policy, self.store, self.clock = backend, policy, store, clock
        self.interval = interval
        self.retention = retention or Retention()
        self.specs_overlay = specs_overlay
        self.prune_every = prune_every
        self.events = events  # what the backend met since the last tick, recorded each tick
        self.lock = threading.RLock()  # held during a tick; changes from the API take it too
        self.ticks = 0
        self.last_tick_seconds = 0.0
        self._power: dict[str, PowerState] = {}
        self._states = FreeMemoryStates(thresholds_of(policy))
        estimator = getattr(policy, "activity", None)  # the memvisor scheduler's averages
        self._estimator = estimator if isinstance(estimator, ActivityEstimator) else None
        self._history_pending = True  # take up the saved activity history at the first tick

    # --- one tick ------------------------------------------------------------------------

    def tick(self) -> TickReport:
        started = time.perf_counter()
        with self.lock:
            report = self._tick_locked()
        duration = time.perf_counter() - started
        self.last_tick_seconds = duration
        self.ticks += 1
        if report.tick is not None:
            self.store.record_tick_duration(report.tick, duration)
        if self.prune_every and self.ticks % self.prune_every == 0:
            self._guard("prune", lambda: self.store.prune(self.retention))
        return replace(report, duration=duration)

    def _tick_locked(self) -> TickReport:
        try:
            snapshot = self.observe()
        except Exception as exc:  # isolation: a failed observation skips this tick only
            return self._skip("observe", exc)
        self._record_power_changes(snapshot.vms)
        drain = self.events
        if drain is not None:
            self._guard("backend events", lambda: self._record_events(drain(), snapshot))
        estimator = self._estimator
        if self._history_pending:
            self._history_pending = False
            if estimator is not None:
                self._guard("restore history", lambda: self._restore(estimator, snapshot))
        try:
            decisions = list(self.policy.plan(snapshot))
            state, extras = self._policy_extras(snapshot)
        except Exception as exc:
            return self._skip("plan", exc)
        tick, ids = self.store.record_tick(
            snapshot.host, state, snapshot.specs, snapshot.vms, decisions, extras,
            activity=estimator.export() if estimator is not None else None,
        )  # fmt: skip
        results = [(dec_id, self._apply(d)) for dec_id, d in zip(ids, decisions, strict=True)]
        self.store.record_actions(results)
        failed = sum(1 for _, r in results if not r.ok)
        return TickReport(tick=tick, decisions=len(decisions), failed_actions=failed)

    def observe(self) -> Snapshot:
        specs = self.backend.specs()
        if self.specs_overlay is not None:
            specs = self.specs_overlay(specs)
        host = self.backend.observe_host()
        vms = self.backend.observe_vms()
        return Snapshot(host=host, specs=tuple(specs), vms=tuple(vms))

    def _record_events(self, messages: list[str], snapshot: Snapshot) -> None:
        names = {v.name for v in snapshot.vms}
        for message in messages:
            vm = message.split(":", 1)[0]
            self.store.record_event("backend.event", message, vm=vm if vm in names else None)

    def _policy_extras(self, snapshot: Snapshot) -> tuple[str | None, dict[str, VMExtras]]:
        """The host state and entitlements the policy worked with in its last plan.

        Read duck-typed, as the memvisor scheduler exposes them (``states.state``,
        ``last_allocation.entitlement``); for a policy without states (the baselines), the
        loop tracks the free-memory state itself with the default thresholds, for display.
        """
        reported = getattr(getattr(self.policy, "states", None), "state", None)
        if isinstance(reported, HostState):
            state = reported
        else:
            state = self._states.update(snapshot.host.free, snapshot.host.total)[1]
        entitlement = getattr(getattr(self.policy, "last_allocation", None), "entitlement", None)
        extras: dict[str, VMExtras] = {}
        if isinstance(entitlement, Mapping):
            for v in snapshot.vms:
                if v.name in entitlement:
                    extras[v.name] = VMExtras(entitlement=int(entitlement[v.name]))
        return str(state), extras

    def _restore(self, estimator: ActivityEstimator, snapshot: Snapshot) -> None:
        """Take up the activity averages an earlier run saved, so a restarted manager does not
        treat every VM as unknown (a VM that was busy minutes ago, paused now, would be squeezed
        at once). Only if they were saved on the clock this backend runs on: the time passed
        since, on the backend's clock, must match the wall clock's (a rebooted host restarts
        its monotonic clock, a new simulated host its own)."""
        saved = self.store.activity()
        if not saved:
            return
        now, wall = snapshot.host.time, self.store.wall()
        same_clock = {
            vm: (t, fast, slow)
            for vm, (t, saved_wall, fast, slow) in saved.items()
            if now - t >= 0.0 and abs((now - t) - (wall - saved_wall)) <= HISTORY_CLOCK_SLACK
        }
        refused = estimator.restore(same_clock)
        taken = sorted(same_clock.keys() - set(refused))
        other = sorted(saved.keys() - same_clock.keys())
        message = f"activity history taken up for {len(taken)} VM(s)"
        message += f" ({', '.join(taken)})" if taken else ""
        if other:
            message += f"; not for {', '.join(other)}: saved on another clock (host rebooted?)"
        if refused:
            message += f"; refused (values out of range) for {', '.join(sorted(refused))}"
        self.store.record_event("policy.history", message)

    def _apply(self, decision: Decision) -> ActionResult:
        try:
            return self.backend.apply(decision.action)
        except Exception as exc:  # isolation: recorded as a failed action, the loop goes on
            log.warning("action %s failed: %s", decision.action, exc)
            return ActionResult(decision.action, ok=False, message=f"{type(exc).__name__}: {exc}")

    def _skip(self, phase: str, exc: Exception) -> TickReport:
        message = f"{phase} failed: {type(exc).__name__}: {exc}"
        log.warning("tick skipped: %s", message)
        self._guard("record error", lambda: self.store.record_event("loop.error", message))
        return TickReport(tick=None, error=message)

    def _record_power_changes(self, vms: tuple[VMObservation, ...]) -> None:
        seen = {v.name: v.power for v in vms}
        for name, power in seen.items():
            before = self._power.get(name)
            if before is None:
                self.store.record_event("vm.seen", f"{name}: {power}", vm=name)
            elif before != power:
                self.store.record_event("vm.power", f"{name}: {before} -> {power}", vm=name)
        for name in self._power.keys() - seen.keys():
            self.store.record_event("vm.gone", f"{name}: no longer reported", vm=name)
        self._power = seen

    def _guard(self, what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as exc:
            log.error("%s failed: %s", what, exc)

    # --- running -------------------------------------------------------------------------

    def run(self, stop: threading.Event, max_ticks: int | None = None) -> int:
        """Tick every ``interval`` seconds of the clock until ``stop`` is set; returns ticks run.

        With the real clock the wait is on ``stop`` itself, so a signal stops the loop at once;
        with another clock (simulated time) the loop sleeps on the clock between ticks.
        """
        count = 0
        next_at = self.clock.now()
        while not stop.is_set() and (max_ticks is None or count < max_ticks):
            self.tick()
            count += 1
            next_at += self.interval
            now = self.clock.now()
            if next_at < now:  # overran: do not try to catch up with a burst of ticks
                next_at = now
            self._wait(stop, next_at - now)
        return count

    def _wait(self, stop: threading.Event, seconds: float) -> None:
        if isinstance(self.clock, RealClock):
            # In slices: a signal delivered to another thread only runs its Python handler
            # (which sets ``stop``) when the main thread wakes up.
            deadline = time.monotonic() + seconds
            while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
                stop.wait(min(left, 0.2))
        else:
            self.clock.sleep(seconds)
