"""The two host backends under the contract suite, each with the few test-side hooks it needs.

A :class:`Harness` wraps a :class:`~memvisor.backends.base.HostBackend` (the thing under test)
with what a test cannot do through that interface: let time pass (the simulator moves only
when stepped; a real host moves by itself) and make a guest touch its free memory (a real
guest runs a program through its shell; the simulated guest does the same to its page
arrays). Both backends get the same two VMs: one file-backed with a reservation, one
anonymous.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from guestfill import FILL_MARGIN, fill_guest
from memvisor.backends.base import HostBackend
from memvisor.backends.sim import guest
from memvisor.backends.sim.config import Phase, Workload
from memvisor.backends.sim.host import SimHost
from memvisor.backends.sim.pages import G_FREE
from memvisor.model import Backing, PowerState, VMObservation, VMSpec
from memvisor.units import PAGE_SIZE, MiB

FILE_VM, ANON_VM = "cfile", "canon"
# The anonymous VM's reservation is half its memory: a balloon target that a backend wrongly
# clamps instead of refusing then still leaves the real 256 MiB guest enough to live on (a
# 192 MiB balloon in it, the QEMU backend's clamp with a small reservation, kills it).
SPECS = (
    VMSpec(FILE_VM, 256 * MiB, reservation=64 * MiB, backing=Backing.FILE),
    VMSpec(ANON_VM, 256 * MiB, reservation=128 * MiB, backing=Backing.ANON),
)
SIM_CAPACITY = 1024 * MiB  # room for both: the contract is about actions, not host pressure


@dataclass
class Harness:
    name: str
    backend: HostBackend
    settle: Callable[[float], None]  # let this many seconds of the backend's time pass
    fill: Callable[[str], None]  # the guest touches its free memory, then frees it again
    tick: float  # how far one settle step moves the backend's clock (polling granularity)
    stats_delay: float  # backend time until guest statistics (guest_free) are fresh

    def vm(self, name: str) -> VMObservation:
        return {o.name: o for o in self.backend.observe_vms()}[name]

    def eventually(
        self, what: Callable[[], VMObservation], ok: Callable[[VMObservation], bool], seconds: float
    ) -> VMObservation:
        """Observe until ``ok`` holds or ``seconds`` of backend time passed; the last one."""
        obs = what()
        for _ in range(max(1, math.ceil(seconds / self.tick))):
            if ok(obs):
                break
            self.settle(self.tick)
            obs = what()
        return obs


# --- the simulator ------------------------------------------------------------------------------


def sim_harness(seed: int = 7) -> Harness:
    """Both VMs on a simulated host, with a quiet workload (a small active set), like an idle
    real guest: their memory moves only when the test moves it."""
    quiet = Workload(
        name="quiet",
        footprint=48 * MiB,
        phases=(Phase(working_set=8 * MiB, access_rate=200.0, write_fraction=0.05),),
    )
    host = SimHost.from_specs(
        SPECS, SIM_CAPACITY, workloads={s.name: quiet for s in SPECS}, seed=seed
    )

    def settle(seconds: float) -> None:
        for _ in range(max(1, math.ceil(seconds / host.dt))):
            host.step()

    def fill(name: str) -> None:
        sim_fill(host, name)
        host.step()  # the next tick: pages touched in this one are never eviction victims

    return Harness("sim", host, settle, fill, host.dt, 0.0)


def sim_fill(host: SimHost, name: str) -> None:
    """What ``dd`` of a file into tmpfs followed by ``rm`` does in a real guest: the guest takes
    its free pages (up to its watermark and :data:`FILL_MARGIN`), writes them, frees them. The
    pages stay backed on the host; the guest counts them free."""
    vm = host.vm(name)
    free = int(np.count_nonzero(host.pt.use[vm.sl] == G_FREE))
    pages = guest.alloc(host, vm, free - vm.min_free_pages - FILL_MARGIN // PAGE_SIZE)
    backed = host.fault_in(vm, pages)
    host.pt.content[backed] = host.pt.new_unique(int(backed.size))


# --- real QEMU guests ---------------------------------------------------------------------------


def qemu_harness(state_dir: Path, image: Any) -> Iterator[Harness]:
    """Both VMs as real TCG guests of a :class:`QemuHost` (its own launcher), powered off after."""
    from memvisor.backends.qemu.host import QemuHost

    host = QemuHost(state_dir, image=image, accel="tcg")

    def fill(name: str) -> None:
        fill_guest(host.running(name).process.paths.shell)

    try:
        for spec in SPECS:
            host.power_on(spec)
        # guest statistics are polled every 2 s (QemuHost turns polling on at power-on)
        yield Harness("qemu", host, time.sleep, fill, 0.5, 2.5)
    finally:
        for record in host.records():
            if record.power is PowerState.ON:
                host.power_off(record.spec.name)
