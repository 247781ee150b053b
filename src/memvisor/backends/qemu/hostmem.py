"""Measure guest RAM on the host, never through QEMU's RSS (which lies here).

- File backing: page-cache residency of the VM's file (``mincore`` over a read-only shared
  mapping of it), and which parts of the file hold data on disk (``FIEMAP``: written extents;
  ``posix_fallocate``'s extents stay "unwritten" until a page is written back).
- Anonymous backing: ``/proc/PID/smaps`` of exactly the guest RAM mapping (found through QMP
  ``gpa2hva 0`` and checked against its size), and ``/proc/PID/ksm_merging_pages``.
- Host: ``/proc/meminfo`` and ``/sys/kernel/mm/ksm``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from memvisor.errors import BackendError
from memvisor.model import KsmStats
from memvisor.units import PAGE_SIZE

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_BATCH = 256
KSM_DIR = Path("/sys/kernel/mm/ksm")


def file_resident_pages(path: Path) -> npt.NDArray[np.bool_]:
    """One bool per 4 KiB page of the file: is it in the page cache? (Mapping a file read-only
    and calling ``mincore`` faults nothing in.)"""
    size = os.stat(path).st_size
    npages = -(-size // PAGE_SIZE)
    if npages == 0:
        return np.zeros(0, dtype=bool)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise BackendError(f"mmap {path}: {os.strerror(ctypes.get_errno())}")
        try:
            vec = (ctypes.c_ubyte * npages)()
            if _libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise BackendError(f"mincore {path}: {os.strerror(ctypes.get_errno())}")
        finally:
            _libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    return (np.frombuffer(bytes(vec), dtype=np.uint8) & 1).astype(bool)


def written_extents(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the file's extents that hold written data (not holes, not
    fallocated-but-unwritten). Empty if the filesystem has no FIEMAP (e.g. tmpfs)."""
    out: list[tuple[int, int]] = []
    start = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while True:
            head = struct.pack("=QQIIII", start, 2**64 - 1 - start, 0, 0, _FIEMAP_BATCH, 0)
            buf = bytearray(head + bytes(56 * _FIEMAP_BATCH))
            try:
                fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
            except OSError:
                return []
            mapped = struct.unpack_from("=I", buf, 20)[0]
            last = False
            for i in range(mapped):
                logical, _phys, length = struct.unpack_from("=QQQ", buf, 32 + 56 * i)
                flags = struct.unpack_from("=I", buf, 32 + 56 * i + 40)[0]
                if not flags & FIEMAP_EXTENT_UNWRITTEN:
                    out.append((logical, length))
                start = logical + length
                last = bool(flags & FIEMAP_EXTENT_LAST)
            if mapped == 0 or last:
                return out
    finally:
        os.close(fd)


def pages_in_extents(extents: list[tuple[int, int]], npages: int) -> npt.NDArray[np.bool_]:
    """One bool per page: does the page lie in one of ``extents``?"""
    marks = np.zeros(npages, dtype=bool)
    for offset, length in extents:
        marks[offset // PAGE_SIZE : -(-(offset + length) // PAGE_SIZE)] = True
    return marks


@dataclass(frozen=True, slots=True)
class FileMemory:
    """Where a file-backed VM's guest RAM is, in bytes."""

    resident: int  # in the host's page cache (costs host memory)
    on_disk: int  # written to the VM's swap file
    swapped: int  # on disk and not resident: evicted to the VM's own file


def file_memory(path: Path) -> FileMemory:
    resident = file_resident_pages(path)
    written = pages_in_extents(written_extents(path), len(resident))
    return FileMemory(
        resident=int(resident.sum()) * PAGE_SIZE,
        on_disk=int(written.sum()) * PAGE_SIZE,
        swapped=int((written & ~resident).sum()) * PAGE_SIZE,
    )


def parse_smaps_entry(text: str, start: int) -> dict[str, int]:
    """The kB fields (as bytes) of the mapping starting at ``start`` in a smaps text."""
    fields: dict[str, int] = {}
    inside = False
    for line in text.splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            lo = int(head.split("-")[0], 16)
            if inside:
                break
            inside = lo == start
            if inside:
                fields["size_range"] = int(head.split("-")[1], 16) - lo
            continue
        if inside and line.endswith(" kB"):
            key, _, value = line.partition(":")
            fields[key] = int(value.split()[0]) * 1024
    if not inside and "size_range" not in fields:
        raise BackendError(f"no mapping starts at {start:#x} in smaps")
    return fields


def ram_smaps(pid: int, start: int) -> dict[str, int]:
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError as exc:
        raise BackendError(f"/proc/{pid}/smaps: {exc}") from exc
    return parse_smaps_entry(text, start)


def clear_referenced(pid: int) -> None:
    """Clear the accessed bits of every page of ``pid`` (working-set sampling)."""
    Path(f"/proc/{pid}/clear_refs").write_text("1")


def ksm_merging_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/ksm_merging_pages").read_text()) * PAGE_SIZE
    except (OSError, ValueError):
        return 0


def meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts:
            out[key] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


def _ksm_value(name: str) -> int:
    try:
        return int((KSM_DIR / name).read_text())
    except (OSError, ValueError):
        return 0


def ksm_stats() -> KsmStats:
    return KsmStats(
        run=_ksm_value("run"),
        pages_shared=_ksm_value("pages_shared"),
        pages_sharing=_ksm_value("pages_sharing"),
        pages_to_scan=_ksm_value("pages_to_scan"),
        sleep_millisecs=_ksm_value("sleep_millisecs"),
        full_scans=_ksm_value("full_scans"),
    )
