"""A tiny in-test host backend and policy for the store/loop/API unit tests.

The real runs (tests/e2e/test_daemon_*.py) use the simulator and QEMU backends; this fake
only lets the unit tests control every observation and make actions fail on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memvisor.backends.base import ManualClock
from memvisor.errors import BackendError
from memvisor.model import (
    Action,
    ActionResult,
    Decision,
    HostObservation,
    HostState,
    PowerState,
    SetBalloon,
    Snapshot,
    VMObservation,
    VMSpec,
)
from memvisor.units import GiB, MiB


@dataclass
class FakeHost:
    clock: ManualClock = field(default_factory=ManualClock)
    total: int = 4 * GiB
    vms: dict[str, VMSpec] = field(default_factory=dict)
    balloons: dict[str, int] = field(default_factory=dict)
    power: dict[str, PowerState] = field(default_factory=dict)
    fail_vm: str | None = None  # apply() raises for this VM
    fail_observe: bool = False

    def add(self, name: str, memory: int = GiB, reservation: int = 0) -> None:
        self.vms[name] = VMSpec(name=name, memory=memory, reservation=reservation)
        self.balloons[name] = 0
        self.power[name] = PowerState.ON

    def specs(self) -> list[VMSpec]:
        return list(self.vms.values())

    def consumed(self, name: str) -> int:
        return self.vms[name].memory // 2 - self.balloons[name] // 2

    def observe_host(self) -> HostObservation:
        if self.fail_observe:
            raise BackendError("observe_host: /proc/meminfo unreadable (test)")
        used = sum(self.consumed(n) for n in self.vms)
        return HostObservation(time=self.clock.now(), total=self.total, free=self.total - used)

    def observe_vms(self) -> list[VMObservation]:
        return [
            VMObservation(
                name=n,
                time=self.clock.now(),
                power=self.power[n],
                memory=s.memory,
                consumed=self.consumed(n),
                shared=16 * MiB,
                ballooned=self.balloons[n],
                balloon_target=self.balloons[n],
                active_fraction=0.25,
            )
            for n, s in self.vms.items()
        ]

    def apply(self, action: Action) -> ActionResult:
        if isinstance(action, SetBalloon):
            if action.vm == self.fail_vm:
                raise BackendError(f"{action.vm}: QMP socket closed (test)")
            before = self.balloons[action.vm]
            self.balloons[action.vm] = action.target
            return ActionResult(action, ok=True, achieved=(action.target - before) // 2)
        return ActionResult(action, ok=False, message="unsupported in the fake host")


@dataclass
class _States:
    state: HostState = HostState.HIGH


@dataclass
class _Allocation:
    entitlement: dict[str, int]


class StepBalloonPolicy:
    """Balloons every VM by 64 MiB more each tick, with a reason. Like the memvisor scheduler,
    it exposes the state and entitlements of its last plan as ``states.state`` and
    ``last_allocation.entitlement``."""

    def __init__(self) -> None:
        self.states = _States()
        self.last_allocation: _Allocation | None = None

    def plan(self, snapshot: Snapshot) -> list[Decision]:
        half = snapshot.host.free > snapshot.host.total // 2
        self.states.state = HostState.HIGH if half else HostState.SOFT
        self.last_allocation = _Allocation({s.name: s.memory // 2 for s in snapshot.specs})
        return [
            Decision(SetBalloon(v.name, v.balloon_target + 64 * MiB), f"{v.name}: test step")
            for v in snapshot.vms
        ]
