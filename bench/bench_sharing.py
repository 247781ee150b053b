"""Benchmark of the sharing sampler (C1): sampled pages/s and full-scan MiB/s on one core.

Beside memvisor's sampler the same run measures the naive method — one 8-byte pread per page
per file (pagemap, then kpagecount and kpageflags for present pages) — on the same pages, and
checks that the metric computed from the naive reads is identical to the sampler's.

Contexts: a helper process maps 1 GiB of anonymous memory and fills it: "shared" forks a child
(every page shared by 2 mappings), with 4 KiB pages and with transparent huge pages; "private"
does not fork (pagemap's exclusive bit then saves the kpagecount reads, and the kpageflags
reads too as no area of the process is KSM-mergeable); "mergeable" is private memory marked
MADV_MERGEABLE, like QEMU's guest RAM with mem-merge=on (flags must be read for KSM pages).
The sampler is measured as a control loop uses it (a Context kept open across ticks) and as
one call of ``sample_guest_ram`` (which opens the context: pagemap, maps, kpage files).
With ``--baseline REV`` the sampler of an earlier commit (its ``memvisor/sharing`` modules,
loaded from git under another package name) is measured in the same run, interleaved, and its
metric checked equal. Needs root. Run: ``.venv/bin/python bench/bench_sharing.py [--baseline
REV]``; it prints a table and writes bench/results/sharing.md. Target: at least 200,000
sampled pages/s.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from memvisor.sharing import Context, PageSample, SharingStats, compute_stats, sample_guest_ram
from memvisor.sharing.procfs import PAGEMAP_PRESENT, PAGEMAP_SWAPPED, U64Array
from memvisor.units import PAGE_SIZE, MiB

RESULTS = Path(__file__).resolve().parent / "results" / "sharing.md"
ROOT = Path(__file__).resolve().parent.parent

HELPER = r"""
import ctypes, json, mmap, os, sys
size, huge, fork = int(sys.argv[1]), sys.argv[2] == "thp", sys.argv[3] == "shared"
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
if sys.argv[3] == "mergeable":
    m.madvise(mmap.MADV_MERGEABLE)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
for off in range(0, size, 4096):
    m[off:off + 8] = off.to_bytes(8, "little")
r, w = os.pipe()
if fork and os.fork() == 0:
    os.close(w); os.read(r, 1); os._exit(0)
print(json.dumps({"addr": addr, "size": size}), flush=True)
sys.stdin.read()
"""


def start_helper(size: int, pages: str, sharing: str) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HELPER, str(size), pages, sharing],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    return proc, info["addr"], info["size"]


def naive_read(pid: int, vpns: U64Array) -> tuple[U64Array, U64Array, U64Array]:
    """The baseline: one pread per page per file, in the order given."""
    pm = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    kc = os.open("/proc/kpagecount", os.O_RDONLY)
    kf = os.open("/proc/kpageflags", os.O_RDONLY)
    n = vpns.size
    entries, counts, flags = (np.zeros(n, dtype=np.uint64) for _ in range(3))
    try:
        for i, vpn in enumerate(vpns.tolist()):
            e = int.from_bytes(os.pread(pm, 8, vpn * 8), "little")
            entries[i] = e
            if e & PAGEMAP_PRESENT:
                pfn = e & ((1 << 55) - 1)
                counts[i] = int.from_bytes(os.pread(kc, 8, pfn * 8), "little")
                flags[i] = int.from_bytes(os.pread(kf, 8, pfn * 8), "little")
    finally:
        for fd in (pm, kc, kf):
            os.close(fd)
    return entries, counts, flags


def naive_stats(ctx: Context, vpns: U64Array, sampled: int, seed: int | None) -> SharingStats:
    """The metric computed from the naive method's reads of the same pages."""
    entries, counts, flags = naive_read(ctx.pid, vpns)
    kept = (entries & np.uint64(PAGEMAP_PRESENT | PAGEMAP_SWAPPED)) != 0
    sample = PageSample(
        label=ctx.label,
        context_pages=ctx.total_pages,
        sampled=sampled,
        vpns=vpns[kept],
        entries=entries[kept],
        counts=counts[kept],
        flags=flags[kept],
        pid=ctx.pid,
        full_scan=sampled >= ctx.total_pages,
        seed=seed,
    )
    return compute_stats(sample)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median CPU seconds (user + system, this process) of each function, run in turns.

    CPU time, not wall time: the machine is shared, and time spent waiting for a core is not
    the sampler's cost. "Pages/s on one core" is pages per CPU-second."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


class Baseline:
    """The sampler of an earlier commit, importable beside the current one."""

    def __init__(self, rev: str) -> None:
        self.rev = rev
        self.dir = Path(tempfile.mkdtemp(prefix="bench_sharing_baseline_"))
        package = self.dir / "sharing_baseline"
        package.mkdir()
        (package / "__init__.py").write_text("")
        for name in ("procfs", "metric", "sampler"):
            text = subprocess.run(
                ["git", "show", f"{rev}:src/memvisor/sharing/{name}.py"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            (package / f"{name}.py").write_text(
                text.replace("memvisor.sharing.", "sharing_baseline.")
            )
        sys.path.insert(0, str(self.dir))
        self.sampler: Any = importlib.import_module("sharing_baseline.sampler")
        self.metric: Any = importlib.import_module("sharing_baseline.metric")

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def bench_layout(
    pages: str, sharing: str, size: int, ks: list[int], repeats: int, baseline: Baseline | None
) -> list[dict[str, object]]:
    layout = f"{pages} {sharing}"
    proc, addr, length = start_helper(size, pages, sharing)
    rows: list[dict[str, object]] = []
    try:
        with Context.open_range(proc.pid, addr, length) as ctx:
            for k in ks:
                rows.append(bench_sample(ctx, addr, length, layout, k, repeats, baseline))
            rows.append(bench_scan(ctx, layout, length, 3))
    finally:
        proc.kill()
        proc.wait()
    return rows


def bench_sample(
    ctx: Context,
    addr: int,
    length: int,
    layout: str,
    k: int,
    repeats: int,
    baseline: Baseline | None,
) -> dict[str, object]:
    pid = ctx.pid
    vpns = ctx.vpns_of(np.sort(np.random.default_rng(1).choice(ctx.total_pages, k, False)))
    # The same pages, read both ways, must give the same metric (the helper's memory is still).
    result = ctx.measure(k, seed=1).to_json()
    agree = result == naive_stats(ctx, vpns, k, 1).to_json()
    fns: dict[str, Callable[[], object]] = {
        "sampler": lambda: ctx.measure(k, seed=1),
        "sample_only": lambda: ctx.sample(k, seed=1),
        "per_call": lambda: sample_guest_ram(pid, addr, length, samples=k, seed=1),
        "naive": lambda: naive_read(pid, vpns),
    }
    old_ctx = None
    if baseline is not None:
        old_ctx = baseline.sampler.Context.open_range(pid, addr, length)
        compute = baseline.metric.compute_stats
        agree = agree and compute(old_ctx.sample(k, seed=1)).to_json() == result
        fns["baseline"] = lambda: compute(old_ctx.sample(k, seed=1))
        fns["baseline_per_call"] = lambda: baseline.sampler.sample_guest_ram(
            pid, addr, length, samples=k, seed=1
        )
    try:
        t = interleaved_medians(fns, repeats)
    finally:
        if old_ctx is not None:
            old_ctx.close()
    row: dict[str, object] = {"layout": layout, "what": f"sample K={k:,}", "pages": k}
    row.update({name: k / seconds for name, seconds in t.items()})
    row["agree"] = agree
    return row


def bench_scan(ctx: Context, layout: str, length: int, repeats: int) -> dict[str, object]:
    all_vpns = ctx.vpns_of(np.arange(ctx.total_pages, dtype=np.uint64))
    t = interleaved_medians(
        {"scan": lambda: ctx.measure(full=True), "naive": lambda: naive_read(ctx.pid, all_vpns)},
        repeats,
    )
    t_scan, t_naive = t["scan"], t["naive"]
    naive = naive_stats(ctx, all_vpns, ctx.total_pages, None)
    return {
        "layout": layout,
        "what": f"full scan {length // MiB} MiB",
        "pages": ctx.total_pages,
        "sampler": ctx.total_pages / t_scan,
        "sample_only": None,
        "per_call": None,
        "naive": ctx.total_pages / t_naive,
        "agree": ctx.measure(full=True).to_json() == naive.to_json(),
        "scan_mib_s": length / MiB / t_scan,
        "naive_mib_s": length / MiB / t_naive,
    }


def fmt(x: object) -> str:
    return "-" if x is None else f"{x:,.0f}" if isinstance(x, float) else str(x)


def render(rows: list[dict[str, object]], header: str, baseline: Baseline | None) -> str:
    old = baseline is not None
    lines = [
        header,
        "",
        "| layout | what | sampler + metric pages/s | sample only pages/s "
        "| one sample_guest_ram call pages/s | naive reads pages/s | speed-up vs naive "
        + ("| baseline sampler + metric | baseline call | speed-up vs baseline " if old else "")
        + "| same metric |",
        "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if old else "") + "---|",
    ]
    for r in rows:
        speedup = _ratio(r["sampler"], r["naive"])
        cells = [
            str(r["layout"]),
            str(r["what"]),
            fmt(r["sampler"]),
            fmt(r["sample_only"]),
            fmt(r["per_call"]),
            fmt(r["naive"]),
            speedup,
        ]
        if old:
            cells += [
                fmt(r.get("baseline")),
                fmt(r.get("baseline_per_call")),
                _ratio(r["sampler"], r.get("baseline")),
            ]
        cells.append("yes" if r["agree"] else "NO")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in rows:
        if "scan_mib_s" in r:
            lines.append(
                f"- full scan, {r['layout']}: {fmt(r['scan_mib_s'])} MiB/s "
                f"(naive one-pread-per-page: {fmt(r['naive_mib_s'])} MiB/s)"
            )
    return "\n".join(lines) + "\n"


def _ratio(a: object, b: object) -> str:
    if not isinstance(a, float) or not isinstance(b, float):
        return "-"
    return f"{a / b:.2f}x"


LAYOUTS = (("4k", "shared"), ("thp", "shared"), ("4k", "private"), ("thp", "mergeable"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--cpu", type=int, default=0, help="core to pin to")
    parser.add_argument(
        "--baseline", metavar="REV", help="also measure the sampler of this git revision"
    )
    args = parser.parse_args()
    if not os.access("/proc/kpagecount", os.R_OK):
        print("bench_sharing: needs root (/proc/kpagecount unreadable)", file=sys.stderr)
        return 4
    os.sched_setaffinity(0, {args.cpu})
    load = os.getloadavg()[0]
    pages_in_context = args.size_mib * MiB // PAGE_SIZE
    ks = [k for k in (1_000, 10_000, 100_000) if k < pages_in_context]
    rows: list[dict[str, object]] = []
    baseline = Baseline(args.baseline) if args.baseline else None
    try:
        for pages, sharing in LAYOUTS:
            size = args.size_mib * MiB
            rows += bench_layout(pages, sharing, size, ks, args.repeats, baseline)
    finally:
        if baseline is not None:
            baseline.close()
    text = render(rows, header(args, load), baseline)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(f"written {RESULTS}")
    return 0


def header(args: argparse.Namespace, load: float) -> str:
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout

    mine = ["src/memvisor/sharing", "bench/bench_sharing.py"]
    rev = git("rev-parse", "--short", "HEAD").strip()
    rev += " (with uncommitted changes)" if git("status", "--porcelain", "--", *mine) else ""
    baseline = (
        f" Baseline: the sampler of commit {args.baseline} (a sample_guest_ram call, and its "
        "Context kept open), measured in the same run."
        if args.baseline
        else ""
    )
    return (
        f"# Sharing sampler benchmark (C1)\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f", commit {rev}, kernel {os.uname().release}, one core (pinned to "
        f"cpu {args.cpu}), context {args.size_mib} MiB of anonymous memory; medians of "
        f"{args.repeats} runs (full scans: 3) of CPU time (user + system), methods "
        f"interleaved; load average {load:.1f} on {os.cpu_count()} cores at the start. "
        "Target: >= 200,000 sampled pages/s. Columns: the sampler as a control loop uses it, "
        "a Context kept open across ticks (draw, pagemap, kpagecount, kpageflags as needed, "
        "liveness check, metric); the same without the metric; one call of sample_guest_ram, "
        "which also opens the context (pagemap, maps, kpage files); the naive "
        "one-pread-per-page-per-file method (reads only). Speed-ups: first column over the "
        f"others.{baseline} Same metric: the metric from the naive reads (and the baseline's) "
        "equals the sampler's, every field."
    )


if __name__ == "__main__":
    sys.exit(main())
