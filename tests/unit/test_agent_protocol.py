"""The agent wire protocol: every message round-trips; decoding is strict."""

from __future__ import annotations

import json

import pytest

from memvisor.agent import protocol as p

HOST_MESSAGES = [
    p.Welcome(1, 512, 1.0, 0.5),
    p.Reserve(7, 32768),
    p.Release(8, 512),
    p.Query(9),
    p.Ping(10),
    p.Greet(),
]
GUEST_MESSAGES = [
    p.Hello((1,), "memvisor-agent/1", 4096, "ab12", 0),
    p.Pages(3, "reserve", ((512, 512), (2048, 1024)), ()),
    p.Pages(None, "moved", ((5, 1),), ((7, 1),)),
    p.Pages(None, "resync", (), (), reset=True),
    p.Done(3, 1536, 1024, 1024, 0),
    p.Error(None, "order", "request before welcome"),
    p.Error(4, "reserve", "out of memory"),
    p.PageOut(3, 1, 0, 3, 0.3, 1.5, 2.0, 9.5, (0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0)),
    p.Stats(1, 12.5, {"MemTotal": 4096, "MemFree": 0}, {"pswpout": 3}),
]


@pytest.mark.parametrize("msg", HOST_MESSAGES, ids=lambda m: m.TYPE)
def test_host_messages_round_trip(msg: p.HostMessage) -> None:
    line = p.encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert p.decode_host_message(line[:-1]) == msg


@pytest.mark.parametrize("msg", GUEST_MESSAGES, ids=lambda m: m.TYPE)
def test_guest_messages_round_trip(msg: p.GuestMessage) -> None:
    assert p.decode_guest_message(p.encode(msg)[:-1]) == msg


def test_each_direction_refuses_the_others_messages() -> None:
    with pytest.raises(p.ProtocolError, match="unknown message type 'reserve'"):
        p.decode_guest_message(p.encode(p.Reserve(1, 512)))
    with pytest.raises(p.ProtocolError, match="unknown message type 'hello'"):
        p.decode_host_message(p.encode(GUEST_MESSAGES[0]))


def _line(obj: object) -> bytes:
    return json.dumps(obj).encode()


DONE = {"type": "done", "re": 1, "requested": 2, "achieved": 2, "held": 2, "swapped": 0}


@pytest.mark.parametrize(
    ("line", "code", "words"),
    [
        (b"", "json", "not a JSON line"),
        (b"\xff\xfe", "json", "not a JSON line"),
        (b"[1, 2]", "json", "must be a JSON object"),
        (b'{"type": "done", "type": "done"}', "json", "duplicate key"),
        (b'{"type": "pageout", "rate": NaN}', "json", "NaN is not allowed"),
        (b"[" * 100_000, "limit", "line of"),
        (b"[" * 50_000 + b"]" * 10_000, "json", "not a JSON line"),
        (b'{"a": ' + b"9" * 5000 + b"}", "json", "not a JSON line"),
        (_line({"type": "nope"}), "schema", "unknown message type 'nope'"),
        (_line({"type": 5}), "schema", "unknown message type 5"),
        (_line({**DONE, "extra": 1}), "schema", "unknown key 'extra'"),
        (_line({k: v for k, v in DONE.items() if k != "held"}), "schema", "missing key 'held'"),
        (_line({**DONE, "re": True}), "type", "done.re: expected an integer, got True"),
        (_line({**DONE, "re": 0}), "range", "done.re: 0 is outside"),
        (_line({**DONE, "held": 1.0}), "type", "done.held"),
        (_line({**DONE, "held": -1}), "range", "done.held"),
        (_line({**DONE, "held": 2**70}), "range", "done.held"),
    ],
)
def test_decode_refuses(line: bytes, code: str, words: str) -> None:
    with pytest.raises(p.ProtocolError, match=words) as err:
        p.decode_guest_message(line)
    assert err.value.code == code


PAGES = {"type": "pages", "re": None, "reason": "moved", "add": [], "remove": []}


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"reason": "eaten"}, "pages.reason: 'eaten' is not one of"),
        ({"add": [[1, 0]]}, r"pages.add\[0\].count: 0 is outside"),
        ({"add": [[-1, 1]]}, r"pages.add\[0\].start: -1 is outside"),
        ({"add": [[1, 2, 3]]}, r"pages.add\[0\]: expected \[start, count\]"),
        ({"add": [[p.MAX_PFN, 2]]}, "ends beyond pfn"),
        ({"add": {"1": 2}}, "expected a list of"),
        ({"add": [[i, 1] for i in range(p.MAX_RANGES + 1)]}, "ranges, at most"),
        ({"reset": 1}, "pages.reset: expected true or false"),
    ],
)
def test_pages_validation(changes: dict[str, object], words: str) -> None:
    with pytest.raises(p.ProtocolError, match=words):
        p.decode_guest_message(_line({**PAGES, **changes}))


def test_stats_accept_only_known_counters() -> None:
    ok = {"type": "stats", "seq": 1, "uptime": 1.0, "meminfo": {"MemFree": 1}, "vmstat": {}}
    assert p.decode_guest_message(_line(ok)).meminfo == {"MemFree": 1}
    with pytest.raises(p.ProtocolError, match=r"stats\.meminfo: unknown key 'Evil'"):
        p.decode_guest_message(_line({**ok, "meminfo": {"Evil": 1}}))
    with pytest.raises(p.ProtocolError, match=r"stats\.vmstat\.pswpout: expected an integer"):
        p.decode_guest_message(_line({**ok, "vmstat": {"pswpout": "3"}}))


def test_text_fields_are_bounded_and_printable() -> None:
    err = {"type": "error", "re": None, "code": "x", "message": "y" * 300}
    with pytest.raises(p.ProtocolError, match="too long or not printable"):
        p.decode_guest_message(_line(err))
    with pytest.raises(p.ProtocolError, match="too long or not printable"):
        p.decode_guest_message(_line({**err, "message": "a\x1b[2Jb"}))


def test_encode_refuses_oversized_messages() -> None:
    big = p.Pages(None, "resync", tuple((i * 2, 1) for i in range(5000)), ())
    with pytest.raises(p.ProtocolError, match="5000 ranges, at most 1024"):
        p.encode(big)
    with pytest.raises(p.ProtocolError, match="line of"):
        p.encode(p.Error(None, "x", "y" * 70_000))
    with pytest.raises(p.ProtocolError, match=r"reserve\.pages: 0 is outside"):
        p.encode(p.Reserve(1, 0))


def test_compact_ranges_and_chunks() -> None:
    assert p.compact_ranges([5, 3, 4, 9, 10, 4, 1]) == [(1, 1), (3, 3), (9, 2)]
    assert p.compact_ranges([]) == []
    assert p.range_pages([(1, 1), (3, 3)]) == 4
    assert p.chunked([]) == [[]]
    assert [len(c) for c in p.chunked([(i, 1) for i in range(2500)])] == [1024, 1024, 452]


def test_age_buckets_and_versions() -> None:
    assert [p.age_bucket(a) for a in (0.0, 0.99, 1.0, 1.9, 2.0, 3.9, 1e9)] == [0, 0, 1, 1, 2, 2, 11]
    assert p.choose_version([1, 5]) == 1
    assert p.choose_version([1, 2]) == 2
    assert p.choose_version([3, 4]) is None
