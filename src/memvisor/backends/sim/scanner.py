"""Content-based page sharing: a KSM-like scanner over all VMs' guest RAM.

Rates: the host scans at most ``pages_to_scan * 1000 / sleep_millisecs`` pages per second
(KSM's knobs). That budget is divided among the VMs that allow merging in proportion to their
size, and a VM with its own ``scan_rate`` (pages per second, like a per-VM page-sharing scan
rate) is scanned at most that fast. Each VM is walked round robin from its own cursor.

A visited page is a merge candidate if it is PRIVATE, it was not written for
``stable_ticks`` (KSM only merges pages whose checksum did not change between two visits) and
its content is shareable (zero or common to an image; unique content can never match). A
candidate merges with an existing shared frame of the same content (KSM's stable tree);
otherwise with another candidate of the same content seen this tick or earlier (KSM's unstable
tree, ``cand``), checked lazily because that page may have changed since.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from memvisor.backends.sim.pages import PRIVATE, PageTable, uniq

IntArray = npt.NDArray[np.int64]


class Scanner:
    def __init__(
        self, pt: PageTable, mergeable: npt.NDArray[np.bool_], vm_rates: list[float | None]
    ) -> None:
        self.pt = pt
        sizes = np.diff(pt.offsets).astype(np.float64)
        self.weights = np.where(mergeable, sizes, 0.0)
        self.caps = np.array([np.inf if r is None else r for r in vm_rates], dtype=np.float64)
        self.cand: IntArray = np.full(pt.refs.size, -1, dtype=np.int64)
        self.cursors = np.zeros(len(vm_rates), dtype=np.int64)  # per VM, within the VM
        self.carry = np.zeros(len(vm_rates), dtype=np.float64)
        self.scanned = 0
        self.full_scans = 0

    def pages_this_tick(self, pages_to_scan: int, sleep_ms: int, dt: float) -> IntArray:
        """Pages to visit per VM this tick: the host budget by size, capped per VM."""
        budget = pages_to_scan * 1000.0 / max(1, sleep_ms) * dt
        total = self.weights.sum()
        share = budget * self.weights / total if total > 0 else np.zeros_like(self.weights)
        wanted = np.minimum(share, self.caps * dt) + self.carry
        n = np.floor(wanted)
        self.carry = wanted - n
        sizes = np.diff(self.pt.offsets)
        pages: IntArray = np.minimum(n.astype(np.int64), sizes)
        return pages

    def scan(self, per_vm: IntArray, tick: int, stable_ticks: int) -> int:
        """Visit ``per_vm[v]`` pages of each VM; return how many pages were merged."""
        parts = []
        sizes = np.diff(self.pt.offsets)
        for v in np.flatnonzero(per_vm > 0):
            n, size = int(per_vm[v]), int(sizes[v])
            local = (self.cursors[v] + np.arange(n, dtype=np.int64)) % size
            self.cursors[v] = (self.cursors[v] + n) % size
            parts.append(local + self.pt.offsets[v])
        if not parts:
            return 0
        idx = np.concatenate(parts)
        mergeable_pages = int(sizes[self.weights > 0].sum())
        self.scanned += idx.size
        if mergeable_pages:
            self.full_scans = self.scanned // mergeable_pages
        return self._merge(self._candidates(idx, tick, stable_ticks))

    def _candidates(self, idx: IntArray, tick: int, stable_ticks: int) -> IntArray:
        pt = self.pt
        ok = (pt.state[idx] == PRIVATE) & (pt.content[idx] >= 0)
        ok &= pt.last_write[idx] <= tick - stable_ticks
        found: IntArray = idx[ok]
        return found

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
