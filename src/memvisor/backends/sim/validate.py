"""Checks that a simulated host can be built: sizes, fractions and names that make sense.

Raises :class:`~memvisor.errors.InputError` naming the VM and field; the scenario loader runs
its own key-path checks first, so these guard direct Python use.
"""

from __future__ import annotations

from collections.abc import Sequence

from memvisor.backends.sim.config import SimHostConfig, SimVMConfig
from memvisor.errors import InputError
from memvisor.units import PAGE_SIZE, format_size


def check_setup(host: SimHostConfig, vms: Sequence[SimVMConfig], tick: float) -> None:
    if tick <= 0:
        raise InputError(f"tick must be positive, got {tick}")
    if host.memory <= 0 or host.memory % PAGE_SIZE:
        raise InputError(f"host memory must be a positive multiple of 4 KiB, got {host.memory}")
    if host.disk_bandwidth <= 0:
        raise InputError(f"host disk_bandwidth must be positive, got {host.disk_bandwidth}")
    if host.swap_victims not in ("random", "lru"):
        raise InputError(f"host swap_victims must be 'random' or 'lru', got {host.swap_victims!r}")
    names = [v.name for v in vms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"VM names must be unique; repeated: {', '.join(dupes)}")
    for vm in vms:
        _check_vm(vm)
    reserved = sum(v.reservation for v in vms)
    if reserved > host.memory:
        raise InputError(
            f"VM reservations ({format_size(reserved)}) exceed host memory "
            f"({format_size(host.memory)}): the host could not honour them"
        )


def _check_vm(vm: SimVMConfig) -> None:
    for what, value in (("memory", vm.memory), ("kernel", vm.guest.kernel)):
        if value < 0 or value % PAGE_SIZE:
            raise InputError(f"{vm.name}: {what} must be a multiple of 4 KiB, got {value}")
    if vm.memory == 0:
        raise InputError(f"{vm.name}: memory must be positive")
    wl = vm.workload
    for what, frac in (
        ("zero_fraction", wl.zero_fraction),
        ("common_fraction", wl.common_fraction),
    ):
        if not 0.0 <= frac <= 1.0:
            raise InputError(f"{vm.name}: workload {what} must be in [0, 1], got {frac}")
    if wl.zero_fraction + wl.common_fraction > 1.0:
        raise InputError(f"{vm.name}: workload zero_fraction + common_fraction exceed 1")
    need = vm.guest.kernel + wl.footprint + wl.page_cache
    room = vm.memory - int(vm.guest.min_free * vm.memory)
    if need > room:
        raise InputError(
            f"{vm.name}: kernel + footprint + page_cache ({format_size(need)}) do not fit in "
            f"the guest's memory above its free watermark ({format_size(room)})"
        )
    if not 0 <= vm.reservation <= vm.memory:
        raise InputError(f"{vm.name}: reservation must be between 0 and memory")
    if wl.trace is not None and wl.trace.pages.size:
        top = int(wl.trace.pages.max())
        if top >= (wl.footprint + wl.page_cache) // PAGE_SIZE:
            raise InputError(
                f"{vm.name}: trace touches page {top}, beyond footprint + page_cache "
                f"({(wl.footprint + wl.page_cache) // PAGE_SIZE} pages)"
            )
