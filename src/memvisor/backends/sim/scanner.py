"""Content-based page sharing: a KSM-like scanner over all VMs' guest RAM.

Each tick it visits the next ``pages_to_scan * 1000 / sleep_millisecs * dt`` pages (round
robin over the flat page space, like ksmd walking mergeable areas). A visited page is a merge
candidate if it is PRIVATE, its VM allows merging, it was not written for ``stable_ticks``
(KSM only merges pages whose checksum did not change between two visits) and its content is
shareable (zero or common to an image; unique content can never match). A candidate merges
with an existing shared frame of the same content (KSM's stable tree); otherwise with another
candidate of the same content seen this tick or earlier (KSM's unstable tree, ``cand``),
checked lazily because that page may have changed since.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from memvisor.backends.sim.pages import PRIVATE, PageTable, uniq

IntArray = npt.NDArray[np.int64]


class Scanner:
    def __init__(self, pt: PageTable, mergeable_vms: npt.NDArray[np.bool_]) -> None:
        self.pt = pt
        self.mergeable = mergeable_vms
        self.cand: IntArray = np.full(pt.refs.size, -1, dtype=np.int64)
        self.cursor = 0
        self.full_scans = 0
        self.carry = 0.0

    def pages_this_tick(self, pages_to_scan: int, sleep_ms: int, dt: float) -> int:
        wanted = pages_to_scan * 1000.0 / max(1, sleep_ms) * dt + self.carry
        n = int(wanted)
        self.carry = wanted - n
        return min(n, self.pt.total_pages)

    def scan(self, n: int, tick: int, stable_ticks: int) -> int:
        """Visit ``n`` pages; return how many were merged."""
        total = self.pt.total_pages
        if n <= 0 or total == 0:
            return 0
        end = self.cursor + n
        idx = np.arange(self.cursor, end, dtype=np.int64)
        if end >= total:
            idx %= total
            self.full_scans += end // total
        self.cursor = end % total
        return self._merge(self._candidates(idx, tick, stable_ticks))

    def _candidates(self, idx: IntArray, tick: int, stable_ticks: int) -> IntArray:
        pt = self.pt
        ok = (pt.state[idx] == PRIVATE) & (pt.content[idx] >= 0)
        ok &= pt.last_write[idx] <= tick - stable_ticks
        idx = idx[ok]
        if not self.mergeable.all():
            idx = idx[self.mergeable[pt.vm_of(idx)]]
        return idx

    def _merge(self, idx: IntArray) -> int:
        pt = self.pt
        if idx.size == 0:
            return 0
        content = pt.content[idx]
        stable = pt.refs[content] > 0
        merged = [idx[stable]]
        idx, content = idx[~stable], content[~stable]
        partner = self.cand[content]
        valid = partner >= 0
        valid[valid] = (
            (pt.state[partner[valid]] == PRIVATE)
            & (pt.content[partner[valid]] == content[valid])
            & (partner[valid] != idx[valid])
        )
        _, inverse, counts = np.unique(content, return_inverse=True, return_counts=True)
        paired = (counts[inverse] >= 2) | valid
        merged.append(idx[paired])
        merged.append(partner[valid & paired])
        single = ~paired
        self.cand[content[single]] = idx[single]
        todo = uniq(np.concatenate(merged))
        pt.merge(todo)
        return int(todo.size)
