"""Share-aware reclamation metric (C1): how much host memory reclaiming a context's pages frees.

For sampled pages of a context (a process's mappings, or a VM's guest RAM inside its QEMU
process) the kernel tells whether the page is present, and how many mappings share its frame
(``/proc/kpagecount``; KSM makes VM pages shared). The expected memory freed per reclaimed page
is the mean of 1/count = 1 / harmonic mean of the counts; :func:`rank_for_reclamation` orders
contexts by it. The derivation is in docs/policy.md, "Sharing metric (C1)".

Typical use::

    stats = sample_guest_ram(qemu_pid, hva_start, ram_size, samples=10_000, seed=1)
    observation_sharing = stats.to_model()          # memvisor.model.SharingSample
    order = rank_for_reclamation({"vm1": s1, "vm2": s2})   # pure; takes samples, not PIDs
"""

from __future__ import annotations

from memvisor.sharing.metric import (
    ConfidenceIntervals,
    Interval,
    PageSample,
    SharingStats,
    compute_stats,
)
from memvisor.sharing.procfs import MapsEntry, parse_maps, select_mappings
from memvisor.sharing.ranking import (
    RankEntry,
    Statistic,
    parse_statistic,
    rank_for_reclamation,
    statistic_value,
)
from memvisor.sharing.sampler import (
    NEED_ROOT,
    Context,
    ContextGoneError,
    PageRange,
    check_pfns_visible,
    read_maps,
    sample_guest_ram,
    sample_guest_ranges,
    sample_process,
)

__all__ = [
    "NEED_ROOT",
    "ConfidenceIntervals",
    "Context",
    "ContextGoneError",
    "Interval",
    "MapsEntry",
    "PageRange",
    "PageSample",
    "RankEntry",
    "SharingStats",
    "Statistic",
    "check_pfns_visible",
    "compute_stats",
    "parse_maps",
    "parse_statistic",
    "rank_for_reclamation",
    "read_maps",
    "sample_guest_ram",
    "sample_guest_ranges",
    "sample_process",
    "select_mappings",
    "statistic_value",
]
