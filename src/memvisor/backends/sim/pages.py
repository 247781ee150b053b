"""Host frames and guest-physical pages of every simulated VM, as flat numpy arrays.

All VMs' guest-physical pages live in one flat index space (VM ``v`` owns
``offsets[v]:offsets[v+1]``) so host-wide work (the sharing scanner, host reclaim, invariant
checks) is one vectorized operation. Each page has exactly one *host state*:

    UNTOUCHED  no frame (never touched, or handed back by the guest's balloon and re-freed)
    PRIVATE    backed by a frame of its own
    SHARED     mapped to a shared frame (content-based sharing, copy-on-write)
    SWAPPED    written to the VM's own swap file, no frame
    BALLOONED  held by the in-guest reservation program, backing released to the host

and one *guest use* (FREE, KERNEL, ANON, CACHE, RESERVED), which is what the guest OS thinks.

Content ids: ``content >= 0`` is a *shareable* content slot (0 is the zero page, others are
pages common to an image); ``content < 0`` is unique content (every write makes a new one).
Shared frames are counted by slot: ``refs[slot]`` is how many pages map it, and a slot with
``refs > 0`` occupies one frame. Unique content can never match, so it never needs a frame
table. Host frames used = PRIVATE pages + slots with refs > 0.

Every change of host state goes through :meth:`PageTable.set_state` so the per-VM counters and
the shared-frame counts stay exact; :meth:`PageTable.check` recomputes them from scratch.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

UNTOUCHED, PRIVATE, SHARED, SWAPPED, BALLOONED = 0, 1, 2, 3, 4
HOST_STATES = ("untouched", "private", "shared", "swapped", "ballooned")
G_FREE, G_KERNEL, G_ANON, G_CACHE, G_RESERVED = 0, 1, 2, 3, 4
GUEST_USES = ("free", "kernel", "anon", "cache", "reserved")
NEVER = -(2**30)  # last_access / last_write of a page never touched

IntArray = npt.NDArray[np.int64]


def uniq(a: IntArray) -> IntArray:
    """Sorted unique values (sort-based: numpy's default hash path is much slower here)."""
    if a.size <= 1:
        return a.copy()
    s = np.sort(a)
    keep = np.empty(s.size, dtype=np.bool_)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


class PageTable:
    """Page state of all VMs plus the host's frame accounting."""

    def __init__(self, vm_pages: list[int], capacity_frames: int, content_slots: int) -> None:
        self.offsets: IntArray = np.zeros(len(vm_pages) + 1, dtype=np.int64)
        self.offsets[1:] = np.cumsum(vm_pages)
        total = int(self.offsets[-1])
        self.capacity = capacity_frames
        self.state = np.zeros(total, dtype=np.uint8)
        self.use = np.zeros(total, dtype=np.uint8)
        self.content = np.zeros(total, dtype=np.int64)
        self.last_access = np.full(total, NEVER, dtype=np.int32)
        self.last_write = np.full(total, NEVER, dtype=np.int32)
        self.g2l = np.full(total, -1, dtype=np.int32)  # logical page of the workload, or -1
        self.counts = np.zeros((len(vm_pages), len(HOST_STATES)), dtype=np.int64)
        self.counts[:, UNTOUCHED] = vm_pages
        self.refs = np.zeros(content_slots, dtype=np.int64)
        self.shared_frames = 0
        self._next_unique = 1

    @property
    def total_pages(self) -> int:
        return int(self.offsets[-1])

    def frames_used(self) -> int:
        return int(self.counts[:, PRIVATE].sum()) + self.shared_frames

    def free_frames(self) -> int:
        return self.capacity - self.frames_used()

    def vm_of(self, idx: IntArray) -> IntArray:
        return np.searchsorted(self.offsets, idx, side="right") - 1

    def new_unique(self, n: int) -> IntArray:
        ids = -np.arange(self._next_unique, self._next_unique + n, dtype=np.int64)
        self._next_unique += n
        return ids

    # --- state changes ---------------------------------------------------------------------

    def frames_needed(self, idx: IntArray) -> int:
        """Frames that making ``idx`` PRIVATE may take (an upper bound: CoW of a last ref
        frees its shared frame again)."""
        return int(np.count_nonzero(self.state[idx] != PRIVATE))

    def set_state(self, idx: IntArray, new: int, vm: int | None = None) -> None:
        """Move pages ``idx`` (unique indices) to host state ``new`` (not SHARED: see
        :meth:`merge`). Pages leaving SHARED drop their reference to the shared frame."""
        if idx.size == 0:
            return
        old = self.state[idx]
        leaving_shared = idx[old == SHARED]
        if leaving_shared.size:
            self._release(self.content[leaving_shared])
        self._count(idx, old, -1, vm)
        self.state[idx] = new
        self._count_to(idx, new, vm)

    def merge(self, idx: IntArray) -> None:
        """Map PRIVATE pages ``idx`` (shareable content) to their content's shared frame."""
        if idx.size == 0:
            return
        slots, n = np.unique(self.content[idx], return_counts=True)
        self.shared_frames += int(np.count_nonzero(self.refs[slots] == 0))
        self.refs[slots] += n
        self._count(idx, self.state[idx], -1, None)
        self.state[idx] = SHARED
        self._count_to(idx, SHARED, None)

    def _release(self, slots_of_pages: IntArray) -> None:
        slots, n = np.unique(slots_of_pages, return_counts=True)
        self.refs[slots] -= n
        self.shared_frames -= int(np.count_nonzero(self.refs[slots] == 0))

    def _count(
        self, idx: IntArray, states: npt.NDArray[np.uint8], sign: int, vm: int | None
    ) -> None:
        k = len(HOST_STATES)
        if vm is not None:
            self.counts[vm] += sign * np.bincount(states, minlength=k)
            return
        flat = self.vm_of(idx) * k + states
        delta = np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)
        self.counts += sign * delta

    def _count_to(self, idx: IntArray, state: int, vm: int | None) -> None:
        if vm is not None:
            self.counts[vm, state] += idx.size
        else:
            self.counts[:, state] += np.bincount(self.vm_of(idx), minlength=len(self.counts))

    # --- checks ----------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Recompute every counter from the page arrays; return the violations found."""
        problems: list[str] = []
        if np.any(self.state >= len(HOST_STATES)):
            problems.append("a page has an invalid host state")
        for v in range(len(self.counts)):
            a, b = self.offsets[v], self.offsets[v + 1]
            real = np.bincount(self.state[a:b], minlength=len(HOST_STATES))[: len(HOST_STATES)]
            if not np.array_equal(real, self.counts[v]):
                problems.append(f"vm {v}: state counts {self.counts[v]} != pages {real}")
            if int(real.sum()) != b - a:
                problems.append(f"vm {v}: pages in states {int(real.sum())} != {b - a} pages")
        shared = self.state == SHARED
        real_refs = np.bincount(self.content[shared], minlength=self.refs.size)
        if not np.array_equal(real_refs, self.refs):
            problems.append("shared-frame reference counts differ from the shared pages")
        if int(np.count_nonzero(real_refs)) != self.shared_frames:
            problems.append(f"shared frames {self.shared_frames} != slots in use")
        used = int(np.count_nonzero(self.state == PRIVATE)) + int(np.count_nonzero(real_refs))
        if used > self.capacity:
            problems.append(f"frames used {used} > host frames {self.capacity}")
        reserved = self.use == G_RESERVED
        if np.any(reserved & (self.state != BALLOONED)):
            problems.append("a page held by the reservation program still has host backing")
        if np.any(~reserved & (self.state == BALLOONED)):
            problems.append("a ballooned page is not held by the reservation program")
        return problems
