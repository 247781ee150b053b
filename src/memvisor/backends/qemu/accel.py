"""Choose the accelerator: KVM only if a tiny KVM guest runs at hardware speed, else TCG.

``/dev/kvm`` opening is not enough: on some hosts it is a software KVM that runs guest code at
~1.4 M instructions/s, where ``qemu -enable-kvm`` hangs in the kernel's decompressor. The probe
creates a VM through the KVM ioctls, puts a 16-bit real-mode loop at 0x1000
(``mov ecx, N; dec ecx; jnz; hlt``), runs it once and times ``KVM_RUN``. It runs in a child
process with a timeout, so a KVM that never returns cannot hang the manager.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from memvisor.errors import InputError

LOOP_ITERATIONS = 200_000  # 400k instructions: < 1 ms on hardware, ~0.3 s on a software KVM
HARDWARE_SPEED = 50e6  # instructions/s: hardware does >1e9; the software KVM here ~1.4e6
PROBE_TIMEOUT = 5.0

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_EXIT_HLT = 5
_SREGS_SIZE = 312
_CS_OFFSET = 0  # struct kvm_segment cs {u64 base; u32 limit; u16 selector; ...} comes first


@dataclass(frozen=True, slots=True)
class AccelChoice:
    accel: str  # "tcg" or "kvm"
    reason: str
    instructions_per_second: float | None = None


def _real_mode_loop(iterations: int) -> bytes:
    return (
        b"\x66\xb9" + iterations.to_bytes(4, "little")  # mov ecx, imm32
        + b"\x66\x49"  # dec ecx
        + b"\x75\xfc"  # jnz -4 (back to dec)
        + b"\xf4"  # hlt
    )  # fmt: skip


def run_kvm_loop(iterations: int = LOOP_ITERATIONS) -> float:
    """Run the loop in a KVM guest; returns the seconds ``KVM_RUN`` took (raises OSError)."""
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        if fcntl.ioctl(kvm, KVM_GET_API_VERSION) != 12:
            raise OSError("unexpected KVM API version")
        vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
        mem = mmap.mmap(-1, 0x10000)
        mem[0x1000 : 0x1000 + 16] = _real_mode_loop(iterations).ljust(16, b"\xf4")
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        region = (0).to_bytes(4, "little") * 2 + (0).to_bytes(8, "little")
        region += (0x10000).to_bytes(8, "little") + addr.to_bytes(8, "little")
        fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
        vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
        run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE)
        run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        sregs = bytearray(_SREGS_SIZE)
        fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
        sregs[_CS_OFFSET : _CS_OFFSET + 8] = (0).to_bytes(8, "little")  # cs.base = 0
        sregs[_CS_OFFSET + 12 : _CS_OFFSET + 14] = (0).to_bytes(2, "little")  # cs.selector
        fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
        regs = bytearray(18 * 8)
        regs[16 * 8 : 17 * 8] = (0x1000).to_bytes(8, "little")  # rip
        regs[17 * 8 : 18 * 8] = (0x2).to_bytes(8, "little")  # rflags
        fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))
        start = time.perf_counter()
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        elapsed = time.perf_counter() - start
        exit_reason = int.from_bytes(run[8:12], "little")
        if exit_reason != KVM_EXIT_HLT:
            raise OSError(f"probe guest exited with reason {exit_reason}, not HLT")
        return elapsed
    finally:
        os.close(kvm)


def probe(timeout: float = PROBE_TIMEOUT) -> AccelChoice:
    """Time the KVM loop in a child process; choose KVM only at hardware speed."""
    if not os.path.exists("/dev/kvm"):
        return AccelChoice("tcg", "no /dev/kvm")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "memvisor.backends.qemu.accel"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return AccelChoice("tcg", f"KVM probe did not finish in {timeout:.0f} s (software KVM?)")
    if proc.returncode != 0:
        return AccelChoice("tcg", f"KVM probe failed: {proc.stderr.strip()[-300:]}")
    seconds = float(json.loads(proc.stdout)["seconds"])
    rate = 2 * LOOP_ITERATIONS / max(seconds, 1e-9)
    if rate >= HARDWARE_SPEED:
        return AccelChoice("kvm", f"KVM runs guest code at {rate / 1e6:.0f} M instr/s", rate)
    return AccelChoice(
        "tcg", f"KVM runs guest code at only {rate / 1e6:.1f} M instr/s (software KVM)", rate
    )


def choose(override: str | None = None) -> AccelChoice:
    """``override`` ("tcg"/"kvm", e.g. from ``--accel``) wins; otherwise probe."""
    if override is not None:
        if override not in ("tcg", "kvm"):
            raise InputError(f"--accel: expected 'tcg' or 'kvm', got {override!r}")
        return AccelChoice(override, "set by --accel")
    return probe()


if __name__ == "__main__":
    try:
        print(json.dumps({"seconds": run_kvm_loop()}))
    except OSError as exc:
        print(f"KVM probe: {exc}", file=sys.stderr)
        sys.exit(1)
