"""The agent's bulk read-back of swapped memory: which mappings, and the real syscall."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from memvisor.agent import prefetch as pf

SMAPS = """\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/bin/python3
Size:                328 kB
Swap:                  0 kB
7f0000000000-7f0004000000 rw-p 00000000 00:00 0
Size:              65536 kB
Rss:               16384 kB
Swap:              49152 kB
SwapPss:           49152 kB
7f1000000000-7f1000200000 rw-p 00000000 00:00 0
Swap:               1024 kB
"""


def test_swapped_ranges_are_the_mappings_with_swap() -> None:
    got = pf.swapped_ranges(SMAPS)
    assert got == [
        pf.SwappedRange(0x7F0000000000, 64 << 20, 48 << 20),
        pf.SwappedRange(0x7F1000000000, 2 << 20, 1 << 20),
    ]


def test_plan_takes_the_largest_first_up_to_the_limit(tmp_path: Path) -> None:
    for pid, text in (("11", SMAPS), ("12", SMAPS.replace("49152", "8192")), ("13", SMAPS)):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "smaps").write_text(text)
    (tmp_path / "self").mkdir()
    chosen = pf.plan(50 << 20, exclude={13}, proc=str(tmp_path))
    assert list(chosen) == [11, 12]  # 48 MiB from 11, then 12's 8 MiB mapping crosses 50 MiB
    assert [r.swapped for r in chosen[11]] == [48 << 20]
    assert [r.swapped for r in chosen[12]] == [8 << 20]


def test_willneed_is_the_real_syscall_on_a_real_process() -> None:
    """This host has no swap, so nothing is read back; the call itself must succeed on a
    mapping of this process and fail with the kernel's error on a range that is not mapped."""
    with mmap.mmap(-1, 1 << 20) as m:
        m[:] = b"x" * (1 << 20)
        import ctypes

        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        try:
            done = pf.willneed(os.getpid(), [pf.SwappedRange(addr, 1 << 20, 0)])
            assert done == 1 << 20
        finally:
            del addr
    try:
        pf.willneed(os.getpid(), [pf.SwappedRange(0x1000, 4096, 0)])
    except OSError as exc:
        assert "process_madvise" in str(exc)
    else:
        raise AssertionError("advice on an unmapped range was accepted")
    assert pf.willneed(2**22 + 12345, []) == 0  # no such process
    if len(Path("/proc/swaps").read_text().splitlines()) <= 1:  # no swap device here
        assert pf.prefetch(1 << 30) == 0
