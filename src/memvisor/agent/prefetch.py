"""Read swapped memory back in bulk: the agent's answer to a guest that wakes up.

Runs inside the guest (stdlib only). When the host releases part of the reservation because
the guest is faulting its memory back from its swap one page at a time, the agent asks the
kernel to read the swapped pages of the guest's processes back at once, into the memory just
released: ``process_madvise(pidfd, ranges, MADV_WILLNEED)`` starts swap-in readahead of every
swapped page in the given ranges and returns; the process does not wait for it, the device
reads in bulk instead of one fault at a time.

Which memory: the mappings with swapped pages (``Swap:`` in ``/proc/PID/smaps``) of every
process but the agent itself (its reservation is what was just given back), largest first,
until ``limit`` bytes of swap are covered.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass

# a release prefetches while the guest pages in at least this fast (pages per second, 1 MiB/s):
# its workload is faulting its memory back, not touching the odd page
SWAPIN_RATE = 256
MADV_WILLNEED = 3
SYS_PROCESS_MADVISE = 440  # x86_64
UIO_MAXIOV = 1024


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


def plan(
    limit: int,
    exclude: set[int],
    read_file: Callable[[str], str] = _read,
    proc: str = "/proc",
) -> dict[int, list[SwappedRange]]:
    """The ranges to prefetch per PID: the largest swapped mappings first, until ``limit``
    bytes of swap are covered. Processes that exit meanwhile are skipped."""
    found: list[tuple[int, SwappedRange]] = []
    for name in os.listdir(proc):
        if not name.isdigit() or int(name) in exclude:
            continue
        try:
            found += [(int(name), r) for r in swapped_ranges(read_file(f"{proc}/{name}/smaps"))]
        except OSError:
            continue
    found.sort(key=lambda pr: -pr[1].swapped)
    chosen: dict[int, list[SwappedRange]] = {}
    covered = 0
    for pid, r in found:
        if covered >= limit:
            break
        chosen.setdefault(pid, []).append(r)
        covered += r.swapped
    return chosen


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


def prefetch(limit: int, exclude: set[int] | None = None) -> int:
    """Start reading back up to about ``limit`` bytes of the guest's swapped memory (whole
    mappings); returns the bytes of swap covered by the advice."""
    covered = 0
    for pid, ranges in plan(limit, (exclude or set()) | {os.getpid()}).items():
        try:
            if willneed(pid, ranges):
                covered += sum(r.swapped for r in ranges)
        except OSError:
            continue  # the process changed under us: the next wake-up tries again
    return covered
