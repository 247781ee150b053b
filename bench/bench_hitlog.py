"""Cost of recording introspection hits into the host's record, as seen by the monitor's stop
path (the guest is stopped while a hit is handled).

Measured in one run on a real SQLite store in a temp state directory:

1. Baseline: ``Store.record_hit`` called synchronously for each hit (one durable transaction
   each): what every stop would pay if hits were written inline.
2. ``HitRecorder``: the call the stop path makes (a queue put), and how fast its writer thread
   drains into the same store (hits/s until ``close`` returns).

Run: ``.venv/bin/python bench/bench_hitlog.py [--hits N]``; prints a table and writes
bench/results/hitlog.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from memvisor.introspect.hitlog import HitRecorder, hit_detail
from memvisor.introspect.monitor import Hit
from memvisor.store import Store

RESULTS = Path(__file__).resolve().parent / "results" / "hitlog.md"
REGISTERS = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12",
    "r13", "r14", "r15", "rip", "eflags", "cs", "ss", "ds", "es", "fs", "gs",
]  # fmt: skip


def make_hit(seq: int) -> Hit:
    regs = {name: 0xFFFFC90000123F00 + i for i, name in enumerate(REGISTERS)}
    return Hit(
        "__x64_sys_getpriority", seq, 1, 0xFFFFFFFF81234560, "__x64_sys_getpriority",
        "nop dword ptr [rax + rax]", (1, 2, 3, 4, 5, 6), (0, seq, 0, 0, 0, 0), regs, time.time(),
    )  # fmt: skip


def inline(state: Path, hits: list[Hit]) -> list[float]:
    store = Store.open(state)
    costs = []
    for hit in hits:
        start = time.perf_counter()
        store.record_hit("vm", hit.registration, hit.address, hit.vcpu, hit_detail(hit))
        costs.append(time.perf_counter() - start)
    return costs


def queued(state: Path, hits: list[Hit]) -> tuple[list[float], float, dict[str, object]]:
    recorder = HitRecorder(Store.open(state), "vm")
    costs = []
    begin = time.perf_counter()
    for hit in hits:
        start = time.perf_counter()
        recorder(hit)
        costs.append(time.perf_counter() - start)
    stats = recorder.close()
    return costs, time.perf_counter() - begin, stats


def p99(values: list[float]) -> float:
    return sorted(values)[int(0.99 * len(values))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=2000)
    args = parser.parse_args()
    hits = [make_hit(i) for i in range(1, args.hits + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        base = inline(Path(tmp) / "a", hits)
        ours, drain, stats = queued(Path(tmp) / "b", hits)
    base_med, ours_med = statistics.median(base), statistics.median(ours)
    rows = [
        f"# Recording {args.hits} introspection hits (SQLite WAL, synchronous=FULL)",
        "",
        "| path | per hit on the stop path, median | p99 | writer drain |",
        "|---|---|---|---|",
        f"| inline Store.record_hit (baseline) | {base_med * 1e6:.0f} us "
        f"| {p99(base) * 1e6:.0f} us | {len(base) / sum(base):.0f} hits/s |",
        f"| HitRecorder (queue put) | {ours_med * 1e6:.1f} us "
        f"| {p99(ours) * 1e6:.1f} us | {args.hits / drain:.0f} hits/s |",
        "",
        f"stop-path cost ratio baseline/ours: {base_med / ours_med:.0f}x (medians); recorder: "
        f"{stats['recorded']} recorded, {stats['dropped']} dropped",
        "",
    ]
    text = "\n".join(rows)
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
