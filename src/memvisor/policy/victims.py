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
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from memvisor.model import VMObservation
from memvisor.sharing.ranking import rank_for_reclamation

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


@dataclass(frozen=True, slots=True)
class Share:
    """A victim's part of a reclamation: bytes to reclaim and host bytes that should free."""

    candidate: Candidate
    reclaim: int
    expected_freed: int


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


def split(ordered: Iterable[Candidate], need: int) -> list[Share]:
    """Take ``need`` bytes of host memory from the victims in order: each gives up to its
    excess; a page of victim i frees ``freed_per_page`` of a page, so freeing b bytes costs it
    b / freed_per_page reclaimed bytes."""
    shares: list[Share] = []
    left = need
    for c in ordered:
        if left <= 0:
            break
        y = max(c.freed_per_page, MIN_YIELD)
        take = min(c.excess, math.ceil(left / y))
        if take <= 0:
            continue
        freed = int(take * y)
        shares.append(Share(c, take, freed))
        left -= freed
    return shares
