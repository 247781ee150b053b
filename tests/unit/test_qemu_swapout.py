"""Swap-out: range arithmetic (pure) and the real write-back -> PAGEOUT -> DONTNEED sequence on a
file this test process maps itself."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from memvisor.backends.qemu import hostmem, swapout
from memvisor.errors import InputError
from memvisor.units import PAGE_SIZE, GiB, MiB


def test_align_ranges_widens_to_2mib_and_merges() -> None:
    assert swapout.align_ranges([(4096, 4096)], 64 * MiB) == [(0, 2 * MiB)]
    assert swapout.align_ranges([(0, 4096), (2 * MiB - 4096, 8192)], 64 * MiB) == [(0, 4 * MiB)]
    assert swapout.align_ranges([(63 * MiB, 4 * MiB)], 64 * MiB) == [(62 * MiB, 2 * MiB)]
    assert swapout.align_ranges([(0, 0)], 64 * MiB) == []


def test_choose_chunks_goes_top_down_and_respects_the_cap() -> None:
    resident = np.zeros(16 * MiB // PAGE_SIZE, dtype=bool)
    resident[: 4 * MiB // PAGE_SIZE] = True  # low memory
    resident[-(2 * MiB) // PAGE_SIZE :] = True  # the top chunk
    assert swapout.choose_chunks(resident, 2 * MiB) == [(14 * MiB, 2 * MiB)]
    assert swapout.choose_chunks(resident, 3 * MiB) == [(2 * MiB, 2 * MiB), (14 * MiB, 2 * MiB)]
    assert swapout.choose_chunks(resident, 3 * MiB, cap=3 * MiB) == [(14 * MiB, 2 * MiB)]
    assert swapout.choose_chunks(resident, 0) == []


def test_pc_file_spans_handle_the_pci_hole() -> None:
    assert swapout.pc_file_spans(4096, 8192, 256 * MiB) == [(4096, 8192)]
    four_g = 4 * GiB
    mem = 4 * GiB
    assert swapout.pc_file_spans(four_g, 4096, mem) == [(0xE000_0000, 4096)]
    with pytest.raises(InputError):
        swapout.pc_file_spans(255 * MiB, 2 * MiB, 256 * MiB)


def test_page_out_frees_the_page_cache_and_keeps_the_data(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: process_madvise")
    path = tmp_path / "ram.img"
    size = 16 * MiB
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED)
        data = os.urandom(size)
        m[:] = data
        before = int(hostmem.file_resident_pages(path).sum())
        assert before == size // PAGE_SIZE
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        swapout.page_out(os.getpid(), fd, base, [(4 * MiB, 8 * MiB)])
        resident = hostmem.file_resident_pages(path)
        assert not resident[4 * MiB // PAGE_SIZE : 12 * MiB // PAGE_SIZE].any()
        assert resident[: 4 * MiB // PAGE_SIZE].all()
        fm = hostmem.file_memory(path)
        assert fm.swapped == 8 * MiB and fm.on_disk == 8 * MiB  # the rest is still dirty
        assert m[:] == data  # faults back from the file intact
        m.close()
    finally:
        os.close(fd)
