"""E2E: a standing swap limit on a real file-backed guest (TCG) stands between ticks too.

An idle guest keeps touching pages in many of its 2 MiB chunks (docs/backends.md), and the
host page cache brings a touched chunk back whole. The QEMU backend holds a swap limit at
every observation (a tick) and evicts last the chunks the guest faulted back after an
eviction. Above the guest's working set the limit then stands between ticks as
well: after the first ticks nothing comes back and there is nothing more to evict. (Evicting
top-down every tick instead, the same hot chunks came back within a second of every hold:
bench/bench_swap_hold.py.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from guestfill import fill_guest
from memvisor.backends.qemu import actions, swapout
from memvisor.backends.qemu.host import QemuHost
from memvisor.guestimage import GuestImage
from memvisor.model import Backing, PowerState, SetSwapTarget, VMSpec
from memvisor.units import MiB, format_size

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
VM = "swapvm"
# the idle guest's working set in 2 MiB chunks measured 164-176 MiB of 256 (docs/backends.md),
# and once, in a full suite run, 214-216 MiB (a 208 MiB limit then never stood)
LIMIT = 224 * MiB
STANDING = 3  # ticks in a row the limit must stand through between ticks
MAX_TICKS = 20


@pytest.fixture(scope="module")
def host(
    tmp_path_factory: pytest.TempPathFactory, qemu_as_root: None, guest_image: GuestImage
) -> Iterator[QemuHost]:
    h = QemuHost(tmp_path_factory.mktemp("state"), image=guest_image, accel="tcg")
    try:
        h.power_on(VMSpec(VM, 256 * MiB, reservation=64 * MiB, backing=Backing.FILE))
        yield h
    finally:
        for rec in h.records():
            if rec.power is PowerState.ON:
                h.power_off(rec.spec.name)


def resident(host: QemuHost) -> int:
    """What the VM has resident now, read from its file without holding the limit."""
    return actions.consumed(host, host.running(VM))


def test_a_limit_above_the_working_set_stands_between_ticks(host: QemuHost) -> None:
    vm = host.running(VM)
    fill_guest(vm.process.paths.shell)
    assert resident(host) >= LIMIT + 16 * MiB  # there is something to swap out
    try:
        check_stands(host)
    finally:  # lifted, so the next test starts without a limit (and without a warning sent)
        assert host.apply(SetSwapTarget(VM, 256 * MiB)).ok


def check_stands(host: QemuHost) -> None:
    vm = host.running(VM)
    result = host.apply(SetSwapTarget(VM, LIMIT))
    assert result.ok, result.message
    between: list[int] = []
    observed: list[int] = []
    standing = 0  # consecutive ticks the limit stood through
    while standing < STANDING and len(between) < MAX_TICKS:
        time.sleep(1.0)
        between.append(resident(host))  # what the guest took back since the last tick
        observed.append(host.observe_vm(VM, sharing=False).consumed)  # the tick holds the limit
        standing = standing + 1 if between[-1] <= LIMIT + swapout.LIMIT_SLACK else 0
    assert vm.refaults is not None
    print(
        f"limit {format_size(LIMIT)}: resident between ticks "
        f"{[format_size(b) for b in between]}, at ticks {[format_size(o) for o in observed]}; "
        f"{vm.refaults.came_back} chunks came back after an eviction"
    )
    assert max(observed) <= LIMIT + swapout.LIMIT_SLACK, observed
    # once the hot chunks are known and kept, the limit stands between ticks: it took 1-6
    # ticks in the runs measured; top-down, the guest took 28-36 MiB back at every tick
    assert standing == STANDING, between


def test_a_limit_under_the_working_set_is_said_to_hold_only_at_ticks(host: QemuHost) -> None:
    """96 MiB is under the idle guest's working set: each tick evicts again what came back
    since the last, and the backend says so in an event, once a minute per VM, not every tick
    nor for every new value of the limit."""
    vm = host.running(VM)
    fill_guest(vm.process.paths.shell)
    host.drain_events()
    try:
        assert host.apply(SetSwapTarget(VM, 96 * MiB)).ok
        for tick in range(4):
            if tick == 2:  # the scheduler moves a limit a little at a time: still one event
                assert host.apply(SetSwapTarget(VM, 100 * MiB)).ok
            time.sleep(1.0)
            host.observe_vm(VM, sharing=False)
    finally:
        assert host.apply(SetSwapTarget(VM, 256 * MiB)).ok
    events = host.drain_events()
    print(events)
    warned = [e for e in events if e.startswith(f"{VM}: ") and "under the guest's working" in e]
    assert len(warned) == 1, events
