"""Seams between the control loop and the world: the host backend and the clock.

Two implementations of each: ``backends.qemu`` (real VMs) and ``backends.sim`` (a simulated
host), and a real and a simulated clock.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

from memvisor.model import Action, ActionResult, HostObservation, VMObservation, VMSpec


@runtime_checkable
class Clock(Protocol):
    def now(self) -> float:
        """Seconds since an arbitrary origin, monotonic."""
        ...

    def sleep(self, seconds: float) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


class ManualClock:
    """A clock that moves only when told to (simulator, tests)."""

    def __init__(self, start: float = 0.0) -> None:
        self._t = start

    def now(self) -> float:
        return self._t

    def sleep(self, seconds: float) -> None:
        self._t += max(0.0, seconds)

    advance = sleep


@runtime_checkable
class HostBackend(Protocol):
    """A host with VMs. ``apply`` is idempotent: actions carry targets, not deltas."""

    def specs(self) -> list[VMSpec]:
        """The VMs this backend manages (powered on or not)."""
        ...

    def observe_host(self) -> HostObservation: ...

    def observe_vms(self) -> list[VMObservation]: ...

    def apply(self, action: Action) -> ActionResult: ...
