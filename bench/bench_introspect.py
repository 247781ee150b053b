"""Hidden monitoring (C5) and forced calls (C6) through QEMU's gdbstub, on one real guest.

One 256 MiB guest (QEMU 7.2, TCG) runs a hot loop of ``getpriority`` syscalls while
``__x64_sys_getpriority`` is monitored. Measured in the same run:

1. Baseline: a plain stop-read-resume loop over the gdbstub, the way a debugger does it: on
   each stop ``g`` (read registers), then ``z0`` / ``s`` / ``Z0`` / ``c`` to step over the
   breakpoint. Hits/s and host time per hit.
2. memvisor's Monitor: registers + the code bytes + the syscall's pt_regs in two pipelined
   exchanges, and the breakpoint left by moving rip past the ftrace NOP with the ``P`` write
   travelling in the same packet burst as the ``c``. Same figures, and the ratio to (1).
3. The Monitor with single-stepping instead of the NOP skip (what that trick is worth).
3b. Count-only monitoring through the TCG plugin (memvisor.introspect.tcgcount) on a second
   guest started with it: the counter's rate while the same hot loop runs, no stops at all.
4. Forced-call latency: ``get_max_files()`` forced at a monitored hit (save, frame, run,
   catch the return, restore) and through the API trigger (wait for the ``schedule`` safe
   point, then the same), medians.

Also: the guest's own syscall rate without monitoring and while monitored.

Run: ``.venv/bin/python bench/bench_introspect.py [--seconds S]``; prints a table and writes
bench/results/introspect.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from memvisor.backends.qemu.launcher import GuestShell, LaunchSpec, VMProcess, launch
from memvisor.guestimage import GuestImage, build_image, find_kernel_tree
from memvisor.introspect import symbols, tcgcount
from memvisor.introspect.inject import CallResult, Injector
from memvisor.introspect.monitor import Monitor
from memvisor.introspect.rsp import GdbClient
from memvisor.model import Backing
from memvisor.units import MiB

RESULTS = Path(__file__).parent / "results" / "introspect.md"
TARGET = "__x64_sys_getpriority"

HOT = b"""
import os, sys, time
end = time.monotonic() + float(sys.argv[1])
n = 0
while time.monotonic() < end:
    for _ in range(50):
        os.getpriority(os.PRIO_PROCESS, 0)
    n += 50
print("rate", n / float(sys.argv[1]))
"""


class GuestLoop:
    """The hot loop as a background job in the guest (one shell connection for the run)."""

    def __init__(self, gsh: GuestShell, client: GdbClient | None, seconds: float) -> None:
        self.gsh, self.client = gsh, client
        if client is not None and not client.running:
            client.resume()  # the shell needs a running guest
        gsh.run(f"rm -f /tmp/hot.out; (python3 /opt/bench/hot.py {seconds} > /tmp/hot.out &)")
        time.sleep(2.5)  # the interpreter starts (~1.5 s under TCG) and the loop gets going
        if client is not None:
            client.interrupt()

    def join(self) -> float:
        if self.client is not None and not self.client.running:
            self.client.resume()
        try:
            for _ in range(600):
                out = self.gsh.run("cat /tmp/hot.out", timeout=60).output
                if "rate" in out:
                    return float(out.split("rate", 1)[1].split()[0])
                time.sleep(0.5)
            raise RuntimeError("the guest loop never reported its rate")
        finally:
            if self.client is not None:
                self.client.interrupt()


def round_trips(client: GdbClient, addr: int, n: int = 50) -> dict[str, float]:
    """Median seconds of one exchange with the stopped stub: the unit every hit pays."""
    out = {}
    for name, fn in (
        ("m (8 bytes)", lambda: client.read_memory(addr, 8)),
        ("g (all registers)", client.read_registers),
        ("m + m pipelined", lambda: client.read_memory_many([(addr, 16), (addr + 64, 168)])),
    ):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def baseline_loop(client: GdbClient, addr: int, seconds: float) -> tuple[int, list[float]]:
    """Plain stop-read-resume: g, then z0 / s / Z0 / c per hit."""
    client.insert_breakpoint(addr)
    hits, per_hit = 0, []
    end = time.monotonic() + seconds
    client.resume()
    while time.monotonic() < end:
        try:
            client.wait_stop(max(0.01, end - time.monotonic()))
        except TimeoutError:
            break
        t0 = time.perf_counter()
        client.read_registers()
        client.remove_breakpoint(addr)
        client.step()
        client.insert_breakpoint(addr)
        per_hit.append(time.perf_counter() - t0)
        hits += 1
        client.resume()
    if client.running:
        client.interrupt()
    client.remove_breakpoint(addr)
    return hits, per_hit


def monitor_loop(monitor: Monitor, seconds: float) -> tuple[int, list[float]]:
    reg = monitor.watch_symbol(TARGET, max_rate=1e9)
    monitor.stop_seconds.clear()
    monitor.run(duration=seconds)
    monitor.unwatch(reg)
    return reg.hits, list(monitor.stop_seconds)


def phase(
    gsh: GuestShell,
    client: GdbClient,
    seconds: float,
    body: Callable[[], tuple[int, list[float]]],
) -> dict:
    loop = GuestLoop(gsh, client, seconds + 4)
    t0 = time.monotonic()
    hits, samples = body()
    wall = time.monotonic() - t0
    guest_rate = loop.join()
    return {"hits": hits, "wall": wall, "samples": samples, "guest_rate": guest_rate}


def forced_calls(gsh: GuestShell, monitor: Monitor, n: int) -> tuple[list[CallResult], list[float]]:
    injector = Injector(monitor)
    at_hit: list[CallResult] = []
    reg = monitor.watch_symbol(TARGET, max_rate=1e9)
    injector.on_hit(reg, injector.function("get_max_files"), at_hit.append)
    loop = GuestLoop(gsh, monitor.client, 20)
    monitor.run(duration=60, until=lambda: len(at_hit) >= n)
    monitor.unwatch(reg)
    api: list[float] = []
    for _ in range(max(3, n // 3)):
        t0 = time.perf_counter()
        injector.call_now(injector.function("get_max_files"))
        api.append(time.perf_counter() - t0)
    loop.join()
    return at_hit, api


def med_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000 if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="measuring window per phase")
    ap.add_argument("--calls", type=int, default=30, help="forced calls at hits")
    args = ap.parse_args()
    image = build_image(extra_files={"/opt/bench/hot.py": HOT})
    with tempfile.TemporaryDirectory(prefix="mv-bench-introspect-") as tmp:
        syms = symbols.load_symbols(find_kernel_tree().vmlinuz, Path(tmp) / "cache")
        vm = launch(LaunchSpec("bench-introspect", 256 * MiB, backing=Backing.ANON),
                    Path(tmp) / "vm", image)  # fmt: skip
        try:
            rows = run_phases(vm, syms, args)
        finally:
            vm.stop()
        rows["plugin"] = plugin_phase(Path(tmp), image, syms, args.seconds)
    report(rows, args)


def plugin_phase(tmp: Path, image: GuestImage, syms: symbols.KernelSymbols, seconds: float) -> dict:
    """Count-only monitoring with the TCG plugin: no VM stops at all."""
    counters = tcgcount.CounterFile.create(tmp / "counters")
    plugin = tcgcount.build_plugin(tmp / "cache")
    spec = LaunchSpec("bench-tcgcount", 256 * MiB, backing=Backing.ANON,
                      extra_args=tcgcount.qemu_args(plugin, counters.path))  # fmt: skip
    vm = launch(spec, tmp / "vm-plugin", image)
    try:
        with GdbClient.connect_unix(str(vm.paths.gdb), timeout=10) as client:
            symbols.find_kaslr_slide(client, syms)
            counters.watch([syms.address(TARGET)], client)
        with GuestShell(vm.paths.shell) as gsh:
            loop = GuestLoop(gsh, None, seconds + 4)
            t0, c0 = time.monotonic(), counters.counts()[0]
            time.sleep(seconds)
            t1, c1 = time.monotonic(), counters.counts()[0]
            guest_rate = loop.join()
        return {"hits": c1 - c0, "wall": t1 - t0, "samples": [], "guest_rate": guest_rate}
    finally:
        counters.close()
        vm.stop()


def run_phases(vm: VMProcess, syms: symbols.KernelSymbols, args: argparse.Namespace) -> dict:
    with GuestShell(vm.paths.shell) as gsh:
        free = GuestLoop(gsh, None, args.seconds).join()
        with GdbClient.connect_unix(str(vm.paths.gdb), timeout=10) as client:
            symbols.find_kaslr_slide(client, syms)
            addr = syms.address(TARGET)
            rtt = round_trips(client, addr)
            base = phase(gsh, client, args.seconds,
                         lambda: baseline_loop(client, addr, args.seconds))  # fmt: skip
            monitor = Monitor(client, syms)
            ours = phase(gsh, client, args.seconds, lambda: monitor_loop(monitor, args.seconds))
            monitor.skip_nops = False
            stepped = phase(gsh, client, args.seconds,
                            lambda: monitor_loop(monitor, args.seconds))  # fmt: skip
            monitor.skip_nops = True
            at_hit, api = forced_calls(gsh, monitor, args.calls)
    return {"free": free, "base": base, "ours": ours, "stepped": stepped,
            "at_hit": at_hit, "api": api, "rtt": rtt}  # fmt: skip


def report(r: dict, args: argparse.Namespace) -> None:
    def rate(p: dict) -> float:
        return p["hits"] / p["wall"]

    lines = [
        "# Introspection: monitored hits and forced calls (QEMU 7.2 gdbstub, TCG)",
        "",
        f"Guest: 256 MiB, 1 vCPU, TCG; `{TARGET}` monitored while the guest runs a hot loop of "
        f"getpriority(). Window {args.seconds:.0f} s per phase. Host: {_host()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end (other VMs share the cores).",
        "",
        "| method | hits/s | vs baseline | host time per hit, median (ms) |",
        "|---|---:|---:|---:|",
    ]
    b = rate(r["base"])
    for name, key in (
        ("baseline: stop, g, z0/s/Z0, c", "base"),
        ("memvisor Monitor (pipelined reads, NOP skip)", "ours"),
        ("memvisor Monitor, single-step instead of NOP skip", "stepped"),
        ("TCG plugin counter (count only: no stop, no registers)", "plugin"),
    ):
        p = r[key]
        per_hit = f"{med_ms(p['samples']):.2f}" if p["samples"] else "no stop"
        lines.append(f"| {name} | {rate(p):.0f} | {rate(p) / b:.2f}x | {per_hit} |")
    lines += ["", "| one exchange with the stopped stub | median (ms) |", "|---|---:|"]
    lines += [f"| {name} | {sec * 1000:.3f} |" for name, sec in r["rtt"].items()]
    hit_ms = [c.seconds for c in r["at_hit"]]
    lines += [
        "",
        "Host time per hit: from the stop reply to the `c` that resumes the guest (the guest is",
        "stopped for at least that long; QEMU's own stop/resume and retranslation come on top).",
        f"The guest alone ran {r['free']:.0f} getpriority()/s (guest time); with the plugin "
        f"counting it ran {r['plugin']['guest_rate']:.0f}/s, every call counted.",
        "",
        "| forced call of get_max_files() | n | median (ms) | p90 (ms) |",
        "|---|---:|---:|---:|",
        f"| at a monitored hit (save, frame, run, return, restore) | {len(hit_ms)} | "
        f"{med_ms(hit_ms):.2f} | {_p90(hit_ms) * 1000:.2f} |",
        f"| API trigger: wait for the schedule() safe point, then call | {len(r['api'])} | "
        f"{med_ms(r['api']):.2f} | {_p90(r['api']) * 1000:.2f} |",
        "",
        "Anchors (issue 8): VMI breakpoint hits cost ~15-80 us on hardware virtualization; an",
        "injected kernel module run ~3 ms; a plain stop-read-resume loop over this gdbstub ~6 ms.",
        "",
        "Where the time goes: a hit's cycle is the host's handling (the column above) plus",
        "QEMU stopping and restarting the vCPU and retranslating code, which dominates. The",
        "Monitor cuts what the host can cut: registers, code bytes and pt_regs in two exchanges",
        "(the second pipelined), no breakpoint removal/re-insertion per hit (each one makes QEMU",
        "drop its translated code), the ftrace NOP skipped by a rip write sent with the `c`",
        "instead of a single step (a second full stop), and no acks while the guest runs. Past",
        "that only not stopping helps: for count-only registrations the TCG plugin counts",
        "every execution inline, at the guest's own pace. Figures move a lot with the load",
        "of the shared 2-core host (see the load average above); compare rows of one run.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


def _p90(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


def _host() -> str:
    import platform

    return f"{os.cpu_count()} CPUs, Linux {platform.release()}"


if __name__ == "__main__":
    main()
