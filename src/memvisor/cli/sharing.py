"""``memvisor sharing``: the share-aware reclamation metric (C1) of processes, and their ranking.

memvisor sharing --pid P [--pid P ...] [--samples K] [--seed S]
                 [--stat harmonic|geometric|arithmetic|median] [--full] [--all-mappings]
                 [--json]
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from memvisor.errors import InputError
from memvisor.sharing import (
    SharingStats,
    Statistic,
    rank_for_reclamation,
    sample_process,
)

DEFAULT_SAMPLES = 10_000


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sharing",
        help="how much host memory reclaiming each process's pages would free (C1)",
        description=(
            "Sample pages of each process, read how many mappings share each host page "
            "(/proc/kpagecount, KSM, zero page) and rank the processes for reclamation: the "
            "one where a reclaimed page frees the most comes first. Needs root."
        ),
    )
    p.add_argument(
        "--pid", type=int, action="append", required=True, help="process to measure (repeat)"
    )
    p.add_argument(
        "--samples",
        type=int,
        default=DEFAULT_SAMPLES,
        metavar="K",
        help=f"pages to sample per process (default {DEFAULT_SAMPLES})",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (reported either way)")
    p.add_argument(
        "--stat",
        choices=[s.value for s in Statistic],
        default=Statistic.HARMONIC.value,
        help="statistic to rank by (default harmonic: expected memory freed per page)",
    )
    p.add_argument("--full", action="store_true", help="scan every page instead of sampling")
    p.add_argument(
        "--all-mappings",
        action="store_true",
        help="sample every mapping (default: private writable and anonymous mappings)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_sharing)


def _check_args(args: argparse.Namespace) -> None:
    if args.samples <= 0:
        raise InputError(f"--samples: expected a positive number of pages, got {args.samples}")
    if args.seed is not None and args.seed < 0:
        raise InputError(f"--seed: expected a non-negative integer, got {args.seed}")
    seen: set[int] = set()
    for pid in args.pid:
        if pid <= 0:
            raise InputError(f"--pid: expected a positive process id, got {pid}")
        if pid in seen:
            raise InputError(f"--pid: {pid} is given twice")
        seen.add(pid)


def run_sharing(args: argparse.Namespace) -> int:
    _check_args(args)
    stats = {
        pid: sample_process(
            pid,
            samples=args.samples,
            seed=args.seed,
            all_mappings=args.all_mappings,
            full=args.full,
        )
        for pid in args.pid
    }
    ranking = rank_for_reclamation({pid: s.to_model() for pid, s in stats.items()}, args.stat)
    if args.json:
        doc = {
            "contexts": [stats[pid].to_json() for pid in args.pid],
            "ranking": [entry.key for entry in ranking],
            "stat": args.stat,
        }
        print(json.dumps(doc, indent=2))
        return 0
    _print_table([stats[e.key] for e in ranking], args.stat)
    return 0


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, fmt)


def _freed(stats: SharingStats) -> str:
    iv = stats.ci95.expected_freed_per_page
    ci = "" if iv is None or iv.low == iv.high else f" ({iv.low:.3f}-{iv.high:.3f})"
    return f"{stats.expected_freed_per_page:.3f}{ci}"


COLUMNS = ("#", "pid", "sampled", "present", "swap", "harm", "geom", "arith", "med")
COLUMNS_TAIL = ("shared", "KSM", "zero", "freed/page (95% CI)")


def _print_table(ordered: list[SharingStats], stat: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Sharing, ranked by {stat} mean: reclaim from the top first")
    for col in COLUMNS + COLUMNS_TAIL:
        table.add_column(col, justify="right", no_wrap=True)
    for rank, s in enumerate(ordered, 1):
        table.add_row(
            str(rank),
            str(s.pid),
            f"{s.sampled}{'*' if s.full_scan else ''}",
            str(s.present),
            str(s.swapped),
            _num(s.mean_harmonic),
            _num(s.mean_geometric),
            _num(s.mean_arithmetic),
            _num(s.median, ".1f"),
            f"{s.shared_fraction:.0%}",
            f"{s.ksm_fraction:.0%}",
            f"{s.zero_fraction:.0%}",
            _freed(s),
        )
    console = Console(width=max(Console().width, 120))
    console.print(table)
    if any(s.full_scan for s in ordered):
        console.print("* every page scanned: exact values")
    for s in ordered:
        for warning in s.warnings:
            console.print(f"[yellow]pid {s.pid}: {warning}[/yellow]")
