"""Trace replay: a CSV of page accesses, one row per access.

Format (a header line is required, columns in any order)::

    time,vm,page,write
    0.000,web-1,0,1
    0.001,web-1,17,0
    0.5,*,3,0

- ``time``: seconds from the start of the run (>= 0); rows need not be sorted.
- ``vm``: the VM that makes the access, or ``*`` for every VM that replays this file and has
  no rows of its own.
- ``page``: the workload's logical page number (4 KiB pages): ``[0, footprint)`` is anonymous
  memory, ``[footprint, footprint + page_cache)`` the page cache.
- ``write``: ``1`` for a write (gives the page new content), ``0`` for a read.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from memvisor.backends.sim.config import TraceAccesses
from memvisor.errors import InputError

COLUMNS = ("time", "vm", "page", "write")


def empty_trace() -> TraceAccesses:
    return TraceAccesses(
        times=np.zeros(0, dtype=np.float64),
        pages=np.zeros(0, dtype=np.int64),
        writes=np.zeros(0, dtype=np.bool_),
    )


def load_trace(path: str | Path) -> dict[str, TraceAccesses]:
    """Read a trace file into per-VM accesses sorted by time; errors name the line."""
    rows: dict[str, tuple[list[float], list[int], list[bool]]] = {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: header lacks column(s) {', '.join(missing)}")
            for line, row in enumerate(reader, start=2):
                t, vm, page, write = _parse_row(row, path, line)
                times, pages, writes = rows.setdefault(vm, ([], [], []))
                times.append(t)
                pages.append(page)
                writes.append(write)
    except OSError as exc:
        raise InputError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    out = {}
    for vm, (times, pages, writes) in rows.items():
        order = np.argsort(np.asarray(times), kind="stable")
        out[vm] = TraceAccesses(
            times=np.asarray(times, dtype=np.float64)[order],
            pages=np.asarray(pages, dtype=np.int64)[order],
            writes=np.asarray(writes, dtype=np.bool_)[order],
        )
    return out


def _parse_row(row: dict[str, str], path: str | Path, line: int) -> tuple[float, str, int, bool]:
    try:
        t = float(row["time"])
        page = int(row["page"])
        write = row["write"].strip()
    except (TypeError, ValueError, AttributeError):
        raise InputError(f"{path}: line {line}: expected time,vm,page,write, got {row}") from None
    vm = (row["vm"] or "").strip()
    if not t >= 0.0 or t == float("inf"):
        raise InputError(f"{path}: line {line}: time must be a finite number >= 0, got {t}")
    if page < 0:
        raise InputError(f"{path}: line {line}: page must be >= 0, got {page}")
    if write not in ("0", "1"):
        raise InputError(f"{path}: line {line}: write must be 0 or 1, got {write!r}")
    if not vm:
        raise InputError(f"{path}: line {line}: vm is empty")
    return t, vm, page, write == "1"
