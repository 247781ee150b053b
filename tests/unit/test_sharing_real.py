"""The sharing metric (C1) on real processes of known sharing, real KSM and the real /proc files.

Each test starts helper processes that build memory whose sharing we know exactly (fork,
copy-on-write, KSM merging, the zero page), then checks the sampler against that truth and the
K = 1,000 sample against the full scan. Needs root (/proc/kpagecount); CI runs as root.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ksmknobs import KSM, ksm_knobs
from memvisor.cli import main
from memvisor.errors import InputError, NotFoundError
from memvisor.sharing import (
    Context,
    ContextGoneError,
    compute_stats,
    rank_for_reclamation,
    sample_guest_ram,
    sample_guest_ranges,
    sample_process,
)
from memvisor.sharing.procfs import (
    KPF_ANON,
    KPF_KSM,
    KPF_THP,
    KPF_ZERO_PAGE,
    PAGEMAP_EXCLUSIVE,
    pfns_of,
    read_entries,
)
from memvisor.sharing.sampler import FrameFiles
from memvisor.units import PAGE_SIZE

if not os.access("/proc/kpagecount", os.R_OK):
    pytest.skip("needs root: /proc/kpagecount unreadable", allow_module_level=True)


# A helper process: maps `mib` MiB of anonymous memory (4 KiB pages; transparent huge pages in
# mode "thp"), shapes its sharing per `mode`, prints {"addr", "size", "children"} and waits
# until stdin closes.
HELPER = r"""
import ctypes, json, mmap, os, random, sys
mode, mib, args = sys.argv[1], int(sys.argv[2]), [int(a) for a in sys.argv[3:]]
size = mib << 20
npages = size // 4096
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_HUGEPAGE if mode == "thp" else mmap.MADV_NOHUGEPAGE)
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))

def fill(seed):  # every page distinct: a seeded pattern, then the page's index
    pattern = random.Random(seed).randbytes(4096)
    for i in range(npages):
        m[i * 4096:(i + 1) * 4096] = pattern
        m[i * 4096:i * 4096 + 8] = i.to_bytes(8, "little")

children = []
if mode == "zero":
    total = sum(m[i * 4096] for i in range(npages))  # read faults map the zero page
else:
    fill(args[0] if mode == "ksm" else os.getpid())
if mode == "ksm":
    m.madvise(mmap.MADV_MERGEABLE)
if mode in ("fork", "cow", "thp"):
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    for _ in range(1 if mode == "cow" else args[0]):
        pid = os.fork()
        if pid == 0:
            os.close(hold_w)
            if mode == "cow":  # the child writes a known subset: those pages become private
                rng = random.Random(args[1])
                for i in range(npages):
                    if rng.random() < args[2] / 100:
                        m[i * 4096 + 8] = 255
            os.write(ready_w, b"x")
            os.read(hold_r, 1)  # until the parent exits
            os._exit(0)
        children.append(pid)
    os.read(ready_r, len(children))
print(json.dumps({"addr": addr, "size": size, "children": children}), flush=True)
sys.stdin.read()
"""


class Helper:
    def __init__(self, proc: subprocess.Popen[str], info: dict[str, Any]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.addr: int = info["addr"]
        self.size: int = info["size"]
        self.children: list[int] = info["children"]


@pytest.fixture
def spawn() -> Iterator[Callable[..., Helper]]:
    procs: list[subprocess.Popen[str]] = []

    def start(mode: str, mib: int, *args: int) -> Helper:
        proc = subprocess.Popen(
            [sys.executable, "-c", HELPER, mode, str(mib), *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"helper {mode} failed to start"
        return Helper(proc, json.loads(line))

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


# --- truth on known sharing -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_forked_children_share_every_page(spawn: Callable[..., Helper]) -> None:
    h = spawn("fork", 32, 3)
    full = sample_guest_ram(h.pid, h.addr, h.size, full=True)
    assert full.full_scan and full.sampled == full.present == h.size // PAGE_SIZE
    assert full.mean_harmonic == full.mean_arithmetic == full.median == pytest.approx(4.0)
    assert full.expected_freed_per_page == pytest.approx(0.25)
    assert full.shared_fraction == 1.0 and full.ksm_fraction == 0.0
    child = sample_guest_ram(h.children[0], h.addr, h.size, samples=1000, seed=1)
    assert child.present == child.sampled == 1000 and not child.full_scan
    assert child.mean_harmonic == pytest.approx(4.0)


@pytest.mark.timeout(60)
def test_private_memory_is_not_shared(spawn: Callable[..., Helper]) -> None:
    h = spawn("private", 32)
    s = sample_guest_ram(h.pid, h.addr, h.size, samples=1000, seed=2)
    assert s.present == 1000 and s.swapped == 0
    assert s.mean_harmonic == s.mean_geometric == pytest.approx(1.0)
    assert s.expected_freed_per_page == 1.0 and s.shared_fraction == 0.0


def _cow_truth(npages: int, seed: int, percent: int) -> int:
    """Pages the child did not write (still shared with the parent), as the helper draws them."""
    rng = random.Random(seed)
    return sum(1 for _ in range(npages) if not rng.random() < percent / 100)


@pytest.mark.timeout(60)
def test_copy_on_write_mix_matches_truth_and_k1000_is_within_3_points(
    spawn: Callable[..., Helper],
) -> None:
    h = spawn("cow", 64, 0, 7, 80)
    npages = h.size // PAGE_SIZE
    shared = _cow_truth(npages, 7, 80)
    full = sample_guest_ram(h.pid, h.addr, h.size, full=True)
    assert full.shared_fraction == pytest.approx(shared / npages)
    assert full.expected_freed_per_page == pytest.approx((npages - shared + shared / 2) / npages)
    for seed in (1, 2, 3):
        s = sample_guest_ram(h.pid, h.addr, h.size, samples=1000, seed=seed)
        assert abs(s.shared_fraction - full.shared_fraction) <= 0.03
        assert abs(s.expected_freed_per_page - full.expected_freed_per_page) <= 0.03
    again = sample_guest_ram(h.pid, h.addr, h.size, samples=1000, seed=3)
    assert again.shared_fraction == s.shared_fraction  # seeded: reproducible


@pytest.mark.timeout(60)
def test_whole_process_sample_is_within_3_points_of_its_full_scan(
    spawn: Callable[..., Helper],
) -> None:
    h = spawn("cow", 32, 0, 5, 50)
    full = sample_process(h.pid, full=True)
    s = sample_process(h.pid, samples=1000, seed=4)
    assert full.full_scan and not s.full_scan and s.context_pages == full.context_pages
    assert abs(s.shared_fraction - full.shared_fraction) <= 0.03
    assert abs(s.expected_freed_per_page - full.expected_freed_per_page) <= 0.03
    assert abs(s.resident_pages - full.present) <= 0.05 * full.present


def _pss_kib(pid: int) -> int:
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))


@pytest.mark.timeout(60)
def test_sum_of_reciprocal_counts_is_the_kernels_pss(spawn: Callable[..., Helper]) -> None:
    h = spawn("cow", 32, 0, 9, 30)
    for _ in range(20):  # compare at a quiet moment: the helpers may still be settling
        before = _pss_kib(h.pid)
        full = sample_process(h.pid, full=True, all_mappings=True)
        if _pss_kib(h.pid) == before:
            break
        time.sleep(0.1)
    assert full.own_pages * PAGE_SIZE / 1024 == pytest.approx(before, rel=0.002)


@pytest.mark.timeout(60)
def test_zero_page_mappings_cost_nothing(spawn: Callable[..., Helper]) -> None:
    h = spawn("zero", 16)
    s = sample_guest_ram(h.pid, h.addr, h.size, samples=500, seed=1)
    assert s.present == 500 and s.zero_fraction == 1.0
    assert s.expected_freed_per_page == 0.0 and s.mean_harmonic == float("inf")
    assert s.shared_fraction == 1.0 and s.mean_arithmetic is None


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mode", "args"), [("private", ()), ("fork", (2,)), ("thp", (0,)), ("thp", (1,))]
)
def test_exclusive_pages_have_one_mapping_as_kpagecount_says(
    spawn: Callable[..., Helper], mode: str, args: tuple[int, ...]
) -> None:
    """The sampler takes pagemap's "exclusively mapped" bit for kpagecount 1: check it."""
    h = spawn(mode, 16, *args)
    with Context.open_process(h.pid, all_mappings=True) as ctx:
        ctx.all_flags = True  # the THP check below needs the flags of exclusive pages too
        s = ctx.scan()
    exclusive = s.present_mask & ((s.entries & np.uint64(PAGEMAP_EXCLUSIVE)) != 0)
    fd = os.open("/proc/kpagecount", os.O_RDONLY)
    try:
        direct = read_entries(fd, pfns_of(s.entries[exclusive]), max_gap=0)
        in_region = s.present_mask & (s.vpns >= h.addr // PAGE_SIZE)
        in_region &= s.vpns < (h.addr + h.size) // PAGE_SIZE
        region_direct = read_entries(fd, pfns_of(s.entries[in_region]), max_gap=0)
    finally:
        os.close(fd)
    assert exclusive.sum() > 0 and (direct == 1).all()
    assert np.array_equal(s.counts[in_region], region_direct)
    assert int(in_region.sum()) == h.size // PAGE_SIZE
    assert (region_direct == 1 + (args[0] if args else 0)).all()
    if mode == "thp":
        thp = (s.flags[in_region] >> np.uint64(KPF_THP)) & np.uint64(1)
        assert thp.all(), "the helper's region is not backed by huge pages"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mode", "args"),
    [("private", ()), ("cow", (0, 3, 50)), ("fork", (2,)), ("zero", ()), ("ksm", (7,))],
)
def test_reading_only_the_flags_the_metric_needs_changes_no_result(
    spawn: Callable[..., Helper], mode: str, args: tuple[int, ...]
) -> None:
    """In a process KSM cannot touch only frames with count 0 (the zero page's) have their
    kpageflags read; a mergeable process (mode "ksm": MADV_MERGEABLE) has every flag read."""
    h = spawn(mode, 16, *args)
    used = np.uint64((1 << KPF_KSM) | (1 << KPF_ZERO_PAGE) | (1 << KPF_ANON))
    with Context.open_range(h.pid, h.addr, h.size) as ctx:
        for full in (False, True):
            lean = ctx.sample(1000, seed=3) if not full else ctx.scan()
            ctx.all_flags = True
            every = ctx.sample(1000, seed=3) if not full else ctx.scan()
            ctx.all_flags = False
            assert compute_stats(lean).to_json() == compute_stats(every).to_json()
            assert np.array_equal(lean.counts, every.counts)
            assert (every.flags != 0).all()  # every frame has a flag: ANON, or ZERO_PAGE
            read = lean.flags != 0
            assert read.all() if mode == "ksm" else np.array_equal(read, lean.counts == 0)
            assert np.array_equal(lean.flags[read] & used, every.flags[read] & used)
            zero = (every.flags & np.uint64(1 << KPF_ZERO_PAGE)) != 0
            assert (every.counts[zero] == 0).all()  # what skipping the flags relies on
            assert zero.all() if mode == "zero" else not zero.any()


@pytest.mark.timeout(60)
def test_a_reused_context_follows_the_process_and_notices_its_exit(
    spawn: Callable[..., Helper],
) -> None:
    h = spawn("fork", 8, 1)
    with Context.open_range(h.pid, h.addr, h.size) as ctx:
        first = ctx.measure(500, seed=1)
        assert first.mean_harmonic == pytest.approx(2.0)
        os.kill(h.children[0], 9)  # the parent's pages become private
        deadline = time.monotonic() + 20
        while ctx.measure(500, seed=1).mean_harmonic != 1.0 and time.monotonic() < deadline:
            time.sleep(0.05)
        again = ctx.measure(500, seed=1)
        assert again.mean_harmonic == 1.0 and again.expected_freed_per_page == 1.0
        assert (
            again.to_json()
            == sample_guest_ram(h.pid, h.addr, h.size, samples=500, seed=1).to_json()
        )
        h.proc.kill()
        h.proc.wait()
        with pytest.raises(ContextGoneError, match=f"process {h.pid} exited"):
            ctx.measure(500, seed=1)


# --- KSM ------------------------------------------------------------------------------------

KSM_KNOBS = ("run", "pages_to_scan", "sleep_millisecs")


@pytest.fixture
def fast_ksm() -> Iterator[None]:
    """KSM on and fast for the test; every knob touched is restored afterwards."""
    if not (KSM / "run").exists():
        pytest.skip("host kernel without KSM (/sys/kernel/mm/ksm missing)")
    with ksm_knobs(pages_to_scan=5000, sleep_millisecs=10, run=1):
        yield


@pytest.mark.timeout(120)
def test_ksm_merged_identical_pages(spawn: Callable[..., Helper], fast_ksm: None) -> None:
    a = spawn("ksm", 16, 1234)
    b = spawn("ksm", 16, 1234)
    deadline = time.monotonic() + 90
    while True:  # poll the real pagemap until every page of both is a KSM page
        sa = sample_guest_ram(a.pid, a.addr, a.size, full=True)
        sb = sample_guest_ram(b.pid, b.addr, b.size, full=True)
        if sa.ksm_fraction == sb.ksm_fraction == 1.0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    knobs = {k: (KSM / k).read_text().strip() for k in (*KSM_KNOBS, "full_scans")}
    assert sa.ksm_fraction == sb.ksm_fraction == 1.0, (
        f"KSM merged {sa.ksm_fraction:.1%} and {sb.ksm_fraction:.1%} of the pages within 90 s; "
        f"KSM now {knobs} (did another process change /sys/kernel/mm/ksm meanwhile?)"
    )
    for s in (sa, sb):
        assert s.mean_harmonic == s.median == pytest.approx(2.0)
        assert s.expected_freed_per_page == pytest.approx(0.5)
        assert s.shared_fraction == 1.0
    sampled = sample_guest_ram(a.pid, a.addr, a.size, samples=1000, seed=8)
    assert sampled.ksm_fraction == 1.0 and sampled.mean_harmonic == pytest.approx(2.0)


# --- bad input and limits -------------------------------------------------------------------


def test_nonexistent_pid_is_a_clear_error() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(NotFoundError, match=f"no process with PID {proc.pid}"):
        sample_process(proc.pid, samples=10)


@pytest.mark.timeout(60)
def test_process_exiting_before_the_pagemap_read(spawn: Callable[..., Helper]) -> None:
    h = spawn("private", 8)
    with Context.open_process(h.pid) as ctx:
        h.proc.kill()
        h.proc.wait()
        with pytest.raises(ContextGoneError, match=f"process {h.pid} exited"):
            ctx.sample(100, seed=1)


@pytest.mark.timeout(60)
def test_process_exiting_between_pagemap_and_frame_reads(
    spawn: Callable[..., Helper], monkeypatch: pytest.MonkeyPatch
) -> None:
    h = spawn("private", 8)
    real_read = FrameFiles.read

    def kill_then_read(self: FrameFiles, pfns: Any, *args: Any, **kwargs: Any) -> Any:
        h.proc.kill()  # the process dies after its PFNs were read: the counts would be stale
        h.proc.wait()
        return real_read(self, pfns, *args, **kwargs)

    monkeypatch.setattr(FrameFiles, "read", kill_then_read)
    with pytest.raises(ContextGoneError, match="exited"):
        sample_guest_ram(h.pid, h.addr, h.size, samples=100, seed=1)


@pytest.mark.timeout(60)
def test_k_larger_than_the_context_scans_it_all_and_says_so(
    spawn: Callable[..., Helper],
) -> None:
    h = spawn("private", 1)
    s = sample_guest_ram(h.pid, h.addr, h.size, samples=1000, seed=1)
    assert s.full_scan and s.sampled == s.context_pages == 256
    assert any("scanned every page" in w for w in s.warnings)


@pytest.mark.timeout(60)
def test_guest_ram_in_pieces_measures_the_same_as_in_one(spawn: Callable[..., Helper]) -> None:
    h = spawn("cow", 16, 0, 3, 50)
    half = h.size // 2
    whole = sample_guest_ram(h.pid, h.addr, h.size, full=True)
    pieces = sample_guest_ranges(h.pid, [(h.addr + half, half), (h.addr, half)], full=True)
    assert pieces.sampled == whole.sampled and pieces.present == whole.present
    assert pieces.expected_freed_per_page == pytest.approx(whole.expected_freed_per_page)
    with pytest.raises(InputError, match="overlaps"):
        sample_guest_ranges(h.pid, [(h.addr, half + PAGE_SIZE), (h.addr + half, half)])


@pytest.mark.timeout(60)
def test_guest_ram_range_is_validated(spawn: Callable[..., Helper]) -> None:
    h = spawn("private", 1)
    with pytest.raises(InputError, match="not a multiple"):
        sample_guest_ram(h.pid, h.addr + 1, h.size)
    with pytest.raises(InputError, match="not mapped"):
        sample_guest_ram(h.pid, h.addr, 1 << 46)
    with pytest.raises(InputError, match="seed"):
        sample_guest_ram(h.pid, h.addr, h.size, samples=10, seed=-5)


NONROOT = r"""
import ctypes, os, pwd, sys
import numpy.random  # imported before dropping privileges: nobody may not read the venv
from memvisor.errors import PermissionNeededError
from memvisor.sharing import sample_process
buf = bytearray(4 << 20)  # resident memory of our own to sample
nobody = pwd.getpwnam("nobody")
os.setgid(nobody.pw_gid)
os.setuid(nobody.pw_uid)
ctypes.CDLL(None).prctl(4, 1)  # PR_SET_DUMPABLE: our own /proc/self files stay readable
from memvisor.sharing.procfs import (
    KPF_ANON,
    KPF_KSM,
    KPF_THP,
    KPF_ZERO_PAGE,
    PAGEMAP_EXCLUSIVE,
    pfns_of,
    read_entries,
)
from memvisor.sharing.sampler import FrameFiles
try:
    FrameFiles()
except PermissionNeededError as exc:
    print(exc)
try:
    sample_process(os.getpid(), samples=200, seed=1)
except PermissionNeededError as exc:
    print(exc)
    sys.exit(4)
print("sampled without privileges")
"""


@pytest.mark.timeout(60)
def test_without_privileges_pfns_read_as_zero_and_we_say_so() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges to nobody")
    out = subprocess.run(
        [sys.executable, "-c", NONROOT], capture_output=True, text=True, timeout=50
    )
    assert out.returncode == 4, out.stdout + out.stderr
    frames_refused, pfns_hidden = out.stdout.splitlines()
    assert frames_refused.startswith("cannot read /proc/kpagecount")
    assert "PFNs read as 0" in pfns_hidden
    assert "root or CAP_SYS_ADMIN needed" in frames_refused
    assert "root or CAP_SYS_ADMIN needed" in pfns_hidden


# --- CLI and ranking on real processes ------------------------------------------------------


@pytest.mark.timeout(60)
def test_cli_json_ranks_private_memory_before_shared(
    spawn: Callable[..., Helper], capsys: pytest.CaptureFixture[str]
) -> None:
    shared = spawn("fork", 32, 3)
    private = spawn("private", 32)
    argv = ["sharing", "--pid", str(shared.pid), "--pid", str(private.pid), "--json"]
    assert main([*argv, "--samples", "2000", "--seed", "5"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ranking"] == [private.pid, shared.pid]
    keys = {
        "pid", "sampled", "present", "swapped", "mean_arithmetic", "mean_geometric",
        "mean_harmonic", "median", "shared_fraction", "ksm_fraction",
        "expected_freed_per_page", "ci95",
    }  # fmt: skip
    for ctx in doc["contexts"]:
        assert keys <= ctx.keys() and ctx["sampled"] == 2000 and ctx["seed"] == 5
        assert set(ctx["ci95"]) >= {"mean_harmonic", "expected_freed_per_page"}
    assert main(["sharing", "--pid", str(shared.pid), "--samples", "500"]) == 0
    assert "ranked by harmonic mean" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_ranking_of_real_samples_matches_the_truth(spawn: Callable[..., Helper]) -> None:
    fork3 = spawn("fork", 16, 3)
    fork1 = spawn("fork", 16, 1)
    private = spawn("private", 16)
    samples = {
        name: sample_guest_ram(h.pid, h.addr, h.size, samples=1000, seed=1).to_model()
        for name, h in (("fork3", fork3), ("fork1", fork1), ("private", private))
    }
    assert [e.key for e in rank_for_reclamation(samples)] == ["private", "fork1", "fork3"]
