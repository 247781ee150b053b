"""Applying the policy's actions to a simulated host; each is a target, safe to repeat.

Unknown VMs raise :class:`NotFoundError` and bad values :class:`InputError`; a target the VM
cannot take (a balloon larger than memory minus reservation) is refused with a message and
changes nothing. A resident limit below the reservation is raised to the reservation.
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
    limit = max(a.resident_limit, vm.cfg.reservation)
    vm.resident_limit = None if limit >= vm.cfg.memory else limit // PAGE_SIZE
    host.swap_step(vm)
    note = " (raised to the reservation)" if limit > a.resident_limit else ""
    return True, f"{a.vm}: resident limit {format_size(limit)}{note}"


def set_ksm(host: SimHost, a: SetKsm) -> tuple[bool, str]:
    if a.run not in (0, 1, 2):
        raise InputError(f"ksm run must be 0, 1 or 2, got {a.run}")
    if a.pages_to_scan is not None and a.pages_to_scan < 0:
        raise InputError(f"ksm pages_to_scan must not be negative, got {a.pages_to_scan}")
    if a.sleep_millisecs is not None and a.sleep_millisecs < 1:
        raise InputError(f"ksm sleep_millisecs must be >= 1, got {a.sleep_millisecs}")
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
