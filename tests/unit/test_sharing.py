"""Pure parts of the sharing metric (C1): maps parsing, run coalescing, metric, intervals,
ranking. The real processes, KSM and /proc reads are in test_sharing_real.py."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from memvisor.cli import main
from memvisor.errors import BackendError, InputError, PermissionNeededError
from memvisor.model import SharingSample
from memvisor.sharing import (
    Context,
    PageRange,
    PageSample,
    Statistic,
    check_pfns_visible,
    compute_stats,
    parse_maps,
    rank_for_reclamation,
    select_mappings,
)
from memvisor.sharing.metric import median_interval, median_of_sorted, proportion_interval
from memvisor.sharing.procfs import (
    KPF_KSM,
    KPF_ZERO_PAGE,
    PAGEMAP_PRESENT,
    EndOfFile,
    coalesce_runs,
    parse_spans,
    read_entries,
    worth_coalescing,
)

MAPS = """\
55d0c0000000-55d0c0002000 r--p 00000000 08:01 1234                       /usr/bin/prog
55d0c0002000-55d0c0004000 rw-p 00002000 08:01 1234                       /usr/bin/prog
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0000100000-7f0000200000 ---p 00000000 00:00 0
7f0000200000-7f0000300000 r--s 00000000 00:05 99                         /dev/shm/my file (deleted)
7f0000300000-7f0000301000 rw-p 00000000 00:00 0                          [anon:guest ram]
7f0000400000-7f0000500000 r-xp 00000000 08:01 555                        /usr/lib/libc.so.6
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
7ffd00100000-7ffd00104000 r--p 00000000 00:00 0                          [vvar]
7ffd00104000-7ffd00106000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
"""

ZERO = 1 << KPF_ZERO_PAGE
KSM = 1 << KPF_KSM


# --- maps -----------------------------------------------------------------------------------


def test_parse_maps_reads_every_field() -> None:
    entries = parse_maps(MAPS.replace("00:00 0\n", "00:00 0 \n"))  # the kernel pads with spaces
    assert len(entries) == 12
    data = entries[1]
    assert (data.start, data.end, data.perms, data.offset, data.inode) == (
        0x55D0C0002000,
        0x55D0C0004000,
        "rw-p",
        0x2000,
        1234,
    )
    assert data.path == "/usr/bin/prog" and data.pages == 2
    assert entries[3].path == "" and entries[3].anonymous
    assert entries[5].path == "/dev/shm/my file (deleted)" and not entries[5].private
    assert entries[6].path == "[anon:guest ram]" and entries[6].anonymous


def test_default_selection_is_private_writable_and_anonymous() -> None:
    chosen = [e.path for e in select_mappings(parse_maps(MAPS))]
    assert chosen == ["/usr/bin/prog", "[heap]", "", "[anon:guest ram]", "[stack]"]


def test_all_mappings_leaves_out_only_what_pagemap_cannot_read() -> None:
    chosen = select_mappings(parse_maps(MAPS), all_mappings=True)
    assert len(chosen) == 11
    assert "[vsyscall]" not in [e.path for e in chosen]


@pytest.mark.parametrize(
    "line",
    ["garbage", "7f00-7e00 rw-p 00000000 00:00 0", "7f0000000001-7f0000002000 rw-p 0 00:00 0"],
)
def test_parse_maps_rejects_malformed_lines(line: str) -> None:
    with pytest.raises(BackendError, match="line 1"):
        parse_maps(line, source="/proc/1/maps")
    with pytest.raises(BackendError, match="line 1"):
        parse_spans(line, source="/proc/1/maps")


def test_spans_are_the_ranges_of_the_full_parse() -> None:
    for text in (MAPS, MAPS + "\n", Path("/proc/self/maps").read_text()):
        assert parse_spans(text) == [(e.start, e.end) for e in parse_maps(text)]


# --- coalesced reads ------------------------------------------------------------------------


def test_coalesce_runs_merges_small_gaps_only() -> None:
    idx = np.array([3, 4, 10, 100, 101, 500], dtype=np.uint64)
    runs = coalesce_runs(idx, max_gap=6)
    assert runs.starts.tolist() == [3, 100, 500]
    assert runs.lengths.tolist() == [8, 2, 1]
    assert runs.buffer_offsets.tolist() == [0, 8, 10]
    assert runs.positions.tolist() == [0, 1, 7, 8, 9, 10]
    assert coalesce_runs(idx, max_gap=0).lengths.tolist() == [2, 1, 2, 1]


@given(
    st.sets(st.integers(min_value=0, max_value=5000), min_size=1, max_size=300),
    st.integers(min_value=0, max_value=64),
)
def test_coalesced_runs_cover_each_index_once(indices: set[int], gap: int) -> None:
    idx = np.array(sorted(indices), dtype=np.uint64)
    runs = coalesce_runs(idx, max_gap=gap)
    pairs = zip(runs.starts.tolist(), runs.lengths.tolist(), strict=True)
    covered = np.concatenate([np.arange(s, s + n, dtype=np.uint64) for s, n in pairs])
    assert covered.size == runs.total_entries
    assert np.array_equal(covered[runs.positions], idx)  # every index found where expected
    between = runs.starts[1:] - (runs.starts[:-1] + runs.lengths[:-1])
    assert (between > gap).all()  # runs are split only where the gap is too wide


@given(st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=50))
def test_median_of_sorted_values_is_numpys_median(counts: list[int]) -> None:
    values = np.sort(np.array(counts, dtype=np.float64))
    assert median_of_sorted(values) == float(np.median(values))


def test_read_entries_from_a_real_file(tmp_path: Path) -> None:
    values = np.arange(10_000, dtype=np.uint64) * np.uint64(7) + np.uint64(1 << 60)
    path = tmp_path / "entries"
    path.write_bytes(values.tobytes())
    rng = np.random.default_rng(3)
    scattered = rng.integers(0, 10_000, size=3000).astype(np.uint64)
    dense = np.unique(rng.integers(0, 10_000, size=3000)).astype(np.uint64)
    repeated = np.repeat(dense[::-1], 2)  # near neighbours, but descending and repeated
    fd = os.open(path, os.O_RDONLY)
    try:
        for want, gap, coalesced in [
            (scattered, 0, False),
            (scattered, 1000, False),
            (scattered, 5000, True),
            (dense, 0, True),
            (dense, 16, True),
            (repeated, 0, True),
            (repeated, 16, True),
        ]:
            assert worth_coalescing(want, gap) is coalesced
            got = read_entries(fd, want, max_gap=gap)
            assert np.array_equal(got, values[want.astype(np.int64)])
        past = np.array([5, 9_999, 10_000, 20_000], dtype=np.uint64)
        with pytest.raises(EndOfFile):
            read_entries(fd, past, max_gap=0)
        got = read_entries(fd, past, max_gap=16, zero_past_end=True)
        assert got.tolist() == [int(values[5]), int(values[9_999]), 0, 0]
    finally:
        os.close(fd)


def test_context_maps_indices_to_pages_of_each_range() -> None:
    ctx = Context(42, [PageRange(100, 3), PageRange(1000, 2), PageRange(50, 1)], "t", -1)
    assert ctx.total_pages == 6
    got = ctx.vpns_of(np.arange(6, dtype=np.uint64))
    assert got.tolist() == [100, 101, 102, 1000, 1001, 50]


@pytest.mark.parametrize(
    ("start", "length", "message"),
    [(4096, 0, "empty"), (4097, 4096, "not a multiple"), (-4096, 4096, "non-negative")],
)
def test_guest_ram_range_arguments_are_checked_first(start: int, length: int, message: str) -> None:
    with pytest.raises(InputError, match=message):
        Context.open_range(os.getpid(), start, length)


def test_pfns_hidden_from_unprivileged_readers_are_detected() -> None:
    hidden = np.array([PAGEMAP_PRESENT, PAGEMAP_PRESENT, 0], dtype=np.uint64)
    with pytest.raises(PermissionNeededError, match="root or CAP_SYS_ADMIN needed"):
        check_pfns_visible(hidden, pid=7)
    visible = np.array([PAGEMAP_PRESENT | 1234, 0], dtype=np.uint64)
    check_pfns_visible(visible, pid=7)  # absent pages have no PFN, and that is fine


# --- metric ---------------------------------------------------------------------------------


@given(
    st.lists(st.integers(min_value=0, max_value=300), min_size=0, max_size=200),
    st.integers(min_value=0, max_value=3),
)
def test_metric_is_the_direct_numpy_formulas_bit_for_bit(counts: list[int], swapped: int) -> None:
    """compute_stats shares work between statistics; each must still be exactly the plain
    numpy computation over the present pages."""
    c = np.array(counts, dtype=np.uint64)
    zero = c == 0
    ksm = (c >= 2) & (np.arange(c.size) % 3 == 0)
    flags = np.where(zero, np.uint64(1 << KPF_ZERO_PAGE), np.uint64(0))
    flags |= np.where(ksm, np.uint64(1 << KPF_KSM), np.uint64(0))
    s = compute_stats(PageSample.from_counts(c, flags=flags, swapped=swapped, context_pages=9999))
    real = c[~zero].astype(np.float64)
    reciprocal = np.zeros(c.size)
    reciprocal[~zero] = 1.0 / real
    assert s.present == c.size and s.swapped == swapped
    assert s.expected_freed_per_page == (float(reciprocal.mean()) if c.size else 0.0)
    assert s.mean_arithmetic == (float(real.mean()) if real.size else None)
    assert s.mean_geometric == (float(np.exp(np.log(real).mean())) if real.size else None)
    assert s.median == (float(np.median(real)) if real.size else None)
    if c.size:
        assert s.shared_fraction == float((zero | ksm | (c != 1)).mean())
        assert s.ksm_fraction == float(ksm.mean()) and s.zero_fraction == float(zero.mean())


def test_means_of_a_mixed_sample() -> None:
    s = compute_stats(PageSample.from_counts([1, 1, 2, 4]))
    assert s.present == 4 and s.counted == 4
    assert s.mean_arithmetic == pytest.approx(2.0)
    assert s.mean_geometric == pytest.approx(8 ** (1 / 4))
    assert s.mean_harmonic == pytest.approx(4 / 2.75)
    assert s.median == pytest.approx(1.5)
    assert s.expected_freed_per_page == pytest.approx(2.75 / 4)
    assert s.expected_freed_per_page == pytest.approx(1 / s.mean_harmonic)
    assert s.shared_fraction == pytest.approx(0.5)
    assert s.own_pages == pytest.approx(2.75)  # the sum of 1/count: PSS in pages


def test_rare_heavily_shared_pages_dominate_the_arithmetic_mean() -> None:
    s = compute_stats(PageSample.from_counts([1] * 99 + [256]))
    assert s.mean_arithmetic == pytest.approx(3.55)
    assert s.mean_harmonic == pytest.approx(100 / (99 + 1 / 256))
    assert s.median == 1.0
    assert s.expected_freed_per_page > 0.99


def test_zero_page_frees_nothing_and_has_no_count() -> None:
    s = compute_stats(PageSample.from_counts([0, 0, 2, 1], flags=[ZERO, ZERO, 0, 0]))
    assert s.present == 4 and s.counted == 2
    assert s.zero_fraction == 0.5
    assert s.expected_freed_per_page == pytest.approx(1.5 / 4)
    assert s.mean_harmonic == pytest.approx(4 / 1.5)
    assert s.mean_arithmetic == pytest.approx(1.5)
    assert s.shared_fraction == 0.75


def test_only_zero_pages_give_an_infinite_harmonic_mean_and_null_json() -> None:
    s = compute_stats(PageSample.from_counts([0, 0], flags=[ZERO, ZERO]))
    assert s.expected_freed_per_page == 0.0 and math.isinf(s.mean_harmonic)
    assert s.mean_arithmetic is None and s.median is None
    doc = json.loads(json.dumps(s.to_json()))
    assert doc["mean_harmonic"] is None and doc["expected_freed_per_page"] == 0.0


def test_ksm_pages_are_counted_as_ksm_and_shared() -> None:
    s = compute_stats(PageSample.from_counts([2, 3, 1, 1], flags=[KSM, KSM, KSM, 0]))
    assert s.ksm_fraction == 0.75
    assert s.shared_fraction == 0.75  # a KSM frame left with one mapping is still KSM


def test_swapped_and_absent_pages_stay_out_of_the_metric() -> None:
    s = compute_stats(PageSample.from_counts([2, 2], swapped=3, absent=5))
    assert (s.sampled, s.present, s.swapped, s.absent) == (10, 2, 3, 5)
    assert s.mean_harmonic == pytest.approx(2.0)


def test_nothing_present_is_flagged_not_made_up() -> None:
    sample = PageSample.from_counts([], absent=10, context_pages=1000)
    s = compute_stats(sample)
    assert s.present == 0 and s.expected_freed_per_page == 0.0
    assert s.mean_arithmetic is None and s.ci95.expected_freed_per_page is None
    assert any("no sampled page was present" in w for w in s.warnings)


def test_full_scan_intervals_are_exact() -> None:
    s = compute_stats(PageSample.from_counts([1, 2, 2, 3]))
    assert s.full_scan
    iv = s.ci95.expected_freed_per_page
    assert iv is not None and iv.low == iv.high == s.expected_freed_per_page
    assert s.ci95.shared_fraction is not None
    assert s.ci95.shared_fraction.low == s.ci95.shared_fraction.high == 0.75


def test_intervals_cover_the_truth_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(11)
    population = rng.choice([1, 2, 3, 256], p=[0.5, 0.3, 0.15, 0.05], size=50_000)
    truth_freed = float((1.0 / population).mean())
    truth_shared = float((population > 1).mean())
    covered_freed = covered_shared = 0
    trials = 400
    for _ in range(trials):
        drawn = rng.choice(population, size=500, replace=False)
        s = compute_stats(PageSample.from_counts(drawn.tolist(), context_pages=population.size))
        freed, shared = s.ci95.expected_freed_per_page, s.ci95.shared_fraction
        assert freed is not None and shared is not None
        covered_freed += freed.low <= truth_freed <= freed.high
        covered_shared += shared.low <= truth_shared <= shared.high
    assert 0.92 <= covered_freed / trials <= 0.98
    assert 0.92 <= covered_shared / trials <= 0.98


def test_sampling_most_of_a_context_narrows_the_interval() -> None:
    counts = [1, 2] * 500
    small = compute_stats(PageSample.from_counts(counts, context_pages=100_000))
    most = compute_stats(PageSample.from_counts(counts, context_pages=1_100))
    a, b = small.ci95.shared_fraction, most.ci95.shared_fraction
    assert a is not None and b is not None
    assert (b.high - b.low) < 0.4 * (a.high - a.low)


def test_proportion_and_median_interval_edges() -> None:
    none = proportion_interval(0, 100, fpc=1.0)
    assert none is not None and none.low == 0.0 and 0 < none.high < 0.05
    assert proportion_interval(0, 0, fpc=1.0) is None
    values = np.sort(np.array([1.0] * 40 + [2.0] * 60))
    iv = median_interval(values, fpc=1.0)
    assert iv is not None and iv.low <= 2.0 <= iv.high


def test_to_model_carries_every_statistic() -> None:
    stats = compute_stats(PageSample.from_counts([1, 2, 4], context_pages=30))
    m = stats.to_model()
    assert isinstance(m, SharingSample)
    assert (m.sampled, m.present, m.swapped) == (3, 3, 0)
    assert m.mean_harmonic == stats.mean_harmonic
    assert m.expected_freed_per_page == stats.expected_freed_per_page
    assert m.median == 2.0 and m.resident_pages == pytest.approx(30.0)


# --- ranking --------------------------------------------------------------------------------


def _sample(
    freed: float, *, present: int = 100, resident: float = 0.0, **kw: float
) -> SharingSample:
    return SharingSample(
        sampled=present,
        present=present,
        swapped=0,
        mean_harmonic=1 / freed if freed else math.inf,
        expected_freed_per_page=freed,
        shared_fraction=0.0,
        resident_pages=resident,
        **kw,  # type: ignore[arg-type]
    )


def test_ranking_puts_the_biggest_yield_per_page_first() -> None:
    samples = {"ksm-heavy": _sample(0.3), "private": _sample(1.0), "half": _sample(0.5)}
    order = rank_for_reclamation(samples)
    assert [e.key for e in order] == ["private", "half", "ksm-heavy"]
    assert "frees 1.000 page per page" in order[0].reason


def test_ranking_ties_go_to_the_larger_context_then_the_key() -> None:
    samples = {
        "b": _sample(0.5, resident=10),
        "a": _sample(0.5, resident=10),
        "big": _sample(0.5, resident=5000),
        "old": _sample(0.5, present=300),  # no resident_pages: its present count is used
    }
    assert [e.key for e in rank_for_reclamation(samples)] == ["big", "old", "a", "b"]


def test_ranking_by_other_statistics_is_ascending_and_empty_contexts_go_last() -> None:
    samples = {
        1: _sample(0.9, mean_geometric=1.1, median=1.0),
        2: _sample(0.6, mean_geometric=1.9, median=2.0),
        3: _sample(0.0, present=0),
        4: _sample(0.8, mean_geometric=1.2, median=1.0, resident=500),
    }
    assert [e.key for e in rank_for_reclamation(samples, "geometric")] == [1, 4, 2, 3]
    assert [e.key for e in rank_for_reclamation(samples, Statistic.MEDIAN)] == [4, 1, 2, 3]
    assert rank_for_reclamation(samples)[-1].reason.startswith("no sampled page")


def test_ranking_rejects_an_unknown_statistic() -> None:
    with pytest.raises(InputError, match="mode"):
        rank_for_reclamation({"a": _sample(1.0)}, "mode")


# --- CLI input checks (no /proc access needed) ----------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pid", "5", "--pid", "5"], "given twice"),
        (["--pid", "5", "--samples", "0"], "--samples"),
        (["--pid", "-3"], "--pid"),
        (["--pid", "5", "--seed", "-1"], "--seed"),
    ],
)
def test_cli_refuses_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sharing", *argv, "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["error"] == "InputError" and message in doc["message"]
