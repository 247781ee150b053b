"""Where a VM's guest-physical pages live on the host, and how to free and measure them.

:class:`RamLayout` maps guest frame numbers to offsets in the VM's RAM backing (the ``pc``
machine puts RAM above 3.5 GiB at 4 GiB; a frame outside every region is not the VM's RAM and
is refused). A :class:`PageBacking` frees the backing of reserved frames and measures, on the
host, how many of them are still resident:

- :class:`FileBacking`: a file (the VM's swap file, C4) or a memfd opened through
  ``/proc/QEMUPID/fd/N``. Frees with ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` and measures with
  ``mincore`` over a read-only shared mapping of the file. On this host ext4 page cache uses
  2 MiB folios: punching 4 KiB pages frees disk blocks but not memory, so file backings ask
  for ``block_pages = 512`` and are only punched in whole, aligned 2 MiB blocks.
- :class:`AnonKsmBacking`: QEMU's anonymous RAM. No process can drop another's anonymous
  pages, so nothing is punched: the agent's reserved pages are zero-filled and KSM (QEMU's
  ``mem-merge=on``) merges them into the zero page or one KSM page. Residency is measured in
  QEMU's ``/proc/PID/pagemap`` + ``/proc/kpageflags``: a present page that is neither the
  zero page nor a KSM page still costs memory. Without KSM running it frees nothing, which
  the measurement shows; the manager then uses virtio-balloon for that VM.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from memvisor.agent.protocol import PageRange
from memvisor.errors import BackendError, PermissionNeededError

PAGE = 4096
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
KPF_ZERO_PAGE = 1 << 24
KPF_KSM = 1 << 21
_PROT_READ = 1
_MAP_SHARED = 1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


@dataclass(frozen=True, slots=True)
class RamRegion:
    first_pfn: int
    pages: int
    file_offset: int  # byte offset of first_pfn in the backing


@dataclass(frozen=True, slots=True)
class RamLayout:
    """Guest-physical RAM of one VM as regions of its backing."""

    regions: tuple[RamRegion, ...]

    @classmethod
    def pc(cls, ram_bytes: int) -> RamLayout:
        """QEMU ``pc`` (i440fx): RAM up to 3.5 GiB at 0, the rest at 4 GiB."""
        return cls._split(ram_bytes, 0xE000_0000 if ram_bytes >= 0xE000_0000 else ram_bytes)

    @classmethod
    def q35(cls, ram_bytes: int) -> RamLayout:
        """QEMU ``q35``: 2 GiB below 4 GiB once RAM reaches 2.75 GiB."""
        return cls._split(ram_bytes, 0x8000_0000 if ram_bytes >= 0xB000_0000 else ram_bytes)

    @classmethod
    def _split(cls, ram_bytes: int, low: int) -> RamLayout:
        regions = [RamRegion(0, low // PAGE, 0)]
        if ram_bytes > low:
            regions.append(RamRegion((1 << 32) // PAGE, (ram_bytes - low) // PAGE, low))
        return cls(tuple(regions))

    @property
    def pages(self) -> int:
        return sum(r.pages for r in self.regions)

    @property
    def end_pfn(self) -> int:
        return max(r.first_pfn + r.pages for r in self.regions)

    def contains(self, rng: PageRange) -> bool:
        start, count = rng
        return any(
            r.first_pfn <= start and start + count <= r.first_pfn + r.pages for r in self.regions
        )

    def file_spans(self, rng: PageRange) -> list[tuple[int, int]]:
        """(offset, length) in bytes of a range that lies inside one region."""
        start, count = rng
        for r in self.regions:
            if r.first_pfn <= start and start + count <= r.first_pfn + r.pages:
                return [(r.file_offset + (start - r.first_pfn) * PAGE, count * PAGE)]
        raise BackendError(f"pages {start}..{start + count - 1} are outside the VM's RAM")


class PageBacking(Protocol):
    """Frees and measures guest frames of one VM (ranges already validated in its layout)."""

    @property
    def block_pages(self) -> int: ...

    @property
    def mechanism(self) -> str: ...

    def free(self, ranges: Sequence[PageRange]) -> None: ...

    def resident_pages(self, ranges: Iterable[PageRange]) -> int: ...


class FileBacking:
    """Guest RAM in a file (or memfd): punch holes, measure with mincore."""

    mechanism = "punch-hole"

    def __init__(self, path: str, layout: RamLayout, block_pages: int = 512) -> None:
        self.path = path
        self.layout = layout
        self.block_pages = block_pages
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except PermissionError as exc:
            raise PermissionNeededError(
                f"{path}: cannot open the VM's RAM backing: {exc}"
            ) from None
        except OSError as exc:
            raise BackendError(f"{path}: cannot open the VM's RAM backing: {exc}") from None
        self._size = os.fstat(self._fd).st_size
        addr = _libc.mmap(None, max(self._size, PAGE), _PROT_READ, _MAP_SHARED, self._fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise BackendError(
                f"{path}: mmap for mincore failed: {os.strerror(ctypes.get_errno())}"
            )
        self._addr: int = addr

    def close(self) -> None:
        if self._fd >= 0:
            _libc.munmap(self._addr, max(self._size, PAGE))
            os.close(self._fd)
            self._fd = -1

    def free(self, ranges: Sequence[PageRange]) -> None:
        for rng in ranges:
            for offset, length in self.layout.file_spans(rng):
                if offset + length > self._size:
                    raise BackendError(f"{self.path}: range beyond the end of the backing")
                if (
                    _libc.fallocate(
                        self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length
                    )
                    != 0
                ):
                    err = ctypes.get_errno()
                    raise BackendError(f"{self.path}: punch hole failed: {os.strerror(err)}")

    def resident_pages(self, ranges: Iterable[PageRange]) -> int:
        total = 0
        for rng in ranges:
            for offset, length in self.layout.file_spans(rng):
                total += self._mincore(offset, min(length, max(0, self._size - offset)))
        return total

    def resident_total(self) -> int:
        """Resident pages of the whole backing."""
        return self._mincore(0, self._size)

    def _mincore(self, offset: int, length: int) -> int:
        if length <= 0:
            return 0
        vec = (ctypes.c_ubyte * (length // PAGE))()
        if _libc.mincore(self._addr + offset, length, vec) != 0:
            raise BackendError(f"{self.path}: mincore failed: {os.strerror(ctypes.get_errno())}")
        return sum(b & 1 for b in bytes(vec))


class AnonKsmBacking:
    """QEMU's anonymous guest RAM: frees through KSM zero-page merging, measures in pagemap."""

    mechanism = "ksm-zero-merge"
    block_pages = 1

    def __init__(self, qemu_pid: int, ram_hva: int, layout: RamLayout) -> None:
        """``ram_hva``: QEMU's virtual address of guest RAM offset 0 (HMP ``gpa2hva 0``)."""
        self.layout = layout
        self.ram_hva = ram_hva
        try:
            self._pagemap = os.open(f"/proc/{qemu_pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self._kpageflags = os.open("/proc/kpageflags", os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError as exc:
            raise PermissionNeededError(f"needs root to read page tables: {exc}") from None
        except OSError as exc:
            raise BackendError(f"cannot read QEMU {qemu_pid}'s pagemap: {exc}") from None

    def close(self) -> None:
        os.close(self._pagemap)
        os.close(self._kpageflags)

    def free(self, ranges: Sequence[PageRange]) -> None:
        """Nothing to do: the pages are zero and KSM merges them."""

    def resident_pages(self, ranges: Iterable[PageRange]) -> int:
        total = 0
        for rng in ranges:
            for offset, length in self.layout.file_spans(rng):
                total += self._own_pages(self.ram_hva + offset, length // PAGE)
        return total

    def _own_pages(self, addr: int, npages: int) -> int:
        data = os.pread(self._pagemap, npages * 8, addr // PAGE * 8)
        own = 0
        for entry in struct.unpack(f"<{len(data) // 8}Q", data):
            if not entry >> 63:
                continue
            pfn = entry & ((1 << 55) - 1)
            flags = struct.unpack("<Q", os.pread(self._kpageflags, 8, pfn * 8) or bytes(8))[0]
            if not flags & (KPF_ZERO_PAGE | KPF_KSM):
                own += 1
        return own


def punchable_blocks(held: bytearray, touched: Iterable[PageRange], block: int) -> list[PageRange]:
    """Whole aligned blocks inside ``touched`` ranges whose every page is held (1 in ``held``)."""
    out: set[int] = set()
    for start, count in touched:
        for b in range(start // block, (start + count - 1) // block + 1):
            lo = b * block
            if lo + block <= len(held) and held.find(0, lo, lo + block) < 0:
                out.add(b)
    return [(b * block, block) for b in sorted(out)]
