"""Share-based memory entitlement with an idle-memory tax, divided down a pool tree.

Each VM (or pool) has integer shares S, bounds [lo, hi] (its reservation and the smaller of its
limit and its demand) and an active size A (bytes it really uses). Holding P bytes costs it

    cost(P) = P                   for P <= A    (active memory is charged at face value)
    cost(P) = A + k (P - A)       for P >  A    (idle memory is charged k = 1 / (1 - tau) times)

Its shares-per-page ratio is rho = S / cost(P). With a fixed active fraction f = A / P this is
Waldspurger's S / (P (f + k (1 - f))). Memory is taken first from the VM with the lowest rho;
repeated until the bytes fit, this iterative reclaim ends where every VM that is not at a bound
has the same rho. Writing x = 1 / rho, each VM then holds

    P(x) = clamp(cost^-1(S x), lo, hi)

which is monotone and piecewise linear in x, so the total is too: the allocation is a
water-filling problem. We solve it exactly by sweeping the breakpoints in sorted order
(O(n log n)) instead of simulating the page-by-page reclaim. ``docs/policy.md`` has the
derivation.

The tree description is plain frozen dataclasses (:class:`VMClaim`, :class:`PoolClaim`) so this
module knows nothing about how pools are stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from memvisor.errors import InputError

FloatArray = npt.NDArray[np.float64]

DEFAULT_TAX = 0.75


@dataclass(frozen=True, slots=True)
class VMClaim:
    """A VM as the entitlement computation sees it. Sizes in bytes."""

    name: str
    shares: int
    reservation: int
    limit: int
    active: int  # estimated actively used bytes
    demand: int | None = None  # bytes the VM could use now; None: up to its limit


@dataclass(frozen=True, slots=True)
class PoolClaim:
    """A pool: its children divide what the pool is entitled to."""

    name: str
    shares: int
    reservation: int
    limit: int | None
    children: tuple[PoolClaim | VMClaim, ...]


Claim = PoolClaim | VMClaim


@dataclass(frozen=True, slots=True)
class Allocation:
    """Entitlements (bytes) of every VM and pool, and each one's ratio at that allocation."""

    entitlement: Mapping[str, int]
    ratio: Mapping[str, float]  # shares per MiB of taxed memory; inf when it holds nothing

    def of(self, name: str) -> int:
        return self.entitlement[name]


def idle_cost_factor(tax: float) -> float:
    """k = 1 / (1 - tau): how many times an idle page is charged compared with an active one."""
    if not 0.0 <= tax < 1.0:
        raise InputError(f"idle memory tax must be in [0, 1), got {tax!r}")
    return 1.0 / (1.0 - tax)


def taxed_cost(held: float, active: float, tax: float) -> float:
    """cost(P) above: bytes charged to a holder of ``held`` bytes of which ``active`` are used."""
    k = idle_cost_factor(tax)
    used = min(held, active)
    return used + k * (held - used)


def shares_per_page(shares: float, held: float, active: float, tax: float) -> float:
    """rho = S / cost(P), in shares per MiB of taxed memory (inf for a holder of nothing)."""
    cost = taxed_cost(held, active, tax)
    return math.inf if cost <= 0 else shares / (cost / 2**20)


def water_fill(
    capacity: float,
    shares: Sequence[float] | FloatArray,
    lo: Sequence[float] | FloatArray,
    hi: Sequence[float] | FloatArray,
    active: Sequence[float] | FloatArray,
    tax: float = DEFAULT_TAX,
) -> FloatArray:
    """Divide ``capacity`` bytes so that every holder not at a bound has the same ratio.

    Holders with zero shares get only their ``lo``. If the lower bounds alone exceed the
    capacity, everyone gets ``lo`` (reservations are never taken away); if the upper bounds fit,
    everyone gets ``hi``.
    """
    s = np.asarray(shares, dtype=np.float64)
    lo_a = np.asarray(lo, dtype=np.float64)
    hi_a = np.maximum(np.asarray(hi, dtype=np.float64), lo_a)
    act = np.clip(np.asarray(active, dtype=np.float64), 0.0, None)
    k = idle_cost_factor(tax)
    if capacity <= lo_a.sum():
        return lo_a.copy()
    if capacity >= hi_a.sum():
        return hi_a.copy()
    if not ((s > 0) & (hi_a > lo_a)).any():  # nobody can grow
        return lo_a.copy()
    x_star = _solve_level(capacity, s, lo_a, hi_a, act, k)
    return _held_at(x_star, s, lo_a, hi_a, act, k)


def _cost(p: FloatArray, act: FloatArray, k: float) -> FloatArray:
    used = np.minimum(p, act)
    return used + k * (p - used)


def _held_at(
    x: float, s: FloatArray, lo: FloatArray, hi: FloatArray, act: FloatArray, k: float
) -> FloatArray:
    """P(x) = clamp(cost^-1(S x), lo, hi) for every holder."""
    y = s * x
    inv = np.where(y <= act, y, act + (y - act) / k)
    return np.clip(inv, lo, hi)


def _solve_level(
    capacity: float, s: FloatArray, lo: FloatArray, hi: FloatArray, act: FloatArray, k: float
) -> float:
    """The level x = 1/rho at which the holdings sum to ``capacity`` (breakpoint sweep)."""
    # holders pinned at lo == hi take no part: their start and end breakpoints coincide, and
    # with lo == hi == active their start slope (s / k) and end slope (s) did not cancel
    live = (s > 0) & (hi > lo)
    s_l, lo_l, hi_l, act_l = s[live], lo[live], hi[live], act[live]
    x_lo = _cost(lo_l, act_l, k) / s_l  # the holder starts growing here ...
    x_hi = _cost(hi_l, act_l, k) / s_l  # ... and stops here
    slope_start = np.where(lo_l < act_l, s_l, s_l / k)
    has_knee = (lo_l < act_l) & (act_l < hi_l)  # passes from active to idle pages in between
    xs = np.concatenate([x_lo, act_l[has_knee] / s_l[has_knee], x_hi])
    dslope = np.concatenate(
        [slope_start, s_l[has_knee] / k - s_l[has_knee], -np.where(act_l < hi_l, s_l / k, s_l)]
    )
    order = np.argsort(xs, kind="stable")
    xs, dslope = xs[order], dslope[order]
    slope_after = np.cumsum(dslope)  # slope of the total just after each breakpoint
    rises = np.diff(xs) * slope_after[:-1]
    total_at = lo.sum() + np.concatenate([[0.0], np.cumsum(rises)])
    j = int(np.searchsorted(total_at, capacity, side="right")) - 1
    j = min(max(j, 0), len(xs) - 1)
    slope = slope_after[j]
    if slope <= 0:
        return float(xs[j])
    return float(xs[j] + (capacity - total_at[j]) / slope)


# --- the tree --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Bounds:
    lo: float
    hi: float
    active: float


def _bounds(node: Claim, memo: dict[str, _Bounds]) -> _Bounds:
    if isinstance(node, VMClaim):
        top = node.limit if node.demand is None else min(node.limit, node.demand)
        b = _Bounds(float(node.reservation), float(max(top, node.reservation)), float(node.active))
    else:
        kids = [_bounds(c, memo) for c in node.children]
        lo = max(float(node.reservation), sum(c.lo for c in kids))
        hi_kids = float(sum(c.hi for c in kids))
        hi = hi_kids if node.limit is None else min(float(node.limit), hi_kids)
        b = _Bounds(lo, max(hi, lo), sum(c.active for c in kids))
    if node.name in memo:
        raise InputError(f"entitlement tree: name {node.name!r} appears twice")
    memo[node.name] = b
    return b


def allocate(
    root: PoolClaim | Sequence[Claim], capacity: int, tax: float = DEFAULT_TAX
) -> Allocation:
    """Entitlements for a whole tree: the root's children divide ``capacity``, every pool's
    children divide what that pool got."""
    if capacity < 0:
        raise InputError(f"entitlement capacity must not be negative, got {capacity}")
    top = root if isinstance(root, PoolClaim) else PoolClaim("root", 1, 0, None, tuple(root))
    memo: dict[str, _Bounds] = {}
    _bounds(top, memo)
    ent: dict[str, int] = {top.name: capacity}
    ratio: dict[str, float] = {}
    _divide(top, float(capacity), tax, memo, ent, ratio)
    return Allocation(ent, ratio)


def _divide(
    pool: PoolClaim,
    amount: float,
    tax: float,
    memo: dict[str, _Bounds],
    ent: dict[str, int],
    ratio: dict[str, float],
) -> None:
    kids = pool.children
    if not kids:
        return
    bs = [memo[c.name] for c in kids]
    held = water_fill(
        amount,
        [float(c.shares) for c in kids],
        [b.lo for b in bs],
        [b.hi for b in bs],
        [b.active for b in bs],
        tax,
    )
    for child, b, p in zip(kids, bs, held, strict=True):
        ent[child.name] = int(p)
        ratio[child.name] = shares_per_page(child.shares, float(p), b.active, tax)
        if isinstance(child, PoolClaim):
            _divide(child, float(p), tax, memo, ent, ratio)


def iterative_reclaim(
    capacity: int,
    claims: Sequence[VMClaim],
    tax: float = DEFAULT_TAX,
    step: int = 2**20,
) -> dict[str, int]:
    """The definition, page by page: start everyone at its upper bound and take ``step`` bytes at
    a time from the holder with the lowest ratio that is above its lower bound. Slow (O(bytes /
    step)); it exists so tests can check :func:`water_fill` against the rule it implements."""
    held = {c.name: max(c.reservation, min(c.limit, c.demand or c.limit)) for c in claims}
    by_name = {c.name: c for c in claims}
    excess = sum(held.values()) - capacity
    while excess > 0:
        movable = [n for n, p in held.items() if p > by_name[n].reservation]
        if not movable:
            break
        victim = min(
            movable,
            key=lambda n: shares_per_page(by_name[n].shares, held[n], by_name[n].active, tax),
        )
        take = min(step, excess, held[victim] - by_name[victim].reservation)
        held[victim] -= take
        excess -= take
    return held
