"""Applying the policy's actions to a simulated host; each is a target, safe to repeat.

Unknown VMs raise :class:`NotFoundError` and bad values :class:`InputError`; a target the VM
cannot take (a balloon larger than memory minus reservation) is refused with a message and
changes nothing. A resident limit below the reservation is raised to the reservation; a VM
without a swap file (``swap_file = False``: from a spec with anonymous backing) refuses one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from memvisor.backends.sim import guest
from memvisor.backends.sim.pages import SHARED
from memvisor.errors import InputError
from memvisor.model import SetBalloon, SetKsm, SetSwapTarget
from memvisor.units import PAGE_SIZE, format_size

if TYPE_CHECKING:
    from memvisor.backends.sim.host import SimHost


def set_balloon(host: SimHost, a: SetBalloon) -> tuple[bool, str]:
    vm = host.vm(a.vm)
    if a.target < 0:
        raise InputError(f"{a.vm}: balloon target must not be negative, got {a.target}")
    most = vm.cfg.memory - vm.cfg.reservation
    if a.target > most:
        return False, (
            f"{a.vm}: balloon target {format_size(a.target)} exceeds memory minus "
            f"reservation ({format_size(most)}); nothing changed"
        )
    vm.balloon_target = a.target // PAGE_SIZE
    guest.balloon_step(host, vm)
    return True, f"{a.vm}: balloon target {format_size(a.target)}"


def set_swap_target(host: SimHost, a: SetSwapTarget) -> tuple[bool, str]:
    vm = host.vm(a.vm)
    if a.resident_limit < 0:
        raise InputError(f"{a.vm}: resident limit must not be negative, got {a.resident_limit}")
    if not vm.cfg.swap_file:  # like the QEMU backend's anonymous backing
        return False, f"{a.vm}: anonymous backing has no per-VM swap file; use the balloon"
    limit = max(a.resident_limit, vm.cfg.reservation)
    vm.resident_limit = None if limit >= vm.cfg.memory else limit // PAGE_SIZE
    host.swap_step(vm)
    note = " (raised to the reservation)" if limit > a.resident_limit else ""
    return True, f"{a.vm}: resident limit {format_size(limit)}{note}"


def set_ksm(host: SimHost, a: SetKsm) -> tuple[bool, str]:
    if a.run not in (0, 1, 2):
        raise InputError(f"ksm run must be 0, 1 or 2, got {a.run}")
    # the QEMU backend's ranges (docs/backends.md); the scanner treats 0 ms as 1 ms
    if a.pages_to_scan is not None and not 1 <= a.pages_to_scan <= 1_000_000:
        raise InputError(f"ksm pages_to_scan must be 1..1000000, got {a.pages_to_scan}")
    if a.sleep_millisecs is not None and not 0 <= a.sleep_millisecs <= 60_000:
        raise InputError(f"ksm sleep_millisecs must be 0..60000, got {a.sleep_millisecs}")
    host.ksm_run = a.run
    if a.pages_to_scan is not None:
        host.ksm_pages_to_scan = a.pages_to_scan
    if a.sleep_millisecs is not None:
        host.ksm_sleep = a.sleep_millisecs
    if a.run == 2:
        unmerge_all(host)
    return True, f"ksm run={host.ksm_run} pages_to_scan={host.ksm_pages_to_scan}"


def unmerge_all(host: SimHost) -> None:
    for vm in host.vms:
        shared = np.flatnonzero(host.pt.state[vm.sl] == SHARED) + vm.offset
        host.fault_in(vm, shared)
