"""GDB remote protocol: framing byte for byte, and the client against a scripted peer on a real
socketpair (the same client runs against QEMU in tests/e2e/test_introspect_e2e.py)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memvisor.errors import IntrospectionError
from memvisor.introspect import rsp


def test_checksum_and_frame() -> None:
    assert rsp.checksum(b"g") == 0x67
    assert rsp.frame(b"g") == b"$g#67"
    assert rsp.frame(b"OK") == b"$OK#9a"
    assert rsp.frame(b"") == b"$#00"


def test_escape_known_bytes() -> None:
    assert rsp.escape(b"a#b$c}d*e") == b"a}\x03b}\x04c}]d}\x0ae"
    assert rsp.unescape(b"a}\x03b}\x04c}]d}\x0ae") == b"a#b$c}d*e"
    with pytest.raises(IntrospectionError, match="escape"):
        rsp.unescape(b"abc}")


@given(st.binary(max_size=300))
def test_escape_round_trip_and_no_specials(data: bytes) -> None:
    escaped = rsp.escape(data)
    assert not set(escaped) & set(b"#$*")
    assert rsp.unescape(escaped) == data


def test_rle_decode() -> None:
    # '0* ' = '0' then 32-29 = 3 more: "0000"
    assert rsp.rle_decode(b"0* ") == b"0000"
    assert rsp.rle_decode(b'ab*"c') == b"abbbbbbc"  # '"' = 34 -> 5 more
    assert rsp.rle_decode(b"plain") == b"plain"
    with pytest.raises(IntrospectionError):
        rsp.rle_decode(b"*a")
    with pytest.raises(IntrospectionError):
        rsp.rle_decode(b"a*\x10")


def test_connection_acks_good_nacks_bad_and_resends() -> None:
    conn = rsp.RspConnection()
    conn.send_packet(b"g")
    assert conn.data_to_send() == b"$g#67"
    events = conn.receive(b"+$OK#9a$OK#00")
    assert events == [rsp.Ack(), rsp.Packet(b"OK"), rsp.BadPacket(b"OK")]
    assert conn.data_to_send() == b"+-"
    assert conn.receive(b"-") == [rsp.Nack()]
    assert conn.data_to_send() == b"$g#67"  # retransmitted


def test_connection_split_input_rle_and_no_ack_mode() -> None:
    conn = rsp.RspConnection(ack_mode=False)
    assert conn.receive(b"$0*") == []
    assert conn.receive(b" #") == []
    payload = b"0* "
    events = conn.receive(f"{rsp.checksum(payload):02x}".encode() + b"\x03%Stop:T05#" + b"xx")
    assert events[0] == rsp.Packet(b"0000")
    assert events[1] == rsp.InterruptRequest()
    assert isinstance(events[2], rsp.BadPacket)  # bad checksum text, and no '-' sent
    assert conn.data_to_send() == b""


def test_connection_limits_packet_size() -> None:
    conn = rsp.RspConnection(max_packet=16)
    with pytest.raises(IntrospectionError, match="longer"):
        conn.receive(b"$" + b"a" * 40)


def test_stop_replies_and_thread_lists() -> None:
    stop = rsp.parse_stop_reply(b"T05thread:p01.02;swbreak:;")
    assert (stop.kind, stop.signal, stop.thread, "swbreak" in stop.info) == ("T", 5, 2, True)
    assert rsp.parse_stop_reply(b"W00").exited
    assert rsp.parse_stop_reply(b"S02").thread is None
    with pytest.raises(IntrospectionError):
        rsp.parse_stop_reply(b"OK")
    assert rsp.parse_thread_list(b"m01,0a") == ([1, 10], False)
    assert rsp.parse_thread_list(b"l") == ([], True)


def test_registers_layout_matches_qemu() -> None:
    raw = bytearray(rsp.G_PACKET_SIZE)
    raw[128:136] = (0xFFFFFFFF81000000).to_bytes(8, "little")  # rip
    raw[136:140] = (0x246).to_bytes(4, "little")  # eflags
    raw[204:212] = (0x1234000).to_bytes(8, "little")  # cr3
    raw[600] = 0xAB  # FPU/SSE state is carried through unchanged
    regs = rsp.Registers(bytes(raw))
    assert regs["rip"] == 0xFFFFFFFF81000000
    assert regs["eflags"] == 0x246
    assert regs["cr3"] == 0x1234000
    changed = regs.replace(rdi=7, r9=-1)
    assert changed.arguments() == (7, 0, 0, 0, 0, 2**64 - 1)
    assert changed.raw[600] == 0xAB
    assert rsp.Registers.from_hex(changed.to_hex()) == changed
    assert rsp.REGISTER_NUMBER["rip"] == 16 and rsp.REGISTER_NUMBER["efer"] == 32
    with pytest.raises(IntrospectionError):
        rsp.Registers(b"\0" * 10)


# ---- scripted peer -------------------------------------------------------------------------

TARGET_XML = b"<target><architecture>i386:x86-64</architecture></target>"


class ScriptedStub:
    """A tiny stub on the other end of a socketpair: acks, answers from a handler."""

    def __init__(self, sock: socket.socket, handler: Callable[[bytes], bytes | None]) -> None:
        self.sock = sock
        self.handler = handler
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn = rsp.RspConnection()
        conn.send_raw(rsp.frame(b"T02thread:01;"))  # QEMU's unsolicited stop at connect
        self.sock.sendall(conn.data_to_send())
        while True:
            data = self.sock.recv(65536)
            if not data:
                return
            for event in conn.receive(data):
                reply: bytes | None = None
                if isinstance(event, rsp.Packet):
                    self.received.append(event.payload)
                    reply = self.handler(event.payload)
                elif isinstance(event, rsp.InterruptRequest):
                    self.received.append(b"\x03")
                    reply = b"T02thread:01;"
                if reply is not None:
                    conn.send_raw(rsp.frame(reply))
            self.sock.sendall(conn.data_to_send())


def make_handler(memory: bytearray) -> Callable[[bytes], bytes | None]:
    regs = bytearray(rsp.G_PACKET_SIZE)

    def handle(p: bytes) -> bytes | None:
        if p.startswith(b"qSupported"):
            return b"PacketSize=40;qXfer:features:read+"
        if p.startswith(b"qXfer:features:read:target.xml:"):
            return b"l" + TARGET_XML
        if p == b"?":
            return b"T05thread:01;"
        if p == b"g":
            return regs.hex().encode()
        if p.startswith(b"G"):
            regs[:] = bytes.fromhex(p[1:].decode())
            return b"OK"
        if p.startswith(b"m"):
            addr, n = (int(x, 16) for x in p[1:].split(b","))
            return memory[addr : addr + n].hex().encode() if addr + n <= len(memory) else b"E14"
        if p.startswith(b"X"):
            head, body = p[1:].split(b":", 1)
            addr, n = (int(x, 16) for x in head.split(b","))
            memory[addr : addr + n] = rsp.unescape(body)
            return b"OK"
        if p.startswith((b"Z0", b"z0", b"Hg")):
            return b"OK"
        if p == b"qfThreadInfo":
            return b"m01,02"
        if p == b"qsThreadInfo":
            return b"l"
        if p in (b"c", b"s"):
            return b"T05thread:02;swbreak:;"
        if p == b"D":
            return b"OK"
        return b""

    return handle


@pytest.fixture
def peer() -> tuple[rsp.GdbClient, ScriptedStub, bytearray]:
    ours, theirs = socket.socketpair()
    memory = bytearray(range(256)) * 4
    stub = ScriptedStub(theirs, make_handler(memory))
    client = rsp.GdbClient(ours, timeout=2.0)
    client.handshake()
    return client, stub, memory


@pytest.mark.timeout(20)
def test_client_against_scripted_peer(peer: tuple[rsp.GdbClient, ScriptedStub, bytearray]) -> None:
    client, stub, memory = peer
    assert client.packet_size == 0x40
    # chunked reads (packet size 64 -> 28 bytes per m) and a binary write with specials
    assert client.read_memory(10, 100) == bytes(memory[10:110])
    client.write_memory(300, b"#$}*xyz")
    assert bytes(memory[300:307]) == b"#$}*xyz"
    regs = client.read_registers().replace(rip=0x1000, rsp=0x2000)
    client.write_registers(regs)
    assert client.read_registers()["rip"] == 0x1000
    client.insert_breakpoint(0x1000)
    assert client.breakpoints == {(0, 0x1000, 1)}
    stop = client.cont()
    assert stop.thread == 2 and "swbreak" in stop.info
    assert client.threads() == [1, 2]
    client.select_thread(2)
    with pytest.raises(IntrospectionError, match="refused"):
        client.read_memory(2000, 8)
    with pytest.raises(IntrospectionError, match="does not support"):
        client.request(b"vMustReplyEmpty")
    client.resume()
    assert client.wait_stop().signal == 5
    client.close()
    assert b"D" in stub.received  # closing detaches, which resumes the VM in QEMU


@pytest.mark.timeout(20)
def test_client_interrupts_a_running_vm_before_detaching() -> None:
    ours, theirs = socket.socketpair()
    handler = make_handler(bytearray(64))
    stub = ScriptedStub(theirs, lambda p: None if p == b"c" else handler(p))
    with rsp.GdbClient(ours, timeout=2.0) as client:
        client.handshake()
        client.resume()
        with pytest.raises(TimeoutError):
            client.wait_stop(timeout=0.2)
    assert stub.received[-2:] == [b"\x03", b"D"]


@pytest.mark.timeout(20)
def test_client_reports_a_peer_that_goes_away() -> None:
    ours, theirs = socket.socketpair()
    client = rsp.GdbClient(ours, timeout=2.0)
    theirs.close()
    with pytest.raises(IntrospectionError):
        client.request(b"g")
    client.close()


@pytest.mark.timeout(20)
def test_client_switches_to_no_ack_mode_when_offered() -> None:
    ours, theirs = socket.socketpair()
    base = make_handler(bytearray(64))

    def handler(p: bytes) -> bytes | None:
        if p.startswith(b"qSupported"):
            return b"PacketSize=100;QStartNoAckMode+"
        if p == b"QStartNoAckMode":
            return b"OK"
        return base(p)

    stub = ScriptedStub(theirs, handler)
    with rsp.GdbClient(ours, timeout=2.0) as client:
        client.handshake()
        assert not client._conn.ack_mode
        assert client.read_memory(0, 4) == bytes(4)
    assert b"QStartNoAckMode" in stub.received
