"""Workloads through the agent (protocol version 2): the messages' strict schemas, the host
session's checks and request matching, and the guest agent starting a real child process that
allocates and reports (here on the host; in a guest in tests/e2e/test_demo.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.unit.test_agent_host import RecordingBacking, line, sent

from memvisor.agent import protocol as p
from memvisor.agent.backing import RamLayout
from memvisor.agent.guest import Agent
from memvisor.agent.host import AgentSession, AgentState
from memvisor.agent.reserve import Reservation
from memvisor.agent.workload import WorkloadRunner, check_request, page_block
from memvisor.backends.base import ManualClock
from memvisor.errors import BackendError, InputError
from memvisor.units import MiB

RAM = 256 * MiB


def test_workload_messages_round_trip_and_bad_ones_are_refused() -> None:
    msg = p.WorkloadStart(3, "grow", 8 * MiB, rate=MiB, pattern=7)
    assert p.decode_host_message(p.encode(msg)[:-1]) == msg
    bad = {
        '{"type":"workload.start","id":1,"kind":"fork-bomb","size":4096}': "range",
        '{"type":"workload.start","id":1,"kind":"idle","size":4097}': "range",
        '{"type":"workload.start","id":1,"kind":"idle","size":0}': "range",
        '{"type":"workload.start","id":1,"kind":"idle","size":4096,"rate":-1}': "range",
        '{"type":"workload.start","id":1,"kind":"idle","size":4096,"cmd":"sh"}': "schema",
        '{"type":"workload.start","id":1,"kind":"idle","size":true}': "type",
    }
    for text, code in bad.items():
        with pytest.raises(p.ProtocolError) as err:
            p.decode_host_message(text.encode())
        assert err.value.code == code, text
    status = p.WorkloadStatus(3, "grow", "running", 8 * MiB, 4 * MiB, (0.1,) * 64, ())
    assert p.decode_guest_message(p.encode(status)[:-1]) == status
    too_many = p.encode(status)[:-1].replace(b'"touches":[]', b'"touches":[' + b"0," * 64 + b"0]")
    with pytest.raises(p.ProtocolError):
        p.decode_guest_message(too_many)
    with pytest.raises(p.ProtocolError):
        p.decode_guest_message(b'{"type":"workload.status","re":1,"kind":"idle","state":"x",'
                               b'"size":0,"allocated":0}')  # fmt: skip


def session(versions: tuple[int, ...] = (1, 2)) -> AgentSession:
    s = AgentSession("vm1", RamLayout.pc(RAM), RecordingBacking(512), ManualClock(100.0))
    s.connected()
    s.receive(line(p.Hello(versions, "test", 4096, "inst1", 0)))
    s.receive(line(p.Pages(None, "resync", (), (), reset=True)))
    sent(s)
    return s


def test_the_host_checks_requests_and_matches_answers() -> None:
    s = session()
    for args in (("idle", 0), ("idle", 4095), ("idle", RAM), ("swap", MiB), ("grow", MiB)):
        with pytest.raises(InputError):
            s.start_workload(*args)
    with pytest.raises(InputError):
        s.start_workload("idle", MiB, rate=MiB)  # a rate only for grow
    assert sent(s) == []
    rid = s.start_workload("shared-content", 8 * MiB, pattern=5)
    assert sent(s) == [p.WorkloadStart(rid, "shared-content", 8 * MiB, 0, 5)]
    assert not s.workload_answered(rid)
    s.receive(line(p.WorkloadStatus(rid, "shared-content", "running", 8 * MiB, 8 * MiB)))
    assert s.workload_answered(rid) and s.workload is not None and s.violations == 0
    s.receive(line(p.WorkloadStatus(rid, "idle", "running", MiB, 0)))  # not asked for
    rid2 = s.query_workload()
    s.receive(line(p.WorkloadStatus(rid2, "idle", "running", MiB, 2 * MiB)))  # more than size
    assert s.violations == 2 and s.state is AgentState.DEGRADED
    assert s.workload.allocated == 8 * MiB  # type: ignore[union-attr]


def test_a_version_1_agent_gets_no_workload_requests() -> None:
    s = session((1,))
    with pytest.raises(BackendError, match="version 1"):
        s.start_workload("idle", MiB)
    assert sent(s) == []


class NoPagemap:
    def read(self, addr: int, npages: int) -> list[int]:
        raise AssertionError("the workload tests reserve nothing")


class Wire:
    def __init__(self) -> None:
        self.lines: list[p.GuestMessage] = []

    def __call__(self, data: bytes) -> None:
        self.lines += [p.decode_guest_message(x) for x in data.splitlines()]


@pytest.fixture
def guest() -> Iterator[tuple[Agent, Wire]]:
    wire = Wire()
    meminfo = "MemAvailable: 262144 kB\n"  # 256 MiB
    a = Agent(Reservation(NoPagemap(), 512), wire, read_file=lambda path: meminfo)
    a.connected()
    yield a, wire
    a.workload.stop()


def status(a: Agent, wire: Wire, msg: p.HostMessage) -> p.WorkloadStatus:
    a.receive_line(p.encode(msg)[:-1])
    last = wire.lines[-1]
    assert isinstance(last, p.WorkloadStatus), last
    return last


def test_the_guest_agent_runs_a_real_workload_and_reports_it(guest) -> None:  # type: ignore[no-untyped-def]
    a, wire = guest
    a.receive_line(p.encode(p.Welcome(2, 512, 1.0, 1.0))[:-1])
    refused = status(a, wire, p.WorkloadStart(1, "idle", 240 * MiB))
    assert refused.state == "refused" and "spare" in refused.error
    st = status(a, wire, p.WorkloadStart(2, "grow", 8 * MiB, rate=4 * MiB))
    assert st.state == "running" and st.kind == "grow" and st.size == 8 * MiB
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = status(a, wire, p.WorkloadQuery(3))
        if st.allocated == 8 * MiB and st.touches:
            break
        time.sleep(0.2)
    assert st.allocated == 8 * MiB and len(st.fills) == 2 and st.touches, st
    st = status(a, wire, p.WorkloadStop(4))
    assert st.state == "stopped"


def test_a_version_1_welcome_refuses_workloads(guest) -> None:  # type: ignore[no-untyped-def]
    a, wire = guest
    a.receive_line(p.encode(p.Welcome(1, 512, 1.0, 1.0))[:-1])
    a.receive_line(p.encode(p.WorkloadStart(1, "idle", MiB))[:-1])
    assert isinstance(wire.lines[-1], p.Error) and wire.lines[-1].code == "version"
    assert a.workload.proc is None


def test_shared_content_is_identical_across_guests_and_distinct_within() -> None:
    assert page_block(0, 4, (7).to_bytes(8, "little")) == page_block(
        0, 4, (7).to_bytes(8, "little")
    )
    pages = page_block(0, 4, (7).to_bytes(8, "little"))
    assert len({pages[i : i + 4096] for i in range(0, len(pages), 4096)}) == 4
    assert page_block(0, 1, (8).to_bytes(8, "little")) != pages[:4096]
    assert check_request("idle", MiB, 0, 0, 256 * MiB) is None
    assert check_request("grow", MiB, 0, 0, 256 * MiB) is not None  # grow needs a rate
    assert WorkloadRunner().state() == "none"


def test_progress_lines_are_checked(tmp_path: Path) -> None:
    r = WorkloadRunner()
    r.size = MiB
    for words in ([b"alloc", b"999999999", b"0.5"], [b"alloc", b"4096", b"nan"],
                  [b"touch", b"-1"], [b"touch", b"x"]):  # fmt: skip
        r._progress(words)
    assert r.allocated == MiB and r.fills == [0.5] and r.touches == []
