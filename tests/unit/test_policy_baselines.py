"""Baselines (oVirt MOM, Proxmox VE autoballoon, none) and the policy registry."""

from __future__ import annotations

import pytest
from policy_snapshots import snapshot, vm

from memvisor.errors import InputError
from memvisor.model import SetBalloon
from memvisor.policy import POLICIES, Policy, get_policy
from memvisor.policy.baselines import MomPolicy, ProxmoxPolicy, _PveVM, compute_alg1
from memvisor.units import GiB, MiB


def targets(decisions: list) -> dict[str, int]:
    return {d.action.vm: d.action.target for d in decisions if isinstance(d.action, SetBalloon)}


# --- MOM -------------------------------------------------------------------------------------


def test_mom_shrinks_by_five_percent_under_pressure() -> None:
    vms = [vm("a", 1000 * MiB, guest_free=600 * MiB)]
    out = MomPolicy().plan(snapshot(vms, 4 * GiB, int(0.10 * 4 * GiB)))
    # guest memory 1000 -> 950 MiB: the balloon holds 50 MiB
    assert targets(out) == {"a": 50 * MiB}
    assert "mom" in out[0].reason and "shrink" in out[0].reason


def test_mom_shrink_stops_at_used_plus_scaled_free_margin() -> None:
    # used 900 MiB; host free 10% of 20% threshold -> guest keeps 10% of 1000 free: floor 1000
    vms = [vm("a", 1000 * MiB, guest_free=100 * MiB)]
    out = MomPolicy().plan(snapshot(vms, 4 * GiB, int(0.10 * 4 * GiB)))
    assert targets(out) == {}


def test_mom_critical_pressure_forces_guest_below_its_use() -> None:
    vms = [vm("a", 1000 * MiB, guest_free=0)]
    out = MomPolicy().plan(snapshot(vms, 4 * GiB, int(0.02 * 4 * GiB)))
    # margin -5% + 2% = -3% of 1000: the guest goes to 970 MiB, 30 below what it uses
    assert targets(out)["a"] == pytest.approx(30 * MiB, abs=2)


def test_mom_grows_by_five_percent_without_pressure() -> None:
    vms = [vm("a", 1000 * MiB, balloon=500 * MiB, guest_free=400 * MiB)]
    out = MomPolicy().plan(snapshot(vms, 4 * GiB, int(0.5 * 4 * GiB)))
    assert targets(out) == {"a": 1000 * MiB - int(500 * MiB * 1.05)}


def test_mom_skips_changes_under_a_quarter_percent() -> None:
    vms = [vm("a", 1000 * MiB, balloon=1 * MiB, guest_free=400 * MiB)]
    out = MomPolicy().plan(snapshot(vms, 4 * GiB, int(0.5 * 4 * GiB)))
    assert targets(out) == {}  # growing 999 -> 1000 MiB is 0.1%


def test_mom_keeps_the_reservation() -> None:
    vms = [vm("a", 1000 * MiB, reservation=990 * MiB, guest_free=600 * MiB)]
    out = MomPolicy().plan(snapshot(vms, 4 * GiB, int(0.10 * 4 * GiB)))
    assert targets(out) == {"a": 10 * MiB}


# --- Proxmox ---------------------------------------------------------------------------------


def pve(name: str, balloon: int, shares: int = 1000, freemem: int | None = 500 * MiB) -> _PveVM:
    return _PveVM(name, balloon * MiB, 256 * MiB, 1024 * MiB, shares, freemem)


def test_proxmox_shrinks_by_shares_at_most_100_mib_per_vm() -> None:
    res = compute_alg1([pve("a", 1024), pve("b", 1024)], -1024 * MiB, 100 * MiB, 10 * MiB)
    assert res == {"a": 924 * MiB, "b": 924 * MiB}


def test_proxmox_distributes_by_shares_above_the_floor() -> None:
    # goal -100 MiB, shares 3:1 over (1024-256) x 2 above the floors: desired a = 256 + 3/4 x
    # 1436 = 1333 -> capped at maxmem; b = 256 + 1/4 x 1436 = 615 -> limited to -100 MiB
    res = compute_alg1(
        [pve("a", 1024, shares=3000), pve("b", 1024, shares=1000)], -100 * MiB, 100 * MiB, 10 * MiB
    )
    assert res["b"] == 924 * MiB and res.get("a", 1024 * MiB) == 1024 * MiB


def test_proxmox_dead_band_of_ten_mib() -> None:
    assert compute_alg1([pve("a", 1000)], 9 * MiB, 100 * MiB, 10 * MiB) == {}
    assert compute_alg1([pve("a", 1000)], -9 * MiB, 100 * MiB, 10 * MiB) == {}


def test_proxmox_grows_vms_under_pressure_first() -> None:
    res = compute_alg1(
        [pve("calm", 700), pve("tight", 700, freemem=10 * MiB)], 50 * MiB, 100 * MiB, 10 * MiB
    )
    assert res == {"tight": 750 * MiB}


def test_proxmox_acts_every_ten_seconds_toward_eighty_percent_use() -> None:
    p = ProxmoxPolicy()
    vms = [vm("a", 2 * GiB, guest_free=1 * GiB), vm("b", 2 * GiB, guest_free=1 * GiB)]
    first = p.plan(snapshot(vms, 4 * GiB, int(0.05 * 4 * GiB), time=0.0))
    assert targets(first) == {"a": 100 * MiB, "b": 100 * MiB}
    assert "target 80%" in first[0].reason
    assert p.plan(snapshot(vms, 4 * GiB, int(0.05 * 4 * GiB), time=5.0)) == []
    assert p.plan(snapshot(vms, 4 * GiB, int(0.05 * 4 * GiB), time=10.0)) != []


# --- none and the registry -------------------------------------------------------------------


def test_none_decides_nothing() -> None:
    vms = [vm("a", 1 * GiB)]
    assert get_policy("none").plan(snapshot(vms, GiB, 0)) == []


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_registry_builds_every_policy(name: str) -> None:
    p = get_policy(name)
    assert isinstance(p, Policy) and p.name == name


def test_registry_passes_settings_and_refuses_unknown_ones() -> None:
    p = get_policy("memvisor", tax=0.5)
    assert p.settings.tax == 0.5  # type: ignore[attr-defined]
    with pytest.raises(InputError, match="unknown setting"):
        get_policy("mom", bogus=1)
    with pytest.raises(InputError, match="unknown policy 'vmware'"):
        get_policy("vmware")
    with pytest.raises(InputError, match="tax"):
        get_policy("memvisor", tax=2.0)
