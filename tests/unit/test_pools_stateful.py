"""Random operation sequences against a simple reference model (hypothesis stateful testing).

The reference keeps plain records and judges every operation declaratively: apply it to a copy,
recompute every holding from scratch, and accept the result only if every rule holds (fixed
pools and the root within their reservation, every pool within its limit). PoolTree decides
procedurally along one path with cached aggregates; the two must agree on every accept/refuse,
on every number afterwards, and a refused operation must leave PoolTree's canonical
serialization byte-for-byte unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from memvisor.errors import AdmissionError, InputError, MemvisorError, NotFoundError
from memvisor.pools import PoolTree

UNIT = 64 * 2**20
POOLS = ["p0", "p1", "p2", "p3", "p4"]
VMS = ["v0", "v1", "v2", "v3", "v4", "v5"]
pool_names = st.sampled_from(POOLS)
vm_names = st.sampled_from([*VMS, "p0"])  # "p0": a VM name colliding with a pool
sizes = st.integers(0, 12).map(lambda n: n * UNIT)
limits = st.one_of(st.none(), st.none(), sizes)
memories = st.sampled_from([1, 2, 4, 8]).map(lambda n: n * UNIT)


class Refused(Exception):
    """The reference model's verdict: ``kind`` is "input" or "admission"."""

    def __init__(self, kind: str) -> None:
        self.kind = kind


@dataclass
class Model:
    capacity: int
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)

    def children_hold(self, pool: str) -> int:
        return self.all_children_holds()[pool]

    def held(self, pool: str) -> int:
        return max(self.pools[pool]["res"], self.children_hold(pool))

    def all_children_holds(self) -> dict[str, int]:
        """What each pool's children hold, recomputed from scratch (children first)."""
        holds: dict[str, int] = {}

        def compute(pool: str) -> int:
            if pool not in holds:
                kids = [p for p, r in self.pools.items() if r["parent"] == pool]
                total = sum(max(self.pools[k]["res"], compute(k)) for k in kids)
                on = [v["res"] for v in self.vms.values() if v["pool"] == pool and v["on"]]
                holds[pool] = total + sum(on)
            return holds[pool]

        for pool in ["root", *self.pools]:
            compute(pool)
        return holds

    def admissible(self) -> bool:
        holds = self.all_children_holds()
        if holds["root"] > self.capacity:
            return False
        for name, p in self.pools.items():
            ch = holds[name]
            if not p["exp"] and ch > p["res"]:
                return False
            if p["limit"] is not None and max(ch, p["res"]) > p["limit"]:
                return False
        return True

    def statically_valid(self) -> bool:
        for name, p in self.pools.items():
            if p["limit"] is not None and p["res"] > p["limit"]:
                return False
            seen, walk = {name}, p["parent"]
            while walk != "root":
                if walk in seen or walk not in self.pools:
                    return False
                seen.add(walk)
                walk = self.pools[walk]["parent"]
        for v in self.vms.values():
            limit = v["memory"] if v["limit"] is None else v["limit"]
            if v["res"] > v["memory"] or limit > v["memory"] or v["res"] > limit:
                return False
            if v["pool"] != "root" and v["pool"] not in self.pools:
                return False
        return True


def judge(model: Model, change: Any) -> Model:
    """Apply ``change`` to a copy; raise Refused if any rule would break."""
    new = copy.deepcopy(model)
    change(new)
    if not new.statically_valid():
        raise Refused("input")
    if not new.admissible():
        raise Refused("admission")
    return new


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tree = PoolTree(16 * UNIT)
        self.model = Model(16 * UNIT)

    def run(self, action: Any, change: Any, precheck: str | None = None) -> None:
        """Run ``action`` on the tree and ``change`` through the reference; compare."""
        before = self.tree.canonical()
        try:
            if precheck is not None:
                raise Refused(precheck)
            expected: Model | Refused = judge(self.model, change)
        except Refused as refusal:
            expected = refusal
        try:
            action()
        except MemvisorError as exc:
            assert isinstance(expected, Refused), f"tree refused what the model accepts: {exc}"
            want = (
                (AdmissionError,) if expected.kind == "admission" else (InputError, NotFoundError)
            )
            assert isinstance(exc, want), f"expected {expected.kind} refusal, got {exc!r}"
            assert self.tree.canonical() == before, "a refused operation changed the tree"
            return
        assert not isinstance(expected, Refused), f"tree accepted a {expected.kind} refusal"
        self.model = expected

    def exists(self, name: str) -> bool:
        return name in self.model.pools or name in self.model.vms or name == "root"

    def pick(self, data: st.DataObject, existing: list[str], universe: list[str]) -> str:
        """Mostly an existing name (so operations get far), sometimes any name."""
        if existing and data.draw(st.integers(0, 9)) < 8:
            return data.draw(st.sampled_from(sorted(existing)))
        return data.draw(st.sampled_from(universe))

    def pick_pool(self, data: st.DataObject) -> str:
        return self.pick(data, [*self.model.pools, "root", "root"], [*POOLS, "root"])

    def pick_vm(self, data: st.DataObject) -> str:
        return self.pick(data, list(self.model.vms), [*VMS, "p0"])

    def is_pool(self, name: str) -> bool:
        return name == "root" or name in self.model.pools

    @rule(data=st.data(), name=pool_names, res=sizes, limit=limits, exp=st.booleans())
    def add_pool(
        self, data: st.DataObject, name: str, res: int, limit: int | None, exp: bool
    ) -> None:
        parent = self.pick_pool(data)

        def change(m: Model) -> None:
            m.pools[name] = {"parent": parent, "res": res, "limit": limit, "exp": exp}

        pre = "input" if self.exists(name) or not self.is_pool(parent) else None
        self.run(lambda: self.tree.add_pool(name, parent, res, limit, "normal", exp), change, pre)

    @rule(data=st.data(), name=vm_names, memory=memories, res=sizes, limit=limits)
    def add_vm(
        self, data: st.DataObject, name: str, memory: int, res: int, limit: int | None
    ) -> None:
        pool = self.pick_pool(data)
        if data.draw(st.integers(0, 9)) < 8:  # mostly valid reservations
            res = min(res, memory)
            limit = None if limit is None else min(max(limit, res), memory)

        def change(m: Model) -> None:
            m.vms[name] = {"pool": pool, "memory": memory, "res": res, "limit": limit, "on": False}

        pre = "input" if self.exists(name) or not self.is_pool(pool) else None
        self.run(lambda: self.tree.add_vm(name, pool, memory, res, limit), change, pre)

    @rule(data=st.data(), on=st.booleans())
    def power(self, data: st.DataObject, on: bool) -> None:
        name = self.pick_vm(data)

        def change(m: Model) -> None:
            m.vms[name]["on"] = on

        vm = self.model.vms.get(name)
        pre = "input" if vm is None or vm["on"] == on else None
        action = self.tree.power_on if on else self.tree.power_off
        self.run(lambda: action(name), change, pre)

    @rule(data=st.data(), res=sizes)
    def set_reservation(self, data: st.DataObject, res: int) -> None:
        name = self.pick(data, [*self.model.pools, *self.model.vms], POOLS + VMS + ["root"])

        def change(m: Model) -> None:
            if name == "root":
                m.capacity = res
            else:
                (m.pools.get(name) or m.vms[name])["res"] = res

        pre = None if self.exists(name) else "input"
        self.run(lambda: self.tree.set_reservation(name, res), change, pre)

    @rule(data=st.data(), limit=limits, exp=st.booleans())
    def update_pool(self, data: st.DataObject, limit: int | None, exp: bool) -> None:
        name = self.pick(data, list(self.model.pools), POOLS)
        parent = self.pick_pool(data)

        def change(m: Model) -> None:
            m.pools[name].update(parent=parent, limit=limit, exp=exp)

        pre = None if name in self.model.pools and self.is_pool(parent) else "input"
        act = lambda: self.tree.update_pool(name, parent=parent, limit=limit, expandable=exp)  # noqa: E731
        self.run(act, change, pre)

    @rule(data=st.data(), limit=limits, memory=memories)
    def update_vm(self, data: st.DataObject, limit: int | None, memory: int) -> None:
        name, pool = self.pick_vm(data), self.pick_pool(data)

        def change(m: Model) -> None:
            m.vms[name].update(pool=pool, limit=limit, memory=memory)

        pre = None if name in self.model.vms and self.is_pool(pool) else "input"
        act = lambda: self.tree.update_vm(name, pool=pool, limit=limit, memory=memory)  # noqa: E731
        self.run(act, change, pre)

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        name = self.pick(data, [*self.model.pools, *self.model.vms], POOLS + VMS)

        def change(m: Model) -> None:
            (m.pools if name in m.pools else m.vms).pop(name)

        if name in self.model.pools:
            busy = any(p["parent"] == name for p in self.model.pools.values()) or any(
                v["pool"] == name for v in self.model.vms.values()
            )
            pre = "input" if busy else None
            self.run(lambda: self.tree.remove_pool(name), change, pre)
        else:
            vm = self.model.vms.get(name)
            pre = "input" if vm is None or vm["on"] else None
            self.run(lambda: self.tree.remove_vm(name), change, pre)

    @invariant()
    def agrees_with_model(self) -> None:
        assert self.tree.verify() == []
        m = self.model
        assert self.tree.capacity == m.capacity
        assert self.tree.reserved("root") == m.children_hold("root") <= m.capacity
        for name, p in m.pools.items():
            ch = m.children_hold(name)
            view = self.tree.pool(name)
            assert (view.reserved, view.held) == (ch, max(ch, p["res"]))
            assert view.unreserved == max(0, p["res"] - ch)
            assert view.borrowed == max(0, ch - p["res"])
            assert p["exp"] or view.borrowed == 0
        assert {v.name: v.powered_on for v in self.tree.vms()} == {
            n: v["on"] for n, v in m.vms.items()
        }
        assert sorted(p.name for p in self.tree.pools()) == sorted([*m.pools, "root"])

    @invariant()
    def headroom_is_exact(self) -> None:
        """A power-on of exactly headroom(p) would be admitted, one byte more would not."""
        for pool in ["root", *self.model.pools]:
            room = self.tree.headroom(pool)
            for extra, admitted in ((room, True), (room + 1, False)):
                probe = {"pool": pool, "memory": extra, "res": extra, "limit": None, "on": True}
                self.model.vms["probe"] = probe
                try:
                    assert self.model.admissible() == admitted, (pool, extra)
                finally:
                    del self.model.vms["probe"]


PoolMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPoolMachine = PoolMachine.TestCase
