"""The agent wire protocol: versioned JSON lines between the guest agent and the host.

Shared by both ends; stdlib only (it runs inside the guest). Every message is one JSON object
on one line of at most :data:`MAX_LINE_BYTES` bytes. Decoding is strict: unknown keys,
missing keys, wrong types (a boolean is not an integer), out-of-range numbers, NaN, duplicate
keys and over-long lists are all errors, raised as :class:`ProtocolError` with a short code
and a message that names the bad field. The full description is ``docs/protocol.md``.

Page numbers are guest-physical frame numbers (PFNs) of 4 KiB pages; sets of pages travel as
compact ``[[start, count], ...]`` ranges.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from memvisor.errors import GuestError

PROTOCOL_VERSIONS: tuple[int, ...] = (1, 2)  # 2 adds the workload.* messages
WORKLOAD_VERSION = 2  # the first version with workload.start / stop / status
WORKLOAD_KINDS = ("idle", "grow", "shared-content")
WORKLOAD_STATES = ("none", "running", "exited", "stopped", "refused")
MAX_WORKLOAD_BYTES = 16 << 30
MAX_WORKLOAD_RATE = 1 << 30  # bytes/s
MAX_TIMINGS = 64  # fill / touch timings in one workload.status
MAX_LINE_BYTES = 64 * 1024  # one message, newline included
MAX_RANGES = 1024  # ranges per list in one message
MAX_PFN = (1 << 40) - 1  # 4 PiB of guest RAM; pagemap PFNs have 55 bits
MAX_PAGES = 1 << 32  # pages in one request (16 TiB)
MAX_REQUEST_ID = (1 << 31) - 1
MAX_TEXT = 256  # characters in free-text fields
AGE_BUCKETS = 12  # ages histogram: [0,1) s, [1,2), [2,4) ... [512,1024), [1024, inf)
PAGE_REASONS = ("reserve", "release", "moved", "swapped", "returned", "resync")
MEMINFO_KEYS = (
    "MemTotal",
    "MemFree",
    "MemAvailable",
    "Buffers",
    "Cached",
    "SwapCached",
    "SwapTotal",
    "SwapFree",
    "AnonPages",
    "AnonHugePages",
    "Shmem",
)
VMSTAT_KEYS = (
    "pswpin",
    "pswpout",
    "pgmajfault",
    "pgscan_kswapd",
    "pgscan_direct",
    "pgsteal_kswapd",
    "pgsteal_direct",
    "thp_split_page",
    "thp_swpout",
    "oom_kill",
)

PageRange = tuple[int, int]  # (first pfn, number of pages)


class ProtocolError(GuestError):
    """A message broke the protocol. ``code`` is a stable short word for logs and counters."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(f"{code}: {message}")


# --- messages -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Guest -> host, first line after every (re)connect."""

    TYPE: ClassVar[str] = "hello"
    versions: tuple[int, ...]
    agent: str
    page_size: int
    instance: str  # random per agent start: tells a restarted agent from a reconnect
    held: int  # pages the agent holds right now (0 after a fresh start)


@dataclass(frozen=True, slots=True)
class Welcome:
    """Host -> guest, answer to hello: the chosen version and the session's parameters."""

    TYPE: ClassVar[str] = "welcome"
    version: int
    block_pages: int  # reserve in physically contiguous, aligned blocks of this many pages
    stats_interval: float
    scan_interval: float


@dataclass(frozen=True, slots=True)
class Reserve:
    TYPE: ClassVar[str] = "reserve"
    id: int
    pages: int


@dataclass(frozen=True, slots=True)
class Release:
    TYPE: ClassVar[str] = "release"
    id: int
    pages: int


@dataclass(frozen=True, slots=True)
class Query:
    """Ask for the full reservation: answered by ``pages`` (reason resync, reset) + ``done``."""

    TYPE: ClassVar[str] = "query"
    id: int


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[str] = "ping"
    id: int


@dataclass(frozen=True, slots=True)
class Greet:
    """Host -> guest: say hello again (the agent missed that the host side reconnected)."""

    TYPE: ClassVar[str] = "greet"


@dataclass(frozen=True, slots=True)
class Pages:
    """Guest -> host: pages the agent now holds (``add``) or no longer holds (``remove``)."""

    TYPE: ClassVar[str] = "pages"
    re: int | None  # the request this belongs to; None for spontaneous changes
    reason: str
    add: tuple[PageRange, ...] = ()
    remove: tuple[PageRange, ...] = ()
    reset: bool = False  # forget every page held before this message (first resync chunk)


@dataclass(frozen=True, slots=True)
class Done:
    """Guest -> host: a request finished. ``achieved`` pages of ``requested``."""

    TYPE: ClassVar[str] = "done"
    re: int
    requested: int
    achieved: int
    held: int
    swapped: int


@dataclass(frozen=True, slots=True)
class Error:
    TYPE: ClassVar[str] = "error"
    re: int | None
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class PageOut:
    """Guest -> host: reserved pages the guest OS paged out or moved since the last report."""

    TYPE: ClassVar[str] = "pageout"
    swapped: int  # newly swapped out (pagemap bit 62)
    moved: int  # newly moved to another frame (re-reported by a ``pages`` message)
    dropped: int  # gone without swap entry (e.g. replaced by the zero page)
    total_swapped: int  # reserved pages currently swapped out
    rate: float  # pages/s paged out over the agent's recent window
    age_min: float  # seconds between reservation and page-out, over the new pages
    age_median: float
    age_max: float
    age_hist: tuple[int, ...]  # AGE_BUCKETS counts


@dataclass(frozen=True, slots=True)
class Stats:
    """Guest -> host every stats_interval: /proc/meminfo (bytes) and /proc/vmstat counters."""

    TYPE: ClassVar[str] = "stats"
    seq: int
    uptime: float
    meminfo: Mapping[str, int] = field(default_factory=dict)
    vmstat: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkloadStart:
    """Host -> guest (version 2): start the guest's one workload (replacing a running one).
    ``size`` bytes, a multiple of 4096; ``rate`` bytes/s for ``grow`` (0 for the others);
    ``pattern`` seeds ``shared-content`` (equal patterns give identical pages in every guest)."""

    TYPE: ClassVar[str] = "workload.start"
    id: int
    kind: str
    size: int
    rate: int = 0
    pattern: int = 0


@dataclass(frozen=True, slots=True)
class WorkloadStop:
    TYPE: ClassVar[str] = "workload.stop"
    id: int


@dataclass(frozen=True, slots=True)
class WorkloadQuery:
    TYPE: ClassVar[str] = "workload.query"
    id: int


@dataclass(frozen=True, slots=True)
class WorkloadStatus:
    """Guest -> host (version 2): answer to every workload request."""

    TYPE: ClassVar[str] = "workload.status"
    re: int
    kind: str  # a WORKLOAD_KINDS value or "none"
    state: str  # WORKLOAD_STATES
    size: int
    allocated: int  # bytes filled so far
    fills: tuple[float, ...] = ()  # seconds per fill step, the last MAX_TIMINGS
    touches: tuple[float, ...] = ()  # seconds per pass over the memory (grow)
    error: str = ""


_WORKLOAD_HOST = (WorkloadStart, WorkloadStop, WorkloadQuery)
HostMessage = (
    Welcome
    | Reserve
    | Release
    | Query
    | Ping
    | Greet
    | WorkloadStart
    | WorkloadStop
    | WorkloadQuery
)
GuestMessage = Hello | Pages | Done | Error | PageOut | Stats | WorkloadStatus
Message = HostMessage | GuestMessage
HOST_TYPES: dict[str, type[Any]] = {
    m.TYPE: m for m in (Welcome, Reserve, Release, Query, Ping, Greet, *_WORKLOAD_HOST)
}
GUEST_TYPES: dict[str, type[Any]] = {
    m.TYPE: m for m in (Hello, Pages, Done, Error, PageOut, Stats, WorkloadStatus)
}


_ALL_TYPES = {**HOST_TYPES, **GUEST_TYPES}


# --- field validators -----------------------------------------------------------------------

Check = Callable[[str, object], object]


def _int(lo: int, hi: int) -> Check:
    def check(name: str, v: object) -> object:
        if type(v) is not int:
            raise ProtocolError("type", f"{name}: expected an integer, got {_show(v)}")
        if not lo <= v <= hi:
            raise ProtocolError("range", f"{name}: {v} is outside [{lo}, {hi}]")
        return v

    return check


def _opt_int(lo: int, hi: int) -> Check:
    inner = _int(lo, hi)
    return lambda name, v: None if v is None else inner(name, v)


def _float(lo: float, hi: float) -> Check:
    def check(name: str, v: object) -> object:
        if type(v) not in (int, float):
            raise ProtocolError("type", f"{name}: expected a number, got {_show(v)}")
        x = float(v)  # type: ignore[arg-type]
        if not (math.isfinite(x) and lo <= x <= hi):
            raise ProtocolError("range", f"{name}: {x} is outside [{lo}, {hi}]")
        return x

    return check


def _text(name: str, v: object) -> object:
    if type(v) is not str:
        raise ProtocolError("type", f"{name}: expected a string, got {_show(v)}")
    if len(v) > MAX_TEXT or not v.isprintable():
        raise ProtocolError("range", f"{name}: string too long or not printable")
    return v


def _word(*allowed: str) -> Check:
    def check(name: str, v: object) -> object:
        if v not in allowed or type(v) is not str:
            raise ProtocolError("range", f"{name}: {_show(v)} is not one of {list(allowed)}")
        return v

    return check


def _bool(name: str, v: object) -> object:
    if type(v) is not bool:
        raise ProtocolError("type", f"{name}: expected true or false, got {_show(v)}")
    return v


def _int_list(lo: int, hi: int, min_len: int, max_len: int) -> Check:
    item = _int(lo, hi)

    def check(name: str, v: object) -> object:
        if type(v) is not list or not min_len <= len(v) <= max_len:
            raise ProtocolError("type", f"{name}: expected a list of {min_len}..{max_len} ints")
        return tuple(item(f"{name}[{i}]", x) for i, x in enumerate(v))

    return check


def _float_list(lo: float, hi: float, max_len: int) -> Check:
    item = _float(lo, hi)

    def check(name: str, v: object) -> object:
        if type(v) is not list or len(v) > max_len:
            raise ProtocolError("type", f"{name}: expected a list of at most {max_len} numbers")
        return tuple(item(f"{name}[{i}]", x) for i, x in enumerate(v))

    return check


def _page_multiple(lo: int, hi: int) -> Check:
    inner = _int(lo, hi)

    def check(name: str, v: object) -> object:
        inner(name, v)
        if v % 4096:  # type: ignore[operator]
            raise ProtocolError("range", f"{name}: {v} is not a multiple of 4096")
        return v

    return check


def _ranges(name: str, v: object) -> object:
    if type(v) is not list:
        raise ProtocolError("type", f"{name}: expected a list of [start, count] pairs")
    if len(v) > MAX_RANGES:
        raise ProtocolError("limit", f"{name}: {len(v)} ranges, at most {MAX_RANGES}")
    out: list[PageRange] = []
    for i, r in enumerate(v):
        if type(r) is not list or len(r) != 2:
            raise ProtocolError("type", f"{name}[{i}]: expected [start, count]")
        start = _int(0, MAX_PFN)(f"{name}[{i}].start", r[0])
        count = _int(1, MAX_PFN + 1)(f"{name}[{i}].count", r[1])
        assert isinstance(start, int) and isinstance(count, int)
        if start + count > MAX_PFN + 1:
            raise ProtocolError("range", f"{name}[{i}]: ends beyond pfn {MAX_PFN}")
        out.append((start, count))
    return tuple(out)


def _counters(keys: Sequence[str]) -> Check:
    allowed = frozenset(keys)

    def check(name: str, v: object) -> object:
        if type(v) is not dict:
            raise ProtocolError("type", f"{name}: expected an object")
        for k, x in v.items():
            if k not in allowed:
                raise ProtocolError("schema", f"{name}: unknown key {_show(k)}")
            _int(0, (1 << 63) - 1)(f"{name}.{k}", x)
        return dict(v)

    return check


_ID = _int(1, MAX_REQUEST_ID)
_COUNT = _int(0, MAX_PAGES)
_SCHEMAS: dict[type[Any], dict[str, Check]] = {
    Hello: {
        "versions": _int_list(1, 1000, 1, 16),
        "agent": _text,
        "page_size": _int(4096, 4096),
        "instance": _text,
        "held": _COUNT,
    },
    Welcome: {
        "version": _int(1, 1000),
        "block_pages": _int(1, 1 << 18),
        "stats_interval": _float(0.05, 3600.0),
        "scan_interval": _float(0.05, 3600.0),
    },
    Reserve: {"id": _ID, "pages": _int(1, MAX_PAGES)},
    Release: {"id": _ID, "pages": _int(1, MAX_PAGES)},
    Query: {"id": _ID},
    Ping: {"id": _ID},
    Greet: {},
    Pages: {
        "re": _opt_int(1, MAX_REQUEST_ID),
        "reason": _word(*PAGE_REASONS),
        "add": _ranges,
        "remove": _ranges,
        "reset": _bool,
    },
    Done: {
        "re": _ID,
        "requested": _COUNT,
        "achieved": _COUNT,
        "held": _COUNT,
        "swapped": _COUNT,
    },
    Error: {"re": _opt_int(1, MAX_REQUEST_ID), "code": _text, "message": _text},
    PageOut: {
        "swapped": _COUNT,
        "moved": _COUNT,
        "dropped": _COUNT,
        "total_swapped": _COUNT,
        "rate": _float(0.0, 1e12),
        "age_min": _float(0.0, 1e10),
        "age_median": _float(0.0, 1e10),
        "age_max": _float(0.0, 1e10),
        "age_hist": _int_list(0, MAX_PAGES, AGE_BUCKETS, AGE_BUCKETS),
    },
    WorkloadStart: {
        "id": _ID,
        "kind": _word(*WORKLOAD_KINDS),
        "size": _page_multiple(4096, MAX_WORKLOAD_BYTES),
        "rate": _int(0, MAX_WORKLOAD_RATE),
        "pattern": _int(0, (1 << 32) - 1),
    },
    WorkloadStop: {"id": _ID},
    WorkloadQuery: {"id": _ID},
    WorkloadStatus: {
        "re": _ID,
        "kind": _word("none", *WORKLOAD_KINDS),
        "state": _word(*WORKLOAD_STATES),
        "size": _int(0, MAX_WORKLOAD_BYTES),
        "allocated": _int(0, MAX_WORKLOAD_BYTES),
        "fills": _float_list(0.0, 1e6, MAX_TIMINGS),
        "touches": _float_list(0.0, 1e6, MAX_TIMINGS),
        "error": _text,
    },
    Stats: {
        "seq": _int(0, (1 << 63) - 1),
        "uptime": _float(0.0, 1e10),
        "meminfo": _counters(MEMINFO_KEYS),
        "vmstat": _counters(VMSTAT_KEYS),
    },
}


def _show(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


# --- decoding and encoding ------------------------------------------------------------------


def _no_constants(name: str) -> object:
    raise ProtocolError("json", f"{name} is not allowed")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj: dict[str, object] = {}
    for k, v in pairs:
        if k in obj:
            raise ProtocolError("json", f"duplicate key {_show(k)}")
        obj[k] = v
    return obj


def parse_json_line(line: bytes) -> dict[str, object]:
    """One line (without its newline) -> a JSON object, with size and syntax limits."""
    if len(line) >= MAX_LINE_BYTES:
        raise ProtocolError("limit", f"line of {len(line)} bytes, at most {MAX_LINE_BYTES - 1}")
    try:
        text = line.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constants)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("json", f"not a JSON line: {_show(str(exc))}") from None
    if type(obj) is not dict:
        raise ProtocolError("json", "a message must be a JSON object")
    return obj


def decode(line: bytes, types: Mapping[str, type[Any]]) -> Any:
    """Parse and validate one line into a message of one of ``types`` (by its "type")."""
    obj = parse_json_line(line)
    kind = obj.pop("type", None)
    cls = types.get(kind) if type(kind) is str else None
    if cls is None:
        raise ProtocolError("schema", f"unknown message type {_show(kind)}")
    schema = _SCHEMAS[cls]
    unknown = sorted(set(obj) - set(schema))
    if unknown:
        raise ProtocolError("schema", f"{kind}: unknown key {_show(unknown[0])}")
    values: dict[str, object] = {}
    for f in fields(cls):
        if f.name in obj:
            values[f.name] = schema[f.name](f"{kind}.{f.name}", obj[f.name])
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ProtocolError("schema", f"{kind}: missing key {f.name!r}")
    return cls(**values)


def decode_host_message(line: bytes) -> HostMessage:
    """What the guest receives."""
    msg: HostMessage = decode(line, HOST_TYPES)
    return msg


def decode_guest_message(line: bytes) -> GuestMessage:
    """What the host receives from the (untrusted) guest."""
    msg: GuestMessage = decode(line, GUEST_TYPES)
    return msg


def _plain(v: object) -> object:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


def encode(msg: Message) -> bytes:
    """A message -> one JSON line (with its newline). Refuses what the peer would refuse."""
    obj: dict[str, object] = {"type": msg.TYPE}
    for f in fields(msg):
        obj[f.name] = _plain(getattr(msg, f.name))
    line = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    decode(line, _ALL_TYPES)  # the peer's checks, here: never send what it must refuse
    return line + b"\n"


# --- page ranges ----------------------------------------------------------------------------


def compact_ranges(pfns: Iterable[int]) -> list[PageRange]:
    """Sorted page numbers (duplicates dropped) -> maximal [start, count] ranges."""
    out: list[PageRange] = []
    start = prev = -2
    for p in sorted(set(pfns)):
        if p == prev + 1:
            prev = p
            continue
        if start >= 0:
            out.append((start, prev - start + 1))
        start = prev = p
    if start >= 0:
        out.append((start, prev - start + 1))
    return out


def chunked(ranges: Sequence[PageRange], size: int = MAX_RANGES) -> list[list[PageRange]]:
    """Split a range list so each message stays within MAX_RANGES (at least one chunk)."""
    return [list(ranges[i : i + size]) for i in range(0, len(ranges), size)] or [[]]


def range_pages(ranges: Iterable[PageRange]) -> int:
    return sum(count for _, count in ranges)


def age_bucket(age: float) -> int:
    """Histogram bucket of an age in seconds: 0 for <1 s, i for [2^(i-1), 2^i), last open."""
    if age < 1.0:
        return 0
    return min(AGE_BUCKETS - 1, int(math.log2(age)) + 1)


def choose_version(offered: Iterable[int]) -> int | None:
    """The highest version both ends speak, or None."""
    common = set(offered) & set(PROTOCOL_VERSIONS)
    return max(common) if common else None
