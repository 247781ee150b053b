"""``memvisor up HOST.toml``: admission, start the VMs, run the control loop, serve the API.

Order of a start: read and validate the host file; take the state directory's lock (one
daemon per state directory); admit every VM marked ``power_on`` through the pool tree — one
refusal and nothing starts; start the VMs on the backend (or re-attach to the ones a previous
daemon left running, when it died without stopping them); then the control loop on the main
thread and the HTTP API in a thread beside it, until SIGTERM or SIGINT. On stop the VMs are
shut down, or left running with ``on_stop = "leave"``; everything recorded is already committed.

Settings come from the host file's ``[daemon]`` table (:mod:`memvisor.daemonconfig`); a
:class:`DaemonOptions` field that is not None (a command-line flag) overrides the file's value.
A ``--policy`` other than the file's policy runs with that policy's default settings, and
either TLS flag replaces the file's certificate and key as a pair.

The pool tree lives in the state directory (:mod:`memvisor.poolstore`). The loop reads the
VMs' reservations, limits and shares from it every tick, so a change made through the API
(``memvisor vm set-reservation``) or by ``memvisor vm set`` is live at the next tick, and
survives a restart. ``daemon.json`` records pid, API address and backend for the CLI.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import IO, Any

from memvisor.api.app import create_app
from memvisor.api.auth import load_or_create_token
from memvisor.api.server import ApiServer
from memvisor.backends.base import RealClock
from memvisor.config import HostConfig, dry_run, load_host_file
from memvisor.daemonconfig import ON_STOP, PolicyConfig
from memvisor.errors import AdmissionError, BackendError, InputError, NotFoundError
from memvisor.hostbackends import BackendOptions, ManagedHost, make_host
from memvisor.loop import ControlLoop, thresholds_of
from memvisor.model import VMSpec
from memvisor.policy import POLICIES, Policy, PoolInfo
from memvisor.pools import ROOT, PoolTree
from memvisor.poolstore import PoolStore
from memvisor.store import Retention, Store
from memvisor.units import format_size

DAEMON_FILE = "daemon.json"
LOCK_FILE = "daemon.lock"


@dataclass(frozen=True, slots=True)
class DaemonOptions:
    """Command-line overrides; None means: the host file's [daemon] value (or its default)."""

    backend: str = "qemu"
    policy: str | None = None  # a name of the policy registry
    interval: float | None = None
    listen: str | None = None  # "HOST:PORT"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_file: Path | None = None
    on_stop: str | None = None  # "shutdown" or "leave"
    keep_observations: float | None = None  # seconds
    keep_records: float | None = None
    duration: float | None = None  # stop by itself after this many seconds (CI, demos)
    seed: int = 0
    accel: str | None = None


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InputError(f'--listen {listen!r}: expected "HOST:PORT" such as 127.0.0.1:8765')
    return host.strip("[]"), int(port)


def load_token_file(path: Path) -> str:
    """The API token in an operator's token file, created (mode 0600) if it does not exist."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_token_file(path)
    except OSError as exc:
        raise InputError(f"token_file {path}: cannot create it: {exc.strerror}") from None
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def read_token_file(path: Path) -> str:
    """The token in ``path``, with the rules of ``STATE/api-token``: private, 16+ characters."""
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except OSError as exc:
        raise InputError(f"token_file {path}: cannot read it: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InputError(
            f"token_file {path}: mode {stat.S_IMODE(mode):04o} lets other users read the API "
            f"token; run `chmod 600 {path}`"
        )
    if len(token) < 16:
        raise InputError(f"token_file {path}: the token is too short (need 16+ characters)")
    return token


def read_daemon_file(state_dir: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((state_dir / DAEMON_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data


def _write_daemon_file(state_dir: Path, data: dict[str, Any]) -> None:
    tmp = state_dir / (DAEMON_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, state_dir / DAEMON_FILE)


def _take_lock(state_dir: Path) -> IO[str]:
    """The state directory's lock; the kernel drops it when the daemon dies, even by kill -9."""
    f = open(state_dir / LOCK_FILE, "a+")  # noqa: SIM115 (held for the daemon's lifetime)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        other = read_daemon_file(state_dir) or {}
        raise InputError(
            f"a memvisor daemon is already running on {state_dir} (pid {other.get('pid', '?')})"
        ) from None
    return f


class PoolController:
    """The daemon's side of the API: facts, the pool tree, reservation changes."""

    def __init__(self, state_dir: Path, daemon: Daemon) -> None:
        self.state_dir, self.daemon = state_dir, daemon
        self._local = threading.local()

    def _pools(self) -> PoolStore:
        store: PoolStore | None = getattr(self._local, "store", None)
        if store is None:  # sqlite connections belong to one thread each
            store = self._local.store = PoolStore.in_state_dir(self.state_dir)
        return store

    def info(self) -> dict[str, Any]:
        return self.daemon.info()

    def pools(self) -> dict[str, Any]:
        with self._pools().read() as tree:
            return pool_tree_json(tree, ROOT)

    def set_reservation(self, vm: str, reservation: int) -> dict[str, Any]:
        with self.daemon.loop_lock, self._pools().write() as tree:
            if vm not in tree or tree.kind(vm) != "vm":
                raise NotFoundError(f"no VM named {vm!r} on this host")
            before = tree.vm(vm).reservation
            admission = tree.set_reservation(vm, reservation)
            if tree.vm(vm).powered_on and self.daemon.host is not None:
                # inside the transaction: if the host cannot hold it, the tree rolls back
                self.daemon.host.reservation_changed(vm, reservation)
        message = (
            f"{vm}: reservation {format_size(before)} -> {format_size(reservation)} "
            f"({admission.describe()})"
        )
        self.daemon.store.record_event("vm.reservation", message, vm=vm)
        return {"vm": vm, "reservation": reservation, "before": before, "admission": message}


def pool_tree_json(tree: PoolTree, name: str) -> dict[str, Any]:
    p = tree.pool(name)
    pools, vms = tree.children(name)
    children = [pool_tree_json(tree, c) for c in pools]
    for v in (tree.vm(n) for n in vms):
        children.append(
            {"name": v.name, "kind": "vm", "memory": v.memory, "reservation": v.reservation,
             "limit": v.limit, "shares": v.shares, "power": "on" if v.powered_on else "off"}
        )  # fmt: skip
    return {
        "name": p.name, "kind": "pool", "reservation": p.reservation, "limit": p.limit,
        "shares": p.shares, "expandable": p.expandable, "reserved": p.reserved,
        "unreserved": p.unreserved, "borrowed": p.borrowed, "children": children,
    }  # fmt: skip


def admit(cfg: HostConfig) -> PoolTree:
    """The host file's tree with its ``power_on`` VMs admitted; refuses with every reason."""
    result = dry_run(cfg)
    if result.refusals:
        lines = "\n".join(f"  {path}: {msg}" for path, msg in result.refusals)
        raise AdmissionError(f"{cfg.source}: admission refused, nothing started\n{lines}")
    return result.tree


class Daemon:
    """One running daemon; :meth:`run` blocks until stopped."""

    def __init__(self, host_file: Path, state_dir: Path, options: DaemonOptions) -> None:
        self.host_file, self.state_dir, self.options = host_file, state_dir, options
        self.cfg = load_host_file(host_file)
        self._resolve(options)
        self.stop_event = threading.Event()
        self.loop_lock = threading.RLock()
        self.started_wall = time.time()
        self.store = Store.open(state_dir)
        self.url = ""
        self.host: ManagedHost | None = None
        self.before_stop: Callable[[], None] | None = None  # runs after the loop, VMs still up

    def _resolve(self, o: DaemonOptions) -> None:
        """Each setting from its flag when given, else from the host file (or its default)."""
        f = self.cfg.daemon
        if o.policy is not None and o.policy not in POLICIES:
            raise InputError(f"--policy {o.policy!r}: choose one of {', '.join(POLICIES)}")
        if o.on_stop is not None and o.on_stop not in ON_STOP:
            raise InputError(f"--on-stop {o.on_stop!r}: choose shutdown or leave")
        same_policy = o.policy is None or o.policy == f.policy.name
        self.policy_config = f.policy if same_policy else PolicyConfig(o.policy or "memvisor")
        self.interval = o.interval or f.interval
        self.listen = split_listen(o.listen or f.listen)
        self.on_stop = o.on_stop or f.on_stop
        self.retention = Retention(
            o.keep_observations or f.keep_observations, o.keep_records or f.keep_records
        )
        flags_tls = o.tls_cert is not None or o.tls_key is not None
        self.tls_cert, self.tls_key = (
            (o.tls_cert, o.tls_key) if flags_tls else (f.tls_cert, f.tls_key)
        )
        self.token_file = o.token_file or f.token_file

    def api_token(self) -> str:
        if self.token_file is not None:
            return load_token_file(self.token_file)
        return load_or_create_token(self.state_dir)

    # --- facts for the API -------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        host = self.store.latest_host()
        total = host["total"] if host else self.cfg.capacity
        t = thresholds_of(self.policy)
        return {
            "backend": self.options.backend, "policy": self.policy_config.name,
            "policy_settings": dict(self.policy_config.settings),
            "interval": self.interval, "pid": os.getpid(), "started": self.started_wall,
            "host_file": str(self.host_file), "on_stop": self.on_stop,
            "retention": {"observations": self.retention.observations,
                          "records": self.retention.records},
            "thresholds": {k: int(total * getattr(t, k)) for k in ("high", "soft", "hard", "low")},
        }  # fmt: skip

    # --- the run -----------------------------------------------------------------------------

    def run(self, on_ready: Any = None) -> int:
        lock = _take_lock(self.state_dir)
        try:
            return self._run_locked(on_ready)
        finally:
            lock.close()

    def _run_locked(self, on_ready: Any) -> int:
        previous = read_daemon_file(self.state_dir)
        crashed = previous is not None and previous.get("state") == "running"
        left_running = previous is not None and previous.get("vms") == "left running"
        self.token = self.api_token()  # a bad token file stops the start before any VM
        tree = admit(self.cfg)
        self.policy: Policy = self.policy_config.build(**self._policy_extras(tree))
        pools = PoolStore.in_state_dir(self.state_dir)
        if not ((crashed or left_running) and pools.initialized()):
            pools.initialize(tree, replace=True)
        started = [v for v in self.cfg.vms if v.power_on]
        specs = self._live_specs(pools, [v.spec() for v in started])
        host = self.host = make_host(
            self.options.backend, self.cfg.capacity,
            BackendOptions(self.state_dir, self.options.seed, self.interval, self.options.accel),
        )  # fmt: skip
        for message in getattr(host, "events", []):  # what re-attaching found
            self.store.record_event("backend.attach", message)
        if crashed:
            self.store.record_event(
                "daemon.recovered",
                f"the previous daemon (pid {previous.get('pid') if previous else '?'}) "
                "did not stop cleanly; re-attaching",
            )
        try:
            attached = host.start(specs)
        except BaseException:  # nothing half-done: stop what did start, release the holds
            with contextlib.suppress(Exception):
                host.stop(leave_running=False)
            self._release(pools, [s.name for s in specs])
            self.store.record_event("daemon.error", "start failed; VMs stopped, nothing held")
            raise
        for s in specs:
            how = "re-attached" if s.name in attached else "started"
            self.store.record_event(f"vm.{how}", f"{s.name}: {how} on {host.name}", vm=s.name)
        try:
            rc = self._serve(host, pools, on_ready)
            if self.before_stop is not None:
                self.before_stop()
        finally:
            stopped = self._shutdown(host, pools, started_names=[s.name for s in specs])
        return rc if stopped else BackendError.exit_code

    def _policy_extras(self, tree: PoolTree) -> dict[str, Any]:
        """What the daemon adds to the file's settings: the scheduler gets the pool tree."""
        if self.policy_config.name != "memvisor":
            return {}
        infos = tuple(
            PoolInfo(p.name, p.parent or ROOT, p.shares, p.reservation, p.limit, p.expandable)
            for p in tree.pools()
            if p.name != ROOT
        )
        return {"pools": infos}

    def _live_specs(self, pools: PoolStore, specs: list[VMSpec]) -> list[VMSpec]:
        """Specs with the reservation, limit and shares the pool tree holds now."""
        with pools.read() as tree:
            out = []
            for s in specs:
                if s.name in tree and tree.kind(s.name) == "vm":
                    v = tree.vm(s.name)
                    s = replace(s, reservation=v.reservation, limit=v.limit, shares=v.shares)
                out.append(s)
            return out

    def _serve(self, host: ManagedHost, pools: PoolStore, on_ready: Any) -> int:
        loop = ControlLoop(
            host.backend, self.policy, self.store, RealClock(), interval=self.interval,
            retention=self.retention,
            specs_overlay=lambda specs: self._live_specs(pools, specs),
            events=getattr(host, "drain_events", None),
        )  # fmt: skip
        loop.lock = self.loop_lock
        app = create_app(self.store, PoolController(self.state_dir, self), self.token)
        server = ApiServer(app, *self.listen, tls_cert=self.tls_cert, tls_key=self.tls_key)
        server.start()
        self.url = server.url
        _write_daemon_file(self.state_dir, {
            "pid": os.getpid(), "state": "running", "url": self.url,
            "backend": host.name, "host_file": str(self.host_file.resolve()),
            "started": self.started_wall, "interval": self.interval,
            "tls_cert": str(self.tls_cert.resolve()) if self.tls_cert else None,
            "token_file": str(self.token_file.resolve()) if self.token_file else None,
        })  # fmt: skip
        self.store.record_event("daemon.started", f"{host.name} backend, API at {self.url}")
        old = self._install_signals()
        try:
            if on_ready is not None:
                on_ready(self)
            if self.options.duration is not None:
                threading.Timer(self.options.duration, self.stop_event.set).start()
            loop.run(self.stop_event)
        finally:
            _restore_signals(old)
            server.stop()
        return 0

    def _shutdown(self, host: ManagedHost, pools: PoolStore, started_names: list[str]) -> bool:
        """Stop or leave the VMs; True if everything went as asked."""
        leave = self.on_stop == "leave"
        ok = True
        try:
            host.stop(leave_running=leave)
        except Exception as exc:  # recorded and reported; the state is still written
            ok = False
            self.store.record_event("daemon.error", f"stopping VMs: {exc}")
            print(f"memvisor: error: stopping VMs: {exc}", file=sys.stderr)
        if not leave:
            self._release(pools, started_names)
        what = "left running" if leave else "shut down"
        self.store.record_event("daemon.stopped", f"stopped; VMs {what}")
        info = read_daemon_file(self.state_dir) or {}
        _write_daemon_file(self.state_dir, {**info, "state": "stopped", "vms": what})
        return ok

    @staticmethod
    def _release(pools: PoolStore, names: list[str]) -> None:
        """Power the VMs off in the pool tree: their reservations go back to their pools."""
        with pools.write() as tree:
            for name in names:
                if name in tree and tree.vm(name).powered_on:
                    tree.power_off(name)

    def _install_signals(self) -> dict[int, Any]:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.stop_event.set()

        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


def _restore_signals(old: dict[int, Any]) -> None:
    for s, h in old.items():
        signal.signal(s, h)
