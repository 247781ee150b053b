"""The rules of the pool tree (C3), separate from :class:`memvisor.pools.PoolTree` itself:
names, sizes and shares validation, share resolution, the frozen views and admission results
the tree hands out, the mutable records it keeps, and :class:`AdmissionPlan`, which computes a
whole admission chain before anything is applied. Import the public names from
:mod:`memvisor.pools`.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from memvisor.errors import AdmissionError, InputError
from memvisor.units import MiB

ROOT = "root"
POOL_SHARES: dict[str, int] = {"low": 163840, "normal": 327680, "high": 655360}
VM_SHARES_PER_MIB: dict[str, int] = {"low": 5, "normal": 10, "high": 20}
MAX_SHARES = 1_000_000_000

SharesSpec = int | str
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Keep(enum.Enum):
    """Marker for "leave this field as it is" in ``update_pool`` / ``update_vm``."""

    KEEP = "keep"


KEEP = Keep.KEEP


def size_text(n: int) -> str:
    """An exact size for messages, in the largest binary unit that divides it ("3840 MiB")."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def check_name(name: object, kind: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InputError(
            f"{kind} name {name!r}: use 1-64 letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )
    return name


def check_size(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{what}: expected a size in bytes, got {value!r}")
    if value < 0:
        raise InputError(f"{what}: must not be negative, got {value}")
    return value


def check_shares(spec: object, what: str) -> SharesSpec:
    """Validate shares: a positive integer or low/normal/high (case-insensitive)."""
    if isinstance(spec, str) and spec.lower() in POOL_SHARES:
        return spec.lower()
    if isinstance(spec, int) and not isinstance(spec, bool) and 1 <= spec <= MAX_SHARES:
        return spec
    raise InputError(
        f"{what}: expected low, normal, high or an integer 1..{MAX_SHARES}, got {spec!r}"
    )


def pool_shares(spec: SharesSpec) -> int:
    return POOL_SHARES[spec] if isinstance(spec, str) else spec


def vm_shares(spec: SharesSpec, memory: int) -> int:
    return VM_SHARES_PER_MIB[spec] * (memory // MiB) if isinstance(spec, str) else spec


@dataclass(frozen=True, slots=True)
class PoolView:
    """A pool as seen at one instant. ``reserved``: what its children hold."""

    name: str
    parent: str | None
    reservation: int
    limit: int | None
    shares: int
    shares_spec: SharesSpec
    expandable: bool
    reserved: int
    held: int
    unreserved: int
    borrowed: int
    headroom: int


@dataclass(frozen=True, slots=True)
class VMView:
    """A VM as seen at one instant. ``limit`` is resolved (the memory when unset)."""

    name: str
    pool: str
    memory: int
    reservation: int
    limit: int
    limit_spec: int | None
    shares: int
    shares_spec: SharesSpec
    powered_on: bool

    @property
    def parent(self) -> str:
        return self.pool

    @property
    def held(self) -> int:
        return self.reservation if self.powered_on else 0


@dataclass(frozen=True, slots=True)
class AdmissionStep:
    """One pool on an admission chain: what its children hold changed by ``change``; it had
    ``unreserved`` free before; what it holds in its parent changed by ``passed_up``."""

    pool: str
    change: int
    unreserved: int
    passed_up: int


@dataclass(frozen=True, slots=True)
class Admission:
    operation: str
    steps: tuple[AdmissionStep, ...]

    def describe(self) -> str:
        parts = []
        for s in self.steps:
            if s.change > 0:
                text = f"{s.pool} +{size_text(s.change)}"
                if s.passed_up > 0:
                    text += f" (borrows {size_text(s.passed_up)} from its parent)"
                parts.append(text)
            elif s.change < 0:
                parts.append(f"{s.pool} releases {size_text(-s.change)}")
        return f"{self.operation}: ok" + (f"; {', '.join(parts)}" if parts else "")


@dataclass(slots=True)
class PoolRecord:
    name: str
    parent: str | None
    reservation: int
    limit: int | None
    shares: SharesSpec
    expandable: bool
    children_hold: int = 0
    child_pools: set[str] = field(default_factory=set)
    child_vms: set[str] = field(default_factory=set)

    @property
    def held(self) -> int:
        return max(self.reservation, self.children_hold)


@dataclass(slots=True)
class VMRecord:
    name: str
    pool: str
    memory: int
    reservation: int
    limit: int | None
    shares: SharesSpec
    powered_on: bool = False

    @property
    def hold(self) -> int:
        return self.reservation if self.powered_on else 0


class AdmissionPlan:
    """Changes to pools' children-hold aggregates, computed before anything is applied."""

    def __init__(self, pools: Mapping[str, PoolRecord], operation: str) -> None:
        self.pools = pools
        self.operation = operation
        self.children_hold: dict[str, int] = {}
        self.steps: list[AdmissionStep] = []

    def ch(self, name: str) -> int:
        return self.children_hold.get(name, self.pools[name].children_hold)

    def shift(self, start: str, delta: int) -> None:
        """Change what ``start``'s children hold by ``delta``, passing changes upwards."""
        name: str | None = start
        chain: list[AdmissionStep] = []
        while name is not None and delta != 0:
            pool = self.pools[name]
            old = self.ch(name)
            new = old + delta
            passed = max(pool.reservation, new) - max(pool.reservation, old)
            step = AdmissionStep(name, delta, max(0, pool.reservation - old), passed)
            if delta > 0:
                self._check(pool, old, new, delta, chain)
            self.children_hold[name] = new
            self.steps.append(step)
            chain.append(step)
            name, delta = pool.parent, passed

    def _check(
        self, pool: PoolRecord, old: int, new: int, delta: int, chain: list[AdmissionStep]
    ) -> None:
        free = max(0, pool.reservation - old)
        if pool.parent is None and new > pool.reservation:
            self._refuse(
                chain,
                f"{pool.name} (host, capacity {size_text(pool.reservation)}) has "
                f"{size_text(free)} unreserved, needs {size_text(delta)}",
            )
        if not pool.expandable and new > pool.reservation:
            self._refuse(
                chain,
                f"pool {pool.name} (fixed) has {size_text(free)} unreserved, "
                f"needs {size_text(delta)}",
            )
        held = max(pool.reservation, new)
        if pool.limit is not None and held > pool.limit:
            self._refuse(
                chain,
                f"pool {pool.name} would hold {size_text(held)} (reservation "
                f"{size_text(pool.reservation)} + borrowed {size_text(held - pool.reservation)}), "
                f"over its limit {size_text(pool.limit)}",
            )

    def _refuse(self, chain: list[AdmissionStep], reason: str) -> None:
        via = [
            f"pool {s.pool} (expandable) has {size_text(s.unreserved)} unreserved, "
            f"borrows {size_text(s.passed_up)} from its parent"
            for s in chain
        ]
        raise AdmissionError(f"{self.operation}: " + "; ".join([*via, reason]))


def check_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{what}: expected true or false, got {value!r}")
    return value


def describe_changes(old: object, new: object, fields: tuple[str, ...]) -> str:
    parts = []
    for f in fields:
        a, b = getattr(old, f), getattr(new, f)
        if a != b:
            parts.append(f"{f} {show_field(f, a)} -> {show_field(f, b)}")
    if getattr(old, "expandable", None) != getattr(new, "expandable", None):
        parts.append(
            "expandable -> fixed" if getattr(old, "expandable", False) else "fixed -> expandable"
        )
    return (" " + ", ".join(parts)) if parts else ""


def show_field(field_name: str, value: object) -> str:
    if field_name in ("parent", "pool") or not isinstance(value, int):
        return "unlimited" if value is None else str(value)
    return size_text(value)


def vm_operation(old: VMRecord, new: VMRecord) -> str:
    if old.powered_on != new.powered_on:
        return f"power-{'on' if new.powered_on else 'off'} {old.name}"
    return f"set vm {old.name}" + describe_changes(
        old, new, ("pool", "memory", "reservation", "limit")
    )
