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


def test_choose_chunks_takes_hot_chunks_last() -> None:
    resident = np.ones(8 * MiB // PAGE_SIZE, dtype=bool)  # four chunks, all resident
    hot = np.array([False, False, True, True])  # the top two came back after an eviction
    assert swapout.choose_chunks(resident, 2 * MiB, hot=hot) == [(2 * MiB, 2 * MiB)]
    # cold ones first (top-down), then hot ones (top-down) once the cold ones are not enough
    assert swapout.choose_chunks(resident, 6 * MiB, hot=hot) == [(0, 4 * MiB), (6 * MiB, 2 * MiB)]
    with pytest.raises(InputError, match="3 entries for 4 chunks"):
        swapout.choose_chunks(resident, 2 * MiB, hot=hot[:3])


def test_refault_tracker_marks_chunks_that_came_back_hot_for_a_while() -> None:
    tracker = swapout.RefaultTracker(4, protect=60.0)
    resident = np.ones(8 * MiB // PAGE_SIZE, dtype=bool)
    assert tracker.update(resident, 0.0) == 0  # nothing evicted yet: nothing came back
    tracker.evicted([(4 * MiB, 4 * MiB)])  # chunks 2 and 3
    resident[4 * MiB // PAGE_SIZE :] = False
    resident[6 * MiB // PAGE_SIZE] = True  # one page of chunk 3 faulted back
    assert tracker.update(resident, 10.0) == 1  # its resident pages
    assert tracker.hot(10.0).tolist() == [False, False, False, True]
    assert tracker.update(resident, 11.0) == 0  # seen back once, counted once
    assert tracker.came_back == 1
    assert tracker.hot(69.9).tolist() == [False, False, False, True]
    assert not tracker.hot(70.0).any()  # protection over: tried again like any other chunk
    resident[4 * MiB // PAGE_SIZE : 5 * MiB // PAGE_SIZE] = True  # chunk 2 comes back, in part
    assert tracker.update(resident, 80.0) == 256
    assert tracker.came_back == 2
    assert tracker.hot(80.0).tolist() == [False, False, True, False]
    with pytest.raises(InputError, match="3 chunks, tracker 4"):
        tracker.update(resident[: 6 * MiB // PAGE_SIZE], 81.0)
