"""Swap chosen guest pages of a file-backed VM out to the VM's own file (C4).

The sequence that really frees host memory (measured, see FACTS.md):

1. write back: ``sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)`` on each range, so the
   pages are clean and their data is in the VM's file;
2. unmap from QEMU: ``process_madvise(pidfd, iovecs, MADV_PAGEOUT)`` over the same ranges of
   QEMU's mapping (at most 1024 iovecs per call); alone, this frees nothing;
3. drop the clean page cache: ``posix_fadvise(DONTNEED)`` on each range.

Page cache on this host uses 2 MiB folios, and a partial folio is neither dropped nor freed,
so ranges are widened to 2 MiB-aligned chunks. A page the guest dirties between steps 1 and 3
stays resident (DONTNEED skips dirty pages): nothing is lost, less is freed, and the caller
measures what really went. Needs root (process_madvise on another process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from memvisor.errors import BackendError, InputError, PermissionNeededError
from memvisor.units import HUGE_PAGE_SIZE, PAGE_SIZE, MiB

SYS_PROCESS_MADVISE = 440
MADV_PAGEOUT = 21
IOV_MAX = 1024
SYNC_FILE_RANGE_ALL = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER
CHUNK = HUGE_PAGE_SIZE
CHUNK_PAGES = CHUNK // PAGE_SIZE
# a resident limit is re-enforced only past this: 2 MiB page-cache folios come back whole
LIMIT_SLACK = 4 * MiB
# rounds of write-back and eviction one SetSwapTarget makes while the running guest faults
# pages of the evicted chunks straight back (its hot pages)
LIMIT_ROUNDS = 3
# a chunk the guest faulted back after memvisor evicted it is evicted last for this long
# (RefaultTracker); after it, it is tried again like any other
HOT_PROTECT = 60.0
PC_LOW_RAM = 0xE000_0000  # pc (i440fx): RAM up to 3.5 GiB below the PCI hole

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


class _Iovec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


def align_ranges(ranges: Sequence[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """Widen (offset, length) ranges to whole 2 MiB chunks within [0, limit); merge overlaps."""
    spans = sorted(
        (off // CHUNK * CHUNK, min(limit, -(-(off + length) // CHUNK) * CHUNK))
        for off, length in ranges
        if length > 0
    )
    merged: list[list[int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi - lo) for lo, hi in merged if hi > lo]


def pc_file_spans(gpa: int, length: int, memory: int) -> list[tuple[int, int]]:
    """(file offset, length) of guest-physical [gpa, gpa+length) on the ``pc`` machine: RAM
    below 3.5 GiB sits at GPA = offset, the rest at 4 GiB + (offset - 3.5 GiB)."""
    low = min(memory, PC_LOW_RAM)
    spans = []
    lo_end = min(gpa + length, low)
    if gpa < lo_end:
        spans.append((gpa, lo_end - gpa))
    hi_start, hi_end = max(gpa, 1 << 32), gpa + length
    if hi_end > hi_start:
        offset = low + hi_start - (1 << 32)
        if offset + hi_end - hi_start > memory:
            raise InputError(f"guest range {gpa:#x}+{length:#x} is outside the VM's RAM")
        spans.append((offset, hi_end - hi_start))
    if sum(n for _, n in spans) != length:
        raise InputError(f"guest range {gpa:#x}+{length:#x} is outside the VM's RAM")
    return spans


def chunk_count(npages: int) -> int:
    """2 MiB chunks that cover ``npages`` pages (the last one may be short)."""
    return -(-npages // CHUNK_PAGES)


def chunk_resident(resident: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
    """Resident pages per 2 MiB chunk of a file's residency map (the last chunk may be short)."""
    npages = len(resident)
    nchunks = chunk_count(npages)
    padded = resident
    if npages != nchunks * CHUNK_PAGES:  # guest RAM is a whole number of chunks: no copy then
        padded = np.zeros(nchunks * CHUNK_PAGES, dtype=bool)
        padded[:npages] = resident
    counts: npt.NDArray[np.int64] = padded.reshape(nchunks, CHUNK_PAGES).sum(axis=1, dtype=np.int64)
    return counts


def choose_chunks(
    resident: npt.NDArray[np.bool_],
    nbytes: int,
    *,
    cap: int | None = None,
    hot: npt.NDArray[np.bool_] | None = None,
) -> list[tuple[int, int]]:
    """2 MiB chunks of the file, from the top of guest RAM down, whose resident pages add up to
    at least ``nbytes`` (fewer if the next chunk would take more than ``cap``, e.g. go below the
    reservation). Top-down because the guest's page allocator hands out high memory first,
    while low memory holds the kernel image and its early, hot allocations. ``hot`` (one flag
    per chunk, :class:`RefaultTracker`): chunks the guest faulted back after their last
    eviction; they are taken only once every other chunk is."""
    limit = npages_bytes = len(resident) * PAGE_SIZE
    if cap is not None:
        limit = max(cap, 0)
    if nbytes <= 0 or npages_bytes == 0:
        return []
    per_chunk = chunk_resident(resident) * PAGE_SIZE
    nchunks = len(per_chunk)
    if hot is not None and len(hot) != nchunks:
        raise InputError(f"hot chunk map has {len(hot)} entries for {nchunks} chunks")
    order = list(range(nchunks - 1, -1, -1))
    if hot is not None:
        order = [i for i in order if not hot[i]] + [i for i in order if hot[i]]
    chosen: list[tuple[int, int]] = []
    total = 0
    for idx in order:
        size = int(per_chunk[idx])
        if size == 0 or total + size > limit:
            continue
        chosen.append((idx * CHUNK, CHUNK))
        total += size
        if total >= nbytes:
            break
    return align_ranges(chosen, npages_bytes)


class RefaultTracker:
    """Which 2 MiB chunks of one VM's file the guest faulted back after memvisor evicted them.

    Host swap has no access bits to read here (no page_idle on this kernel, and the page cache
    folds a guest's 4 KiB touch into a 2 MiB folio), so the one signal of a hot chunk is that
    it came back. Measured on an idle 256 MiB guest held at 192 MiB: evicting top-down, the same
    13 chunks (26 MiB) came back within a second of every hold, tick after tick; evicting those
    last, the hold chose cold chunks once and the limit then stood with nothing more to evict
    (docs/backends.md). A chunk stays hot for ``protect`` seconds after it was last seen back,
    then is tried again (the guest's working set moves)."""

    def __init__(self, nchunks: int, protect: float = HOT_PROTECT) -> None:
        if nchunks < 0 or protect < 0:
            raise InputError(f"refault tracker: {nchunks} chunks, protect {protect} s")
        self.protect = protect
        self.out = np.zeros(nchunks, dtype=bool)  # evicted by memvisor, not seen back since
        self.back_at = np.full(nchunks, -np.inf)  # when each was last seen back
        self.came_back = 0  # chunks seen back, in all

    def evicted(self, chunks: Sequence[tuple[int, int]]) -> None:
        """Mark the 2 MiB-aligned (offset, length) ranges as evicted."""
        for off, length in chunks:
            self.out[off // CHUNK : -(-(off + length) // CHUNK)] = True

    def update(self, resident: npt.NDArray[np.bool_], now: float) -> int:
        """Note which evicted chunks are resident again; returns their resident pages."""
        per = chunk_resident(resident)
        if len(per) != len(self.out):
            raise InputError(f"residency map has {len(per)} chunks, tracker {len(self.out)}")
        back = self.out & (per > 0)
        self.back_at[back] = now
        self.out &= ~back
        self.came_back += int(back.sum())
        return int(per[back].sum())

    def hot(self, now: float) -> npt.NDArray[np.bool_]:
        """Chunks seen back within the last ``protect`` seconds."""
        return np.asarray(now - self.back_at < self.protect)


def sync_range(fd: int, offset: int, length: int) -> None:
    """Write back the dirty pages of a file range and wait for it (no device cache flush)."""
    if _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_ALL) != 0:
        raise BackendError(f"sync_file_range: {os.strerror(ctypes.get_errno())}")


def page_out(pid: int, fd: int, hva_base: int, ranges: Sequence[tuple[int, int]]) -> None:
    """Run write-back -> PAGEOUT -> DONTNEED over file ``ranges`` (offset, length) of the
    backing file open as ``fd``, mapped in QEMU ``pid`` at ``hva_base``."""
    for off, length in ranges:
        sync_range(fd, off, length)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError as exc:
        raise BackendError(f"QEMU pid {pid} is gone") from exc
    try:
        for i in range(0, len(ranges), IOV_MAX):
            batch = ranges[i : i + IOV_MAX]
            iov = (_Iovec * len(batch))(*(_Iovec(hva_base + off, n) for off, n in batch))
            rc = _libc.syscall(SYS_PROCESS_MADVISE, pidfd, iov, len(batch), MADV_PAGEOUT, 0)
            if rc < 0:
                err = ctypes.get_errno()
                if err == 1:  # EPERM
                    raise PermissionNeededError("process_madvise(MADV_PAGEOUT): needs root")
                raise BackendError(f"process_madvise(MADV_PAGEOUT): {os.strerror(err)}")
    finally:
        os.close(pidfd)
    for off, length in ranges:
        os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)
