"""Read swapped memory back in bulk: the agent's answer to a guest that wakes up.

Runs inside the guest (stdlib only). When the host releases part of the reservation because
the guest is faulting its memory back from its swap one page at a time, the agent asks the
kernel to read the swapped pages of the guest's processes back at once, into the memory just
released: ``process_madvise(pidfd, ranges, MADV_WILLNEED)`` starts swap-in readahead of every
swapped page in the given ranges and returns; the process does not wait for it, the device
reads in bulk instead of one fault at a time.

Paced: the agent asks for at most ``READ_RATE`` bytes per second, a chunk every
``READ_STEP`` seconds, until the release is covered. The host's swap disk is shared by every
VM: a guest that woke up and asked for its whole release at once (hundreds of MiB) filled the
device's queue for seconds, and every other VM's page faults waited behind it (measured on the
simulator: docs/policy.md, "Paced read-back").

Which memory: the mappings with swapped pages (``Swap:`` in ``/proc/PID/smaps``) of every
process but the agent itself (its reservation is what was just given back), largest first;
inside each mapping exactly its swapped pages (``/proc/PID/pagemap``, bit 62), in address
order, until ``limit`` bytes are covered. Advice on a whole mapping would read back all of it:
a release of 24 MiB to a guest whose workload has 300 MiB swapped would pull 300 MiB into a
guest that has room for 24 and make it swap out again what it just read.
"""

from __future__ import annotations

import ctypes
import os
from array import array
from collections.abc import Callable
from dataclasses import dataclass

# a release prefetches while the guest pages in at least this fast (pages per second, 1 MiB/s):
# its workload is faulting its memory back, not touching the odd page
SWAPIN_RATE = 256
# bytes per second the agent asks to read back, in chunks every READ_STEP seconds: an eighth
# of the swap disk measured here (512 MiB/s, bench/results/qemu.md), so that a few guests
# waking together leave most of it to the other VMs' faults
READ_RATE = 64 << 20
READ_STEP = 0.25
MADV_WILLNEED = 3
SYS_PROCESS_MADVISE = 440  # x86_64
UIO_MAXIOV = 1024
PAGE = 4096
PM_SWAPPED = 1 << 62  # /proc/PID/pagemap: the page is in swap


@dataclass(frozen=True)
class SwappedRange:
    start: int
    length: int
    swapped: int  # bytes of the range in swap


def swapped_ranges(smaps: str) -> list[SwappedRange]:
    """The mappings of an ``smaps`` text that have pages in swap."""
    out: list[SwappedRange] = []
    start = end = 0
    for line in smaps.splitlines():
        head = line.split(maxsplit=1)
        if not head:
            continue
        if "-" in head[0] and not head[0].endswith(":"):
            lo, _, hi = head[0].partition("-")
            try:
                start, end = int(lo, 16), int(hi, 16)
            except ValueError:
                start = end = 0
        elif head[0] == "Swap:" and end > start:
            fields = line.split()
            kib = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
            if kib > 0:
                out.append(SwappedRange(start, end - start, kib * 1024))
    return out


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def swapped_mappings(
    exclude: set[int], read_file: Callable[[str], str] = _read, proc: str = "/proc"
) -> list[tuple[int, SwappedRange]]:
    """Every process's mappings with swapped pages, as (pid, mapping), the most swap first.
    Processes that exit meanwhile are skipped."""
    found: list[tuple[int, SwappedRange]] = []
    for name in os.listdir(proc):
        if not name.isdigit() or int(name) in exclude:
            continue
        try:
            found += [(int(name), r) for r in swapped_ranges(read_file(f"{proc}/{name}/smaps"))]
        except OSError:
            continue
    found.sort(key=lambda pr: -pr[1].swapped)
    return found


def _read_pagemap(pid: int, start: int, pages: int) -> bytes:
    with open(f"/proc/{pid}/pagemap", "rb", 0) as f:
        f.seek(start // PAGE * 8)
        return f.read(pages * 8)


def swapped_runs(start: int, pagemap: bytes) -> list[tuple[int, int]]:
    """The runs of swapped pages, as (start, end) addresses, in the ``pagemap`` entries of
    the pages from ``start``."""
    entries = array("Q")
    entries.frombytes(pagemap[: len(pagemap) // 8 * 8])
    runs: list[tuple[int, int]] = []
    first = last = -2
    for i, e in enumerate(entries):
        if not e & PM_SWAPPED:
            continue
        if i != last + 1:
            if first >= 0:
                runs.append((start + first * PAGE, start + (last + 1) * PAGE))
            first = i
        last = i
    if first >= 0:
        runs.append((start + first * PAGE, start + (last + 1) * PAGE))
    return runs


def without(runs: list[tuple[int, int]], taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``runs`` (sorted, disjoint) minus the intervals ``taken``, all as (start, end); linear
    in both after sorting ``taken``."""
    cut = sorted(taken)
    out: list[tuple[int, int]] = []
    j = 0
    for lo, hi in runs:
        while j < len(cut) and cut[j][1] <= lo:
            j += 1
        at, k = lo, j
        while k < len(cut) and cut[k][0] < hi:
            if cut[k][0] > at:
                out.append((at, cut[k][0]))
            at = max(at, cut[k][1])
            k += 1
        if at < hi:
            out.append((at, hi))
    return out


class Prefetcher:
    """Advises the guest's swapped pages, the most swapped mappings first and in address order
    inside each, ``limit`` bytes per call, and remembers for ``ttl`` seconds what it advised:
    a page read into the swap cache keeps its swap entry in the page table until the process
    touches it, so without this memory the next call (a release comes in several requests)
    would advise the same pages again and never reach the rest."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        ttl: float = 30.0,
        read_file: Callable[[str], str] = _read,
        read_pagemap: Callable[[int, int, int], bytes] = _read_pagemap,
        advise: Callable[[int, list[SwappedRange]], int] | None = None,
        proc: str = "/proc",
    ) -> None:
        self.clock, self.ttl, self.proc = clock, ttl, proc
        self.read_file, self.read_pagemap = read_file, read_pagemap
        self.advise = advise or willneed
        self.advised: dict[int, list[tuple[float, int, int]]] = {}  # pid -> (until, start, end)

    def choose(self, limit: int) -> dict[int, list[SwappedRange]]:
        """The not yet advised swapped pages to advise now, per pid, up to ``limit`` bytes."""
        now = self.clock()
        self.advised = {
            pid: kept
            for pid, runs in self.advised.items()
            if (kept := [r for r in runs if r[0] > now])
        }
        out: dict[int, list[SwappedRange]] = {}
        left = limit // PAGE * PAGE
        gone: set[int] = set()
        for pid, m in swapped_mappings({os.getpid()}, self.read_file, self.proc):
            if left <= 0:
                break
            if pid in gone:
                continue
            try:
                raw = self.read_pagemap(pid, m.start, m.length // PAGE)
            except OSError:
                gone.add(pid)  # exited: its other mappings too
                continue
            taken = [(lo, hi) for _, lo, hi in self.advised.get(pid, ())]
            for lo, hi in without(swapped_runs(m.start, raw), taken):
                hi = min(hi, lo + left)
                out.setdefault(pid, []).append(SwappedRange(lo, hi - lo, hi - lo))
                left -= hi - lo
                if left <= 0:
                    break
        return out

    def __call__(self, limit: int) -> int:
        """Start reading back up to ``limit`` bytes of the guest's swapped memory; returns the
        bytes the advice covered."""
        covered = 0
        until = self.clock() + self.ttl
        for pid, ranges in self.choose(limit).items():
            try:
                if not self.advise(pid, ranges):
                    continue
            except OSError:
                continue  # the process changed under us: the next wake-up tries again
            covered += sum(r.length for r in ranges)
            self.advised.setdefault(pid, []).extend(
                (until, r.start, r.start + r.length) for r in ranges
            )
        return covered


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)


def willneed(pid: int, ranges: list[SwappedRange]) -> int:
    """``process_madvise(MADV_WILLNEED)`` over ``ranges`` of process ``pid``; returns the bytes
    the kernel took the advice for (0 if the process is gone)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 0
    done = 0
    try:
        for i in range(0, len(ranges), UIO_MAXIOV):
            part = ranges[i : i + UIO_MAXIOV]
            vec = (_Iovec * len(part))(*[_Iovec(r.start, r.length) for r in part])
            n = _libc.syscall(SYS_PROCESS_MADVISE, pidfd, vec, len(part), MADV_WILLNEED, 0)
            if n < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"process_madvise(pid {pid}): {os.strerror(err)}")
            done += n
    finally:
        os.close(pidfd)
    return done
