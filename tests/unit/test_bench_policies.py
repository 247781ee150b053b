"""The policy bench's own logic: the foresight reference and the verdict."""

from __future__ import annotations

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


def _row(policy: str, thr: float, worst: float) -> bp.Outcome:
    return bp.Outcome("s", policy, "cold start", 10, thr, worst, "vm", 0, 0, 0, 0, 0, 0.0)


def test_verdict_counts_a_tie_as_not_beaten_and_judges_the_reference_apart() -> None:
    rows = [
        _row("memvisor", 100.0, 1.05),
        _row("none", 99.0, 1.05),  # tie on worst slowdown: memvisor does not beat it
        _row("mom", 90.0, 1.2),
        _row("(memvisor + 120 s foresight)", 200.0, 1.0),  # a reference, not a baseline
    ]
    text = bp.verdict(rows)
    assert "memvisor does not beat none (worst slowdown); with foresight it would beat" in text
    assert "mom" not in text
