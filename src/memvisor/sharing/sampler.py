"""Sampling the pages of a context: a process's mappings, or a VM's guest RAM in its QEMU process.

A :class:`Context` is an opened address space (its ``/proc/PID/pagemap``) and the page ranges to
sample; a control loop keeps it open across ticks with the kpage files. :meth:`Context.sample`
draws K distinct pages uniformly (seeded numpy generator), reads their pagemap entries, then
the kpagecount and kpageflags entries the metric needs for the present frames, coalescing
nearby reads where that pays. :meth:`Context.scan` reads every page; :meth:`Context.measure`
returns the metric.

Never a wrong number: a process that exits while being sampled (pagemap reads return nothing)
raises :class:`ContextGoneError`, checked again after the frame reads; PFNs that read as 0
(not root) raise :class:`PermissionNeededError`.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import numpy.typing as npt

from memvisor.errors import (
    BackendError,
    InputError,
    NotFoundError,
    PermissionNeededError,
)
from memvisor.sharing.metric import PageSample, SharingStats, compute_stats
from memvisor.sharing.procfs import (
    FRAME_MAX_GAP,
    PAGEMAP_EXCLUSIVE,
    PAGEMAP_MAX_GAP,
    PAGEMAP_PRESENT,
    PAGEMAP_SWAPPED,
    SCAN_CHUNK_ENTRIES,
    EndOfFile,
    MapsEntry,
    U64Array,
    parse_maps,
    parse_spans,
    pfns_of,
    read_entries,
    read_range,
    select_mappings,
)
from memvisor.units import PAGE_SIZE

NEED_ROOT = "root or CAP_SYS_ADMIN needed"


class ContextGoneError(NotFoundError):
    """The process behind a context exited while it was being sampled."""


@dataclass(frozen=True, slots=True)
class PageRange:
    """Consecutive virtual pages: ``pages`` pages from virtual page number ``first_vpn``."""

    first_vpn: int
    pages: int


def _check_pid(pid: int) -> None:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise InputError(f"pid: expected a positive process id, got {pid!r}")


def _open_proc(pid: int, name: str) -> int:
    path = f"/proc/{pid}/{name}"
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFoundError(f"no process with PID {pid}") from None
    except PermissionError:
        raise PermissionNeededError(
            f"cannot read {path}: {NEED_ROOT} (or the process's own user with ptrace access)"
        ) from None


# ksm_stat_fd values that are not descriptors: no per-process KSM state to read, so every
# frame's flags are read; or no KSM in the kernel at all, so no page can be a KSM page.
KSM_UNKNOWN = -1
KSM_ABSENT = -2


def _open_ksm_stat(pid: int) -> int:
    """``/proc/PID/ksm_stat`` (its ``ksm_mergeable`` line: does any area of the process take
    part in KSM?), KSM_ABSENT on a kernel without KSM, KSM_UNKNOWN if it cannot be read."""
    try:
        return os.open(f"/proc/{pid}/ksm_stat", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return KSM_UNKNOWN if os.path.exists("/sys/kernel/mm/ksm") else KSM_ABSENT
    except OSError:
        return KSM_UNKNOWN


def read_maps(pid: int) -> list[MapsEntry]:
    """The mappings of process ``pid`` (``/proc/PID/maps``)."""
    return parse_maps(_read_maps_text(pid), source=f"/proc/{pid}/maps")


def _read_maps_text(pid: int) -> str:
    _check_pid(pid)
    fd = _open_proc(pid, "maps")
    try:
        with os.fdopen(fd, "r", closefd=True) as f:
            return f.read()
    except ProcessLookupError:
        raise ContextGoneError(f"process {pid} exited while its maps were read") from None


def check_pfns_visible(entries: U64Array, pid: int | None = None) -> None:
    """Present pages with PFN 0 mean the kernel hid the PFNs: we lack CAP_SYS_ADMIN.

    (Frame 0 is reserved by firmware: it never backs a process's page.)
    """
    present = (entries & np.uint64(PAGEMAP_PRESENT)) != 0
    if present.any() and not pfns_of(entries[present]).all():
        who = f"/proc/{pid}/pagemap" if pid is not None else "pagemap"
        raise PermissionNeededError(
            f"PFNs read as 0 in {who}: {NEED_ROOT} to see which host pages back the memory"
        )


class FrameFiles:
    """``/proc/kpagecount`` and ``/proc/kpageflags``, open for reading."""

    def __init__(self) -> None:
        self.count_fd = self._open("/proc/kpagecount")
        try:
            self.flags_fd = self._open("/proc/kpageflags")
        except BaseException:
            os.close(self.count_fd)
            raise

    @staticmethod
    def _open(path: str) -> int:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError:
            raise PermissionNeededError(f"cannot read {path}: {NEED_ROOT}") from None
        except FileNotFoundError:
            raise BackendError(
                f"{path} is missing: the host kernel lacks CONFIG_PROC_PAGE_MONITOR"
            ) from None

    def read(
        self, entries: U64Array, max_gap: int = FRAME_MAX_GAP, *, all_flags: bool = True
    ) -> tuple[U64Array, U64Array]:
        """(kpagecount, kpageflags) of the frames behind present pagemap ``entries``.

        Pages pagemap marks exclusively mapped have count 1 without asking kpagecount: that
        saves a third of the syscalls on private memory, where samples are too sparse to
        coalesce. Without ``all_flags`` (the caller knows no page can be a KSM page) flags are
        read only for frames with count 0, the only ones that can be the zero page (the
        kernel never counts the zero page's mappings, so it is never exclusive either): the
        metric needs no other flag. The others are left 0."""
        pfns = pfns_of(entries)
        single = (entries & np.uint64(PAGEMAP_EXCLUSIVE)) != 0
        counts = np.ones(entries.size, dtype=np.uint64)
        shared = ~single
        # Frames past the end of the kpage files (device memory) have no struct page: they
        # read as count 0, flags 0, and so count as not reclaimable, like the kernel's PSS.
        counts[shared] = read_entries(self.count_fd, pfns[shared], max_gap, zero_past_end=True)
        if all_flags:
            flags = read_entries(self.flags_fd, pfns, max_gap, zero_past_end=True)
        else:
            flags = np.zeros(entries.size, dtype=np.uint64)
            uncounted = counts == 0
            flags[uncounted] = read_entries(
                self.flags_fd, pfns[uncounted], max_gap, zero_past_end=True
            )
        return counts, flags

    def close(self) -> None:
        os.close(self.count_fd)
        os.close(self.flags_fd)


class Context:
    """An opened address space: a process's pagemap and the page ranges to sample.

    The reusable sampler of a control loop: open it once per process or VM and call
    :meth:`measure` (or :meth:`sample`) every tick. It keeps the pagemap, kpagecount,
    kpageflags and ksm_stat files open and the ranges as they were checked at open time, so a
    tick costs only the reads of the sampled pages. The pagemap descriptor stays bound to the
    process it was opened for: if it exits (and its PID is reused) the next sample raises
    :class:`ContextGoneError` instead of measuring another process. Reopen it when the
    process's mappings change (a process context samples the mappings it had when opened).
    """

    def __init__(
        self,
        pid: int,
        ranges: list[PageRange],
        label: str,
        pagemap_fd: int,
        *,
        ksm_stat_fd: int = KSM_UNKNOWN,
    ) -> None:
        self.pid = pid
        self.ranges = tuple(ranges)
        self.label = label
        # Read every frame's flags, even those the metric needs not (see FrameFiles.read).
        self.all_flags = False
        self._fd = pagemap_fd
        self._ksm_fd = ksm_stat_fd
        self._frames: FrameFiles | None = None
        self._first_vpns = np.array([r.first_vpn for r in ranges], dtype=np.uint64)
        sizes = np.array([r.pages for r in ranges], dtype=np.int64)
        self._ends = np.cumsum(sizes)  # index just past each range in the concatenated ranges
        self.total_pages = int(self._ends[-1]) if ranges else 0

    @classmethod
    def open_process(cls, pid: int, *, all_mappings: bool = False) -> Context:
        """A process: its private writable and anonymous mappings (or every mapping)."""
        _check_pid(pid)
        fd = _open_proc(pid, "pagemap")  # first: it pins the process's mm for the maps read
        try:
            chosen = select_mappings(read_maps(pid), all_mappings=all_mappings)
        except BaseException:
            os.close(fd)
            raise
        ranges = [PageRange(e.start // PAGE_SIZE, e.pages) for e in chosen]
        kind = "all mappings" if all_mappings else "private writable + anonymous"
        return cls(pid, ranges, f"pid {pid} ({kind})", fd, ksm_stat_fd=_open_ksm_stat(pid))

    @classmethod
    def open_range(cls, pid: int, start: int, length: int) -> Context:
        """One host-virtual range of a process, e.g. a VM's guest RAM in its QEMU process."""
        return cls.open_ranges(pid, [(start, length)])

    @classmethod
    def open_ranges(cls, pid: int, ranges: list[tuple[int, int]]) -> Context:
        """Host-virtual ranges ``(start, length)`` of a process, e.g. the pieces of a large
        VM's guest RAM (the ``pc`` machine relocates RAM above 3.5 GiB to 4 GiB+)."""
        _check_pid(pid)
        if not ranges:
            raise InputError("ranges: no range given")
        for start, length in ranges:
            _check_range(start, length)
        ordered = sorted(ranges)
        for (s1, n1), (s2, _) in itertools.pairwise(ordered):
            if s1 + n1 > s2:
                raise InputError(f"ranges: {s1:#x}+{n1:#x} overlaps the range at {s2:#x}")
        fd = _open_proc(pid, "pagemap")
        try:
            # Only the address ranges: a QEMU process has ~300 mappings, and parsing every
            # field of each would cost more than sampling 1,000 pages.
            spans = parse_spans(_read_maps_text(pid), source=f"/proc/{pid}/maps")
            for start, length in ranges:
                _require_mapped(spans, pid, start, length)
        except BaseException:
            os.close(fd)
            raise
        label = f"pid {pid} " + ", ".join(f"range {s:#x}+{n:#x}" for s, n in ranges)
        pages = [PageRange(s // PAGE_SIZE, n // PAGE_SIZE) for s, n in ranges]
        return cls(pid, pages, label, fd, ksm_stat_fd=_open_ksm_stat(pid))

    def __enter__(self) -> Context:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._ksm_fd >= 0:
            os.close(self._ksm_fd)
            self._ksm_fd = KSM_UNKNOWN
        if self._frames is not None:
            self._frames.close()
            self._frames = None

    def vpns_of(self, indices: U64Array | npt.NDArray[np.int64]) -> U64Array:
        """Virtual page numbers of page indices into the concatenated ranges."""
        if len(self.ranges) == 1:
            one: U64Array = np.asarray(indices, dtype=np.uint64) + self._first_vpns[0]
            return one
        idx = np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self._ends, idx, side="right")
        before = np.concatenate(([0], self._ends[:-1]))[which]
        result: U64Array = self._first_vpns[which] + (idx - before).astype(np.uint64)
        return result

    def measure(
        self, samples: int = 10_000, seed: int | None = None, *, full: bool = False
    ) -> SharingStats:
        """The sharing metric now: K sampled pages, or every page with ``full``."""
        return compute_stats(self.scan(seed=seed) if full else self.sample(samples, seed))

    def sample(self, k: int, seed: int | None = None) -> PageSample:
        """K distinct pages drawn uniformly; K at least the context's size scans every page."""
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise InputError(f"samples: expected a positive number of pages, got {k!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise InputError(f"seed: expected a non-negative integer, got {seed!r}")
        if k >= self.total_pages:
            note = (
                f"asked for {k} samples but {self.label} has only {self.total_pages} pages: "
                "scanned every page"
            )
            return self.scan(seed=seed, warnings=(note,))
        seed = secrets.randbits(32) if seed is None else seed
        rng = np.random.default_rng(seed)
        indices = rng.choice(self.total_pages, size=k, replace=False)
        indices.sort()
        vpns = self.vpns_of(indices)
        entries = self._read_pagemap(vpns)
        kept = (entries & np.uint64(PAGEMAP_PRESENT | PAGEMAP_SWAPPED)) != 0
        if not kept.all():
            vpns, entries = vpns[kept], entries[kept]
        return self._resolve(vpns, entries, k, full=False, seed=seed, warnings=())

    def scan(self, *, seed: int | None = None, warnings: tuple[str, ...] = ()) -> PageSample:
        """Every page of the context (full scan)."""
        if self.total_pages == 0:
            raise InputError(f"{self.label}: the context has no pages to scan")
        vpn_parts: list[U64Array] = []
        entry_parts: list[U64Array] = []
        for r in self.ranges:
            for first in range(r.first_vpn, r.first_vpn + r.pages, SCAN_CHUNK_ENTRIES):
                count = min(SCAN_CHUNK_ENTRIES, r.first_vpn + r.pages - first)
                chunk = self._read_pagemap_range(first, count)
                kept = np.flatnonzero(chunk & np.uint64(PAGEMAP_PRESENT | PAGEMAP_SWAPPED))
                vpn_parts.append(kept.astype(np.uint64) + np.uint64(first))
                entry_parts.append(chunk[kept])
        return self._resolve(
            np.concatenate(vpn_parts),
            np.concatenate(entry_parts),
            self.total_pages,
            full=True,
            seed=seed,
            warnings=warnings,
        )

    def _ksm_possible(self) -> bool:
        """Whether a page may be a KSM page, whose flags then must be read (a KSM page with
        one mapping left is exclusive, count 1). KSM pages live only in mergeable areas:
        MADV_UNMERGEABLE and prctl unmerge them first, and fork copies the mergeable flag.

        Asked right before the frame reads, like the kpageflags reads it stands for."""
        if self.all_flags or self._ksm_fd == KSM_UNKNOWN:
            return True
        if self._ksm_fd == KSM_ABSENT:
            return False
        try:
            stat = os.pread(self._ksm_fd, 1024, 0)
        except OSError:
            return True  # e.g. the process exited: the liveness check after the reads says so
        return b"\nksm_mergeable: no\n" not in stat

    def _gone(self) -> ContextGoneError:
        return ContextGoneError(f"process {self.pid} exited while {self.label} was sampled")

    def _read_pagemap(self, vpns: U64Array) -> U64Array:
        try:
            return read_entries(self._fd, vpns, PAGEMAP_MAX_GAP)
        except EndOfFile:
            raise self._gone() from None
        except OSError as exc:
            raise self._os_error(exc) from None

    def _read_pagemap_range(self, first_vpn: int, count: int) -> U64Array:
        try:
            return read_range(self._fd, first_vpn, count)
        except EndOfFile:
            raise self._gone() from None
        except OSError as exc:
            raise self._os_error(exc) from None

    def _os_error(self, exc: OSError) -> Exception:
        if exc.errno == errno.ESRCH:
            return self._gone()
        if exc.errno in (errno.EPERM, errno.EACCES):
            return PermissionNeededError(f"reading /proc/{self.pid}/pagemap: {NEED_ROOT}")
        return BackendError(f"reading /proc/{self.pid}/pagemap: {exc}")

    def _resolve(
        self,
        vpns: U64Array,
        entries: U64Array,
        sampled: int,
        *,
        full: bool,
        seed: int | None,
        warnings: tuple[str, ...],
    ) -> PageSample:
        """Read the frames behind the present pages, then check the process is still there."""
        check_pfns_visible(entries, self.pid)
        present = (entries & np.uint64(PAGEMAP_PRESENT)) != 0
        if self._frames is None:
            self._frames = FrameFiles()
        all_flags = self._ksm_possible()
        if present.all():
            counts, flags = self._frames.read(entries, all_flags=all_flags)
        else:
            counts = np.zeros(entries.size, dtype=np.uint64)
            flags = np.zeros(entries.size, dtype=np.uint64)
            counts[present], flags[present] = self._frames.read(
                entries[present], all_flags=all_flags
            )
        # The frames were read after the pagemap: if the process died in between, they may
        # have been freed and reused, so the counts would describe someone else's memory.
        self._read_pagemap_range(self.ranges[0].first_vpn, 1)
        return PageSample(
            label=self.label,
            context_pages=self.total_pages,
            sampled=sampled,
            vpns=vpns,
            entries=entries,
            counts=counts,
            flags=flags,
            pid=self.pid,
            full_scan=full,
            seed=seed,
            warnings=warnings,
        )


def _check_range(start: int, length: int) -> None:
    for name, value in (("start", start), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{name}: expected a non-negative byte count, got {value!r}")
        if value % PAGE_SIZE:
            raise InputError(f"{name}: {value:#x} is not a multiple of {PAGE_SIZE}")
    if length == 0:
        raise InputError("length: the range is empty")


def _require_mapped(spans: list[tuple[int, int]], pid: int, start: int, length: int) -> None:
    """Refuse a range that is not wholly inside the process's mappings (``(start, end)``)."""
    covered_to = start
    for span_start, span_end in sorted(spans):
        if span_end <= covered_to:
            continue
        if span_start > covered_to:
            break
        covered_to = span_end
        if covered_to >= start + length:
            return
    raise InputError(
        f"range {start:#x}+{length:#x} is not mapped in process {pid} "
        f"(unmapped from {covered_to:#x}; see /proc/{pid}/maps)"
    )


def sample_process(
    pid: int,
    *,
    samples: int = 10_000,
    seed: int | None = None,
    all_mappings: bool = False,
    full: bool = False,
) -> SharingStats:
    """The sharing metric of a process's memory (sampled, or every page with ``full``)."""
    with Context.open_process(pid, all_mappings=all_mappings) as ctx:
        return ctx.measure(samples, seed, full=full)


def sample_guest_ram(
    pid: int,
    start: int,
    length: int,
    *,
    samples: int = 10_000,
    seed: int | None = None,
    full: bool = False,
) -> SharingStats:
    """The sharing metric of a VM's guest RAM: ``length`` bytes at host-virtual ``start`` in
    its QEMU process ``pid`` (the backend supplies the range, e.g. from ``gpa2hva``)."""
    with Context.open_range(pid, start, length) as ctx:
        return ctx.measure(samples, seed, full=full)


def sample_guest_ranges(
    pid: int,
    ranges: list[tuple[int, int]],
    *,
    samples: int = 10_000,
    seed: int | None = None,
    full: bool = False,
) -> SharingStats:
    """Like :func:`sample_guest_ram` for guest RAM in several host-virtual pieces.

    These functions open and close the context per call; a control loop that samples every
    tick keeps a :class:`Context` open instead (``Context.open_range(...).measure(K)``)."""
    with Context.open_ranges(pid, ranges) as ctx:
        return ctx.measure(samples, seed, full=full)
