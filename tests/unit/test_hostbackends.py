"""The daemon's backend adapters: the capacity budget over a real host's observations, and the
simulator driven in real time."""

from __future__ import annotations

from dataclasses import replace

import pytest
from fakehost import FakeHost

from memvisor.errors import InputError
from memvisor.hostbackends import BackendOptions, Budgeted, RealTimeSim, make_host, sim_workload
from memvisor.model import KsmStats, VMSpec
from memvisor.units import GiB, MiB


class CountingHost(FakeHost):
    calls: int = 0
    ksm_sharing: int = 0

    def observe_vms(self):  # type: ignore[no-untyped-def]
        self.calls += 1
        return super().observe_vms()

    def observe_host(self):  # type: ignore[no-untyped-def]
        return replace(super().observe_host(), ksm=KsmStats(pages_sharing=self.ksm_sharing))


def test_budget_is_the_capacity_and_vms_are_observed_once() -> None:
    fake = CountingHost(total=24 * GiB)
    fake.add("a")  # consumes 512 MiB
    fake.add("b")
    budget = Budgeted(fake, capacity=GiB + 256 * MiB)
    host = budget.observe_host()
    assert host.total == GiB + 256 * MiB and host.free == 256 * MiB
    assert [v.name for v in budget.observe_vms()] == ["a", "b"] and fake.calls == 1
    budget.observe_vms()  # without an observe_host before: asks the backend
    assert fake.calls == 2


def test_budget_counts_ksm_savings_and_never_exceeds_the_machine() -> None:
    fake = CountingHost(total=24 * GiB)
    fake.add("a")
    fake.ksm_sharing = 64 * MiB // 4096
    assert Budgeted(fake, capacity=GiB).observe_host().free == 512 * MiB + 64 * MiB
    fake.total = 600 * MiB  # the machine itself has only 88 MiB available
    assert Budgeted(fake, capacity=GiB).observe_host().free == 88 * MiB


def test_realtime_sim_advances_by_the_interval_at_least(tmp_path) -> None:  # type: ignore[no-untyped-def]
    host = make_host("sim", 2 * GiB, BackendOptions(tmp_path, interval=1.0))
    host.start([VMSpec("a", 512 * MiB), VMSpec("b", 256 * MiB, reservation=64 * MiB)])
    assert isinstance(host.backend, RealTimeSim)
    t0 = host.backend.observe_host().time
    t1 = host.backend.observe_host().time
    assert t1 - t0 >= 1.0
    assert {v.name for v in host.backend.observe_vms()} == {"a", "b"}
    host.stop(leave_running=False)
    with pytest.raises(InputError, match="not been started"):
        host.backend.observe_host()


def test_workloads_fit_small_and_large_vms() -> None:
    for memory in (128 * MiB, 4 * GiB):
        for i in range(3):
            wl = sim_workload(i, memory)
            assert 0 < wl.footprint < memory - 64 * MiB


def test_unknown_backend_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match="choose one of qemu, sim"):
        make_host("xen", GiB, BackendOptions(tmp_path))
