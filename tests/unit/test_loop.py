"""The control loop against a small in-test host: records, isolation, lifecycle, stopping."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from fakehost import FakeHost, StepBalloonPolicy

from memvisor.backends.base import ManualClock, RealClock
from memvisor.errors import BackendError
from memvisor.loop import ControlLoop, with_reservations
from memvisor.model import Decision, PowerState, Snapshot
from memvisor.policy import get_policy
from memvisor.store import Retention, Store
from memvisor.units import GiB, MiB


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path)


@pytest.fixture
def fake() -> FakeHost:
    h = FakeHost()
    h.add("a")
    h.add("b", memory=2 * GiB, reservation=256 * MiB)
    return h


def test_tick_observes_plans_applies_and_records(fake: FakeHost, store: Store) -> None:
    loop = ControlLoop(fake, StepBalloonPolicy(), store, fake.clock)
    report = loop.tick()
    assert report.tick is not None and report.decisions == 2 and report.failed_actions == 0
    assert fake.balloons == {"a": 64 * MiB, "b": 64 * MiB}
    decisions = store.decisions()
    assert {d["vm"] for d in decisions} == {"a", "b"}
    assert all(d["ok"] and d["achieved"] == 32 * MiB for d in decisions)
    host = store.latest_host()
    assert host is not None and host["state"] == "high" and host["duration"] > 0
    ent = {r["vm"]: r["entitlement"] for r in store.latest_vms()}
    assert ent == {"a": GiB // 2, "b": GiB}
    loop.tick()
    assert fake.balloons["a"] == 128 * MiB  # the second tick saw the first one's effect


def test_failing_action_is_recorded_and_the_rest_still_run(fake: FakeHost, store: Store) -> None:
    fake.fail_vm = "a"
    loop = ControlLoop(fake, StepBalloonPolicy(), store, fake.clock)
    report = loop.tick()
    assert report.failed_actions == 1 and fake.balloons["b"] == 64 * MiB
    by_vm = {d["vm"]: d for d in store.decisions()}
    assert by_vm["a"]["ok"] is False and "QMP socket closed" in by_vm["a"]["message"]
    assert store.counters()["actions_failed"] == 1
    fake.fail_vm = None
    assert loop.tick().failed_actions == 0  # the loop went on


def test_failing_observation_skips_the_tick_only(fake: FakeHost, store: Store) -> None:
    loop = ControlLoop(fake, StepBalloonPolicy(), store, fake.clock)
    fake.fail_observe = True
    report = loop.tick()
    assert report.tick is None and report.error and "unreadable" in report.error
    assert fake.balloons["a"] == 0 and store.latest_host() is None
    assert [e["kind"] for e in store.events()][-1] == "loop.error"
    fake.fail_observe = False
    assert loop.tick().tick is not None


class RaisingPolicy:
    def plan(self, snapshot: Snapshot) -> list[Decision]:
        raise ZeroDivisionError("bug in a policy")


def test_failing_plan_is_recorded(fake: FakeHost, store: Store) -> None:
    report = ControlLoop(fake, RaisingPolicy(), store, fake.clock).tick()
    assert report.tick is None
    assert "plan failed: ZeroDivisionError" in store.events()[-1]["message"]


def test_lifecycle_events(fake: FakeHost, store: Store) -> None:
    loop = ControlLoop(fake, StepBalloonPolicy(), store, fake.clock)
    loop.tick()
    fake.power["a"] = PowerState.CRASHED
    del fake.vms["b"]
    loop.tick()
    msgs = [(e["kind"], e["message"]) for e in store.events()]
    assert ("vm.seen", "a: on") in msgs and ("vm.power", "a: on -> crashed") in msgs
    assert ("vm.gone", "b: no longer reported") in msgs


def test_backend_events_are_recorded_each_tick(fake: FakeHost, store: Store) -> None:
    pending = ["a: 64 MiB came back from its swap file since the last tick", "orphan cgroup x"]

    def drain() -> list[str]:
        out = pending[:]
        pending.clear()
        return out

    loop = ControlLoop(fake, StepBalloonPolicy(), store, fake.clock, events=drain)
    loop.tick()
    pending.append("b: no guest agent")
    loop.tick()
    got = [
        (e["kind"], e["vm"], e["message"]) for e in store.events() if e["kind"] == "backend.event"
    ]
    assert got == [
        ("backend.event", "a", "a: 64 MiB came back from its swap file since the last tick"),
        ("backend.event", None, "orphan cgroup x"),  # names no VM the tick saw
        ("backend.event", "b", "b: no guest agent"),
    ]


def test_reservation_overlay_reaches_policy_and_record(fake: FakeHost, store: Store) -> None:
    live = {"a": 300 * MiB}
    loop = ControlLoop(
        fake, StepBalloonPolicy(), store, fake.clock, specs_overlay=with_reservations(live)
    )
    loop.tick()
    res = {r["vm"]: r["reservation"] for r in store.latest_vms()}
    assert res == {"a": 300 * MiB, "b": 256 * MiB}


def test_run_on_a_manual_clock_ticks_at_the_interval(fake: FakeHost, store: Store) -> None:
    clock = fake.clock
    loop = ControlLoop(fake, StepBalloonPolicy(), store, clock, interval=2.0, prune_every=3)
    assert loop.run(threading.Event(), max_ticks=5) == 5
    times = [r["t"] for r in store.host_history(0)]
    assert times == [0.0, 2.0, 4.0, 6.0, 8.0] and clock.now() == 10.0


def test_prune_runs_with_retention(fake: FakeHost, tmp_path: Path) -> None:
    wall = [0.0]
    store = Store.open(tmp_path, wall=lambda: wall[0])
    loop = ControlLoop(
        fake, StepBalloonPolicy(), store, fake.clock,
        retention=Retention(observations=2.5, records=100), prune_every=1,
    )  # fmt: skip
    for _ in range(6):
        wall[0] += 1
        loop.tick()
    assert len(store.host_history(0)) == 3  # walls 4, 5, 6 survive a 2.5 s retention at 6


def test_bad_interval_is_refused(fake: FakeHost, store: Store) -> None:
    with pytest.raises(ValueError, match="interval"):
        ControlLoop(fake, StepBalloonPolicy(), store, ManualClock(), interval=0)


@pytest.mark.timeout(20)
def test_real_clock_run_stops_promptly_on_sigterm_handler(fake: FakeHost, store: Store) -> None:
    """SIGTERM sets the stop event (as the daemon's handler does); the loop returns at once."""
    stop = threading.Event()
    old = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        loop = ControlLoop(fake, StepBalloonPolicy(), store, RealClock(), interval=30.0)
        timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGTERM))
        timer.start()
        ticks = loop.run(stop)
        timer.join()
    finally:
        signal.signal(signal.SIGTERM, old)
    assert ticks == 1 and stop.is_set()


def test_backend_error_type_is_kept_in_message(fake: FakeHost, store: Store) -> None:
    fake.fail_vm = "b"
    ControlLoop(fake, StepBalloonPolicy(), store, fake.clock).tick()
    (row,) = [d for d in store.decisions() if d["vm"] == "b"]
    assert row["message"].startswith(BackendError.__name__)


def test_real_scheduler_state_and_entitlements_are_recorded(fake: FakeHost, store: Store) -> None:
    fake.total = 2 * GiB + 256 * MiB  # a and b consume 1.5 GiB: free 0.75 GiB of 2.25 (high)
    loop = ControlLoop(fake, get_policy("memvisor"), store, fake.clock)
    loop.tick()
    host = store.latest_host()
    assert host is not None and host["state"] == "high"
    ent = {r["vm"]: r["entitlement"] for r in store.latest_vms()}
    assert all(isinstance(e, int) and e > 0 for e in ent.values()), ent
    assert ent["b"] >= 256 * MiB  # never below the reservation


def test_baseline_policy_gets_the_state_from_the_loop(fake: FakeHost, store: Store) -> None:
    fake.total = GiB + 600 * MiB  # 1.5 GiB consumed: free 100 MiB of 1.6 GiB = 6.1% -> high
    loop = ControlLoop(fake, get_policy("none"), store, fake.clock)
    loop.tick()
    assert (store.latest_host() or {})["state"] == "high"
    fake.total = GiB + 530 * MiB  # free 30 MiB: 1.96% < 2% -> hard (one step: hard, not low)
    loop.tick()
    assert (store.latest_host() or {})["state"] == "hard"
