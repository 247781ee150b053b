"""SimHost as a HostBackend: the protocol, observations, and refusals of bad actions."""

from __future__ import annotations

from typing import Any

import pytest
from simhelpers import host, vm, workload

from memvisor.backends.base import HostBackend, ManualClock
from memvisor.backends.sim.config import SimHostConfig
from memvisor.backends.sim.host import SimHost
from memvisor.errors import InputError, NotFoundError
from memvisor.model import PowerState, SetBalloon, SetKsm, SetSwapTarget
from memvisor.units import MiB


def small() -> SimHost:
    wl = workload(common=0.3, page_cache=16 * MiB)
    return host(512 * MiB, [vm("a", wl, reservation=32 * MiB), vm("b", wl)])


def test_is_a_host_backend_and_uses_the_manual_clock() -> None:
    clock = ManualClock(100.0)
    h = SimHost(SimHostConfig(memory=512 * MiB), [vm("a", workload())], tick=0.5, clock=clock)
    assert isinstance(h, HostBackend)
    h.step()
    assert clock.now() == 100.5 and h.observe_host().time == 100.5


def test_observations_are_complete_and_consistent() -> None:
    h = small()
    for _ in range(12):
        h.step()
    specs = {s.name: s for s in h.specs()}
    assert specs["a"].reservation == 32 * MiB and specs["b"].memory == 128 * MiB
    host_obs = h.observe_host()
    total_consumed = 0
    for o in h.observe_vms():
        assert o.power is PowerState.ON and o.memory == 128 * MiB
        assert 0 < o.consumed <= o.memory and 0 <= o.shared <= o.consumed
        assert o.guest_free is not None and o.guest_free > 0
        assert o.active_fraction is not None and 0 < o.active_fraction <= 1
        assert o.sharing is not None and o.sharing.sampled > 0
        assert o.throughput is not None and o.throughput > 0
        total_consumed += o.consumed
    saved = total_consumed - (host_obs.total - host_obs.free)
    ksm = host_obs.ksm
    assert saved == (ksm.pages_sharing) * 4096  # consumed counts each mapping of a shared frame


def test_balloon_reaches_its_target_and_frees_host_memory() -> None:
    h = small()
    h.step()
    before = h.observe_host().free
    result = h.apply(SetBalloon("b", 48 * MiB))
    assert result.ok and result.achieved > 0
    h.step()
    obs = {o.name: o for o in h.observe_vms()}
    assert obs["b"].ballooned == 48 * MiB and obs["b"].balloon_target == 48 * MiB
    assert h.observe_host().free > before
    h.apply(SetBalloon("b", 0))
    h.step()
    assert {o.name: o for o in h.observe_vms()}["b"].ballooned == 0


def test_balloon_speed_is_limited() -> None:
    wl = workload(footprint=32 * MiB, working_set=8 * MiB)
    h = host(2048 * MiB, [vm("big", wl, 1024 * MiB)], balloon_rate=100 * MiB)
    h.apply(SetBalloon("big", 600 * MiB))
    assert h.observe_vms()[0].ballooned == 100 * MiB
    h.step()  # the apply above used this tick's budget
    assert h.observe_vms()[0].ballooned == 100 * MiB
    h.step()
    assert h.observe_vms()[0].ballooned == 200 * MiB


def test_swap_target_is_kept_and_never_below_reservation() -> None:
    h = small()
    h.step()
    r = h.apply(SetSwapTarget("a", 0))
    assert r.ok and "reservation" in r.message
    for _ in range(3):
        h.step()
        obs = {o.name: o for o in h.observe_vms()}
        assert obs["a"].consumed <= 32 * MiB + 4096
        assert obs["a"].consumed >= 32 * MiB - 4096
        assert obs["a"].swapped > 0


def test_unknown_vm_and_bad_values_are_refused_without_change() -> None:
    h = small()
    with pytest.raises(NotFoundError, match="ghost"):
        h.apply(SetBalloon("ghost", 0))
    with pytest.raises(InputError):
        h.apply(SetBalloon("a", -1))
    with pytest.raises(InputError):
        h.apply(SetSwapTarget("a", -1))
    with pytest.raises(InputError):
        h.apply(SetKsm(run=3))
    result = h.apply(SetBalloon("a", 120 * MiB))  # more than memory - reservation
    assert not result.ok and "exceeds" in result.message
    assert h.observe_vms()[0].balloon_target == 0
    assert h.check() == []


def test_ksm_settings_apply() -> None:
    h = small()
    assert h.apply(SetKsm(run=0, pages_to_scan=10, sleep_millisecs=50)).ok
    ksm = h.observe_host().ksm
    assert (ksm.run, ksm.pages_to_scan, ksm.sleep_millisecs) == (0, 10, 50)
    h.step()
    assert h.observe_host().ksm.pages_sharing == 0  # stopped scanner merges nothing


def test_bad_setup_is_refused() -> None:
    wl = workload()
    with pytest.raises(InputError, match="unique"):
        host(512 * MiB, [vm("a", wl), vm("a", wl)])
    with pytest.raises(InputError, match="reservations"):
        host(64 * MiB, [vm("a", wl, reservation=100 * MiB)])
    with pytest.raises(InputError, match="fit"):
        host(512 * MiB, [vm("a", workload(footprint=200 * MiB))])


def test_from_specs_builds_a_host_like_the_daemon_config() -> None:
    from memvisor.model import Backing, VMSpec

    specs = [
        VMSpec("web1", memory=256 * MiB, reservation=64 * MiB, pool="prod", backing=Backing.ANON),
        VMSpec("db1", memory=512 * MiB, shares=9000),
    ]
    h = SimHost.from_specs(specs, capacity=600 * MiB, seed=2)
    assert h.specs() == specs
    h.step()
    assert h.check() == []
    assert h.observe_host().total == 600 * MiB
    assert {o.name for o in h.observe_vms()} == {"web1", "db1"}


def test_phases_count_from_the_hosts_start_not_the_clocks_origin() -> None:
    from memvisor.backends.sim.config import Phase, Workload

    wl = Workload(
        footprint=64 * MiB,
        phases=(Phase(duration=2, working_set=8 * MiB, access_rate=100), Phase(access_rate=900)),
    )
    h = SimHost(SimHostConfig(memory=512 * MiB), [vm("a", wl)], clock=ManualClock(1000.0))
    rates = []
    for _ in range(4):
        h.step()
        rates.append(h.vms[0].demand)
    assert rates == [100, 100, 900, 900]


def test_swap_target_on_an_anonymous_vm_is_refused_like_the_qemu_backend() -> None:
    from memvisor.model import Backing

    wl = workload(footprint=96 * MiB, working_set=32 * MiB)
    h = host(256 * MiB, [vm("anon", wl, swap_file=False), vm("file", wl)])
    h.step()
    specs = {s.name: s.backing for s in h.specs()}
    assert specs == {"anon": Backing.ANON, "file": Backing.FILE}
    before = h.observe_vms()[0]
    r = h.apply(SetSwapTarget("anon", 32 * MiB))
    # the QEMU backend's answer (backends/qemu/actions.py): not ok, naming the VM and why
    assert not r.ok and r.achieved == 0
    assert r.message == "anon: anonymous backing has no per-VM swap file; use the balloon"
    h.step()
    after = h.observe_vms()[0]
    assert h.vms[0].resident_limit is None and after.swapped == before.swapped == 0
    assert after.consumed >= before.consumed
    assert h.apply(SetSwapTarget("file", 32 * MiB)).ok  # a file-backed VM takes it


def test_scenario_backing_key_sets_the_swap_file() -> None:
    from memvisor.backends.sim.scenario import parse_scenario
    from memvisor.errors import ConfigError
    from memvisor.model import Backing

    data = {
        "host": {"memory": "1GiB"},
        "vms": {"a": {"memory": "256MiB", "backing": "anon"}, "f": {"memory": "256MiB"}},
    }
    sc = parse_scenario(data, "t.toml")
    assert {v.name: v.swap_file for v in sc.vms} == {"a": False, "f": True}
    h = SimHost(sc.host, sc.vms)
    assert {s.name: s.backing for s in h.specs()} == {"a": Backing.ANON, "f": Backing.FILE}
    data["vms"]["a"]["backing"] = "tmpfs"
    with pytest.raises(ConfigError, match=r"vms\.a\.backing"):
        parse_scenario(data, "t.toml")


@pytest.mark.timeout(300)
def test_scheduler_never_asks_an_anonymous_vm_to_swap() -> None:
    """Anonymous VMs under pressure in HARD/LOW: the scheduler balloons them and swaps only
    the file-backed VM; the simulator would refuse otherwise, so no action fails."""
    from memvisor.model import Snapshot
    from memvisor.policy import get_policy

    busy = workload("busy", footprint=100 * MiB, working_set=90 * MiB, access_rate=20000)
    idle = workload("idle", footprint=100 * MiB, working_set=4 * MiB, access_rate=100)
    vms = [
        vm("anon-busy", busy, swap_file=False),
        vm("anon-idle", idle, swap_file=False),
        vm("file-idle", idle),
    ]
    h = host(240 * MiB, vms, seed=3)
    policy = get_policy("memvisor")
    specs = tuple(h.specs())
    swapped_file = refused = 0
    for _ in range(40):
        snap = Snapshot(h.observe_host(), specs, tuple(h.observe_vms()))
        for d in policy.plan(snap):
            r = h.apply(d.action)
            refused += not r.ok
            if isinstance(d.action, SetSwapTarget):
                assert d.action.vm == "file-idle", d.reason
                swapped_file += 1
        h.step()
        assert h.check() == []
    assert refused == 0
    assert swapped_file > 0  # the host reached HARD/LOW and swapped: the rule was exercised


def _reclaim_under_pressure(**kw: object) -> tuple[SimHost, int, float]:
    """Two VMs whose working sets do not fit: every tick they fault pages back and the host
    kernel must free frames. Returns the host, the pages the VMs reclaimed themselves (direct
    reclaim) and their total stall over 10 ticks."""
    wl = workload(footprint=96 * MiB, working_set=96 * MiB, access_rate=20_000)
    h = host(160 * MiB, [vm("a", wl), vm("b", wl)], seed=2, **kw)
    direct, stall = 0, 0.0
    for _ in range(10):
        h.step()
        direct += sum(v.last.direct_reclaimed for v in h.vms)
        stall += sum(v.last.stall for v in h.vms)
    return h, direct, stall


def test_host_kernel_reclaims_in_the_background_while_the_disk_has_room() -> None:
    h, direct, stall = _reclaim_under_pressure()
    assert h.background_reclaimed > 1000 and direct == 0
    # its writes still take the disk's time
    assert h.disk.pages_written >= h.background_reclaimed
    old, old_direct, old_stall = _reclaim_under_pressure(background_reclaim=False)
    assert old.background_reclaimed == 0 and old_direct > 1000
    assert stall < old_stall  # nobody waits for kswapd's writes


def test_faulting_vm_reclaims_itself_what_a_busy_disk_leaves_to_it() -> None:
    # 8 MiB/s: the VMs' own swap-ins fill the disk's tick, kswapd gets little of it
    h, direct, _ = _reclaim_under_pressure(disk_bandwidth=8 * MiB)
    assert direct > 1000 and h.background_reclaimed > 0


def test_scenario_background_reclaim_key_is_read_and_checked() -> None:
    from memvisor.backends.sim.scenario import parse_scenario
    from memvisor.errors import ConfigError

    vms = {"a": {"memory": "256MiB"}}
    data: dict[str, Any] = {"host": {"memory": "1GiB", "background_reclaim": False}, "vms": vms}
    assert parse_scenario(data, "t.toml").host.background_reclaim is False
    default = parse_scenario({"host": {"memory": "1GiB"}, "vms": vms}, "t.toml")
    assert default.host.background_reclaim
    data["host"]["background_reclaim"] = "no"
    with pytest.raises(ConfigError, match=r"host\.background_reclaim"):
        parse_scenario(data, "t.toml")
