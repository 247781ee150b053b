"""The daemon's view of a backend: a :class:`HostBackend` plus starting and stopping its VMs.

``memvisor up --backend sim`` runs the host file's VMs on the simulator in real time: each
observation first advances the simulated host by the time that passed, so the dashboard and
the API see a host that lives at the pace of the wall clock. Every VM gets a workload chosen by
its position in the file (idle, growing, shared content), so an unattended daemon shows the
scheduler at work. The simulator holds its VMs in the daemon's memory: they stop with it and
there is nothing to re-attach after a crash.

``--backend qemu`` runs real guests through :mod:`memvisor.backends.qemu`, re-attaching to the
ones a previous daemon left running.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from memvisor.backends.base import HostBackend
from memvisor.errors import BackendError, InputError
from memvisor.model import (
    Action,
    ActionResult,
    HostObservation,
    PowerState,
    VMObservation,
    VMSpec,
)
from memvisor.units import PAGE_SIZE, MiB

BACKEND_NAMES = ("qemu", "sim")


class ManagedHost(Protocol):
    """A backend the daemon can start and stop VMs on."""

    name: str
    backend: HostBackend

    def start(self, specs: Sequence[VMSpec]) -> list[str]:
        """Start the VMs (or re-attach to ones still running); returns the re-attached names."""
        ...

    def stop(self, *, leave_running: bool) -> None:
        """Stop managing; shut the VMs down unless ``leave_running``."""
        ...

    def reservation_changed(self, vm: str, reservation: int) -> None:
        """A VM's reservation changed live (admitted already): hold it on the host."""
        ...


@dataclass(frozen=True, slots=True)
class BackendOptions:
    state_dir: Path
    seed: int = 0
    interval: float = 1.0
    accel: str | None = None  # QEMU accelerator override (default: probed; TCG here)


# --- the simulator in real time ----------------------------------------------------------------


def sim_workload(index: int, memory: int) -> Any:
    """A workload for the ``index``-th VM: idle, growing, or with content shared across VMs.

    Sizes are fractions of what the guest has beside its kernel and free-memory watermark.
    """
    from memvisor.backends.sim.config import GuestConfig, Phase, Workload

    usable = max(memory - GuestConfig().kernel - memory // 50, MiB) // MiB * MiB
    kind = index % 3
    if kind == 0:  # idle: booted, touched a little, then mostly quiet
        return Workload(
            name="idle",
            footprint=usable * 5 // 8,
            zero_fraction=0.2,
            phases=(Phase(working_set=max(usable // 16, MiB), access_rate=200.0),),
        )
    if kind == 1:  # growing: the working set grows every 15 s up to all of its memory
        steps = [usable // 8, usable // 4, usable // 2, usable * 15 // 16]
        phases = tuple(
            Phase(duration=None if i == len(steps) - 1 else 15.0, working_set=ws,
                  access_rate=20_000.0, write_fraction=0.2)
            for i, ws in enumerate(steps)
        )  # fmt: skip
        return Workload(name="growing", footprint=usable * 15 // 16, phases=phases)
    return Workload(  # shared: most content is common with the other VMs of the same image
        name="shared",
        footprint=usable * 3 // 4,
        common_fraction=0.7,
        phases=(Phase(working_set=usable // 4, access_rate=5_000.0, write_fraction=0.02),),
    )


class RealTimeSim:
    """Wraps a simulated host: each ``observe_host`` first advances it by the elapsed time."""

    def __init__(self, sim: Any, interval: float, max_step: float = 5.0) -> None:
        self.sim = sim
        self.interval = interval
        self.max_step = max_step  # after a stall, do not simulate minutes in one go
        self._last = time.monotonic()

    def specs(self) -> list[VMSpec]:
        specs: list[VMSpec] = self.sim.specs()
        return specs

    def observe_host(self) -> HostObservation:
        now = time.monotonic()
        dt = min(max(now - self._last, self.interval), self.max_step)
        self._last = now
        self.sim.step(dt)
        obs: HostObservation = self.sim.observe_host()
        return obs

    def observe_vms(self) -> list[VMObservation]:
        vms: list[VMObservation] = self.sim.observe_vms()
        return vms

    def apply(self, action: Action) -> ActionResult:
        result: ActionResult = self.sim.apply(action)
        return result


class SimManagedHost:
    name = "sim"

    def __init__(self, capacity: int, options: BackendOptions) -> None:
        self.capacity, self.options = capacity, options
        self.backend: HostBackend = _NotStarted()

    def start(self, specs: Sequence[VMSpec]) -> list[str]:
        from memvisor.backends.sim.host import SimHost

        workloads = {s.name: sim_workload(i, s.memory) for i, s in enumerate(specs)}
        sim = SimHost.from_specs(
            specs, self.capacity, workloads=workloads, seed=self.options.seed,
            tick=self.options.interval,
        )  # fmt: skip
        self.backend = RealTimeSim(sim, self.options.interval)
        return []

    def reservation_changed(self, vm: str, reservation: int) -> None:
        """Nothing to hold: the scheduler sees the new reservation through the pool tree."""

    def stop(self, *, leave_running: bool) -> None:
        self.backend = _NotStarted()  # simulated VMs live only in this process


class _NotStarted:
    def _fail(self) -> Any:
        raise InputError("the backend has not been started")

    def specs(self) -> list[VMSpec]:
        return list(self._fail())

    def observe_host(self) -> HostObservation:
        return self._fail()  # type: ignore[no-any-return]

    def observe_vms(self) -> list[VMObservation]:
        return list(self._fail())

    def apply(self, action: Action) -> ActionResult:
        return self._fail()  # type: ignore[no-any-return]


# --- choosing ------------------------------------------------------------------------------------

Factory = Callable[[int, BackendOptions], ManagedHost]


class Budgeted:
    """The host file's ``capacity`` as the host the scheduler manages.

    The real machine may have far more memory than the VMs are granted; the scheduler must keep
    them within their budget. ``total`` is the capacity; ``free`` is the capacity minus what
    the VMs' guest RAM holds on the host (their consumed bytes less KSM's savings), or the
    machine's own available memory if that is less.
    """

    def __init__(self, inner: HostBackend, capacity: int) -> None:
        self.inner, self.capacity = inner, capacity
        self._vms: list[VMObservation] | None = None

    def specs(self) -> list[VMSpec]:
        return self.inner.specs()

    def observe_host(self) -> HostObservation:
        real = self.inner.observe_host()
        self._vms = self.inner.observe_vms()  # reused by the observe_vms() that follows
        used = sum(v.consumed for v in self._vms) - real.ksm.pages_sharing * PAGE_SIZE
        free = max(0, min(real.free, self.capacity - max(used, 0)))
        return replace(real, total=self.capacity, free=free)

    def observe_vms(self) -> list[VMObservation]:
        vms, self._vms = self._vms, None
        return vms if vms is not None else self.inner.observe_vms()

    def apply(self, action: Action) -> ActionResult:
        return self.inner.apply(action)


class QemuManagedHost:
    """Real QEMU guests (:class:`memvisor.backends.qemu.host.QemuHost`, one directory per VM
    under ``STATE/vms``). Creating it re-attaches to every VM whose record says it is on and
    whose QEMU still runs; admission is the daemon's (the pool tree), not the backend's."""

    name = "qemu"

    def __init__(self, capacity: int, options: BackendOptions) -> None:
        from memvisor.backends.qemu.host import QemuHost

        self.qemu = QemuHost(options.state_dir, accel=options.accel)
        self.backend: HostBackend = Budgeted(self.qemu, capacity)
        self.events: list[str] = self.qemu.drain_events()  # what re-attaching found

    def drain_events(self) -> list[str]:
        """What the QEMU backend met since the last call (the daemon records it each tick)."""
        return self.qemu.drain_events()

    def start(self, specs: Sequence[VMSpec]) -> list[str]:
        running = {r.spec.name for r in self.qemu.records() if r.power is PowerState.ON}
        attached = [s.name for s in specs if s.name in running]
        for s in specs:
            if s.name not in running:
                self.qemu.power_on(s)
        return attached

    def reservation_changed(self, vm: str, reservation: int) -> None:
        """Swap-out and the VM's memory cgroup respect the new reservation at once."""
        self.qemu.set_reservation(vm, reservation)

    def stop(self, *, leave_running: bool) -> None:
        if leave_running:
            self.qemu.close()
            return
        failures = []
        for record in self.qemu.records():
            if record.power is PowerState.ON:
                try:
                    self.qemu.power_off(record.spec.name)
                except Exception as exc:  # one VM's failure must not keep the others running
                    failures.append(f"{record.spec.name}: {type(exc).__name__}: {exc}")
        if failures:
            raise BackendError("power-off failed for " + "; ".join(failures))


def make_host(name: str, capacity: int, options: BackendOptions) -> ManagedHost:
    factories: dict[str, Factory] = {"sim": SimManagedHost, "qemu": QemuManagedHost}
    if name not in factories:
        raise InputError(f"--backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}")
    return factories[name](capacity, options)
