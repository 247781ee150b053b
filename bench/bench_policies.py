"""Compare memory policies on the same simulated hosts: memvisor vs oVirt MOM, Proxmox VE
autoballoon and no management (the host kernel alone).

Scenarios (each run with every policy, same seed):

- ``mixed-150``: 16 VMs of 512 MiB on a host with 2/3 of that (150% overcommit), two guest
  images whose pages are partly common (KSM shares them): 7 busy VMs, 3 idle ones and 6 that
  alternate between idle and busy every 60 s (two groups of 3, out of phase; one group starts
  idle).
- ``pressure-150``: the same VMs with larger working sets (420 of 430 MiB, 8 MiB of page
  cache): the working sets no longer fit, so memory must move at every switch in the steady
  state too.
- ``batch-150``: mixed-150 where the alternating VMs run batch jobs that exit at the end of
  each busy phase and free their memory (the guest knows those pages are free; the host still
  backs them).
- ``idle-tax``: 8 VMs of 512 MiB on 150% overcommit, 4 idle and 4 whose working sets grow
  larger than an equal split would give them.

Besides the policies, two kinds of reference rows: memvisor told the future (which VMs will be
busy in the next 120 s: how much knowing would give), and memvisor restarted at the start of the
steady state, taking up the activity history the daemon keeps, or without it.

Each run is measured over two windows of the same run: the *cold start* (the first
``--cold`` seconds: every VM has touched its whole footprint at boot, so the host starts 150%
committed and nothing is known about any VM yet) and the *steady state* (the ``--steady``
seconds after it, several idle/busy cycles later).

Per policy and window: total throughput (page touches completed per second, summed over
VMs), the worst VM's slowdown (work it asked for / work done, in the window), swapped MiB at
the end, peak swapped MiB, and host memory freed per reclaimed page (host frames freed by
the policy's actions per page it reclaimed by balloon or swap). Prints a table and a verdict
and writes ``bench/results/policies.md``.

    .venv/bin/python bench/bench_policies.py [--cold S] [--steady S] [--quick] [--jobs N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from memvisor.model import SetBalloon, SetSwapTarget, Snapshot
from memvisor.policy import Policy, get_policy
from memvisor.policy.activity import ActivityEstimator
from memvisor.policy.scheduler import MemvisorScheduler
from memvisor.policy.states import StateThresholds
from memvisor.sim import Phase, SimHost, SimHostConfig, SimVMConfig, Workload
from memvisor.units import PAGE_SIZE, MiB

# (label, policy, settings). The second memvisor row is not the default: it keeps a smaller
# free-memory margin (thresholds 2 / 1.5 / 1 / 0.5%), to show what the default 6% margin costs.
# The third is a reference, not a policy anyone can run: memvisor told the future (see
# Foresight), to show how much any policy could gain from knowing which VMs will be busy.
FORESIGHT = 120.0  # seconds the foresight reference sees ahead
POLICIES: tuple[tuple[str, str, dict[str, object]], ...] = (
    ("memvisor", "memvisor", {}),
    (
        "memvisor, 2% margin",
        "memvisor",
        {"thresholds": StateThresholds(high=0.02, soft=0.015, hard=0.01, low=0.005)},
    ),
    (f"(memvisor + {FORESIGHT:.0f} s foresight)", "memvisor", {"foresight": FORESIGHT}),
    # a daemon restart at the start of the steady state: the new scheduler takes up the
    # activity history the old one saved (what the daemon does), or starts without it
    ("memvisor, restarted at steady start", "memvisor", {"restart": "keep"}),
    ("memvisor, restarted, history lost", "memvisor", {"restart": "lose"}),
    # memvisor's guests run its agent, which reads swapped pages back in bulk when its
    # reservation is released while the guest pages in (GuestConfig.prefetch); this row runs
    # memvisor on a plain balloon driver, as the baselines have, to show what that is worth
    ("memvisor, plain balloon driver", "memvisor", {"agent_prefetch": False}),
    ("mom", "mom", {}),
    ("proxmox", "proxmox", {}),
    ("none", "none", {}),
)
RESULTS = Path(__file__).parent / "results" / "policies.md"

BUSY = Phase(working_set=380 * MiB, access_rate=40_000, skew=0.3, write_fraction=0.1)
IDLE = Phase(working_set=16 * MiB, access_rate=500, skew=0.5, write_fraction=0.05)


def _workload(
    name: str,
    phases: tuple[Phase, ...],
    image_common: float,
    footprint: int = 400 * MiB,
    page_cache: int = 24 * MiB,
) -> Workload:
    return Workload(
        name=name,
        footprint=footprint,
        page_cache=page_cache,
        zero_fraction=0.05,
        common_fraction=image_common,
        phases=phases,
    )


def _alternating(
    first_busy: bool,
    busy: Phase = BUSY,
    period: float = 60.0,
    rounds: int = 40,
    release: bool = False,
) -> tuple[Phase, ...]:
    """Busy and idle phases of ``period`` seconds; with ``release`` the job exits at the end
    of each busy phase and frees what it allocated (the next busy phase allocates it again)."""
    idle = replace(IDLE, release=release)
    out = []
    for k in range(rounds):
        b = busy if (k % 2 == 0) == first_busy else idle
        out.append(replace(b, duration=period))
    return (*out, idle)


def mixed_150(
    common: float = 0.3,
    working_set: int = 380 * MiB,
    footprint: int = 400 * MiB,
    page_cache: int = 24 * MiB,
    release: bool = False,
) -> tuple[SimHostConfig, list[SimVMConfig]]:
    kinds = ["busy"] * 7 + ["idle"] * 3 + ["alt-a"] * 3 + ["alt-b"] * 3
    busy = replace(BUSY, working_set=working_set)
    vms = []
    for i, kind in enumerate(kinds):
        image = "debian-12" if i % 2 == 0 else "rhel-9"
        phases = (
            (busy,)
            if kind == "busy"
            else (IDLE,)
            if kind == "idle"
            else _alternating(kind == "alt-a", busy, release=release)
        )
        wl = _workload(kind, phases, common, footprint, page_cache)
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
    # the same VMs with larger working sets (420 of 430 MiB): the busy VMs and the alternating
    # ones in their busy phase no longer fit beside what the others hold, so memory has to move
    # at every switch in the steady state too
    "pressure-150": lambda: mixed_150(
        working_set=420 * MiB, footprint=430 * MiB, page_cache=8 * MiB
    ),
    # the alternating VMs run batch jobs that exit between runs: the guest frees the job's
    # memory, the host cannot see it (the balloon's classic advantage)
    "batch-150": lambda: mixed_150(release=True),
    "idle-tax": idle_tax,
}


WINDOWS = ("cold start", "steady state")


class Foresight(ActivityEstimator):
    """An activity estimator that knows the future: a VM's estimate is the largest working set
    (as a fraction of its memory) its workload will have in the next ``horizon`` seconds. Only
    the bench can build it (it reads the scenario's phase schedule); it bounds what the same
    scheduler could achieve with a perfect answer to "will this VM be busy soon?"."""

    def __init__(self, vms: list[SimVMConfig], horizon: float) -> None:
        super().__init__()
        self.horizon = horizon
        self.start: float | None = None  # the first observation's time: the workloads' zero
        self.now = 0.0
        self.schedule: dict[str, list[tuple[float, float, float]]] = {}
        for v in vms:
            start, spans = 0.0, []
            for p in v.workload.phases:
                end = start + p.duration if p.duration is not None else float("inf")
                spans.append((start, end, p.working_set / v.memory))
                start = end
            self.schedule[v.name] = spans

    def update(self, vm: str, time: float, sample: float | None) -> float:
        if self.start is None:
            self.start = time
        self.now = time - self.start
        return self.estimate(vm)

    def estimate(self, vm: str) -> float:
        t0, t1 = self.now, self.now + self.horizon
        return max((f for s, e, f in self.schedule[vm] if e > t0 and s < t1), default=0.0)


def make_policy(name: str, settings: dict[str, object], vms: list[SimVMConfig]) -> Policy:
    settings = dict(settings)
    horizon = settings.pop("foresight", None)
    policy = get_policy(name, **settings)
    if horizon is not None:
        assert isinstance(policy, MemvisorScheduler) and isinstance(horizon, float)
        policy.activity = Foresight(vms, horizon)
    return policy


@dataclass
class Outcome:
    scenario: str
    policy: str
    window: str
    seconds: int
    throughput: float  # touches/s, all VMs
    worst_slowdown: float
    worst_vm: str
    swapped_mib: float  # at the end of the window
    peak_swapped_mib: float
    reclaimed_pages: int
    freed_pages: int
    decisions: int
    wall: float  # of the whole run (both windows)

    @property
    def freed_per_page(self) -> float:
        return self.freed_pages / self.reclaimed_pages if self.reclaimed_pages else float("nan")


@dataclass
class _Window:
    """What one window of a run accumulates."""

    asked: dict[str, float]
    done: dict[str, float]
    reclaimed: int = 0
    freed: int = 0
    decisions: int = 0
    peak: float = 0.0
    swapped: float = 0.0


def run(
    scenario: str,
    policy_name: str,
    cold: int,
    steady: int,
    seed: int = 7,
    label: str | None = None,
    settings: dict[str, object] | None = None,
) -> list[Outcome]:
    """One run of ``cold + steady`` simulated seconds; one outcome per window."""
    host_cfg, vms = SCENARIOS[scenario]()
    settings = dict(settings or {})
    restart = settings.pop("restart", None)
    if settings.pop("agent_prefetch", policy_name == "memvisor"):
        vms = [replace(v, guest=replace(v.guest, prefetch=True)) for v in vms]
    host = SimHost(host_cfg, vms, seed=seed)
    policy = make_policy(policy_name, settings, vms)
    specs = tuple(host.specs())
    windows = [_Window({v.name: 0.0 for v in vms}, {v.name: 0.0 for v in vms}) for _ in WINDOWS]
    started = time.perf_counter()
    for tick in range(cold + steady):
        w = windows[0 if tick < cold else 1]
        if tick == cold and restart is not None:
            new = make_policy(policy_name, settings, vms)
            if restart == "keep":
                assert isinstance(new, MemvisorScheduler) and isinstance(policy, MemvisorScheduler)
                new.activity.restore(policy.activity.export())
            policy = new
        snap = Snapshot(host.observe_host(), specs, tuple(host.observe_vms()))
        before = {o.name: o for o in snap.vms}
        for d in policy.plan(snap):
            w.decisions += 1
            result = host.apply(d.action)
            w.reclaimed += _reclaimed_pages(d.action, before)
            w.freed += result.achieved // PAGE_SIZE
        host.step()
        for vm in host.vms:
            w.asked[vm.name] += vm.demand
            w.done[vm.name] += vm.throughput
        w.swapped = sum(o.swapped for o in host.observe_vms()) / MiB
        w.peak = max(w.peak, w.swapped)
    wall = time.perf_counter() - started
    out = []
    for name, seconds, w in zip(WINDOWS, (cold, steady), windows, strict=True):
        if seconds <= 0:
            continue
        slow = {n: w.asked[n] / w.done[n] if w.done[n] > 0 else float("inf") for n in w.asked}
        worst = max((n for n in slow if w.asked[n] > 0), key=lambda n: slow[n])
        out.append(
            Outcome(
                scenario=scenario,
                policy=label or policy_name,
                window=name,
                seconds=seconds,
                throughput=sum(w.done.values()) / seconds,
                worst_slowdown=slow[worst],
                worst_vm=worst,
                swapped_mib=w.swapped,
                peak_swapped_mib=w.peak,
                reclaimed_pages=w.reclaimed,
                freed_pages=w.freed,
                decisions=w.decisions,
                wall=wall,
            )
        )
    return out


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
        "| scenario | window | policy | throughput (touches/s) | vs none | worst VM slowdown "
        "(VM) | swapped MiB (end / peak) | host freed per reclaimed page | decisions |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|\n"
    )
    base = {(r.scenario, r.window): r.throughput for r in rows if r.policy == "none"}
    lines = []
    for r in rows:
        b = base.get((r.scenario, r.window))
        ratio = r.throughput / b if b else float("nan")
        fpp = "—" if r.reclaimed_pages == 0 else f"{r.freed_per_page:.2f}"
        lines.append(
            f"| {r.scenario} | {r.window} ({r.seconds} s) | {r.policy} | {r.throughput:,.0f} | "
            f"{ratio:.4f} | {r.worst_slowdown:.3f} ({r.worst_vm}) | "
            f"{r.swapped_mib:,.0f} / {r.peak_swapped_mib:,.0f} | {fpp} | {r.decisions} |"
        )
    return head + "\n".join(lines) + "\n"


def _lost_to(got: dict[str, Outcome], ours: Outcome) -> list[str]:
    """The baselines ``ours`` does not beat, each with what it does not beat them on (a tie
    is not a win)."""
    lost = []
    for name, r in got.items():
        if name not in BASELINES:
            continue
        why = [
            what
            for what, lose in (
                ("throughput", r.throughput >= ours.throughput),
                ("worst slowdown", r.worst_slowdown <= ours.worst_slowdown),
            )
            if lose
        ]
        if why:
            lost.append(f"{name} ({', '.join(why)})")
    return lost


def verdict(rows: list[Outcome]) -> str:
    """Per scenario and window: does the default memvisor beat every baseline on throughput
    and worst slowdown? And would it, told the future (the foresight reference)? Where even
    the reference does not, no answer to "which VM will be busy?" wins that window."""
    lines = []
    for scenario in dict.fromkeys(r.scenario for r in rows):
        for window in WINDOWS:
            got = {r.policy: r for r in rows if r.scenario == scenario and r.window == window}
            ours = got.get("memvisor")
            if ours is None:
                continue
            lost = _lost_to(got, ours)
            text = "beats every baseline" if not lost else "does not beat " + "; ".join(lost)
            ref = next((r for name, r in got.items() if "foresight" in name), None)
            if ref is not None:
                ref_lost = _lost_to(got, ref)
                text += "; with foresight it " + (
                    "would beat every baseline"
                    if not ref_lost
                    else "would not beat " + "; ".join(ref_lost)
                )
            lines.append(f"- {scenario}, {window}: memvisor {text}")
    return "\n".join(lines) + "\n"


BASELINES = ("mom", "proxmox", "none")


def _one(job: tuple[str, str, str, dict[str, object], int, int]) -> list[Outcome]:
    scenario, label, policy, settings, cold, steady = job
    return run(scenario, policy, cold, steady, label=label, settings=settings)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold", type=int, default=300, help="simulated seconds of cold start")
    ap.add_argument("--steady", type=int, default=600, help="simulated seconds after it")
    ap.add_argument("--quick", action="store_true", help="30 + 30 s runs, for a smoke test")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs in parallel")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    cold, steady = (30, 30) if args.quick else (args.cold, args.steady)
    jobs = [
        (scenario, label, policy, settings, cold, steady)
        for scenario in args.scenario or list(SCENARIOS)
        for label, policy, settings in POLICIES
    ]
    rows: list[Outcome] = []
    with ProcessPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        for outcomes in pool.map(_one, jobs):
            rows.extend(outcomes)
            for r in outcomes:
                print(
                    f"{r.scenario:16s} {r.window:12s} {r.policy:20s} throughput "
                    f"{r.throughput:10,.0f}/s  worst slowdown {r.worst_slowdown:5.3f}  swapped "
                    f"{r.swapped_mib:6.0f} MiB  ({r.wall:.0f} s)",
                    flush=True,
                )
    text = table(rows) + "\n" + verdict(rows)
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(_report(text, cold, steady))
        print(f"wrote {RESULTS}")
    return 0


def _report(text: str, cold: int, steady: int) -> str:
    return (
        "# Memory policies on the simulator\n\n"
        f"`bench/bench_policies.py`: each run is {cold + steady} simulated seconds at 1 s ticks, "
        f"seed 7, measured over two windows: the cold start (first {cold} s) and the steady "
        f"state (the {steady} s after it). Every policy runs the same scenario with the same "
        "seed. The simulator charges host kernel reclaim as on a real host (direct-reclaim "
        "stall, a shared 512 MiB/s swap disk, faults served within the tick and the rest of "
        "the stall carried across ticks: docs/simulator.md). "
        "Throughput is page touches completed per second summed over all VMs; a VM's slowdown "
        "is the work its workload asked for divided by the work it completed in the window "
        "(1.000 = no slowdown); 'host freed per reclaimed page' is host frames the policy's own "
        "actions freed per page they reclaimed (balloon growth or resident memory above a new "
        "swap limit). Two kinds of rows are not policies: '(memvisor + N s foresight)' is the "
        "scheduler told which VMs will be busy in the next N s (a bound on what knowing would "
        "give), and the 'restarted' rows replace the scheduler at the start of the steady "
        "state, with the activity history the daemon keeps or without it.\n\n" + text
    )


if __name__ == "__main__":
    sys.exit(main())
