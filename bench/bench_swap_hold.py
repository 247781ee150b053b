"""Benchmark: holding a standing swap limit on a real file-backed guest (TCG), refault-aware
victim order against top-down (the baseline, the order before it), in the same run.

Per configuration (limit x order x round) a fresh 256 MiB guest (reservation 64 MiB) touches
all its free memory (tests/guestfill.py), gets ``SetSwapTarget(limit)``, then ``--ticks``
observations one second apart (each holds the limit, as the control loop's ticks do). Between
ticks the file's residency is read without holding: how far above the limit the guest got
back. Figures from tick 3 on (the first ticks find the hot chunks): median excess over the
limit between ticks, and median re-evicted per tick (resident between ticks minus at the
tick), with the chunks that came back after an eviction over the whole run.

Top-down is the refault-aware code with its hot-chunk protection set to 0 s, so every chunk
is chosen top-down as before. Writes bench/results/swap_hold.md. Needs root, QEMU and the guest
kernel (scripts/setup.sh). Run: ``.venv/bin/python bench/bench_swap_hold.py [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from memvisor.backends.qemu import actions, swapout
from memvisor.backends.qemu.host import QemuHost
from memvisor.guestimage import GuestImage, build_image
from memvisor.model import Backing, SetSwapTarget, VMSpec
from memvisor.units import PAGE_SIZE, MiB

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the guest fill program the tests use
from guestfill import fill_guest  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "swap_hold.md"
LIMITS = (224, 208, 192, 96)  # MiB, of a 256 MiB guest
ORDERS = {"top-down (baseline)": 0.0, "refault-aware": swapout.HOT_PROTECT}
SETTLED = 3  # ticks before the figures count


def run_one(image: GuestImage, work: Path, limit: int, protect: float, ticks: int) -> dict:
    host = QemuHost(Path(tempfile.mkdtemp(dir=work)), image=image, accel="tcg")
    spec = VMSpec("hold", 256 * MiB, reservation=64 * MiB, backing=Backing.FILE)
    host.power_on(spec)
    try:
        vm = host.running(spec.name)
        fill_guest(vm.process.paths.shell)
        nchunks = swapout.chunk_count(spec.memory // PAGE_SIZE)
        vm.refaults = swapout.RefaultTracker(nchunks, protect=protect)
        assert host.apply(SetSwapTarget(spec.name, limit)).ok
        between, at = [], []
        for _ in range(ticks):
            time.sleep(1.0)
            between.append(actions.consumed(host, vm))  # read without holding the limit
            at.append(host.observe_vm(spec.name, sharing=False).consumed)
        return {
            "excess": [max(0, b - limit) / MiB for b in between[SETTLED:]],
            "evicted": [
                max(0, b - a) / MiB for b, a in zip(between[SETTLED:], at[SETTLED:], strict=True)
            ],
            "came_back": vm.refaults.came_back,
        }
    finally:
        host.power_off(spec.name)


def report(rows: dict[tuple[int, str], list[dict]], ticks: int, rounds: int) -> str:
    lines = [
        "# Holding a standing swap limit: refault-aware against top-down",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, TCG, 256 MiB guest "
        f"(reservation 64 MiB) filled then idle, {ticks} ticks of 1 s, {rounds} rounds per row, "
        f"host load average {os.getloadavg()[0]:.1f}. Medians over ticks {SETTLED}-{ticks - 1} "
        "of all rounds.",
        "",
        "| limit | victim order | above the limit between ticks | re-evicted per tick | "
        "chunks that came back (per round) |",
        "|---:|---|---:|---:|---|",
    ]
    for (limit, order), runs in rows.items():
        excess = statistics.median(x for r in runs for x in r["excess"])
        evicted = statistics.median(x for r in runs for x in r["evicted"])
        back = ", ".join(str(r["came_back"]) for r in runs)
        lines.append(f"| {limit} MiB | {order} | {excess:.0f} MiB | {evicted:.0f} MiB | {back} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ticks", type=int, default=10)
    args = parser.parse_args()
    if args.ticks <= SETTLED:
        parser.error(f"--ticks must be more than {SETTLED}")
    image = build_image()
    rows: dict[tuple[int, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-hold-", dir=ROOT / ".cache") as tmp:
        for rnd in range(args.rounds):
            for limit in LIMITS:
                for order, protect in ORDERS.items():
                    fig = run_one(image, Path(tmp), limit * MiB, protect, args.ticks)
                    rows.setdefault((limit, order), []).append(fig)
                    print(f"round {rnd} limit {limit} MiB {order}: {fig}", flush=True)
    text = report(dict(sorted(rows.items(), key=lambda kv: -kv[0][0])), args.ticks, args.rounds)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
