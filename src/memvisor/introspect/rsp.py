"""GDB remote serial protocol (RSP): sans-I/O framing plus a small blocking client.

The framing half (:class:`RspConnection`, :func:`frame`, :func:`escape`, :func:`rle_decode`,
...) never touches a socket: it turns bytes into events and payloads into bytes, so it is
tested byte for byte. :class:`GdbClient` drives it over a connected stream socket (QEMU's
``-gdb unix:PATH``) with timeouts.

What QEMU 7.2's stub does (see FACTS.md): no ``QStartNoAckMode``, ``PacketSize=1000``
(hex), connecting pauses the VM and disconnecting leaves it paused, and any byte that reaches
it while the VM runs stops the VM, an ack included, sometimes without a stop reply. So we ack
only while the VM is stopped (the system-mode stub never waits for acks), and we always end a
session with ``D`` (detach), which removes every breakpoint and resumes the VM, also when the
caller raised an exception.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO

from memvisor.errors import IntrospectionError

# Characters that must be escaped in binary data: '#', '$', '}', '*'.
_ESCAPED = frozenset(b"#$}*")
_ESCAPE = 0x7D
MAX_PACKET = 1 << 20  # a peer that sends more than this in one packet is broken
INTERRUPT = b"\x03"
_HEX = frozenset(b"0123456789abcdefABCDEF")


def checksum(data: bytes) -> int:
    """The modulo-256 sum of the bytes between ``$`` and ``#``."""
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    """Escape binary data for ``X`` packets: ``}`` then the byte xor 0x20."""
    out = bytearray()
    for byte in data:
        if byte in _ESCAPED:
            out += bytes((_ESCAPE, byte ^ 0x20))
        else:
            out.append(byte)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Undo :func:`escape`. A trailing lone ``}`` is an error."""
    out = bytearray()
    it = iter(data)
    for byte in it:
        if byte == _ESCAPE:
            nxt = next(it, None)
            if nxt is None:
                raise IntrospectionError("RSP: binary data ends inside an escape")
            out.append(nxt ^ 0x20)
        else:
            out.append(byte)
    return bytes(out)


def rle_decode(data: bytes) -> bytes:
    """Expand run-length encoding: ``X*c`` repeats X ``ord(c) - 29`` more times."""
    out = bytearray()
    i = 0
    while i < len(data):
        byte = data[i]
        if byte == ord("*"):
            if not out or i + 1 >= len(data):
                raise IntrospectionError("RSP: run-length marker without a character or count")
            repeat = data[i + 1] - 29
            if repeat < 0:
                raise IntrospectionError(f"RSP: bad run-length count {data[i + 1]!r}")
            out += bytes((out[-1],)) * repeat
            i += 2
            continue
        out.append(byte)
        i += 1
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """``$payload#xx``. The payload must already be escaped where binary."""
    return b"$" + payload + b"#" + f"{checksum(payload):02x}".encode()


@dataclass(frozen=True)
class Ack:
    """The peer acknowledged our last packet (``+``)."""


@dataclass(frozen=True)
class Nack:
    """The peer asks for our last packet again (``-``)."""


@dataclass(frozen=True)
class Packet:
    """A packet with a good checksum; ``payload`` is run-length decoded, not unescaped."""

    payload: bytes


@dataclass(frozen=True)
class Notification:
    """An asynchronous ``%name:data`` notification (non-stop mode)."""

    payload: bytes


@dataclass(frozen=True)
class BadPacket:
    """A packet whose checksum did not match; a ``-`` was queued in ack mode."""

    raw: bytes


@dataclass(frozen=True)
class InterruptRequest:
    """A ``0x03`` byte (only a stub receives these; our scripted test peers do)."""


Event = Ack | Nack | Packet | Notification | BadPacket | InterruptRequest


@dataclass
class RspConnection:
    """Protocol state of one end: parse incoming bytes, produce outgoing bytes, handle acks.

    Call :meth:`receive` with bytes read from the peer, :meth:`send_packet` to frame a request,
    and write out :meth:`data_to_send` after each. In ack mode every good packet is answered
    with ``+``, every bad one with ``-``, and a ``-`` from the peer re-sends our last packet.
    """

    ack_mode: bool = True
    max_packet: int = MAX_PACKET
    _buf: bytearray = field(default_factory=bytearray)
    _out: bytearray = field(default_factory=bytearray)
    _last_sent: bytes = b""
    _acking: bool = True

    def send_packet(self, payload: bytes) -> None:
        self._last_sent = frame(payload)
        self._out += self._last_sent

    def send_raw(self, data: bytes) -> None:
        self._out += data

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def receive(self, data: bytes, *, ack: bool = True) -> list[Event]:
        """Parse ``data``; ``ack=False`` withholds our ``+``/``-`` for these packets (see
        :class:`GdbClient` for why QEMU needs that while the VM runs)."""
        self._buf += data
        events: list[Event] = []
        self._acking = ack
        while self._buf:
            event = self._next_event()
            if event is None:
                break
            events.append(event)
        return events

    def _next_event(self) -> Event | None:
        buf = self._buf
        head = buf[0]
        if head in b"$%":
            end = buf.find(b"#")
            if end < 0:
                if len(buf) > self.max_packet:
                    raise IntrospectionError(f"RSP: packet longer than {self.max_packet} bytes")
                return None
            if len(buf) < end + 3:
                return None
            return self._complete_packet(head, end)
        del buf[0]
        if head == ord("+"):
            return Ack()
        if head == ord("-"):
            if self.ack_mode and self._last_sent:
                self._out += self._last_sent
            return Nack()
        if head == INTERRUPT[0]:
            return InterruptRequest()
        return self._next_event() if buf else None  # noise between packets is skipped

    def _complete_packet(self, head: int, end: int) -> Event:
        raw = bytes(self._buf[1:end])
        sum_text = bytes(self._buf[end + 1 : end + 3])
        del self._buf[: end + 3]
        try:
            expected = int(sum_text, 16)
        except ValueError:
            expected = -1
        if expected != checksum(raw):
            if self.ack_mode and self._acking:
                self._out += b"-"
            return BadPacket(raw)
        if self.ack_mode and self._acking and head == ord("$"):
            self._out += b"+"
        payload = rle_decode(raw)
        return Packet(payload) if head == ord("$") else Notification(payload)


# ---- stop replies and thread ids ---------------------------------------------------------


@dataclass(frozen=True)
class StopReply:
    """A parsed stop reply: ``T05thread:01;swbreak:;`` / ``S05`` / ``W00`` / ``X09``."""

    kind: str  # "T", "S", "W" (exited), "X" (killed)
    signal: int
    thread: int | None = None
    info: dict[str, str] = field(default_factory=dict)

    @property
    def exited(self) -> bool:
        return self.kind in ("W", "X")


def parse_thread_id(text: str) -> int:
    """``01`` or the multiprocess form ``p01.02`` (returns the thread part)."""
    if text.startswith("p"):
        text = text.split(".", 1)[1] if "." in text else text[1:]
    try:
        return int(text, 16)
    except ValueError:
        raise IntrospectionError(f"RSP: bad thread id {text!r}") from None


def parse_stop_reply(payload: bytes) -> StopReply:
    text = payload.decode("ascii", "replace")
    if not text or text[0] not in "TSWX" or len(text) < 3:
        raise IntrospectionError(f"RSP: not a stop reply: {text[:60]!r}")
    try:
        signal = int(text[1:3], 16)
    except ValueError:
        raise IntrospectionError(f"RSP: bad signal in stop reply {text[:60]!r}") from None
    info: dict[str, str] = {}
    thread = None
    if text[0] == "T":
        for part in text[3:].split(";"):
            if not part:
                continue
            key, _, value = part.partition(":")
            info[key] = value
        if "thread" in info:
            thread = parse_thread_id(info["thread"])
    return StopReply(text[0], signal, thread, info)


def parse_thread_list(payload: bytes) -> tuple[list[int], bool]:
    """A ``qfThreadInfo``/``qsThreadInfo`` reply: (thread ids, this was the last batch)."""
    text = payload.decode("ascii", "replace")
    if text == "l":
        return [], True
    if not text.startswith("m"):
        raise IntrospectionError(f"RSP: bad thread list reply {text[:60]!r}")
    return [parse_thread_id(t) for t in text[1:].split(",") if t], False


def check_error(request: bytes, reply: bytes) -> bytes:
    """Raise on ``Exx`` and on an empty reply (unsupported request)."""
    if reply == b"":
        raise IntrospectionError(f"RSP: the stub does not support {request[:24]!r}")
    if (
        len(reply) == 3
        and reply[:1] == b"E"
        and all(c in b"0123456789abcdefABCDEF" for c in reply[1:])
    ):
        raise IntrospectionError(f"RSP: the stub refused {request[:40]!r}: error {reply.decode()}")
    return reply


# ---- x86-64 registers (QEMU 7.2 'g' packet layout) ---------------------------------------

_GPRS: tuple[str, ...] = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")
_GPRS += tuple(f"r{i}" for i in range(8, 16))
_SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
_CTRL = ("fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer")
X86_64_LAYOUT: tuple[tuple[str, int], ...] = (
    *((name, 8) for name in _GPRS),
    ("rip", 8),
    ("eflags", 4),
    *((name, 4) for name in _SEGS),
    *((name, 8) for name in _CTRL),
)
G_PACKET_SIZE = 608  # + FPU/SSE state after efer, carried through unchanged
REGISTER_NUMBER = {name: i for i, (name, _) in enumerate(X86_64_LAYOUT)}
_OFFSETS: dict[str, tuple[int, int]] = {}
_pos = 0
for _name, _size in X86_64_LAYOUT:
    _OFFSETS[_name] = (_pos, _size)
    _pos += _size
SYSV_ARGUMENT_REGISTERS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")


@dataclass(frozen=True)
class Registers:
    """All registers of one vCPU as the raw ``g`` bytes; read and replace them by name."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) < _pos:
            raise IntrospectionError(f"RSP: g reply has {len(self.raw)} bytes, need {_pos}")

    @classmethod
    def from_hex(cls, payload: bytes) -> Registers:
        try:
            return cls(bytes.fromhex(payload.decode("ascii")))
        except ValueError:
            raise IntrospectionError(f"RSP: g reply is not hex: {payload[:40]!r}") from None

    def to_hex(self) -> bytes:
        return self.raw.hex().encode()

    def __getitem__(self, name: str) -> int:
        try:
            off, size = _OFFSETS[name]
        except KeyError:
            raise IntrospectionError(f"unknown register {name!r}") from None
        return int.from_bytes(self.raw[off : off + size], "little")

    def replace(self, **values: int) -> Registers:
        raw = bytearray(self.raw)
        for name, value in values.items():
            off, size = _OFFSETS.get(name, (-1, 0))
            if off < 0:
                raise IntrospectionError(f"unknown register {name!r}")
            raw[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        return Registers(bytes(raw))

    def as_dict(self) -> dict[str, int]:
        return {name: self[name] for name, _ in X86_64_LAYOUT}

    def arguments(self) -> tuple[int, ...]:
        """The six System V integer argument registers, in order."""
        return tuple(self[name] for name in SYSV_ARGUMENT_REGISTERS)


def encode_register_value(name: str, value: int) -> bytes:
    """Hex for a ``P`` packet: little-endian, the register's size."""
    size = _OFFSETS[name][1]
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little").hex().encode()


# ---- blocking client --------------------------------------------------------------------


class GdbClient:
    """A blocking RSP client over a connected stream socket.

    Use as a context manager (or call :meth:`close`): closing detaches (``D``), which makes
    QEMU remove all breakpoints and resume the VM. An ``atexit`` hook does the same if the
    program ends without closing. Only SIGKILL can leave the VM paused; :func:`resume_vm`
    reconnects and detaches to recover.
    """

    def __init__(self, sock: socket.socket, *, timeout: float = 5.0) -> None:
        self._sock = sock
        self.timeout = timeout
        self._conn = RspConnection()
        self._packets: list[bytes] = []
        self._console: list[bytes] = []
        self.packet_size = 1000
        self.target_xml = ""
        self._deferred: list[bytes] = []
        self._unanswered: list[bytes] = []  # sent with a resume, replies not read yet
        self.binary_writes = True
        trace = os.environ.get("MEMVISOR_RSP_TRACE")  # debugging: log every byte exchanged
        self._trace_file: IO[str] | None = open(trace, "a") if trace else None  # noqa: SIM115
        self.running = False
        self.closed = False
        self.breakpoints: set[tuple[int, int, int]] = set()
        atexit.register(self.close)

    @classmethod
    def connect_unix(cls, path: str, *, timeout: float = 5.0) -> GdbClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise IntrospectionError(f"gdbstub {path}: cannot connect: {exc}") from exc
        client = cls(sock, timeout=timeout)
        try:
            client.handshake()
        except BaseException:
            client.close()
            raise
        return client

    # -- transport --
    def _trace(self, direction: str, data: bytes) -> None:
        if self._trace_file is not None:
            self._trace_file.write(f"{time.monotonic():.6f} {direction} {data[:200]!r}\n")
            self._trace_file.flush()

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        self._trace(">", data)
        if data:
            try:
                self._sock.sendall(data)
            except OSError as exc:
                raise IntrospectionError(f"gdbstub: send failed: {exc}") from exc

    def _read_some(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("gdbstub: no reply in time")
        self._sock.settimeout(remaining)
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            raise TimeoutError("gdbstub: no reply in time") from None
        except OSError as exc:
            raise IntrospectionError(f"gdbstub: receive failed: {exc}") from exc
        self._trace("<", data)
        if not data:
            raise IntrospectionError("gdbstub: the peer closed the connection")
        # QEMU 7.2 stops a running VM on any byte it receives, an ack included, and does not
        # always report that stop: so packets that arrive while the VM may run go unacked
        # (QEMU's system-mode stub never waits for acks).
        for event in self._conn.receive(data, ack=not self.running):
            if isinstance(event, Packet):
                self._packets.append(event.payload)
        self._flush()

    def wait_packet(self, timeout: float | None = None) -> bytes:
        """The next packet from the peer; ``O`` console packets are collected aside."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            while self._packets:
                packet = self._packets.pop(0)
                if packet[:1] == b"O" and packet != b"OK" and not self.running:
                    self._console.append(packet)
                    continue
                return packet
            self._read_some(deadline)

    def send(self, payload: bytes) -> None:
        self._conn.send_packet(payload)
        self._flush()

    def defer(self, payload: bytes) -> None:
        """Queue a request to go out in the same write as the next one (one round trip less
        per hit: e.g. a ``P`` rip write travels with the ``c`` that follows it)."""
        self._deferred.append(payload)

    def _send_with_deferred(self, payload: bytes) -> list[bytes]:
        deferred, self._deferred = self._deferred, []
        for p in deferred:
            self._conn.send_packet(p)
        self._conn.send_packet(payload)
        self._flush()
        return deferred

    def request(self, payload: bytes, timeout: float | None = None) -> bytes:
        """Send one packet and return the reply; ``Exx`` and empty replies raise."""
        for p in self._send_with_deferred(payload):
            check_error(p, self.wait_packet(timeout))
        return check_error(payload, self.wait_packet(timeout))

    def pipeline(self, payloads: Sequence[bytes]) -> list[bytes]:
        """Send several requests in one write, then read their replies in order.

        QEMU handles packets one by one from its input buffer, so this saves a round trip per
        extra request.
        """
        deferred, self._deferred = self._deferred, []
        everything = [*deferred, *payloads]
        for p in everything:
            self._conn.send_packet(p)
        self._flush()
        replies = [check_error(p, self.wait_packet()) for p in everything]
        return replies[len(deferred) :]

    # -- session --
    def handshake(self) -> None:
        # QEMU announces the stop caused by our connection with an unsolicited T02 first.
        self.send(b"qSupported:swbreak+;hwbreak+;vContSupported+")
        reply = self.wait_packet()
        while reply[:1] in (b"T", b"S"):
            reply = self.wait_packet()
        check_error(b"qSupported", reply)
        features = reply.decode("ascii", "replace").split(";")
        for feature in features:
            if feature.startswith("PacketSize="):
                with contextlib.suppress(ValueError):
                    self.packet_size = max(64, int(feature.split("=", 1)[1], 16))
        if "QStartNoAckMode+" in features and self.request(b"QStartNoAckMode") == b"OK":
            self._conn.ack_mode = False  # QEMU 7.2 does not offer it; newer stubs do
        self.target_xml = self.read_feature("target.xml")
        if "x86-64" not in self.target_xml:
            raise IntrospectionError(f"gdbstub: not an x86-64 target: {self.target_xml[:200]!r}")
        self.stop_reason()

    def read_feature(self, name: str) -> str:
        """``qXfer:features:read``; reading target.xml also enables ``p``/``P`` in QEMU."""
        out = b""
        while True:
            reply = self.request(f"qXfer:features:read:{name}:{len(out):x},ffb".encode())
            if reply[:1] not in (b"l", b"m"):
                raise IntrospectionError(f"RSP: bad qXfer reply {reply[:40]!r}")
            out += unescape(reply[1:])
            if reply[:1] == b"l":
                return out.decode("utf-8", "replace")

    def stop_reason(self) -> StopReply:
        return parse_stop_reply(self.request(b"?"))

    def monitor_command(self, command: str) -> str:
        """Run a QEMU monitor (HMP) command through ``qRcmd`` and return its output."""
        self._console.clear()
        reply = self.request(b"qRcmd," + command.encode().hex().encode())
        out = b"".join(bytes.fromhex(p[1:].decode()) for p in self._console)
        self._console.clear()
        if reply != b"OK":
            out += bytes.fromhex(reply.decode()) if reply[:1] != b"E" else b""
        return out.decode("utf-8", "replace")

    # -- registers --
    def read_registers(self) -> Registers:
        return Registers.from_hex(self.request(b"g"))

    def write_registers(self, regs: Registers) -> None:
        self.request(b"G" + regs.to_hex())

    def read_register(self, name: str) -> int:
        reply = self.request(f"p{REGISTER_NUMBER[name]:x}".encode())
        try:
            return int.from_bytes(bytes.fromhex(reply.decode()), "little")
        except ValueError:
            raise IntrospectionError(f"RSP: bad p reply {reply[:40]!r}") from None

    def write_register(self, name: str, value: int, *, deferred: bool = False) -> None:
        payload = f"P{REGISTER_NUMBER[name]:x}=".encode() + encode_register_value(name, value)
        if deferred:
            self.defer(payload)
        else:
            self.request(payload)

    # -- memory --
    def _chunks(self, addr: int, length: int, per: int) -> Iterator[tuple[int, int]]:
        done = 0
        while done < length:
            n = min(per, length - done)
            yield addr + done, n
            done += n

    def read_memory(self, addr: int, length: int) -> bytes:
        """Guest-virtual memory through the current vCPU's page tables."""
        return self.read_memory_many([(addr, length)])[0]

    def read_memory_many(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Several reads in one pipelined exchange."""
        per = (self.packet_size - 8) // 2
        requests: list[bytes] = []
        owner: list[int] = []
        for index, (addr, length) in enumerate(ranges):
            for a, n in self._chunks(addr, length, per):
                requests.append(f"m{a:x},{n:x}".encode())
                owner.append(index)
        out = [bytearray() for _ in ranges]
        for req, index, reply in zip(requests, owner, self.pipeline(requests), strict=True):
            try:
                data = bytes.fromhex(reply.decode())
            except ValueError:
                raise IntrospectionError(f"RSP: bad m reply {reply[:40]!r}") from None
            if len(data) != int(req.split(b",")[1], 16):
                raise IntrospectionError(f"RSP: short read for {req.decode()}")
            out[index] += data
        return [bytes(b) for b in out]

    def write_memory(self, addr: int, data: bytes) -> None:
        """Write with binary ``X`` packets (escaped), or hex ``M`` where the stub has no ``X``
        (QEMU 7.2 answers ``X`` with an empty packet); chunked under the packet size."""
        if self.binary_writes:
            try:
                self._write_chunks(addr, data, binary=True)
                return
            except IntrospectionError as exc:
                if "does not support" not in str(exc):
                    raise
                self.binary_writes = False
        self._write_chunks(addr, data, binary=False)

    def _write_chunks(self, addr: int, data: bytes, *, binary: bool) -> None:
        per = (self.packet_size - 40) // 2  # hex, or binary with every byte escaped
        requests = []
        for a, n in self._chunks(addr, len(data), per):
            chunk = data[a - addr : a - addr + n]
            body = escape(chunk) if binary else chunk.hex().encode()
            requests.append(f"{'X' if binary else 'M'}{a:x},{n:x}:".encode() + body)
        for reply in self.pipeline(requests):
            if reply != b"OK":
                raise IntrospectionError(f"RSP: write at {addr:#x} answered {reply[:40]!r}")

    # -- breakpoints --
    def insert_breakpoint(self, addr: int, *, hardware: bool = False, kind: int = 1) -> None:
        ztype = 1 if hardware else 0
        self.request(f"Z{ztype},{addr:x},{kind:x}".encode())
        self.breakpoints.add((ztype, addr, kind))

    def remove_breakpoint(self, addr: int, *, hardware: bool = False, kind: int = 1) -> None:
        ztype = 1 if hardware else 0
        self.request(f"z{ztype},{addr:x},{kind:x}".encode())
        self.breakpoints.discard((ztype, addr, kind))

    # -- execution --
    def resume(self, *, step: bool = False, thread: int | None = None) -> None:
        """Continue (or single-step) without waiting; follow with :meth:`wait_stop`."""
        if thread is None:
            payload = b"s" if step else b"c"
        else:
            payload = f"vCont;{'s' if step else 'c'}:{thread:x}".encode()
        # The replies to deferred requests come before any stop reply; they are checked in
        # wait_stop, so the guest is not kept waiting for them here.
        self._unanswered += self._send_with_deferred(payload)
        self.running = True

    def wait_stop(self, timeout: float | None = None) -> StopReply:
        """The next stop reply. On timeout the VM is still running: interrupt or wait again."""
        while self._unanswered:
            check_error(self._unanswered[0], self.wait_packet(timeout))
            self._unanswered.pop(0)
        packet = self.wait_packet(timeout)
        reply = parse_stop_reply(packet)
        self.running = False
        return reply

    def step(self, thread: int | None = None, timeout: float | None = None) -> StopReply:
        self.resume(step=True, thread=thread)
        return self.wait_stop(timeout)

    def cont(self, timeout: float | None = None) -> StopReply:
        self.resume()
        return self.wait_stop(timeout)

    def interrupt(self, timeout: float | None = None) -> StopReply:
        """Stop a running VM (``0x03``) and return its stop reply."""
        self._conn.send_raw(INTERRUPT)
        self._flush()
        return self.wait_stop(timeout)

    # -- threads (one per vCPU) --
    def threads(self) -> list[int]:
        ids, last = parse_thread_list(self.request(b"qfThreadInfo"))
        while not last:
            more, last = parse_thread_list(self.request(b"qsThreadInfo"))
            ids += more
        return ids

    def select_thread(self, thread: int, op: str = "g") -> None:
        if op not in ("g", "c"):
            raise IntrospectionError(f"RSP: thread operation must be 'g' or 'c', not {op!r}")
        self.request(f"H{op}{thread:x}".encode())

    # -- ending --
    def close(self) -> None:
        """Detach (QEMU removes breakpoints and resumes the VM) and close the socket."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        try:
            if self.running:
                with contextlib.suppress(TimeoutError, IntrospectionError):
                    self.interrupt(timeout=2.0)
            self.breakpoints.clear()
            with contextlib.suppress(TimeoutError, IntrospectionError, OSError):
                self.pipeline([])  # deferred writes (a rip moved past a breakpoint) go first
                self.send(b"D")
                self.running = True  # D resumes the VM: its OK must not be acked
                self.wait_packet(timeout=2.0)
        finally:
            self._sock.close()
            if self._trace_file is not None:
                self._trace_file.close()

    def __enter__(self) -> GdbClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def resume_vm(path: str, *, timeout: float = 5.0) -> None:
    """Recover a VM left paused by a killed client: connect (pauses) and detach (resumes)."""
    GdbClient.connect_unix(path, timeout=timeout).close()
