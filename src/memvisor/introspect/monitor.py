"""Hidden execution monitoring (C5) through QEMU's gdbstub.

Register a kernel symbol or an address range; every execution stops the VM, is recorded as a
:class:`Hit` (vCPU, registers, System V arguments, the instruction decoded by capstone, and for
``__x64_sys_*`` handlers the user's syscall arguments from ``pt_regs``), counted, and the guest
resumes. Nothing in guest memory changes: under TCG the breakpoints are QEMU's ``Z0`` (checked
at translation time, no 0xCC written); under KVM only hardware ``Z1`` breakpoints are used (at
most 4), and a request that would need more is refused instead of falling back to visible
software breakpoints.

Resuming from a breakpoint: ``c`` on a breakpoint re-reports it, so we either skip the
instruction when it is a NOP (the 5-byte ftrace NOP that starts most kernel functions: one
``P rip`` write, pipelined with the ``c``) or single-step over it (QEMU 7.2 lets a single step
override a breakpoint).

Overload protection: each registration has a token bucket (``max_rate`` hits/s, one second of
burst). When it runs dry the registration's breakpoints are removed for ``cooldown`` seconds
and the guest runs free; the suspensions are counted so the numbers stay honest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import capstone

from memvisor.errors import InputError, IntrospectionError
from memvisor.introspect.rsp import GdbClient, Registers, StopReply
from memvisor.introspect.symbols import KernelSymbols

MAX_HW_BREAKPOINTS = 4
DEFAULT_MAX_RATE = 50.0  # a stop costs ~6 ms under TCG: 50/s keeps the guest >= 70 % running
MAX_RANGE_INSTRUCTIONS = 512
# pt_regs offsets of the six syscall arguments (di, si, dx, r10, r8, r9)
PT_REGS_SYSCALL_ARGS = (112, 104, 96, 56, 72, 64)
PT_REGS_SIZE = 168

_DISASM = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


@dataclass(frozen=True)
class Instruction:
    address: int
    size: int
    text: str
    is_nop: bool


def decode(code: bytes, address: int) -> Instruction:
    """The first instruction of ``code``; NOPs (and endbr64) can be skipped instead of run."""
    for insn in _DISASM.disasm(code, address, 1):
        nop = insn.mnemonic.startswith("nop") or insn.mnemonic == "endbr64"
        return Instruction(address, insn.size, f"{insn.mnemonic} {insn.op_str}".strip(), nop)
    return Instruction(address, 1, f"(undecodable {code[:16].hex()})", False)


@dataclass
class TokenBucket:
    """``rate`` events/s with a burst of ``burst``; pure (the caller passes the time)."""

    rate: float
    burst: float
    tokens: float = -1.0
    last: float = 0.0

    def allow(self, now: float) -> bool:
        if self.tokens < 0:
            self.tokens, self.last = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(frozen=True)
class Hit:
    registration: str
    seq: int
    vcpu: int
    address: int
    location: str
    instruction: str
    arguments: tuple[int, ...]
    syscall_arguments: tuple[int, ...] | None
    registers: dict[str, int]
    time: float

    def to_json(self) -> dict[str, Any]:
        return {
            "registration": self.registration,
            "seq": self.seq,
            "vcpu": self.vcpu,
            "address": f"{self.address:#x}",
            "location": self.location,
            "instruction": self.instruction,
            "arguments": [f"{a:#x}" for a in self.arguments],
            "syscall_arguments": (
                None
                if self.syscall_arguments is None
                else [f"{a:#x}" for a in self.syscall_arguments]
            ),
            "registers": {k: f"{v:#x}" for k, v in self.registers.items()},
            "time": self.time,
        }


HitFilter = Callable[[Hit], bool]


def argument_filter(index: int, value: int, *, syscall: bool = False) -> HitFilter:
    """Keep hits whose argument ``index`` (0-based; syscall args with ``syscall``) is ``value``."""
    if not 0 <= index < 6:
        raise InputError(f"argument index {index}: must be 0..5")

    def matches(hit: Hit) -> bool:
        args = hit.syscall_arguments if syscall else hit.arguments
        return args is not None and args[index] == value

    return matches


@dataclass
class Registration:
    name: str
    addresses: tuple[int, ...]
    hit_filter: HitFilter | None
    max_rate: float
    syscall_args: bool
    on_hit: Callable[[Hit, Registers], None] | None
    bucket: TokenBucket
    hits: int = 0
    filtered_out: int = 0
    suspensions: int = 0
    suspended_seconds: float = 0.0
    suspended_until: float | None = None

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "hits": self.hits,
            "filtered_out": self.filtered_out,
            "suspensions": self.suspensions,
            "suspended_seconds": round(self.suspended_seconds, 3),
        }


@dataclass
class Timer:
    """A callback run with the VM stopped, every ``interval`` s (used by C6 triggers)."""

    interval: float
    callback: Callable[[], None]
    due: float = 0.0


def detect_accelerator(client: GdbClient) -> str:
    out = client.monitor_command("info kvm")
    return "kvm" if "kvm support: enabled" in out else "tcg"


@dataclass
class Monitor:
    client: GdbClient
    symbols: KernelSymbols
    accel: str = "tcg"
    cooldown: float = 1.0
    clock: Callable[[], float] = time.monotonic
    registrations: list[Registration] = field(default_factory=list)
    timers: list[Timer] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)
    keep_hits: int = 10000
    skip_nops: bool = True  # False: always single-step (slower; for comparison in bench/)
    _by_address: dict[int, Registration] = field(default_factory=dict)
    _extra: dict[int, Callable[[StopReply, Registers], bool]] = field(default_factory=dict)
    _seq: int = 0
    stop_seconds: list[float] = field(default_factory=list)  # stop reply -> resume, per stop
    _stopped_at: float | None = None

    # ---- registration ----
    def watch_symbol(self, name: str, **options: Any) -> Registration:
        addr = self.symbols.address(name)
        syscall = options.pop("syscall_args", name.startswith("__x64_sys_"))
        return self._register(name, (addr,), syscall_args=syscall, **options)

    def watch_range(self, start: int, end: int, **options: Any) -> Registration:
        """Every instruction boundary in [start, end), found by a linear capstone sweep."""
        if not start < end or end - start > 64 * 1024:
            raise InputError(f"address range {start:#x}-{end:#x}: empty or larger than 64 KiB")
        code = self.client.read_memory(start, end - start)
        addrs = tuple(i.address for i in _DISASM.disasm(code, start))
        if not addrs or len(addrs) > MAX_RANGE_INSTRUCTIONS:
            raise InputError(f"address range {start:#x}-{end:#x}: {len(addrs)} instructions")
        name = f"{self.symbols.symbolize(start)}..{self.symbols.symbolize(end)}"
        return self._register(name, addrs, syscall_args=False, **options)

    def _register(
        self,
        name: str,
        addrs: tuple[int, ...],
        *,
        syscall_args: bool,
        hit_filter: HitFilter | None = None,
        max_rate: float = DEFAULT_MAX_RATE,
        on_hit: Callable[[Hit, Registers], None] | None = None,
    ) -> Registration:
        if max_rate <= 0:
            raise InputError(f"max_rate {max_rate}: must be > 0 hits/s")
        clash = [a for a in addrs if a in self._by_address or a in self._extra]
        if clash:
            raise InputError(f"{name}: address {clash[0]:#x} is already monitored")
        self.check_hidden(len(addrs))
        reg = Registration(
            name, addrs, hit_filter, max_rate, syscall_args, on_hit, TokenBucket(max_rate, max_rate)
        )
        self._insert(addrs)
        for a in addrs:
            self._by_address[a] = reg
        self.registrations.append(reg)
        return reg

    def hardware_in_use(self) -> int:
        return len(self._by_address) + len(self._extra)

    def check_hidden(self, more: int) -> None:
        """Under KVM only hardware breakpoints stay hidden: refuse what does not fit in 4."""
        if self.accel == "kvm" and self.hardware_in_use() + more > MAX_HW_BREAKPOINTS:
            raise IntrospectionError(
                f"cannot monitor hidden: {more} more breakpoint(s) would exceed the "
                f"{MAX_HW_BREAKPOINTS} hardware breakpoints of KVM ({self.hardware_in_use()} in "
                "use); software breakpoints would write 0xCC into guest memory, so none was set"
            )

    def _insert(self, addrs: tuple[int, ...]) -> None:
        for a in addrs:
            self.client.insert_breakpoint(a, hardware=self.accel == "kvm")

    def _remove(self, addrs: tuple[int, ...]) -> None:
        for a in addrs:
            self.client.remove_breakpoint(a, hardware=self.accel == "kvm")

    def unwatch(self, reg: Registration) -> None:
        if reg.suspended_until is None:
            self._remove(reg.addresses)
        for a in reg.addresses:
            self._by_address.pop(a, None)
        self.registrations.remove(reg)

    def add_stop_handler(self, addr: int, handler: Callable[[StopReply, Registers], bool]) -> None:
        """A breakpoint owned by another component (C6 safe points and traps).

        ``handler`` returns True when it resumed the guest itself."""
        if addr in self._by_address or addr in self._extra:
            raise InputError(f"address {addr:#x} already has a breakpoint")
        self.check_hidden(1)
        self.client.insert_breakpoint(addr, hardware=self.accel == "kvm")
        self._extra[addr] = handler

    def remove_stop_handler(self, addr: int) -> None:
        if self._extra.pop(addr, None) is not None:
            self.client.remove_breakpoint(addr, hardware=self.accel == "kvm")

    # ---- the loop ----
    def run(
        self,
        *,
        duration: float | None = None,
        until: Callable[[], bool] | None = None,
        on_hit: Callable[[Hit], None] | None = None,
        poll: float = 0.2,
    ) -> None:
        """Let the guest run, handling stops, until ``duration`` passes or ``until()`` is true
        (checked after every stop and every ``poll`` s while the guest runs, without stopping
        it). Returns with the VM stopped (closing the client resumes it)."""
        end = None if duration is None else self.clock() + duration
        for t in self.timers:
            t.due = self.clock() + t.interval

        def finished(now: float) -> bool:
            return (until is not None and until()) or (end is not None and now >= end)

        while not finished(self.clock()):
            if not self.client.running:  # the caller may hand over a running VM
                self._resume_due(self.clock())
                self.client.resume()
                if self._stopped_at is not None:  # host time the guest spent stopped
                    self.stop_seconds.append(time.perf_counter() - self._stopped_at)
                    del self.stop_seconds[: -self.keep_hits]
                    self._stopped_at = None
            while True:
                now = self.clock()
                deadline = self._next_deadline()
                if finished(now) or (deadline is not None and now >= deadline):
                    self._handle_stop(self.client.interrupt(), on_hit, interrupted=True)
                    break
                wake = min(w for w in (end, deadline, now + poll) if w is not None)
                try:
                    stop = self.client.wait_stop(max(0.0, wake - now))
                except TimeoutError:
                    continue
                self._stopped_at = time.perf_counter()
                self._handle_stop(stop, on_hit, interrupted=False)
                break
        if self.client.running:
            self.client.interrupt()

    def _next_deadline(self) -> float | None:
        due = [r.suspended_until for r in self.registrations if r.suspended_until is not None]
        due += [t.due for t in self.timers]
        return min(due) if due else None

    def _resume_due(self, now: float) -> None:
        """Re-arm suspended registrations and run due timers (the VM is stopped here)."""
        for reg in self.registrations:
            if reg.suspended_until is not None and now >= reg.suspended_until:
                reg.suspended_seconds += now - reg.suspended_until + self.cooldown
                reg.suspended_until = None
                self._insert(reg.addresses)
        for t in self.timers:
            if now >= t.due:
                t.due = now + t.interval
                t.callback()

    def _handle_stop(
        self, stop: StopReply, on_hit: Callable[[Hit], None] | None, *, interrupted: bool
    ) -> None:
        if stop.exited:
            raise IntrospectionError(f"the VM ended while monitored ({stop.kind}{stop.signal:02x})")
        regs = self.client.read_registers()
        rip = regs["rip"]
        extra = self._extra.get(rip)
        if extra is not None:
            if not extra(stop, regs):
                self.step_over(regs, stop.thread)
            return
        reg = self._by_address.get(rip)
        if reg is None or interrupted:
            return  # an interrupt, or a stale report of a breakpoint we already removed
        ranges = [(rip, 16)] + ([(regs["rdi"], PT_REGS_SIZE)] if reg.syscall_args else [])
        reads = self.client.read_memory_many(ranges)  # one round trip for code and pt_regs
        insn = decode(reads[0], rip)
        hit = self._record(reg, stop, regs, insn, reads[1] if reg.syscall_args else None)
        if hit is not None and on_hit is not None:
            on_hit(hit)
        if hit is not None and reg.on_hit is not None:
            reg.on_hit(hit, regs)
            regs = self.client.read_registers()  # a forced call restored them; re-read
        if not self.client.running:
            self.step_over(regs, stop.thread, insn if regs["rip"] == rip else None)

    def _record(
        self,
        reg: Registration,
        stop: StopReply,
        regs: Registers,
        insn: Instruction,
        pt_regs: bytes | None,
    ) -> Hit | None:
        rip = regs["rip"]
        syscall = None
        if pt_regs is not None:
            syscall = tuple(
                int.from_bytes(pt_regs[o : o + 8], "little") for o in PT_REGS_SYSCALL_ARGS
            )
        self._seq += 1
        hit = Hit(
            reg.name,
            self._seq,
            stop.thread or 1,
            rip,
            self.symbols.symbolize(rip),
            insn.text,
            regs.arguments(),
            syscall,
            regs.as_dict(),
            time.time(),
        )
        if reg.hit_filter is not None and not reg.hit_filter(hit):
            reg.filtered_out += 1
            return None
        reg.hits += 1
        self.hits.append(hit)
        del self.hits[: -self.keep_hits]
        now = self.clock()
        if not reg.bucket.allow(now):
            self._suspend(reg, now)
        return hit

    def _suspend(self, reg: Registration, now: float) -> None:
        self._remove(reg.addresses)
        reg.suspensions += 1
        reg.suspended_until = now + self.cooldown

    def step_over(
        self, regs: Registers, thread: int | None, insn: Instruction | None = None
    ) -> None:
        """Leave the breakpoint at rip: skip a NOP by moving rip (the write goes out with the
        next ``c``), else single-step (QEMU 7.2 lets a step override the breakpoint)."""
        rip = regs["rip"]
        if insn is None:
            insn = decode(self.client.read_memory(rip, 16), rip)
        if insn.is_nop and self.skip_nops:
            self.client.write_register("rip", rip + insn.size, deferred=True)
            return
        stop = self.client.step(thread)
        if stop.exited:
            raise IntrospectionError("the VM ended during a single step")
