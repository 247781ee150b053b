"""The agent's bulk read-back of swapped memory: which mappings, and the real syscall."""

from __future__ import annotations

import mmap
import os
from array import array
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


def test_mappings_come_the_most_swapped_first(tmp_path: Path) -> None:
    for pid, text in (("11", SMAPS), ("12", SMAPS.replace("49152", "8192")), ("13", SMAPS)):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "smaps").write_text(text)
    (tmp_path / "self").mkdir()
    (tmp_path / "14").mkdir()  # exited: no smaps
    got = pf.swapped_mappings({13}, proc=str(tmp_path))
    assert [(pid, r.swapped >> 20) for pid, r in got] == [(11, 48), (12, 8), (11, 1), (12, 1)]


def _pagemap(flags: list[int]) -> bytes:
    return array("Q", flags).tobytes()


S, P = pf.PM_SWAPPED | 123, (1 << 63) | 456  # a swap entry, a present page
K = 4096


def test_swapped_runs_are_the_swapped_pages_only() -> None:
    base = 0x7F0000000000
    flags = [P, S, S, 0, S, P, S, S, S]
    assert pf.swapped_runs(base, _pagemap(flags)) == [
        (base + K, base + 3 * K),
        (base + 4 * K, base + 5 * K),
        (base + 6 * K, base + 9 * K),
    ]
    assert pf.swapped_runs(base, _pagemap([P, 0, P])) == []
    assert pf.swapped_runs(base, b"\x00" * 13) == []  # a torn read: whole entries only


def test_without_cuts_the_taken_intervals_out() -> None:
    runs = [(0, 10), (20, 30), (40, 50)]
    assert pf.without(runs, []) == runs
    assert pf.without(runs, [(25, 45), (5, 8), (0, 2), (6, 9)]) == [
        (2, 5),
        (9, 10),
        (20, 25),
        (45, 50),
    ]
    assert pf.without(runs, [(0, 100)]) == []
    assert pf.without(runs, [(10, 20), (30, 40)]) == runs  # touching, not overlapping


class _Guest:
    """/proc of a guest whose workload (pid 7) has a 300 MiB mapping, 280 MiB of it in swap,
    and another process (pid 9) an 8 MiB mapping all in swap."""

    MIB = 256  # pages

    def __init__(self) -> None:
        self.big = pf.SwappedRange(0x7F0000000000, 300 << 20, 280 << 20)
        self.small = pf.SwappedRange(0x7F1000000000, 8 << 20, 8 << 20)
        self.maps = {
            self.big.start: [P] * (20 * self.MIB) + [S] * (280 * self.MIB),
            self.small.start: [S] * (8 * self.MIB),
        }
        self.now = 0.0
        self.reads: list[int] = []
        self.advised: list[tuple[int, list[pf.SwappedRange]]] = []
        self.exited: set[int] = set()

    def smaps(self, path: str) -> str:
        pid = int(path.split("/")[-2])
        if pid in self.exited:
            raise FileNotFoundError(path)
        r = self.big if pid == 7 else self.small
        return f"{r.start:x}-{r.start + r.length:x} rw-p 0 00:00 0\nSwap: {r.swapped >> 10} kB\n"

    def pagemap(self, pid: int, start: int, pages: int) -> bytes:
        if pid in self.exited:
            raise ProcessLookupError(pid)
        self.reads.append(pid)
        return _pagemap(self.maps[start][:pages])

    def advise(self, pid: int, ranges: list[pf.SwappedRange]) -> int:
        self.advised.append((pid, ranges))
        return sum(r.length for r in ranges)

    def prefetcher(self, proc: Path) -> pf.Prefetcher:
        for pid in ("7", "9"):
            (proc / pid).mkdir(exist_ok=True)
        return pf.Prefetcher(
            lambda: self.now,
            read_file=self.smaps,
            read_pagemap=self.pagemap,
            advise=self.advise,
            proc=str(proc),
        )


def test_advice_covers_the_limit_exactly_and_never_the_same_pages_twice(tmp_path: Path) -> None:
    """A 24 MiB release to a guest whose workload has 280 MiB in swap advises 24 MiB of its
    swapped pages, not the mapping; the next request's release advises the next pages (those
    advised are still swap entries in the page table); after the ttl they count again."""
    g = _Guest()
    pre = g.prefetcher(tmp_path)
    start = g.big.start + (20 << 20)  # the first swapped page
    assert pre(24 << 20) == 24 << 20
    assert g.advised == [(7, [pf.SwappedRange(start, 24 << 20, 24 << 20)])]
    assert g.reads == [7]  # the budget was spent: 9's pagemap not read
    g.now = 5.0
    assert pre(24 << 20) == 24 << 20
    assert g.advised[1] == (7, [pf.SwappedRange(start + (24 << 20), 24 << 20, 24 << 20)])
    assert pre(1 << 30) == (280 - 48 + 8) << 20  # the rest of 7, then 9
    assert [pid for pid, _ in g.advised[2:]] == [7, 9]
    assert pre(1 << 20) == 0  # everything advised
    g.now = 5.0 + pre.ttl + 1  # the first two expired (a swap-cache page may be dropped again)
    assert pre(1 << 20) == 1 << 20 and g.advised[-1][1][0].start == start
    g.exited.add(7)
    g.now += pre.ttl + 1
    assert pre(1 << 30) == 8 << 20  # 7 exited between listing and reading: skipped


def test_a_process_without_the_advice_is_not_remembered(tmp_path: Path) -> None:
    g = _Guest()
    pre = g.prefetcher(tmp_path)
    pre.advise = lambda pid, ranges: 0  # gone before the advice
    assert pre(1 << 20) == 0 and pre.advised == {}


def test_the_real_pagemap_of_this_process() -> None:
    """This process's own touched memory is present, not swapped (this host has no swap), so
    nothing is advised."""
    with mmap.mmap(-1, 1 << 20) as m:
        m[:] = b"x" * (1 << 20)
        import ctypes

        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        try:
            raw = pf._read_pagemap(os.getpid(), addr, 256)
            assert len(raw) == 256 * 8 and all(e & (1 << 63) for e in array("Q", raw))
            assert pf.swapped_runs(addr, raw) == []
        finally:
            del addr


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
        assert pf.Prefetcher(lambda: 0.0)(1 << 30) == 0
