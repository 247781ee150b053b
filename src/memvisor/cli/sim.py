"""``memvisor sim SCENARIO.toml``: run a simulated host and report what happened.

Shows a progress bar while it runs and a summary table at the end; ``--json OUT`` writes the
summary and the time series (per VM and host), ``--report OUT.html`` an HTML report with
plots. ``--json -`` prints the JSON on stdout instead of the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from memvisor.errors import InputError
from memvisor.units import format_size


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sim",
        help="run a scenario on the host simulator",
        description="Run a simulated host (scenario TOML, see docs/simulator.md).",
    )
    p.add_argument("scenario", metavar="SCENARIO.toml")
    p.add_argument("--duration", type=float, metavar="S", help="simulated seconds (override)")
    p.add_argument("--seed", type=int, metavar="N", help="random seed (override)")
    p.add_argument("--policy", metavar="NAME", help="policy name (override [policy] name)")
    p.add_argument(
        "--json", metavar="OUT", help="write summary and time series as JSON ('-': stdout)"
    )
    p.add_argument("--report", metavar="OUT.html", help="write an HTML report with plots")
    p.add_argument("--check", action="store_true", help="check conservation invariants every tick")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from memvisor.backends.sim.scenario import PolicySettings
    from memvisor.sim import load_scenario, simulate

    if args.duration is not None and not args.duration > 0:
        raise InputError(f"--duration must be positive, got {args.duration}")
    if args.seed is not None and args.seed < 0:
        raise InputError(f"--seed must not be negative, got {args.seed}")
    for flag, out in (("--json", args.json), ("--report", args.report)):
        if out and out != "-" and not Path(out).parent.is_dir():
            raise InputError(f"{flag}: directory of {out} does not exist")
    scenario = load_scenario(args.scenario)
    if args.policy and args.policy != scenario.policy.name:
        # the scenario's policy settings belong to the policy it names, not to this one
        scenario = replace(scenario, policy=PolicySettings(name=args.policy))
    to_stdout = args.json == "-"
    result = _run_with_progress(simulate, scenario, args, quiet=to_stdout)
    if args.json:
        text = json.dumps(result.to_json(), separators=(",", ":"))
        if to_stdout:
            print(text)
        else:
            Path(args.json).write_text(text)
    if args.report:
        from memvisor.backends.sim.report import write_report

        write_report(result, args.report)
    if not to_stdout:
        _print_summary(result.summary(), args)
    return 0


def _run_with_progress(simulate: Any, scenario: Any, args: argparse.Namespace, quiet: bool) -> Any:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if quiet:
        return simulate(
            scenario, duration=args.duration, seed=args.seed, check_invariants=args.check
        )
    with Progress(
        TextColumn("[bold]simulating"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} ticks"),
        TimeElapsedColumn(),
        transient=True,
        console=_console(),
    ) as bar:
        task = bar.add_task("sim", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return simulate(
            scenario,
            duration=args.duration,
            seed=args.seed,
            progress=progress,
            check_invariants=args.check,
        )


def _console() -> Any:
    from rich.console import Console

    return Console(file=sys.stderr)


def _print_summary(s: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from memvisor.backends.sim.report import VM_SUMMARY_COLUMNS, vm_summary_row

    table = Table(title=f"{args.scenario}: policy {s['policy']}, {s['simulated_seconds']:.0f} s")
    for col in VM_SUMMARY_COLUMNS:
        table.add_column(col, justify="left" if col == "VM" else "right")
    for v in s["vms"]:
        table.add_row(*vm_summary_row(v))
    console = Console()
    console.print(table)
    console.print(
        f"host {format_size(s['host_total'])}: lowest free {format_size(s['min_free'])}, "
        f"saved by sharing {format_size(s['final_saved_by_sharing'])}, total throughput "
        f"{s['total_throughput']:.0f} touches/s, worst VM {s['worst_relative_throughput']:.1%} "
        f"of its demand; {s['decisions']} decisions; wall {s['wall_seconds']:.1f} s"
    )
    for flag, out in (("json", args.json), ("report", args.report)):
        if out:
            console.print(f"{flag}: {out}")
