"""Monitor and injector logic without a VM: decoding, rate limits, refusals, call frames, CLI
input errors. A small fake gdbstub client stands in for QEMU here; the same code runs against
a real guest in tests/e2e/test_introspect_e2e.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from memvisor.cli import main as cli_main
from memvisor.errors import InputError, IntrospectionError
from memvisor.introspect.inject import (
    EFLAGS_IF,
    FRAME_GAP,
    ForcedCode,
    Injector,
    parse_arguments,
)
from memvisor.introspect.monitor import (
    Monitor,
    TokenBucket,
    argument_filter,
    decode,
)
from memvisor.introspect.rsp import G_PACKET_SIZE, GdbClient, Registers, StopReply
from memvisor.introspect.symbols import KernelSymbols

FUNC = 0xFFFFFFFF81001000
NOP5 = bytes.fromhex("0f1f440000")


def zero_regs(**values: int) -> Registers:
    return Registers(bytes(G_PACKET_SIZE)).replace(**values)


def test_decode_tells_skippable_nops() -> None:
    nop = decode(NOP5 + b"\x55", FUNC)
    assert (nop.is_nop, nop.size, nop.text) == (True, 5, "nop dword ptr [rax + rax]")
    assert decode(bytes.fromhex("f30f1efa"), FUNC).is_nop  # endbr64
    push = decode(b"\x55", FUNC)
    assert (push.is_nop, push.size, push.text) == (False, 1, "push rbp")
    assert not decode(b"\xff", FUNC).is_nop


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3)
    assert [bucket.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.allow(0.1)  # one token back after 1/rate seconds
    assert not bucket.allow(0.1)


def test_argument_filter_bounds() -> None:
    with pytest.raises(InputError):
        argument_filter(6, 1)


class FakeClient:
    """Just enough of GdbClient for the monitor: a stopped vCPU at a breakpoint."""

    def __init__(self, regs: Registers, code: bytes) -> None:
        self.regs, self.code = regs, code
        self.running = False
        self.inserted: list[tuple[int, bool]] = []
        self.removed: list[int] = []
        self.rip_writes: list[int] = []

    def insert_breakpoint(self, addr: int, *, hardware: bool = False) -> None:
        self.inserted.append((addr, hardware))

    def remove_breakpoint(self, addr: int, *, hardware: bool = False) -> None:
        self.removed.append(addr)

    def read_registers(self) -> Registers:
        return self.regs

    def read_memory_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        out = [self.code[:16]]
        if len(ranges) > 1:  # pt_regs: di = 7, si = 0x1234
            pt = bytearray(168)
            pt[112:120] = (7).to_bytes(8, "little")
            pt[104:112] = (0x1234).to_bytes(8, "little")
            out.append(bytes(pt))
        return out

    def write_register(self, name: str, value: int, *, deferred: bool = False) -> None:
        self.rip_writes.append(value)


def make_monitor(accel: str = "tcg") -> tuple[Monitor, FakeClient]:
    syms = KernelSymbols("test", {"__x64_sys_f": FUNC, "g": FUNC + 64}, {}, b"")
    client = FakeClient(zero_regs(rip=FUNC, rdi=0xABC), NOP5 + b"\x55" * 11)
    now = [100.0]
    monitor = Monitor(cast(GdbClient, client), syms, accel=accel, clock=lambda: now[0])
    return monitor, client


def test_hit_recorded_with_syscall_args_and_nop_skipped() -> None:
    monitor, client = make_monitor()
    reg = monitor.watch_symbol("__x64_sys_f")
    assert client.inserted == [(FUNC, False)]  # Z0 under TCG
    monitor._handle_stop(StopReply("T", 5, 1), None, interrupted=False)
    (hit,) = monitor.hits
    assert hit.syscall_arguments is not None and hit.syscall_arguments[:2] == (7, 0x1234)
    assert hit.arguments[0] == 0xABC and hit.location == "__x64_sys_f"
    assert hit.instruction.startswith("nop")
    assert client.rip_writes == [FUNC + 5]  # stepped over by moving rip, no single step
    assert reg.hits == 1


def test_filtered_hits_are_counted_apart() -> None:
    monitor, _ = make_monitor()
    reg = monitor.watch_symbol("__x64_sys_f", hit_filter=argument_filter(0, 8, syscall=True))
    monitor._handle_stop(StopReply("T", 5, 1), None, interrupted=False)
    assert (reg.hits, reg.filtered_out, monitor.hits) == (0, 1, [])


def test_rate_limit_suspends_the_registration() -> None:
    monitor, client = make_monitor()
    reg = monitor.watch_symbol("__x64_sys_f", max_rate=2)
    for _ in range(3):
        monitor._handle_stop(StopReply("T", 5, 1), None, interrupted=False)
    assert reg.suspensions == 1 and client.removed == [FUNC]
    assert reg.suspended_until == 100.0 + monitor.cooldown
    monitor._resume_due(102.0)
    assert reg.suspended_until is None and client.inserted[-1] == (FUNC, False)


def test_kvm_uses_hardware_breakpoints_and_refuses_beyond_four() -> None:
    monitor, client = make_monitor("kvm")
    monitor.watch_symbol("__x64_sys_f")
    assert client.inserted == [(FUNC, True)]
    monitor.check_hidden(3)  # 4 in all: fine
    with pytest.raises(IntrospectionError, match="cannot monitor hidden"):
        monitor.check_hidden(4)
    assert len(client.inserted) == 1  # nothing set by the refused request


def test_forced_code_validation() -> None:
    with pytest.raises(InputError):
        ForcedCode("x")
    with pytest.raises(InputError):
        ForcedCode("x", target=1, snippet=b"\xc3")
    with pytest.raises(InputError, match="at most 6"):
        ForcedCode("x", target=1, arguments=(1,) * 7)
    with pytest.raises(InputError):
        ForcedCode("x", target=1, arguments=(1 << 64,))
    assert parse_arguments(["1", "0x10", "-2"]) == (1, 16, -2)
    with pytest.raises(InputError, match="not an integer"):
        parse_arguments(["ten"])


def test_call_frame_is_aligned_below_the_stack_with_interrupts_off() -> None:
    regs = zero_regs(rsp=0xFFFFC90000013F58, eflags=0x246, rip=FUNC)
    code = ForcedCode("f", target=FUNC + 64, arguments=(1, -1))
    frame = ((regs["rsp"] - FRAME_GAP) & ~0xF) - 8
    call = Injector._call_registers(regs, code, FUNC + 64, frame)
    assert call["rsp"] == frame and (call["rsp"] + 8) % 16 == 0
    assert regs["rsp"] - call["rsp"] >= FRAME_GAP
    assert call["rip"] == FUNC + 64 and not call["eflags"] & EFLAGS_IF
    assert call.arguments()[:3] == (1, 2**64 - 1, 0)


def test_execute_refuses_user_mode() -> None:
    monitor, _ = make_monitor()
    injector = Injector(monitor)
    with pytest.raises(IntrospectionError, match="user mode"):
        injector.execute(ForcedCode("f", target=FUNC), zero_regs(cs=0x33), 1, "api")


def test_cli_names_a_missing_vm(tmp_path: Path, capsys: Any) -> None:
    rc = cli_main(["--state", str(tmp_path), "monitor", "nosuchvm", "--symbol", "x", "--json"])
    assert rc == 2
    assert "no gdbstub socket" in capsys.readouterr().out
    rc = cli_main(["--state", str(tmp_path), "inject", "nosuchvm", "--call", "f", "zz"])
    assert rc == 2
    assert "not an integer" in capsys.readouterr().err
