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
steady state without the activity history the daemon keeps (until commit 4d8e770 the bench also
ran the restart with that history: its rows equalled the uninterrupted run's in every scenario).

Each run is measured over three windows of the same run: the *cold start* (the first
``--cold`` seconds: every VM has touched its whole footprint at boot, so the host starts 150%
committed and nothing is known about any VM yet), the *steady state* (the ``--steady``
seconds after it, several idle/busy cycles later) and the *whole run*.

Every row runs with seeds 1..``--seeds`` (the seed draws the workloads' page choices, the
VMs' content and the working-set samples): one seed's outcome moves by a few tenths of a
percent with the seed, as much as the policies differ in some windows, so the table gives
medians over the seeds and the verdict also counts the seeds won. A full run (five scenarios,
nine rows, three seeds: 135 runs of 900 simulated seconds) takes about 40 minutes on two
cores.

Per policy and window: total throughput (page touches completed per second, summed over
VMs), the worst VM's slowdown (work it asked for / work done, in the window), swapped MiB at
the end, peak swapped MiB, and host memory freed per reclaimed page (host frames freed by
the policy's actions per page it reclaimed by balloon or swap). Prints a table and a verdict
and writes ``bench/results/policies.md``.

    .venv/bin/python bench/bench_policies.py [--cold S] [--steady S] [--seeds N] [--quick]
        [--scenario NAME]... [--policy LABEL]... [--jobs N] [--no-write]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median

from memvisor.agent.prefetch import READ_RATE
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
    # a daemon restart at the start of the steady state that lost the activity history the
    # daemon saves (earlier runs with that history kept equalled the uninterrupted run)
    ("memvisor, restarted, history lost", "memvisor", {"restart": "lose"}),
    # memvisor's guests run its agent, which reads swapped pages back in bulk when its
    # reservation is released while the guest pages in (GuestConfig.prefetch); this row runs
    # memvisor on a plain balloon driver, as the baselines have, to show what that is worth
    ("memvisor, plain balloon driver", "memvisor", {"agent_prefetch": False}),
    # the host kernel reclaims in the background (kswapd) since 2026-11-28; these two rows run
    # the model before it, where every host reclaim was direct (the faulting VM paid for it), to
    # show what the kernel model changes for memvisor and for `none`. (The row "read-back at
    # once", the agent before its pacing, was dropped then: its last results are in
    # docs/policy.md, "Paced read-back".)
    ("memvisor, all host reclaim direct", "memvisor", {"background_reclaim": False}),
    ("none, all host reclaim direct", "none", {"background_reclaim": False}),
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


WINDOWS = ("cold start", "steady state", "whole run")


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
    seed: int = 7


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
    restart = settings.pop("restart", None)  # "lose": a new scheduler, without the history
    if restart not in (None, "lose"):
        raise ValueError(f"restart must be 'lose' or absent, got {restart!r}")
    rate = settings.pop("prefetch_rate", READ_RATE)
    if not isinstance(rate, int) or rate < 0:
        raise ValueError(f"prefetch_rate must be bytes per second (0: at once), got {rate!r}")
    background = settings.pop("background_reclaim", True)
    if not isinstance(background, bool):
        raise ValueError(f"background_reclaim must be true or false, got {background!r}")
    host_cfg = replace(host_cfg, background_reclaim=background)
    if settings.pop("agent_prefetch", policy_name == "memvisor"):
        vms = [replace(v, guest=replace(v.guest, prefetch=True, prefetch_rate=rate)) for v in vms]
    host = SimHost(host_cfg, vms, seed=seed)
    policy = make_policy(policy_name, settings, vms)
    specs = tuple(host.specs())
    windows = [_Window({v.name: 0.0 for v in vms}, {v.name: 0.0 for v in vms}) for _ in range(2)]
    started = time.perf_counter()
    for tick in range(cold + steady):
        w = windows[0 if tick < cold else 1]
        if tick == cold and restart is not None:
            policy = make_policy(policy_name, settings, vms)
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
    whole = _Window(
        {n: windows[0].asked[n] + windows[1].asked[n] for n in windows[0].asked},
        {n: windows[0].done[n] + windows[1].done[n] for n in windows[0].done},
        reclaimed=windows[0].reclaimed + windows[1].reclaimed,
        freed=windows[0].freed + windows[1].freed,
        decisions=windows[0].decisions + windows[1].decisions,
        peak=max(windows[0].peak, windows[1].peak),
        swapped=windows[1].swapped if steady > 0 else windows[0].swapped,
    )
    out = []
    spans = (cold, steady, cold + steady if cold > 0 and steady > 0 else 0)
    for name, seconds, w in zip(WINDOWS, spans, (*windows, whole), strict=True):
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
                seed=seed,
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


@dataclass
class Summary:
    """One policy in one window of one scenario, over every seed it ran with: medians."""

    scenario: str
    policy: str
    window: str
    seconds: int
    seeds: int
    throughput: float  # median over seeds, touches/s
    ratio: float  # median over seeds of throughput / none's throughput with the same seed
    worst_slowdown: float  # median over seeds of the worst VM's slowdown
    worst_vm: str  # the VM most often worst
    swapped_mib: float
    peak_swapped_mib: float
    freed_per_page: float  # over all seeds: host frames freed / pages reclaimed
    decisions: float


def summarize(rows: list[Outcome]) -> list[Summary]:
    """Medians over seeds per (scenario, window, policy), in the order rows first appear."""
    groups: dict[tuple[str, str, str], list[Outcome]] = {}
    for r in rows:
        groups.setdefault((r.scenario, r.window, r.policy), []).append(r)
    none = {(r.scenario, r.window, r.seed): r.throughput for r in rows if r.policy == "none"}
    out = []
    for (scenario, window, policy), rs in groups.items():
        ratios = [
            r.throughput / none[(scenario, window, r.seed)]
            for r in rs
            if none.get((scenario, window, r.seed))
        ]
        reclaimed = sum(r.reclaimed_pages for r in rs)
        vms = [r.worst_vm for r in rs]
        out.append(
            Summary(
                scenario=scenario,
                policy=policy,
                window=window,
                seconds=rs[0].seconds,
                seeds=len(rs),
                throughput=median(r.throughput for r in rs),
                ratio=median(ratios) if ratios else float("nan"),
                worst_slowdown=median(r.worst_slowdown for r in rs),
                worst_vm=max(dict.fromkeys(vms), key=vms.count),
                swapped_mib=median(r.swapped_mib for r in rs),
                peak_swapped_mib=median(r.peak_swapped_mib for r in rs),
                freed_per_page=(
                    sum(r.freed_pages for r in rs) / reclaimed if reclaimed else float("nan")
                ),
                decisions=median(r.decisions for r in rs),
            )
        )
    return out


def table(rows: list[Outcome]) -> str:
    head = (
        "| scenario | window | policy | throughput (touches/s) | vs none | worst VM slowdown "
        "(VM) | swapped MiB (end / peak) | host freed per reclaimed page | decisions |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in summarize(rows):
        fpp = "—" if math.isnan(r.freed_per_page) else f"{r.freed_per_page:.2f}"
        lines.append(
            f"| {r.scenario} | {r.window} ({r.seconds} s) | {r.policy} | {r.throughput:,.0f} | "
            f"{r.ratio:.4f} | {r.worst_slowdown:.3f} ({r.worst_vm}) | "
            f"{r.swapped_mib:,.0f} / {r.peak_swapped_mib:,.0f} | {fpp} | {r.decisions:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def _lost_to(got: dict[str, Summary], ours: Summary) -> list[str]:
    """The baselines ``ours`` does not beat on the medians, each with what it does not beat
    them on (a tie is not a win)."""
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


def _seed_wins(rows: list[Outcome], scenario: str, window: str, ours: str) -> str:
    """Per baseline, in how many seeds ``ours`` beats it on both throughput and worst
    slowdown."""
    mine = {r.seed: r for r in rows if (r.scenario, r.window, r.policy) == (scenario, window, ours)}
    parts = []
    for name in BASELINES:
        theirs = {
            r.seed: r for r in rows if (r.scenario, r.window, r.policy) == (scenario, window, name)
        }
        seeds = sorted(mine.keys() & theirs.keys())
        if not seeds:
            continue
        won = sum(
            1
            for k in seeds
            if mine[k].throughput > theirs[k].throughput
            and mine[k].worst_slowdown < theirs[k].worst_slowdown
        )
        parts.append(f"{name} {won}/{len(seeds)}")
    return ", ".join(parts)


def verdict(rows: list[Outcome]) -> str:
    """Per scenario and window: does the default memvisor beat every baseline on the median
    throughput and the median worst slowdown over the seeds (and in how many seeds does it
    beat each on both)? And would it, told the future (the foresight reference)? Where even
    the reference does not, no answer to "which VM will be busy?" wins that window."""
    sums = summarize(rows)
    lines = []
    for scenario in dict.fromkeys(r.scenario for r in sums):
        for window in WINDOWS:
            got = {r.policy: r for r in sums if r.scenario == scenario and r.window == window}
            ours = got.get("memvisor")
            if ours is None:
                continue
            lost = _lost_to(got, ours)
            text = "beats every baseline" if not lost else "does not beat " + "; ".join(lost)
            text += f" (seeds won on both: {_seed_wins(rows, scenario, window, 'memvisor')})"
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


def _one(job: tuple[str, str, str, dict[str, object], int, int, int]) -> list[Outcome]:
    scenario, label, policy, settings, cold, steady, seed = job
    return run(scenario, policy, cold, steady, seed=seed, label=label, settings=settings)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold", type=int, default=300, help="simulated seconds of cold start")
    ap.add_argument("--steady", type=int, default=600, help="simulated seconds after it")
    ap.add_argument("--seeds", type=int, default=3, help="runs per policy: seeds 1..N")
    ap.add_argument("--quick", action="store_true", help="30 + 30 s runs, for a smoke test")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    labels = [label for label, _, _ in POLICIES]
    ap.add_argument("--policy", choices=labels, action="append", help="rows to run (all)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs in parallel")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {args.seeds}")
    cold, steady = (30, 30) if args.quick else (args.cold, args.steady)
    seeds = list(range(1, args.seeds + 1))
    jobs = [
        (scenario, label, policy, settings, cold, steady, seed)
        for scenario in args.scenario or list(SCENARIOS)
        for seed in seeds
        for label, policy, settings in POLICIES
        if args.policy is None or label in args.policy
    ]
    rows: list[Outcome] = []
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        for done, outcomes in enumerate(pool.map(_one, jobs), 1):
            rows.extend(outcomes)
            r = outcomes[-1]
            print(
                f"[{done}/{len(jobs)} {time.perf_counter() - started:5.0f} s] {r.scenario:16s} "
                f"seed {r.seed} {r.policy:36s} whole run: throughput {r.throughput:10,.0f}/s"
                f"  worst slowdown {r.worst_slowdown:5.3f}  ({r.wall:.0f} s)",
                flush=True,
            )
    text = table(rows) + "\n" + verdict(rows)
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(_report(text, cold, steady, seeds))
        print(f"wrote {RESULTS}")
    return 0


def _report(text: str, cold: int, steady: int, seeds: list[int]) -> str:
    return (
        "# Memory policies on the simulator\n\n"
        f"`bench/bench_policies.py`: each run is {cold + steady} simulated seconds at 1 s ticks, "
        f"measured over three windows: the cold start (first {cold} s), the steady state (the "
        f"{steady} s after it) and the whole run. Every policy runs the same scenarios with the "
        f"same seeds ({seeds[0]}..{seeds[-1]}: {len(seeds)} runs per row; the seed draws the "
        "workloads' page choices, the VMs' content and the samples); each figure is the median "
        "over the seeds, 'vs none' the median of the per-seed ratios to `none` in the same "
        "seed. The simulator charges host kernel reclaim as on a real host (direct-reclaim "
        "stall, a shared 512 MiB/s swap disk, faults served within the tick and the rest of "
        "the stall carried across ticks: docs/simulator.md). "
        "Throughput is page touches completed per second summed over all VMs; a VM's slowdown "
        "is the work its workload asked for divided by the work it completed in the window "
        "(1.000 = no slowdown); the worst VM named is the one most often worst; 'host freed "
        "per reclaimed page' is host frames the policy's own actions freed per page they "
        "reclaimed (balloon growth or resident memory above a new swap limit), over all seeds. "
        "Two kinds of rows are not policies: '(memvisor + N s foresight)' is the scheduler "
        "told which VMs will be busy in the next N s (a bound on what knowing would give), and "
        "'restarted, history lost' replaces the scheduler at the start of the steady state by "
        "one without the activity history the daemon keeps (with that history, which earlier "
        "runs of this bench also tried, the steady state equalled the uninterrupted run's). The "
        "verdict compares medians and counts, per baseline, the seeds in which memvisor beats "
        "it on both throughput and worst slowdown (a tie is not a win).\n\n" + text
    )


if __name__ == "__main__":
    sys.exit(main())
