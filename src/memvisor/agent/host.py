"""The host side of one VM's agent: a session that validates everything the guest says.

:class:`AgentSession` is the protocol logic without I/O (the way h11 keeps HTTP free of
sockets): the link feeds it bytes with :meth:`~AgentSession.receive`, sends what
:meth:`~AgentSession.outgoing` returns, and calls :meth:`~AgentSession.tick` now and then.
Time comes from an injected :class:`~memvisor.backends.base.Clock`.

Its lifecycle is :class:`AgentState`: ``connecting`` -> ``ready`` <-> ``degraded`` -> ``lost``,
and back to ``connecting`` on every new connection. Transitions are logged; an illegal one
raises. ``lost`` means the manager falls back to virtio-balloon for this VM
(:class:`ReservationDriver` does that).

The guest is untrusted. Before anything touches host state a message is checked for size,
schema (``protocol``), rate (token buckets on bytes, messages and ranges), and meaning: page
ranges inside this VM's RAM, reserve results aligned to the backing's block, no duplicates
within a message or against what the agent already holds, removals only of held pages, no
more pages held than the host asked for, replies only to the request in flight. A bad
message changes nothing and is recorded as a violation (an event with a reason); one makes
the session ``degraded``, many in a short window make it ``lost`` and further input is
ignored. Host memory used per session is bounded by the VM's RAM size (one byte per page of
the held map) and the line limit.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from memvisor.agent import protocol as p
from memvisor.agent.backing import PageBacking, RamLayout, punchable_blocks
from memvisor.backends.base import Clock
from memvisor.errors import BackendError, InputError

log = logging.getLogger(__name__)
PAGE = 4096
WORKLOAD_GUEST_LEFT = 64 * 1024 * 1024  # a workload never asks for the guest's last 64 MiB


class AgentState(enum.Enum):
    CONNECTING = "connecting"
    READY = "ready"
    DEGRADED = "degraded"
    LOST = "lost"


_ALLOWED: dict[AgentState, frozenset[AgentState]] = {
    AgentState.CONNECTING: frozenset({AgentState.READY, AgentState.LOST}),
    AgentState.READY: frozenset({AgentState.DEGRADED, AgentState.LOST, AgentState.CONNECTING}),
    AgentState.DEGRADED: frozenset({AgentState.READY, AgentState.LOST, AgentState.CONNECTING}),
    AgentState.LOST: frozenset({AgentState.CONNECTING}),
}


class IllegalTransitionError(BackendError):
    """A state change the session lifecycle does not allow (a bug in the caller)."""


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What one guest may cost the host. Defaults suit a stats message per second."""

    bytes_per_s: float = 256 * 1024
    burst_bytes: float = 4 * 1024 * 1024
    messages_per_s: float = 50.0
    burst_messages: float = 2000.0
    ranges_per_s: float = 5000.0
    burst_ranges: float = 100_000.0
    violations_to_lose: int = 20
    violation_window_s: float = 60.0
    recovery_s: float = 10.0  # quiet time before degraded -> ready
    silence_degraded_s: float = 5.0
    silence_lost_s: float = 30.0
    handshake_s: float = 180.0  # a TCG guest boots in ~10-60 s
    request_timeout_s: float = 60.0
    greet_after_s: float = 2.0  # no hello this long after connecting: ask for one
    max_request_pages: int = 16384  # 64 MiB per reserve/release request
    shortfall_backoff_s: float = 10.0
    pageout_window_s: float = 10.0
    measure_interval_s: float = 1.0
    stats_interval_s: float = 1.0
    scan_interval_s: float = 1.0
    max_events: int = 200


@dataclass(frozen=True, slots=True)
class SessionEvent:
    time: float
    kind: str  # "violation", "transition", "request", "pageout", "notice"
    detail: str


@dataclass(frozen=True, slots=True)
class AgentReport:
    """What the session knows, for the backend's VMObservation (sizes in bytes)."""

    state: AgentState
    target: int  # what the host asked the agent to hold
    held: int  # what the agent says it holds, paged-out pages included
    held_present: int  # validated frames the agent holds in RAM (host's map)
    freed: int  # of held_present, measured not resident in the backing
    reserved_paged_out_rate: float  # pages/s, over pageout_window_s
    guest_free: int | None  # MemAvailable
    guest_swapped_out_rate: float  # pages/s, from /proc/vmstat pswpout
    fallback_to_balloon: bool
    violations: int
    mechanism: str


def observation_fields(report: AgentReport) -> dict[str, int | float | None]:
    """The :class:`~memvisor.model.VMObservation` fields an agent report fills (use with
    ``dataclasses.replace`` or as keyword arguments). ``ballooned`` is the guest RAM the agent
    holds (what the guest lost); what the host really freed is ``report.freed``."""
    return {
        "ballooned": report.held_present,
        "balloon_target": report.target,
        "guest_free": report.guest_free,
        "guest_swapped_out_rate": report.guest_swapped_out_rate,
        "reserved_paged_out_rate": report.reserved_paged_out_rate,
    }


class _Bucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.last = rate, burst, burst, now

    def available(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        return self.tokens

    def take(self, n: float, now: float) -> bool:
        if n > self.available(now):
            return False
        self.tokens -= n
        return True


class _Violation(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


@dataclass
class _Request:
    id: int
    kind: str  # "reserve" | "release" | "query"
    pages: int
    sent: float
    added: int = 0


class AgentSession:
    """One VM's agent session. ``vm`` names it in logs and events."""

    def __init__(
        self,
        vm: str,
        layout: RamLayout,
        backing: PageBacking,
        clock: Clock,
        limits: SessionLimits | None = None,
    ) -> None:
        self.vm, self.layout, self.backing, self.clock = vm, layout, backing, clock
        self.limits = limits or SessionLimits()
        now = clock.now()
        self.state = AgentState.CONNECTING
        self.lost_reason = ""
        self.events: deque[SessionEvent] = deque(maxlen=self.limits.max_events)
        self.violations = 0
        self.agent_instance = ""
        self._held = bytearray(layout.end_pfn)  # 1 = frame held by the agent (validated)
        self._held_count = 0
        self._freed_blocks: set[int] = set()
        self._peak = 0
        self.target_pages = 0
        self.agent_held = 0
        self._out = bytearray()
        self._inbuf = bytearray()
        self._skipping = False
        self._next_id = 1
        self._inflight: _Request | None = None
        self._backoff_until = 0.0
        self._synced = False
        self._removed_since_pageout = 0
        self._pageouts: deque[tuple[float, int]] = deque()
        self._violation_times: deque[float] = deque()
        self._since = now  # state entered / last good message
        self._last_good = now
        self._link_up = False
        self._stray = 0
        self._greeted = False
        self._throttled_at = -1e18
        self._stats: list[tuple[float, p.Stats]] = []
        self._measured_at = -1e18
        self._resident = 0
        self._buckets = self._new_buckets(now)
        self.version = 0  # negotiated at hello
        self.workload: p.WorkloadStatus | None = None  # the guest's last workload answer
        self._workload_pending: set[int] = set()

    # --- lifecycle --------------------------------------------------------------------------

    def _new_buckets(self, now: float) -> tuple[_Bucket, _Bucket, _Bucket]:
        lim = self.limits
        return (
            _Bucket(lim.bytes_per_s, lim.burst_bytes, now),
            _Bucket(lim.messages_per_s, lim.burst_messages, now),
            _Bucket(lim.ranges_per_s, lim.burst_ranges, now),
        )

    def _transition(self, new: AgentState, why: str) -> None:
        if new not in _ALLOWED[self.state]:
            raise IllegalTransitionError(
                f"agent session {self.vm}: illegal transition {self.state.value} -> {new.value}"
            )
        log.info("agent %s: %s -> %s (%s)", self.vm, self.state.value, new.value, why)
        self._event("transition", f"{self.state.value} -> {new.value}: {why}")
        self.state = new
        self._since = self.clock.now()
        if new is AgentState.LOST:
            self.lost_reason = why
            self._inflight = None

    @property
    def synced(self) -> bool:
        """The agent has re-reported its reservation since the last handshake."""
        return self._synced

    @property
    def busy(self) -> bool:
        """A reserve/release request is in flight."""
        return self._inflight is not None

    def is_lost(self) -> bool:
        return self.state is AgentState.LOST

    def _event(self, kind: str, detail: str) -> None:
        self.events.append(SessionEvent(self.clock.now(), kind, detail))

    def connected(self) -> None:
        """A new connection to the guest's port: wait for the agent's hello."""
        now = self.clock.now()
        if self.state is not AgentState.CONNECTING:
            self._transition(AgentState.CONNECTING, "new connection")
        self._since = self._last_good = now
        self._link_up, self._synced, self._skipping = True, False, False
        self._greeted = False
        self._inflight = None
        self._workload_pending.clear()
        self._out.clear()
        self._inbuf.clear()
        self._buckets = self._new_buckets(now)

    def disconnected(self) -> None:
        """The connection dropped; the agent keeps its pages, we wait for it to come back."""
        self._link_up = False
        self._inbuf.clear()
        self._event("notice", "connection dropped")

    # --- input ------------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """Bytes from the guest. Over-rate input is dropped unread and counted."""
        if self.state is AgentState.LOST or not data:
            return
        now = self.clock.now()
        if not self._buckets[0].take(len(data), now):
            self._violation("flood", f"more than {self.limits.bytes_per_s:.0f} bytes/s")
            self._inbuf.clear()
            self._skipping = True
            return
        self._inbuf += data
        while (nl := self._inbuf.find(b"\n")) >= 0 and not self.is_lost():
            line = bytes(self._inbuf[:nl])
            del self._inbuf[: nl + 1]
            if self._skipping:
                self._skipping = False
                continue
            self._line(line, now)
        if len(self._inbuf) >= p.MAX_LINE_BYTES:
            self._violation("limit", f"line longer than {p.MAX_LINE_BYTES} bytes")
            self._inbuf.clear()
            self._skipping = True
        self._drive()

    def input_allowance(self) -> int:
        """Bytes the session accepts now. At 0 the link stops reading (backpressure on the
        guest, whose writes then block) and the flood is recorded, once per second."""
        now = self.clock.now()
        allowance = int(self._buckets[0].available(now))
        if allowance == 0 and now - self._throttled_at >= 1.0:
            self._throttled_at = now
            self._violation("flood", f"more than {self.limits.bytes_per_s:.0f} bytes/s")
        return allowance

    def _line(self, line: bytes, now: float) -> None:
        if not line.strip():
            return
        if not self._buckets[1].take(1, now):
            self._violation("flood", f"more than {self.limits.messages_per_s:.0f} messages/s")
            return
        try:
            msg = p.decode_guest_message(line)
            self._handle(msg, now)
        except p.ProtocolError as exc:
            self._violation(exc.code, str(exc))
        except _Violation as exc:
            self._violation(exc.code, str(exc))
        else:
            self._last_good = now

    def _violation(self, code: str, detail: str) -> None:
        now = self.clock.now()
        self.violations += 1
        self._event("violation", f"{code}: {detail}"[:300])
        log.warning("agent %s: protocol violation %s: %s", self.vm, code, detail[:200])
        window = self._violation_times
        window.append(now)
        while window and window[0] < now - self.limits.violation_window_s:
            window.popleft()
        if len(window) >= self.limits.violations_to_lose:
            self._transition(AgentState.LOST, f"{len(window)} protocol violations, ignoring it")
        elif self.state is AgentState.READY:
            self._transition(AgentState.DEGRADED, f"protocol violation ({code})")

    def _handle(self, msg: p.GuestMessage, now: float) -> None:
        if isinstance(msg, p.Hello):
            self._hello(msg)
            return
        if self.state is AgentState.CONNECTING:
            self._stray += 1  # in flight from before a reconnect: ignored, not a violation
            return
        if isinstance(msg, p.Pages):
            self._pages(msg, now)
        elif isinstance(msg, p.Done):
            self._done(msg)
        elif isinstance(msg, p.Error):
            self._guest_error(msg)
        elif isinstance(msg, p.PageOut):
            self._pageout(msg, now)
        elif isinstance(msg, p.WorkloadStatus):
            self._workload_status(msg)
        else:
            self._stats.append((now, msg))
            del self._stats[:-2]

    def _hello(self, msg: p.Hello) -> None:
        if self.state is not AgentState.CONNECTING:  # the agent saw a reconnect we did not
            self._transition(AgentState.CONNECTING, "agent started a new handshake")
            self._synced, self._inflight = False, None
        version = p.choose_version(msg.versions)
        if version is None:
            self._transition(AgentState.LOST, f"no common protocol version in {msg.versions}")
            return
        if self.agent_instance and msg.instance != self.agent_instance:
            self._event("notice", "a new agent process: its old reservation is gone")
        self.agent_instance, self.agent_held = msg.instance, msg.held
        lim = self.limits
        self.version = version
        welcome = p.Welcome(
            version, self.backing.block_pages, lim.stats_interval_s, lim.scan_interval_s
        )
        self._out += p.encode(welcome)
        self._transition(AgentState.READY, f"agent {msg.agent!r} speaks version {version}")

    # --- pages: validate everything, then apply -------------------------------------------

    def _pages(self, msg: p.Pages, now: float) -> None:
        req = self._inflight
        if msg.reset and msg.reason != "resync":
            raise _Violation("schema", "reset outside a resync")
        if not self._synced and not msg.reset:
            raise _Violation("order", "pages before the resync that follows hello")
        if msg.reason in ("reserve", "release") and (
            req is None or req.kind != msg.reason or msg.re != req.id
        ):
            raise _Violation("order", f"{msg.reason} pages for request {msg.re}, not in flight")
        nranges = len(msg.add) + len(msg.remove)
        if not self._buckets[2].take(nranges, now):
            raise _Violation("flood", f"more than {self.limits.ranges_per_s:.0f} ranges/s")
        held = bytearray() if msg.reset else self._held
        if msg.reset:
            held = bytearray(len(self._held))
        self._check_ranges(msg, held)
        added, removed = p.range_pages(msg.add), p.range_pages(msg.remove)
        new_count = (0 if msg.reset else self._held_count) + added - removed
        if msg.reason == "reserve" and req is not None:
            if req.added + added > req.pages:
                raise _Violation("range", f"{req.added + added} pages for a reserve of {req.pages}")
            req.added += added
        elif msg.reason != "resync" and new_count > max(self.target_pages, self._peak):
            raise _Violation(
                "range", f"would hold {new_count} pages, asked for {self.target_pages}"
            )
        self._apply(msg, held, new_count)

    def _check_ranges(self, msg: p.Pages, held: bytearray) -> None:
        block = self.backing.block_pages
        for name, ranges in (("add", msg.add), ("remove", msg.remove)):
            last_end = -1
            for start, count in sorted(ranges):
                if not self.layout.contains((start, count)):
                    raise _Violation("range", f"{name} {start}+{count} is outside the VM's RAM")
                if start < last_end:
                    raise _Violation("duplicate", f"{name} ranges overlap at page {start}")
                last_end = start + count
                if name == "add" and msg.reason == "reserve" and (start % block or count % block):
                    raise _Violation("align", f"{start}+{count} not aligned to {block} pages")
        for start, count in msg.remove:
            if held.find(0, start, start + count) >= 0:
                raise _Violation("range", f"remove {start}+{count}: pages not held")
        if msg.remove and any(held.find(1, s, s + c) >= 0 for s, c in msg.add):
            held = bytearray(held)  # a move may re-add frames it removes: check after removal
            for start, count in msg.remove:
                held[start : start + count] = bytes(count)
        for start, count in msg.add:
            hit = held.find(1, start, start + count)
            if hit >= 0:
                raise _Violation("duplicate", f"add {start}+{count}: page {hit} already held")

    def _apply(self, msg: p.Pages, held: bytearray, new_count: int) -> None:
        block = self.backing.block_pages
        for start, count in msg.remove:
            held[start : start + count] = bytes(count)
            for b in range(start // block, (start + count - 1) // block + 1):
                self._freed_blocks.discard(b)
        for start, count in msg.add:
            held[start : start + count] = b"\x01" * count
        if msg.reset:  # what the resync no longer holds may have been paged out meanwhile
            self._removed_since_pageout += max(0, self._held_count - new_count)
            self._held, self._freed_blocks, self._synced = held, set(), True
        else:
            self._removed_since_pageout += p.range_pages(msg.remove)
        self._held_count = new_count
        self._peak = max(self._peak, new_count)
        blocks = [
            r
            for r in punchable_blocks(self._held, msg.add, block)
            if r[0] // block not in self._freed_blocks
        ]
        if blocks:
            self.backing.free(blocks)
            self._freed_blocks.update(r[0] // block for r in blocks)
            self._measured_at = -1e18  # measure again soon

    # --- replies and reports ----------------------------------------------------------------

    def _done(self, msg: p.Done) -> None:
        req = self._inflight
        if req is None or msg.re != req.id:
            raise _Violation("order", f"done for request {msg.re}, not in flight")
        if msg.achieved > msg.requested or msg.requested != req.pages:
            raise _Violation("range", f"done: achieved {msg.achieved} of {msg.requested}")
        self._inflight = None
        self.agent_held = msg.held
        if msg.achieved < req.pages and req.kind == "reserve":
            self._backoff_until = self.clock.now() + self.limits.shortfall_backoff_s
            self._event("request", f"agent reserved {msg.achieved} of {req.pages} pages")

    def _guest_error(self, msg: p.Error) -> None:
        req = self._inflight
        self._event("request", f"agent error {msg.code}: {msg.message}")
        if req is not None and msg.re == req.id:
            self._inflight = None
            self._backoff_until = self.clock.now() + self.limits.shortfall_backoff_s
        elif msg.re is not None:
            raise _Violation("order", f"error for request {msg.re}, not in flight")

    def _pageout(self, msg: p.PageOut, now: float) -> None:
        # Count only what the validated page maps show left the reservation.
        n = min(msg.swapped + msg.dropped, self._removed_since_pageout)
        self._removed_since_pageout -= n
        if n:
            self._pageouts.append((now, n))
            self._event(
                "pageout",
                f"{n} reserved pages paged out, ages {msg.age_min:.1f}.."
                f"{msg.age_max:.1f} s (median {msg.age_median:.1f})",
            )

    # --- workloads (protocol version 2) ----------------------------------------------------

    def start_workload(self, kind: str, size: int, rate: int = 0, pattern: int = 0) -> int:
        """Ask the agent to start the guest's workload; returns the request id. The answer
        (:attr:`workload`) comes as a ``workload.status``. Bad arguments raise InputError and
        send nothing."""
        vm_bytes = self.layout.pages * PAGE
        if kind not in p.WORKLOAD_KINDS:
            raise InputError(f"workload kind {kind!r}: one of {list(p.WORKLOAD_KINDS)}")
        if not 0 < size <= vm_bytes - WORKLOAD_GUEST_LEFT or size % PAGE:
            raise InputError(
                f"workload size {size}: a multiple of {PAGE} in (0, "
                f"{vm_bytes - WORKLOAD_GUEST_LEFT}] (the VM's RAM less what the guest keeps)"
            )
        if not 0 <= rate <= p.MAX_WORKLOAD_RATE or (kind == "grow") != (rate > 0):
            raise InputError(
                f"workload rate {rate}: 1..{p.MAX_WORKLOAD_RATE} bytes/s for grow, 0 otherwise"
            )
        if not 0 <= pattern < 1 << 32:
            raise InputError(f"workload pattern {pattern}: 0..{(1 << 32) - 1}")
        return self._workload_request(lambda i: p.WorkloadStart(i, kind, size, rate, pattern))

    def stop_workload(self) -> int:
        return self._workload_request(p.WorkloadStop)

    def query_workload(self) -> int:
        return self._workload_request(p.WorkloadQuery)

    def _workload_request(self, make: Callable[[int], p.HostMessage]) -> int:
        if self.state not in (AgentState.READY, AgentState.DEGRADED) or not self._link_up:
            raise BackendError(f"agent {self.vm}: not connected ({self.state.value})")
        if self.version < p.WORKLOAD_VERSION:
            raise BackendError(
                f"agent {self.vm}: speaks protocol version {self.version}; workloads need "
                f"{p.WORKLOAD_VERSION}"
            )
        if len(self._workload_pending) >= 8:
            raise BackendError(f"agent {self.vm}: 8 workload requests unanswered")
        rid = self._next_id
        self._next_id = self._next_id % p.MAX_REQUEST_ID + 1
        self._out += p.encode(make(rid))
        self._workload_pending.add(rid)
        return rid

    def _workload_status(self, msg: p.WorkloadStatus) -> None:
        if msg.re not in self._workload_pending:
            raise _Violation("order", f"workload.status for request {msg.re}, not in flight")
        vm_bytes = self.layout.pages * PAGE
        if msg.size > vm_bytes or msg.allocated > msg.size:
            raise _Violation("range", f"workload of {msg.allocated} of {msg.size} bytes")
        self._workload_pending.discard(msg.re)
        self.workload = msg

    def workload_answered(self, rid: int) -> bool:
        return rid not in self._workload_pending

    # --- control ----------------------------------------------------------------------------

    def set_target(self, nbytes: int) -> None:
        """Ask the agent to hold ``nbytes`` (rounded down to whole blocks)."""
        if nbytes < 0:
            raise ValueError(f"agent {self.vm}: negative reservation target {nbytes}")
        block = self.backing.block_pages
        pages = min(nbytes // PAGE, self.layout.pages) // block * block
        if pages != self.target_pages:
            self.target_pages, self._peak = pages, max(pages, self._held_count)
            self._backoff_until = 0.0
        self._drive()

    def _drive(self) -> None:
        """Send the next reserve or release toward the target, one request at a time."""
        if self.state not in (AgentState.READY, AgentState.DEGRADED) or not self._link_up:
            return
        now = self.clock.now()
        if self._inflight is not None or not self._synced or now < self._backoff_until:
            return
        diff = self.target_pages - self.agent_held
        block = self.backing.block_pages
        size = min(abs(diff), self.limits.max_request_pages) // block * block
        if size == 0:
            self._peak = max(self.target_pages, self._held_count)
            return
        kind = "reserve" if diff > 0 else "release"
        req = _Request(self._next_id, kind, size, now)
        self._next_id = self._next_id % p.MAX_REQUEST_ID + 1
        msg: p.HostMessage = p.Reserve(req.id, size) if diff > 0 else p.Release(req.id, size)
        self._out += p.encode(msg)
        self._inflight = req

    def outgoing(self) -> bytes:
        """Bytes to send to the guest (then forgotten)."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def tick(self) -> None:
        """Time-based transitions: handshake, silence, request timeouts, recovery."""
        now, lim = self.clock.now(), self.limits
        if self.state is AgentState.CONNECTING and now - self._since > lim.handshake_s:
            self._transition(AgentState.LOST, f"no hello within {lim.handshake_s:.0f} s")
        elif self.state is AgentState.CONNECTING and self._link_up and not self._greeted:
            if now - self._since > lim.greet_after_s:
                self._out += p.encode(p.Greet())
                self._greeted = True
        elif self.state in (AgentState.READY, AgentState.DEGRADED):
            self._tick_established(now)
        self._drive()

    def _tick_established(self, now: float) -> None:
        lim, silent = self.limits, now - self._last_good
        req = self._inflight
        if silent > lim.silence_lost_s:
            self._transition(AgentState.LOST, f"silent for {silent:.0f} s")
            return
        if req is not None and now - req.sent > lim.request_timeout_s:
            self._inflight = None
            self._event("request", f"{req.kind} {req.id} timed out")
            if self.state is AgentState.READY:
                self._transition(AgentState.DEGRADED, f"{req.kind} request timed out")
        elif self.state is AgentState.READY and silent > lim.silence_degraded_s:
            self._transition(AgentState.DEGRADED, f"silent for {silent:.0f} s")
        elif (
            self.state is AgentState.DEGRADED
            and silent <= lim.silence_degraded_s
            and now - max(self._since, self._last_violation()) >= lim.recovery_s
        ):
            self._transition(AgentState.READY, f"well-behaved for {lim.recovery_s:.0f} s")

    def _last_violation(self) -> float:
        return self._violation_times[-1] if self._violation_times else -1e18

    # --- observations -----------------------------------------------------------------------

    def held_ranges(self) -> list[p.PageRange]:
        return _ranges_of(self._held)

    def resident_held_pages(self) -> int:
        """Held frames still resident in the backing, measured (at most once per interval)."""
        now = self.clock.now()
        if now - self._measured_at >= self.limits.measure_interval_s:
            self._resident = self.backing.resident_pages(self.held_ranges())
            self._measured_at = now
        return self._resident

    def pageout_rate(self) -> float:
        now, window = self.clock.now(), self.limits.pageout_window_s
        while self._pageouts and self._pageouts[0][0] < now - window:
            self._pageouts.popleft()
        return sum(n for _, n in self._pageouts) / window

    def guest_stats(self) -> p.Stats | None:
        return self._stats[-1][1] if self._stats else None

    def _swapout_rate(self) -> float:
        if len(self._stats) < 2:
            return 0.0
        (t0, a), (t1, b) = self._stats
        delta = b.vmstat.get("pswpout", 0) - a.vmstat.get("pswpout", 0)
        return max(0.0, delta / (t1 - t0)) if t1 > t0 else 0.0

    def report(self) -> AgentReport:
        stats = self.guest_stats()
        resident = self.resident_held_pages()
        return AgentReport(
            state=self.state,
            target=self.target_pages * PAGE,
            held=self.agent_held * PAGE,
            held_present=self._held_count * PAGE,
            freed=max(0, self._held_count - resident) * PAGE,
            reserved_paged_out_rate=self.pageout_rate(),
            guest_free=stats.meminfo.get("MemAvailable") if stats else None,
            guest_swapped_out_rate=self._swapout_rate(),
            fallback_to_balloon=self.state is AgentState.LOST,
            violations=self.violations,
            mechanism=self.backing.mechanism,
        )


def _ranges_of(held: bytearray) -> list[p.PageRange]:
    out: list[p.PageRange] = []
    pos = held.find(1)
    while pos >= 0:
        end = held.find(0, pos)
        end = len(held) if end < 0 else end
        out.append((pos, end - pos))
        pos = held.find(1, end)
    return out


class BalloonControl(Protocol):
    """virtio-balloon of one VM (the backend implements it with QMP ``balloon``)."""

    def set_balloon(self, nbytes: int) -> None:
        """Have the balloon hold ``nbytes`` away from the guest (0 deflates it)."""
        ...


class ReservationDriver:
    """Puts a VM's reservation target on its agent, or on virtio-balloon while it is lost.

    Call :meth:`sync` after each session tick. Once the balloon has taken over it keeps the
    target until the agent is back, handshaken and has re-reported its reservation (a
    reconnect alone, ``connecting``, would otherwise deflate it for the whole handshake
    timeout); then the balloon is deflated and the agent takes the target again.
    ``balloon_bytes`` is what the balloon holds: a re-attaching manager passes what QEMU
    reports."""

    def __init__(
        self, session: AgentSession, balloon: BalloonControl, balloon_bytes: int = 0
    ) -> None:
        self.session, self.balloon = session, balloon
        self.target = 0
        self.balloon_bytes = balloon_bytes
        # The balloon holds the target even with a healthy agent (set where the agent's
        # reservation would free nothing, e.g. anonymous RAM while KSM is off, or where the
        # balloon already held memory when the manager re-attached).
        self.balloon_only = False

    @property
    def agent_acting(self) -> bool:
        """The agent, not the balloon, holds the target."""
        s = self.session
        ok = s.state in (AgentState.READY, AgentState.DEGRADED) and s.synced
        return ok and not self.balloon_only

    def set_target(self, nbytes: int) -> None:
        self.target = nbytes
        self.sync()

    def sync(self) -> None:
        s = self.session
        lost = s.state is AgentState.LOST
        keep = self.balloon_only or (self.balloon_bytes and not self.agent_acting)
        want = self.target if lost or keep else 0
        if want != self.balloon_bytes:
            if want:
                log.warning(
                    "agent %s lost (%s): virtio-balloon takes %d bytes", s.vm, s.lost_reason, want
                )
            s.events.append(
                SessionEvent(s.clock.now(), "notice", f"virtio-balloon fallback holds {want} bytes")
            )
            self.balloon.set_balloon(want)
            self.balloon_bytes = want
        if s.state is not AgentState.LOST:
            s.set_target(0 if self.balloon_only else self.target)
