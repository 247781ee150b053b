"""Compare memory policies on the same simulated hosts: memvisor vs oVirt MOM, Proxmox VE
autoballoon and no management (the host kernel alone).

Scenarios (each run with every policy, same seed):

- ``mixed-150``: 16 VMs of 512 MiB on a host with 2/3 of that (150% overcommit), two guest
  images whose pages are partly common (KSM shares them): 5 busy VMs, 6 idle ones and 5 that
  alternate between idle and busy every 60 s (two groups, out of phase).
- ``idle-tax``: 8 VMs of 512 MiB on 150% overcommit, 4 idle and 4 whose working sets grow
  larger than an equal split would give them.

Per policy: total throughput (page touches completed per second, summed over VMs), the worst
VM's slowdown (work it asked for / work done, over the run), swapped MiB at the end, peak
swapped MiB, and host memory freed per reclaimed page (host frames freed by the policy's
actions per page it reclaimed by balloon or swap). Prints a table and writes
``bench/results/policies.md``.

    .venv/bin/python bench/bench_policies.py [--duration S] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from memvisor.model import SetBalloon, SetSwapTarget, Snapshot
from memvisor.policy import get_policy
from memvisor.policy.states import StateThresholds
from memvisor.sim import Phase, SimHost, SimHostConfig, SimVMConfig, Workload
from memvisor.units import PAGE_SIZE, MiB

# (label, policy, settings). The second memvisor row is not the default: it keeps a smaller
# free-memory margin (thresholds 2 / 1.5 / 1 / 0.5%), to show what the default 6% margin costs.
POLICIES: tuple[tuple[str, str, dict[str, object]], ...] = (
    ("memvisor", "memvisor", {}),
    (
        "memvisor, 2% margin",
        "memvisor",
        {"thresholds": StateThresholds(high=0.02, soft=0.015, hard=0.01, low=0.005)},
    ),
    ("mom", "mom", {}),
    ("proxmox", "proxmox", {}),
    ("none", "none", {}),
)
RESULTS = Path(__file__).parent / "results" / "policies.md"

BUSY = Phase(working_set=380 * MiB, access_rate=40_000, skew=0.3, write_fraction=0.1)
IDLE = Phase(working_set=16 * MiB, access_rate=500, skew=0.5, write_fraction=0.05)


def _workload(name: str, phases: tuple[Phase, ...], image_common: float) -> Workload:
    return Workload(
        name=name,
        footprint=400 * MiB,
        page_cache=24 * MiB,
        zero_fraction=0.05,
        common_fraction=image_common,
        phases=phases,
    )


def _alternating(first_busy: bool, period: float = 60.0, rounds: int = 10) -> tuple[Phase, ...]:
    out = []
    for k in range(rounds):
        busy = (k % 2 == 0) == first_busy
        b = BUSY if busy else IDLE
        out.append(Phase(period, b.working_set, b.skew, b.access_rate, b.write_fraction))
    return (*out, IDLE)


def mixed_150(common: float = 0.3) -> tuple[SimHostConfig, list[SimVMConfig]]:
    kinds = ["busy"] * 7 + ["idle"] * 3 + ["alt-a"] * 3 + ["alt-b"] * 3
    vms = []
    for i, kind in enumerate(kinds):
        image = "debian-12" if i % 2 == 0 else "rhel-9"
        if kind == "busy":
            wl = _workload("busy", (BUSY,), common)
        elif kind == "idle":
            wl = _workload("idle", (IDLE,), common)
        else:
            wl = _workload(kind, _alternating(kind == "alt-a"), common)
        vms.append(SimVMConfig(name=f"{kind}-{i:02d}", memory=512 * MiB, workload=wl, image=image))
    host = SimHostConfig(memory=(16 * 512 * MiB * 2 // 3) // PAGE_SIZE * PAGE_SIZE)
    return host, vms


def idle_tax() -> tuple[SimHostConfig, list[SimVMConfig]]:
    grow = Phase(working_set=400 * MiB, access_rate=40_000, skew=0.2, write_fraction=0.1)
    vms = []
    for i in range(8):
        wl = _workload("idle" if i < 4 else "grow", (IDLE,) if i < 4 else (grow,), 0.2)
        vms.append(SimVMConfig(name=f"{wl.name}-{i}", memory=512 * MiB, workload=wl))
    host = SimHostConfig(memory=(8 * 512 * MiB * 2 // 3) // PAGE_SIZE * PAGE_SIZE)
    return host, vms


SCENARIOS = {
    "mixed-150": mixed_150,
    "mixed-150-shared": lambda: mixed_150(common=0.6),
    "idle-tax": idle_tax,
}


@dataclass
class Outcome:
    scenario: str
    policy: str
    throughput: float  # touches/s, all VMs
    worst_slowdown: float
    swapped_mib: float
    peak_swapped_mib: float
    reclaimed_pages: int
    freed_pages: int
    decisions: int
    wall: float

    @property
    def freed_per_page(self) -> float:
        return self.freed_pages / self.reclaimed_pages if self.reclaimed_pages else float("nan")


def run(
    scenario: str,
    policy_name: str,
    duration: int,
    seed: int = 7,
    label: str | None = None,
    settings: dict[str, object] | None = None,
) -> Outcome:
    host_cfg, vms = SCENARIOS[scenario]()
    host = SimHost(host_cfg, vms, seed=seed)
    policy = get_policy(policy_name, **(settings or {}))
    specs = tuple(host.specs())
    asked = {v.name: 0.0 for v in vms}
    done = {v.name: 0.0 for v in vms}
    reclaimed = freed = decisions = 0
    peak = 0.0
    started = time.perf_counter()
    for _ in range(duration):
        snap = Snapshot(host.observe_host(), specs, tuple(host.observe_vms()))
        before = {o.name: o for o in snap.vms}
        for d in policy.plan(snap):
            decisions += 1
            result = host.apply(d.action)
            reclaimed += _reclaimed_pages(d.action, before)
            freed += result.achieved // PAGE_SIZE
        host.step()
        for vm in host.vms:
            asked[vm.name] += vm.demand
            done[vm.name] += vm.throughput
        peak = max(peak, sum(o.swapped for o in host.observe_vms()) / MiB)
    final = host.observe_vms()
    slow = [asked[n] / done[n] if done[n] > 0 else float("inf") for n in asked if asked[n] > 0]
    return Outcome(
        scenario=scenario,
        policy=label or policy_name,
        throughput=sum(done.values()) / duration,
        worst_slowdown=max(slow),
        swapped_mib=sum(o.swapped for o in final) / MiB,
        peak_swapped_mib=peak,
        reclaimed_pages=reclaimed,
        freed_pages=freed,
        decisions=decisions,
        wall=time.perf_counter() - started,
    )


def _reclaimed_pages(action: object, before: dict) -> int:
    """Pages an action asks to take from a VM (balloon growth, or resident memory above a
    new swap limit); 0 for actions that give memory back."""
    if isinstance(action, SetBalloon):
        return max(action.target - before[action.vm].balloon_target, 0) // PAGE_SIZE
    if isinstance(action, SetSwapTarget):
        return max(before[action.vm].consumed - action.resident_limit, 0) // PAGE_SIZE
    return 0


def table(rows: list[Outcome]) -> str:
    head = (
        "| scenario | policy | throughput (touches/s) | vs none | worst VM slowdown | "
        "swapped MiB (end / peak) | host freed per reclaimed page | decisions |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|\n"
    )
    base = {r.scenario: r.throughput for r in rows if r.policy == "none"}
    lines = []
    for r in rows:
        ratio = r.throughput / base[r.scenario] if base.get(r.scenario) else float("nan")
        fpp = "—" if r.reclaimed_pages == 0 else f"{r.freed_per_page:.2f}"
        lines.append(
            f"| {r.scenario} | {r.policy} | {r.throughput:,.0f} | {ratio:.3f} | "
            f"{r.worst_slowdown:.3f} | {r.swapped_mib:,.0f} / {r.peak_swapped_mib:,.0f} | "
            f"{fpp} | {r.decisions} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=300, help="simulated seconds per run")
    ap.add_argument("--quick", action="store_true", help="60 s runs, for a smoke test")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    duration = 60 if args.quick else args.duration
    rows = []
    for scenario in args.scenario or list(SCENARIOS):
        for label, policy, settings in POLICIES:
            rows.append(run(scenario, policy, duration, label=label, settings=settings))
            r = rows[-1]
            print(
                f"{scenario:16s} {label:20s} throughput {r.throughput:10,.0f}/s  worst slowdown "
                f"{r.worst_slowdown:5.2f}  swapped {r.swapped_mib:6.0f} MiB  ({r.wall:.0f} s)",
                flush=True,
            )
    text = table(rows)
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(_report(text, duration))
        print(f"wrote {RESULTS}")
    return 0


def _report(text: str, duration: int) -> str:
    return (
        "# Memory policies on the simulator\n\n"
        f"`bench/bench_policies.py`, {duration} simulated seconds per run, 1 s ticks, seed 7; "
        "every policy runs the same scenario with the same seed. The simulator charges host "
        "kernel reclaim as on a real host (direct-reclaim stall, a shared 512 MiB/s swap disk, "
        "stalls carried across ticks: docs/simulator.md). Throughput is page touches "
        "completed per second summed over all VMs; a VM's slowdown is the work its workload "
        "asked for divided by the work it completed over the run (1.00 = no slowdown); "
        "'host freed per reclaimed page' is host frames the policy's own actions freed per page "
        "they reclaimed (balloon growth or resident memory above a new swap limit).\n\n" + text
    )


if __name__ == "__main__":
    sys.exit(main())
