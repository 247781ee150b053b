"""The Policy seam and what every policy shares: the pool description and small helpers.

A policy turns a :class:`~memvisor.model.Snapshot` into decisions (an action plus the reason a
person needs). It never reads a clock and never does I/O; it may keep controller state between
calls (smoothing, hold timers), taking time only from ``snapshot.host.time``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from memvisor.errors import InputError
from memvisor.model import Decision, PowerState, Snapshot, VMObservation, VMSpec
from memvisor.policy.entitlement import PoolClaim, VMClaim
from memvisor.units import MiB


@runtime_checkable
class Policy(Protocol):
    name: str

    def plan(self, snapshot: Snapshot) -> list[Decision]:
        """Decisions for this instant; pure apart from the policy's own controller state."""
        ...


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """A resource pool as the scheduler needs it (a read-only view; admission lives in pools)."""

    name: str
    parent: str = "root"
    shares: int = 327680  # "normal" for pools
    reservation: int = 0
    limit: int | None = None
    expandable: bool = True  # admission only; entitlement division does not depend on it


def running(snapshot: Snapshot) -> list[tuple[VMSpec, VMObservation]]:
    """Powered-on VMs with their specs, in snapshot order (VMs without a spec are skipped)."""
    specs = {s.name: s for s in snapshot.specs}
    return [
        (specs[v.name], v) for v in snapshot.vms if v.power is PowerState.ON and v.name in specs
    ]


def build_tree(
    vms: Sequence[tuple[VMSpec, VMObservation]],
    pools: Sequence[PoolInfo],
    claim_of: Callable[[VMSpec, VMObservation], VMClaim],
) -> PoolClaim:
    """The entitlement tree: pools under their parents, VMs under their pool (unknown pool:
    the root). Pools with no running VM under them are left out: they claim nothing."""
    by_name = {p.name: p for p in pools}
    if "root" in by_name:
        raise InputError("pool name 'root' is reserved for the host")
    kids: dict[str, list[PoolClaim | VMClaim]] = {}
    for spec, obs in vms:
        pool = spec.pool if spec.pool in by_name else "root"
        kids.setdefault(pool, []).append(claim_of(spec, obs))
    children_of: dict[str, list[str]] = {}
    for p in pools:
        if p.parent != "root" and p.parent not in by_name:
            raise InputError(f"pool {p.name!r}: parent {p.parent!r} does not exist")
        children_of.setdefault(p.parent, []).append(p.name)

    def make(name: str, path: tuple[str, ...]) -> PoolClaim | None:
        if name in path:
            raise InputError(f"pool {name!r}: cycle through {' -> '.join(path)}")
        sub = [make(c, (*path, name)) for c in children_of.get(name, [])]
        members = [*kids.get(name, []), *(c for c in sub if c is not None)]
        if not members and name != "root":
            return None
        if name == "root":
            return PoolClaim("root", 1, 0, None, tuple(members))
        p = by_name[name]
        return PoolClaim(name, p.shares, p.reservation, p.limit, tuple(members))

    root = make("root", ())
    assert root is not None  # make() always returns the root
    return root


def mib(b: float) -> str:
    return f"{b / MiB:.0f}"
