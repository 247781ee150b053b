"""Benchmark of the QEMU backend on real guests (TCG), with its baselines measured in the same run.

- guest boot time to the readiness line: uncompressed cpio vs gzip (median of --boots runs);
- balloon inflation rate (MiB/s): anonymous RAM, file backing preallocated (the default, space
  guaranteed) and file backing sparse;
- swap-out rate (MiB/s) of chosen guest pages to the VM's own file (write-back -> PAGEOUT ->
  DONTNEED, measured by the file's residency) beside the disk's sequential write rate
  (write + fdatasync of a file of the same size on the same filesystem);
- swap-in latency per 4 KiB page: the guest's pass over its buffer after the eviction minus the
  same pass while resident, divided by the pages.

Writes bench/results/qemu.md. Needs root, QEMU and the guest kernel (scripts/setup.sh).
Run: ``.venv/bin/python bench/bench_qemu.py [--boots 3] [--buffer-mib 128]``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import tempfile
import time
from pathlib import Path

from memvisor.backends.qemu import swapout
from memvisor.backends.qemu.host import QemuHost
from memvisor.backends.qemu.launcher import GuestShell, LaunchSpec, VMProcess, booted_vm
from memvisor.guestimage import GuestImage, build_image
from memvisor.model import Backing, VMSpec
from memvisor.units import PAGE_SIZE, MiB

ROOT = Path(__file__).resolve().parent.parent
MEMBUF = ROOT / "tests" / "e2e" / "guest" / "membuf.py"
RESULTS = ROOT / "bench" / "results" / "qemu.md"


def disk_write_rate(directory: Path, size: int, *, flush: bool) -> float:
    """Sequential write of ``size`` bytes, MiB/s, ended by ``fdatasync`` (``flush``: data on
    stable storage, the device cache flushed) or by ``sync_file_range`` (written to the device,
    no cache flush: what the swap-out's write-back does)."""
    path = directory / "seqwrite.bin"
    block = os.urandom(4 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        for _ in range(size // len(block)):
            os.write(fd, block)
        if flush:
            os.fdatasync(fd)
        else:
            swapout.sync_range(fd, 0, size)
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()
    return size / MiB / seconds


def boot_seconds(image: GuestImage, work: Path, runs: int) -> list[float]:
    times = []
    for i in range(runs):
        start = time.monotonic()
        spec = LaunchSpec(f"boot{i}", 256 * MiB, Backing.ANON)
        with booted_vm(spec, work / f"boot-{image.digest}-{i}", image):
            times.append(time.monotonic() - start)
    return times


def balloon_rate(vm: VMProcess, inflate: int, timeout: float = 60.0) -> tuple[float, int]:
    """Inflate by ``inflate`` bytes; returns (MiB/s, bytes reached within ``timeout``)."""
    qmp = vm.qmp()
    target = vm.spec.memory - inflate
    start = time.monotonic()
    qmp.cmd("balloon", value=target)
    actual = vm.spec.memory
    while time.monotonic() - start < timeout:
        actual = int(qmp.cmd("query-balloon")["actual"])
        if actual <= target + MiB:
            break
        time.sleep(0.02)
    reached = vm.spec.memory - actual
    return reached / MiB / (time.monotonic() - start), reached


def balloon_rates(image: GuestImage, work: Path, inflate: int) -> dict[str, tuple[float, int]]:
    out = {}
    cases = {
        "anonymous RAM": LaunchSpec("bal-anon", 256 * MiB, Backing.ANON),
        "file, preallocated (default)": LaunchSpec("bal-file", 256 * MiB, Backing.FILE),
        "file, sparse": LaunchSpec("bal-sparse", 256 * MiB, Backing.FILE, preallocate=False),
    }
    for label, spec in cases.items():
        with booted_vm(spec, work / spec.name, image) as vm:
            out[label] = balloon_rate(vm, inflate)
    return out


def _membuf(sh: GuestShell, mib: int) -> list[tuple[int, int]]:
    sh.run(f"mkdir -p /tmp/mb && setsid python3 -S /opt/test/membuf.py {mib} 3 /tmp/mb "
           ">/tmp/mb/log 2>&1 &", check=True)  # fmt: skip
    for _ in range(600):
        out = sh.run("cat /tmp/mb/ranges 2>/dev/null").output.strip()
        if out:
            return [(int(a), int(n)) for a, n in json.loads(out)]
        time.sleep(0.5)
    raise RuntimeError(sh.run("cat /tmp/mb/log").output)


def _guest_pass_seconds(sh: GuestShell) -> float:
    sh.run("rm -f /tmp/mb/sum2; touch /tmp/mb/check", check=True)
    for _ in range(1200):
        out = sh.run("cat /tmp/mb/sum2 2>/dev/null").output.split()
        if out:
            return float(out[1])
        time.sleep(0.25)
    raise RuntimeError("guest never finished its pass over the buffer")


def _rewrite(sh: GuestShell) -> None:
    sh.run("rm -f /tmp/mb/rewritten; touch /tmp/mb/rewrite", check=True)
    for _ in range(1200):
        if sh.run("cat /tmp/mb/rewritten 2>/dev/null").output.strip():
            return
        time.sleep(0.25)
    raise RuntimeError("guest never rewrote its buffer")


def _timed_swap_out(host: QemuHost, ranges: list[tuple[int, int]]) -> tuple[float, float]:
    start = time.perf_counter()
    result = host.swap_out_guest("swapvm", ranges)
    seconds = time.perf_counter() - start
    return result.achieved / MiB, seconds


def host_fault_us(path: Path, ranges: list[tuple[int, int]]) -> float:
    """Touch one byte per evicted page through a MADV_RANDOM mapping (no readahead): the cost
    of one fault that reads a 4 KiB page back from the VM's file, µs."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        m.madvise(mmap.MADV_RANDOM)
        offsets = [o for gpa, n in ranges for o in range(gpa, gpa + n, PAGE_SIZE)]
        start = time.perf_counter()
        total = 0
        for off in offsets:
            total += m[off]
        seconds = time.perf_counter() - start
        m.close()
    finally:
        os.close(fd)
    return seconds / len(offsets) * 1e6


def swap_figures(image: GuestImage, work: Path, mib: int) -> dict[str, float]:
    host = QemuHost(work / "state", image=image, accel="tcg")
    host.power_on(VMSpec("swapvm", (mib + 192) * MiB, backing=Backing.FILE))
    out: dict[str, float] = {}
    try:
        vm = host.running("swapvm")
        with GuestShell(vm.process.paths.shell) as sh:
            ranges = _membuf(sh, mib)
            out["resident_pass_s"] = statistics.median(_guest_pass_seconds(sh) for _ in range(3))
            _rewrite(sh)  # every page dirty: the swap-out includes the write-back
            out["dirty_mib"], out["dirty_s"] = _timed_swap_out(host, ranges)
            evicted = [_guest_pass_seconds(sh)]
            out["clean_mib"], out["clean_s"] = _timed_swap_out(host, ranges)  # written back
            evicted.append(_guest_pass_seconds(sh))
            _timed_swap_out(host, ranges)
            evicted.append(_guest_pass_seconds(sh))
            out["evicted_pass_s"] = statistics.median(evicted)
            _timed_swap_out(host, ranges)
            out["host_fault_us"] = host_fault_us(vm.process.paths.memory, ranges)
    finally:
        host.power_off("swapvm")
    pages = mib * MiB // PAGE_SIZE
    out["swap_in_us_per_page"] = (out["evicted_pass_s"] - out["resident_pass_s"]) / pages * 1e6
    return out


def report(figures: dict[str, object]) -> str:
    f = figures
    boots: dict[str, list[float]] = f["boot"]  # type: ignore[assignment]
    bal: dict[str, tuple[float, int]] = f["balloon"]  # type: ignore[assignment]
    sw: dict[str, float] = f["swap"]  # type: ignore[assignment]
    lines = [
        "# QEMU backend benchmark",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, TCG, 1 vCPU guests, host load"
        f" average {os.getloadavg()[0]:.1f} (machine shared: treat as orders of magnitude).",
        "",
        "## Guest boot (to the readiness line)",
        "",
        "| initramfs | size | boots (s) | median (s) |",
        "|---|---|---|---|",
    ]
    for label, times in boots.items():
        size = f["sizes"][label]  # type: ignore[index]
        runs = ", ".join(f"{t:.1f}" for t in times)
        lines.append(
            f"| {label} | {size / MiB:.1f} MiB | {runs} | {statistics.median(times):.1f} |"
        )
    lines += ["", "## Balloon inflation (256 MiB guest, inflate 128 MiB)", "",
              "| guest RAM backing | MiB/s | inflated within 60 s |", "|---|---|---|"]  # fmt: skip
    for label, (rate, reached) in bal.items():
        lines.append(f"| {label} | {rate:.1f} | {reached / MiB:.0f} MiB |")
    lines += [
        "",
        "## Swap-out to the per-VM file, swap-in",
        "",
        "| measure | value |",
        "|---|---|",
        f"| disk sequential write + fdatasync (baseline) | {f['disk_mib_s']:.0f} MiB/s |",
        f"| disk sequential write + sync_file_range, no cache flush (baseline) | "
        f"{f['disk_nf_mib_s']:.0f} MiB/s |",
        f"| swap-out of {sw['dirty_mib']:.0f} MiB just rewritten by the guest (write-back "
        f"included) | {sw['dirty_mib'] / sw['dirty_s']:.0f} MiB/s ({sw['dirty_s']:.2f} s) |",
        f"| ratio dirty swap-out / sequential write with sync_file_range | "
        f"{sw['dirty_mib'] / sw['dirty_s'] / float(f['disk_nf_mib_s']):.2f} |",  # type: ignore[arg-type]
        f"| swap-out of {sw['clean_mib']:.0f} MiB already written back (PAGEOUT + DONTNEED) "
        f"| {sw['clean_mib'] / sw['clean_s']:.0f} MiB/s ({sw['clean_s']:.2f} s) |",
        f"| guest pass over the buffer, resident (median of 3) | {sw['resident_pass_s']:.2f} s |",
        f"| same pass right after a swap-out (median of 3) | {sw['evicted_pass_s']:.2f} s |",
        f"| swap-in per 4 KiB page seen by the guest (difference / pages) | "
        f"{sw['swap_in_us_per_page']:.1f} µs |",
        f"| one fault reading a page back from the VM's file, no readahead (host) | "
        f"{sw['host_fault_us']:.1f} µs |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--buffer-mib", type=int, default=128)
    args = parser.parse_args()
    extra: dict[str, Path | bytes] = {"/opt/test/membuf.py": MEMBUF}
    images = {
        "cpio (uncompressed)": build_image(extra_files=extra),
        "cpio.gz": build_image(extra_files=extra, compress=True),
    }
    figures: dict[str, object] = {"sizes": {k: v.size for k, v in images.items()}}
    with tempfile.TemporaryDirectory(prefix="bench-qemu-", dir=ROOT / ".cache") as tmp:
        work = Path(tmp)
        figures["disk_mib_s"] = disk_write_rate(work, args.buffer_mib * MiB, flush=True)
        figures["disk_nf_mib_s"] = disk_write_rate(work, args.buffer_mib * MiB, flush=False)
        print(
            f"disk: {figures['disk_mib_s']:.0f} / {figures['disk_nf_mib_s']:.0f} MiB/s", flush=True
        )
        figures["boot"] = {k: boot_seconds(img, work, args.boots) for k, img in images.items()}
        print(f"boot: {figures['boot']}", flush=True)
        plain = images["cpio (uncompressed)"]
        figures["balloon"] = balloon_rates(plain, work, 128 * MiB)
        print(f"balloon: {figures['balloon']}", flush=True)
        figures["swap"] = swap_figures(plain, work, args.buffer_mib)
        print(f"swap: {figures['swap']}", flush=True)
    text = report(figures)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
