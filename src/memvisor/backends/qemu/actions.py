"""Actions on real VMs. Each takes a target (so repeating it changes nothing more) and reports
what the host really got back, measured by residency of the VM's file (file backing), ``smaps``
of the guest RAM mapping (anonymous backing) and ``/proc/meminfo``, never QEMU's RSS.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from memvisor.backends.qemu import agentwire, hostmem, swapout
from memvisor.errors import BackendError, InputError
from memvisor.model import ActionResult, Backing, SetBalloon, SetKsm, SetSwapTarget
from memvisor.units import PAGE_SIZE, MiB, format_size

if TYPE_CHECKING:
    from memvisor.backends.qemu.host import QemuHost, RunningVM

MIN_GUEST = 64 * MiB  # the balloon never leaves a guest less than this
BALLOON_SETTLE = 15.0  # seconds to wait for the guest to reach a balloon target
KSM_DIR = Path("/sys/kernel/mm/ksm")


def consumed(host: QemuHost, vm: RunningVM) -> int:
    """Host memory held by the VM's guest RAM right now."""
    if vm.spec.backing is Backing.FILE:
        return int(hostmem.file_resident_pages(vm.process.paths.memory).sum()) * PAGE_SIZE
    return hostmem.ram_smaps(vm.process.pid, host.ram_hva(vm)).get("Rss", 0)


def set_balloon(host: QemuHost, vm: RunningVM, action: SetBalloon) -> ActionResult:
    """The guest agent takes the target (C2); virtio-balloon only while the agent is lost or
    absent. The result says which one acted and what the host measured freed."""
    spec = vm.spec
    if action.target < 0:
        raise InputError(f"{spec.name}: balloon target {action.target} bytes is negative")
    if action.target > spec.memory - spec.reservation:
        return ActionResult(
            action,
            ok=False,
            message=(
                f"{spec.name}: balloon target {format_size(action.target)} refused: it would "
                f"reach into the reservation ({format_size(spec.reservation)} of "
                f"{format_size(spec.memory)}); nothing changed"
            ),
        )
    # Within the allowed range, still leave the guest MIN_GUEST to run in (said in the note).
    ceiling = spec.memory - max(spec.reservation, MIN_GUEST)
    target = min(action.target, ceiling)
    note = f" (clamped from {format_size(action.target)})" if target != action.target else ""
    host.record_reclaim_target(vm, target)
    agent = vm.agent
    if agent is not None:
        before = consumed(host, vm)
        # Anonymous RAM is freed by KSM merging the agent's zero pages: without KSM the
        # reservation frees nothing, so the balloon acts (and the agent gives its pages back).
        balloon_only = spec.backing is Backing.ANON and hostmem.ksm_stats().run != 1
        agentwire.set_target(agent, target, balloon_only=balloon_only)
        if agent.path() == agentwire.AGENT:
            return _agent_result(host, vm, action, target, before, note)
    return _balloon(host, vm, action, target, note)


def _agent_result(
    host: QemuHost, vm: RunningVM, action: SetBalloon, target: int, before: int, note: str
) -> ActionResult:
    agent = vm.agent
    assert agent is not None
    s = agent.session
    deadline = time.monotonic() + BALLOON_SETTLE
    while time.monotonic() < deadline:  # one request at a time; wait for the agent's reply
        with agent.link.lock:
            if not s.busy and (s.agent_held == s.target_pages or s.is_lost()):
                break
        time.sleep(0.05)
    after = consumed(host, vm)
    with agent.link.lock:
        report = s.report()
    holder = f"{vm.spec.name}: guest agent"
    return _held(action, holder, report.held_present, report.target, note, before, after, "",
                 agentwire.AGENT)  # fmt: skip


def _held(
    action: SetBalloon,
    holder: str,
    held: int,
    target: int,
    note: str,
    before: int,
    after: int,
    extra: str,
    path: str,
) -> ActionResult:
    """The result of a reservation or balloon change: ok once ``held`` is within 4 MiB of the
    target; ``achieved`` is the guest RAM the host no longer holds (``before`` - ``after``)."""
    return ActionResult(
        action,
        ok=abs(held - target) <= 4 * MiB,
        achieved=max(0, before - after),
        message=(
            f"{holder} holds {format_size(held)} of target {format_size(target)}{note}; guest "
            f"RAM on host {format_size(before)} -> {format_size(after)}{extra}"
        ),
        reclaim_path=path,
    )


def _balloon(
    host: QemuHost, vm: RunningVM, action: SetBalloon, target: int, note: str
) -> ActionResult:
    spec = vm.spec
    why = "no guest agent" if vm.agent is None else f"agent {vm.agent.session.state.value}"
    qmp = vm.process.qmp()
    before, free_before = consumed(host, vm), hostmem.meminfo()["MemAvailable"]
    qmp.cmd("balloon", value=spec.memory - target)
    vm.balloon_target = target
    if vm.agent is not None:  # the driver hands the target back to the agent once it is back
        with vm.agent.link.lock:
            vm.agent.driver.balloon_bytes = target
    actual = _wait_balloon(qmp, spec.memory - target)
    after, free_after = consumed(host, vm), hostmem.meminfo()["MemAvailable"]
    extra = f"; host MemAvailable {free_after - free_before:+d} bytes"
    return _held(action, f"{spec.name}: virtio-balloon ({why})", spec.memory - actual, target,
                 note, before, after, extra, agentwire.BALLOON)  # fmt: skip


def _wait_balloon(qmp: object, actual_target: int) -> int:
    """Poll query-balloon until it reaches the target or stops moving; returns ``actual``."""
    deadline = time.monotonic() + BALLOON_SETTLE
    last, last_change = -1, time.monotonic()
    while True:
        actual = int(qmp.cmd("query-balloon")["actual"])  # type: ignore[attr-defined]
        now = time.monotonic()
        if abs(actual - actual_target) < MiB or now > deadline or now - last_change > 3.0:
            return actual
        if actual != last:
            last, last_change = actual, now
        time.sleep(0.1)


def set_swap_target(
    host: QemuHost,
    vm: RunningVM,
    action: SetSwapTarget,
    resident: npt.NDArray[np.bool_] | None = None,
) -> ActionResult:
    """Keep at most the limit of ``vm``'s memory file resident. ``resident``: the file's
    residency map if the caller has just measured it (the standing-limit check has)."""
    spec = vm.spec
    if action.resident_limit < 0:
        raise InputError(f"{spec.name}: resident limit {action.resident_limit} bytes is negative")
    if spec.backing is not Backing.FILE:
        return ActionResult(
            action,
            ok=False,
            message=(f"{spec.name}: anonymous backing has no per-VM swap file; use the balloon"),
        )
    floor = max(action.resident_limit, spec.reservation)
    standing = floor if floor < spec.memory else None
    host.record_swap_limit(vm, standing)  # held at every observation (QemuHost)
    if resident is None:
        resident = hostmem.file_resident_pages(vm.process.paths.memory)
    tracker = refault_tracker(vm, resident)
    back = tracker.update(resident, host.clock.now())
    before = int(resident.sum()) * PAGE_SIZE
    if before <= floor:
        return ActionResult(
            action,
            ok=True,
            message=(
                f"{spec.name}: {format_size(before)} resident, already within {format_size(floor)}"
            ),
        )
    chunks = swapout.choose_chunks(
        resident, before - floor, cap=before - spec.reservation, hot=tracker.hot(host.clock.now())
    )
    result, resident = _evict(host, vm, action, chunks, resident)
    notes = [result.message]
    if back:
        notes.insert(0, f"{format_size(back * PAGE_SIZE)} came back since the last eviction")
    for _ in range(swapout.LIMIT_ROUNDS - 1):
        # the running guest may fault pages of the evicted chunks straight back (hot pages):
        # evict again from what is resident now, so the limit holds when this returns
        now = int(resident.sum()) * PAGE_SIZE
        if now <= floor + swapout.LIMIT_SLACK:
            break
        hot = tracker.hot(host.clock.now())
        chunks = swapout.choose_chunks(resident, now - floor, cap=now - spec.reservation, hot=hot)
        if not chunks:
            break
        again, resident = _evict(host, vm, action, chunks, resident)
        notes.append("again: " + again.message)
    after = int(resident.sum()) * PAGE_SIZE
    return ActionResult(action, ok=True, achieved=max(0, before - after), message="; ".join(notes))


def swap_out_ranges(host: QemuHost, vm: RunningVM, ranges: list[tuple[int, int]]) -> ActionResult:
    """Swap out the given (file offset, length) ranges, widened to 2 MiB chunks; refuses if
    that would leave less than the reservation resident."""
    resident = hostmem.file_resident_pages(vm.process.paths.memory)
    before = int(resident.sum()) * PAGE_SIZE
    chunks = swapout.align_ranges(ranges, vm.spec.memory)
    evictable = PAGE_SIZE * sum(
        int(resident[o // PAGE_SIZE : (o + n) // PAGE_SIZE].sum()) for o, n in chunks
    )
    if before - evictable < vm.spec.reservation:
        raise InputError(
            f"{vm.spec.name}: swapping out {format_size(evictable)} would leave less than the "
            f"reservation {format_size(vm.spec.reservation)} resident"
        )
    action = SetSwapTarget(vm.spec.name, before - evictable)
    return _evict(host, vm, action, chunks, resident)[0]


def _evict(
    host: QemuHost,
    vm: RunningVM,
    action: SetSwapTarget,
    chunks: list[tuple[int, int]],
    resident: npt.NDArray[np.bool_],
) -> tuple[ActionResult, npt.NDArray[np.bool_]]:
    """Write back and evict ``chunks``; the result and the file's residency measured after."""
    before = int(resident.sum()) * PAGE_SIZE
    path = vm.process.paths.memory
    base = _file_mapping_base(vm.process.pid, path)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    start = time.perf_counter()
    try:
        swapout.page_out(vm.process.pid, fd, base, chunks)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    tracker = refault_tracker(vm, resident)
    tracker.evicted(chunks)
    after_map = hostmem.file_resident_pages(path)
    tracker.update(after_map, host.clock.now())  # chunks faulted back at once are hot
    after = int(after_map.sum()) * PAGE_SIZE
    freed = max(0, before - after)
    # Why the net drop can be less than the chunks: pages in the (2 MiB-widened) chunks that
    # were not resident, chunk pages the guest faulted back at once, and pages the running
    # guest faulted in elsewhere meanwhile. Each is measured and said.
    chunks_before = _resident_in(resident, chunks)
    chunks_after = _resident_in(after_map, chunks)
    elsewhere = (after - chunks_after) - (before - chunks_before)
    result = ActionResult(
        action,
        ok=True,
        achieved=freed,
        message=(
            f"{vm.spec.name}: wrote back and evicted {format_size(sum(n for _, n in chunks))} in"
            f" {seconds:.2f} s ({format_size(chunks_before)} of it resident, "
            f"{format_size(chunks_after)} resident again after); elsewhere in the guest "
            f"{elsewhere / MiB:+.1f} MiB; resident {format_size(before)} -> "
            f"{format_size(after)} (freed {format_size(freed)})"
        ),
    )
    return result, after_map


def refault_tracker(vm: RunningVM, resident: npt.NDArray[np.bool_]) -> swapout.RefaultTracker:
    """The VM's :class:`swapout.RefaultTracker` (made on first use, sized by its file)."""
    nchunks = swapout.chunk_count(len(resident))
    if vm.refaults is None or len(vm.refaults.out) != nchunks:
        vm.refaults = swapout.RefaultTracker(nchunks)
    return vm.refaults


def _resident_in(resident: npt.NDArray[np.bool_], chunks: list[tuple[int, int]]) -> int:
    return PAGE_SIZE * sum(
        int(resident[o // PAGE_SIZE : (o + n) // PAGE_SIZE].sum()) for o, n in chunks
    )


def _file_mapping_base(pid: int, path: Path) -> int:
    """Start of QEMU's mapping of the VM's file at offset 0."""
    target = str(path.resolve())
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target and int(parts[2], 16) == 0:
            return int(parts[0].split("-")[0], 16)
    raise BackendError(f"QEMU pid {pid} has no mapping of {target}")


def set_ksm(action: SetKsm) -> ActionResult:
    if action.run not in (0, 1, 2):
        raise InputError(f"SetKsm.run: expected 0, 1 or 2, got {action.run}")
    values = {"run": action.run}
    if action.pages_to_scan is not None:
        if not 1 <= action.pages_to_scan <= 1_000_000:
            raise InputError(f"SetKsm.pages_to_scan: 1..1000000, got {action.pages_to_scan}")
        values["pages_to_scan"] = action.pages_to_scan
    if action.sleep_millisecs is not None:
        if not 0 <= action.sleep_millisecs <= 60_000:
            raise InputError(f"SetKsm.sleep_millisecs: 0..60000, got {action.sleep_millisecs}")
        values["sleep_millisecs"] = action.sleep_millisecs
    try:
        for key in ("pages_to_scan", "sleep_millisecs", "run"):  # run last: settings first
            if key in values and (KSM_DIR / key).read_text().strip() != str(values[key]):
                (KSM_DIR / key).write_text(str(values[key]))
    except PermissionError as exc:
        raise BackendError(f"KSM settings in {KSM_DIR}: needs root ({exc})") from exc
    stats = hostmem.ksm_stats()
    return ActionResult(
        action,
        ok=True,
        achieved=stats.pages_sharing * PAGE_SIZE,
        message=(
            f"KSM run={stats.run} pages_to_scan={stats.pages_to_scan} "
            f"sleep_millisecs={stats.sleep_millisecs}; pages_sharing={stats.pages_sharing}"
        ),
    )
