"""Fuzzing the guest-facing parser, validator and session (hypothesis), plus a kept corpus.

Properties: whatever bytes a guest sends, decoding raises nothing but ProtocolError; the
session never raises, stays in a valid state, and frees only whole blocks of this VM's RAM
that the agent validly holds. ``agent_corpus/`` keeps nasty inputs found or written by hand.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memvisor.agent import protocol as p
from memvisor.agent.backing import RamLayout
from memvisor.agent.host import AgentSession, AgentState
from memvisor.backends.base import ManualClock
from memvisor.units import MiB

CORPUS = Path(__file__).parent / "agent_corpus"
LAYOUT = RamLayout.pc(32 * MiB)  # 8192 pages


class CheckingBacking:
    """Asserts every free is of whole blocks inside the layout and held by the session."""

    mechanism, block_pages = "checking", 512

    def __init__(self) -> None:
        self.session: AgentSession | None = None
        self.freed = 0

    def free(self, ranges: Sequence[tuple[int, int]]) -> None:
        assert self.session is not None
        for start, count in ranges:
            assert LAYOUT.contains((start, count)), (start, count)
            assert start % 512 == 0 and count == 512
            assert self.session._held.find(0, start, start + count) < 0
            self.freed += count

    def resident_pages(self, ranges: Iterable[tuple[int, int]]) -> int:
        return 0


def new_session() -> tuple[AgentSession, CheckingBacking, ManualClock]:
    backing, clock = CheckingBacking(), ManualClock()
    s = AgentSession("fuzz", LAYOUT, backing, clock)
    backing.session = s
    s.connected()
    return s, backing, clock


def check_invariants(s: AgentSession) -> None:
    assert s.state in AgentState
    assert s._held_count == s._held.count(1) <= LAYOUT.pages
    assert all(LAYOUT.contains(r) for r in s.held_ranges())
    s.report()


def hello_bytes() -> bytes:
    return p.encode(p.Hello((1,), "fuzz", 4096, "i", 0))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5)
    ),
    max_leaves=30,
)
types = st.sampled_from([*p.GUEST_TYPES, *p.HOST_TYPES, "x", ""])
ranges = st.lists(st.tuples(st.integers(-5, 9000), st.integers(-1, 2000)).map(list), max_size=6)
page_msgs = st.fixed_dictionaries(
    {
        "type": st.just("pages"),
        "re": st.none() | st.integers(0, 5),
        "reason": st.sampled_from([*p.PAGE_REASONS, "bogus"]),
        "add": ranges,
        "remove": ranges,
        "reset": st.booleans(),
    }
)
other_msgs = st.fixed_dictionaries({"type": types}, optional={"re": json_values}).flatmap(
    lambda d: st.dictionaries(st.text(max_size=10), json_values, max_size=4).map(
        lambda extra: {**extra, **d}
    )
)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_decoding_random_bytes_raises_only_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(p.ProtocolError):
        p.decode_guest_message(data)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=8), types)
def test_decoding_random_objects_raises_only_protocol_errors(
    obj: dict[str, object], kind: str
) -> None:
    line = json.dumps({**obj, "type": kind}).encode()
    for decode in (p.decode_guest_message, p.decode_host_message):
        try:
            msg = decode(line)
        except p.ProtocolError:
            continue
        assert p.encode(msg)  # anything accepted can be re-encoded and is valid


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(page_msgs | other_msgs, max_size=25), st.integers(0, 4096))
def test_hostile_message_streams_never_hurt_the_host(
    msgs: list[dict[str, object]], target: int
) -> None:
    s, backing, clock = new_session()
    s.receive(hello_bytes())
    s.set_target(target * 4096)
    for m in msgs:
        s.receive(json.dumps(m).encode() + b"\n")
        clock.advance(0.1)
        s.tick()
        check_invariants(s)
    assert backing.freed <= LAYOUT.pages


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_random_byte_chunks_never_crash_the_session(chunks: list[bytes]) -> None:
    s, _, clock = new_session()
    for chunk in [hello_bytes(), *chunks]:
        s.receive(chunk)
        clock.advance(0.05)
        s.tick()
        check_invariants(s)


CORPUS_FILES = sorted(CORPUS.glob("*.bin"))


def test_corpus_is_there() -> None:
    assert len(CORPUS_FILES) >= 20


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda x: x.stem)
def test_corpus_input_is_refused_or_harmless(path: Path) -> None:
    data = path.read_bytes()
    for ln in data.split(b"\n"):
        with contextlib.suppress(p.ProtocolError):
            p.decode_guest_message(ln)
    s, backing, _ = new_session()
    s.receive(hello_bytes())
    s.receive(p.encode(p.Pages(None, "resync", (), (), reset=True)))
    for i in range(0, len(data), 4096):
        s.receive(data[i : i + 4096])
    check_invariants(s)
    assert backing.freed == 0 and s.held_ranges() == []
