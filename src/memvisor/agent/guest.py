"""The in-guest agent: speaks the protocol, holds the reservation, watches and reports.

Runs inside the guest (stdlib only). :class:`Agent` is the protocol logic without I/O: it
takes lines from the host and produces lines for it, so tests drive it directly. :func:`run`
moves bytes between an :class:`Agent` and a channel: the virtio-serial port inside a guest
(:class:`VirtioPort`) or a unix socket (:class:`UnixClient`, for tests on the host).

The agent keeps its reservation while the host side is away (host restarted, channel
dropped): on every reconnect it says hello again and, once welcomed, re-reports everything
it holds (a ``pages`` message with ``reset``), then what was paged out meanwhile.
"""

from __future__ import annotations

import errno
import os
import secrets
import select
import socket
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable

from memvisor.agent import protocol as p
from memvisor.agent.prefetch import READ_RATE, READ_STEP, SWAPIN_RATE, Prefetcher
from memvisor.agent.reserve import Reservation, ScanResult
from memvisor.agent.workload import WorkloadRunner, check_request

AGENT_NAME = "memvisor-agent/1"
RATE_WINDOW = 10.0  # seconds over which the page-out rate is averaged


class Agent:
    """Protocol state of one agent process; ``send`` receives every outgoing line."""

    def __init__(
        self,
        reservation: Reservation,
        send: Callable[[bytes], None],
        clock: Callable[[], float] = time.monotonic,
        read_file: Callable[[str], str] | None = None,
        workload: WorkloadRunner | None = None,
    ) -> None:
        self.reservation = reservation
        self.workload = workload or WorkloadRunner()
        self.version = 0
        self.send = send
        self.clock = clock
        self.read_file = read_file or _read_text
        self.instance = secrets.token_hex(8)
        self.welcomed = False
        self.stats_interval = 1.0
        self.scan_interval = 1.0
        self._next_stats = 0.0
        self._next_scan = 0.0
        self._seq = 0
        self._pageouts: deque[tuple[float, int]] = deque()
        self._pending = ScanResult()  # page-outs seen while nobody listened
        self._pswpin: tuple[float, int] | None = None  # (time, /proc/vmstat pswpin) at a scan
        self._vmstat_at: tuple[float, dict[str, int]] | None = None  # (tick time, parsed)
        self.swapin_rate = 0.0  # pages/s the guest read back from its swap, between scans
        self.prefetch: Callable[[int], int] = Prefetcher(clock)
        self.prefetched = 0  # bytes of swap covered by prefetch advice, in total
        self.read_rate = READ_RATE  # bytes/s of read-back asked for, at most
        self._read_back = 0  # bytes of released memory still to read back
        self._next_read = 0.0  # when the next chunk of the read-back is due

    # --- connection lifecycle ---------------------------------------------------------------

    def connected(self) -> None:
        self.welcomed = False
        hello = p.Hello(p.PROTOCOL_VERSIONS, AGENT_NAME, 4096, self.instance, self.reservation.held)
        self.send(p.encode(hello))

    def disconnected(self) -> None:
        self.welcomed = False

    def receive_line(self, line: bytes) -> None:
        try:
            msg = p.decode_host_message(line)
        except p.ProtocolError as exc:
            self._error(None, exc.code, str(exc))
            return
        if isinstance(msg, p.Greet):
            if self.welcomed:  # else our hello is already on its way: no second one
                self.connected()
        elif isinstance(msg, p.Welcome):
            self._welcome(msg)
        elif not self.welcomed:
            self._error(getattr(msg, "id", None), "order", "request before welcome")
        elif isinstance(msg, p.Reserve):
            self._reserve(msg)
        elif isinstance(msg, p.Release):
            self._release(msg)
        elif isinstance(msg, p.Query):
            self._resync(msg.id)
            self._done(msg.id, 0, 0)
        elif isinstance(msg, (p.WorkloadStart, p.WorkloadStop, p.WorkloadQuery)):
            self._workload(msg)
        else:
            self._done(msg.id, 0, 0)

    # --- requests ---------------------------------------------------------------------------

    def _welcome(self, msg: p.Welcome) -> None:
        if msg.version not in p.PROTOCOL_VERSIONS:
            self._error(None, "version", f"version {msg.version} not offered")
            return
        if self.reservation.held and msg.block_pages != self.reservation.block_pages:
            self.reservation.release_all()  # held blocks no longer fit the host's backing
        self.reservation.block_pages = msg.block_pages
        self.stats_interval, self.scan_interval = msg.stats_interval, msg.scan_interval
        self.version = msg.version
        self.welcomed = True
        self._resync(None)
        if self._pending.paged_out or self._pending.moved:
            self._report_pageout(self._pending)
        self._pending = ScanResult()
        self._next_stats = self._next_scan = self.clock()

    def _reserve(self, msg: p.Reserve) -> None:
        self._read_back = 0  # the host wants memory again: reading back would fight it
        try:
            pfns = self.reservation.reserve(msg.pages)
        except (ValueError, OSError) as exc:
            self._error(msg.id, "reserve", str(exc)[: p.MAX_TEXT])
            return
        self._send_pages(msg.id, "reserve", p.compact_ranges(pfns), [])
        self._done(msg.id, msg.pages, len(pfns))

    def _release(self, msg: p.Release) -> None:
        try:
            pfns, released = self.reservation.release(msg.pages)
        except ValueError as exc:
            self._error(msg.id, "release", str(exc)[: p.MAX_TEXT])
            return
        self._send_pages(msg.id, "release", [], p.compact_ranges(pfns))
        self._done(msg.id, msg.pages, released)
        if released and self.swapin_rate >= SWAPIN_RATE:
            # the guest is faulting its memory back one page at a time: read it back in bulk
            # into what was just released, paced (READ_RATE: the swap disk is every VM's)
            self._read_back += released * 4096
            self._read_more(self.clock())

    def _read_more(self, now: float) -> None:
        """The next chunk of the read-back, when due: ``read_rate x READ_STEP`` bytes, and no
        more than the guest has free above its reclaim watermark (more would only be swapped
        out again). No room, or nothing left in swap to read, ends the read-back."""
        if self._read_back <= 0 or now < self._next_read:
            return
        chunk = min(self._read_back, int(self.read_rate * READ_STEP), self._free_above_watermark())
        covered = self.prefetch(chunk) if chunk > 0 else 0
        self.prefetched += covered
        self._read_back = 0 if covered <= 0 else self._read_back - chunk
        self._next_read = now + READ_STEP

    def _free_above_watermark(self) -> int:
        """Free guest memory above twice ``min_free_kbytes`` (the kernel wakes its reclaim at
        1.25x), in bytes; 0 when unknown."""
        try:
            free = _parse_meminfo(self.read_file("/proc/meminfo")).get("MemFree", 0)
            floor = int(self.read_file("/proc/sys/vm/min_free_kbytes").split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            return 0
        return max(0, free - 2 * floor)

    def _workload(self, msg: p.WorkloadStart | p.WorkloadStop | p.WorkloadQuery) -> None:
        if self.version < p.WORKLOAD_VERSION:
            self._error(msg.id, "version", f"workloads need protocol {p.WORKLOAD_VERSION}")
            return
        refused = ""
        if isinstance(msg, p.WorkloadStart):
            available = _parse_meminfo(self.read_file("/proc/meminfo")).get("MemAvailable", 0)
            refused = check_request(msg.kind, msg.size, msg.rate, msg.pattern, available) or ""
            if not refused:
                try:
                    self.workload.start(msg.kind, msg.size, msg.rate, msg.pattern)
                except OSError as exc:
                    refused = f"cannot start: {exc}"
        elif isinstance(msg, p.WorkloadStop):
            self.workload.stop()
        self._workload_status(msg.id, refused)

    def _workload_status(self, re: int, refused: str) -> None:
        w = self.workload
        state = "refused" if refused else w.state()
        status = p.WorkloadStatus(
            re, w.kind, state, w.size, w.allocated, tuple(w.fills), tuple(w.touches),
            _printable(refused or w.error),
        )  # fmt: skip
        self.send(p.encode(status))

    def _resync(self, re: int | None) -> None:
        held = self.reservation.held_ranges()
        for i, chunk in enumerate(p.chunked(held)):
            self.send(p.encode(p.Pages(re, "resync", tuple(chunk), (), reset=i == 0)))

    def _send_pages(
        self, re: int | None, reason: str, add: list[p.PageRange], remove: list[p.PageRange]
    ) -> None:
        adds, removes = p.chunked(add), p.chunked(remove)
        for i in range(max(len(adds), len(removes))):  # a move's two halves travel together
            a = tuple(adds[i]) if i < len(adds) else ()
            r = tuple(removes[i]) if i < len(removes) else ()
            if a or r:
                self.send(p.encode(p.Pages(re, reason, a, r)))

    def _done(self, re: int, requested: int, achieved: int) -> None:
        r = self.reservation
        self.send(p.encode(p.Done(re, requested, achieved, r.held, r.swapped)))

    def _error(self, re: int | None, code: str, message: str) -> None:
        self.send(p.encode(p.Error(re, code[:40], _printable(message))))

    # --- periodic work ----------------------------------------------------------------------

    def tick(self) -> float:
        """Scan and report when due; returns seconds until the next due time."""
        now = self.clock()
        if now >= self._next_scan:
            self._next_scan = now + self.scan_interval
            self._scan(now)
        if self.welcomed and now >= self._next_stats:
            self._next_stats = now + self.stats_interval
            self._send_stats(now)
        self._read_more(now)
        due = min(self._next_scan, self._next_stats)
        if self._read_back > 0:
            due = min(due, self._next_read)
        return max(0.0, due - self.clock())

    def _scan(self, now: float) -> None:
        self._track_swapin(now)
        result = self.reservation.scan()
        if result.paged_out:
            self._pageouts.append((now, result.paged_out))
        while self._pageouts and self._pageouts[0][0] < now - RATE_WINDOW:
            self._pageouts.popleft()
        if not (result.paged_out or result.moved or result.returned):
            return
        if not self.welcomed:
            _merge(self._pending, result)  # the resync on reconnect carries the frames
            return
        for reason, add, remove in _page_changes(result):
            self._send_pages(None, reason, p.compact_ranges(add), p.compact_ranges(remove))
        if result.paged_out or result.moved:
            self._report_pageout(result)

    def _track_swapin(self, now: float) -> None:
        try:
            pswpin = self._vmstat(now).get("pswpin")
        except (OSError, ValueError):
            return
        if pswpin is None:
            return
        if self._pswpin is not None and now > self._pswpin[0]:
            self.swapin_rate = max(0, pswpin - self._pswpin[1]) / (now - self._pswpin[0])
        self._pswpin = (now, pswpin)

    def _report_pageout(self, result: ScanResult) -> None:
        ages = result.ages or [0.0]
        hist = [0] * p.AGE_BUCKETS
        for a in result.ages:
            hist[p.age_bucket(a)] += 1
        rate = sum(n for _, n in self._pageouts) / RATE_WINDOW
        msg = p.PageOut(
            result.swapped,
            result.moved,
            result.dropped,
            self.reservation.swapped,
            rate,
            min(ages),
            statistics.median(ages),
            max(ages),
            tuple(hist),
        )
        self.send(p.encode(msg))

    def _vmstat(self, now: float) -> dict[str, int]:
        """/proc/vmstat, read once per tick: the scan (swap-in rate) and the stats report
        are usually due at the same tick."""
        if self._vmstat_at is None or self._vmstat_at[0] != now:
            self._vmstat_at = (now, _parse_vmstat(self.read_file("/proc/vmstat")))
        return self._vmstat_at[1]

    def _send_stats(self, now: float) -> None:
        self._seq += 1
        meminfo = _parse_meminfo(self.read_file("/proc/meminfo"))
        vmstat = self._vmstat(now)
        uptime = float(self.read_file("/proc/uptime").split()[0])
        self.send(p.encode(p.Stats(self._seq, uptime, meminfo, vmstat)))


def _page_changes(r: ScanResult) -> list[tuple[str, list[int], list[int]]]:
    """A scan's frame changes for one ``pages`` report, labelled by their main cause."""
    reason = "moved" if r.moved else "returned" if r.returned else "swapped"
    return [(reason, r.add, r.remove)]


def _merge(into: ScanResult, r: ScanResult) -> None:
    into.swapped += r.swapped
    into.dropped += r.dropped
    into.moved += r.moved
    into.returned += r.returned
    into.ages += r.ages


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[: p.MAX_TEXT]


def _parse_meminfo(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in p.MEMINFO_KEYS:
            fields = rest.split()
            out[key] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def _parse_vmstat(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key in p.VMSTAT_KEYS:
            out[key] = int(value)
    return out


# --- channels -------------------------------------------------------------------------------


class VirtioPort:
    """A virtio-serial port. Reads give EOF and poll says HUP while no host client listens."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    def try_connect(self) -> bool:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN | select.POLLOUT)
        events = dict(poller.poll(0)).get(self.fd, 0)
        return not events & select.POLLHUP

    def close_connection(self) -> None:
        """Nothing to close: the host side went away; keep the port open."""


class UnixClient:
    """A unix stream socket to a server on the host (tests; reconnects like the port)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self._sock: socket.socket | None = None

    def try_connect(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            return False
        sock.setblocking(False)
        self._sock, self.fd = sock, sock.fileno()
        return True

    def close_connection(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock, self.fd = None, -1


Channel = VirtioPort | UnixClient


def find_port(name: str, root: str = "/sys/class/virtio-ports") -> str:
    """The /dev path of the virtio-serial port called ``name``."""
    for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            with open(os.path.join(root, entry, "name")) as f:
                if f.read().strip() == name:
                    return os.path.join("/dev", entry)
        except OSError:
            continue
    raise FileNotFoundError(f"no virtio-serial port named {name!r} under {root}")


class _Pump:
    """Moves bytes between a channel and an agent; one instance per process."""

    def __init__(self, channel: Channel, agent_factory: Callable[[Callable[[bytes], None]], Agent]):
        self.channel = channel
        self.out = bytearray()
        self.inbuf = bytearray()
        self.skipping = False  # inside an over-long line: drop bytes up to its newline
        self.up = False
        self.agent = agent_factory(self.out.extend)

    def step(self, retry: float) -> None:
        if not self.up:
            if self.channel.try_connect():
                _say("host side connected")
                self.up = True
                self.inbuf.clear()
                self.agent.connected()
            else:
                time.sleep(min(retry, self.agent.tick()) or retry)
                return
        wait = self.agent.tick()
        poller = select.poll()
        poller.register(self.channel.fd, select.POLLIN | (select.POLLOUT if self.out else 0))
        for _, ev in poller.poll(max(1, int(wait * 1000))):
            if ev & select.POLLOUT:
                self._write()
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self._read()

    def _write(self) -> None:
        try:
            n = os.write(self.channel.fd, self.out[:65536])
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                self._down()
            return
        del self.out[:n]

    def _read(self) -> None:
        try:
            data = os.read(self.channel.fd, 65536)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return
            data = b""
        if not data:
            self._down()
            return
        self.inbuf += data
        while (nl := self.inbuf.find(b"\n")) >= 0:
            line = bytes(self.inbuf[:nl])
            del self.inbuf[: nl + 1]
            if self.skipping:
                self.skipping = False
            elif line.strip():
                self.agent.receive_line(line)
        if len(self.inbuf) >= p.MAX_LINE_BYTES:
            self.inbuf.clear()
            self.skipping = True

    def _down(self) -> None:
        _say("host side gone; keeping the reservation")
        self.up = False
        self.out.clear()
        self.channel.close_connection()
        self.agent.disconnected()


def _say(text: str) -> None:
    print(f"memvisor.agent: {text}", file=sys.stderr, flush=True)


def run(channel: Channel, reservation: Reservation, retry: float = 0.2) -> None:
    """Serve forever: reconnect whenever the host side goes away, keep the reservation."""
    pump = _Pump(channel, lambda send: Agent(reservation, send))
    while True:
        pump.step(retry)
