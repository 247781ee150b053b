"""A restarted manager takes up the activity history the last one saved (SQLite, committed
with every tick), on the real simulator: a VM that was busy a minute ago and pauses now is not
squeezed as if it had always been idle."""

from __future__ import annotations

from pathlib import Path

import pytest
from simhelpers import SMALL_GUEST

from memvisor.backends.sim.config import Phase, SimHostConfig, SimVMConfig, Workload
from memvisor.backends.sim.host import SimHost
from memvisor.loop import ControlLoop
from memvisor.policy.activity import ActivityEstimator
from memvisor.policy.scheduler import MemvisorScheduler
from memvisor.store import Store
from memvisor.units import MiB

BUSY = Phase(working_set=100 * MiB, access_rate=20_000, duration=60.0)
IDLE = Phase(working_set=4 * MiB, access_rate=200)


def make_host() -> SimHost:
    def wl(name: str, phases: tuple[Phase, ...]) -> Workload:
        return Workload(name=name, footprint=110 * MiB, phases=phases)

    vms = [
        SimVMConfig(name="periodic", memory=128 * MiB, workload=wl("p", (BUSY, IDLE)),
                    guest=SMALL_GUEST),
        SimVMConfig(name="busy", memory=128 * MiB, workload=wl("b", (BUSY, BUSY, BUSY)),
                    guest=SMALL_GUEST),
        SimVMConfig(name="busy2", memory=128 * MiB, workload=wl("b", (BUSY, BUSY, BUSY)),
                    guest=SMALL_GUEST),
    ]  # fmt: skip
    return SimHost(SimHostConfig(memory=300 * MiB), vms, seed=3)


def run(loop: ControlLoop, host: SimHost, ticks: int) -> None:
    for _ in range(ticks):
        loop.tick()
        host.step()


def taken_after_restart(tmp_path: Path, keep_history: bool) -> tuple[int, MemvisorScheduler]:
    """90 s under one manager (the periodic VM busy for 60 s, then paused), then a new manager
    for 20 s on the same running VMs; returns the most the new manager asked the periodic VM
    to give (balloon target, or memory above a swap limit) and the new manager."""
    host = make_host()
    wall = lambda: 1.7e9 + host.clock.now()  # noqa: E731  the wall clock agrees with the host's
    first = Store.open(tmp_path / "a", wall=wall)
    run(ControlLoop(host, MemvisorScheduler(), first, host.clock), host, 90)
    second = first if keep_history else Store.open(tmp_path / "b", wall=wall)
    policy = MemvisorScheduler()
    run(ControlLoop(host, policy, second, host.clock), host, 20)
    taken = [
        d["action"].get("target", 0) if d["kind"] == "SetBalloon"
        else 128 * MiB - d["action"]["resident_limit"]
        for d in second.decisions() if d["vm"] == "periodic" and d["wall"] >= wall() - 20
    ]  # fmt: skip
    got = max(taken, default=0)
    return int(got), policy


def test_a_restarted_manager_does_not_squeeze_a_vm_that_was_busy_a_minute_ago(
    tmp_path: Path,
) -> None:
    forgot, fresh = taken_after_restart(tmp_path / "without", keep_history=False)
    kept, restored = taken_after_restart(tmp_path / "with", keep_history=True)
    print(f"asked of the periodic VM after the restart: {forgot / MiB:.0f} MiB without history, "
          f"{kept / MiB:.0f} MiB with; estimates {fresh.activity.estimate('periodic'):.2f} and "
          f"{restored.activity.estimate('periodic'):.2f}")  # fmt: skip
    assert fresh.activity.estimate("periodic") < 0.2  # its first sample: paused
    assert restored.activity.estimate("periodic") > 0.5  # remembers the busy minute
    assert forgot >= 16 * MiB  # without history the pause looks like idleness
    assert kept == 0


def test_history_is_committed_with_each_tick_and_taken_up_only_on_the_same_clock(
    tmp_path: Path,
) -> None:
    host = make_host()
    store = Store.open(tmp_path, wall=lambda: 1.7e9 + host.clock.now())
    run(ControlLoop(host, MemvisorScheduler(), store, host.clock), host, 15)
    saved = store.activity()
    assert set(saved) == {"periodic", "busy", "busy2"}
    t, wall, fast, slow = saved["busy"]
    assert t == pytest.approx(14.0) and wall == pytest.approx(1.7e9 + 14.0) and 0 < fast <= slow

    other = make_host()  # a new simulated host: its clock starts again at 0
    policy = MemvisorScheduler()
    ControlLoop(other, policy, store, other.clock).tick()
    assert policy.activity.export() == {}  # nothing restored (and no sample of its own yet)
    events = [e["message"] for e in store.events() if e["kind"] == "policy.history"]
    assert events and "saved on another clock" in events[-1]


def test_restore_refuses_bad_values_and_keeps_newer_samples() -> None:
    est = ActivityEstimator()
    est.update("a", 10.0, 0.2)
    refused = est.restore({"a": (5.0, 0.9, 0.9), "b": (5.0, 0.1, 0.7), "c": (5.0, 1.5, 0.1),
                           "d": (float("nan"), 0.1, 0.1)})  # fmt: skip
    assert sorted(refused) == ["c", "d"]
    assert est.estimate("a") == pytest.approx(0.2)  # its own sample wins
    assert est.estimate("b") == pytest.approx(0.7)
    assert est.update("b", 605.0, 0.0) == pytest.approx(0.35, abs=0.01)  # 600 s later: half


def test_a_vm_powered_off_or_gone_starts_afresh_and_leaves_the_saved_history(
    tmp_path: Path,
) -> None:
    from dataclasses import replace

    from policy_snapshots import snapshot, vm

    from memvisor.model import PowerState

    policy = MemvisorScheduler()
    a, b = vm("a", active=0.9), vm("b", active=0.9)
    policy.plan(snapshot([a, b], total=4096 * MiB, free=2048 * MiB, time=0.0))
    assert set(policy.activity.export()) == {"a", "b"}
    off = (a[0], replace(a[1], power=PowerState.OFF))
    policy.plan(snapshot([off], total=4096 * MiB, free=2048 * MiB, time=1.0))  # b is gone
    assert policy.activity.export() == {}
    assert policy.activity.estimate("a") == 1.0  # unknown again: no tax until sampled

    store = Store.open(tmp_path, wall=lambda: 0.0)
    host = snapshot([a, b], total=4096 * MiB, free=2048 * MiB).host
    store.record_tick(host, None, [a[0], b[0]], [a[1], b[1]], [],
                      activity={"a": (0.0, 0.5, 0.9), "b": (0.0, 0.5, 0.9)})  # fmt: skip
    store.record_tick(host, None, [a[0]], [a[1]], [], activity={"a": (1.0, 0.4, 0.9)})
    assert set(store.activity()) == {"a"}  # the saved history is the policy's current one
    store.record_tick(host, None, [a[0]], [a[1]], [], activity=None)  # a policy without one
    assert set(store.activity()) == {"a"}
