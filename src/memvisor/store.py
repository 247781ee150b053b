"""The daemon's record: SQLite in the state directory.

What is kept: one row per control-loop tick (the host observation and the free-memory state),
one row per VM per tick (consumed, shared, swapped, ballooned, entitlement, ...), the
scheduler's decisions with their reasons, the actions applied and what they achieved, VM
lifecycle and daemon events, and introspection hits. Every write is one transaction, the
database runs in WAL mode with ``synchronous=FULL``, so a crash (even ``kill -9`` of the
daemon) loses nothing that was committed. Retention is bounded: :meth:`Store.prune` drops
observations older than ``Retention.observations`` seconds and records older than
``Retention.records``. Monotonic counters (for Prometheus) live in the ``counters`` table so
pruning never makes them go backwards.

Readers (the API, ``memvisor status``) may run in other threads or processes: each thread gets
its own connection, and WAL lets them read while the loop writes. The schema is versioned in
``meta.schema_version``; a database from a newer memvisor is refused rather than misread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from memvisor.errors import InputError
from memvisor.model import Action, ActionResult, Decision, HostObservation, VMObservation, VMSpec

SCHEMA_VERSION = 1
DB_NAME = "memvisor.db"

Row = dict[str, Any]
_OBSERVATION_TABLES = ("vm_obs", "ticks")
_RECORD_TABLES = ("decisions", "actions", "events", "hits")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ticks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, wall REAL NOT NULL, t REAL NOT NULL,
    total INTEGER NOT NULL, free INTEGER NOT NULL, state TEXT,
    ksm_run INTEGER NOT NULL, ksm_pages_shared INTEGER NOT NULL,
    ksm_pages_sharing INTEGER NOT NULL, duration REAL);
CREATE INDEX IF NOT EXISTS ticks_wall ON ticks (wall);
CREATE TABLE IF NOT EXISTS vm_obs (
    tick INTEGER NOT NULL, wall REAL NOT NULL, t REAL NOT NULL, vm TEXT NOT NULL,
    power TEXT NOT NULL, pool TEXT, memory INTEGER NOT NULL, reservation INTEGER,
    limit_bytes INTEGER, shares INTEGER, consumed INTEGER NOT NULL, shared INTEGER NOT NULL,
    swapped INTEGER NOT NULL, ballooned INTEGER NOT NULL, balloon_target INTEGER NOT NULL,
    entitlement INTEGER, active_fraction REAL, guest_free INTEGER, throughput REAL,
    expected_freed_per_page REAL, PRIMARY KEY (tick, vm));
CREATE INDEX IF NOT EXISTS vm_obs_vm_wall ON vm_obs (vm, wall);
CREATE INDEX IF NOT EXISTS vm_obs_wall ON vm_obs (wall);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, tick INTEGER, wall REAL NOT NULL, vm TEXT,
    kind TEXT NOT NULL, action TEXT NOT NULL, reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS decisions_wall ON decisions (wall);
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, decision INTEGER, wall REAL NOT NULL, vm TEXT,
    kind TEXT NOT NULL, action TEXT NOT NULL, ok INTEGER NOT NULL, achieved INTEGER NOT NULL,
    message TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS actions_decision ON actions (decision);
CREATE INDEX IF NOT EXISTS actions_wall ON actions (wall);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, wall REAL NOT NULL, vm TEXT, kind TEXT NOT NULL,
    message TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_wall ON events (wall);
CREATE TABLE IF NOT EXISTS activity (
    vm TEXT PRIMARY KEY, t REAL NOT NULL, wall REAL NOT NULL, fast REAL NOT NULL,
    slow REAL NOT NULL);
CREATE TABLE IF NOT EXISTS hits (
    id INTEGER PRIMARY KEY AUTOINCREMENT, wall REAL NOT NULL, vm TEXT NOT NULL,
    symbol TEXT NOT NULL, address TEXT NOT NULL, vcpu INTEGER, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS hits_wall ON hits (wall);
"""


@dataclass(frozen=True, slots=True)
class Retention:
    """How long records are kept, in seconds of wall time."""

    observations: float = 6 * 3600.0  # per-tick host and VM observations
    records: float = 7 * 86400.0  # decisions, actions, events, hits

    def __post_init__(self) -> None:
        for name in ("observations", "records"):
            if getattr(self, name) <= 0:
                raise InputError(f"retention {name}: must be positive, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class VMExtras:
    """What the loop knows about a VM beyond its observation (from spec and policy)."""

    entitlement: int | None = None


def action_kind(action: Action) -> str:
    return type(action).__name__


def action_vm(action: Action) -> str | None:
    vm = getattr(action, "vm", None)
    return vm if isinstance(vm, str) else None


def action_json(action: Action) -> str:
    return json.dumps({"kind": action_kind(action), **asdict(action)}, sort_keys=True)


class Store:
    """SQLite record of one memvisor host. Create with :meth:`open`."""

    def __init__(self, path: Path, *, wall: Callable[[], float] = time.time) -> None:
        self.path = path
        self._wall = wall
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._migrate()

    @classmethod
    def open(cls, state_dir: Path, *, wall: Callable[[], float] = time.time) -> Store:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(state_dir / DB_NAME, wall=wall)

    def wall(self) -> float:
        """The wall clock this store stamps its rows with."""
        return self._wall()

    # --- connections and transactions ----------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back whole on any error."""
        with self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _migrate(self) -> None:
        with self._txn() as c:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise InputError(
                    f"{self.path}: schema version {row[0]} is newer than this memvisor "
                    f"understands ({SCHEMA_VERSION}); upgrade memvisor or use another --state"
                )

    def schema_version(self) -> int:
        row = self._conn().execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0])

    # --- writes --------------------------------------------------------------------------

    def record_tick(
        self,
        host: HostObservation,
        state: str | None,
        specs: Sequence[VMSpec],
        vms: Sequence[VMObservation],
        decisions: Sequence[Decision],
        extras: dict[str, VMExtras] | None = None,
        activity: Mapping[str, tuple[float, float, float]] | None = None,
    ) -> tuple[int, list[int]]:
        """Record one tick's observations and decisions, and the policy's activity averages
        (vm -> (time, fast, slow), replacing all saved before; None keeps them) in the same
        transaction; returns the tick id and decision ids."""
        wall = self._wall()
        by_name = {s.name: s for s in specs}
        extras = extras or {}
        with self._txn() as c:
            cur = c.execute(
                "INSERT INTO ticks (wall, t, total, free, state, ksm_run, ksm_pages_shared,"
                " ksm_pages_sharing) VALUES (?,?,?,?,?,?,?,?)",
                (wall, host.time, host.total, host.free, state, host.ksm.run,
                 host.ksm.pages_shared, host.ksm.pages_sharing),
            )  # fmt: skip
            tick = int(cur.lastrowid or 0)
            c.executemany(
                "INSERT INTO vm_obs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [_vm_row(tick, wall, v, by_name.get(v.name), extras.get(v.name)) for v in vms],
            )
            ids = [self._insert_decision(c, tick, wall, d) for d in decisions]
            if activity is not None:  # the policy's whole current history replaces the last
                c.execute("DELETE FROM activity")
                c.executemany(
                    "INSERT OR REPLACE INTO activity VALUES (?,?,?,?,?)",
                    [(vm, t, wall, fast, slow) for vm, (t, fast, slow) in activity.items()],
                )
            _bump(c, "ticks", 1)
            _bump(c, "decisions", len(decisions))
        return tick, ids

    @staticmethod
    def _insert_decision(c: sqlite3.Connection, tick: int, wall: float, d: Decision) -> int:
        cur = c.execute(
            "INSERT INTO decisions (tick, wall, vm, kind, action, reason) VALUES (?,?,?,?,?,?)",
            (tick, wall, action_vm(d.action), action_kind(d.action), action_json(d.action),
             d.reason),
        )  # fmt: skip
        return int(cur.lastrowid or 0)

    def record_tick_duration(self, tick: int, seconds: float) -> None:
        with self._txn() as c:
            c.execute("UPDATE ticks SET duration = ? WHERE id = ?", (seconds, tick))

    def record_actions(self, results: Sequence[tuple[int | None, ActionResult]]) -> None:
        """Record applied actions and their outcomes, each with the id of its decision."""
        if not results:
            return
        wall = self._wall()
        rows = [
            (dec, wall, action_vm(r.action), action_kind(r.action), action_json(r.action),
             int(r.ok), r.achieved, r.message)
            for dec, r in results
        ]  # fmt: skip
        failed = sum(1 for _, r in results if not r.ok)
        with self._txn() as c:
            c.executemany(
                "INSERT INTO actions (decision, wall, vm, kind, action, ok, achieved, message)"
                " VALUES (?,?,?,?,?,?,?,?)",
                rows,
            )
            _bump(c, "actions_ok", len(results) - failed)
            _bump(c, "actions_failed", failed)

    def record_event(self, kind: str, message: str, vm: str | None = None) -> int:
        """A VM lifecycle or daemon event (``kind`` such as ``vm.started``, ``daemon.error``)."""
        with self._txn() as c:
            cur = c.execute(
                "INSERT INTO events (wall, vm, kind, message) VALUES (?,?,?,?)",
                (self._wall(), vm, kind, message),
            )
            _bump(c, "events", 1)
            return int(cur.lastrowid or 0)

    def record_hit(
        self,
        vm: str,
        symbol: str,
        address: int,
        vcpu: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> int:
        """An introspection hit (C5): the monitored code, where, and registers/arguments.

        Addresses are kept as hex text: kernel addresses do not fit SQLite's signed 64 bits.
        """
        with self._txn() as c:
            cur = c.execute(
                "INSERT INTO hits (wall, vm, symbol, address, vcpu, detail) VALUES (?,?,?,?,?,?)",
                (self._wall(), vm, symbol, f"{address:#x}", vcpu, json.dumps(detail or {})),
            )
            _bump(c, "hits", 1)
            return int(cur.lastrowid or 0)

    def set_meta(self, key: str, value: str) -> None:
        with self._txn() as c:
            c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def prune(self, retention: Retention) -> int:
        """Drop what is older than the retention; returns the number of rows deleted."""
        now = self._wall()
        obs_cut, rec_cut = now - retention.observations, now - retention.records
        deleted = 0
        with self._txn() as c:
            for table in _OBSERVATION_TABLES + _RECORD_TABLES:
                cut = obs_cut if table in _OBSERVATION_TABLES else rec_cut
                deleted += c.execute(f"DELETE FROM {table} WHERE wall < ?", (cut,)).rowcount
        return deleted

    # --- reads ---------------------------------------------------------------------------

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [dict(r) for r in self._conn().execute(sql, params).fetchall()]

    def counters(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT name, value FROM counters").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def activity(self) -> dict[str, tuple[float, float, float, float]]:
        """The activity averages saved with the last tick: vm -> (time on the backend's clock,
        wall time, fast, slow)."""
        rows = self._conn().execute("SELECT vm, t, wall, fast, slow FROM activity").fetchall()
        return {str(r[0]): (float(r[1]), float(r[2]), float(r[3]), float(r[4])) for r in rows}

    def latest_host(self) -> Row | None:
        rows = self._rows("SELECT * FROM ticks ORDER BY id DESC LIMIT 1")
        return rows[0] if rows else None

    def host_history(self, since_wall: float, max_points: int = 600) -> list[Row]:
        """Host rows since ``since_wall``, thinned evenly to at most ``max_points``."""
        rows = self._rows("SELECT * FROM ticks WHERE wall >= ? ORDER BY id", (since_wall,))
        return _thin(rows, max_points)

    def latest_vms(self) -> list[Row]:
        """Each VM's most recent observation (VMs gone from the latest tick are left out)."""
        return self._rows(
            "SELECT * FROM vm_obs WHERE tick = (SELECT MAX(tick) FROM vm_obs) ORDER BY vm"
        )

    def vm_history(self, vm: str, since_wall: float, max_points: int = 600) -> list[Row]:
        rows = self._rows(
            "SELECT * FROM vm_obs WHERE vm = ? AND wall >= ? ORDER BY tick", (vm, since_wall)
        )
        return _thin(rows, max_points)

    def decisions(self, limit: int = 50, vm: str | None = None) -> list[Row]:
        """Latest decisions, newest first, each with its action's outcome (or None)."""
        where, params = ("WHERE d.vm = ?", [vm]) if vm else ("", [])
        rows = self._rows(
            "SELECT d.id, d.tick, d.wall, d.vm, d.kind, d.action, d.reason, a.ok, a.achieved,"
            f" a.message FROM decisions d LEFT JOIN actions a ON a.decision = d.id {where}"
            " ORDER BY d.id DESC LIMIT ?",
            [*params, limit],
        )
        for r in rows:
            r["action"] = json.loads(r["action"])
            r["ok"] = None if r["ok"] is None else bool(r["ok"])
        return rows

    def actions(self, limit: int = 50) -> list[Row]:
        rows = self._rows("SELECT * FROM actions ORDER BY id DESC LIMIT ?", (limit,))
        for r in rows:
            r["action"] = json.loads(r["action"])
            r["ok"] = bool(r["ok"])
        return rows

    def events(self, after_id: int = 0, limit: int = 100, vm: str | None = None) -> list[Row]:
        """Events with id > ``after_id``, oldest first (what ``events --follow`` polls)."""
        where, params = ("AND vm = ?", [vm]) if vm else ("", [])
        return self._rows(
            f"SELECT * FROM events WHERE id > ? {where} ORDER BY id LIMIT ?",
            [after_id, *params, limit],
        )

    def recent_events(self, limit: int = 20, vm: str | None = None) -> list[Row]:
        """The latest ``limit`` events, oldest first."""
        where, params = ("WHERE vm = ?", [vm]) if vm else ("", [])
        rows = self._rows(
            f"SELECT * FROM events {where} ORDER BY id DESC LIMIT ?", [*params, limit]
        )
        return rows[::-1]

    def hits(self, limit: int = 50, vm: str | None = None) -> list[Row]:
        where, params = ("WHERE vm = ?", [vm]) if vm else ("", [])
        rows = self._rows(f"SELECT * FROM hits {where} ORDER BY id DESC LIMIT ?", [*params, limit])
        for r in rows:
            r["detail"] = json.loads(r["detail"])
        return rows

    def hit_counts(self) -> dict[tuple[str, str], int]:
        rows = self._conn().execute("SELECT vm, symbol, COUNT(*) FROM hits GROUP BY vm, symbol")
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}


def _bump(c: sqlite3.Connection, name: str, by: int) -> None:
    if by:
        c.execute(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
            (name, by, by),
        )


def _vm_row(
    tick: int, wall: float, v: VMObservation, spec: VMSpec | None, extra: VMExtras | None
) -> tuple[Any, ...]:
    sharing = v.sharing.expected_freed_per_page if v.sharing is not None else None
    return (
        tick, wall, v.time, v.name, str(v.power),
        spec.pool if spec else None, v.memory, spec.reservation if spec else None,
        spec.effective_limit if spec else None, spec.effective_shares if spec else None,
        v.consumed, v.shared, v.swapped, v.ballooned, v.balloon_target,
        extra.entitlement if extra else None, v.active_fraction, v.guest_free, v.throughput,
        sharing,
    )  # fmt: skip


def _thin(rows: list[Row], max_points: int) -> list[Row]:
    if max_points <= 0 or len(rows) <= max_points:
        return rows
    step = len(rows) / max_points
    picked = [rows[int(i * step)] for i in range(max_points)]
    picked[-1] = rows[-1]  # always end at the newest point
    return picked
