"""The pool tree in SQLite, in the state directory (``pools.sqlite``).

Every operation is one SQLite transaction started with ``BEGIN IMMEDIATE``: it takes the
database's write lock *before* reading the tree, so two processes racing for the last bytes
are serialized and the second one sees what the first committed (exactly one wins). The
operation runs on the in-memory :class:`~memvisor.pools.PoolTree` (atomic itself), then only
the rows of the objects it changed are written, and a generation counter is bumped, all before
``COMMIT``. A process killed at any point leaves either the whole change or none of it (WAL
journal, ``synchronous=FULL``).

A store keeps the tree it last loaded and reloads only when another process has committed
since (the generation differs), so an operation costs O(depth) plus a few row writes.

    store = PoolStore.in_state_dir(state_dir)
    with store.write() as tree:      # one transaction; refused -> rolled back, nothing written
        tree.power_on("web1")
    with store.read() as tree:
        print(tree.unreserved("prod"))
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memvisor.errors import InputError
from memvisor.pools import ROOT, PoolTree

DB_NAME = "pools.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS host (id INTEGER PRIMARY KEY CHECK (id = 1), capacity INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pools (
    name TEXT PRIMARY KEY, parent TEXT NOT NULL, reservation INTEGER NOT NULL,
    "limit" INTEGER, shares NOT NULL, expandable INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY, pool TEXT NOT NULL, memory INTEGER NOT NULL,
    reservation INTEGER NOT NULL, "limit" INTEGER, shares NOT NULL, powered_on INTEGER NOT NULL);
"""
_POOL_COLS = ("name", "parent", "reservation", "limit", "shares", "expandable")
_VM_COLS = ("name", "pool", "memory", "reservation", "limit", "shares", "powered_on")


def _upsert(table: str, cols: tuple[str, ...]) -> str:
    names = ", ".join(f'"{c}"' for c in cols)
    return f"INSERT OR REPLACE INTO {table} ({names}) VALUES ({', '.join('?' * len(cols))})"


class PoolStore:
    """One connection to the pool database. ``before_commit`` is called inside every write
    transaction just before ``COMMIT`` (crash and race tests use it to widen the window)."""

    def __init__(
        self,
        path: Path,
        *,
        timeout: float = 60.0,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.before_commit = before_commit
        self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._tree: PoolTree | None = None
        self._generation: int | None = None
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            self._check_schema_version()

    @classmethod
    def in_state_dir(cls, state_dir: Path, **kwargs: Any) -> PoolStore:
        return cls(Path(state_dir) / DB_NAME, **kwargs)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> PoolStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def initialized(self) -> bool:
        return self._conn.execute("SELECT 1 FROM host").fetchone() is not None

    def initialize(self, tree: PoolTree, *, replace: bool = False) -> None:
        """Store a whole tree (``host init``), in one transaction."""
        with self._transaction():
            if self.initialized() and not replace:
                raise InputError(
                    f"{self.path}: a host is already initialized here (use --force to replace it)"
                )
            for table in ("host", "pools", "vms"):
                self._conn.execute(f"DELETE FROM {table}")
            self._conn.execute("INSERT INTO host (id, capacity) VALUES (1, ?)", (tree.capacity,))
            pools = [tree.pool_record(p.name) for p in tree.pools() if p.name != ROOT]
            self._conn.executemany(
                _upsert("pools", _POOL_COLS), [_row(r, _POOL_COLS) for r in pools]
            )
            vms = [tree.vm_record(v.name) for v in tree.vms()]
            self._conn.executemany(_upsert("vms", _VM_COLS), [_row(r, _VM_COLS) for r in vms])
            self._finish_write()
        self._tree, self._generation = None, None

    @contextmanager
    def write(self) -> Iterator[PoolTree]:
        """One write transaction around operations on the tree. On any exception nothing is
        written; the cached tree is dropped unless the failed block left it untouched (a
        refused operation does)."""
        tree: PoolTree | None = None
        writing = committed = False
        try:
            with self._transaction():
                tree = self._sync()
                tree.drain_changes()
                yield tree
                writing = True
                self._write_changes(tree, tree.drain_changes())
                self._finish_write()
            committed = True
        finally:
            if not committed and (tree is None or writing or tree.drain_changes()):
                self._tree, self._generation = None, None

    @contextmanager
    def read(self) -> Iterator[PoolTree]:
        """A consistent view of the tree; do not change it (use :meth:`write`)."""
        with self._transaction(immediate=False):
            tree = self._sync()
            yield tree
            if tree.drain_changes():
                self._tree, self._generation = None, None

    # ----- internals ---------------------------------------------------------------------

    @contextmanager
    def _transaction(self, *, immediate: bool = True) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _check_schema_version(self) -> None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            self._conn.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            self._conn.execute("INSERT INTO meta VALUES ('generation', 0)")
        elif row[0] != SCHEMA_VERSION:
            raise InputError(
                f"{self.path}: schema version {row[0]}, this memvisor reads {SCHEMA_VERSION}"
            )

    def _generation_now(self) -> int:
        return int(
            self._conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0]
        )

    def _sync(self) -> PoolTree:
        generation = self._generation_now()
        if self._tree is None or generation != self._generation:
            self._tree, self._generation = self._load(), generation
        return self._tree

    def _load(self) -> PoolTree:
        host = self._conn.execute("SELECT capacity FROM host").fetchone()
        if host is None:
            raise InputError(
                f"no host in {self.path.parent}: run `memvisor host init --capacity SIZE` first"
            )
        pools = [
            self._record(r, _POOL_COLS) for r in self._conn.execute(_select("pools", _POOL_COLS))
        ]
        vms = [self._record(r, _VM_COLS) for r in self._conn.execute(_select("vms", _VM_COLS))]
        for p in pools:
            p["expandable"] = bool(p["expandable"])
        for v in vms:
            v["powered_on"] = bool(v["powered_on"])
        return PoolTree.from_records(int(host[0]), pools, vms)

    @staticmethod
    def _record(row: tuple[Any, ...], cols: tuple[str, ...]) -> dict[str, Any]:
        return dict(zip(cols, row, strict=True))

    def _write_changes(self, tree: PoolTree, names: set[str]) -> None:
        for name in sorted(names):
            if name == ROOT:
                self._conn.execute("UPDATE host SET capacity = ?", (tree.capacity,))
                continue
            self._conn.execute("DELETE FROM pools WHERE name = ?", (name,))
            self._conn.execute("DELETE FROM vms WHERE name = ?", (name,))
            if name not in tree:
                continue
            if tree.kind(name) == "pool":
                self._conn.execute(
                    _upsert("pools", _POOL_COLS), _row(tree.pool_record(name), _POOL_COLS)
                )
            else:
                self._conn.execute(_upsert("vms", _VM_COLS), _row(tree.vm_record(name), _VM_COLS))

    def _finish_write(self) -> None:
        self._conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        if self.before_commit is not None:
            self.before_commit()
        self._generation = self._generation_now()


def _select(table: str, cols: tuple[str, ...]) -> str:
    names = ", ".join(f'"{c}"' for c in cols)
    return f"SELECT {names} FROM {table}"


def _row(record: dict[str, object], cols: tuple[str, ...]) -> tuple[object, ...]:
    return tuple(record[c] for c in cols)
