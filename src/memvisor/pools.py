"""Resource pools and admission control (C3), following vSphere's semantics.

The host is the root pool (named ``root``); its reservation is the host's capacity. Pools form a
tree under it; every VM belongs to one pool. Only powered-on VMs hold their reservation. A pool
holds ``max(own reservation, what its children hold)`` in its parent; the excess over its own
reservation is what it *borrows*, and only an expandable pool may borrow. Every rule, with a
worked example, is in ``docs/pools.md``.

Mutations (``add_pool``, ``add_vm``, ``power_on``, ``power_off``, ``set_reservation``,
``update_pool``, ``update_vm``, ``remove_*``, ``set_capacity``) are atomic: the whole chain of
changes is computed first in a plan, then applied. A refused operation raises
:class:`AdmissionError` (or :class:`InputError` / :class:`NotFoundError` for bad input) and
leaves the tree byte-for-byte unchanged (see :meth:`PoolTree.canonical`). A successful one
returns an :class:`Admission` that says where the bytes came from.

Each pool keeps one aggregate, the sum of what its children hold, and an operation updates it
only along the path from the object to the first ancestor whose holding does not change, so an
operation costs O(depth), not O(tree).

Read-only view for other components (the scheduler, the API)::

    for p in tree.pools():   # PoolView, parents before children
        p.name, p.parent, p.reservation, p.limit, p.shares, p.expandable,
        p.reserved, p.held, p.unreserved, p.borrowed, p.headroom
    for v in tree.vms():     # VMView, by name
        v.name, v.pool (== v.parent), v.memory, v.reservation, v.limit, v.shares,
        v.powered_on, v.held
    tree.pool("prod"), tree.vm("web1"), tree.children("prod"), tree.capacity
    tree.headroom("prod")    # the largest reservation a power-on in prod could get now

``shares`` in the views are resolved integers (pools: low/normal/high = 163840/327680/655360;
VMs: 5/10/20 x configured MiB); ``shares_spec`` keeps what was configured. Views are frozen
snapshots: they do not follow later changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from memvisor.errors import AdmissionError, InputError, NotFoundError
from memvisor.poolrules import (
    KEEP,
    MAX_SHARES,
    POOL_SHARES,
    ROOT,
    VM_SHARES_PER_MIB,
    Admission,
    AdmissionPlan,
    AdmissionStep,
    Keep,
    PoolRecord,
    PoolView,
    SharesSpec,
    VMRecord,
    VMView,
    check_bool,
    check_name,
    check_shares,
    check_size,
    describe_changes,
    pool_shares,
    size_text,
    vm_operation,
    vm_shares,
)
from memvisor.units import MiB

__all__ = [
    "KEEP",
    "MAX_SHARES",
    "POOL_SHARES",
    "ROOT",
    "VM_SHARES_PER_MIB",
    "Admission",
    "AdmissionError",
    "AdmissionStep",
    "Keep",
    "PoolTree",
    "PoolView",
    "SharesSpec",
    "VMView",
    "check_name",
    "check_shares",
    "check_size",
    "pool_shares",
    "size_text",
    "vm_shares",
]


class PoolTree:
    """A host's pool tree with admission control. Sizes are bytes."""

    def __init__(self, capacity: int) -> None:
        capacity = check_size(capacity, "host capacity")
        self._pools: dict[str, PoolRecord] = {
            ROOT: PoolRecord(ROOT, None, capacity, None, "normal", False)
        }
        self._vms: dict[str, VMRecord] = {}
        self._changed: set[str] = set()

    # ----- queries -----------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._pools[ROOT].reservation

    def __contains__(self, name: object) -> bool:
        return name in self._pools or name in self._vms

    def kind(self, name: str) -> str:
        """``"pool"`` or ``"vm"``; NotFoundError otherwise."""
        if name in self._pools:
            return "pool"
        if name in self._vms:
            return "vm"
        raise NotFoundError(f"no pool or VM named {name!r}")

    def unreserved(self, pool: str) -> int:
        """Bytes the pool can still give its children without borrowing."""
        p = self._pool(pool)
        return max(0, p.reservation - p.children_hold)

    def reserved(self, pool: str) -> int:
        """Bytes the pool's children hold (child pools' holdings, powered-on VMs' reservations)."""
        return self._pool(pool).children_hold

    def borrowed(self, pool: str) -> int:
        """Bytes the pool currently borrows from its parent."""
        p = self._pool(pool)
        return max(0, p.children_hold - p.reservation) if p.parent is not None else 0

    def headroom(self, pool: str) -> int:
        """The largest new reservation the pool could admit now (a VM's power-on, a child's
        reservation): its unreserved bytes, plus, if expandable, what its parent could give,
        capped by its limit. O(depth)."""
        p = self._pool(pool)
        room = max(0, p.reservation - p.children_hold)
        if p.parent is not None and p.expandable:
            room += self.headroom(p.parent)
        if p.limit is not None:
            room = min(room, p.limit - p.children_hold)
        return room

    def held(self, name: str) -> int:
        """Bytes a pool or VM holds in its parent."""
        if name in self._vms:
            return self._vms[name].hold
        return self._pool(name).held

    def pool(self, name: str) -> PoolView:
        p = self._pool(name)
        limit = p.limit if p.parent is not None else p.reservation
        return PoolView(
            name=p.name,
            parent=p.parent,
            reservation=p.reservation,
            limit=limit,
            shares=pool_shares(p.shares),
            shares_spec=p.shares,
            expandable=p.expandable,
            reserved=p.children_hold,
            held=p.held,
            unreserved=max(0, p.reservation - p.children_hold),
            borrowed=self.borrowed(name),
            headroom=self.headroom(name),
        )

    def vm(self, name: str) -> VMView:
        v = self._vm(name)
        return VMView(
            name=v.name,
            pool=v.pool,
            memory=v.memory,
            reservation=v.reservation,
            limit=v.memory if v.limit is None else v.limit,
            limit_spec=v.limit,
            shares=vm_shares(v.shares, v.memory),
            shares_spec=v.shares,
            powered_on=v.powered_on,
        )

    def pools(self) -> Iterator[PoolView]:
        """Every pool, root first, parents before children, siblings by name."""
        queue = [ROOT]
        while queue:
            name = queue.pop()
            yield self.pool(name)
            queue.extend(sorted(self._pools[name].child_pools, reverse=True))

    def vms(self) -> Iterator[VMView]:
        for name in sorted(self._vms):
            yield self.vm(name)

    def children(self, pool: str) -> tuple[list[str], list[str]]:
        """(child pool names, child VM names) of a pool, sorted."""
        p = self._pool(pool)
        return sorted(p.child_pools), sorted(p.child_vms)

    def __len__(self) -> int:
        return len(self._pools) + len(self._vms)

    # ----- mutations ---------------------------------------------------------------------

    def set_capacity(self, capacity: int) -> Admission:
        capacity = check_size(capacity, "host capacity")
        root = self._pools[ROOT]
        op = f"set host capacity {size_text(root.reservation)} -> {size_text(capacity)}"
        if root.children_hold > capacity:
            raise AdmissionError(
                f"{op}: the host's children hold {size_text(root.children_hold)}, "
                "more than the new capacity"
            )
        plan = AdmissionPlan(self._pools, op)
        return self._commit(plan, lambda: setattr(root, "reservation", capacity), ROOT)

    def add_pool(
        self,
        name: str,
        parent: str = ROOT,
        reservation: int = 0,
        limit: int | None = None,
        shares: SharesSpec = "normal",
        expandable: bool = True,
    ) -> Admission:
        self._check_new_name(check_name(name, "pool"), "pool")
        self._pool(parent, f"pool {name} parent")
        new = PoolRecord(name, parent, 0, None, "normal", expandable)
        self._set_pool_fields(new, reservation, limit, shares, expandable)
        plan = AdmissionPlan(
            self._pools, f"add pool {name} (reservation {size_text(new.reservation)})"
        )
        plan.shift(parent, new.reservation)

        def apply() -> None:
            self._pools[name] = new
            self._pools[parent].child_pools.add(name)

        return self._commit(plan, apply, name)

    def update_pool(
        self,
        name: str,
        *,
        parent: str | Keep = KEEP,
        reservation: int | Keep = KEEP,
        limit: int | Keep | None = KEEP,
        shares: SharesSpec | Keep = KEEP,
        expandable: bool | Keep = KEEP,
    ) -> Admission:
        """Change any fields of a pool in one atomic step (``KEEP`` leaves a field alone)."""
        old = self._pool(name)
        if old.parent is None:
            raise InputError("pool root is the host: change its capacity with set_capacity")
        new = PoolRecord(name, old.parent, 0, None, old.shares, old.expandable, old.children_hold)
        self._set_pool_fields(
            new,
            old.reservation if reservation is KEEP else reservation,
            old.limit if limit is KEEP else limit,
            old.shares if shares is KEEP else shares,
            old.expandable if expandable is KEEP else expandable,
        )
        if not isinstance(parent, Keep):
            new.parent = self._check_move(name, parent)
        op = f"set pool {name}" + describe_changes(old, new, ("parent", "reservation", "limit"))
        self._check_own_holding(op, new)
        plan = AdmissionPlan(self._pools, op)
        self._plan_move(plan, old.parent, new.parent, old.held, new.held)
        return self._commit(plan, lambda: self._replace_pool(old, new), name)

    def add_vm(
        self,
        name: str,
        pool: str = ROOT,
        memory: int = 0,
        reservation: int = 0,
        limit: int | None = None,
        shares: SharesSpec = "normal",
    ) -> Admission:
        self._check_new_name(check_name(name, "vm"), "vm")
        self._pool(pool, f"vm {name} pool")
        new = VMRecord(name, pool, 0, 0, None, "normal")
        self._set_vm_fields(new, memory, reservation, limit, shares)

        def apply() -> None:
            self._vms[name] = new
            self._pools[pool].child_vms.add(name)

        return self._commit(AdmissionPlan(self._pools, f"add vm {name}"), apply, name)

    def update_vm(
        self,
        name: str,
        *,
        pool: str | Keep = KEEP,
        memory: int | Keep = KEEP,
        reservation: int | Keep = KEEP,
        limit: int | Keep | None = KEEP,
        shares: SharesSpec | Keep = KEEP,
        powered_on: bool | Keep = KEEP,
    ) -> Admission:
        """Change any fields of a VM in one atomic step; power state included."""
        old = self._vm(name)
        new = VMRecord(name, old.pool, 0, 0, None, old.shares, old.powered_on)
        self._set_vm_fields(
            new,
            old.memory if memory is KEEP else memory,
            old.reservation if reservation is KEEP else reservation,
            old.limit if limit is KEEP else limit,
            old.shares if shares is KEEP else shares,
        )
        if not isinstance(pool, Keep):
            new.pool = self._pool(pool, f"vm {name} pool").name
        if not isinstance(powered_on, Keep):
            new.powered_on = check_bool(powered_on, f"vm {name} powered_on")
        op = vm_operation(old, new)
        plan = AdmissionPlan(self._pools, op)
        self._plan_move(plan, old.pool, new.pool, old.hold, new.hold)
        return self._commit(plan, lambda: self._replace_vm(old, new), name)

    def power_on(self, name: str) -> Admission:
        if self._vm(name).powered_on:
            raise InputError(f"power-on {name}: vm {name} is already powered on")
        return self.update_vm(name, powered_on=True)

    def power_off(self, name: str) -> Admission:
        if not self._vm(name).powered_on:
            raise InputError(f"power-off {name}: vm {name} is already powered off")
        return self.update_vm(name, powered_on=False)

    def set_reservation(self, name: str, reservation: int) -> Admission:
        """Change a pool's or a VM's reservation (the core operation)."""
        if self.kind(name) == "vm":
            return self.update_vm(name, reservation=reservation)
        if name == ROOT:
            return self.set_capacity(reservation)
        return self.update_pool(name, reservation=reservation)

    def set_limit(self, name: str, limit: int | None) -> Admission:
        if self.kind(name) == "vm":
            return self.update_vm(name, limit=limit)
        return self.update_pool(name, limit=limit)

    def set_shares(self, name: str, shares: SharesSpec) -> Admission:
        if self.kind(name) == "vm":
            return self.update_vm(name, shares=shares)
        return self.update_pool(name, shares=shares)

    def remove_pool(self, name: str) -> Admission:
        p = self._pool(name)
        if p.parent is None:
            raise InputError("pool root is the host and cannot be removed")
        if p.child_pools or p.child_vms:
            raise InputError(
                f"remove pool {name}: not empty: it has pools {sorted(p.child_pools)} and VMs "
                f"{sorted(p.child_vms)}; remove or move them first"
            )
        parent = p.parent
        plan = AdmissionPlan(self._pools, f"remove pool {name}")
        plan.shift(parent, -p.held)

        def apply() -> None:
            del self._pools[name]
            self._pools[parent].child_pools.discard(name)

        return self._commit(plan, apply, name)

    def remove_vm(self, name: str) -> Admission:
        v = self._vm(name)
        if v.powered_on:
            raise InputError(f"remove vm {name}: it is powered on; power it off first")

        def apply() -> None:
            del self._vms[name]
            self._pools[v.pool].child_vms.discard(name)

        return self._commit(AdmissionPlan(self._pools, f"remove vm {name}"), apply, name)

    # ----- persistence and checking helpers ----------------------------------------------

    def drain_changes(self) -> set[str]:
        """Names of objects changed since the last call ("root" for the capacity)."""
        changed, self._changed = self._changed, set()
        return changed

    def canonical(self) -> bytes:
        """Every field and aggregate, serialized deterministically (for equality checks)."""
        pools = {
            n: [
                p.parent,
                p.reservation,
                p.limit,
                p.shares,
                p.expandable,
                p.children_hold,
                sorted(p.child_pools),
                sorted(p.child_vms),
            ]
            for n, p in self._pools.items()
        }
        vms = {
            n: [v.pool, v.memory, v.reservation, v.limit, v.shares, v.powered_on]
            for n, v in self._vms.items()
        }
        return json.dumps({"pools": pools, "vms": vms}, sort_keys=True).encode()

    def verify(self) -> list[str]:
        """Recompute every aggregate from scratch and check every invariant (O(tree))."""
        problems: list[str] = []
        for p in self._pools.values():
            ch = sum(self._pools[c].held for c in p.child_pools)
            ch += sum(self._vms[v].hold for v in p.child_vms)
            if ch != p.children_hold:
                problems.append(f"pool {p.name}: aggregate {p.children_hold} != actual {ch}")
            if (p.parent is None or not p.expandable) and ch > p.reservation:
                problems.append(f"pool {p.name}: children hold {ch} > reservation")
            if p.limit is not None and max(ch, p.reservation) > p.limit:
                problems.append(f"pool {p.name}: holds {max(ch, p.reservation)} > limit")
        for v in self._vms.values():
            if v.reservation > v.memory or (v.limit is not None and v.reservation > v.limit):
                problems.append(f"vm {v.name}: reservation over memory or limit")
        return problems

    @classmethod
    def from_records(
        cls, capacity: int, pools: Iterable[Mapping[str, Any]], vms: Iterable[Mapping[str, Any]]
    ) -> PoolTree:
        """Rebuild a tree from plain records (as :meth:`pool_record` / :meth:`vm_record` give),
        re-admitting everything; raises if the records break a rule."""
        tree = cls(capacity)
        pending = {str(r["name"]): r for r in pools}
        while pending:
            ready = [n for n, r in pending.items() if r["parent"] in tree._pools]
            if not ready:
                raise InputError(f"pools {sorted(pending)}: unknown parent or a cycle")
            for n in ready:
                r = pending.pop(n)
                tree.add_pool(
                    n, r["parent"], r["reservation"], r["limit"], r["shares"], r["expandable"]
                )
        vm_list = list(vms)
        for r in vm_list:
            tree.add_vm(
                r["name"], r["pool"], r["memory"], r["reservation"], r["limit"], r["shares"]
            )
        for r in vm_list:
            if r["powered_on"]:
                tree.power_on(r["name"])
        tree.drain_changes()
        return tree

    def pool_record(self, name: str) -> dict[str, object]:
        p = self._pool(name)
        return {
            "name": p.name,
            "parent": p.parent,
            "reservation": p.reservation,
            "limit": p.limit,
            "shares": p.shares,
            "expandable": p.expandable,
        }

    def vm_record(self, name: str) -> dict[str, object]:
        v = self._vm(name)
        return {
            "name": v.name,
            "pool": v.pool,
            "memory": v.memory,
            "reservation": v.reservation,
            "limit": v.limit,
            "shares": v.shares,
            "powered_on": v.powered_on,
        }

    # ----- internals ---------------------------------------------------------------------

    def _pool(self, name: str, what: str = "") -> PoolRecord:
        try:
            return self._pools[name]
        except KeyError:
            hint = " (it is a VM)" if name in self._vms else ""
            where = f"{what}: " if what else ""
            raise NotFoundError(f"{where}no pool named {name!r}{hint}") from None

    def _vm(self, name: str) -> VMRecord:
        try:
            return self._vms[name]
        except KeyError:
            hint = " (it is a pool)" if name in self._pools else ""
            raise NotFoundError(f"no vm named {name!r}{hint}") from None

    def _check_new_name(self, name: str, kind: str) -> None:
        if name in self._pools or name in self._vms:
            raise InputError(f"add {kind} {name}: the name is taken by a {self.kind(name)}")

    def _set_pool_fields(
        self, p: PoolRecord, reservation: object, limit: object, shares: object, expandable: object
    ) -> None:
        p.reservation = check_size(reservation, f"pool {p.name} reservation")
        p.limit = None if limit is None else check_size(limit, f"pool {p.name} limit")
        p.shares = check_shares(shares, f"pool {p.name} shares")
        p.expandable = check_bool(expandable, f"pool {p.name} expandable")
        if p.limit is not None and p.reservation > p.limit:
            raise InputError(
                f"pool {p.name} reservation: {size_text(p.reservation)} is more than its limit "
                f"{size_text(p.limit)}"
            )

    def _set_vm_fields(
        self, v: VMRecord, memory: object, reservation: object, limit: object, shares: object
    ) -> None:
        v.memory = check_size(memory, f"vm {v.name} memory")
        if v.memory < MiB or v.memory % MiB:
            raise InputError(
                f"vm {v.name} memory: must be a positive whole number of MiB, got {v.memory} bytes"
            )
        v.reservation = check_size(reservation, f"vm {v.name} reservation")
        v.limit = None if limit is None else check_size(limit, f"vm {v.name} limit")
        v.shares = check_shares(shares, f"vm {v.name} shares")
        if v.reservation > v.memory:
            raise InputError(
                f"vm {v.name} reservation: {size_text(v.reservation)} is more than "
                f"its memory {size_text(v.memory)}"
            )
        if v.limit is not None and v.limit > v.memory:
            raise InputError(
                f"vm {v.name} limit: {size_text(v.limit)} is more than its memory "
                f"{size_text(v.memory)} (leave it unset to mean the memory)"
            )
        if v.limit is not None and v.reservation > v.limit:
            raise InputError(
                f"vm {v.name} reservation: {size_text(v.reservation)} is more than "
                f"its limit {size_text(v.limit)}"
            )

    def _check_move(self, name: str, parent: str) -> str:
        self._pool(parent, f"pool {name} parent")
        walk: str | None = parent
        while walk is not None:
            if walk == name:
                raise InputError(
                    f"pool {name} parent: {parent!r} is {name} itself or inside it (a cycle)"
                )
            walk = self._pools[walk].parent
        return parent

    def _check_own_holding(self, op: str, new: PoolRecord) -> None:
        ch = new.children_hold
        if not new.expandable and ch > new.reservation:
            raise AdmissionError(
                f"{op}: pool {new.name} (fixed) would have reservation "
                f"{size_text(new.reservation)} but its children hold {size_text(ch)}"
            )
        if new.limit is not None and new.held > new.limit:
            raise AdmissionError(
                f"{op}: pool {new.name} holds {size_text(new.held)} for its children "
                f"(borrowing {size_text(new.held - new.reservation)}), over the new limit "
                f"{size_text(new.limit)}"
            )

    @staticmethod
    def _plan_move(
        plan: AdmissionPlan,
        old_parent: str | None,
        new_parent: str | None,
        old_held: int,
        new_held: int,
    ) -> None:
        assert old_parent is not None and new_parent is not None
        if old_parent == new_parent:
            plan.shift(old_parent, new_held - old_held)
        else:  # release first, so what the move frees is available to it
            plan.shift(old_parent, -old_held)
            plan.shift(new_parent, new_held)

    def _replace_pool(self, old: PoolRecord, new: PoolRecord) -> None:
        if old.parent != new.parent:
            assert old.parent is not None and new.parent is not None
            self._pools[old.parent].child_pools.discard(old.name)
            self._pools[new.parent].child_pools.add(old.name)
        old.parent, old.reservation, old.limit = new.parent, new.reservation, new.limit
        old.shares, old.expandable = new.shares, new.expandable

    def _replace_vm(self, old: VMRecord, new: VMRecord) -> None:
        if old.pool != new.pool:
            self._pools[old.pool].child_vms.discard(old.name)
            self._pools[new.pool].child_vms.add(old.name)
        self._vms[old.name] = new

    def _commit(self, plan: AdmissionPlan, apply: Callable[[], None], name: str) -> Admission:
        apply()
        for pool_name, ch in plan.children_hold.items():
            self._pools[pool_name].children_hold = ch
        self._changed.add(name)
        return Admission(plan.operation, tuple(plan.steps))
