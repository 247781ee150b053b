"""The in-guest agent, run on the host: real mmap, real /proc/self/pagemap (root), a real
agent process over a unix socket with the real host session and link.

Page-out cannot be forced on this host (no swap; THP are never compaction sources), so the
detection logic is tested with a pagemap reader that rewrites chosen entries of the real
one. The real page-out test runs in a guest with zram swap (tests/e2e/test_agent_e2e.py).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.agent import protocol as p
from memvisor.agent.backing import RamLayout, RamRegion
from memvisor.agent.guest import Agent, _parse_meminfo, _parse_vmstat, find_port
from memvisor.agent.host import AgentSession, AgentState
from memvisor.agent.link import AgentLink
from memvisor.agent.prefetch import READ_STEP
from memvisor.agent.reserve import PRESENT, SWAPPED, ProcPagemap, Reservation, entry_pfn
from memvisor.backends.base import ManualClock, RealClock

KPF_ANON = 1 << 12
KPF_THP = 1 << 22


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: /proc/self/pagemap hides frame numbers from other users")


class RewritingPagemap:
    """The real pagemap, with chosen virtual pages' entries replaced (swap, move, drop)."""

    def __init__(self) -> None:
        self.real = ProcPagemap()
        self.override: dict[int, int] = {}  # virtual page number -> raw entry

    def read(self, addr: int, npages: int) -> list[int]:
        entries = self.real.read(addr, npages)
        first = addr // 4096
        return [self.override.get(first + i, e) for i, e in enumerate(entries)]


class Wire:
    def __init__(self) -> None:
        self.lines: list[p.GuestMessage] = []

    def __call__(self, data: bytes) -> None:
        self.lines += [p.decode_guest_message(x) for x in data.splitlines()]

    def take(self) -> list[p.GuestMessage]:
        out, self.lines = self.lines, []
        return out


def thp_switch(tmp_path: Path, text: str = "always [madvise] never\n") -> str:
    """A stand-in for the THP switch: tests must not change the host's setting."""
    path = tmp_path / "thp-enabled"
    path.write_text(text)
    return str(path)


def min_free_switch(tmp_path: Path) -> str:
    path = tmp_path / "min_free_kbytes"
    path.write_text("1024\n")
    return str(path)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[Agent, RewritingPagemap, Wire, ManualClock]]:
    require_root()
    pagemap, wire, clock = RewritingPagemap(), Wire(), ManualClock(1000.0)
    reservation = Reservation(pagemap, 512, clock.now)
    reservation.thp_control = thp_switch(tmp_path)
    reservation.min_free_control = min_free_switch(tmp_path)
    a = Agent(reservation, wire, clock.now)
    a.connected()
    a.receive_line(p.encode(p.Welcome(1, 512, 1.0, 1.0))[:-1])
    yield a, pagemap, wire, clock
    a.reservation.release_all()


def test_reserve_reports_aligned_huge_blocks_of_real_anonymous_thp(agent) -> None:  # type: ignore[no-untyped-def]
    a, _, wire, _ = agent
    assert [m.TYPE for m in wire.take()] == ["hello", "pages"]
    a.receive_line(p.encode(p.Reserve(1, 8 * 512))[:-1])
    pages, done = wire.take()
    assert isinstance(pages, p.Pages) and isinstance(done, p.Done)
    assert (done.requested, done.achieved, done.held) == (4096, 4096, 4096)
    assert p.range_pages(pages.add) == 4096
    assert all(s % 512 == 0 and c % 512 == 0 for s, c in pages.add)
    with open("/proc/kpageflags", "rb") as f:
        for start, _ in pages.add:
            f.seek(start * 8)
            (flags,) = struct.unpack("<Q", f.read(8))
            assert flags & KPF_ANON and flags & KPF_THP
    assert a.reservation.held_ranges() == list(pages.add)


def test_release_gives_back_paged_out_pages_first(agent) -> None:  # type: ignore[no-untyped-def]
    a, pagemap, wire, clock = agent
    a.receive_line(p.encode(p.Reserve(1, 3 * 512))[:-1])
    wire.take()
    middle = a.reservation.extents[1]
    pagemap.override[middle.addr // 4096] = SWAPPED | 77  # a swap entry
    clock.advance(1.0)
    a.tick()
    a.receive_line(p.encode(p.Release(2, 512))[:-1])
    msgs = wire.take()
    release = [m for m in msgs if isinstance(m, p.Pages) and m.reason == "release"]
    assert p.range_pages(release[0].remove) == 511  # the swapped page has no frame
    assert a.reservation.held == 1024 and a.reservation.swapped == 0


def _fake_proc(a: Agent) -> tuple[dict[str, int], dict[str, str]]:
    """Make the agent read the swap-in counter and the free-memory figures from two dicts the
    test changes (the rest of /proc stays real); returns them."""
    vmstat = {"pswpin": 0}
    files = {"/proc/meminfo": "MemFree: 65536 kB\n", "/proc/sys/vm/min_free_kbytes": "1024\n"}
    a.read_file = lambda path: (
        f"pswpin {vmstat['pswpin']}\n"
        if path == "/proc/vmstat"
        else files.get(path) or _real_read(path)
    )
    return vmstat, files


def test_a_release_prefetches_only_while_the_guest_pages_in(agent, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A release while the guest reads its swap back at >= 1 MiB/s asks for the released
    amount of swapped memory to be read back in bulk; a release in a quiet guest does not."""
    a, _, wire, clock = agent
    vmstat, files = _fake_proc(a)
    asked: list[int] = []
    a.prefetch = lambda limit: asked.append(limit) or limit
    a.receive_line(p.encode(p.Reserve(1, 4 * 512))[:-1])
    wire.take()
    for _ in range(2):  # quiet: 10 pages/s
        vmstat["pswpin"] += 10
        clock.advance(1.0)
        a.tick()
    a.receive_line(p.encode(p.Release(2, 512))[:-1])
    assert asked == [] and a.swapin_rate == 10
    vmstat["pswpin"] += 5000  # the workload faults its memory back
    clock.advance(1.0)
    a.tick()
    a.receive_line(p.encode(p.Release(3, 512))[:-1])
    assert asked == [512 * 4096] and a.prefetched == 512 * 4096
    # no more than the guest has free above twice its min watermark
    files["/proc/meminfo"] = "MemFree: 3072 kB\n"  # 1 MiB above 2 x 1 MiB
    vmstat["pswpin"] += 5000
    clock.advance(1.0)
    a.tick()
    a.receive_line(p.encode(p.Release(4, 512))[:-1])
    assert asked[1:] == [1 << 20]
    files["/proc/meminfo"] = "MemFree: 2048 kB\n"  # all of it below the watermark: nothing
    vmstat["pswpin"] += 5000
    clock.advance(1.0)
    a.tick()
    a.receive_line(p.encode(p.Release(5, 512))[:-1])
    assert len(asked) == 2


def test_the_read_back_is_paced_and_stops_when_the_host_reserves_again(agent) -> None:  # type: ignore[no-untyped-def]
    """A release while the guest pages in is read back in chunks of read_rate x READ_STEP, one
    chunk per step (tick() wakes the agent for it), never more than the guest has room for;
    the read-back ends when the swap has nothing left to read or the host reserves again."""
    a, _, wire, clock = agent
    vmstat, files = _fake_proc(a)
    asked: list[int] = []
    swapped = {"left": 10 << 20}  # what the guest has in swap to read

    def prefetch(limit: int) -> int:
        asked.append(limit)
        got = min(limit, swapped["left"])
        swapped["left"] -= got
        return got

    a.prefetch = prefetch
    a.read_rate = 4 << 20  # 1 MiB per step of 0.25 s
    chunk = int(a.read_rate * READ_STEP)
    a.receive_line(p.encode(p.Reserve(1, 4 * 512))[:-1])
    wire.take()
    clock.advance(1.0)
    a.tick()
    vmstat["pswpin"] += 5000  # the workload faults its memory back
    clock.advance(1.0)
    a.tick()
    a.receive_line(p.encode(p.Release(2, 3 * 512))[:-1])  # 6 MiB
    assert asked == [chunk]  # the first chunk at once
    assert a.tick() <= READ_STEP  # the agent wakes for the next one
    assert asked == [chunk]  # not before its time
    for _ in range(2):
        clock.advance(READ_STEP)
        a.tick()
    assert asked == [chunk] * 3 and a.prefetched == 3 * chunk
    files["/proc/meminfo"] = "MemFree: 2560 kB\n"  # 512 KiB above 2 x min_free_kbytes
    clock.advance(READ_STEP)
    a.tick()
    assert asked[-1] == 512 << 10  # no more than the room
    files["/proc/meminfo"] = "MemFree: 65536 kB\n"
    a.receive_line(p.encode(p.Reserve(3, 512))[:-1])  # the host wants memory again
    for _ in range(4):
        clock.advance(READ_STEP)
        a.tick()
    assert len(asked) == 4
    # a release larger than what is left in swap ends when nothing more is covered
    vmstat["pswpin"] += 5000
    clock.advance(1.0)
    a.tick()
    swapped["left"] = chunk // 2
    a.receive_line(p.encode(p.Release(4, 4 * 512))[:-1])  # 8 MiB
    for _ in range(4):
        clock.advance(READ_STEP)
        a.tick()
    assert asked[4:] == [chunk, chunk]  # half a chunk covered, then nothing: done
    assert a.prefetched == 3 * chunk + (512 << 10) + chunk // 2


def _real_read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_scan_detects_swapped_moved_dropped_and_returned_pages(agent) -> None:  # type: ignore[no-untyped-def]
    a, pagemap, wire, clock = agent
    a.receive_line(p.encode(p.Reserve(1, 1024))[:-1])
    wire.take()
    ext = a.reservation.extents[0]
    vpn = ext.addr // 4096
    old = [entry_pfn(e) for e in ext.entries[:4]]
    pagemap.override.update(
        {vpn: SWAPPED | 5, vpn + 1: SWAPPED | 6, vpn + 2: PRESENT | 999_999, vpn + 3: 0}
    )
    clock.advance(30.0)
    a.tick()
    msgs = wire.take()
    pages = next(m for m in msgs if isinstance(m, p.Pages))
    out = next(m for m in msgs if isinstance(m, p.PageOut))
    assert pages.reason == "moved" and pages.add == ((999_999, 1),)
    assert sorted(pages.remove) == p.compact_ranges(old)
    assert (out.swapped, out.moved, out.dropped, out.total_swapped) == (2, 1, 1, 3)
    assert out.age_min == out.age_max == 30.0 and out.age_hist[p.age_bucket(30.0)] == 3
    assert out.rate == pytest.approx(3 / 10)
    # The swapped page comes back (at a new frame): re-reported so the host frees it.
    pagemap.override[vpn] = PRESENT | 888_888
    clock.advance(1.0)
    a.tick()
    back = next(m for m in wire.take() if isinstance(m, p.Pages))
    assert back.reason == "returned" and back.add == ((888_888, 1),) and back.remove == ()
    assert a.reservation.swapped == 2


def test_changes_while_disconnected_arrive_with_the_resync(agent) -> None:  # type: ignore[no-untyped-def]
    a, pagemap, wire, clock = agent
    a.receive_line(p.encode(p.Reserve(1, 512))[:-1])
    wire.take()
    a.disconnected()
    pagemap.override[a.reservation.extents[0].addr // 4096] = SWAPPED | 1
    clock.advance(2.0)
    a.tick()
    assert wire.take() == []
    a.connected()
    hello = wire.take()[0]
    assert isinstance(hello, p.Hello) and hello.held == 512
    a.receive_line(p.encode(p.Welcome(1, 512, 1.0, 1.0))[:-1])
    resync, pageout = wire.take()
    assert isinstance(resync, p.Pages) and resync.reset and p.range_pages(resync.add) == 511
    assert isinstance(pageout, p.PageOut) and pageout.swapped == 1


def test_bad_requests_get_errors_not_crashes(agent) -> None:  # type: ignore[no-untyped-def]
    a, _, wire, _ = agent
    wire.take()
    a.receive_line(b"{nonsense")
    a.receive_line(p.encode(p.Reserve(3, 100))[:-1])  # not a whole block
    errs = wire.take()
    assert [type(e) for e in errs] == [p.Error, p.Error]
    assert errs[1].re == 3 and "multiple of the block" in errs[1].message  # type: ignore[union-attr]


def test_thp_is_switched_on_for_advised_regions_only_when_off(tmp_path: Path) -> None:
    from memvisor.agent.reserve import enable_thp_for_madvised

    off = thp_switch(tmp_path, "always madvise [never]\n")
    enable_thp_for_madvised(off, min_free_switch(tmp_path))
    assert Path(off).read_text() == "madvise"
    on = thp_switch(tmp_path, "[always] madvise never\n")
    enable_thp_for_madvised(on, "/nonexistent")
    assert Path(on).read_text() == "[always] madvise never\n"


def test_stats_parsers_read_the_real_files() -> None:
    meminfo = _parse_meminfo(Path("/proc/meminfo").read_text())
    assert meminfo["MemTotal"] > 0 and meminfo["MemTotal"] % 1024 == 0
    assert set(meminfo) <= set(p.MEMINFO_KEYS)
    assert "pswpout" in _parse_vmstat(Path("/proc/vmstat").read_text())


def test_find_port_by_name(tmp_path: Path) -> None:
    (tmp_path / "vport1p1").mkdir()
    (tmp_path / "vport1p1" / "name").write_text("org.memvisor.shell.0\n")
    (tmp_path / "vport1p2").mkdir()
    (tmp_path / "vport1p2" / "name").write_text("org.memvisor.agent.0\n")
    assert find_port("org.memvisor.agent.0", str(tmp_path)) == "/dev/vport1p2"
    with pytest.raises(FileNotFoundError, match="no virtio-serial port named 'x'"):
        find_port("x", str(tmp_path))


# --- a real agent process, the real session and link ---------------------------------------


class Recording:
    mechanism, block_pages = "recording", 512

    def __init__(self) -> None:
        self.freed: list[tuple[int, int]] = []

    def free(self, ranges: list[tuple[int, int]]) -> None:
        self.freed += ranges  # host RAM: must never really be punched

    def resident_pages(self, ranges: object) -> int:
        return 0


def _pump_until(link: AgentLink, cond: object, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        link.step(0.05)
        if cond():  # type: ignore[operator]
            return
    raise AssertionError("condition not reached in time")


def _rss_anon_huge(pid: int) -> int:
    for ln in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if ln.startswith("AnonHugePages:"):
            return int(ln.split()[1]) * 1024
    return 0


@pytest.mark.timeout(90)
def test_real_agent_process_reserves_survives_reconnect_and_releases(tmp_path: Path) -> None:
    require_root()
    sock = str(tmp_path / "agent.sock")
    import socket

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock)
    server.listen(1)
    thp = thp_switch(tmp_path)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memvisor.agent",
            "--unix",
            sock,
            "--thp-control",
            thp,
            "--min-free-control",
            min_free_switch(tmp_path),
        ]
    )
    host_pages = os.sysconf("SC_PHYS_PAGES") * 2
    layout = RamLayout((RamRegion(0, host_pages, 0),))
    session = AgentSession("host-run", layout, Recording(), RealClock())
    # The link is a client; give it a relay: accept the agent and forward through a pair.
    conn, _ = server.accept()
    relay = str(tmp_path / "relay.sock")
    try:
        link = _RelayLink(session, conn, relay)
        _pump_until(link, lambda: session.state is AgentState.READY)
        # It keeps itself responsive under memory pressure: higher priority, own pages locked.
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == -10
        status = Path(f"/proc/{proc.pid}/status").read_text()
        locked = int(status.split("VmLck:")[1].split()[0])
        assert locked > 1000  # kB: the interpreter's touched pages
        session.set_target(64 * 1024 * 1024)
        _pump_until(link, lambda: session.agent_held == 16384)
        held = session.held_ranges()
        assert p.range_pages(held) == 16384 and all(s % 512 == 0 for s, _ in held)
        assert _rss_anon_huge(proc.pid) >= 64 * 1024 * 1024
        # The host side goes away and comes back: the agent keeps and re-reports its pages.
        conn.close()
        session.disconnected()
        conn, _ = server.accept()
        link = _RelayLink(session, conn, relay)
        _pump_until(link, lambda: session.state is AgentState.READY and session.synced)
        assert session.held_ranges() == held and session.violations == 0
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert int(status.split("VmLck:")[1].split()[0]) < locked + 8192  # reservation unlocked
        session.set_target(0)
        _pump_until(link, lambda: session.agent_held == 0)
        assert session.held_ranges() == [] and _rss_anon_huge(proc.pid) < 8 * 1024 * 1024
        _pump_until(link, lambda: session.guest_stats() is not None)
    finally:
        proc.kill()
        proc.wait()
        conn.close()
        server.close()


class _RelayLink(AgentLink):
    """AgentLink over an already accepted socket (here the host is the server)."""

    def __init__(self, session: AgentSession, conn: object, path: str) -> None:
        super().__init__(session, path)
        conn.setblocking(False)  # type: ignore[attr-defined]
        self._sock = conn  # type: ignore[assignment]
        session.connected()


def test_greet_asks_a_welcomed_agent_for_a_new_hello_only(agent) -> None:  # type: ignore[no-untyped-def]
    a, _, wire, _ = agent
    wire.take()
    a.receive_line(p.encode(p.Greet())[:-1])
    assert [m.TYPE for m in wire.take()] == ["hello"]
    a.receive_line(p.encode(p.Greet())[:-1])  # hello already sent, not yet welcomed
    assert wire.take() == []


def test_a_tick_reads_vmstat_once_for_the_scan_and_the_stats(agent) -> None:  # type: ignore[no-untyped-def]
    """The scan (swap-in rate) and the stats report are due at the same tick: one read of
    /proc/vmstat serves both, and the report carries what the scan saw."""
    a, _, wire, clock = agent
    reads: list[str] = []

    def read(path: str) -> str:
        reads.append(path)
        return "pswpin 42\npswpout 7\n" if path == "/proc/vmstat" else _real_read(path)

    a.read_file = read
    wire.take()
    for _ in range(2):
        clock.advance(1.0)
        a.tick()
    assert reads.count("/proc/vmstat") == 2  # one per tick
    stats = [m for m in wire.take() if isinstance(m, p.Stats)]
    assert len(stats) == 2 and stats[-1].vmstat["pswpin"] == 42
