"""Observations of one running VM, measured on the host (see :mod:`.hostmem`).

Guest statistics come from virtio-balloon stats polling (QMP ``qom-get guest-stats``). The guest
is untrusted: every value is checked (an int, not negative, not above the VM's memory for the
memory figures) and dropped otherwise.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from memvisor.backends.qemu import hostmem
from memvisor.errors import BackendError, MemvisorError
from memvisor.model import Backing, PowerState, SharingSample, VMObservation
from memvisor.units import PAGE_SIZE

if TYPE_CHECKING:
    from memvisor.backends.qemu.host import QemuHost, RunningVM

SHARING_SAMPLES = 1000


def guest_stats(vm: RunningVM) -> dict[str, int]:
    """Validated virtio-balloon statistics (bytes), or {} if the guest sent none yet."""
    try:
        raw = vm.process.qmp().cmd(
            "qom-get", path="/machine/peripheral/balloon0", property="guest-stats"
        )
    except BackendError:
        return {}
    stats = raw.get("stats") if isinstance(raw, dict) else None
    if not isinstance(stats, dict):
        return {}
    out: dict[str, int] = {}
    for key, value in stats.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, int):
            continue
        if value < 0 or value >= 2**63:  # QEMU reports -1 for "not provided"
            continue
        if key in ("stat-free-memory", "stat-available-memory", "stat-total-memory",
                   "stat-disk-caches") and value > vm.spec.memory:  # fmt: skip
            continue
        out[key] = value
    return out


def _swap_out_rate(vm: RunningVM, stats: dict[str, int], now: float) -> float:
    rate = 0.0
    prev, prev_t = vm.last_stats.get("stat-swap-out"), vm.last_stats_time
    cur = stats.get("stat-swap-out")
    if prev is not None and cur is not None and prev_t is not None and now > prev_t:
        rate = max(0, cur - prev) / PAGE_SIZE / (now - prev_t)
    if stats:
        vm.last_stats, vm.last_stats_time = dict(stats), now
    return rate


def _working_set(host: QemuHost, vm: RunningVM, smaps: dict[str, int], now: float) -> float | None:
    """Fraction of guest RAM referenced since the previous observation (None the first time)."""
    fraction = None
    if vm.refs_cleared_at is not None:
        fraction = min(1.0, smaps.get("Referenced", 0) / vm.spec.memory)
    with contextlib.suppress(OSError):
        hostmem.clear_referenced(vm.process.pid)
        vm.refs_cleared_at = now
    return fraction


def _sharing(vm: RunningVM, hva: int) -> SharingSample | None:
    """The sharing metric from the VM's kept sampling context (opening one costs ~0.9 ms, a
    tick's sample only its reads); reopened when QEMU is gone or its RAM address changed."""
    from memvisor.sharing.sampler import Context, ContextGoneError

    for _ in range(2):
        if vm.sharing_ctx is None or vm.sharing_hva != hva:
            close_sharing(vm)
            try:
                vm.sharing_ctx = Context.open_range(vm.process.pid, hva, vm.spec.memory)
            except MemvisorError:
                return None
            vm.sharing_hva = hva
        try:
            return vm.sharing_ctx.measure(SHARING_SAMPLES).to_model()
        except ContextGoneError:
            close_sharing(vm)
        except MemvisorError:
            return None
    return None


def close_sharing(vm: RunningVM) -> None:
    if vm.sharing_ctx is not None:
        vm.sharing_ctx.close()
    vm.sharing_ctx, vm.sharing_hva = None, None


def observe(host: QemuHost, vm: RunningVM, *, sharing: bool = True) -> VMObservation:
    now = host.clock.now()
    spec = vm.spec
    hva = host.ram_hva(vm)
    smaps = hostmem.ram_smaps(vm.process.pid, hva)
    if spec.backing is Backing.FILE:
        fm = hostmem.file_memory(vm.process.paths.memory)
        consumed, swapped, shared = fm.resident, fm.swapped, 0
    else:
        consumed, swapped = smaps.get("Rss", 0), smaps.get("Swap", 0)
        shared = min(consumed, hostmem.ksm_merging_bytes(vm.process.pid))
    actual = spec.memory
    with contextlib.suppress(BackendError, KeyError, TypeError, ValueError):
        actual = int(vm.process.qmp().cmd("query-balloon")["actual"])
    stats = guest_stats(vm)
    sample = _sharing(vm, hva) if sharing else None
    if sample is not None and spec.backing is Backing.ANON:
        shared = max(shared, int(sample.shared_fraction * consumed))
    return VMObservation(
        name=spec.name,
        time=now,
        power=PowerState.ON,
        memory=spec.memory,
        consumed=consumed,
        shared=shared,
        swapped=swapped,
        ballooned=max(0, spec.memory - actual),
        balloon_target=vm.balloon_target,
        guest_free=stats.get("stat-free-memory"),
        guest_swapped_out_rate=_swap_out_rate(vm, stats, now),
        active_fraction=_working_set(host, vm, smaps, now),
        sharing=sample,
        resident_limit=vm.record.swap_limit,
    )
