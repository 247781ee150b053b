"""Scenario files (TOML) for the simulator -> :class:`Scenario`.

The format is described with an example in ``docs/simulator.md``. Every problem is collected
with its key path (``vms.web.workload``, ``workloads.db.phases[1].skew``) and reported in one
:class:`~memvisor.errors.ConfigError`; unknown keys are errors. VMs are admitted through the
pool tree (:class:`memvisor.pools.PoolTree`) as a real host would; refusals are errors too.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from memvisor.backends.sim.config import (
    GuestConfig,
    Phase,
    SimHostConfig,
    SimVMConfig,
    TraceAccesses,
    Workload,
    default_workload,
)
from memvisor.backends.sim.trace import empty_trace, load_trace
from memvisor.errors import AdmissionError, ConfigError, InputError
from memvisor.pools import ROOT, PoolTree, check_shares, pool_shares, vm_shares
from memvisor.tomlread import TomlReader
from memvisor.units import PAGE_SIZE, parse_size

Convert = Callable[[object], Any]


@dataclass(frozen=True, slots=True)
class PoolSpec:
    name: str
    parent: str = ROOT
    reservation: int = 0
    limit: int | None = None
    shares: int = 327680
    expandable: bool = True


@dataclass(frozen=True, slots=True)
class PolicySettings:
    name: str = "none"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Scenario:
    source: str
    host: SimHostConfig
    vms: tuple[SimVMConfig, ...]
    pools: tuple[PoolSpec, ...] = ()
    policy: PolicySettings = field(default_factory=PolicySettings)
    duration: float = 60.0
    tick: float = 1.0
    seed: int = 0

    def with_overrides(self, duration: float | None = None, seed: int | None = None) -> Scenario:
        return replace(
            self,
            duration=self.duration if duration is None else duration,
            seed=self.seed if seed is None else seed,
        )


# --- value converters: raise InputError with a message that does not repeat the path ----------


def size(v: object) -> int:
    n = parse_size(v, what="value")  # type: ignore[arg-type]
    if n % PAGE_SIZE:
        raise InputError(f"{v!r} is not a multiple of 4 KiB")
    return n


def number(lo: float, hi: float) -> Convert:
    def check(v: object) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise InputError(f"expected a number in [{lo:g}, {hi:g}], got {v!r}")
        return float(v)

    return check


def integer(lo: int, hi: int) -> Convert:
    def check(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise InputError(f"expected an integer in [{lo}, {hi}], got {v!r}")
        return v

    return check


def positive_size(v: object) -> int:
    n = size(v)
    if n <= 0:
        raise InputError(f"expected a positive size, got {v!r}")
    return n


def micros(hi: float) -> Convert:
    inner = number(0.0, hi)
    return lambda v: inner(v) * 1e-6


def boolean(v: object) -> bool:
    if not isinstance(v, bool):
        raise InputError(f"expected true or false, got {v!r}")
    return v


def one_of(*choices: str) -> Convert:
    def check(v: object) -> str:
        if v not in choices:
            raise InputError(f"expected one of {', '.join(choices)}, got {v!r}")
        return str(v)

    return check


def text(v: object) -> str:
    if not isinstance(v, str) or not v:
        raise InputError(f"expected a non-empty string, got {v!r}")
    return v


class Reader(TomlReader):
    """The scenario's reader: adds ``fields`` (TOML keys onto dataclass attributes)."""

    def fields(
        self, t: Mapping[str, Any], path: str, spec: Mapping[str, tuple[str, Convert]], base: Any
    ) -> Any:
        """``replace(base, attr=...)`` for each TOML key of ``spec`` present in ``t``."""
        changes = {}
        for key, (attr, conv) in spec.items():
            value = self.get(t, path, key, conv, None)
            if value is not None:
                changes[attr] = value
        return replace(base, **changes)


HOST_FIELDS: dict[str, tuple[str, Convert]] = {
    "memory": ("memory", size),
    "swap_in_latency_us": ("swap_in_latency", micros(1e6)),
    "minor_fault_us": ("minor_fault_cost", micros(1e6)),
    "cow_us": ("cow_cost", micros(1e6)),
    "blocked_us": ("blocked_cost", micros(1e7)),
    "balloon_rate": ("balloon_rate", size),
    "swap_out_rate": ("swap_out_rate", size),
    "disk_bandwidth": ("disk_bandwidth", positive_size),
    "reclaim_us": ("reclaim_cost", micros(1e6)),
    "swap_victims": ("swap_victims", one_of("random", "lru")),
    "reclaim_headroom": ("reclaim_headroom", number(0.0, 0.5)),
    "background_reclaim": ("background_reclaim", boolean),
    "max_accesses_per_tick": ("max_accesses_per_tick", integer(1, 10_000_000)),
}
KSM_FIELDS: dict[str, tuple[str, Convert]] = {
    "run": ("ksm_run", integer(0, 1)),
    "pages_to_scan": ("ksm_pages_to_scan", integer(0, 10_000_000)),
    "sleep_millisecs": ("ksm_sleep_millisecs", integer(1, 100_000)),
    "stable_ticks": ("ksm_stable_ticks", integer(0, 1000)),
}
SAMPLING_FIELDS: dict[str, tuple[str, Convert]] = {
    "active_pages": ("active_sample_pages", integer(1, 1_000_000)),
    "active_period": ("active_sample_period", number(1e-3, 1e6)),
    "sharing_pages": ("sharing_sample_pages", integer(1, 1_000_000)),
    "sharing_period": ("sharing_sample_period", number(0.0, 1e6)),
}
GUEST_FIELDS: dict[str, tuple[str, Convert]] = {
    "kernel": ("kernel", size),
    "swap": ("swap", size),
    "min_free": ("min_free", number(0.0, 0.5)),
    "swap_in_latency_us": ("swap_in_latency", micros(1e6)),
    "swap_out_cost_us": ("swap_out_cost", micros(1e6)),
    "file_read_latency_us": ("file_read_latency", micros(1e6)),
    "kernel_access_rate": ("kernel_access_rate", number(0.0, 1e7)),
    "prefetch": ("prefetch", boolean),
    "prefetch_rate": ("prefetch_rate", size),  # per second
}
PHASE_FIELDS: dict[str, tuple[str, Convert]] = {
    "duration": ("duration", number(1e-6, 1e9)),
    "working_set": ("working_set", size),
    "skew": ("skew", number(0.0, 5.0)),
    "access_rate": ("access_rate", number(0.0, 1e8)),
    "write_fraction": ("write_fraction", number(0.0, 1.0)),
    "release": ("release", boolean),
}
WORKLOAD_FIELDS: dict[str, tuple[str, Convert]] = {
    "footprint": ("footprint", size),
    "page_cache": ("page_cache", size),
    "prefill": ("prefill", size),
    "zero_fraction": ("zero_fraction", number(0.0, 1.0)),
    "common_fraction": ("common_fraction", number(0.0, 1.0)),
}
VM_KEYS = (
    "count",
    "memory",
    "reservation",
    "limit",
    "shares",
    "pool",
    "image",
    "workload",
    "merge",
    "backing",
    "scan_rate",
    "guest",
)
TOP_KEYS = ("simulation", "host", "guest", "policy", "pools", "workloads", "vms")


def parse_scenario(data: Mapping[str, Any], source: str, base_dir: Path | None = None) -> Scenario:
    """Build a scenario from parsed TOML; raise ConfigError listing every problem."""
    r = Reader()
    top = r.table(dict(data), "", TOP_KEYS)
    sim = r.table(top.get("simulation", {}), "simulation", ("duration", "tick", "seed"))
    duration = r.get(sim, "simulation", "duration", number(1e-3, 1e8), 60.0)
    tick = r.get(sim, "simulation", "tick", number(1e-3, 3600.0), 1.0)
    seed = r.get(sim, "simulation", "seed", integer(0, 2**63 - 1), 0)
    host = _read_host(r, top.get("host", {}))
    guest = r.fields(
        r.table(top.get("guest", {}), "guest", tuple(GUEST_FIELDS)),
        "guest",
        GUEST_FIELDS,
        GuestConfig(),
    )
    policy = _read_policy(r, top.get("policy", {}))
    pools = _read_pools(r, top.get("pools", {}))
    workloads = _read_workloads(r, top.get("workloads", {}), base_dir)
    vms = _read_vms(r, top.get("vms", {}), workloads, guest)
    if not vms and not r.problems:
        r.problem("vms", "a scenario needs at least one [vms.NAME] table")
    if not r.problems:
        _admit(r, host, pools, vms, top.get("vms", {}))
    if not r.problems:
        _check_with_simulator(r, host, vms, tick)
    if r.problems:
        raise ConfigError(source, r.problems)
    return Scenario(source, host, tuple(vms), tuple(pools), policy, duration, tick, seed)


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file (trace paths are relative to the file)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise InputError(f"cannot read scenario {p}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), [("(syntax)", str(exc))]) from None
    return parse_scenario(data, str(p), p.parent)


def _read_host(r: Reader, raw: object) -> SimHostConfig:
    t = r.table(raw, "host", (*HOST_FIELDS, "ksm", "sampling"))
    if "memory" not in t:
        r.problem("host.memory", 'required: memory available to guest RAM, e.g. "16GiB"')
    host = r.fields(t, "host", HOST_FIELDS, SimHostConfig())
    ksm = r.table(t.get("ksm", {}), "host.ksm", tuple(KSM_FIELDS))
    host = r.fields(ksm, "host.ksm", KSM_FIELDS, host)
    sampling = r.table(t.get("sampling", {}), "host.sampling", tuple(SAMPLING_FIELDS))
    return r.fields(sampling, "host.sampling", SAMPLING_FIELDS, host)  # type: ignore[no-any-return]


def _read_policy(r: Reader, raw: object) -> PolicySettings:
    if not isinstance(raw, dict):
        r.problem("policy", "expected a table")
        return PolicySettings()
    options = {k: v for k, v in raw.items() if k != "name"}
    return PolicySettings(r.get(raw, "policy", "name", text, "none"), options)


def _read_pools(r: Reader, raw: object) -> list[PoolSpec]:
    pools: list[PoolSpec] = []
    for name, t in r.table(raw, "pools", tuple(raw) if isinstance(raw, dict) else ()).items():
        path = f"pools.{name}"
        t = r.table(t, path, ("parent", "reservation", "limit", "shares", "expandable"))
        shares = r.get(t, path, "shares", lambda v: pool_shares(check_shares(v, "shares")), 327680)
        limit = None if t.get("limit") == "unlimited" else r.get(t, path, "limit", size, None)
        pools.append(
            PoolSpec(
                name=name,
                parent=r.get(t, path, "parent", text, ROOT),
                reservation=r.get(t, path, "reservation", size, 0),
                limit=limit,
                shares=shares,
                expandable=r.get(t, path, "expandable", boolean, True),
            )
        )
    return pools


def _read_workloads(r: Reader, raw: object, base_dir: Path | None) -> dict[str, Workload]:
    out: dict[str, Workload] = {}
    keys = (*WORKLOAD_FIELDS, "phases", "trace", *PHASE_FIELDS)
    for name, t in r.table(raw, "workloads", tuple(raw) if isinstance(raw, dict) else ()).items():
        path = f"workloads.{name}"
        t = r.table(t, path, keys)
        wl = r.fields(t, path, WORKLOAD_FIELDS, Workload(name=name))
        phases = _read_phases(r, t, path)
        trace = None
        if "trace" in t:
            trace_path = r.get(t, path, "trace", text, None)
            if trace_path is not None:
                trace = _read_trace(r, f"{path}.trace", trace_path, base_dir)
        if "footprint" not in t and phases:
            wl = replace(wl, footprint=max(p.working_set for p in phases))
        out[name] = replace(wl, phases=tuple(phases) or (Phase(),), trace_file=trace)
    return out


def _read_phases(r: Reader, t: Mapping[str, Any], path: str) -> list[Phase]:
    direct = {k: v for k, v in t.items() if k in PHASE_FIELDS}
    raw = t.get("phases")
    if raw is None:
        return [r.fields(direct, path, PHASE_FIELDS, Phase())] if direct else []
    if direct:
        r.problem(
            path,
            f"give phase keys ({', '.join(sorted(direct))}) either here or in phases, not both",
        )
    if not isinstance(raw, list) or not raw:
        r.problem(f"{path}.phases", "expected a non-empty array of tables ([[...phases]])")
        return []
    phases = []
    for i, p in enumerate(raw):
        where = f"{path}.phases[{i}]"
        phases.append(
            r.fields(r.table(p, where, tuple(PHASE_FIELDS)), where, PHASE_FIELDS, Phase())
        )
        if "duration" not in p and i < len(raw) - 1:
            r.problem(f"{where}.duration", "required for every phase but the last")
    return phases


def _read_trace(r: Reader, path: str, file: str, base_dir: Path | None) -> str | None:
    p = Path(file) if base_dir is None or Path(file).is_absolute() else base_dir / file
    if not p.is_file():
        r.problem(path, f"trace file {p} does not exist")
        return None
    return str(p)


def _read_vms(
    r: Reader, raw: object, workloads: dict[str, Workload], guest: GuestConfig
) -> list[SimVMConfig]:
    vms: list[SimVMConfig] = []
    for name, t in r.table(raw, "vms", tuple(raw) if isinstance(raw, dict) else ()).items():
        path = f"vms.{name}"
        t = r.table(t, path, VM_KEYS)
        if "memory" not in t:
            r.problem(f"{path}.memory", 'required: configured guest RAM, e.g. "1GiB"')
        memory = r.get(t, path, "memory", size, PAGE_SIZE)
        wname = r.get(t, path, "workload", text, None)
        if wname is not None and wname not in workloads:
            known = ", ".join(sorted(workloads)) or "none defined"
            r.problem(f"{path}.workload", f"no [workloads.{wname}] (workloads: {known})")
        spec_shares = r.get(t, path, "shares", lambda v: check_shares(v, "shares"), "normal")
        vm_guest = r.fields(
            r.table(t.get("guest", {}), f"{path}.guest", tuple(GUEST_FIELDS)),
            f"{path}.guest",
            GUEST_FIELDS,
            guest,
        )
        limit = None if t.get("limit") == "unlimited" else r.get(t, path, "limit", size, None)
        base = SimVMConfig(
            name=name,
            memory=memory,
            workload=workloads.get(wname or "") or default_workload(memory, vm_guest),
            image=r.get(t, path, "image", text, "default"),
            reservation=r.get(t, path, "reservation", size, 0),
            limit=limit,
            shares=vm_shares(spec_shares, memory),
            pool=r.get(t, path, "pool", text, ROOT),
            merge=r.get(t, path, "merge", boolean, True),
            swap_file=r.get(t, path, "backing", one_of("file", "anon"), "file") == "file",
            scan_rate=r.get(t, path, "scan_rate", number(0.0, 1e9), None),
            guest=vm_guest,
        )
        count = r.get(t, path, "count", integer(1, 100_000), None)
        if count is None:
            vms.append(base)
        else:
            width = len(str(count))
            vms.extend(replace(base, name=f"{name}-{i:0{width}d}") for i in range(1, count + 1))
    return _attach_traces(r, vms)


def _attach_traces(r: Reader, vms: list[SimVMConfig]) -> list[SimVMConfig]:
    """Give each VM whose workload replays a trace its own rows (``vm`` = its name or ``*``)."""
    loaded: dict[str, dict[str, TraceAccesses]] = {}
    out = []
    for vm in vms:
        file = vm.workload.trace_file
        if file is None:
            out.append(vm)
            continue
        if file not in loaded:
            try:
                loaded[file] = load_trace(file)
            except InputError as exc:
                r.problem(f"workloads.{vm.workload.name}.trace", str(exc))
                loaded[file] = {}
        rows = loaded[file]
        trace = rows.get(vm.name, rows.get("*"))
        if trace is None:
            trace = empty_trace()
        out.append(replace(vm, workload=replace(vm.workload, trace=trace)))
    return out


def _admit(
    r: Reader,
    host: SimHostConfig,
    pools: list[PoolSpec],
    vms: list[SimVMConfig],
    raw_vms: Mapping[str, Any],
) -> None:
    tree = PoolTree(host.memory)
    pending = list(pools)
    while pending:
        ready = [p for p in pending if p.parent in tree]
        if not ready:
            for p in pending:
                r.problem(
                    f"pools.{p.name}.parent", f"pool {p.parent!r} does not exist (or is in a cycle)"
                )
            return
        for p in ready:
            pending.remove(p)
            try:
                tree.add_pool(p.name, p.parent, p.reservation, p.limit, p.shares, p.expandable)
            except (AdmissionError, InputError) as exc:
                r.problem(f"pools.{p.name}", str(exc))
                return
    for vm in vms:
        key = vm.name if vm.name in raw_vms else vm.name.rsplit("-", 1)[0]
        try:
            if vm.pool not in tree:
                raise InputError(f"pool {vm.pool!r} does not exist")
            tree.add_vm(vm.name, vm.pool, vm.memory, vm.reservation, vm.limit, vm.shares)
            tree.power_on(vm.name)
        except (AdmissionError, InputError) as exc:
            r.problem(f"vms.{key}", str(exc))


def _check_with_simulator(
    r: Reader, host: SimHostConfig, vms: list[SimVMConfig], tick: float
) -> None:
    from memvisor.backends.sim.validate import check_setup

    try:
        check_setup(host, vms, tick)
    except InputError as exc:
        r.problem("vms", str(exc))
