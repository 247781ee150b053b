"""Benchmark of the sharing sampler (C1): sampled pages/s and full-scan MiB/s on one core.

Beside memvisor's batched sampler (numpy, sorted and coalesced preads) the same run measures
the naive method — one 8-byte pread per page per file (pagemap, then kpagecount and
kpageflags for present pages) — on the same pages, and checks both read the same values.

Contexts: a helper process maps 1 GiB of anonymous memory and fills it: "shared" forks a child
(every page shared by 2 mappings), with 4 KiB pages and with transparent huge pages (like
QEMU's guest RAM); "private" does not fork (pagemap's exclusive bit then saves the kpagecount
reads). Needs root. Run: ``.venv/bin/python bench/bench_sharing.py``; it prints a
table and writes bench/results/sharing.md. Target: at least 200,000 sampled pages/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from memvisor.sharing import Context, compute_stats
from memvisor.sharing.procfs import (
    FRAME_MAX_GAP,
    KPF_ANON,
    KPF_KSM,
    KPF_ZERO_PAGE,
    PAGEMAP_MAX_GAP,
    PAGEMAP_PRESENT,
    U64Array,
    read_entries,
)
from memvisor.sharing.sampler import FrameFiles
from memvisor.units import MiB

RESULTS = Path(__file__).resolve().parent / "results" / "sharing.md"

HELPER = r"""
import ctypes, json, mmap, os, sys
size, huge, fork = int(sys.argv[1]), sys.argv[2] == "thp", sys.argv[3] == "shared"
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
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


def batched_read(
    ctx_pid: int, vpns: U64Array, pm_gap: int, frame_gap: int
) -> tuple[U64Array, U64Array, U64Array]:
    """The sampler's read path with chosen coalescing gaps (0: a pread per distinct entry)."""
    pm = os.open(f"/proc/{ctx_pid}/pagemap", os.O_RDONLY)
    frames = FrameFiles()
    try:
        entries = read_entries(pm, vpns, pm_gap)
        present = (entries & np.uint64(PAGEMAP_PRESENT)) != 0
        counts = np.zeros(entries.size, dtype=np.uint64)
        flags = np.zeros(entries.size, dtype=np.uint64)
        counts[present], flags[present] = frames.read(entries[present], max_gap=frame_gap)
    finally:
        os.close(pm)
        frames.close()
    return entries, counts, flags


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


USED_FLAGS = np.uint64((1 << KPF_KSM) | (1 << KPF_ZERO_PAGE) | (1 << KPF_ANON))


def same_values(a: tuple[U64Array, ...], b: tuple[U64Array, ...]) -> bool:
    """Entries, counts and the flags the metric uses agree (LRU/referenced bits move)."""
    return (
        np.array_equal(a[0], b[0])
        and np.array_equal(a[1], b[1])
        and np.array_equal(a[2] & USED_FLAGS, b[2] & USED_FLAGS)
    )


def bench_layout(
    pages: str, sharing: str, size: int, ks: list[int], repeats: int
) -> list[dict[str, object]]:
    layout = f"{pages} {sharing}"
    proc, addr, length = start_helper(size, pages, sharing)
    rows: list[dict[str, object]] = []
    try:
        with Context.open_range(proc.pid, addr, length) as ctx:
            for k in ks:
                rows.append(bench_sample(ctx, proc.pid, layout, k, repeats))
            rows.append(bench_scan(ctx, proc.pid, layout, length, 3))
    finally:
        proc.kill()
        proc.wait()
    return rows


def bench_sample(ctx: Context, pid: int, layout: str, k: int, repeats: int) -> dict[str, object]:
    sample = ctx.sample(k, seed=1)
    vpns = ctx.vpns_of(np.sort(np.random.default_rng(1).choice(ctx.total_pages, k, False)))
    naive = naive_read(pid, vpns)
    batched = batched_read(pid, vpns, PAGEMAP_MAX_GAP, FRAME_MAX_GAP)
    agree = same_values(naive, batched)
    t = interleaved_medians(
        {
            "sampler": lambda: compute_stats(ctx.sample(k, seed=1)),
            "batched_reads": lambda: batched_read(pid, vpns, PAGEMAP_MAX_GAP, FRAME_MAX_GAP),
            "no_coalescing": lambda: batched_read(pid, vpns, 0, 0),
            "naive": lambda: naive_read(pid, vpns),
        },
        repeats,
    )
    row: dict[str, object] = {"layout": layout, "what": f"sample K={k:,}", "pages": k}
    row.update({name: k / seconds for name, seconds in t.items()})
    row["agree"] = agree and sample.sampled == k
    return row


def bench_scan(ctx: Context, pid: int, layout: str, length: int, repeats: int) -> dict[str, object]:
    all_vpns = ctx.vpns_of(np.arange(ctx.total_pages, dtype=np.uint64))
    t = interleaved_medians(
        {"scan": lambda: compute_stats(ctx.scan()), "naive": lambda: naive_read(pid, all_vpns)},
        repeats,
    )
    t_scan, t_naive = t["scan"], t["naive"]
    full = ctx.scan()
    return {
        "layout": layout,
        "what": f"full scan {length // MiB} MiB",
        "pages": ctx.total_pages,
        "sampler": ctx.total_pages / t_scan,
        "batched_reads": None,
        "no_coalescing": None,
        "naive": ctx.total_pages / t_naive,
        "agree": full.sampled == ctx.total_pages,
        "scan_mib_s": length / MiB / t_scan,
        "naive_mib_s": length / MiB / t_naive,
    }


def fmt(x: object) -> str:
    return "-" if x is None else f"{x:,.0f}" if isinstance(x, float) else str(x)


def render(rows: list[dict[str, object]], header: str) -> str:
    lines = [
        header,
        "",
        "| layout | what | sampler + metric pages/s | batched reads pages/s "
        "| batched, no coalescing | naive pages/s | speed-up vs naive | same values |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        speedup = float(r["sampler"]) / float(r["naive"])  # type: ignore[arg-type]
        lines.append(
            f"| {r['layout']} | {r['what']} | {fmt(r['sampler'])} | {fmt(r['batched_reads'])} "
            f"| {fmt(r['no_coalescing'])} | {fmt(r['naive'])} | {speedup:.1f}x "
            f"| {'yes' if r['agree'] else 'NO'} |"
        )
    lines.append("")
    for r in rows:
        if "scan_mib_s" in r:
            lines.append(
                f"- full scan, {r['layout']}: {fmt(r['scan_mib_s'])} MiB/s "
                f"(naive one-pread-per-page: {fmt(r['naive_mib_s'])} MiB/s)"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--cpu", type=int, default=0, help="core to pin to")
    args = parser.parse_args()
    if not os.access("/proc/kpagecount", os.R_OK):
        print("bench_sharing: needs root (/proc/kpagecount unreadable)", file=sys.stderr)
        return 4
    os.sched_setaffinity(0, {args.cpu})
    ks = [1_000, 10_000, 100_000]
    rows: list[dict[str, object]] = []
    for pages, sharing in (("4k", "shared"), ("thp", "shared"), ("4k", "private")):
        rows += bench_layout(pages, sharing, args.size_mib * MiB, ks, args.repeats)
    header = (
        f"# Sharing sampler benchmark (C1)\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f", kernel {os.uname().release}, one core (pinned to cpu {args.cpu}), context "
        f"{args.size_mib} MiB of anonymous memory (shared: with a forked child); medians of "
        f"{args.repeats} runs (full scans: 3) of CPU time (user + system), methods "
        f"interleaved; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the "
        "start. Target: >= 200,000 sampled pages/s. Columns: the full sampler "
        "(draw, pagemap, kpagecount, kpageflags, liveness check, metric); its read path alone; "
        "the read path without coalescing; the naive one-pread-per-page-per-file method."
    )
    text = render(rows, header)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(f"written {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
