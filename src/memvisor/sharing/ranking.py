"""Which context to reclaim from first (C1): a pure function of sharing samples.

Reclaiming a page whose frame is shared c ways frees 1/c of a page, so a context's expected
yield per reclaimed page is the mean of 1/c = 1 / harmonic mean of the counts. The context
that frees the most per page goes first; equal values go to the larger context (more resident
memory to take from), then to the key's text so the order is total and reproducible.

The other statistics can be chosen for comparison: a lower count means more is freed, so
contexts are ordered by increasing geometric mean, arithmetic mean or median. Contexts with
nothing present (nothing to reclaim) or no value for the statistic come last.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from memvisor.errors import InputError
from memvisor.model import SharingSample

K = TypeVar("K", bound=Hashable)


class Statistic(enum.StrEnum):
    HARMONIC = "harmonic"
    GEOMETRIC = "geometric"
    ARITHMETIC = "arithmetic"
    MEDIAN = "median"


def parse_statistic(value: str) -> Statistic:
    try:
        return Statistic(value)
    except ValueError:
        choices = ", ".join(s.value for s in Statistic)
        raise InputError(f"stat: {value!r} is not a statistic (choose {choices})") from None


@dataclass(frozen=True, slots=True)
class RankEntry(Generic[K]):
    """One context's place in the reclamation order, with the reason a person needs."""

    key: K
    stat: Statistic
    value: float | None  # the statistic (None: undefined, nothing to reclaim)
    expected_freed_per_page: float
    resident_pages: float
    reason: str


def statistic_value(sample: SharingSample, stat: Statistic) -> float | None:
    """The chosen mean of the counts; None when it is undefined."""
    if stat is Statistic.HARMONIC:
        return sample.mean_harmonic if sample.present > 0 else None
    value = {
        Statistic.GEOMETRIC: sample.mean_geometric,
        Statistic.ARITHMETIC: sample.mean_arithmetic,
        Statistic.MEDIAN: sample.median,
    }[stat]
    if value is None or math.isnan(value):
        return None
    return value


def _resident(sample: SharingSample) -> float:
    # Producers that predate resident_pages leave it 0: fall back to the sampled present count.
    return sample.resident_pages if sample.resident_pages > 0 else float(sample.present)


def _sort_key(key: K, sample: SharingSample, stat: Statistic) -> tuple[int, float, float, str]:
    value = statistic_value(sample, stat)
    if sample.present == 0 or value is None:
        return (1, 0.0, -_resident(sample), str(key))
    # Harmonic: most freed per page first (= lowest harmonic mean, zero pages included).
    primary = -sample.expected_freed_per_page if stat is Statistic.HARMONIC else value
    return (0, primary, -_resident(sample), str(key))


def _reason(stat: Statistic, value: float | None, sample: SharingSample) -> str:
    if sample.present == 0:
        return "no sampled page is resident: nothing to reclaim"
    if value is None:
        return f"{stat.value} mean undefined (no page with a counted frame)"
    return (
        f"{stat.value} mean {value:.3g}: reclaiming frees "
        f"{sample.expected_freed_per_page:.3f} page per page, ~{_resident(sample):.0f} pages "
        f"resident, {sample.shared_fraction:.1%} shared"
    )


def rank_for_reclamation(
    samples: Mapping[K, SharingSample], stat: Statistic | str = Statistic.HARMONIC
) -> list[RankEntry[K]]:
    """Contexts in the order to reclaim from: first the one where a reclaimed page frees most."""
    chosen = parse_statistic(stat) if isinstance(stat, str) else stat
    ordered = sorted(samples.items(), key=lambda kv: _sort_key(kv[0], kv[1], chosen))
    return [
        RankEntry(
            key=key,
            stat=chosen,
            value=statistic_value(sample, chosen),
            expected_freed_per_page=sample.expected_freed_per_page,
            resident_pages=_resident(sample),
            reason=_reason(chosen, statistic_value(sample, chosen), sample),
        )
        for key, sample in ordered
    ]
