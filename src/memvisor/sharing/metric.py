"""The sharing metric (C1): from sampled pages to means of the sharing count, with 95% intervals.

Pure: a :class:`PageSample` holds what the kernel said about each sampled page (the pagemap
entry, and for present pages the frame's kpagecount and kpageflags); :func:`compute_stats` turns
it into a :class:`SharingStats`. No I/O here, so the math is tested with synthetic counts.

Which pages count (docs/policy.md, "Sharing metric (C1)", has the derivation):
- absent and swapped pages are counted apart and never enter the metric;
- a present page whose frame has kpagecount 0 is the shared zero page (KPF_ZERO_PAGE) or a
  special mapping the kernel does not count: reclaiming it frees nothing, so it adds 0 to the
  mean of 1/count (the kernel leaves it out of PSS too) and counts as shared-or-free;
- the arithmetic and geometric means and the median describe the frames that have a count
  (kpagecount >= 1); the harmonic mean is ``present / sum(1/count)`` over all present pages,
  so ``expected_freed_per_page == 1 / mean_harmonic`` always (both 0 / inf when nothing frees).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from memvisor.model import SharingSample
from memvisor.sharing.procfs import (
    KPF_KSM,
    KPF_ZERO_PAGE,
    PAGEMAP_PRESENT,
    PAGEMAP_SWAPPED,
    U64Array,
)

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class PageSample:
    """What the kernel reported for the sampled pages of one context.

    Arrays are aligned and hold only pages that were present or swapped; absent pages are just
    counted (``sampled - len(entries)``), so a full scan of a large sparse context stays small.
    """

    label: str
    context_pages: int  # pages in the context's address ranges
    sampled: int  # pages examined (absent ones included)
    vpns: U64Array  # virtual page numbers of the kept pages
    entries: U64Array  # their pagemap entries
    counts: U64Array  # kpagecount of their frames (0 for swapped pages)
    flags: U64Array  # kpageflags of their frames (0 for swapped pages, and where the
    # metric needs no flag, which the sampler then does not read: see FrameFiles.read)
    pid: int | None = None
    full_scan: bool = False
    seed: int | None = None
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_counts(
        cls,
        counts: list[int] | U64Array,
        *,
        flags: list[int] | U64Array | None = None,
        swapped: int = 0,
        absent: int = 0,
        context_pages: int | None = None,
        label: str = "synthetic",
    ) -> PageSample:
        """A sample of present pages with the given counts (for tests and simulations)."""
        c = np.asarray(counts, dtype=np.uint64)
        f = np.zeros_like(c) if flags is None else np.asarray(flags, dtype=np.uint64)
        n = c.size + swapped
        present = np.full(c.size, PAGEMAP_PRESENT, dtype=np.uint64) | (
            np.arange(c.size, dtype=np.uint64) + np.uint64(1000)
        )
        entries = np.concatenate((present, np.full(swapped, PAGEMAP_SWAPPED, dtype=np.uint64)))
        sampled = n + absent
        return cls(
            label=label,
            context_pages=sampled if context_pages is None else context_pages,
            sampled=sampled,
            vpns=np.arange(n, dtype=np.uint64),
            entries=entries,
            counts=np.concatenate((c, np.zeros(swapped, dtype=np.uint64))),
            flags=np.concatenate((f, np.zeros(swapped, dtype=np.uint64))),
            full_scan=context_pages is None or sampled >= context_pages,
        )

    @property
    def present_mask(self) -> npt.NDArray[np.bool_]:
        result: npt.NDArray[np.bool_] = (self.entries & np.uint64(PAGEMAP_PRESENT)) != 0
        return result

    @property
    def swapped_mask(self) -> npt.NDArray[np.bool_]:
        result: npt.NDArray[np.bool_] = (self.entries & np.uint64(PAGEMAP_SWAPPED)) != 0
        return result


@dataclass(frozen=True, slots=True)
class Interval:
    """A 95% confidence interval."""

    low: float
    high: float

    def as_list(self) -> list[float | None]:
        return [_finite_or_none(self.low), _finite_or_none(self.high)]


@dataclass(frozen=True, slots=True)
class ConfidenceIntervals:
    """95% intervals of each metric; None where the metric is undefined or n < 2."""

    mean_arithmetic: Interval | None = None
    mean_geometric: Interval | None = None
    mean_harmonic: Interval | None = None
    median: Interval | None = None
    shared_fraction: Interval | None = None
    ksm_fraction: Interval | None = None
    zero_fraction: Interval | None = None
    expected_freed_per_page: Interval | None = None

    def as_dict(self) -> dict[str, list[float | None] | None]:
        return {
            name: (None if iv is None else iv.as_list())
            for name, iv in (
                ("mean_arithmetic", self.mean_arithmetic),
                ("mean_geometric", self.mean_geometric),
                ("mean_harmonic", self.mean_harmonic),
                ("median", self.median),
                ("shared_fraction", self.shared_fraction),
                ("ksm_fraction", self.ksm_fraction),
                ("zero_fraction", self.zero_fraction),
                ("expected_freed_per_page", self.expected_freed_per_page),
            )
        }


@dataclass(frozen=True, slots=True)
class SharingStats:
    """The sharing metric of one context, with 95% confidence intervals."""

    label: str
    pid: int | None
    context_pages: int
    sampled: int
    present: int
    swapped: int
    absent: int
    counted: int  # present pages whose frame has a count (kpagecount >= 1)
    mean_arithmetic: float | None
    mean_geometric: float | None
    mean_harmonic: float  # inf when no present page frees anything
    median: float | None
    expected_freed_per_page: float  # mean of 1/count over present pages; 0 if none present
    shared_fraction: float  # present pages shared or free (count != 1, KSM, zero page)
    ksm_fraction: float
    zero_fraction: float
    resident_pages: float  # estimated present pages in the whole context
    own_pages: float  # estimated sum of 1/count over the context = its PSS in pages
    full_scan: bool = False
    seed: int | None = None
    ci95: ConfidenceIntervals = field(default_factory=ConfidenceIntervals)
    warnings: tuple[str, ...] = ()

    def to_model(self) -> SharingSample:
        """The scheduler's view (:class:`memvisor.model.SharingSample`)."""
        return SharingSample(
            sampled=self.sampled,
            present=self.present,
            swapped=self.swapped,
            mean_harmonic=self.mean_harmonic,
            expected_freed_per_page=self.expected_freed_per_page,
            shared_fraction=self.shared_fraction,
            mean_arithmetic=self.mean_arithmetic,
            mean_geometric=self.mean_geometric,
            median=self.median,
            ksm_fraction=self.ksm_fraction,
            zero_fraction=self.zero_fraction,
            resident_pages=self.resident_pages,
        )

    def to_json(self) -> dict[str, object]:
        """The JSON object of ``memvisor sharing --json`` (non-finite numbers become null)."""
        return {
            "pid": self.pid,
            "sampled": self.sampled,
            "present": self.present,
            "swapped": self.swapped,
            "mean_arithmetic": _finite_or_none(self.mean_arithmetic),
            "mean_geometric": _finite_or_none(self.mean_geometric),
            "mean_harmonic": _finite_or_none(self.mean_harmonic),
            "median": _finite_or_none(self.median),
            "shared_fraction": self.shared_fraction,
            "ksm_fraction": self.ksm_fraction,
            "expected_freed_per_page": self.expected_freed_per_page,
            "ci95": self.ci95.as_dict(),
            "zero_fraction": self.zero_fraction,
            "context": self.label,
            "context_pages": self.context_pages,
            "resident_pages": round(self.resident_pages, 1),
            "own_pages": round(self.own_pages, 1),
            "full_scan": self.full_scan,
            "seed": self.seed,
            "warnings": list(self.warnings),
        }


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def finite_population_factor(sampled: int, population: int) -> float:
    """sqrt(1 - n/N): sampling without replacement; 0 for a full scan (the value is exact)."""
    if population <= 0 or sampled >= population:
        return 0.0
    return math.sqrt(1.0 - sampled / population)


def mean_interval(values: FloatArray, fpc: float, mean: float | None = None) -> Interval | None:
    """Normal-approximation interval of a mean, with the finite-population correction
    (``mean``: the values' mean, if the caller has it already)."""
    n = values.size
    if n == 0:
        return None
    mean = float(values.mean()) if mean is None else mean
    if fpc == 0.0:
        return Interval(mean, mean)
    if n < 2:
        return None
    half = Z95 * float(values.std(ddof=1)) / math.sqrt(n) * fpc
    return Interval(mean - half, mean + half)


def proportion_interval(hits: int, n: int, fpc: float) -> Interval | None:
    """Wilson score interval; the finite-population correction shrinks it via an effective n."""
    if n == 0:
        return None
    p = hits / n
    if fpc == 0.0:
        return Interval(p, p)
    n_eff = n / (fpc * fpc)
    z2 = Z95 * Z95
    denom = 1.0 + z2 / n_eff
    centre = (p + z2 / (2 * n_eff)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n_eff + z2 / (4 * n_eff * n_eff)) / denom
    low = 0.0 if hits == 0 else max(0.0, centre - half)
    high = 1.0 if hits == n else min(1.0, centre + half)
    return Interval(low, high)


def median_interval(sorted_values: FloatArray, fpc: float) -> Interval | None:
    """Distribution-free interval of the median from order statistics (binomial ranks)."""
    n = sorted_values.size
    if n == 0:
        return None
    med = median_of_sorted(sorted_values)
    if fpc == 0.0:
        return Interval(med, med)
    half_rank = Z95 * math.sqrt(n) / 2 * fpc
    lo = max(0, math.floor(n / 2 - half_rank))
    hi = min(n - 1, math.ceil(n / 2 + half_rank) - 1)
    return Interval(float(sorted_values[lo]), float(sorted_values[max(lo, hi)]))


def median_of_sorted(sorted_values: FloatArray) -> float:
    """``np.median`` of values already sorted, without its partition (same arithmetic: the
    middle value, or the mean of the two middle values)."""
    n = sorted_values.size
    if n % 2:
        return float(sorted_values[n // 2])
    return float(sorted_values[n // 2 - 1 : n // 2 + 1].mean())


def _reciprocal_interval(iv: Interval | None) -> Interval | None:
    """Interval of 1/x from an interval of x > = 0 (x = 0 maps to infinity)."""
    if iv is None:
        return None
    low, high = max(iv.low, 0.0), max(iv.high, 0.0)
    return Interval(
        1.0 / high if high > 0 else math.inf,
        1.0 / low if low > 0 else math.inf,
    )


@dataclass(frozen=True, eq=False)
class _PresentPages:
    """The present pages of a sample, split into the classes the metric needs; each array and
    mean is computed once (this runs every tick for every context)."""

    counts: U64Array
    zero: int  # pages on the zero page (KPF_ZERO_PAGE)
    ksm: int  # pages in KSM frames (KPF_KSM)
    shared: int  # pages shared or free: KSM, zero page, or count != 1
    real: FloatArray  # counts of frames that have one (c >= 1, not the zero page)
    real_sorted: FloatArray  # the same, sorted (for the median; the means sum ``real``)
    logs: FloatArray  # ln of ``real``
    reciprocal: FloatArray  # 1/c per present page; 0 where the frame has no count

    @classmethod
    def of(cls, sample: PageSample, present: npt.NDArray[np.bool_]) -> _PresentPages:
        counts, flags = sample.counts, sample.flags
        if not present.all():
            counts, flags = counts[present], flags[present]
        zero = (flags & np.uint64(1 << KPF_ZERO_PAGE)) != 0
        ksm = (flags & np.uint64(1 << KPF_KSM)) != 0
        has_count = (counts >= 1) & ~zero
        if has_count.all():
            real = counts.astype(np.float64)
            reciprocal = 1.0 / real
        else:
            real = counts[has_count].astype(np.float64)
            reciprocal = np.zeros(counts.size, dtype=np.float64)
            reciprocal[has_count] = 1.0 / real
        shared = int(np.count_nonzero(ksm | zero | (counts != 1)))
        return cls(
            counts,
            int(np.count_nonzero(zero)),
            int(np.count_nonzero(ksm)),
            shared,
            real,
            np.sort(real),
            np.log(real),
            reciprocal,
        )


def _fraction(hits: int, n: int) -> float:
    # Equal to the mean of the boolean mask, bit for bit: both divide exact integers once.
    return hits / n if n else 0.0


def _mean(values: FloatArray) -> float | None:
    return float(values.mean()) if values.size else None


def _intervals(
    pages: _PresentPages, fpc: float, means: tuple[float | None, ...]
) -> ConfidenceIntervals:
    n = int(pages.counts.size)
    mean_freed, mean_real, mean_log = means
    freed = mean_interval(pages.reciprocal, fpc, mean_freed)
    if freed is not None:
        freed = Interval(max(0.0, freed.low), min(1.0, freed.high))
    arith = mean_interval(pages.real, fpc, mean_real)
    logs = mean_interval(pages.logs, fpc, mean_log)
    return ConfidenceIntervals(
        mean_arithmetic=None if arith is None else Interval(max(1.0, arith.low), arith.high),
        mean_geometric=None if logs is None else Interval(math.exp(logs.low), math.exp(logs.high)),
        mean_harmonic=_reciprocal_interval(freed),
        median=median_interval(pages.real_sorted, fpc),
        shared_fraction=proportion_interval(pages.shared, n, fpc),
        ksm_fraction=proportion_interval(pages.ksm, n, fpc),
        zero_fraction=proportion_interval(pages.zero, n, fpc),
        expected_freed_per_page=freed,
    )


def compute_stats(sample: PageSample) -> SharingStats:
    """The metric of one context from its sampled pages."""
    present_mask = sample.present_mask
    pages = _PresentPages.of(sample, present_mask)
    present, real = int(pages.counts.size), pages.real
    fpc = finite_population_factor(sample.sampled, sample.context_pages)
    scale = sample.context_pages / sample.sampled if sample.sampled else 0.0
    mean_freed, mean_real, mean_log = _mean(pages.reciprocal), _mean(real), _mean(pages.logs)
    freed = mean_freed if mean_freed is not None else 0.0
    return SharingStats(
        label=sample.label,
        pid=sample.pid,
        context_pages=sample.context_pages,
        sampled=sample.sampled,
        present=present,
        swapped=int(np.count_nonzero(sample.swapped_mask)),
        absent=sample.sampled - int(sample.entries.size),
        counted=int(real.size),
        mean_arithmetic=mean_real,
        mean_geometric=None if mean_log is None else float(np.exp(mean_log)),
        mean_harmonic=1.0 / freed if freed > 0 else math.inf,
        median=median_of_sorted(pages.real_sorted) if real.size else None,
        expected_freed_per_page=freed,
        shared_fraction=_fraction(pages.shared, present),
        ksm_fraction=_fraction(pages.ksm, present),
        zero_fraction=_fraction(pages.zero, present),
        resident_pages=present * scale,
        own_pages=float(pages.reciprocal.sum()) * scale,
        full_scan=sample.full_scan,
        seed=sample.seed,
        ci95=_intervals(pages, fpc, (mean_freed, mean_real, mean_log)),
        warnings=sample.warnings + _small_sample_warning(present, fpc),
    )


def _small_sample_warning(present: int, fpc: float) -> tuple[str, ...]:
    if fpc == 0.0:
        return ()
    if present == 0:
        return ("no sampled page was present: nothing to measure (sample more pages?)",)
    if present < 30:
        return (f"only {present} sampled pages were present: the intervals are rough",)
    return ()
