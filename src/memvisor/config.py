"""Host files (TOML) -> frozen dataclasses.

A host file declares the host, its pool tree, its VMs and the daemon's settings::

    [host]
    capacity = "16GiB"                 # bytes available to VMs (the root pool's reservation)

    [pools.prod]                       # a pool; NAME is the table key
    parent = "root"                    # default "root"
    reservation = "6GiB"               # default 0
    limit = "unlimited"                # or a size; default unlimited
    shares = "high"                    # low | normal | high | a positive integer; default normal
    expandable = true                  # default true; false: a fixed reservation

    [vms.web1]
    pool = "prod"                      # default "root"
    memory = "2GiB"                    # required: configured guest RAM, whole MiB
    reservation = "1GiB"               # default 0; <= limit <= memory
    limit = "2GiB"                     # default: the memory ("unlimited" means the same)
    shares = "normal"                  # low | normal | high (5/10/20 x MiB) | an integer
    power_on = true                    # default false: admitted at start (and by `check`)
    backing = "file"                   # "file" (per-VM swap file, C4) | "anon" (KSM-mergeable)
    vcpus = 1                          # 1..64

    [daemon]                           # how `memvisor up` runs the host: see
    interval = 1.0                     # memvisor.daemonconfig for every key (policy and
    listen = "127.0.0.1:8765"          # its settings, on_stop, retention, TLS, token file)

Sizes are bytes (integers) or strings such as "512MiB" or "2G" (see :mod:`memvisor.units`).
Unknown keys and bad values are errors; :func:`load_host_file` reports *every* problem with its
key path (``vms.web1.reservation``) in one :class:`~memvisor.errors.ConfigError`.
:func:`dry_run` then builds the :class:`~memvisor.pools.PoolTree` and admits the VMs marked
``power_on``, collecting every refusal with its key path.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memvisor.daemonconfig import DAEMON_KEYS, DaemonConfig, parse_daemon_table
from memvisor.errors import AdmissionError, ConfigError, InputError
from memvisor.model import Backing, VMSpec
from memvisor.pools import (
    ROOT,
    Admission,
    PoolTree,
    SharesSpec,
    check_name,
    check_shares,
    size_text,
    vm_shares,
)
from memvisor.tomlread import TomlReader
from memvisor.units import MiB, parse_size

_TOP_KEYS = ("host", "pools", "vms", "daemon")
_HOST_KEYS = ("capacity",)
_POOL_KEYS = ("parent", "reservation", "limit", "shares", "expandable")
_VM_KEYS = ("pool", "memory", "reservation", "limit", "shares", "power_on", "backing", "vcpus")
MAX_VCPUS = 64


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    parent: str = ROOT
    reservation: int = 0
    limit: int | None = None
    shares: SharesSpec = "normal"
    expandable: bool = True


@dataclass(frozen=True, slots=True)
class VMConfig:
    name: str
    memory: int
    pool: str = ROOT
    reservation: int = 0
    limit: int | None = None
    shares: SharesSpec = "normal"
    power_on: bool = False
    backing: Backing = Backing.FILE
    vcpus: int = 1

    def spec(self) -> VMSpec:
        """The shared :class:`~memvisor.model.VMSpec` for this VM (shares resolved)."""
        return VMSpec(
            name=self.name,
            memory=self.memory,
            reservation=self.reservation,
            limit=self.limit,
            shares=vm_shares(self.shares, self.memory),
            pool=self.pool,
            backing=self.backing,
            vcpus=self.vcpus,
        )


@dataclass(frozen=True, slots=True)
class HostConfig:
    source: str
    capacity: int
    pools: tuple[PoolConfig, ...]
    vms: tuple[VMConfig, ...]
    daemon: DaemonConfig = field(default_factory=DaemonConfig)


@dataclass(frozen=True, slots=True)
class DryRun:
    """The tree a host file builds, what was admitted, and every refusal (key path, message)."""

    tree: PoolTree
    admissions: tuple[Admission, ...]
    refusals: tuple[tuple[str, str], ...]


class _Reader(TomlReader):
    """The host file's reader: adds named tables, sizes and limits."""

    def at_most(self, where: str, value: int, bound: int | None, bound_name: str) -> None:
        """A problem at ``where`` if ``value`` exceeds ``bound`` (None: no bound)."""
        if bound is not None and value > bound:
            self.problem(
                where, f"{size_text(value)} is more than the {bound_name} {size_text(bound)}"
            )

    def named_tables(self, value: object, path: str) -> dict[str, Any]:
        """``[pools.NAME]`` / ``[vms.NAME]``: a table of tables keyed by name."""
        if not isinstance(value, dict):
            self.problem(path, f"expected a table of [{path}.NAME] tables")
            return {}
        return value

    def size(self, t: Mapping[str, Any], path: str, key: str, default: int | None) -> int | None:
        if key not in t:
            if default is None:
                self.problem(f"{path}.{key}", "required")
            return default
        try:
            return parse_size(t[key], what=f"{path}.{key}")
        except InputError as exc:
            self.problem(f"{path}.{key}", str(exc).removeprefix(f"{path}.{key}: "))
            return default

    def limit(self, t: Mapping[str, Any], path: str) -> int | None:
        if t.get("limit") == "unlimited":
            return None
        return self.size(t, path, "limit", None) if "limit" in t else None


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"expected true or false, got {value!r}")
    return value


def _name(value: object) -> str:
    if not isinstance(value, str):
        raise InputError(f"expected a name, got {value!r}")
    return value


def _backing(value: object) -> Backing:
    if value not in ("file", "anon"):
        raise InputError(f'expected "file" or "anon", got {value!r}')
    return Backing(str(value))


def _vcpus(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VCPUS:
        raise InputError(f"expected an integer 1..{MAX_VCPUS}, got {value!r}")
    return value


def _read_pool(r: _Reader, name: str, raw: object) -> PoolConfig:
    path = f"pools.{name}"
    t = r.table(raw, path, _POOL_KEYS)
    reservation = r.size(t, path, "reservation", 0) or 0
    limit = r.limit(t, path)
    r.at_most(f"{path}.reservation", reservation, limit, "limit")
    return PoolConfig(
        name=name,
        parent=r.get(t, path, "parent", _name, ROOT),
        reservation=reservation,
        limit=limit,
        shares=r.get(t, path, "shares", lambda v: check_shares(v, f"{path}.shares"), "normal"),
        expandable=r.get(t, path, "expandable", _bool, True),
    )


def _read_vm(r: _Reader, name: str, raw: object) -> VMConfig:
    path = f"vms.{name}"
    t = r.table(raw, path, _VM_KEYS)
    memory = r.size(t, path, "memory", None) or 0
    if "memory" in t and memory and (memory < MiB or memory % MiB):
        r.problem(f"{path}.memory", f"must be a positive whole number of MiB, got {memory} bytes")
    reservation = r.size(t, path, "reservation", 0) or 0
    limit = r.limit(t, path)
    known_memory = memory or None  # 0: missing or bad, already reported
    r.at_most(f"{path}.reservation", reservation, known_memory, "memory")
    if limit is not None:
        r.at_most(f"{path}.limit", limit, known_memory, "memory")
    r.at_most(f"{path}.reservation", reservation, limit, "limit")
    return VMConfig(
        name=name,
        memory=memory,
        pool=r.get(t, path, "pool", _name, ROOT),
        reservation=reservation,
        limit=limit,
        shares=r.get(t, path, "shares", lambda v: check_shares(v, f"{path}.shares"), "normal"),
        power_on=r.get(t, path, "power_on", _bool, False),
        backing=r.get(t, path, "backing", _backing, Backing.FILE),
        vcpus=r.get(t, path, "vcpus", _vcpus, 1),
    )


def _check_names_and_tree(r: _Reader, pools: list[PoolConfig], vms: list[VMConfig]) -> None:
    pool_names = {p.name for p in pools}
    for kind, items in (("pools", pools), ("vms", vms)):
        for item in items:
            try:
                check_name(item.name, kind[:-1])
            except InputError as exc:
                r.problem(f"{kind}.{item.name}", str(exc))
    for p in pools:
        if p.name == ROOT:
            r.problem("pools.root", "root is the host itself: set [host] capacity instead")
        elif p.parent != ROOT and p.parent not in pool_names:
            r.problem(f"pools.{p.name}.parent", f"no pool named {p.parent!r}")
    for v in vms:
        if v.name in pool_names:
            r.problem(f"vms.{v.name}", f"name {v.name!r} is also a pool (pools.{v.name})")
        if v.pool != ROOT and v.pool not in pool_names:
            r.problem(f"vms.{v.name}.pool", f"no pool named {v.pool!r}")
    _check_cycles(r, {p.name: p.parent for p in pools if p.name != ROOT})


def _check_cycles(r: _Reader, parents: dict[str, str]) -> None:
    reported: set[str] = set()
    for start in sorted(parents):
        seen = [start]
        node = parents[start]
        while node in parents and node not in seen:
            seen.append(node)
            node = parents[node]
        if node in seen and node not in reported:
            cycle = seen[seen.index(node) :]
            reported.update(cycle)
            r.problem(f"pools.{node}.parent", "cycle: " + " -> ".join([*cycle, node]))


def parse_host_config(data: Mapping[str, Any], source: str, base: Path | None = None) -> HostConfig:
    """Validate parsed TOML; raises ConfigError listing every problem. Relative paths in
    ``[daemon]`` are taken relative to ``base`` (the host file's directory)."""
    r = _Reader()
    top = r.table(dict(data), "", _TOP_KEYS)
    if "host" not in top:
        r.problem("host", "required: a [host] table with capacity")
    host = r.table(top.get("host", {}), "host", _HOST_KEYS)
    capacity = r.size(host, "host", "capacity", None) if "host" in top else 0
    pools = [_read_pool(r, n, t) for n, t in r.named_tables(top.get("pools", {}), "pools").items()]
    vms = [_read_vm(r, n, t) for n, t in r.named_tables(top.get("vms", {}), "vms").items()]
    d = r.table(top.get("daemon", {}), "daemon", DAEMON_KEYS)
    daemon = parse_daemon_table(d, r.problem, base)
    _check_names_and_tree(r, pools, vms)
    if r.problems:
        raise ConfigError(source, r.problems)
    return HostConfig(source, capacity or 0, tuple(pools), tuple(vms), daemon)


def load_host_file(path: str | Path) -> HostConfig:
    """Read and validate a host file; ConfigError (exit 2) lists every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [("", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [("", f"not valid TOML: {exc}")]) from None
    return parse_host_config(data, str(path), path.parent)


def dry_run(cfg: HostConfig) -> DryRun:
    """Build the tree and admit everything as a real start would; collect every refusal."""
    tree = PoolTree(cfg.capacity)
    admissions: list[Admission] = []
    refusals: list[tuple[str, str]] = []
    for p in _parents_first(cfg.pools):
        if p.parent not in tree:
            refusals.append((f"pools.{p.name}.parent", f"not added: pool {p.parent} was refused"))
            continue
        try:
            admissions.append(
                tree.add_pool(p.name, p.parent, p.reservation, p.limit, p.shares, p.expandable)
            )
        except AdmissionError as exc:
            refusals.append((f"pools.{p.name}.reservation", str(exc)))
    for v in cfg.vms:
        if v.pool not in tree:
            refusals.append((f"vms.{v.name}.pool", f"not added: pool {v.pool} was refused"))
            continue
        tree.add_vm(v.name, v.pool, v.memory, v.reservation, v.limit, v.shares)
        if v.power_on:
            try:
                admissions.append(tree.power_on(v.name))
            except AdmissionError as exc:
                refusals.append((f"vms.{v.name}.power_on", str(exc)))
    tree.drain_changes()
    return DryRun(tree, tuple(admissions), tuple(refusals))


def _parents_first(pools: tuple[PoolConfig, ...]) -> list[PoolConfig]:
    """Pools ordered so that each comes after its parent (file order otherwise)."""
    placed = {ROOT}
    pending = list(pools)
    ordered: list[PoolConfig] = []
    while pending:
        ready = [p for p in pending if p.parent in placed]
        if not ready:
            break
        ordered.extend(ready)
        placed.update(p.name for p in ready)
        pending = [p for p in pending if p.name not in placed]
    return ordered
