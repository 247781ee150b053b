"""Commands for the pool tree (C3): ``host``, ``pool``, ``vm``, ``tree`` and ``check``.

Every command that changes the tree runs as one SQLite transaction in the state directory
(:mod:`memvisor.poolstore`); a refused one changes nothing and exits 3. ``vm power-on`` and
``power-off`` do admission only (the backends start and stop the guests). ``check`` validates
a host file and dry-runs admission of its VMs marked ``power_on`` without touching any state.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from memvisor.config import dry_run, load_host_file
from memvisor.daemonconfig import describe_daemon
from memvisor.errors import AdmissionError, ConfigError, InputError
from memvisor.pools import KEEP, ROOT, Admission, Keep, PoolTree, PoolView, VMView
from memvisor.poolstore import DB_NAME, PoolStore
from memvisor.statedir import resolve_state_dir
from memvisor.units import format_size, parse_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _register_host(sub)
    _register_pool(sub)
    _register_vm(sub)
    tree = sub.add_parser("tree", help="the whole pool tree with held/unreserved/borrowed")
    _json_flag(tree)
    tree.set_defaults(func=cmd_tree)
    check = sub.add_parser("check", help="validate a host file and dry-run admission")
    check.add_argument("file", metavar="HOST.toml")
    _json_flag(check)
    check.set_defaults(func=cmd_check)


# ----- argument parsing -----------------------------------------------------------------------


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def _register_host(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    host = sub.add_parser("host", help="initialize or show the host (the root pool)")
    hsub = host.add_subparsers(dest="host_command", metavar="ACTION", required=True)
    init = hsub.add_parser("init", help="create the host in the state directory")
    src = init.add_mutually_exclusive_group(required=True)
    src.add_argument("--capacity", metavar="SIZE", help="memory available to VMs, e.g. 4GiB")
    src.add_argument("--from", dest="from_file", metavar="HOST.toml", help="a host file")
    init.add_argument("--force", action="store_true", help="replace an existing host")
    _json_flag(init)
    init.set_defaults(func=cmd_host_init)
    show = hsub.add_parser("show", help="capacity and what is held")
    _json_flag(show)
    show.set_defaults(func=cmd_host_show)


def _register_pool(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pool = sub.add_parser("pool", help="add, change, remove or show a resource pool")
    psub = pool.add_subparsers(dest="pool_command", metavar="ACTION", required=True)
    for action, func in (("add", cmd_pool_add), ("set", cmd_pool_set)):
        p = psub.add_parser(action, help=f"{action} a pool")
        p.add_argument("name", metavar="NAME")
        p.add_argument("--parent", metavar="P", help="parent pool (add: default root; set: move)")
        p.add_argument("--reservation", metavar="S", help="size, e.g. 2GiB")
        p.add_argument("--limit", metavar="S|unlimited", help="reservation + borrowed cap")
        p.add_argument("--shares", metavar="N|low|normal|high", help="163840/327680/655360")
        mode = p.add_mutually_exclusive_group()
        mode.add_argument(
            "--expandable",
            dest="expandable",
            action="store_true",
            default=None,
            help="may borrow from its parent (the default)",
        )
        mode.add_argument("--fixed", dest="expandable", action="store_false", help="never borrows")
        _json_flag(p)
        p.set_defaults(func=func)
    for action, func, text in (
        ("remove", cmd_pool_remove, "remove an empty pool"),
        ("show", cmd_pool_show, "show a pool"),
    ):
        p = psub.add_parser(action, help=text)
        p.add_argument("name", metavar="NAME")
        _json_flag(p)
        p.set_defaults(func=func)


def _register_vm(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vm = sub.add_parser("vm", help="add, change, remove, show, power a VM (admission)")
    vsub = vm.add_subparsers(dest="vm_command", metavar="ACTION", required=True)
    for action, func in (("add", cmd_vm_add), ("set", cmd_vm_set)):
        p = vsub.add_parser(action, help=f"{action} a VM")
        p.add_argument("name", metavar="NAME")
        p.add_argument("--pool", metavar="P", help="its pool (add: default root; set: move)")
        p.add_argument("--memory", metavar="S", help="configured memory, e.g. 2GiB")
        p.add_argument("--reservation", metavar="S")
        p.add_argument("--limit", metavar="S|unlimited", help="default: the memory")
        p.add_argument("--shares", metavar="N|low|normal|high", help="5/10/20 x MiB of memory")
        _json_flag(p)
        p.set_defaults(func=func)
    for action, func, text in (
        ("remove", cmd_vm_remove, "remove a powered-off VM"),
        ("show", cmd_vm_show, "show a VM"),
        ("power-on", cmd_vm_power_on, "admit a VM's reservation (power-on)"),
        ("power-off", cmd_vm_power_off, "release a VM's reservation (power-off)"),
    ):
        p = vsub.add_parser(action, help=text)
        p.add_argument("name", metavar="NAME")
        _json_flag(p)
        p.set_defaults(func=func)


def _size(value: str | None, flag: str) -> int | Keep:
    return KEEP if value is None else parse_size(value, what=flag)


def _limit(value: str | None) -> int | Keep | None:
    if value is not None and value.strip().lower() == "unlimited":
        return None
    return _size(value, "--limit")


def _shares(value: str | None) -> int | str | Keep:
    if value is None:
        return KEEP
    return int(value) if value.strip().lstrip("-").isdigit() else value.strip()


# ----- state ----------------------------------------------------------------------------------


def _store(args: argparse.Namespace, *, create: bool = False) -> PoolStore:
    state = resolve_state_dir(args.state, create=create)
    if not create and not (state / DB_NAME).exists():
        raise InputError(f"no host in {state}: run `memvisor host init --capacity SIZE` first")
    return PoolStore.in_state_dir(state)


@contextmanager
def _writing(args: argparse.Namespace) -> Iterator[PoolTree]:
    with _store(args) as store, store.write() as tree:
        yield tree


def _mutate(args: argparse.Namespace, op: Callable[[PoolTree], Admission]) -> int:
    with _writing(args) as tree:
        admission = op(tree)
        shown = _object_json(tree, args.name) if args.name in tree else None
    if args.json:
        print(json.dumps({"ok": True, **_admission_json(admission), "object": shown}))
    else:
        print(admission.describe())
    return 0


# ----- handlers -------------------------------------------------------------------------------


def cmd_host_init(args: argparse.Namespace) -> int:
    if args.from_file:
        result = dry_run(load_host_file(args.from_file))
        if result.refusals:
            lines = "\n".join(f"  {path}: {msg}" for path, msg in result.refusals)
            raise AdmissionError(f"{args.from_file}: admission refused, nothing stored\n{lines}")
        tree = result.tree
    else:
        tree = PoolTree(parse_size(args.capacity, what="--capacity"))
    with _store(args, create=True) as store:
        store.initialize(tree, replace=args.force)
        path = store.path
    if args.json:
        print(json.dumps({"ok": True, "state": str(path), **_tree_json(tree)}))
    else:
        print(
            f"host initialized in {path}: capacity {format_size(tree.capacity)}, "
            f"{len(list(tree.pools())) - 1} pools, {len(list(tree.vms()))} VMs"
        )
    return 0


def cmd_host_show(args: argparse.Namespace) -> int:
    with _store(args) as store, store.read() as tree:
        root = tree.pool(ROOT)
        pools, vms = list(tree.pools()), list(tree.vms())
    data = {
        "capacity": root.reservation,
        "reserved": root.reserved,
        "unreserved": root.unreserved,
        "pools": len(pools) - 1,
        "vms": len(vms),
        "powered_on": sum(v.powered_on for v in vms),
    }
    if args.json:
        print(json.dumps(data))
    else:
        print(
            f"capacity {format_size(root.reservation)}, held by children "
            f"{format_size(root.reserved)}, unreserved {format_size(root.unreserved)}; "
            f"{data['pools']} pools, {data['vms']} VMs ({data['powered_on']} powered on)"
        )
    return 0


def cmd_pool_add(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in _pool_fields(args).items() if v is not KEEP}
    return _mutate(args, lambda t: t.add_pool(args.name, **fields))


def cmd_pool_set(args: argparse.Namespace) -> int:
    fields = _pool_fields(args)
    if all(v is KEEP for v in fields.values()):
        raise InputError(f"pool set {args.name}: nothing to change (give --reservation, ...)")
    return _mutate(args, lambda t: t.update_pool(args.name, **fields))


def _pool_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "parent": KEEP if args.parent is None else args.parent,
        "reservation": _size(args.reservation, "--reservation"),
        "limit": _limit(args.limit),
        "shares": _shares(args.shares),
        "expandable": KEEP if args.expandable is None else args.expandable,
    }


def cmd_pool_remove(args: argparse.Namespace) -> int:
    return _mutate(args, lambda t: t.remove_pool(args.name))


def cmd_pool_show(args: argparse.Namespace) -> int:
    with _store(args) as store, store.read() as tree:
        view = tree.pool(args.name)
        pools, vms = tree.children(args.name)
    if args.json:
        print(json.dumps({**_pool_json(view), "child_pools": pools, "child_vms": vms}))
    else:
        print(_render_rows([_pool_row(view, "")]))
        print(f"children: pools {', '.join(pools) or '-'}; VMs {', '.join(vms) or '-'}")
    return 0


def cmd_vm_add(args: argparse.Namespace) -> int:
    if args.memory is None:
        raise InputError(f"vm add {args.name}: --memory is required")
    fields = {k: v for k, v in _vm_fields(args).items() if v is not KEEP}
    return _mutate(args, lambda t: t.add_vm(args.name, **fields))


def cmd_vm_set(args: argparse.Namespace) -> int:
    fields = _vm_fields(args)
    if all(v is KEEP for v in fields.values()):
        raise InputError(f"vm set {args.name}: nothing to change (give --reservation, ...)")
    return _mutate(args, lambda t: t.update_vm(args.name, **fields))


def _vm_fields(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "pool": KEEP if args.pool is None else args.pool,
        "memory": _size(args.memory, "--memory"),
        "reservation": _size(args.reservation, "--reservation"),
        "limit": _limit(args.limit),
        "shares": _shares(args.shares),
    }


def cmd_vm_remove(args: argparse.Namespace) -> int:
    return _mutate(args, lambda t: t.remove_vm(args.name))


def cmd_vm_power_on(args: argparse.Namespace) -> int:
    return _mutate(args, lambda t: t.power_on(args.name))


def cmd_vm_power_off(args: argparse.Namespace) -> int:
    return _mutate(args, lambda t: t.power_off(args.name))


def cmd_vm_show(args: argparse.Namespace) -> int:
    with _store(args) as store, store.read() as tree:
        view = tree.vm(args.name)
    if args.json:
        print(json.dumps(_vm_json(view)))
    else:
        print(_render_rows([_vm_row(view, "")]))
    return 0


def cmd_tree(args: argparse.Namespace) -> int:
    with _store(args) as store, store.read() as tree:
        print(json.dumps(_tree_json(tree)) if args.json else render_tree(tree))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = load_host_file(args.file)
    except ConfigError as exc:
        if not args.json:
            raise
        problems = [{"path": p, "message": m} for p, m in exc.problems]
        print(json.dumps({"ok": False, "file": args.file, "problems": problems}))
        return exc.exit_code
    result = dry_run(cfg)
    rc = AdmissionError.exit_code if result.refusals else 0
    if args.json:
        refusals = [{"path": p, "message": m} for p, m in result.refusals]
        admissions = [_admission_json(a) for a in result.admissions]
        print(
            json.dumps(
                {
                    "ok": rc == 0,
                    "file": args.file,
                    "admissions": admissions,
                    "refusals": refusals,
                    **_tree_json(result.tree),
                }
            )
        )
        return rc
    powered = [v.name for v in cfg.vms if v.power_on]
    print(
        f"{args.file}: valid: host {format_size(cfg.capacity)}, {len(cfg.pools)} pools, "
        f"{len(cfg.vms)} VMs, {len(powered)} marked power_on"
    )
    print(describe_daemon(cfg.daemon))
    print("\ndry-run admission:")
    for a in result.admissions:
        print(f"  {a.describe()}")
    for path, msg in result.refusals:
        print(f"  REFUSED {path}: {msg}")
    print(f"\n{render_tree(result.tree)}\n\n{LEGEND}")
    verdict = "every power-on admitted" if rc == 0 else f"{len(result.refusals)} refused"
    print(f"\n{args.file}: {verdict}")
    return rc


# ----- output ---------------------------------------------------------------------------------


def _admission_json(a: Admission) -> dict[str, Any]:
    return {"operation": a.operation, "steps": [asdict(s) for s in a.steps]}


def _pool_json(v: PoolView) -> dict[str, Any]:
    return {"kind": "pool", **asdict(v)}


def _vm_json(v: VMView) -> dict[str, Any]:
    return {"kind": "vm", **asdict(v), "held": v.held}


def _object_json(tree: PoolTree, name: str) -> dict[str, Any]:
    return _pool_json(tree.pool(name)) if tree.kind(name) == "pool" else _vm_json(tree.vm(name))


def _tree_json(tree: PoolTree) -> dict[str, Any]:
    return {
        "capacity": tree.capacity,
        "pools": [_pool_json(p) for p in tree.pools()],
        "vms": [_vm_json(v) for v in tree.vms()],
    }


_HEADER = (
    "NAME",
    "TYPE",
    "MEMORY",
    "RESERVATION",
    "LIMIT",
    "SHARES",
    "HELD",
    "CHILDREN HOLD",
    "UNRESERVED",
    "BORROWED",
    "HEADROOM",
)


LEGEND = (
    "HELD: what it holds in its parent (a pool: the larger of its reservation and CHILDREN HOLD)"
    "\nUNRESERVED: reservation not held by children; BORROWED: HELD - RESERVATION"
    "\nHEADROOM: the largest reservation a power-on in that pool would be admitted with now"
)


def _fmt(n: int | None) -> str:
    return "unlimited" if n is None else format_size(n)


def _pool_row(p: PoolView, prefix: str) -> tuple[str, ...]:
    kind = "host" if p.parent is None else ("pool exp" if p.expandable else "pool fixed")
    return (
        prefix + p.name,
        kind,
        "",
        _fmt(p.reservation),
        _fmt(p.limit),
        str(p.shares),
        _fmt(p.held),
        _fmt(p.reserved),
        _fmt(p.unreserved),
        _fmt(p.borrowed),
        _fmt(p.headroom),
    )


def _vm_row(v: VMView, prefix: str) -> tuple[str, ...]:
    kind = "vm on" if v.powered_on else "vm off"
    return (
        prefix + v.name,
        kind,
        _fmt(v.memory),
        _fmt(v.reservation),
        _fmt(v.limit),
        str(v.shares),
        _fmt(v.held),
        "",
        "",
        "",
        "",
    )


def _render_rows(rows: list[tuple[str, ...]]) -> str:
    table = [_HEADER, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(_HEADER))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table
    )


def render_tree(tree: PoolTree) -> str:
    """The tree as an indented table: pools with held/unreserved/borrowed, VMs under them."""
    rows: list[tuple[str, ...]] = []

    def walk(name: str, indent: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└─ " if last else "├─ ")
        rows.append(_pool_row(tree.pool(name), indent + branch))
        inner = indent + ("" if top else ("   " if last else "│  "))
        pools, vms = tree.children(name)
        for i, vm in enumerate(vms):
            last_vm = i == len(vms) - 1 and not pools
            rows.append(_vm_row(tree.vm(vm), inner + ("└─ " if last_vm else "├─ ")))
        for i, child in enumerate(pools):
            walk(child, inner, i == len(pools) - 1, False)

    walk(ROOT, "", True, True)
    return _render_rows(rows)
