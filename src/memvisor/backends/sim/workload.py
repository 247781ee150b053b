"""Workload generators: which logical pages a VM touches in a tick, and which it writes.

Synthetic workloads draw ``access_rate * dt`` touches from the first ``working_set`` pages of
the VM's working-set order with a Zipf law of exponent ``skew`` (rank ``r`` has weight
``r ** -skew``), sampled by inverting the continuous Zipf CDF, which is O(1) per draw.
Trace workloads replay the accesses whose time falls in ``[t, t + dt)``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from memvisor.backends.sim.pages import uniq
from memvisor.backends.sim.vm import VMRun
from memvisor.units import PAGE_SIZE

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


def zipf_ranks(rng: np.random.Generator, n_items: int, skew: float, n: int) -> IntArray:
    """``n`` ranks in ``[0, n_items)``, rank ``r`` drawn with weight ``(r + 1) ** -skew``."""
    if n_items <= 0 or n <= 0:
        return np.zeros(0, dtype=np.int64)
    u = rng.random(n)
    if skew <= 1e-9:
        x = u * n_items
    elif abs(skew - 1.0) < 1e-9:
        x = np.power(float(n_items + 1), u) - 1.0
    else:
        e = 1.0 - skew
        x = np.power((float(n_items + 1) ** e - 1.0) * u + 1.0, 1.0 / e) - 1.0
    return np.minimum(x.astype(np.int64), n_items - 1)


def draw(vm: VMRun, t: float, dt: float, cap: int) -> tuple[IntArray, BoolArray]:
    """The logical pages ``vm`` touches during ``[t, t + dt)`` and which touches write."""
    trace = vm.cfg.workload.trace
    if trace is not None:
        end = int(np.searchsorted(trace.times, t + dt, side="left"))
        start, vm.trace_pos = vm.trace_pos, end
        return trace.pages[start:end][:cap], trace.writes[start:end][:cap]
    phase = vm.cfg.workload.phase_at(t)
    wanted = phase.access_rate * dt + vm.access_carry
    n = int(wanted)
    vm.access_carry = wanted - n
    n = min(n, cap)
    ws = min(phase.working_set // PAGE_SIZE, vm.anon_pages)
    ranks = zipf_ranks(vm.rng, ws, phase.skew, n)
    writes = vm.rng.random(n) < phase.write_fraction
    return vm.ws_order[ranks], writes


def kernel_touches(vm: VMRun, dt: float) -> IntArray:
    """Global page indices of the guest kernel touched in the background this tick."""
    wanted = vm.cfg.guest.kernel_access_rate * dt + vm.kernel_carry
    n = int(wanted)
    vm.kernel_carry = wanted - n
    if n == 0 or vm.kernel_pages == 0:
        return np.zeros(0, dtype=np.int64)
    return uniq(vm.rng.integers(0, vm.kernel_pages, n)) + vm.offset
