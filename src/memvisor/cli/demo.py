"""``memvisor demo``: the main job (see :mod:`memvisor.demo`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TypeAlias

from memvisor.demo import DemoOptions, run_demo
from memvisor.statedir import resolve_state_dir

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Sub) -> None:
    p = sub.add_parser(
        "demo", help="three guests overcommitted on a budget; memvisor reclaiming, live"
    )
    p.add_argument(
        "--backend",
        choices=("qemu", "sim"),
        default="qemu",
        help="qemu: three real guests under TCG (needs QEMU, the guest kernel and root); "
        "sim: the same host on the simulator (default qemu)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=120.0,
        help="seconds the daemon runs after the guests are up, then the report is written "
        "(default 120; Ctrl-C ends it early)",
    )
    p.add_argument(
        "--report",
        type=Path,
        default=Path("memvisor-demo.html"),
        help="where to write the HTML report with plots and the summary table "
        "(default memvisor-demo.html)",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:8765",
        metavar="HOST:PORT",
        help="address of the dashboard and HTTP API while the demo runs (default 127.0.0.1:8765)",
    )
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.duration <= 0:
        from memvisor.errors import InputError

        raise InputError(f"--duration {args.duration}: must be positive")
    state_dir = resolve_state_dir(args.state)
    options = DemoOptions(
        backend=args.backend,
        duration=args.duration,
        report=args.report,
        listen=args.listen,
        live=sys.stdout.isatty(),
    )
    return run_demo(state_dir, options)
