"""Forced execution of registered code in the guest (C6), with no guest software involved.

What can be forced: a call of a guest kernel function with up to six integer arguments
(System V ABI: rdi, rsi, rdx, rcx, r8, r9; the result in rax), or a machine-code snippet. The
kernel's direct map is not executable, so a snippet is written into kernel text that never runs
after boot (by default the body of ``startup_64``) and the original bytes are put back after.

How (all from the gdbstub, with the VM stopped at a safe point: a breakpoint in process
context at CPL 0, e.g. the entry of ``schedule`` or of a monitored syscall handler):
save every register; push a return address 512 bytes below rsp (the frame 16-byte aligned as at
a ``call``); that address has a breakpoint (``Z0``; ``Z1`` under KVM); point rip at the code,
load the arguments, clear IF so no interrupt runs on the borrowed context; resume only that
vCPU; wait for the stop at the return address with rsp one slot above the frame on the same
vCPU (stops elsewhere are stepped over); read rax; restore the registers (``G``), the stack
slot and any code bytes; the guest resumes where it was. On any error or timeout the same
restore runs and the error is reported.

Triggers (:class:`Injector`): an API call (:meth:`Injector.call_now`), a monitored hit
(:meth:`Injector.on_hit`), a timer (:meth:`Injector.every`) and a host-side condition
callback polled on a timer (:meth:`Injector.when`); the last three run inside
:meth:`memvisor.introspect.monitor.Monitor.run`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from memvisor.errors import InputError, IntrospectionError
from memvisor.introspect.monitor import Hit, Monitor, Registration, Timer
from memvisor.introspect.rsp import SYSV_ARGUMENT_REGISTERS, GdbClient, Registers, StopReply

FRAME_GAP = 512
THREAD_SIZE = 16 * 1024  # x86-64 kernel stacks: 16 KiB, aligned to their size
MIN_STACK_LEFT = 2048
EFLAGS_IF = 1 << 9
EFLAGS_TF = 1 << 8
SCRATCH_SYMBOL = "startup_64"  # .head.text: runs once at boot, stays mapped executable
SNIPPET_OFFSET = 16  # the trap sits at the start of the scratch function, code after it
DEFAULT_SAFE_POINT = "schedule"  # entered in task context, IF=1, no spinlocks held
DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True)
class ForcedCode:
    """A call of ``target`` (a run-time address), or of ``snippet`` bytes placed in text."""

    name: str
    target: int | None = None
    snippet: bytes | None = None
    arguments: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if (self.target is None) == (self.snippet is None):
            raise InputError(f"forced code {self.name!r}: give exactly one of target or snippet")
        if len(self.arguments) > len(SYSV_ARGUMENT_REGISTERS):
            raise InputError(
                f"forced code {self.name!r}: {len(self.arguments)} arguments, at most 6 "
                "(register arguments of the System V ABI)"
            )
        for a in self.arguments:
            if not -(1 << 63) <= a < (1 << 64):
                raise InputError(f"forced code {self.name!r}: argument {a} is not a 64-bit value")


@dataclass(frozen=True)
class CallResult:
    name: str
    value: int
    vcpu: int
    trigger: str
    seconds: float
    stops_stepped_over: int

    def to_json(self) -> dict[str, Any]:
        signed = self.value - (1 << 64) if self.value >> 63 else self.value
        return {
            "name": self.name,
            "value": self.value,
            "value_hex": f"{self.value:#x}",
            "value_signed": signed,
            "vcpu": self.vcpu,
            "trigger": self.trigger,
            "seconds": round(self.seconds, 6),
            "stops_stepped_over": self.stops_stepped_over,
        }


@dataclass
class Injector:
    monitor: Monitor
    timeout: float = DEFAULT_TIMEOUT
    safe_point: str = DEFAULT_SAFE_POINT
    scratch_symbol: str = SCRATCH_SYMBOL
    results: list[CallResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _failed: list[str] = field(default_factory=list)

    @property
    def client(self) -> GdbClient:
        return self.monitor.client

    def function(self, symbol: str, *arguments: int) -> ForcedCode:
        return ForcedCode(symbol, target=self.monitor.symbols.address(symbol), arguments=arguments)

    def snippet(self, name: str, code: bytes, *arguments: int) -> ForcedCode:
        room = self.monitor.symbols.size(self.scratch_symbol) - SNIPPET_OFFSET
        if not 0 < len(code) <= room:
            raise InputError(f"snippet {name!r}: {len(code)} bytes, the scratch area holds {room}")
        return ForcedCode(name, snippet=code, arguments=arguments)

    # ---- the mechanism (VM stopped at a safe point) ----
    def execute(self, code: ForcedCode, regs: Registers, thread: int, trigger: str) -> CallResult:
        """Run ``code`` on ``thread`` whose registers are ``regs``; restore everything."""
        if regs["cs"] & 3:
            raise IntrospectionError(f"{code.name}: the vCPU is in user mode, not at a safe point")
        rsp = regs["rsp"]
        frame = ((rsp - FRAME_GAP) & ~0xF) - 8  # as after a call: (frame + 8) % 16 == 0
        if frame - (rsp & ~(THREAD_SIZE - 1)) < MIN_STACK_LEFT:
            raise IntrospectionError(f"{code.name}: not enough kernel stack left at {rsp:#x}")
        scratch = self.monitor.symbols.address(self.scratch_symbol)
        trap = scratch
        target = code.target if code.target is not None else scratch + SNIPPET_OFFSET
        saved_slot = self.client.read_memory(frame, 8)
        saved_code = b""
        started = time.perf_counter()
        self._arm_trap(trap)
        try:
            if code.snippet is not None:
                saved_code = self.client.read_memory(target, len(code.snippet))
                self.client.write_memory(target, code.snippet)
            self.client.write_memory(frame, trap.to_bytes(8, "little"))
            call_regs = self._call_registers(regs, code, target, frame)
            self.client.write_registers(call_regs)
            value, stepped = self._run_until_return(code, thread, trap, frame + 8)
        finally:
            self._restore(regs, frame, saved_slot, target, saved_code)
        result = CallResult(
            code.name, value, thread, trigger, time.perf_counter() - started, stepped
        )
        self.results.append(result)
        return result

    @staticmethod
    def _call_registers(regs: Registers, code: ForcedCode, target: int, frame: int) -> Registers:
        values = {
            name: a & (2**64 - 1)
            for name, a in zip(SYSV_ARGUMENT_REGISTERS, code.arguments, strict=False)
        }
        flags = regs["eflags"] & ~(EFLAGS_IF | EFLAGS_TF)
        return regs.replace(rip=target, rsp=frame, rax=0, eflags=flags, **values)

    def _run_until_return(
        self, code: ForcedCode, thread: int, trap: int, rsp_after: int
    ) -> tuple[int, int]:
        deadline = time.monotonic() + self.timeout
        stepped = 0
        while True:
            self.client.resume(thread=thread)  # only this vCPU runs
            try:
                stop = self.client.wait_stop(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.client.interrupt()
                raise IntrospectionError(
                    f"{code.name}: no return within {self.timeout} s; registers and memory restored"
                ) from None
            if stop.exited:
                raise IntrospectionError(f"{code.name}: the VM ended during the forced call")
            now = self.client.read_registers()
            if now["rip"] == trap and now["rsp"] == rsp_after and stop.thread in (None, thread):
                return now["rax"], stepped
            if time.monotonic() > deadline:
                raise IntrospectionError(f"{code.name}: no return within {self.timeout} s")
            stepped += 1  # another breakpoint (e.g. a monitored function called by the code)
            self.monitor.step_over(now, stop.thread)

    def _restore(
        self,
        regs: Registers,
        frame: int,
        saved_slot: bytes,
        target: int,
        saved_code: bytes,
    ) -> None:
        problems = []
        steps: list[Callable[[], None]] = [
            lambda: self.client.write_registers(regs),
            lambda: self.client.write_memory(frame, saved_slot),
        ]
        if saved_code:
            steps.append(lambda: self.client.write_memory(target, saved_code))
        for action in steps:
            try:
                action()
            except (IntrospectionError, TimeoutError) as exc:
                problems.append(str(exc))
        if problems:
            raise IntrospectionError("restoring after a forced call failed: " + "; ".join(problems))

    def _arm_trap(self, trap: int) -> None:
        """The return trap stays armed between calls: its code never runs after boot, and
        every breakpoint insert or removal makes QEMU drop translated code (slow)."""
        if trap not in self.monitor._extra:
            self.monitor.add_stop_handler(trap, lambda _stop, _regs: False)

    def close(self) -> None:
        """Remove the return trap (closing the client also removes every breakpoint)."""
        with contextlib.suppress(IntrospectionError, TimeoutError):
            self.monitor.remove_stop_handler(self.monitor.symbols.address(self.scratch_symbol))

    # ---- triggers ----
    def call_now(self, code: ForcedCode, *, wait: float = 30.0) -> CallResult:
        """API/CLI trigger: stop at the next safe point, run ``code``, resume."""
        done: list[CallResult] = []
        self._at_safe_point(code, "api", done.append)
        self.monitor.run(duration=wait, until=lambda: bool(done) or bool(self._failed))
        if self._failed:
            raise IntrospectionError(self._failed.pop())
        if not done:
            with contextlib.suppress(IntrospectionError):
                self.monitor.remove_stop_handler(self.monitor.symbols.address(self.safe_point))
            raise IntrospectionError(
                f"{code.name}: the guest reached no safe point ({self.safe_point}) in {wait} s"
            )
        return done[0]

    def _at_safe_point(
        self, code: ForcedCode, trigger: str, sink: Callable[[CallResult], None]
    ) -> None:
        addr = self.monitor.symbols.address(self.safe_point)

        def handler(stop: StopReply, regs: Registers) -> bool:
            self.monitor.remove_stop_handler(addr)
            try:
                sink(self.execute(code, regs, stop.thread or 1, trigger))
            except IntrospectionError as exc:
                self.errors.append(str(exc))
                self._failed.append(str(exc))
            return False  # the monitor steps over the safe-point instruction

        self.monitor.add_stop_handler(addr, handler)

    def on_hit(
        self, registration: Registration, code: ForcedCode, sink: Callable[[CallResult], None]
    ) -> None:
        """Run ``code`` at every (filtered) hit of ``registration``, in the hit's context."""

        def run(hit: Hit, regs: Registers) -> None:
            try:
                sink(self.execute(code, regs, hit.vcpu, "hit"))
            except IntrospectionError as exc:
                self.errors.append(str(exc))

        registration.on_hit = run

    def every(self, interval: float, code: ForcedCode, sink: Callable[[CallResult], None]) -> None:
        """Timer trigger: every ``interval`` s, at the next safe point."""
        self.when(lambda: True, code, sink, poll=interval, trigger="timer")

    def when(
        self,
        condition: Callable[[], bool],
        code: ForcedCode,
        sink: Callable[[CallResult], None],
        *,
        poll: float = 1.0,
        trigger: str = "condition",
    ) -> None:
        """Condition trigger: poll ``condition`` (host side, e.g. a scheduler's memory state)
        every ``poll`` s; when true, run ``code`` at the next safe point."""
        if poll <= 0:
            raise InputError(f"poll interval {poll}: must be > 0 s")
        addr = self.monitor.symbols.address(self.safe_point)

        def check() -> None:
            if addr not in self.monitor._extra and condition():
                self._at_safe_point(code, trigger, sink)

        self.monitor.timers.append(Timer(poll, check))


def parse_arguments(texts: Sequence[str]) -> tuple[int, ...]:
    """CLI arguments: decimal, 0x-hex or negative integers."""
    values = []
    for text in texts:
        try:
            values.append(int(text, 0))
        except ValueError:
            raise InputError(f"argument {text!r}: not an integer (decimal or 0x hex)") from None
    return tuple(values)
