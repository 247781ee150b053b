"""The ``memvisor`` command line.

Each command group lives in its own module under ``memvisor.cli`` and exposes
``register(subparsers)``; it attaches its handler with ``set_defaults(func=...)``. A handler
takes the parsed arguments and returns an exit code. Errors derived from
:class:`memvisor.errors.MemvisorError` become a one-line message on stderr (or a JSON object
with ``--json``) and their exit code: 0 ok, 2 bad input or config, 3 refused by admission,
4 missing privileges, 5 backend failure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence

from memvisor import __version__
from memvisor.errors import MemvisorError
from memvisor.statedir import default_state_dir

# Modules that contribute commands, in help order. Each defines register(subparsers).
COMMAND_MODULES: tuple[str, ...] = (
    "memvisor.cli.sharing",
    "memvisor.cli.pools",
    "memvisor.cli.image",
    "memvisor.cli.qemu",
    "memvisor.cli.introspect",
    "memvisor.cli.daemon",  # after pools: adds `vm set-reservation` to its `vm` group
    "memvisor.cli.demo",
    "memvisor.cli.sim",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memvisor",
        description="Memory resource manager for hosts that run many QEMU virtual machines.",
    )
    parser.add_argument("--version", action="version", version=f"memvisor {__version__}")
    parser.add_argument(
        "--state",
        metavar="DIR",
        default=None,
        help=f"state directory (default: $MEMVISOR_STATE or {default_state_dir()})",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        rc = func(args)
    except MemvisorError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
        else:
            print(f"memvisor: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("memvisor: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
