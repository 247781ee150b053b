"""The raw kernel interfaces behind the sharing metric: ``/proc/PID/maps`` parsing, the bits of
``/proc/PID/pagemap`` and ``/proc/kpage{count,flags}``, and coalesced reads of 8-byte entries.

Every entry of the three files is one little-endian ``u64`` at ``index * 8``. A ``pread`` from
Python costs 0.5-0.8 us in the kernel plus ~0.2 us in the interpreter, but only ~34 ns
(pagemap over 4 KiB pages; ~4 ns over huge pages) or ~47 ns (kpage*) per extra entry, so reading
a short gap between two wanted entries is cheaper than a second syscall: :func:`coalesce_runs`
merges sorted indices whose gap is at most ``max_gap`` into one run and :func:`read_entries`
reads each run with one ``pread``. Sparse samples skip the run bookkeeping altogether.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from memvisor.errors import BackendError
from memvisor.units import PAGE_SIZE

U64Array = npt.NDArray[np.uint64]

ENTRY_BYTES = 8

# /proc/PID/pagemap (Documentation/admin-guide/mm/pagemap.rst)
PAGEMAP_PRESENT = 1 << 63
PAGEMAP_SWAPPED = 1 << 62
# "Exclusively mapped": the frame has exactly one mapping, i.e. kpagecount would read 1
# (precise per-page mapcount; tests/unit/test_sharing_real.py checks it against kpagecount).
PAGEMAP_EXCLUSIVE = 1 << 56
PAGEMAP_PFN_MASK = (1 << 55) - 1

# /proc/kpageflags bit numbers (include/uapi/linux/kernel-page-flags.h)
KPF_ANON = 12
KPF_KSM = 21
KPF_THP = 22
KPF_ZERO_PAGE = 24

# Largest gap (in entries) still read through rather than split into two syscalls: about the
# fixed cost of a pread divided by the per-entry cost (figures in the module docstring,
# measured on this host with 1 GiB contexts: 1.0 us / 34 ns ~ 30; 0.7 us / 47 ns ~ 15).
PAGEMAP_MAX_GAP = 32
FRAME_MAX_GAP = 16

# Coalesce only when it saves at least one read in this many (below, sorting and planning the
# runs cost more than the reads saved: measured with bench/bench_sharing.py).
COALESCE_MIN_SAVED = 4

# Whole-range reads (full scans) go in chunks of this many entries to bound memory.
SCAN_CHUNK_ENTRIES = 1 << 16

# Kernel mappings that are not the process's memory; [vsyscall] lies above TASK_SIZE, where
# pagemap reads nothing at all.
SPECIAL_MAPPINGS = frozenset({"[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]", "[uprobes]"})
UNREADABLE_MAPPINGS = frozenset({"[vsyscall]"})

_MAPS_RE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+)\s+([r-][w-][x-][ps])\s+([0-9a-f]+)\s+"
    r"([0-9a-f]+:[0-9a-f]+)\s+(\d+)\s*(.*)$"
)


@dataclass(frozen=True, slots=True)
class MapsEntry:
    """One line of ``/proc/PID/maps``: a virtual memory area."""

    start: int
    end: int
    perms: str  # e.g. "rw-p"
    offset: int
    inode: int
    path: str  # "" for plain anonymous memory; "[heap]", "[stack]", "[anon:name]", a file...

    @property
    def pages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def private(self) -> bool:
        return self.perms[3] == "p"

    @property
    def inaccessible(self) -> bool:
        """PROT_NONE: a reservation or guard area, which holds no pages."""
        return self.perms[:3] == "---"

    @property
    def special(self) -> bool:
        return self.path in SPECIAL_MAPPINGS

    @property
    def anonymous(self) -> bool:
        if self.inode != 0:
            return False
        return self.path in ("", "[heap]") or self.path.startswith(("[stack", "[anon:"))


def parse_maps(text: str, *, source: str = "maps") -> list[MapsEntry]:
    """Parse the text of ``/proc/PID/maps``; a malformed line is a :class:`BackendError`."""
    entries: list[MapsEntry] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _MAPS_RE.match(line)
        if m is None:
            raise BackendError(f"{source}: line {lineno} is not a mapping: {line!r}")
        start, end = int(m.group(1), 16), int(m.group(2), 16)
        if end <= start or start % PAGE_SIZE or end % PAGE_SIZE:
            raise BackendError(f"{source}: line {lineno} has a bad range: {line!r}")
        entries.append(
            MapsEntry(
                start=start,
                end=end,
                perms=m.group(3),
                offset=int(m.group(4), 16),
                inode=int(m.group(6)),
                path=m.group(7).strip(),
            )
        )
    return entries


def parse_spans(text: str, *, source: str = "maps") -> list[tuple[int, int]]:
    """Only the address ranges ``(start, end)`` of ``/proc/PID/maps``, checked like
    :func:`parse_maps` checks them (a tenth of its cost: no regex, no objects)."""
    spans: list[tuple[int, int]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        low, dash, high = line.partition(" ")[0].partition("-")
        if not low and not line.strip():
            continue
        try:
            start, end = int(low, 16), int(high, 16)
        except ValueError:
            raise BackendError(f"{source}: line {lineno} is not a mapping: {line!r}") from None
        if not dash or end <= start or start % PAGE_SIZE or end % PAGE_SIZE:
            raise BackendError(f"{source}: line {lineno} has a bad range: {line!r}")
        spans.append((start, end))
    return spans


def select_mappings(entries: list[MapsEntry], *, all_mappings: bool = False) -> list[MapsEntry]:
    """The mappings a process context samples.

    Default: the memory the process owns and that reclaiming could free — private writable
    mappings (heap, stacks, a file's .data/.bss, guest RAM) and every anonymous mapping —
    leaving out PROT_NONE reservations (they hold no pages) and kernel-provided mappings.
    ``all_mappings``: everything the kernel lets pagemap read (shared libraries included).
    """
    if all_mappings:
        return [e for e in entries if e.path not in UNREADABLE_MAPPINGS]
    return [
        e
        for e in entries
        if not e.special and not e.inaccessible and ((e.writable and e.private) or e.anonymous)
    ]


@dataclass(frozen=True, slots=True)
class Runs:
    """Sorted unique indices grouped into runs that one read each covers."""

    starts: U64Array  # first index of each run
    lengths: U64Array  # entries in each run (gaps included)
    buffer_offsets: U64Array  # where each run starts in the concatenated read buffer
    positions: npt.NDArray[np.int64]  # position of each input index in that buffer

    @property
    def total_entries(self) -> int:
        return int(self.lengths.sum())


def coalesce_runs(sorted_unique: U64Array, max_gap: int) -> Runs:
    """Group sorted unique indices into runs whose inner gaps are at most ``max_gap``."""
    idx = np.asarray(sorted_unique, dtype=np.uint64)
    if idx.size == 0:
        empty = np.zeros(0, dtype=np.uint64)
        return Runs(empty, empty, empty, np.zeros(0, dtype=np.int64))
    gaps = np.diff(idx) - np.uint64(1)
    breaks = np.flatnonzero(gaps > np.uint64(max_gap)) + 1
    first = np.concatenate(([0], breaks))
    last = np.concatenate((breaks - 1, [idx.size - 1]))
    starts = idx[first]
    lengths = idx[last] - starts + np.uint64(1)
    buffer_offsets = np.zeros(lengths.size, dtype=np.uint64)
    np.cumsum(lengths[:-1], out=buffer_offsets[1:])
    run_of_index = np.repeat(np.arange(first.size), np.diff(np.append(first, idx.size)))
    positions = (buffer_offsets[run_of_index] + (idx - starts[run_of_index])).astype(np.int64)
    return Runs(starts, lengths, buffer_offsets, positions)


class EndOfFile(Exception):
    """A read returned nothing: for pagemap, the process has exited (its mm is gone)."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"end of file at offset {offset}")
        self.offset = offset


def read_run(fd: int, first_index: int, out: memoryview) -> None:
    """Fill ``out`` (bytes) from entry ``first_index`` on; short reads are continued."""
    done = 0
    offset = first_index * ENTRY_BYTES
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n <= 0:
            raise EndOfFile(offset + done)
        done += n


def read_entries(
    fd: int, indices: U64Array, max_gap: int, *, zero_past_end: bool = False
) -> U64Array:
    """The u64 entries at ``indices`` (any order, repeats allowed) of a /proc entry file.

    Coalescing needs the indices sorted and the runs planned, which costs about as much per
    index as the ``pread`` it saves; a sparse sample (K = 1,000 pages of 1 GiB are ~260 pages
    apart, and the frames behind 4 KiB pages are scattered over the host) saves almost no
    read, so it is read an entry at a time, in the order given, with no bookkeeping at all.

    Past the end of the file: :class:`EndOfFile`, or zeros with ``zero_past_end`` (the kpage
    files end at the last frame with a struct page; device memory beyond has none to count).
    """
    idx = np.asarray(indices, dtype=np.uint64)
    if not worth_coalescing(idx, max_gap):
        offsets = (idx * np.uint64(ENTRY_BYTES)).tolist()
        return _read_at(fd, offsets, None, zero_past_end)
    inverse = None
    if not bool((idx[1:] > idx[:-1]).all()):
        idx, inverse = np.unique(idx, return_inverse=True)
    runs = coalesce_runs(idx, max_gap)
    offsets = (runs.starts * np.uint64(ENTRY_BYTES)).tolist()
    sizes = (runs.lengths * np.uint64(ENTRY_BYTES)).tolist()
    result: U64Array = _read_at(fd, offsets, sizes, zero_past_end)[runs.positions]
    return result if inverse is None else result[inverse.reshape(-1)]


def worth_coalescing(indices: U64Array, max_gap: int) -> bool:
    """Whether coalescing saves at least 1 read in COALESCE_MIN_SAVED: judged on neighbours in
    the given order (sorted page numbers; frames of consecutive sampled pages, which are
    contiguous inside a huge page, and repeats such as the zero page's frame)."""
    if indices.size < 2:
        return False
    steps = np.diff(indices.view(np.int64))
    near = int(np.count_nonzero(np.abs(steps) <= max_gap + 1))
    return near * COALESCE_MIN_SAVED >= indices.size


def _read_at(fd: int, offsets: list[int], sizes: list[int] | None, zero_past_end: bool) -> U64Array:
    """Read ``sizes[i]`` bytes (one entry each if None) at each offset, concatenated."""
    # The hot loop: one pread per run and nothing else (a Python call per run costs as much
    # as the syscall itself, so short reads are handled afterwards, on the rare slow path).
    pread = os.pread
    if sizes is None:
        data = b"".join([pread(fd, ENTRY_BYTES, off) for off in offsets])
        expected = ENTRY_BYTES * len(offsets)
    else:
        data = b"".join([pread(fd, n, off) for n, off in zip(sizes, offsets, strict=True)])
        expected = sum(sizes)
    if len(data) != expected:
        if sizes is None:
            sizes = [ENTRY_BYTES] * len(offsets)
        data = _read_runs_completely(fd, offsets, sizes, zero_past_end)
    return np.frombuffer(bytearray(data), dtype=np.uint64)


def _read_runs_completely(
    fd: int, offsets: list[int], sizes: list[int], zero_past_end: bool
) -> bytes:
    out = bytearray(sum(sizes))  # zero-filled: what stays unread past the end reads as 0
    view = memoryview(out)
    at = 0
    for off, n in zip(offsets, sizes, strict=True):
        try:
            read_run(fd, off // ENTRY_BYTES, view[at : at + n])
        except EndOfFile:
            if not zero_past_end:
                raise
        at += n
    return bytes(out)


def read_range(fd: int, first_index: int, count: int) -> U64Array:
    """``count`` consecutive entries from ``first_index`` (one read)."""
    buf = np.empty(count, dtype=np.uint64)
    read_run(fd, first_index, buf.data.cast("B"))
    return buf


def pfns_of(entries: U64Array) -> U64Array:
    result: U64Array = entries & np.uint64(PAGEMAP_PFN_MASK)
    return result
