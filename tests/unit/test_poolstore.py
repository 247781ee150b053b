"""SQLite persistence of the pool tree: round trips, rollbacks, and real processes racing for
the last bytes or being killed with SIGKILL in the middle of a transaction."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memvisor.errors import AdmissionError, InputError
from memvisor.pools import PoolTree
from memvisor.poolstore import DB_NAME, PoolStore

MiB = 2**20
GiB = 2**30


def small_tree() -> PoolTree:
    t = PoolTree(4 * GiB)
    t.add_pool("prod", reservation=GiB, expandable=False)
    t.add_pool("dev", reservation=0, limit=2 * GiB, shares=123)
    t.add_vm("web1", pool="prod", memory=GiB, reservation=512 * MiB)
    t.add_vm("t1", pool="dev", memory=2 * GiB, reservation=GiB, shares="high")
    t.power_on("t1")
    return t


def fresh_canonical(state: Path) -> bytes:
    """The tree as a brand-new connection loads it from disk."""
    with PoolStore.in_state_dir(state) as store, store.read() as tree:
        return tree.canonical()


def test_round_trip_and_row_level_updates(tmp_path: Path) -> None:
    t = small_tree()
    with PoolStore.in_state_dir(tmp_path) as store:
        store.initialize(t)
        assert fresh_canonical(tmp_path) == t.canonical()
        with store.write() as tree:
            tree.power_on("web1")
            tree.update_pool("prod", expandable=True)
            tree.update_pool("dev", parent="prod", expandable=False, reservation=GiB)
            tree.set_capacity(8 * GiB)
        t.power_on("web1")
        t.update_pool("prod", expandable=True)
        t.update_pool("dev", parent="prod", expandable=False, reservation=GiB)
        t.set_capacity(8 * GiB)
        assert fresh_canonical(tmp_path) == t.canonical()
        with store.write() as tree:
            tree.power_off("web1")
            tree.remove_vm("web1")
            tree.add_pool("web1")  # a name that changes kind inside one transaction
    with PoolStore.in_state_dir(tmp_path) as other, other.read() as tree:
        assert tree.kind("web1") == "pool"


def test_refused_operation_writes_nothing_and_keeps_the_cache(tmp_path: Path) -> None:
    with PoolStore.in_state_dir(tmp_path) as store:
        store.initialize(small_tree())
        before = fresh_canonical(tmp_path)
        with pytest.raises(AdmissionError, match="pool prod \\(fixed\\)"), store.write() as tree:
            tree.set_reservation("web1", GiB)
            tree.power_on("web1")
            tree.add_vm("big", pool="prod", memory=GiB, reservation=GiB)
            tree.power_on("big")  # refused: the whole transaction is rolled back
        assert fresh_canonical(tmp_path) == before
        with store.read() as tree:  # the cache was dropped, the reload matches the disk
            assert tree.canonical() == before and "big" not in tree
        cached = store._tree
        with pytest.raises(AdmissionError), store.write() as tree:
            tree.add_pool("huge", reservation=8 * GiB)
        assert store._tree is cached  # an untouched tree survives a refusal


def test_other_connections_see_commits(tmp_path: Path) -> None:
    a = PoolStore.in_state_dir(tmp_path)
    b = PoolStore.in_state_dir(tmp_path)
    a.initialize(small_tree())
    with b.read() as tree:
        assert not tree.vm("web1").powered_on
    with a.write() as tree:
        tree.power_on("web1")
    with b.write() as tree:  # b's cached tree is stale: the generation tells it to reload
        assert tree.vm("web1").powered_on
        tree.power_off("web1")
    with a.read() as tree:
        assert not tree.vm("web1").powered_on


def test_uninitialized_and_double_init(tmp_path: Path) -> None:
    store = PoolStore.in_state_dir(tmp_path)
    with pytest.raises(InputError, match="host init"), store.read():
        pass
    store.initialize(PoolTree(GiB))
    with pytest.raises(InputError, match="already initialized"):
        store.initialize(PoolTree(2 * GiB))
    store.initialize(PoolTree(2 * GiB), replace=True)
    with store.read() as tree:
        assert tree.capacity == 2 * GiB


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    PoolStore.in_state_dir(tmp_path).close()
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema'")
    with pytest.raises(InputError, match="schema version 99"):
        PoolStore.in_state_dir(tmp_path)


RACER = r"""
import os, sys, time
from pathlib import Path
from memvisor.errors import AdmissionError
from memvisor.poolstore import PoolStore
state, vm, go = sys.argv[1:4]
# hold the write lock a while, so the racers really overlap
store = PoolStore.in_state_dir(Path(state), before_commit=lambda: time.sleep(0.05))
with store.read():  # every racer starts from the same (soon stale) cached tree
    pass
while not os.path.exists(go):
    time.sleep(0.001)
try:
    with store.write() as tree:
        tree.power_on(vm)
    print("won")
except AdmissionError as exc:
    print("refused", exc)
"""


@pytest.mark.timeout(120)
def test_processes_racing_for_the_last_bytes(tmp_path: Path) -> None:
    t = PoolTree(GiB)
    t.add_pool("pool", reservation=0)
    for i in range(8):  # each wants 384 MiB: exactly two fit in 1 GiB
        t.add_vm(f"vm{i}", pool="pool", memory=GiB, reservation=384 * MiB)
    PoolStore.in_state_dir(tmp_path).initialize(t)
    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp_path), f"vm{i}", str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    time.sleep(1.0)  # let them import and load
    go.touch()
    outputs = [r.communicate(timeout=100)[0] for r in racers]
    assert all(r.returncode == 0 for r in racers), outputs
    assert sum(o.startswith("won") for o in outputs) == 2, outputs
    assert sum(o.startswith("refused") for o in outputs) == 6, outputs
    with PoolStore.in_state_dir(tmp_path).read() as tree:
        assert tree.verify() == []
        assert sum(v.powered_on for v in tree.vms()) == 2
        assert tree.unreserved("root") == 256 * MiB


KILLED_MID_COMMIT = r"""
import sys, time
from pathlib import Path
from memvisor.poolstore import PoolStore
state, marker = Path(sys.argv[1]), Path(sys.argv[2])
def stall():
    marker.touch()
    time.sleep(60)
store = PoolStore.in_state_dir(state, before_commit=stall)
with store.write() as tree:
    for i in range(200):
        tree.add_vm(f"n{i}", memory=64 * 2**20, reservation=2**20)
        tree.power_on(f"n{i}")
    tree.remove_vm("web1")
    tree.set_capacity(8 * 2**30)
"""


@pytest.mark.timeout(60)
def test_sigkill_before_commit_leaves_nothing(tmp_path: Path) -> None:
    PoolStore.in_state_dir(tmp_path).initialize(small_tree())
    before = fresh_canonical(tmp_path)
    marker = tmp_path / "written"
    child = subprocess.Popen([sys.executable, "-c", KILLED_MID_COMMIT, str(tmp_path), str(marker)])
    deadline = time.monotonic() + 30
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.exists(), "the child never reached its commit"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert fresh_canonical(tmp_path) == before
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


# One deterministic sequence of multi-object transactions, run by a child that gets killed
# at random moments and replayed in memory by the test.
SEQUENCE = r"""
from memvisor.errors import AdmissionError
def initial():
    from memvisor.pools import PoolTree
    t = PoolTree(2 * 2**30)
    for p in range(4):
        t.add_pool(f"p{p}", reservation=(p % 2) * 2**28, expandable=p != 3)
    return t
def step(tree, i):
    name = f"v{i}"
    tree.add_vm(name, pool=f"p{i % 4}", memory=64 * 2**20, reservation=(i * 7 % 5) * 2**22)
    tree.power_on(name)  # may be refused: then nothing of this step is kept
    old = f"v{i - 5}"
    if old in tree and tree.vm(old).powered_on:
        tree.power_off(old)
        tree.update_vm(old, pool=f"p{(i + 1) % 4}")
"""

KILLED_AT_RANDOM = (
    SEQUENCE
    + r"""
import sys
from pathlib import Path
from memvisor.poolstore import PoolStore
store = PoolStore.in_state_dir(Path(sys.argv[1]))
for i in range(100000):
    try:
        with store.write() as tree:
            step(tree, i)
    except AdmissionError:
        pass
"""
)


def replay_until(target: bytes, limit: int) -> int:
    """How many steps of SEQUENCE produce ``target``; -1 if no prefix up to ``limit`` does.
    A step refused halfway is rolled back as a whole, as the store's transaction is.

    Step i adds VM ``v{i}`` and nothing removes VMs, so a prefix that yields ``target`` has at
    least ``k + 1`` steps, k the highest VM index in it: serializing only from there keeps the
    replay linear however many steps the killed writer managed (a quiet machine does thousands
    per second)."""
    names = json.loads(target)["vms"]
    first = max((int(n[1:]) + 1 for n in names), default=0)
    env: dict[str, object] = {}
    exec(SEQUENCE, env)
    tree = env["initial"]()  # type: ignore[operator]
    for i in range(limit + 1):
        snapshot = tree.canonical() if i >= first else None
        if snapshot == target:
            return i
        try:
            env["step"](tree, i)  # type: ignore[operator]
        except AdmissionError:
            # Only power_on refuses, right after add_vm: undo the add (or restore exactly).
            tree = _rebuild(snapshot) if snapshot is not None else _without(tree, f"v{i}")
    return -1


def _without(tree: PoolTree, vm: str) -> PoolTree:
    tree.remove_vm(vm)
    return tree


def _rebuild(snapshot: bytes) -> PoolTree:
    """A tree equal to a canonical serialization."""
    data = json.loads(snapshot)
    pools = [
        {"name": n, "parent": r[0], "reservation": r[1], "limit": r[2], "shares": r[3],
         "expandable": r[4]}
        for n, r in data["pools"].items() if n != "root"
    ]  # fmt: skip
    vms = [
        {"name": n, "pool": r[0], "memory": r[1], "reservation": r[2], "limit": r[3],
         "shares": r[4], "powered_on": r[5]}
        for n, r in data["vms"].items()
    ]  # fmt: skip
    return PoolTree.from_records(data["pools"]["root"][1], pools, vms)


@pytest.mark.timeout(180)
def test_sigkill_at_random_moments_keeps_whole_transactions(tmp_path: Path) -> None:
    env: dict[str, object] = {}
    exec(SEQUENCE, env)
    rng = random.Random(1234)
    for round_no in range(6):
        state = tmp_path / f"round{round_no}"
        state.mkdir()
        PoolStore.in_state_dir(state).initialize(env["initial"]())  # type: ignore[operator]
        child = subprocess.Popen([sys.executable, "-c", KILLED_AT_RANDOM, str(state)])
        time.sleep(rng.uniform(0.6, 2.0))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        with PoolStore.in_state_dir(state) as store, store.read() as tree:
            assert tree.verify() == []
            on_disk = tree.canonical()
        steps = replay_until(on_disk, 100000)  # the writer's own bound
        assert steps >= 0, f"round {round_no}: the state on disk is no prefix of the sequence"
        print(f"round {round_no}: killed after {steps} whole steps")
        with sqlite3.connect(state / DB_NAME) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
