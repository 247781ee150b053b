"""The host's swap disk: one device of bounded bandwidth that every page write and read uses.

Every page written to swap (host kernel reclaim, hypervisor swap-out toward a resident limit,
the guests' own paging) and every page read back (host swap-in, guest swap-in, page-cache
re-read) takes ``PAGE_SIZE / bandwidth`` seconds of the device. Work is queued in order:
``queue`` is the time, counted from the start of the current tick, at which the device will
have finished everything issued so far (work left over from earlier ticks included).

- A VM in *direct reclaim* (it needs a frame and the host has none free, or it is over its
  resident limit) waits until the pages it evicts are written: ``write`` returns that
  completion time and the caller charges the wait (Linux throttles direct reclaim on dirty
  pages under writeback until enough is written).
- Background writers (the hypervisor's own swap-out toward a limit) do not stall a VM, but
  they use the same bandwidth: they may only use what is left of this tick (``room``).
- Reads wait in the same queue. A reader first waits for the work left over from earlier
  ticks (``carried``; once per tick: its reads are sequential, so later ones find it drained),
  then each page costs its base latency plus the M/M/1 queueing delay of the device at the
  previous tick's utilization ``u``: ``page_time * u / (1 - u)``, with ``u`` capped at
  ``MAX_UTILIZATION``.
"""

from __future__ import annotations

from memvisor.units import PAGE_SIZE

MAX_UTILIZATION = 0.95  # a saturated device queues a read behind at most 19 pages


class SwapDisk:
    def __init__(self, bandwidth: float) -> None:
        self.bandwidth = float(bandwidth)  # bytes per second, reads and writes together
        self.page_time = PAGE_SIZE / self.bandwidth  # seconds of device time per page
        self.queue = 0.0  # completion time of all issued work, from the start of this tick
        self.utilization = 0.0  # fraction of the previous tick the device was busy
        self.carried = 0.0  # seconds of work left over from earlier ticks at this tick's start
        self.pages_written = 0  # totals over the run, for reports and tests
        self.pages_read = 0

    def write(self, pages: int) -> float:
        """Queue ``pages`` page writes; return when they will be done (seconds from the start
        of the tick)."""
        if pages > 0:
            self.queue += pages * self.page_time
            self.pages_written += pages
        return self.queue

    def read(self, pages: int, base_latency: float) -> float:
        """Queue ``pages`` page reads; return the stall they cost the reader per page in
        seconds (base latency plus queueing delay); the wait for ``carried`` work is the
        caller's, once per tick."""
        if pages <= 0:
            return 0.0
        self.queue += pages * self.page_time
        self.pages_read += pages
        u = min(self.utilization, MAX_UTILIZATION)
        return pages * (base_latency + self.page_time * u / (1.0 - u))

    def room(self, dt: float) -> int:
        """Pages a background writer may still write this tick without overrunning it."""
        return max(0, int((dt - self.queue) / self.page_time))

    def end_tick(self, dt: float) -> None:
        self.utilization = min(self.queue / dt, 1.0) if dt > 0 else 0.0
        self.queue = max(0.0, self.queue - dt)
        self.carried = self.queue

    def reset(self) -> None:
        """Forget queued work (after boot, which happens "long ago")."""
        self.queue = 0.0
        self.utilization = 0.0
        self.carried = 0.0
        self.pages_written = 0
        self.pages_read = 0
