"""``memvisor qemu``: run real VMs without the daemon (lifecycle, probes, actions by hand).

Power-on goes through admission control when the state directory holds a pool tree
(``memvisor host init``; the VM defined with ``memvisor vm add``): its memory and reservation
come from the tree. Without one, ``--memory`` is required and nothing is admitted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from memvisor.backends.qemu import accel
from memvisor.backends.qemu.host import QemuHost
from memvisor.errors import InputError
from memvisor.model import Backing, SetBalloon, SetSwapTarget, VMSpec
from memvisor.statedir import resolve_state_dir
from memvisor.units import format_size, parse_size


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("qemu", help="real QEMU VMs by hand (start, stop, observe)")
    sub = parser.add_subparsers(dest="qemu_command", metavar="ACTION", required=True)
    p = sub.add_parser("accel", help="probe KVM speed and say which accelerator would be used")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_accel)
    p = sub.add_parser("list", help="VM records, live observations and orphans")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("start", help="power a VM on (admission when a pool tree exists)")
    p.add_argument("name")
    p.add_argument("--memory", help="guest RAM, e.g. 512MiB (from the pool tree if defined)")
    p.add_argument("--reservation", help="kept resident, never swapped out")
    p.add_argument("--backing", choices=[b.value for b in Backing], default=Backing.FILE.value)
    p.add_argument("--accel", choices=["tcg", "kvm"], help="override the KVM speed probe")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_start)
    p = sub.add_parser("stop", help="power a VM off (removes its swap file)")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser("balloon", help="set the balloon target (bytes the balloon holds)")
    p.add_argument("name")
    p.add_argument("target")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_balloon)
    p = sub.add_parser("swap-out", help="keep at most LIMIT of guest RAM resident (file backing)")
    p.add_argument("name")
    p.add_argument("limit")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_swap_out)


@contextlib.contextmanager
def _host(args: argparse.Namespace, **kw: Any) -> Iterator[QemuHost]:
    host = QemuHost(resolve_state_dir(args.state), **kw)
    try:
        yield host
    finally:
        host.close()


def _print(args: argparse.Namespace, data: dict[str, Any], text: str) -> int:
    print(json.dumps(data, indent=2, default=str) if args.json else text)
    return 0


def cmd_accel(args: argparse.Namespace) -> int:
    choice = accel.probe()
    return _print(args, asdict(choice), f"{choice.accel}: {choice.reason}")


def cmd_list(args: argparse.Namespace) -> int:
    with _host(args) as host:
        vms = []
        obs = {o.name: o for o in host.observe_vms()}
        for rec in host.records():
            o = obs.get(rec.spec.name)
            vms.append({"record": rec.to_json(), "observation": asdict(o) if o else None})
        orphans = [asdict(o) for o in host.orphans()]
        lines = [f"{'VM':<16}{'power':<10}{'memory':>10}{'on host':>10}{'swapped':>10}  pid"]
        for rec in host.records():
            o = obs.get(rec.spec.name)
            lines.append(
                f"{rec.spec.name:<16}{rec.power.value:<10}{format_size(rec.spec.memory):>10}"
                f"{format_size(o.consumed if o else 0):>10}{format_size(o.swapped if o else 0):>10}"
                f"  {rec.pid or '-'}"
            )
        lines += [f"event: {e}" for e in host.events]
        lines += [f"orphan: {o['kind']} {o['path']} pid={o['pid']}: {o['detail']}" for o in orphans]
        data = {"vms": vms, "events": host.events, "orphans": orphans}
        return _print(args, data, "\n".join(lines))


def _spec_from_pools(args: argparse.Namespace, backing: Backing) -> tuple[VMSpec, Any]:
    from memvisor.poolstore import PoolStore

    store = PoolStore.in_state_dir(resolve_state_dir(args.state))
    if not store.initialized():
        store.close()
        if args.memory is None:
            raise InputError(f"qemu start {args.name}: --memory is required (no pool tree)")
        reservation = parse_size(args.reservation or 0, what="--reservation")
        memory = parse_size(args.memory, what="--memory")
        return VMSpec(args.name, memory, reservation, backing=backing), None
    with store.read() as tree:
        vm = tree.vm(args.name)
    spec = VMSpec(args.name, vm.memory, vm.reservation, vm.limit_spec, vm.shares, vm.pool,
                  backing)  # fmt: skip
    return spec, store


def cmd_start(args: argparse.Namespace) -> int:
    backing = Backing(args.backing)
    spec, store = _spec_from_pools(args, backing)
    with _host(args, accel=args.accel) as host:
        if store is not None:
            with store.write() as tree:
                tree.power_on(spec.name)  # AdmissionError: refused, nothing changed
        try:
            rec = host.power_on(spec)
        except BaseException:
            if store is not None:
                with store.write() as tree:
                    tree.power_off(spec.name)
            raise
        finally:
            if store is not None:
                store.close()
    text = f"{spec.name}: on, QEMU pid {rec.pid}, accel {rec.accel}"
    return _print(args, rec.to_json(), text)


def cmd_stop(args: argparse.Namespace) -> int:
    with _host(args) as host:
        rec = host.power_off(args.name)
    from memvisor.poolstore import PoolStore

    with PoolStore.in_state_dir(resolve_state_dir(args.state)) as store:
        if store.initialized():
            with store.write() as tree:
                if args.name in tree and tree.vm(args.name).powered_on:
                    tree.power_off(args.name)
    return _print(args, rec.to_json(), f"{args.name}: off, swap file removed")


def cmd_balloon(args: argparse.Namespace) -> int:
    with _host(args) as host:
        result = host.apply(SetBalloon(args.name, parse_size(args.target, what="target")))
    return _print(args, asdict(result), result.message)


def cmd_swap_out(args: argparse.Namespace) -> int:
    with _host(args) as host:
        result = host.apply(SetSwapTarget(args.name, parse_size(args.limit, what="limit")))
    return _print(args, asdict(result), result.message)
