"""Small builders for the simulator tests: hosts of a few small VMs that run in milliseconds."""

from __future__ import annotations

from memvisor.backends.sim.config import GuestConfig, Phase, SimHostConfig, SimVMConfig, Workload
from memvisor.backends.sim.host import SimHost
from memvisor.units import MiB

SMALL_GUEST = GuestConfig(kernel=8 * MiB, swap=256 * MiB, kernel_access_rate=0.0)


def workload(
    name: str = "w",
    *,
    footprint: int = 96 * MiB,
    working_set: int = 64 * MiB,
    access_rate: float = 5000.0,
    write_fraction: float = 0.1,
    skew: float = 0.0,
    common: float = 0.0,
    zero: float = 0.0,
    page_cache: int = 0,
) -> Workload:
    phase = Phase(
        working_set=working_set, access_rate=access_rate, write_fraction=write_fraction, skew=skew
    )
    return Workload(
        name=name,
        footprint=footprint,
        page_cache=page_cache,
        common_fraction=common,
        zero_fraction=zero,
        phases=(phase,),
    )


def vm(name: str, wl: Workload, memory: int = 128 * MiB, **kw: object) -> SimVMConfig:
    return SimVMConfig(name=name, memory=memory, workload=wl, guest=SMALL_GUEST, **kw)  # type: ignore[arg-type]


def host(memory: int, vms: list[SimVMConfig], seed: int = 0, **kw: object) -> SimHost:
    return SimHost(SimHostConfig(memory=memory, **kw), vms, seed=seed)  # type: ignore[arg-type]
