"""The policy bench's own logic: the foresight reference and the verdict."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_policies as bp
from memvisor.policy.scheduler import MemvisorScheduler
from memvisor.sim import Phase, SimVMConfig, Workload
from memvisor.units import MiB


def _vm(name: str, phases: tuple[Phase, ...]) -> SimVMConfig:
    wl = Workload(name=name, footprint=128 * MiB, phases=phases)
    return SimVMConfig(name=name, memory=256 * MiB, workload=wl)


def test_foresight_sees_the_busy_phase_coming_and_forgets_the_past() -> None:
    idle = Phase(working_set=16 * MiB, access_rate=10, duration=60.0)
    busy = Phase(working_set=128 * MiB, access_rate=1000, duration=60.0)
    f = bp.Foresight([_vm("a", (idle, busy, idle))], horizon=30.0)
    f.update("a", 1000.0, 0.9)  # the first observation is the workloads' time zero
    assert f.estimate("a") == pytest.approx(16 / 256)  # busy starts at 60 s, beyond 30 s
    f.update("a", 1031.0, None)
    assert f.estimate("a") == pytest.approx(128 / 256)  # 31..61 s overlaps the busy phase
    f.update("a", 1125.0, None)
    assert f.estimate("a") == pytest.approx(16 / 256)  # 125..155 s: idle again, sample ignored


def test_foresight_is_only_built_into_the_memvisor_scheduler() -> None:
    vms = [_vm("a", (Phase(working_set=16 * MiB, access_rate=10),))]
    p = bp.make_policy("memvisor", {"foresight": 60.0}, vms)
    assert isinstance(p, MemvisorScheduler) and isinstance(p.activity, bp.Foresight)
    plain = bp.make_policy("memvisor", {}, vms)
    assert isinstance(plain, MemvisorScheduler) and not isinstance(plain.activity, bp.Foresight)


def _row(policy: str, thr: float, worst: float, seed: int = 7, vm: str = "vm") -> bp.Outcome:
    return bp.Outcome("s", policy, "cold start", 10, thr, worst, vm, 0, 0, 0, 0, 0, 0.0, seed)


def test_verdict_counts_a_tie_as_not_beaten_and_judges_the_reference_apart() -> None:
    rows = [
        _row("memvisor", 100.0, 1.05),
        _row("none", 99.0, 1.05),  # tie on worst slowdown: memvisor does not beat it
        _row("mom", 90.0, 1.2),
        _row("(memvisor + 120 s foresight)", 200.0, 1.0),  # a reference, not a baseline
    ]
    text = bp.verdict(rows)
    assert (
        "memvisor does not beat none (worst slowdown) (seeds won on both: mom 1/1, none 0/1); "
        "with foresight it would beat every baseline" in text
    )
    assert "beat mom" not in text


def test_summary_takes_medians_over_seeds_and_ratios_within_a_seed() -> None:
    rows = [
        _row("memvisor", 110.0, 1.10, seed=1, vm="a"),
        _row("memvisor", 90.0, 1.30, seed=2, vm="b"),
        _row("memvisor", 105.0, 1.20, seed=3, vm="b"),
        _row("none", 100.0, 1.2, seed=1),
        _row("none", 80.0, 1.2, seed=2),
        _row("none", 100.0, 1.2, seed=3),
    ]
    ours = next(s for s in bp.summarize(rows) if s.policy == "memvisor")
    assert ours.seeds == 3
    assert ours.throughput == 105.0  # median of 110, 90, 105
    # per-seed ratios 1.1, 1.125, 1.05: their median, not 105 / 100
    assert ours.ratio == pytest.approx(1.1)
    assert ours.worst_slowdown == pytest.approx(1.2)
    assert ours.worst_vm == "b"  # the VM most often worst


def test_verdict_judges_medians_and_counts_the_seeds_won_on_both() -> None:
    rows = [
        _row("memvisor", 110.0, 1.1, seed=1),
        _row("memvisor", 99.0, 1.1, seed=2),  # loses seed 2 on throughput
        _row("memvisor", 101.0, 1.3, seed=3),  # loses seed 3 on worst slowdown
        *(_row("none", 100.0, 1.2, seed=k) for k in (1, 2, 3)),
    ]
    text = bp.verdict(rows)
    assert "memvisor beats every baseline (seeds won on both: none 1/3)" in text


def test_a_restart_without_the_activity_history_changes_the_steady_state_only() -> None:
    plain = bp.run("mixed-150", "memvisor", 20, 20, seed=3)
    lost = bp.run("mixed-150", "memvisor", 20, 20, seed=3, settings={"restart": "lose"})
    assert [r.window for r in plain] == ["cold start", "steady state", "whole run"]
    assert lost[0] == dataclasses.replace(plain[0], wall=lost[0].wall)
    assert lost[1].reclaimed_pages != plain[1].reclaimed_pages


def test_the_whole_run_window_adds_up_both_windows() -> None:
    cold, steady, whole = bp.run("idle-tax", "none", 15, 25, seed=2)
    assert whole.seconds == 40
    assert whole.throughput == pytest.approx(
        (cold.throughput * 15 + steady.throughput * 25) / 40, rel=1e-9
    )
    assert whole.worst_slowdown >= min(cold.worst_slowdown, steady.worst_slowdown)
    assert whole.peak_swapped_mib == max(cold.peak_swapped_mib, steady.peak_swapped_mib)


def test_the_old_kernel_model_rows_reach_the_simulated_host() -> None:
    kswapd = bp.run("pressure-150", "none", 12, 0, seed=1)[0]
    direct = bp.run("pressure-150", "none", 12, 0, seed=1, settings={"background_reclaim": False})
    assert direct[0].throughput != kswapd.throughput
    with pytest.raises(ValueError, match="background_reclaim"):
        bp.run("pressure-150", "none", 1, 0, settings={"background_reclaim": "no"})
