"""Pool tree and admission control (memvisor.pools): the rules of docs/pools.md, one by one."""

from __future__ import annotations

import dataclasses

import pytest

from memvisor.errors import InputError, NotFoundError
from memvisor.pools import POOL_SHARES, AdmissionError, PoolTree

MiB = 2**20
GiB = 2**30


def test_issue_api_example() -> None:
    t = PoolTree(capacity=4 * 2**30)
    t.add_pool(
        "prod", parent="root", reservation=2**30, limit=None, shares="normal", expandable=True
    )
    t.add_vm("web1", pool="prod", memory=2**29, reservation=2**28, limit=None, shares="normal")
    t.power_on("web1")
    assert (t.reserved("prod"), t.unreserved("prod")) == (2**28, 2**30 - 2**28)
    t.power_off("web1")
    t.set_reservation("prod", 2 * 2**30)
    assert t.unreserved("prod") == 2 * GiB
    assert t.reserved("prod") == 0
    assert t.borrowed("prod") == 0
    assert t.unreserved("root") == 2 * GiB
    assert t.verify() == []


def vsphere_example(kid_expandable: bool) -> PoolTree:
    """vSphere "Expandable Reservations Example 2" (Resource Management guide), with GHz read as
    GiB: RP-MOM (reservation 6, fixed here so nothing comes from above it) runs VM-M1 (1);
    its child RP-KID has reservation 2; VM-K1 and VM-K2 reserve 2 each."""
    t = PoolTree(capacity=16 * GiB)
    t.add_pool("RP-MOM", reservation=6 * GiB, expandable=False)
    t.add_vm("VM-M1", pool="RP-MOM", memory=4 * GiB, reservation=1 * GiB)
    t.power_on("VM-M1")
    t.add_pool("RP-KID", parent="RP-MOM", reservation=2 * GiB, expandable=kid_expandable)
    for vm in ("VM-K1", "VM-K2"):
        t.add_vm(vm, pool="RP-KID", memory=4 * GiB, reservation=2 * GiB)
    return t


def test_vsphere_example_power_on_borrows_through_expandable_pool() -> None:
    t = vsphere_example(kid_expandable=True)
    assert t.unreserved("RP-MOM") == 3 * GiB  # 6 - 1 (VM-M1) - 2 (RP-KID)
    t.power_on("VM-K1")  # from RP-KID's own 2
    assert t.borrowed("RP-KID") == 0
    admission = t.power_on("VM-K2")  # borrows 2 from RP-MOM's 3 unreserved
    assert t.borrowed("RP-KID") == 2 * GiB
    assert t.held("RP-KID") == 4 * GiB
    assert t.unreserved("RP-MOM") == 1 * GiB
    assert [(s.pool, s.change, s.passed_up) for s in admission.steps] == [
        ("RP-KID", 2 * GiB, 2 * GiB),
        ("RP-MOM", 2 * GiB, 0),
    ]
    assert t.verify() == []


def test_vsphere_example_power_on_prevented_when_parent_is_short() -> None:
    t = vsphere_example(kid_expandable=True)
    t.add_vm("VM-M2", pool="RP-MOM", memory=4 * GiB, reservation=2 * GiB)
    t.power_on("VM-M2")  # VM-M1 + VM-M2 reserve 3 in RP-MOM
    t.power_on("VM-K1")  # still fine: 2 available locally in RP-KID
    before = t.canonical()
    with pytest.raises(AdmissionError) as err:
        t.power_on("VM-K2")
    assert str(err.value) == (
        "power-on VM-K2: pool RP-KID (expandable) has 0 B unreserved, borrows 2 GiB from its "
        "parent; pool RP-MOM (fixed) has 1 GiB unreserved, needs 2 GiB"
    )
    assert t.canonical() == before


def test_vsphere_example_fixed_kid_pool_is_refused() -> None:
    t = vsphere_example(kid_expandable=False)
    t.power_on("VM-K1")
    before = t.canonical()
    with pytest.raises(AdmissionError, match=r"pool RP-KID \(fixed\) has 0 B unreserved, needs"):
        t.power_on("VM-K2")
    assert t.canonical() == before


def test_refusal_message_names_object_field_and_numbers() -> None:
    t = PoolTree(4 * GiB)
    t.add_pool("prod", reservation=1 * GiB, expandable=False)
    t.add_vm("db", pool="prod", memory=1 * GiB, reservation=768 * MiB)
    t.add_vm("web1", pool="prod", memory=1 * GiB, reservation=512 * MiB)
    t.power_on("db")
    with pytest.raises(AdmissionError) as err:
        t.power_on("web1")
    assert (
        str(err.value) == "power-on web1: pool prod (fixed) has 256 MiB unreserved, needs 512 MiB"
    )
    assert err.value.exit_code == 3


def test_root_never_gives_more_than_capacity() -> None:
    t = PoolTree(1 * GiB)
    t.add_vm("a", memory=1 * GiB, reservation=768 * MiB)
    t.add_vm("b", memory=1 * GiB, reservation=512 * MiB)
    t.power_on("a")
    with pytest.raises(AdmissionError, match=r"root \(host, capacity 1 GiB\) has 256 MiB"):
        t.power_on("b")
    with pytest.raises(AdmissionError, match="add pool p"):
        t.add_pool("p", reservation=512 * MiB)
    assert "p" not in t


def test_borrowing_is_dynamic_and_flows_back() -> None:
    t = PoolTree(8 * GiB)
    t.add_pool("dept", reservation=1 * GiB)
    t.add_pool("team", parent="dept", reservation=0)
    t.add_vm("v", pool="team", memory=4 * GiB, reservation=3 * GiB)
    t.power_on("v")
    assert (t.borrowed("team"), t.borrowed("dept")) == (3 * GiB, 2 * GiB)
    assert t.unreserved("root") == 5 * GiB
    t.power_off("v")
    assert (t.borrowed("team"), t.borrowed("dept")) == (0, 0)
    assert t.unreserved("root") == 7 * GiB
    assert t.held("dept") == 1 * GiB  # a pool always holds its own reservation


def test_limit_caps_reservation_plus_borrowed() -> None:
    t = PoolTree(8 * GiB)
    t.add_pool("p", reservation=1 * GiB, limit=2 * GiB)
    t.add_vm("a", pool="p", memory=4 * GiB, reservation=2 * GiB)
    t.add_vm("b", pool="p", memory=4 * GiB, reservation=1 * GiB)
    t.power_on("a")  # holds 2 = limit
    with pytest.raises(AdmissionError, match=r"pool p would hold 3 GiB .* over its limit 2 GiB"):
        t.power_on("b")
    with pytest.raises(AdmissionError, match="over the new limit"):
        t.set_limit("p", 1536 * MiB)
    with pytest.raises(InputError, match="reservation: 3 GiB is more than its limit 2 GiB"):
        t.set_reservation("p", 3 * GiB)


def test_reservation_change_increase_and_decrease() -> None:
    t = PoolTree(4 * GiB)
    t.add_pool("p", reservation=1 * GiB, expandable=False)
    t.add_vm("v", pool="p", memory=2 * GiB, reservation=512 * MiB)
    t.power_on("v")
    t.set_reservation("v", 1 * GiB)  # increase while on: admitted in p
    assert t.unreserved("p") == 0
    with pytest.raises(AdmissionError, match="pool p \\(fixed\\) has 0 B unreserved"):
        t.set_reservation("v", 1 * GiB + 4096)
    with pytest.raises(AdmissionError, match="children hold 1 GiB"):
        t.set_reservation("p", 512 * MiB)  # a fixed pool cannot go below its children
    t.set_reservation("p", 3 * GiB)
    with pytest.raises(AdmissionError, match="root"):
        t.set_reservation("p", 4 * GiB + MiB)
    t.set_reservation("v", 0)  # decreases always succeed
    t.set_reservation("p", 0)
    assert t.unreserved("root") == 4 * GiB
    t.power_off("v")
    t.set_reservation("v", 2 * GiB)  # off: only checked against memory and limit
    with pytest.raises(InputError, match="more than its memory 2 GiB"):
        t.set_reservation("v", 3 * GiB)


def test_pool_increase_while_borrowing_only_needs_the_difference() -> None:
    t = PoolTree(4 * GiB)
    t.add_pool("p", reservation=0)
    t.add_vm("v", pool="p", memory=2 * GiB, reservation=1 * GiB)
    t.power_on("v")
    admission = t.set_reservation("p", 1536 * MiB)  # held goes 1 GiB -> 1.5 GiB
    assert admission.steps[0].change == 512 * MiB
    assert (t.borrowed("p"), t.unreserved("p")) == (0, 512 * MiB)


def test_fixed_and_expandable_switches() -> None:
    t = PoolTree(4 * GiB)
    t.add_pool("p", reservation=0)
    t.add_vm("v", pool="p", memory=1 * GiB, reservation=1 * GiB)
    t.power_on("v")
    with pytest.raises(AdmissionError, match="fixed"):
        t.update_pool("p", expandable=False)
    t.update_pool("p", reservation=1 * GiB, expandable=False)  # both at once: atomic
    assert t.pool("p").expandable is False
    t.update_pool("p", expandable=True)


def test_validation_errors_name_object_field_and_value() -> None:
    t = PoolTree(4 * GiB)
    t.add_pool("p")
    t.add_pool("q", parent="p")
    t.add_vm("v", pool="q", memory=1 * GiB)
    cases = [
        (lambda: t.add_pool("x", reservation=-1), InputError, "pool x reservation: must not be"),
        (lambda: t.add_pool("x", parent="nope"), NotFoundError, "no pool named 'nope'"),
        (lambda: t.add_pool("p"), InputError, "add pool p: the name is taken by a pool"),
        (lambda: t.add_vm("p", memory=GiB), InputError, "taken by a pool"),
        (lambda: t.add_pool("x", reservation=2, limit=1), InputError, "more than its limit"),
        (lambda: t.add_pool("bad name"), InputError, "pool name 'bad name'"),
        (lambda: t.add_pool("x", shares=-5), InputError, "pool x shares"),
        (lambda: t.add_pool("x", shares="huge"), InputError, "pool x shares"),
        (lambda: t.add_pool("x", expandable="yes"), InputError, "expected true or false"),  # type: ignore[arg-type]
        (lambda: t.add_vm("x", memory=GiB, reservation=2 * GiB), InputError, "more than its mem"),
        (lambda: t.add_vm("x", memory=GiB, limit=2 * GiB), InputError, "limit: 2 GiB is more"),
        (lambda: t.add_vm("x", memory=GiB, reservation=GiB, limit=MiB), InputError, "its limit"),
        (lambda: t.add_vm("x", memory=1000), InputError, "whole number of MiB"),
        (lambda: t.add_vm("x", pool="v", memory=GiB), NotFoundError, "(it is a VM)"),
        (lambda: t.update_pool("p", parent="q"), InputError, "a cycle"),
        (lambda: t.update_pool("p", parent="p"), InputError, "a cycle"),
        (lambda: t.remove_pool("p"), InputError, "not empty: it has pools ['q']"),
        (lambda: t.remove_pool("root"), InputError, "cannot be removed"),
        (lambda: t.power_off("v"), InputError, "already powered off"),
        (lambda: t.set_reservation("ghost", 1), NotFoundError, "no pool or VM named 'ghost'"),
    ]
    before = t.canonical()
    for call, kind, text in cases:
        with pytest.raises(kind) as err:
            call()
        assert text in str(err.value)
        assert t.canonical() == before


def test_remove_powered_on_vm_refused_then_allowed() -> None:
    t = PoolTree(GiB)
    t.add_vm("v", memory=GiB, reservation=MiB)
    t.power_on("v")
    with pytest.raises(InputError, match="power it off first"):
        t.remove_vm("v")
    t.power_off("v")
    t.remove_vm("v")
    assert "v" not in t


def test_shares_resolution() -> None:
    t = PoolTree(GiB)
    for level, value in POOL_SHARES.items():
        t.add_pool(level, shares=level.upper())
        assert t.pool(level).shares == value
    t.add_vm("a", memory=2 * GiB, shares="low")
    t.add_vm("b", memory=2 * GiB, shares="high")
    t.add_vm("c", memory=512 * MiB, shares=777)
    assert [v.shares for v in t.vms()] == [5 * 2048, 20 * 2048, 777]
    t.update_vm("a", memory=1 * GiB)  # named shares follow the memory
    assert t.vm("a").shares == 5 * 1024
    assert POOL_SHARES == {"low": 163840, "normal": 327680, "high": 655360}


def test_moves_are_atomic_and_release_first() -> None:
    t = PoolTree(2 * GiB)
    t.add_pool("a", reservation=0)
    t.add_pool("b", reservation=0, expandable=False)
    t.add_vm("v", pool="a", memory=2 * GiB, reservation=2 * GiB)
    t.power_on("v")
    assert t.unreserved("root") == 0
    with pytest.raises(AdmissionError, match="pool b \\(fixed\\)"):
        t.update_vm("v", pool="b")
    t.update_pool("b", expandable=True)
    t.update_vm("v", pool="b")  # only possible because the old hold is released first
    assert (t.held("a"), t.held("b")) == (0, 2 * GiB)
    t.update_pool("a", parent="b")
    t.update_pool("b", parent="root")
    assert t.verify() == []


def test_capacity_change() -> None:
    t = PoolTree(2 * GiB)
    t.add_pool("p", reservation=GiB)
    with pytest.raises(AdmissionError, match="more than the new capacity"):
        t.set_capacity(512 * MiB)
    t.set_capacity(GiB)
    assert t.capacity == GiB and t.unreserved("root") == 0


def test_views_are_frozen_and_ordered_parents_first() -> None:
    t = PoolTree(4 * GiB)
    t.add_pool("b")
    t.add_pool("a", parent="b")
    t.add_pool("c")
    t.add_vm("v", pool="a", memory=GiB, reservation=GiB)
    t.power_on("v")
    names = [p.name for p in t.pools()]
    assert names == ["root", "b", "a", "c"]
    seen: set[str | None] = {None}
    for p in t.pools():
        assert p.parent in seen
        seen.add(p.name)
    view = t.vm("v")
    assert (view.parent, view.held, view.limit, view.limit_spec) == ("a", GiB, GiB, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.reservation = 0  # type: ignore[misc]
    assert t.pool("b").borrowed == GiB and t.pool("root").limit == 4 * GiB


def test_admission_cost_follows_the_path_not_the_tree() -> None:
    t = PoolTree(1024 * GiB)
    parent = "root"
    for depth in range(6):
        for sibling in range(20):
            t.add_pool(f"p{depth}-{sibling}", parent=parent, reservation=0)
        parent = f"p{depth}-0"
    t.add_vm("deep", pool=parent, memory=GiB, reservation=GiB)
    admission = t.power_on("deep")
    assert [s.pool for s in admission.steps] == [f"p{d}-0" for d in range(5, -1, -1)] + ["root"]
    t.add_pool("stop", parent="p2-0", reservation=4 * GiB)
    t.add_vm("v2", pool="stop", memory=GiB, reservation=GiB)
    assert [s.pool for s in t.power_on("v2").steps] == ["stop"]  # no change above "stop"


def test_records_round_trip() -> None:
    t = vsphere_example(kid_expandable=True)
    t.power_on("VM-K1")
    pools = [t.pool_record(p.name) for p in t.pools() if p.name != "root"]
    vms = [t.vm_record(v.name) for v in t.vms()]
    copy = PoolTree.from_records(t.capacity, reversed(pools), vms)
    assert copy.canonical() == t.canonical()
    changed = t.drain_changes()
    assert "VM-K1" in changed and t.drain_changes() == set()


def test_headroom_is_what_a_power_on_could_get() -> None:
    t = vsphere_example(kid_expandable=True)
    assert (t.headroom("RP-KID"), t.headroom("RP-MOM"), t.headroom("root")) == (
        5 * GiB,  # 2 of its own + 3 unreserved in RP-MOM (fixed: nothing from the host)
        3 * GiB,
        10 * GiB,
    )
    t.update_pool("RP-KID", limit=3 * GiB)
    assert t.headroom("RP-KID") == 3 * GiB  # reservation + borrowed capped by the limit
    t.add_vm("probe", pool="RP-KID", memory=4 * GiB, reservation=3 * GiB + MiB)
    with pytest.raises(AdmissionError, match="over its limit 3 GiB"):
        t.power_on("probe")
    t.set_reservation("probe", 3 * GiB)
    t.power_on("probe")
    assert t.headroom("RP-KID") == 0 and t.pool("RP-KID").headroom == 0
