"""Scenario files: the examples load, bad input is refused with the key path, traces replay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memvisor.agent.prefetch import READ_RATE
from memvisor.errors import ConfigError, InputError
from memvisor.sim import load_scenario, parse_scenario, simulate
from memvisor.units import MiB

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "scenarios").glob("*.toml"))

MINIMAL = {
    "host": {"memory": "512MiB"},
    "guest": {"kernel": "8MiB", "swap": "64MiB"},
    "workloads": {"w": {"footprint": "64MiB", "working_set": "32MiB", "access_rate": 100}},
    "vms": {"a": {"memory": "128MiB", "workload": "w"}},
}


def with_changes(**tables: dict) -> dict:
    data = {k: dict(v) for k, v in MINIMAL.items()}
    for key, value in tables.items():
        data[key] = value
    return data


def problems(data: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        parse_scenario(data, "test.toml")
    return dict(err.value.problems)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    sc = load_scenario(path)
    assert sc.vms and sc.duration > 0


def test_minimal_scenario_defaults() -> None:
    sc = parse_scenario(MINIMAL, "test.toml")
    assert sc.policy.name == "none" and sc.tick == 1.0 and sc.seed == 0
    (vm,) = sc.vms
    assert vm.workload.footprint == 64 * MiB and vm.workload.phases[0].working_set == 32 * MiB
    assert vm.shares == 10 * 128  # normal: 10 per configured MiB


def test_count_expands_names() -> None:
    sc = parse_scenario(with_changes(vms={"web": {"memory": "128MiB", "count": 12}}), "t")
    assert [v.name for v in sc.vms][:2] == ["web-01", "web-02"] and len(sc.vms) == 12


def test_every_problem_is_reported_with_its_key_path() -> None:
    bad = with_changes(
        host={"memory": "lots", "swap_victims": "oldest", "ksm": {"run": 7}},
        workloads={"w": {"footprint": "64MiB", "skew": -1, "colour": "red"}},
        vms={"a": {"memory": "128MiB", "workload": "nope", "shares": "huge"}},
        simulation={"tick": 0},
    )
    found = problems(bad)
    for path in (
        "host.memory",
        "host.swap_victims",
        "host.ksm.run",
        "workloads.w.skew",
        "workloads.w.colour",
        "vms.a.workload",
        "vms.a.shares",
        "simulation.tick",
    ):
        assert path in found, (path, found)
    assert "nope" in found["vms.a.workload"]


def test_missing_host_memory_is_required() -> None:
    assert "host.memory" in problems(with_changes(host={}))


def test_phases_need_durations_but_the_last() -> None:
    wl = {"footprint": "64MiB", "phases": [{"working_set": "8MiB"}, {"working_set": "16MiB"}]}
    assert "workloads.w.phases[0].duration" in problems(with_changes(workloads={"w": wl}))


def test_release_is_a_phase_key_and_must_be_a_boolean() -> None:
    phases = [
        {"duration": 10, "working_set": "48MiB"},
        {"working_set": "8MiB", "release": True},
    ]
    sc = parse_scenario(
        with_changes(workloads={"w": {"footprint": "64MiB", "phases": phases}}), "test.toml"
    )
    got = [p.release for p in sc.vms[0].workload.phases]
    assert got == [False, True]
    phases[1]["release"] = "yes"
    bad = problems(with_changes(workloads={"w": {"footprint": "64MiB", "phases": phases}}))
    assert "workloads.w.phases[1].release" in bad


def test_workload_must_fit_the_vm() -> None:
    found = problems(with_changes(workloads={"w": {"footprint": "1GiB"}}))
    assert any("do not fit" in msg for msg in found.values())


def test_pools_admission_refusal_names_the_vm() -> None:
    data = with_changes(
        pools={"small": {"reservation": "64MiB", "limit": "64MiB", "expandable": False}},
        vms={"a": {"memory": "128MiB", "pool": "small", "reservation": "100MiB"}},
    )
    assert "vms.a" in problems(data)


def test_unknown_pool_parent() -> None:
    assert "pools.p.parent" in problems(with_changes(pools={"p": {"parent": "ghost"}}))


def test_policy_is_selected_by_name() -> None:
    from memvisor.sim import policy_for

    sc = parse_scenario(with_changes(policy={"name": "mom"}), "t")
    assert type(policy_for(sc)).__name__ == "MomPolicy"
    sc = parse_scenario(with_changes(policy={"name": "nonsense"}), "t")
    with pytest.raises(InputError, match="nonsense"):
        policy_for(sc)


def test_bad_toml_syntax(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[host\nmemory=1")
    with pytest.raises(ConfigError):
        load_scenario(p)


def test_missing_file_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        load_scenario(tmp_path / "nope.toml")


def write_trace(path: Path, rows: list[str]) -> None:
    path.write_text("time,vm,page,write\n" + "\n".join(rows) + "\n")


def trace_scenario(tmp_path: Path, rows: list[str]) -> Path:
    write_trace(tmp_path / "t.csv", rows)
    p = tmp_path / "s.toml"
    p.write_text(
        """
[simulation]
duration = 3
[host]
memory = "512MiB"
[guest]
kernel = "8MiB"
[workloads.replay]
footprint = "16MiB"
trace = "t.csv"
[vms.r]
memory = "64MiB"
workload = "replay"
[vms.other]
memory = "64MiB"
workload = "replay"
"""
    )
    return p


def test_trace_replay_counts_each_vms_accesses(tmp_path: Path) -> None:
    rows = [f"{i / 1000:.3f},r,{i % 4096},{i % 2}" for i in range(1500)]
    rows += ["2.5,*,1,0", "2.6,*,2,1"]
    result = simulate(load_scenario(trace_scenario(tmp_path, rows)), check_invariants=True)
    r, other = result.vm_names.index("r"), result.vm_names.index("other")
    np.testing.assert_array_equal(result.vm["demand"][:, r], [1000, 500, 0])
    np.testing.assert_array_equal(result.vm["demand"][:, other], [0, 0, 2])


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("x,r,1,0", "line 2"),
        ("1,r,-1,0", "page must be"),
        ("1,r,1,2", "write must be"),
        ("1,r,999999,0", "beyond footprint"),
    ],
)
def test_trace_errors_name_the_line(tmp_path: Path, row: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_scenario(trace_scenario(tmp_path, [row]))


def test_scenario_pools_reach_the_scheduler() -> None:
    from memvisor.sim import policy_for

    sc = load_scenario(Path(__file__).parents[2] / "examples/scenarios/overcommit-16.toml")
    assert {p.name for p in sc.pools} == {"prod", "batch"}
    policy = policy_for(sc)
    pools = {p.name: p for p in policy.settings.pools}  # type: ignore[attr-defined]
    assert pools["prod"].reservation == 2 * 1024 * MiB and pools["batch"].shares == 163840
    assert {v.pool for v in sc.vms} == {"prod", "batch"}


def test_guest_prefetch_key_is_read_and_checked(tmp_path: Path) -> None:
    p = trace_scenario(tmp_path, ["0.5,r,1,0"])
    p.write_text(p.read_text().replace('kernel = "8MiB"', 'kernel = "8MiB"\nprefetch = true'))
    vms = load_scenario(p).vms
    assert all(v.guest.prefetch and v.guest.prefetch_rate == READ_RATE for v in vms)
    p.write_text(p.read_text().replace("prefetch = true", 'prefetch = true\nprefetch_rate = "0"'))
    assert all(v.guest.prefetch_rate == 0 for v in load_scenario(p).vms)
    p.write_text(p.read_text().replace('prefetch_rate = "0"', 'prefetch_rate = "1000"'))
    with pytest.raises(ConfigError, match="prefetch_rate"):
        load_scenario(p)  # not a whole number of pages
    p.write_text(p.read_text().replace("prefetch = true", 'prefetch = "yes"'))
    with pytest.raises(ConfigError, match="prefetch"):
        load_scenario(p)
