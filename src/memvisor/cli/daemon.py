"""Commands of the daemon: ``up``, ``status``, ``events``, ``vm set-reservation``.

``status`` and ``events`` read the state directory's record directly (they work while the
daemon runs and after it stopped). ``vm set-reservation`` is a live change: it goes through
the running daemon's API, which admits it against the pool tree (refused: exit 3, nothing
changed) and records an event; without a running daemon it says so. It joins the ``vm``
command group of :mod:`memvisor.cli.pools` when that group exists (this module must come after
it in ``COMMAND_MODULES``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import quote

from rich.console import Console
from rich.table import Table

from memvisor.api.auth import TOKEN_FILE, read_token
from memvisor.daemon import LOCK_FILE, Daemon, DaemonOptions, read_daemon_file, read_token_file
from memvisor.daemonconfig import ON_STOP, parse_duration
from memvisor.errors import AdmissionError, BackendError, InputError, NotFoundError
from memvisor.hostbackends import BACKEND_NAMES
from memvisor.policy import POLICIES
from memvisor.statedir import resolve_state_dir
from memvisor.store import DB_NAME, Store
from memvisor.units import format_size, parse_size

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def register(sub: Sub) -> None:
    up = sub.add_parser(
        "up",
        help="start the host's VMs and run the daemon until stopped",
        description="Each option overrides the host file's [daemon] key of the same name; "
        "without it, the file's value is used, else the default in parentheses.",
    )
    up.add_argument("host_file", metavar="HOST.toml")
    up.add_argument("--backend", choices=BACKEND_NAMES, default="qemu")
    # every flag below overrides the host file's [daemon] value; unset: the file, else default
    up.add_argument("--policy", choices=list(POLICIES), help="the scheduler (file: memvisor)")
    up.add_argument("--interval", type=float, help="loop period in seconds (file: 1)")
    up.add_argument("--listen", metavar="HOST:PORT", help="API address (file: 127.0.0.1:8765)")
    up.add_argument("--tls-cert", type=Path, help="TLS certificate (needed beyond loopback)")
    up.add_argument("--tls-key", type=Path, help="TLS private key")
    up.add_argument("--token-file", type=Path, help="API bearer token (file: STATE/api-token)")
    up.add_argument("--on-stop", choices=ON_STOP, help="the VMs when the daemon stops (shutdown)")
    up.add_argument("--keep-observations", metavar="DURATION", help="time series (file: 6h)")
    up.add_argument("--keep-records", metavar="DURATION", help="decisions, events (file: 7d)")
    up.add_argument("--duration", type=float, help="stop by itself after SECONDS")
    up.add_argument("--seed", type=int, default=0, help="simulator seed")
    up.add_argument("--accel", choices=("kvm", "tcg"), help="QEMU accelerator (default: probed)")
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="the host, its VMs and the daemon, from the record")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    events = sub.add_parser("events", help="VM lifecycle and daemon events")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    events.add_argument("--limit", type=int, default=50, help="how many of the latest")
    events.add_argument("--vm", help="only this VM's events")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.set_defaults(func=cmd_events)

    _register_set_reservation(sub)


def _register_set_reservation(sub: Sub) -> None:
    vm = sub.choices.get("vm")
    if vm is None:
        vm = sub.add_parser("vm", help="change a VM")
        vm.add_subparsers(dest="vm_command", metavar="ACTION", required=True)
    vsub = next(a for a in vm._actions if isinstance(a, argparse._SubParsersAction))
    p = vsub.add_parser("set-reservation", help="change a running VM's reservation (live)")
    p.add_argument("name", metavar="VM")
    p.add_argument("size", metavar="SIZE", help="e.g. 512MiB")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_set_reservation)


def cmd_up(args: argparse.Namespace) -> int:
    state_dir = resolve_state_dir(args.state)

    def duration(text: str | None, flag: str) -> float | None:
        return None if text is None else parse_duration(text, flag)

    options = DaemonOptions(
        backend=args.backend, policy=args.policy, interval=args.interval, listen=args.listen,
        tls_cert=args.tls_cert, tls_key=args.tls_key, token_file=args.token_file,
        on_stop=args.on_stop,
        keep_observations=duration(args.keep_observations, "--keep-observations"),
        keep_records=duration(args.keep_records, "--keep-records"),
        duration=args.duration, seed=args.seed, accel=args.accel,
    )  # fmt: skip
    daemon = Daemon(Path(args.host_file), state_dir, options)

    def ready(d: Daemon) -> None:
        token = d.api_token()
        where = d.token_file or state_dir / TOKEN_FILE
        print(f"memvisor: {len([v for v in d.cfg.vms if v.power_on])} VM(s) on {args.backend}")
        print(f"memvisor: policy {d.policy_config.name}, VMs {d.on_stop} on stop")
        print(f"memvisor: dashboard {d.url}/#token={token}")
        print(f"memvisor: API {d.url}/api/v1 (token in {where})", flush=True)

    return daemon.run(on_ready=ready)


def daemon_running(state_dir: Path) -> bool:
    """True while a daemon holds the state directory's lock."""
    try:
        with open(state_dir / LOCK_FILE) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False
    except FileNotFoundError:
        return False


def _open_record(state_dir: Path) -> Store:
    if not (state_dir / DB_NAME).exists():
        raise NotFoundError(f"no daemon record in {state_dir} (start one with `memvisor up`)")
    return Store.open(state_dir)


def status_json(state_dir: Path) -> dict[str, Any]:
    store = _open_record(state_dir)
    info = read_daemon_file(state_dir) or {}
    return {
        "daemon": {**info, "running": daemon_running(state_dir)},
        "host": store.latest_host(),
        "vms": store.latest_vms(),
        "counters": store.counters(),
    }


def cmd_status(args: argparse.Namespace) -> int:
    data = status_json(resolve_state_dir(args.state, create=False))
    if args.json:
        print(json.dumps(data))
        return 0
    console = Console()
    d, h = data["daemon"], data["host"]
    running = f"running, pid {d.get('pid')}, {d.get('url')}" if d["running"] else "not running"
    console.print(f"[bold]daemon[/]: {running} ({d.get('backend', '?')} backend)")
    if h:
        console.print(
            f"[bold]host[/]: free {format_size(h['free'])} of {format_size(h['total'])}, "
            f"state {h['state']}, KSM sharing {h['ksm_pages_sharing']} pages"
        )
    table = Table("VM", "power", "pool", "memory", "consumed", "shared", "ballooned", "swapped",
                  "entitlement", "reservation")  # fmt: skip
    for v in data["vms"]:
        sizes = [v[k] for k in ("memory", "consumed", "shared", "ballooned", "swapped")]
        maybe = [v[k] for k in ("entitlement", "reservation")]
        table.add_row(
            v["vm"], v["power"], v["pool"] or "–", *(format_size(n) for n in sizes),
            *(format_size(n) if n is not None else "–" for n in maybe),
        )  # fmt: skip
    console.print(table)
    return 0


def _print_event(e: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(e), flush=True)
    else:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["wall"]))
        print(f"{stamp}  {e['kind']:<18} {e['message']}", flush=True)


def cmd_events(args: argparse.Namespace) -> int:
    store = _open_record(resolve_state_dir(args.state, create=False))
    if args.limit < 0:
        raise InputError(f"--limit {args.limit}: must be 0 or more")
    recent = store.recent_events(max(args.limit, 1), args.vm)
    last = recent[-1]["id"] if recent else 0  # --follow prints only what comes after
    for e in recent[len(recent) - args.limit :] if args.limit else []:
        _print_event(e, args.json)
    if not args.follow:
        return 0
    try:
        while True:
            time.sleep(0.5)
            for e in store.events(last, 1000, args.vm):
                _print_event(e, args.json)
                last = e["id"]
    except KeyboardInterrupt:
        return 0


def api_request(state_dir: Path, method: str, path: str, body: Any = None) -> Any:
    """Call the running daemon's API with the state directory's token."""
    info = read_daemon_file(state_dir)
    if not info or not daemon_running(state_dir):
        raise BackendError(
            f"no memvisor daemon is running on {state_dir}: start it with `memvisor up`, or "
            "change the stored tree with `memvisor vm set NAME --reservation SIZE`"
        )
    req = urllib.request.Request(
        info["url"] + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {client_token(state_dir, info)}",
                 "Content-Type": "application/json"},
    )  # fmt: skip
    ctx = ssl.create_default_context(cafile=info["tls_cert"]) if info.get("tls_cert") else None
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}")
        message = detail.get("message") or detail.get("detail") or str(exc)
        errors = {404: NotFoundError, 409: AdmissionError, 422: InputError}
        raise errors.get(exc.code, BackendError)(str(message)) from None
    except urllib.error.URLError as exc:
        raise BackendError(f"cannot reach the daemon at {info['url']}: {exc.reason}") from None


def client_token(state_dir: Path, info: dict[str, Any]) -> str:
    """The running daemon's token: its token file (recorded in daemon.json), else STATE's."""
    if info.get("token_file"):
        return read_token_file(Path(info["token_file"]))
    return read_token(state_dir)


def cmd_set_reservation(args: argparse.Namespace) -> int:
    size = parse_size(args.size, what=f"{args.name} reservation")
    state_dir = resolve_state_dir(args.state, create=False)
    result = api_request(state_dir, "PUT", f"/api/v1/vms/{quote(args.name)}/reservation",
                         {"reservation": size})  # fmt: skip
    print(json.dumps(result) if args.json else result["admission"], file=sys.stdout)
    return 0
