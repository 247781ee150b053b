"""Introspection hits into the host's record (:class:`memvisor.store.Store`), where the daemon's
API (``/api/v1/hits``), its dashboard ("Introspection hits") and ``/metrics`` read them.

A hit is handled while the guest is stopped, and a store write is a durable SQLite
transaction (an fsync): doing it there would add milliseconds to every stop. So hits go into a
bounded queue and one writer thread records them; the guest is resumed without waiting. If
the writer falls behind by ``capacity`` hits, further hits are counted as dropped rather than
stalling the guest. :meth:`HitRecorder.close` waits for the queue to drain. The daemon may be
writing the same database at the same time: SQLite's WAL mode and the store's busy timeout
serialise the writers.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any

from memvisor.introspect.monitor import Hit
from memvisor.store import Store

DEFAULT_CAPACITY = 10_000
_STOP = None


def hit_detail(hit: Hit) -> dict[str, Any]:
    """What the store keeps beside vm, symbol, address and vcpu: short fields first (the
    dashboard prints the detail as JSON), all registers last."""
    detail: dict[str, Any] = {"location": hit.location, "instruction": hit.instruction}
    if hit.syscall_arguments is not None:
        detail["syscall_arguments"] = [f"{a:#x}" for a in hit.syscall_arguments]
    detail["arguments"] = [f"{a:#x}" for a in hit.arguments]
    detail["seq"] = hit.seq
    detail["time"] = hit.time
    detail["registers"] = {k: f"{v:#x}" for k, v in hit.registers.items()}
    return detail


class HitRecorder:
    """Records the hits it is called with into ``store`` as hits of ``vm``, off-thread."""

    def __init__(self, store: Store, vm: str, *, capacity: int = DEFAULT_CAPACITY) -> None:
        self.store = store
        self.vm = vm
        self.recorded = 0
        self.dropped = 0
        self.errors: list[str] = []
        self._queue: queue.Queue[Hit | None] = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._write, name="hit-recorder", daemon=True)
        self._thread.start()

    def __call__(self, hit: Hit) -> None:
        try:
            self._queue.put_nowait(hit)
        except queue.Full:
            self.dropped += 1

    def _write(self) -> None:
        try:
            while (hit := self._queue.get()) is not _STOP:
                try:
                    self.store.record_hit(
                        self.vm, hit.registration, hit.address, hit.vcpu, hit_detail(hit)
                    )
                    self.recorded += 1
                except Exception as exc:  # keep monitoring; report at the end
                    if len(self.errors) < 5:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.store.close()  # this thread's connection

    def close(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until every queued hit is recorded (at most ``timeout`` s); the counts."""
        # If the writer is stuck, what is still queued is reported as dropped.
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)
        self._thread.join(timeout)
        pending = self._queue.qsize() - (1 if self._thread.is_alive() else 0)
        stats: dict[str, Any] = {
            "recorded": self.recorded,
            "dropped": self.dropped + max(0, pending),
            "store": str(self.store.path),
        }
        if self.errors:
            stats["errors"] = self.errors
        return stats
