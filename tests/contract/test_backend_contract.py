"""The HostBackend contract (docs/backends.md), one suite run against both backends.

``backend`` is the simulator (``sim``) and real QEMU guests under TCG (``qemu``, e2e: booted
once for the module through ``QemuHost``'s own launcher, with the e2e fixtures' guest image).
Both get the same two VMs (:mod:`backend_harness`). Every assertion holds for both: where the
backends differ, the suite fails — or, for a deviation already reported and not yet fixed in
the QEMU backend, the case is a strict xfail listed in :data:`QEMU_KNOWN_DEVIATIONS`, which
turns into a failure the day it is fixed (then delete the entry).

Tolerances are the ones docs/backends.md states and justifies from measurements.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from backend_harness import ANON_VM, FILE_VM, SPECS, Harness, qemu_harness, sim_harness

from memvisor.errors import InputError, NotFoundError
from memvisor.model import (
    Action,
    ActionResult,
    Backing,
    PowerState,
    SetBalloon,
    SetKsm,
    SetSwapTarget,
    VMObservation,
)
from memvisor.units import MiB, format_size

pytestmark = pytest.mark.timeout(300)


def _e2e_fixtures() -> ModuleType:
    """tests/e2e/conftest.py, whose fixtures (guest image, QEMU-and-root check) the qemu case
    reuses; loaded by path since conftest modules are not importable by name (with its folder
    on the import path, as pytest does for a conftest: it imports a helper module from there)."""
    folder = Path(__file__).parents[1] / "e2e"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    path = folder / "conftest.py"
    spec = importlib.util.spec_from_file_location("memvisor_e2e_conftest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_E2E = _e2e_fixtures()
guest_image = _E2E.guest_image
qemu_as_root = _E2E.qemu_as_root

# --- tolerances (docs/backends.md, "Tolerances") -------------------------------------------------
BALLOON = 96 * MiB  # the balloon size the suite inflates
BALLOON_FREE_TOLERANCE = 16 * MiB  # |consumed drop - balloon| after inflating over touched memory
BALLOON_HELD_TOLERANCE = 4 * MiB  # |ballooned - target| once settled
REPEAT_TOLERANCE = 4 * MiB  # what a repeated action may still achieve or move
FREED_TOLERANCE = 16 * MiB  # how much less than the measured drop a swap-out may report
REFAULT_TOLERANCE = 64 * MiB  # how much more: what the guest faulted back meanwhile
CHUNK = 2 * MiB  # swap-out works in 2 MiB chunks (page-cache folios)
SETTLE = 10.0  # seconds of backend time for a change to finish (balloon, guest statistics)
FREE_SETTLE = 20.0  # seconds for the host to get a held balloon's memory back


@pytest.fixture(
    scope="module",
    params=["sim", pytest.param("qemu", marks=[pytest.mark.e2e, pytest.mark.timeout(600)])],
)
def backend(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    if request.param == "sim":
        yield sim_harness()
        return
    request.getfixturevalue("qemu_as_root")
    image = request.getfixturevalue("guest_image")
    yield from qemu_harness(tmp_path_factory.mktemp("contract-qemu"), image)


def observe_all(h: Harness) -> dict[str, VMObservation]:
    return {o.name: o for o in h.backend.observe_vms()}


def say(h: Harness, text: str) -> None:
    """Measured figures, for `pytest -s` and the failure report."""
    print(f"[{h.name}] {text}")


# --- specs and observations ---------------------------------------------------------------------


def test_specs_list_every_vm_with_consistent_fields(backend: Harness) -> None:
    specs = backend.backend.specs()
    assert sorted(s.name for s in specs) == sorted(s.name for s in SPECS)
    assert len({s.name for s in specs}) == len(specs)
    for s in specs:
        assert s.memory > 0 and s.memory % 4096 == 0, s
        assert 0 <= s.reservation <= s.memory, s
        assert s.reservation <= s.effective_limit <= s.memory, s
        assert s.effective_shares > 0 and s.vcpus >= 1, s
        assert s.backing in (Backing.FILE, Backing.ANON), s
    assert {s.name: s for s in specs} == {s.name: s for s in SPECS}  # as configured
    assert backend.backend.specs() == specs  # stable


def test_observations_have_names_power_and_bounds(backend: Harness) -> None:
    specs = {s.name: s for s in backend.backend.specs()}
    obs = observe_all(backend)
    assert set(obs) == set(specs)
    for name, o in obs.items():
        assert o.power is PowerState.ON, o
        assert o.memory == specs[name].memory
        assert 0 <= o.consumed <= o.memory, o
        assert 0 <= o.shared <= o.consumed, o
        assert 0 <= o.swapped <= o.memory and 0 <= o.ballooned <= o.memory, o
        assert 0 <= o.balloon_target <= o.memory, o
        assert o.guest_free is None or 0 <= o.guest_free <= o.memory, o
        assert o.active_fraction is None or 0 <= o.active_fraction <= 1, o
        assert o.guest_swapped_out_rate >= 0 and o.reserved_paged_out_rate >= 0, o
    host = backend.backend.observe_host()
    assert host.total > 0 and 0 <= host.free <= host.total, host
    assert host.ksm.run in (0, 1, 2) and host.ksm.pages_sharing >= 0, host


def test_observation_times_are_monotonic(backend: Harness) -> None:
    host_times, vm_times = [], []
    for _ in range(4):
        host_times.append(backend.backend.observe_host().time)
        vm_times.append([o.time for o in backend.backend.observe_vms()])
        backend.settle(backend.tick)
    assert host_times == sorted(host_times) and host_times[-1] > host_times[0], host_times
    for i in range(len(SPECS)):
        series = [round_[i] for round_ in vm_times]
        assert series == sorted(series) and series[-1] > series[0], series


# --- the balloon ---------------------------------------------------------------------------------


def inflate(h: Harness, vm: str, target: int) -> tuple[ActionResult, VMObservation]:
    result = h.backend.apply(SetBalloon(vm, target))
    assert result.ok, result.message
    settled = h.eventually(
        lambda: h.vm(vm), lambda o: abs(o.ballooned - target) <= BALLOON_HELD_TOLERANCE, SETTLE
    )
    return result, settled


@pytest.mark.parametrize("vm", [ANON_VM, FILE_VM])
def test_balloon_frees_host_memory_and_deflating_gives_it_back_to_the_guest(
    backend: Harness, vm: str, request: pytest.FixtureRequest
) -> None:
    known_deviation(request, backend, f"balloon-{vm}")
    backend.fill(vm)
    before = backend.vm(vm)
    assert before.ballooned == 0 and own(before) >= BALLOON + 64 * MiB, before  # touched
    try:
        check_inflate_and_deflate(backend, vm, before)
    finally:
        backend.backend.apply(SetBalloon(vm, 0))


def own(o: VMObservation) -> int:
    """Host memory the VM holds alone (its frames shared with others not counted)."""
    return o.consumed - o.shared


def check_inflate_and_deflate(backend: Harness, vm: str, before: VMObservation) -> None:
    result, held = inflate(backend, vm, BALLOON)
    # The host gets the memory back at once (virtio-balloon, the agent punching its pages out
    # of a file) or as fast as KSM merges the agent's zero pages (anonymous RAM, KSM on): then
    # the pages stay mapped, counted in `consumed` and in `shared`. What the VM holds on the
    # host alone is consumed - shared.
    inflated = backend.eventually(
        lambda: backend.vm(vm),
        lambda o: own(before) - own(o) >= BALLOON - BALLOON_FREE_TOLERANCE,
        FREE_SETTLE,
    )
    drop = own(before) - own(inflated)
    say(
        backend,
        f"{vm} balloon {format_size(BALLOON)}: consumed - shared {format_size(own(before))} -> "
        f"{format_size(own(inflated))} (drop {format_size(drop)}, consumed "
        f"{format_size(before.consumed)} -> {format_size(inflated.consumed)}, "
        f"{inflated.time - held.time:.1f} s after it was held), achieved "
        f"{format_size(result.achieved)}, ballooned {format_size(inflated.ballooned)}; "
        f"{result.message}",
    )
    assert inflated.balloon_target == BALLOON
    assert abs(inflated.ballooned - BALLOON) <= BALLOON_HELD_TOLERANCE, inflated
    assert abs(drop - BALLOON) <= BALLOON_FREE_TOLERANCE, result.message
    assert 0 <= result.achieved <= drop + BALLOON_FREE_TOLERANCE, result.message
    backend.settle(backend.stats_delay)
    guest_free = backend.vm(vm).guest_free
    assert guest_free is not None, "the guest never reported its free memory"
    result = backend.backend.apply(SetBalloon(vm, 0))
    assert result.ok, result.message
    backend.settle(backend.stats_delay)
    deflated = backend.eventually(
        lambda: backend.vm(vm),
        lambda o: o.guest_free is not None and o.guest_free - guest_free >= BALLOON * 3 // 4,
        SETTLE,
    )
    say(
        backend,
        f"{vm} deflate: guest free {format_size(guest_free)} -> "
        f"{format_size(deflated.guest_free or 0)}, ballooned {deflated.ballooned}",
    )
    assert deflated.ballooned <= BALLOON_HELD_TOLERANCE and deflated.balloon_target == 0, deflated
    assert deflated.guest_free is not None
    assert deflated.guest_free - guest_free >= BALLOON - BALLOON_FREE_TOLERANCE, deflated


def test_balloon_is_idempotent(backend: Harness) -> None:
    first, once = inflate(backend, ANON_VM, BALLOON)
    again = backend.backend.apply(SetBalloon(ANON_VM, BALLOON))
    backend.settle(backend.tick)
    twice = backend.vm(ANON_VM)
    say(
        backend,
        f"same balloon twice: achieved {format_size(first.achieved)} then "
        f"{format_size(again.achieved)}",
    )
    assert again.ok, again.message
    assert again.achieved <= REPEAT_TOLERANCE, again.message
    assert twice.balloon_target == once.balloon_target == BALLOON
    assert abs(twice.ballooned - once.ballooned) <= REPEAT_TOLERANCE, (once, twice)
    assert abs(twice.consumed - once.consumed) <= REPEAT_TOLERANCE, (once, twice)
    inflate(backend, ANON_VM, 0)


# --- swapping to the VM's own file --------------------------------------------------------------


def assert_freed_matches_drop(result: ActionResult, drop: int) -> None:
    """What a swap-out says it freed against the drop the next observation shows. The limit is
    a standing one: that observation swaps out again what the guest faulted back meanwhile
    (measured 18-30 MiB on QEMU), so the drop may exceed what the action itself freed by up to
    what a guest refaults; the action may report more than the drop by as much."""
    slack = FREED_TOLERANCE + REFAULT_TOLERANCE
    assert -slack <= result.achieved - drop <= REFAULT_TOLERANCE, result.message


def test_swap_target_never_goes_below_the_reservation_and_reports_bytes_freed(
    backend: Harness,
) -> None:
    reservation = next(s.reservation for s in SPECS if s.name == FILE_VM)
    backend.fill(FILE_VM)
    before = backend.vm(FILE_VM)
    assert before.consumed >= reservation + 64 * MiB, before
    result = backend.backend.apply(SetSwapTarget(FILE_VM, 0))
    after = backend.vm(FILE_VM)
    drop = before.consumed - after.consumed
    say(
        backend,
        f"swap target 0 (reservation {format_size(reservation)}): consumed "
        f"{format_size(before.consumed)} -> {format_size(after.consumed)}, achieved "
        f"{format_size(result.achieved)}; {result.message}",
    )
    try:
        assert result.ok, result.message  # clamped to the reservation, not refused
        assert after.consumed >= reservation - CHUNK, after
        assert result.achieved <= before.consumed - reservation + CHUNK, result.message
        assert result.achieved >= (before.consumed - reservation) // 2, result.message  # did it
        assert_freed_matches_drop(result, drop)
        assert after.swapped >= result.achieved - REFAULT_TOLERANCE, after
    finally:
        lifted = backend.backend.apply(SetSwapTarget(FILE_VM, before.memory))
        assert lifted.ok, lifted.message


def test_swap_target_reports_what_it_freed(backend: Harness) -> None:
    limit = 96 * MiB
    backend.fill(FILE_VM)
    before = backend.vm(FILE_VM)
    assert before.consumed >= limit + 32 * MiB, before
    result = backend.backend.apply(SetSwapTarget(FILE_VM, limit))
    after = backend.vm(FILE_VM)
    drop = before.consumed - after.consumed
    say(
        backend,
        f"swap target {format_size(limit)}: consumed {format_size(before.consumed)} -> "
        f"{format_size(after.consumed)}, achieved {format_size(result.achieved)}; "
        f"{result.message}",
    )
    try:
        assert result.ok, result.message
        assert result.achieved <= before.consumed - limit + CHUNK, result.message
        assert result.achieved >= (before.consumed - limit) // 2, result.message  # did it
        assert_freed_matches_drop(result, drop)
    finally:
        assert backend.backend.apply(SetSwapTarget(FILE_VM, before.memory)).ok


def test_swap_target_is_a_standing_limit(backend: Harness, request: pytest.FixtureRequest) -> None:
    """``SetSwapTarget`` keeps at most the limit resident (model.py: "Keep at most ..."), also
    when the guest touches its memory afterwards, as the scheduler assumes (it re-sends a limit
    only when the limit changes).

    The limit takes 32 MiB from what the VM holds after touching its memory (on QEMU 224-256 MiB
    here: the limit is then 192-224 MiB, above the working set the guest keeps touching, which
    in 2 MiB chunks measured 164-176 MiB). An idle guest of the e2e image touches pages in ~80
    of its 128 2 MiB chunks every second (docs/backends.md), and the host page cache brings
    each touched chunk back whole: a limit under that holds on QEMU only at the instant of each
    tick, a race this suite has lost (96 MiB measured 126 MiB once). Above it, the QEMU backend
    learns which chunks come back and the limit stands between ticks too
    (tests/e2e/test_qemu_swap_limit.py).
    """
    known_deviation(request, backend, "standing-swap-limit")
    backend.fill(FILE_VM)
    limit = (backend.vm(FILE_VM).consumed - 32 * MiB) // CHUNK * CHUNK
    assert limit >= reservation_of(FILE_VM) + 16 * MiB, limit  # above the reservation
    try:
        result = backend.backend.apply(SetSwapTarget(FILE_VM, limit))
        assert result.ok, result.message
        reached = backend.vm(FILE_VM)
        say(backend, f"limit {format_size(limit)}: consumed {format_size(reached.consumed)}")
        assert reached.consumed <= limit + FREED_TOLERANCE, result.message
        # the observation says which limit stands (a restarted manager learns it from there)
        assert reached.resident_limit == max(limit, reservation_of(FILE_VM)), reached
        backend.fill(FILE_VM)
        backend.settle(backend.tick)
        after = backend.vm(FILE_VM)
        say(
            backend,
            f"limit {format_size(limit)}, guest touched its memory: consumed "
            f"{format_size(after.consumed)}",
        )
        assert after.consumed <= limit + FREED_TOLERANCE, after
    finally:
        assert backend.backend.apply(SetSwapTarget(FILE_VM, memory_of(FILE_VM))).ok
    assert backend.vm(FILE_VM).resident_limit is None  # lifted


def memory_of(vm: str) -> int:
    return next(s.memory for s in SPECS if s.name == vm)


def reservation_of(vm: str) -> int:
    return next(s.reservation for s in SPECS if s.name == vm)


# --- KSM -----------------------------------------------------------------------------------------


def test_ksm_settings_applied_again_change_nothing(backend: Harness) -> None:
    """Applying the host's current KSM settings is accepted and leaves them as they were (on
    QEMU this is the host's /sys/kernel/mm/ksm: the suite never changes it)."""
    before = backend.backend.observe_host().ksm
    result = backend.backend.apply(SetKsm(before.run, before.pages_to_scan, before.sleep_millisecs))
    assert result.ok, result.message
    assert ksm_settings(backend) == (before.run, before.pages_to_scan, before.sleep_millisecs)


# --- bad actions ----------------------------------------------------------------------------------

REFUSED = "refused"  # a not-ok ActionResult whose message names the VM
ANON_MEMORY, ANON_RESERVATION = next((s.memory, s.reservation) for s in SPECS if s.name == ANON_VM)
BAD_ACTIONS: dict[str, tuple[Action, type[Exception] | str]] = {
    "unknown-vm-balloon": (SetBalloon("ghost", 0), NotFoundError),
    "unknown-vm-swap": (SetSwapTarget("ghost", 64 * MiB), NotFoundError),
    "negative-balloon": (SetBalloon(ANON_VM, -4096), InputError),
    "negative-resident-limit": (SetSwapTarget(FILE_VM, -4096), InputError),
    "balloon-above-memory": (SetBalloon(ANON_VM, ANON_MEMORY + 4096), REFUSED),
    "balloon-into-reservation": (
        SetBalloon(ANON_VM, ANON_MEMORY - ANON_RESERVATION + MiB),
        REFUSED,
    ),
    "swap-anonymous-vm": (SetSwapTarget(ANON_VM, ANON_RESERVATION), REFUSED),
    "ksm-bad-run": (SetKsm(run=3), InputError),
    "ksm-no-pages": (SetKsm(run=0, pages_to_scan=0), InputError),
    "ksm-negative-sleep": (SetKsm(run=0, sleep_millisecs=-1), InputError),
}
# Deviations of the QEMU backend reported to its engineer (strict: fixing one fails the xfail).
QEMU_KNOWN_DEVIATIONS: dict[str, str] = {}


def known_deviation(request: pytest.FixtureRequest, backend: Harness, case: str) -> None:
    if backend.name == "qemu" and case in QEMU_KNOWN_DEVIATIONS:
        request.node.add_marker(pytest.mark.xfail(reason=QEMU_KNOWN_DEVIATIONS[case], strict=True))


def state_of(h: Harness) -> dict[str, tuple[int, int, int]]:
    return {n: (o.balloon_target, o.ballooned, o.swapped) for n, o in observe_all(h).items()}


def ksm_settings(h: Harness) -> tuple[int, int, int]:
    k = h.backend.observe_host().ksm
    return k.run, k.pages_to_scan, k.sleep_millisecs


@pytest.mark.parametrize("case", list(BAD_ACTIONS))
def test_bad_actions_are_refused_and_change_nothing(
    backend: Harness, case: str, request: pytest.FixtureRequest
) -> None:
    known_deviation(request, backend, case)
    action, expected = BAD_ACTIONS[case]
    state, ksm = state_of(backend), ksm_settings(backend)
    vm = getattr(action, "vm", None)
    try:
        if isinstance(expected, str):
            result = backend.backend.apply(action)
            assert not result.ok, f"{case}: accepted: {result.message}"
            assert vm is not None and vm in result.message, result.message
            assert result.achieved == 0, result
        else:
            with pytest.raises(expected) as caught:
                backend.backend.apply(action)
            assert vm is None or vm in str(caught.value), caught.value
    finally:
        now = state_of(backend)
        # undo what a deviating backend did, so the next cases start from the same state
        for name, (target, _, _) in now.items():
            if target != state[name][0]:
                backend.backend.apply(SetBalloon(name, state[name][0]))
    assert ksm_settings(backend) == ksm
    for name, (target, ballooned, swapped) in now.items():
        was = state[name]
        assert target == was[0], f"{case}: {name} balloon target moved"
        assert abs(ballooned - was[1]) <= REPEAT_TOLERANCE, f"{case}: {name} balloon moved"
        assert swapped - was[2] <= REPEAT_TOLERANCE, f"{case}: {name} was swapped out"
