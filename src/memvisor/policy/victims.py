"""Which VM gives memory first: share-aware victim choice (C1).

Only VMs above their entitlement give. Among them, the VM where reclaiming frees the most host
memory per reclaimed page goes first: reclaiming a page whose host frame is shared c ways frees
1/c of a frame, so a VM's expected yield per page is the mean of 1/c over its sampled pages
(``SharingSample.expected_freed_per_page``, i.e. 1 / harmonic mean of the counts).

What stays freed is less: a reclaimed page that belongs to the VM's working set (probability
f, its active fraction) is faulted back at once and frees nothing for long. So victims are
ordered by the net yield y (1 - f): the expected host memory that stays freed per reclaimed
page. For VMs equally idle this is the sharing order; between a busy and an idle VM it prefers
the idle one, which is what the idle memory tax also says. Ties go to the VM with the lowest
shares-per-page ratio, then to the larger excess. Without a sample, the yield is estimated
from the VM's shared bytes, assuming a shared frame is shared two ways, and the decision says
so.

How much each gives (:func:`spread`): victims whose net yields are about the same give
together, down to a common level of excess, before the next, clearly worse, victims give.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from memvisor.model import VMObservation
from memvisor.sharing.ranking import rank_for_reclamation
from memvisor.units import PAGE_SIZE

MIN_YIELD = 0.01  # a VM whose pages free almost nothing still counts as freeing a little


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    excess: int  # bytes held above entitlement (> 0)
    freed_per_page: float  # expected host frames freed per reclaimed page, 0..1
    statistic: str  # how freed_per_page was obtained, for reasons
    ratio: float  # shares per MiB of taxed memory at the entitlement
    active: float = 0.0  # estimated active fraction, 0..1

    @property
    def net_yield(self) -> float:
        """Expected host memory that stays freed per reclaimed page: y (1 - f)."""
        return self.freed_per_page * (1.0 - min(max(self.active, 0.0), 1.0))

    def describe(self) -> str:
        return (
            f"net freed/page {self.net_yield:.2f} = expected freed/page "
            f"{self.freed_per_page:.2f} ({self.statistic}) x idle {1 - self.active:.0%}"
        )


def expected_yield(vm: VMObservation) -> tuple[float, str]:
    """(expected host memory freed per reclaimed page, the statistic that says so)."""
    s = vm.sharing
    if s is not None and s.present > 0:
        entry = rank_for_reclamation({vm.name: s})[0]  # C1's ranking names the statistic
        y = min(max(entry.expected_freed_per_page, 0.0), 1.0)
        value = "undefined" if entry.value is None else f"{entry.value:.2f}"
        return y, f"{entry.stat.value} mean {value} over {s.present} sampled pages"
    if vm.consumed > 0:
        shared = min(max(vm.shared, 0), vm.consumed) / vm.consumed
        return 1.0 - shared / 2, f"estimated from {shared:.0%} shared bytes, no sample"
    return 1.0, "no sample, nothing shared"


def order(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Highest net yield first; then lowest ratio; then largest excess; then name."""
    return sorted(candidates, key=lambda c: (-c.net_yield, c.ratio, -c.excess, c.name))


def spread(ordered: list[Candidate], need: int, band: float | None) -> dict[str, int]:
    """Bytes to reclaim from each victim (``ordered`` as :func:`order` gives them) so that
    ``need`` bytes of host memory are freed. Victims whose net yields lie within ``band`` of
    the first of their run are one group: a group gives together, each victim down to a
    common level of excess (water-filling: the VM holding the most above its entitlement gives
    first, and none is squeezed further than the others), before the next group gives
    anything. A clearly better yield still goes first (C1); among VMs that look the same to
    the policy, nobody is singled out by its name. ``band`` None: one VM at a time, in order."""
    out: dict[str, int] = {}
    left = need
    i = 0
    while i < len(ordered) and left > 0:
        j = i + 1
        if band is not None:
            while j < len(ordered) and abs(ordered[j].net_yield - ordered[i].net_yield) <= band:
                j += 1
        group = ordered[i:j]
        i = j
        level = _level(group, left)
        for c in group:
            take = min(_pages(c.excess - level), c.excess)
            if take > 0:
                out[c.name] = take
                left -= int(take * max(c.freed_per_page, MIN_YIELD))
    return out


def _level(group: list[Candidate], need: int) -> float:
    """The level of excess L at which ``group`` frees ``need`` bytes when each VM gives what
    it holds above L (sum of (excess - L) x yield over the VMs above L), or 0 if even all of
    it frees less. Exact: the VMs above L are the k largest, for the smallest k that works."""
    vms = sorted(group, key=lambda c: -c.excess)
    weighted = total_y = 0.0
    for k, c in enumerate(vms):
        y = max(c.freed_per_page, MIN_YIELD)
        weighted += c.excess * y
        total_y += y
        level = (weighted - need) / total_y  # where the k + 1 largest free exactly ``need``
        below = vms[k + 1].excess if k + 1 < len(vms) else 0
        if level >= below:
            return level
    return 0.0


def _pages(n: float) -> int:
    """``n`` bytes rounded up to whole pages (0 for n <= 0)."""
    return max(math.ceil(n / PAGE_SIZE), 0) * PAGE_SIZE
