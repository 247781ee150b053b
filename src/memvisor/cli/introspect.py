"""``memvisor monitor`` (C5) and ``memvisor inject`` (C6): watch and drive guest kernel code
through the VM's gdbstub, with no guest software involved.

    memvisor monitor VM --symbol __x64_sys_getpriority --count 10 --json
    memvisor inject VM --call get_max_files --json

``VM`` is a VM name (its gdbstub is ``<state>/vms/VM/gdb.sock``) or a VM directory; or give
``--gdb-socket PATH``. Symbols come from the guest kernel image (``--kernel``, default the
guest kernel memvisor boots), cached under ``<state>/cache``. Ending the command (also with
Ctrl-C or an error) detaches, which removes every breakpoint and resumes the VM.

``monitor`` also records each hit in the state directory's record (``<state>/memvisor.db``,
the daemon's store), so ``/api/v1/hits`` and the dashboard show them; ``--no-record`` does not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

from memvisor.errors import InputError
from memvisor.introspect.hitlog import HitRecorder
from memvisor.introspect.inject import ForcedCode, Injector, parse_arguments
from memvisor.introspect.monitor import DEFAULT_MAX_RATE, Hit, Monitor, argument_filter
from memvisor.introspect.monitor import detect_accelerator as _detect
from memvisor.introspect.rsp import GdbClient
from memvisor.introspect.symbols import KernelSymbols, find_kaslr_slide, load_symbols
from memvisor.statedir import resolve_state_dir
from memvisor.store import Store


def vm_directory(args: argparse.Namespace) -> Path:
    """The VM's directory: a path given as VM, else ``<state>/vms/NAME`` (the QEMU host's
    layout, see memvisor.backends.qemu.vmrecord)."""
    given = Path(args.vm)
    return given if given.is_dir() else resolve_state_dir(args.state) / "vms" / args.vm


def gdb_socket_path(args: argparse.Namespace) -> Path:
    """``--gdb-socket``, else ``gdb.sock`` in the VM's directory."""
    path = Path(args.gdb_socket) if args.gdb_socket else vm_directory(args) / "gdb.sock"
    if not path.is_socket():
        raise InputError(f"VM {args.vm!r}: no gdbstub socket at {path} (is the VM running?)")
    return path


def kernel_image(args: argparse.Namespace) -> Path:
    """``--kernel``, else the kernel in the VM's record (vm.json), else the default guest
    kernel."""
    if args.kernel:
        return Path(args.kernel)
    record = vm_directory(args) / "vm.json"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        kernel = json.loads(record.read_text()).get("kernel")
        if isinstance(kernel, str) and kernel and Path(kernel).is_file():
            return Path(kernel)
    from memvisor.guestimage import find_kernel_tree

    return find_kernel_tree().vmlinuz


def vm_name(args: argparse.Namespace) -> str:
    """The name hits are recorded under: the VM's record name for a VM directory, else VM."""
    given = Path(args.vm)
    if given.is_dir():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            name = json.loads((given / "vm.json").read_text()).get("name")
            if isinstance(name, str) and name:
                return name
        return given.resolve().name
    return str(args.vm)


def _detach_on_sigterm() -> None:
    """SIGTERM would end the process without running ``finally``; the VM would stay paused
    (QEMU keeps a VM paused when its gdb client vanishes). Turn it into a clean exit."""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        signal.signal(signal.SIGTERM, leave)


def open_monitor(args: argparse.Namespace) -> Monitor:
    _detach_on_sigterm()
    socket_path = gdb_socket_path(args)  # checked first: bad input fails fast
    syms: KernelSymbols = load_symbols(kernel_image(args), resolve_state_dir(args.state) / "cache")
    client = GdbClient.connect_unix(str(socket_path), timeout=args.timeout)
    try:
        find_kaslr_slide(client, syms)
        return Monitor(client, syms, accel=_detect(client))
    except BaseException:
        client.close()
        raise


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("vm", metavar="VM", help="VM name or VM directory")
    p.add_argument("--gdb-socket", metavar="PATH", help="the VM's gdbstub unix socket")
    p.add_argument("--kernel", metavar="PATH", help="guest kernel image (vmlinuz) for symbols")
    p.add_argument("--timeout", type=float, default=5.0, help="gdbstub reply timeout (s)")
    p.add_argument("--json", action="store_true", help="JSON output")


def register(sub: Any) -> None:
    mon = sub.add_parser("monitor", help="stream hits of a guest kernel function (C5)")
    _add_common(mon)
    mon.add_argument("--symbol", required=True, help="kernel symbol to monitor")
    mon.add_argument("--count", type=int, default=None, help="stop after N hits")
    mon.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    mon.add_argument(
        "--arg", action="append", default=[], metavar="I=V", help="only hits with argument I == V"
    )
    mon.add_argument(
        "--syscall-arg", action="append", default=[], metavar="I=V",
        help="only hits whose syscall argument I == V (__x64_sys_* handlers)",
    )  # fmt: skip
    mon.add_argument(
        "--max-rate", type=float, default=DEFAULT_MAX_RATE,
        help="hits/s before the breakpoint is suspended for a second (overload protection)",
    )  # fmt: skip
    mon.add_argument(
        "--no-record", action="store_true",
        help="do not record hits in the state directory's record (daemon API and dashboard)",
    )  # fmt: skip
    mon.set_defaults(func=cmd_monitor)

    inj = sub.add_parser("inject", help="force a guest kernel function call and print rax (C6)")
    _add_common(inj)
    what = inj.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--call", nargs="+", metavar="SYMBOL [ARG]",
        help="kernel function to call, then up to 6 integer arguments (SysV ABI)",
    )  # fmt: skip
    what.add_argument(
        "--snippet", nargs="+", metavar="HEX [ARG]",
        help="machine code to run (must end with ret), then up to 6 integer arguments",
    )  # fmt: skip
    inj.add_argument("--at", default="schedule", help="safe-point symbol to run at")
    inj.add_argument("--wait", type=float, default=30.0, help="max wait for a safe point (s)")
    inj.set_defaults(func=cmd_inject)


def _filters(specs: list[str], *, syscall: bool) -> list[Any]:
    out = []
    for spec in specs:
        index, _sep, value = spec.partition("=")
        try:
            out.append(argument_filter(int(index), int(value, 0), syscall=syscall))
        except ValueError:
            raise InputError(f"filter {spec!r}: expected INDEX=VALUE, e.g. 0=0x10") from None
    return out


def _print_hit(hit: Hit, as_json: bool) -> None:
    if as_json:
        print(json.dumps(hit.to_json()), flush=True)
        return
    args = ", ".join(f"{a:#x}" for a in (hit.syscall_arguments or hit.arguments))
    kind = "syscall args" if hit.syscall_arguments is not None else "args"
    print(f"#{hit.seq} vcpu{hit.vcpu} {hit.location}: {kind} ({args})", flush=True)


def cmd_monitor(args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        raise InputError(f"--count {args.count}: must be >= 1")
    filters = _filters(args.arg, syscall=False) + _filters(args.syscall_arg, syscall=True)
    monitor = open_monitor(args)
    recorder = None
    try:
        if not args.no_record:
            recorder = HitRecorder(Store.open(resolve_state_dir(args.state)), vm_name(args))
        reg = monitor.watch_symbol(
            args.symbol,
            hit_filter=(lambda h: all(f(h) for f in filters)) if filters else None,
            max_rate=args.max_rate,
        )
        monitor.run(
            duration=args.duration,
            until=(lambda: reg.hits >= args.count) if args.count else None,
            on_hit=lambda h: _on_hit(h, args.json, recorder),
        )
    except KeyboardInterrupt:
        pass
    finally:
        monitor.client.close()  # the guest runs again before we wait for the store
    summary: dict[str, Any] = reg.stats() if "reg" in locals() else {}
    if recorder is not None:
        summary["record"] = recorder.close()
    print(json.dumps({"summary": summary}) if args.json else f"summary: {summary}",
          file=sys.stdout if args.json else sys.stderr)  # fmt: skip
    return 0


def _on_hit(hit: Hit, as_json: bool, recorder: HitRecorder | None) -> None:
    if recorder is not None:
        recorder(hit)
    _print_hit(hit, as_json)


def cmd_inject(args: argparse.Namespace) -> int:
    what, *texts = args.call or args.snippet
    arguments = parse_arguments(texts)
    monitor = open_monitor(args)
    try:
        injector = Injector(monitor, timeout=args.timeout, safe_point=args.at)
        code: ForcedCode
        if args.call:
            code = injector.function(what, *arguments)
        else:
            try:
                raw = bytes.fromhex(what)
            except ValueError:
                raise InputError(f"--snippet {what!r}: not hex bytes") from None
            code = injector.snippet("snippet", raw, *arguments)
        result = injector.call_now(code, wait=args.wait)
    finally:
        monitor.client.close()
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(f"{result.name} returned {result.value:#x} ({result.to_json()['value_signed']}) "
              f"on vcpu{result.vcpu} in {result.seconds * 1000:.2f} ms")  # fmt: skip
    return 0
