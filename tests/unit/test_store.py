"""The SQLite store: round trips, retention, counters, schema version, crash durability."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from memvisor.errors import InputError
from memvisor.model import (
    ActionResult,
    Decision,
    HostObservation,
    KsmStats,
    PowerState,
    SetBalloon,
    SetSwapTarget,
    VMObservation,
    VMSpec,
)
from memvisor.store import SCHEMA_VERSION, Retention, Store, VMExtras
from memvisor.units import GiB, MiB


class Wall:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def host(t: float = 0.0, free: int = GiB) -> HostObservation:
    return HostObservation(time=t, total=4 * GiB, free=free, ksm=KsmStats(run=1, pages_sharing=7))


def vm(name: str, consumed: int = 300 * MiB) -> VMObservation:
    return VMObservation(
        name=name, time=0.0, power=PowerState.ON, memory=512 * MiB, consumed=consumed,
        shared=10 * MiB, swapped=5 * MiB, ballooned=20 * MiB, balloon_target=20 * MiB,
        active_fraction=0.5,
    )  # fmt: skip


SPECS = [VMSpec("a", 512 * MiB, reservation=128 * MiB, pool="prod"), VMSpec("b", 512 * MiB)]


@pytest.fixture
def wall() -> Wall:
    return Wall()


@pytest.fixture
def store(tmp_path: Path, wall: Wall) -> Store:
    return Store.open(tmp_path / "state", wall=wall)


def test_tick_round_trip(store: Store) -> None:
    d1 = Decision(SetBalloon("a", 64 * MiB), "a: host soft, above entitlement")
    d2 = Decision(SetSwapTarget("b", 256 * MiB), "b: host hard")
    tick, ids = store.record_tick(
        host(free=2 * GiB), "soft", SPECS, [vm("a"), vm("b", 100 * MiB)], [d1, d2],
        {"a": VMExtras(entitlement=400 * MiB)},
    )  # fmt: skip
    store.record_actions([(ids[0], ActionResult(d1.action, ok=True, achieved=60 * MiB))])
    h = store.latest_host()
    assert h is not None and h["id"] == tick and h["free"] == 2 * GiB and h["state"] == "soft"
    assert h["ksm_pages_sharing"] == 7
    rows = {r["vm"]: r for r in store.latest_vms()}
    assert rows["a"]["consumed"] == 300 * MiB and rows["b"]["consumed"] == 100 * MiB
    assert rows["a"]["reservation"] == 128 * MiB and rows["a"]["pool"] == "prod"
    assert rows["a"]["entitlement"] == 400 * MiB and rows["b"]["entitlement"] is None
    assert rows["a"]["shares"] == 5120  # normal shares: 10 x configured MiB
    dec = store.decisions()
    assert [d["kind"] for d in dec] == ["SetSwapTarget", "SetBalloon"]  # newest first
    assert dec[1]["reason"] == d1.reason and dec[1]["ok"] is True
    assert dec[1]["achieved"] == 60 * MiB and dec[1]["action"]["target"] == 64 * MiB
    assert dec[0]["ok"] is None  # not applied (yet)
    assert store.counters() == {"ticks": 1, "decisions": 2, "actions_ok": 1}


def test_latest_vms_is_the_latest_tick_only(store: Store) -> None:
    store.record_tick(host(), None, SPECS, [vm("a"), vm("b")], [])
    store.record_tick(host(), None, SPECS, [vm("a", 42)], [])
    assert [(r["vm"], r["consumed"]) for r in store.latest_vms()] == [("a", 42)]


def test_events_after_id_and_hits(store: Store) -> None:
    first = store.record_event("vm.started", "a: started", vm="a")
    store.record_event("daemon.stopped", "stopped")
    assert [e["kind"] for e in store.events(after_id=first)] == ["daemon.stopped"]
    assert [e["message"] for e in store.events(vm="a")] == ["a: started"]
    store.record_hit("a", "__x64_sys_getpid", 0xFFFFFFFF81000000, 0, {"rdi": 1})
    (hit,) = store.hits()
    assert hit["symbol"] == "__x64_sys_getpid" and hit["detail"] == {"rdi": 1}
    assert hit["address"] == "0xffffffff81000000"
    assert store.hit_counts() == {("a", "__x64_sys_getpid"): 1}


def test_history_is_thinned_but_keeps_newest(store: Store, wall: Wall) -> None:
    for i in range(50):
        wall.t += 1
        store.record_tick(host(t=i, free=i), None, SPECS, [vm("a", i)], [])
    rows = store.host_history(since_wall=0, max_points=10)
    assert len(rows) == 10 and rows[-1]["free"] == 49 and rows[0]["free"] == 0
    assert len(store.vm_history("a", since_wall=wall.t - 4.5)) == 5


def test_retention_prunes_old_rows_but_not_counters(store: Store, wall: Wall) -> None:
    store.record_tick(host(), None, SPECS, [vm("a")], [Decision(SetBalloon("a", 1), "r")])
    store.record_event("x", "old")
    wall.t += 100
    store.record_tick(host(), None, SPECS, [vm("a")], [])
    deleted = store.prune(Retention(observations=50, records=1000))
    assert deleted == 2  # the old tick and its VM row; decisions/events are within 1000 s
    assert len(store.host_history(0)) == 1 and len(store.decisions()) == 1
    wall.t += 2000
    store.prune(Retention(observations=50, records=1000))
    assert store.decisions() == [] and store.events() == [] and store.latest_host() is None
    assert store.counters()["ticks"] == 2 and store.counters()["decisions"] == 1


def test_retention_must_be_positive() -> None:
    with pytest.raises(InputError, match="observations"):
        Retention(observations=0)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    s = Store.open(tmp_path)
    assert s.schema_version() == SCHEMA_VERSION
    s.set_meta("schema_version", str(SCHEMA_VERSION + 1))
    with pytest.raises(InputError, match="newer than this memvisor"):
        Store.open(tmp_path)


def test_failed_write_changes_nothing(store: Store) -> None:
    bad = VMObservation(name="a", time=0, power=PowerState.ON, memory=1, consumed=None)  # type: ignore[arg-type]
    with pytest.raises(sqlite3.IntegrityError):
        store.record_tick(host(), None, SPECS, [vm("b"), bad], [])
    assert store.latest_host() is None and store.latest_vms() == [] and store.counters() == {}


def test_wal_mode_and_readers_in_other_threads(store: Store) -> None:
    mode = store._conn().execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    seen: list[int] = []
    store.record_tick(host(), None, SPECS, [vm("a")], [])

    def reader() -> None:
        seen.append(len(store.latest_vms()))

    t = threading.Thread(target=reader)
    t.start()
    t.join()
    assert seen == [1]


def test_kill_9_loses_nothing_committed(tmp_path: Path) -> None:
    """A writer process is SIGKILLed right after its commits: everything committed is there."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from memvisor.store import Store
        from test_store import SPECS, host, vm
        s = Store.open(Path({str(tmp_path)!r}))
        for i in range(25):
            s.record_tick(host(t=i), None, SPECS, [vm("a", i)], [])
            s.record_event("n", str(i))
        print("committed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9 and "committed" in proc.stdout, proc.stderr
    s = Store.open(tmp_path)
    assert s.counters()["ticks"] == 25 and len(s.events(limit=100)) == 25
    assert [r["consumed"] for r in s.latest_vms()] == [24]
