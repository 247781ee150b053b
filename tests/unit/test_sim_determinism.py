"""Determinism: the same scenario and seed give identical results; another seed does not."""

from __future__ import annotations

import numpy as np
import pytest

from memvisor.sim import load_scenario, simulate

SCENARIO = """
[simulation]
duration = 15
seed = 4

[host]
memory = "400MiB"

[guest]
kernel = "8MiB"
swap = "128MiB"

[workloads.mixed]
footprint = "100MiB"
page_cache = "16MiB"
common_fraction = 0.4
zero_fraction = 0.1

[[workloads.mixed.phases]]
duration = 5
working_set = "16MiB"
access_rate = 500

[[workloads.mixed.phases]]
working_set = "96MiB"
skew = 0.9
access_rate = 8000
write_fraction = 0.2

[vms.m]
count = 4
memory = "128MiB"
workload = "mixed"
"""


@pytest.fixture()
def scenario_path(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(SCENARIO)
    return p


def series(result):
    return {k: v.copy() for k, v in result.vm.items()} | {
        f"host.{k}": v.copy() for k, v in result.host.items()
    }


@pytest.mark.timeout(120)
def test_same_seed_same_results(scenario_path) -> None:
    a = simulate(load_scenario(scenario_path), check_invariants=True)
    b = simulate(load_scenario(scenario_path))
    sa, sb = series(a), series(b)
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)
    assert a.host_state == b.host_state
    assert a.to_json()["vms"] == b.to_json()["vms"]


@pytest.mark.timeout(120)
def test_other_seed_other_results(scenario_path) -> None:
    a = simulate(load_scenario(scenario_path))
    c = simulate(load_scenario(scenario_path), seed=5)
    assert not np.array_equal(a.vm["throughput"], c.vm["throughput"])


def test_observing_does_not_change_the_simulation(scenario_path) -> None:
    from memvisor.sim import SimHost

    sc = load_scenario(scenario_path)
    quiet = SimHost(sc.host, sc.vms, seed=sc.seed)
    watched = SimHost(sc.host, sc.vms, seed=sc.seed)
    for _ in range(8):
        quiet.step()
        watched.observe_vms()
        watched.observe_vms()
        watched.step()
    np.testing.assert_array_equal(quiet.pt.state, watched.pt.state)
    np.testing.assert_array_equal(quiet.pt.content, watched.pt.content)
