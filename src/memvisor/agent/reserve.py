"""The guest's reservation: anonymous memory held on the host's behalf, and its watch.

Runs inside the guest (stdlib only). Memory is reserved in *extents* of at most one block
(``block_pages`` pages, 512 = 2 MiB when the host's backing frees memory only in 2 MiB units):
a private anonymous mapping, advised ``MADV_HUGEPAGE`` so the guest kernel backs each block
with one transparent huge page, which is physically contiguous, 2 MiB aligned in
guest-physical memory, and never a compaction source (compaction skips compound pages), so
its frame numbers stay put. A block the kernel could not back with a huge page is given back
at once and tried again; with ``block_pages == 1`` any pages are accepted.

Frame numbers come from ``/proc/self/pagemap`` (root only; PFNs read as 0 otherwise). The
periodic :meth:`Reservation.scan` re-reads pagemap for every held page: a page now swapped
(bit 62) or gone was paged out by the guest OS (memory pressure); a page at a new frame
moved, and its new frame is reported so the host frees that frame's backing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from memvisor.agent.protocol import PageRange, compact_ranges

PAGE = 4096
PFN_MASK = (1 << 55) - 1
PRESENT = 1 << 63
SWAPPED = 1 << 62


THP_CONTROL = "/sys/kernel/mm/transparent_hugepage/enabled"


MIN_FREE_KBYTES = "/proc/sys/vm/min_free_kbytes"


def enable_thp_for_madvised(path: str = THP_CONTROL, min_free: str = MIN_FREE_KBYTES) -> None:
    """Make ``MADV_HUGEPAGE`` work. A kernel with less than 512 MiB of RAM starts with THP
    ``never``; ``madvise`` turns it on for advised regions only (ours). Switching THP on also
    raises ``min_free_kbytes`` (by ~30 MiB in a 512 MiB guest, which then has that much less
    available memory): the old value is put back, so nothing else in the guest changes."""
    with open(path) as f:
        current = f.read()
    if "[never]" not in current:
        return
    with open(min_free) as f:
        old_min_free = f.read().strip()
    with open(path, "w") as f:
        f.write("madvise")
    with open(min_free) as f:
        raised = f.read().strip() != old_min_free
    if raised:
        with open(min_free, "w") as f:
            f.write(old_min_free)


class PagemapReader(Protocol):
    """Raw 64-bit pagemap entries of ``npages`` pages starting at virtual address ``addr``."""

    def read(self, addr: int, npages: int) -> list[int]: ...


class ProcPagemap:
    """The real reader: one pread of /proc/self/pagemap per call."""

    def __init__(self, path: str = "/proc/self/pagemap") -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self, addr: int, npages: int) -> list[int]:
        data = os.pread(self._fd, npages * 8, (addr // PAGE) * 8)
        if len(data) != npages * 8:
            raise OSError(f"short pagemap read: {len(data)} of {npages * 8} bytes")
        return list(struct.unpack(f"<{npages}Q", data))

    def close(self) -> None:
        os.close(self._fd)


def entry_pfn(entry: int) -> int:
    """The frame of a present entry, 0 when the page is not present."""
    return entry & PFN_MASK if entry & PRESENT else 0


class Mapping:
    """One private anonymous mapping; closed when its last extent is released."""

    def __init__(self, nbytes: int, huge: bool) -> None:
        self.mem = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        anchor = ctypes.c_char.from_buffer(self.mem)
        self.addr = ctypes.addressof(anchor)
        del anchor  # a live export would forbid closing the mapping
        self.mem.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
        self.users = 0

    def touch(self, offset: int, npages: int, step_pages: int) -> None:
        # Writing zeros keeps the pages zero-filled (KSM can merge them on anon backings).
        for off in range(offset, offset + npages * PAGE, step_pages * PAGE):
            self.mem[off] = 0

    def discard(self, offset: int, npages: int) -> None:
        self.mem.madvise(mmap.MADV_DONTNEED, offset, npages * PAGE)


@dataclass
class Extent:
    """Up to one block of reserved pages: where it lives and what pagemap last said."""

    mapping: Mapping
    offset: int
    entries: list[int]  # last raw pagemap entry per page
    reserved_at: float
    lost: bytearray = field(default_factory=bytearray)  # 1: paged out (swapped or dropped)

    @property
    def addr(self) -> int:
        return self.mapping.addr + self.offset

    @property
    def npages(self) -> int:
        return len(self.entries)

    def held_pfns(self) -> list[int]:
        return [p for p in map(entry_pfn, self.entries) if p]


@dataclass
class ScanResult:
    """What changed since the last scan."""

    add: list[int] = field(default_factory=list)  # frames now held: moved-to, swapped back in
    remove: list[int] = field(default_factory=list)  # frames no longer held
    swapped: int = 0
    dropped: int = 0
    moved: int = 0
    returned: int = 0
    ages: list[float] = field(default_factory=list)  # of newly paged-out pages, seconds

    @property
    def paged_out(self) -> int:
        return self.swapped + self.dropped


class Reservation:
    """The pages the agent holds, in extents of at most ``block_pages`` pages."""

    def __init__(
        self,
        pagemap: PagemapReader,
        block_pages: int = 512,
        clock: Callable[[], float] = time.monotonic,
        max_attempts: int = 4,
    ) -> None:
        self.pagemap = pagemap
        self.block_pages = block_pages
        self.clock = clock
        self.max_attempts = max_attempts
        self.extents: list[Extent] = []
        self.thp_control = THP_CONTROL
        self.min_free_control = MIN_FREE_KBYTES

    @property
    def held(self) -> int:
        """Pages reserved (present or paged out)."""
        return sum(e.npages for e in self.extents)

    @property
    def swapped(self) -> int:
        return sum(e.lost.count(1) for e in self.extents)

    def held_ranges(self) -> list[PageRange]:
        """The frames held right now (present pages only), as compact ranges."""
        return compact_ranges(p for e in self.extents for p in e.held_pfns())

    def reserve(self, pages: int) -> list[int]:
        """Reserve ``pages`` more pages; returns the frames added (may be fewer if refused)."""
        if pages % self.block_pages:
            raise ValueError(f"{pages} pages is not a multiple of the block ({self.block_pages})")
        if self.block_pages > 1:
            enable_thp_for_madvised(self.thp_control, self.min_free_control)
        added: list[int] = []
        for _ in range(self.max_attempts):
            want = pages - len(added)
            if want <= 0:
                break
            added += self._reserve_once(want)
        return added

    def _reserve_once(self, pages: int) -> list[int]:
        huge = self.block_pages > 1
        slack = 512 * PAGE  # room to start on a 2 MiB boundary
        mapping = Mapping(pages * PAGE + slack, huge=True)
        start = (-mapping.addr) % (512 * PAGE)
        step = 512 if huge else 1
        mapping.touch(start, pages, step)
        now = self.clock()
        added: list[int] = []
        for first in range(0, pages, self.block_pages):
            offset = start + first * PAGE
            npages = min(self.block_pages, pages - first)
            entries = self._settle(mapping, offset, npages)
            if entries is None:
                mapping.discard(offset, npages)
                continue
            self.extents.append(Extent(mapping, offset, entries, now, bytearray(npages)))
            mapping.users += 1
            added += [entry_pfn(e) for e in entries]
        if not mapping.users:
            mapping.mem.close()
        return added

    def _settle(self, mapping: Mapping, offset: int, npages: int) -> list[int] | None:
        """Pagemap entries of a freshly touched extent, or None if it is not usable."""
        entries = self.pagemap.read(mapping.addr + offset, npages)
        if any(not entry_pfn(e) for e in entries) and self.block_pages == 1:
            mapping.touch(offset, npages, 1)  # no THP here: touch every page
            entries = self.pagemap.read(mapping.addr + offset, npages)
        pfns = [entry_pfn(e) for e in entries]
        if not all(pfns):
            return None  # not present or PFNs hidden (not root)
        if self.block_pages > 1:
            first = pfns[0]
            if first % self.block_pages or pfns != list(range(first, first + npages)):
                return None  # not one aligned huge page: freeing it would free nothing
        return entries

    def release(self, pages: int) -> tuple[list[int], int]:
        """Give back ``pages`` pages, paged-out ones first, then the newest.

        Returns the frames no longer held and the number of pages released."""
        if pages % self.block_pages:
            raise ValueError(f"{pages} pages is not a multiple of the block ({self.block_pages})")
        order = sorted(
            range(len(self.extents)),
            key=lambda i: (-self.extents[i].lost.count(1), -i),
        )
        removed: list[int] = []
        released = 0
        drop: set[int] = set()
        for i in order:
            if released >= pages:
                break
            ext = self.extents[i]
            take = min(ext.npages, pages - released)
            tail = ext.entries[ext.npages - take :]
            removed += [p for p in map(entry_pfn, tail) if p]
            ext.mapping.discard(ext.offset + (ext.npages - take) * PAGE, take)
            del ext.entries[ext.npages - take :]
            del ext.lost[len(ext.entries) :]
            released += take
            if not ext.entries:
                drop.add(i)
        for i in sorted(drop, reverse=True):
            self._forget(self.extents.pop(i))
        return removed, released

    def _forget(self, ext: Extent) -> None:
        ext.mapping.users -= 1
        if ext.mapping.users == 0:
            ext.mapping.mem.close()

    def release_all(self) -> None:
        while self.extents:
            self._forget(self.extents.pop())

    def scan(self) -> ScanResult:
        """Re-read pagemap of every held page and report what the guest OS did to them."""
        result = ScanResult()
        now = self.clock()
        for ext in self.extents:
            fresh = self.pagemap.read(ext.addr, ext.npages)
            if fresh == ext.entries:
                continue
            for i, (old, new) in enumerate(zip(ext.entries, fresh, strict=True)):
                if old != new:
                    _compare(ext, i, old, new, now, result)
            ext.entries = fresh
        return result


def _compare(ext: Extent, i: int, old: int, new: int, now: float, out: ScanResult) -> None:
    old_pfn, new_pfn = entry_pfn(old), entry_pfn(new)
    if old_pfn == new_pfn:
        return  # only flag bits (soft-dirty, exclusive) changed
    if old_pfn:
        out.remove.append(old_pfn)
    if new_pfn:
        out.add.append(new_pfn)
        if old_pfn:
            out.moved += 1
        else:
            out.returned += 1
            ext.lost[i] = 0
        return
    ext.lost[i] = 1
    out.ages.append(max(0.0, now - ext.reserved_at))
    if new & SWAPPED:
        out.swapped += 1
    else:
        out.dropped += 1
