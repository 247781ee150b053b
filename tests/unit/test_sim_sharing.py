"""Content-based sharing against the known result: N identical VMs whose pages are a fraction s
common content save about s(N-1)/N of their memory once the scanner has merged them."""

from __future__ import annotations

from dataclasses import replace

import pytest
from simhelpers import host, workload

from memvisor.backends.sim.config import GuestConfig, SimVMConfig
from memvisor.backends.sim.pages import SHARED
from memvisor.model import SetKsm
from memvisor.units import MiB

NO_KERNEL = GuestConfig(kernel=0, swap=64 * MiB, kernel_access_rate=0.0)


def identical_vms(n: int, s: float) -> list[SimVMConfig]:
    wl = workload(footprint=120 * MiB, working_set=8 * MiB, common=s, write_fraction=0.0)
    return [
        SimVMConfig(name=f"vm{i}", memory=128 * MiB, workload=wl, guest=NO_KERNEL) for i in range(n)
    ]


def saving_after(n: int, s: float, ticks: int = 4) -> float:
    h = host(2048 * MiB, identical_vms(n, s), ksm_pages_to_scan=20_000, ksm_sleep_millisecs=10)
    for _ in range(ticks):
        h.step()
    assert h.check() == []
    consumed = sum(o.consumed for o in h.observe_vms())
    return 1.0 - h.pt.frames_used() * 4096 / consumed


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("s", [0.3, 0.7])
def test_saving_approaches_s_times_n_minus_1_over_n(n: int, s: float) -> None:
    expected = s * (n - 1) / n
    assert saving_after(n, s) == pytest.approx(expected, abs=0.02)


def test_no_common_content_no_saving() -> None:
    assert saving_after(4, 0.0) == pytest.approx(0.0, abs=1e-9)


def test_writes_break_sharing_copy_on_write() -> None:
    h = host(2048 * MiB, identical_vms(2, 0.8), ksm_pages_to_scan=20_000)
    for _ in range(3):
        h.step()
    shared_before = int(h.pt.counts[:, SHARED].sum())
    vm0 = h.vms[0]
    written = vm0.ws_order[:1000]
    h.write(vm0, written)
    assert h.check() == []
    assert int(h.pt.counts[:, SHARED].sum()) < shared_before
    g = vm0.l2g[written]
    assert (h.pt.content[g] < 0).all()  # new unique content, never matches again


def test_unmerge_restores_private_copies() -> None:
    h = host(2048 * MiB, identical_vms(3, 0.5), ksm_pages_to_scan=20_000)
    for _ in range(3):
        h.step()
    assert h.observe_host().ksm.pages_sharing > 0
    h.apply(SetKsm(run=2))
    ksm = h.observe_host().ksm
    assert ksm.pages_sharing == 0 and ksm.pages_shared == 0 and ksm.run == 2
    assert h.check() == []


def test_scanner_rate_limits_merging() -> None:
    # 10000 pages per 100 ms: 100000 of the 131072 pages are visited in the first second
    h = host(2048 * MiB, identical_vms(4, 0.7), ksm_pages_to_scan=10_000, ksm_sleep_millisecs=100)
    h.step()
    first = int(h.pt.counts[:, SHARED].sum())
    h.step()
    second = int(h.pt.counts[:, SHARED].sum())
    assert 0 < first < second
    assert first <= 100_000


def test_sharing_metric_reports_counts() -> None:
    h = host(2048 * MiB, identical_vms(4, 1.0), ksm_pages_to_scan=20_000)
    for _ in range(3):
        h.step()
    sample = h.observe_vms()[0].sharing
    assert sample is not None and sample.present > 100
    assert sample.mean_harmonic == pytest.approx(4.0, rel=0.05)
    assert sample.expected_freed_per_page == pytest.approx(0.25, rel=0.05)


def test_per_vm_scan_rate_caps_that_vms_scanning() -> None:
    vms = identical_vms(4, 1.0)  # vm0 and vm3 at the host's rate find each other
    vms[2] = replace(vms[2], scan_rate=500.0)
    vms[1] = replace(vms[1], merge=False)
    h = host(2048 * MiB, vms, ksm_pages_to_scan=20_000, ksm_sleep_millisecs=10)
    for _ in range(2):
        h.step()
    shared = h.pt.counts[:, SHARED]
    assert shared[0] > 20_000  # scanned at the host's rate
    assert shared[1] == 0  # merging disabled
    assert 0 < shared[2] <= 1000  # 500 pages/s for 2 s
