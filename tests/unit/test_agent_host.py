"""The host side of the agent: session state machine, validation, freeing and measuring.

The session tests use a recording backing (a mock, inside unit tests only); the real
:class:`FileBacking` (fallocate punch-hole + mincore on a real file) is tested below them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from memvisor.agent import protocol as p
from memvisor.agent.backing import FileBacking, RamLayout, punchable_blocks
from memvisor.agent.host import (
    AgentSession,
    AgentState,
    IllegalTransitionError,
    ReservationDriver,
    SessionLimits,
)
from memvisor.backends.base import ManualClock
from memvisor.units import MiB

RAM = 64 * MiB  # 16384 pages


class RecordingBacking:
    """Remembers what was freed; a freed page is no longer resident."""

    mechanism = "recording"

    def __init__(self, block_pages: int = 512) -> None:
        self.block_pages = block_pages
        self.freed: list[tuple[int, int]] = []
        self.free_pages: set[int] = set()

    def free(self, ranges: Sequence[tuple[int, int]]) -> None:
        for start, count in ranges:
            self.freed.append((start, count))
            self.free_pages.update(range(start, start + count))

    def resident_pages(self, ranges: Iterable[tuple[int, int]]) -> int:
        return sum(1 for s, c in ranges for pg in range(s, s + c) if pg not in self.free_pages)


def line(msg: p.GuestMessage) -> bytes:
    return p.encode(msg)


def sent(session: AgentSession) -> list[p.HostMessage]:
    return [p.decode_host_message(x) for x in session.outgoing().splitlines()]


def ready_session(block: int = 512, **limits: float) -> tuple[AgentSession, ManualClock]:
    clock = ManualClock(100.0)
    lim = SessionLimits(**limits)  # type: ignore[arg-type]
    s = AgentSession("vm1", RamLayout.pc(RAM), RecordingBacking(block), clock, lim)
    s.connected()
    s.receive(line(p.Hello((1,), "test", 4096, "inst1", 0)))
    s.receive(line(p.Pages(None, "resync", (), (), reset=True)))
    assert [m.TYPE for m in sent(s)] == ["welcome"]
    return s, clock


def backing_of(s: AgentSession) -> RecordingBacking:
    assert isinstance(s.backing, RecordingBacking)
    return s.backing


def reserve(s: AgentSession, ranges: tuple[tuple[int, int], ...]) -> int:
    """Answer the reserve request the session has just sent."""
    (req,) = sent(s)
    assert isinstance(req, p.Reserve)
    s.receive(line(p.Pages(req.id, "reserve", ranges, ())))
    got = p.range_pages(ranges)
    s.receive(line(p.Done(req.id, req.pages, got, s.agent_held + got, 0)))
    return req.id


def test_handshake_welcomes_with_the_backings_block() -> None:
    clock = ManualClock()
    s = AgentSession("vm1", RamLayout.pc(RAM), RecordingBacking(512), clock)
    assert s.state is AgentState.CONNECTING
    s.connected()
    s.receive(line(p.Hello((1, 2), "test", 4096, "i", 0)))
    assert s.state is AgentState.READY
    assert sent(s) == [p.Welcome(2, 512, 1.0, 1.0)]
    assert [e.kind for e in s.events] == ["transition"]


def test_reserve_frees_whole_blocks_and_measures_what_was_freed() -> None:
    s, _ = ready_session()
    s.set_target(4 * MiB)
    reserve(s, ((512, 512), (4096, 512)))
    assert backing_of(s).freed == [(512, 512), (4096, 512)]
    r = s.report()
    assert (r.held, r.held_present, r.freed, r.target) == (4 * MiB, 4 * MiB, 4 * MiB, 4 * MiB)
    assert s.held_ranges() == [(512, 512), (4096, 512)]
    assert sent(s) == []  # target reached: nothing more to ask


def test_release_removes_pages_and_large_targets_go_in_steps() -> None:
    s, _ = ready_session(max_request_pages=1024)
    s.set_target(8 * MiB)  # 2048 pages: two requests of 1024
    reserve(s, ((0, 1024),))
    reserve(s, ((2048, 1024),))
    s.set_target(4 * MiB)
    (req,) = sent(s)
    assert req == p.Release(req.id, 1024)  # type: ignore[union-attr]
    s.receive(line(p.Pages(req.id, "release", (), ((2048, 1024),))))  # type: ignore[union-attr]
    s.receive(line(p.Done(req.id, 1024, 1024, 1024, 0)))  # type: ignore[union-attr]
    assert s.held_ranges() == [(0, 1024)] and s.state is AgentState.READY


@pytest.mark.parametrize(
    ("ranges", "reason"),
    [
        (((16384, 512),), "outside the VM's RAM"),
        (((16000, 512),), "outside the VM's RAM"),
        (((256, 512),), "not aligned"),
        (((512, 100),), "not aligned"),
        (((512, 512), (512, 512)), "overlap"),
        (((0, 1024), (512, 512)), "overlap"),
        (((0, 2048), (4096, 512)), "for a reserve of 1024"),
    ],
)
def test_bad_reserve_results_change_nothing(
    ranges: tuple[tuple[int, int], ...], reason: str
) -> None:
    s, _ = ready_session()
    s.set_target(4 * MiB)
    (req,) = sent(s)
    s.receive(line(p.Pages(req.id, "reserve", ranges, ())))  # type: ignore[union-attr]
    assert s.state is AgentState.DEGRADED
    assert backing_of(s).freed == [] and s.held_ranges() == []
    assert reason in s.events[-1].detail or reason in s.events[-2].detail
    assert s.violations == 1


def test_spontaneous_changes_are_checked_against_what_is_held() -> None:
    s, _ = ready_session()
    s.set_target(2 * MiB)
    reserve(s, ((512, 512),))
    s.receive(line(p.Pages(None, "swapped", (), ((0, 1),))))  # not held
    s.receive(line(p.Pages(None, "moved", ((600, 1),), ((700, 1),))))  # 600 already held
    s.receive(line(p.Pages(None, "returned", ((3000, 1),), ())))  # more than asked for
    s.receive(line(p.Pages(None, "swapped", (), ((512, 1),), reset=True)))
    assert s.violations == 4 and s.held_ranges() == [(512, 512)]
    # A real move: old frame out, new frame in, single pages accepted but not punched.
    s.receive(line(p.Pages(None, "moved", ((9000, 1),), ((513, 1),))))
    assert s.held_ranges() == [(512, 1), (514, 510), (9000, 1)]
    assert backing_of(s).freed == [(512, 512)]


def test_replies_must_match_the_request_in_flight() -> None:
    s, _ = ready_session()
    s.receive(line(p.Done(5, 1, 1, 1, 0)))
    s.receive(line(p.Pages(5, "reserve", ((0, 512),), ())))
    s.receive(line(p.Error(5, "x", "y")))
    assert s.violations == 3 and backing_of(s).freed == []


def test_many_violations_lose_the_agent_and_input_is_then_ignored() -> None:
    s, _clock = ready_session()
    for _ in range(20):
        s.receive(b"garbage\n")
    assert s.state is AgentState.LOST and "20 protocol violations" in s.lost_reason
    s.receive(line(p.Pages(None, "resync", ((0, 512),), (), reset=True)))
    assert s.violations == 20 and s.held_ranges() == []
    assert s.report().fallback_to_balloon
    s.tick()
    assert s.state is AgentState.LOST


def test_illegal_transition_raises() -> None:
    s, _ = ready_session()
    with pytest.raises(IllegalTransitionError, match="ready -> ready"):
        s._transition(AgentState.READY, "test")
    s.receive(b"x" * 10 + b"\n")
    for _ in range(30):
        s.receive(b"\x00\n")
    with pytest.raises(IllegalTransitionError, match="lost -> degraded"):
        s._transition(AgentState.DEGRADED, "test")


def test_silence_degrades_then_loses_and_good_behaviour_recovers() -> None:
    s, clock = ready_session()
    clock.advance(6)
    s.tick()
    assert s.state is AgentState.DEGRADED
    s.receive(line(p.Stats(1, 1.0, {}, {})))
    clock.advance(11)
    s.receive(line(p.Stats(2, 2.0, {}, {})))
    s.tick()
    assert s.state is AgentState.READY
    clock.advance(31)
    s.tick()
    assert s.state is AgentState.LOST and "silent" in s.lost_reason


def test_request_timeout_degrades_and_retries() -> None:
    s, clock = ready_session()
    s.set_target(2 * MiB)
    (req,) = sent(s)
    for _ in range(13):  # the agent keeps talking but never answers
        clock.advance(5)
        s.receive(line(p.Stats(1, 1.0, {}, {})))
        s.tick()
    assert s.state is AgentState.DEGRADED
    assert any("timed out" in e.detail for e in s.events)
    (again,) = sent(s)
    assert isinstance(again, p.Reserve) and again.id != req.id  # type: ignore[union-attr]


def test_pageout_rate_counts_only_validated_removals() -> None:
    s, clock = ready_session()
    s.set_target(2 * MiB)
    reserve(s, ((512, 512),))
    s.receive(line(p.Pages(None, "swapped", (), ((512, 100),))))
    hist = (0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    s.receive(line(p.PageOut(100_000, 0, 0, 100, 1e6, 1.0, 1.0, 1.0, hist)))  # claims more
    assert s.pageout_rate() == pytest.approx(100 / 10)
    assert s.report().reserved_paged_out_rate == pytest.approx(10.0)
    clock.advance(11)
    assert s.pageout_rate() == 0.0
    assert s.report().held_present == 412 * 4096


def test_guest_stats_feed_the_report() -> None:
    s, clock = ready_session()
    s.receive(line(p.Stats(1, 1.0, {"MemAvailable": 100 * MiB}, {"pswpout": 10})))
    clock.advance(2)
    s.receive(line(p.Stats(2, 3.0, {"MemAvailable": 90 * MiB}, {"pswpout": 50})))
    r = s.report()
    assert r.guest_free == 90 * MiB and r.guest_swapped_out_rate == pytest.approx(20.0)


def test_reconnect_keeps_nothing_stale_and_rebuilds_from_the_resync() -> None:
    s, clock = ready_session()
    s.set_target(2 * MiB)
    reserve(s, ((512, 512),))
    s.disconnected()
    s.connected()
    assert s.state is AgentState.CONNECTING
    s.receive(line(p.Stats(3, 1.0, {}, {})))  # in flight from before: ignored quietly
    clock.advance(3)
    s.tick()
    assert sent(s) == [p.Greet()]  # no hello yet: ask for one (once)
    s.tick()
    assert sent(s) == []
    s.receive(line(p.Hello((1,), "test", 4096, "inst1", 512)))
    assert s.state is AgentState.READY and s.violations == 0
    s.receive(line(p.Pages(None, "resync", ((512, 512),), (), reset=True)))
    assert s.held_ranges() == [(512, 512)]
    assert [m.TYPE for m in sent(s)] == ["welcome"]  # already at target


def test_hello_on_an_established_session_restarts_the_handshake() -> None:
    s, _ = ready_session()
    s.receive(line(p.Hello((1,), "test", 4096, "inst2", 0)))
    assert s.state is AgentState.READY
    assert any("new agent process" in e.detail for e in s.events)
    s.receive(line(p.Pages(None, "moved", ((0, 1),), ())))
    assert s.violations == 1  # pages before the resync


def test_byte_flood_is_refused_and_reported() -> None:
    s, _ = ready_session(burst_bytes=1000, bytes_per_s=10)
    s.receive(b" " * 2000 + b"\n")
    assert s.input_allowance() <= 1000
    assert (s.violations >= 1 and "flood" in s.events[-1].detail) or "flood" in str(list(s.events))


def test_overlong_line_is_skipped_up_to_its_newline() -> None:
    s, _ = ready_session()
    s.receive(b"x" * p.MAX_LINE_BYTES)
    s.receive(b"yyyy\n" + line(p.Stats(1, 1.0, {}, {})))
    assert s.violations == 1 and s.guest_stats() is not None


def test_no_common_version_loses_the_agent() -> None:
    s = AgentSession("vm1", RamLayout.pc(RAM), RecordingBacking(), ManualClock())
    s.connected()
    s.receive(line(p.Hello((7,), "future", 4096, "i", 0)))
    assert s.state is AgentState.LOST and "no common protocol version" in s.lost_reason


def test_handshake_timeout() -> None:
    clock = ManualClock()
    s = AgentSession("vm1", RamLayout.pc(RAM), RecordingBacking(), clock)
    s.connected()
    clock.advance(181)
    s.tick()
    assert s.state is AgentState.LOST


class Balloon:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def set_balloon(self, nbytes: int) -> None:
        self.calls.append(nbytes)


def test_driver_falls_back_to_the_balloon_while_the_agent_is_lost() -> None:
    s, clock = ready_session()
    balloon = Balloon()
    driver = ReservationDriver(s, balloon)
    driver.set_target(2 * MiB)
    assert balloon.calls == [] and s.target_pages == 512
    clock.advance(31)
    s.tick()
    driver.sync()
    assert s.state is AgentState.LOST and balloon.calls == [2 * MiB]
    s.connected()  # a reconnect alone (the handshake may never come) keeps the balloon
    clock.advance(60)
    s.tick()
    driver.sync()
    assert s.state is AgentState.CONNECTING and balloon.calls == [2 * MiB]
    s.receive(line(p.Hello((1,), "test", 4096, "inst1", 0)))
    driver.sync()
    assert balloon.calls == [2 * MiB] and not driver.agent_acting
    s.receive(line(p.Pages(None, "resync", (), (), reset=True)))
    driver.sync()
    assert driver.agent_acting and balloon.calls == [2 * MiB, 0]
    assert s.target_pages == 512


def test_a_reattached_driver_keeps_the_balloon_until_the_agent_resyncs() -> None:
    clock = ManualClock(100.0)
    s = AgentSession("vm1", RamLayout.pc(RAM), RecordingBacking(512), clock)
    balloon = Balloon()
    driver = ReservationDriver(s, balloon, balloon_bytes=4 * MiB)  # what QEMU reports
    driver.set_target(4 * MiB)
    assert balloon.calls == [] and s.target_pages == 1024
    s.connected()
    s.receive(line(p.Hello((1,), "test", 4096, "inst1", 0)))
    s.receive(line(p.Pages(None, "resync", (), (), reset=True)))
    driver.sync()
    assert balloon.calls == [0] and driver.balloon_bytes == 0


# --- the real backing: a file, fallocate punch-hole, mincore -------------------------------


def test_layouts() -> None:
    pc = RamLayout.pc(4096 * MiB)
    assert pc.contains((0, 512)) and not pc.contains((0xE0000, 1))
    assert pc.contains((0x100000, 0x20000)) and not pc.contains((0x100000, 0x20001))
    assert pc.file_spans((0x100000, 1)) == [(0xE000_0000, 4096)]
    assert RamLayout.q35(4096 * MiB).regions[0].pages == 0x80000
    assert RamLayout.pc(RAM).pages == 16384


def test_punchable_blocks_needs_every_page_held() -> None:
    held = bytearray(2048)
    held[512:1024] = b"\x01" * 512
    held[1024:1500] = b"\x01" * 476
    assert punchable_blocks(held, [(512, 988)], 512) == [(512, 512)]


def test_file_backing_punches_and_measures_real_residency(tmp_path: Path) -> None:
    path = tmp_path / "memory.img"
    path.write_bytes(os.urandom(8 * MiB))  # resident in the page cache now
    backing = FileBacking(str(path), RamLayout.pc(8 * MiB))
    try:
        assert backing.resident_total() == 2048
        assert backing.resident_pages([(512, 512)]) == 512
        backing.free([(512, 512)])
        assert backing.resident_pages([(512, 512)]) == 0
        assert backing.resident_total() == 1536
        with path.open("rb") as f:
            f.seek(512 * 4096)
            assert f.read(4096) == bytes(4096)  # the guest would read zeros
    finally:
        backing.close()


def test_session_on_a_real_file_frees_what_the_agent_reports(tmp_path: Path) -> None:
    path = tmp_path / "memory.img"
    path.write_bytes(b"\x07" * (16 * MiB))
    clock = ManualClock()
    backing = FileBacking(str(path), RamLayout.pc(16 * MiB))
    s = AgentSession("vm1", RamLayout.pc(16 * MiB), backing, clock)
    try:
        s.connected()
        s.receive(line(p.Hello((1,), "t", 4096, "i", 0)))
        s.receive(line(p.Pages(None, "resync", (), (), reset=True)))
        s.outgoing()
        s.set_target(4 * MiB)
        reserve(s, ((1024, 1024),))
        assert s.report().freed == 4 * MiB
        assert backing.resident_total() == 4096 - 1024
        # A hostile range outside RAM never reaches the file.
        s.receive(line(p.Pages(None, "moved", ((4096, 1),), ((1024, 1),))))
        assert backing.resident_total() == 4096 - 1024 and s.violations == 1
    finally:
        backing.close()


def test_json_lines_from_the_session_are_valid_protocol() -> None:
    s, _ = ready_session()
    s.set_target(2 * MiB)
    raw = s.outgoing()
    assert json.loads(raw.decode())["type"] == "reserve"


def test_anon_backing_measures_own_pages_and_not_the_zero_page() -> None:
    """AnonKsmBacking on this very process: written pages cost memory, pages only read map
    the shared zero page and cost nothing (what KSM's zero-page merging leaves behind)."""
    import ctypes
    import mmap

    from memvisor.agent.backing import AnonKsmBacking, RamRegion

    if os.geteuid() != 0:
        pytest.skip("needs root: /proc/kpageflags")
    mem = mmap.mmap(-1, 4 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mem.madvise(mmap.MADV_NOHUGEPAGE)
    anchor = ctypes.c_char.from_buffer(mem)
    base = ctypes.addressof(anchor)
    del anchor
    for off in range(0, 2 * MiB, 4096):
        mem[off] = 1  # first half written: own pages
    for off in range(2 * MiB, 4 * MiB, 4096):
        assert mem[off] == 0  # second half only read: the zero page
    backing = AnonKsmBacking(os.getpid(), base, RamLayout((RamRegion(0, 1024, 0),)))
    try:
        assert backing.resident_pages([(0, 512)]) == 512
        assert backing.resident_pages([(512, 512)]) == 0
        backing.free([(0, 512)])  # nothing to do for anonymous memory: KSM reclaims
        assert backing.resident_pages([(0, 1024)]) == 512
    finally:
        backing.close()
        mem.close()
