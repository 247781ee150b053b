"""Demo and test workloads the agent starts in its guest (protocol v2 ``workload.start``).

Runs inside the guest (stdlib only). :class:`WorkloadRunner` is the agent's side: it starts
``python3 -m memvisor.agent.workload KIND SIZE RATE PATTERN`` as a child process (so the
guest's OOM killer or a crash takes the workload, never the agent), reads the child's progress
lines without blocking and answers status. The child (:func:`main`) allocates anonymous memory
and touches it by kind:

- ``idle``: fills ``size`` bytes once, then never touches it (memory a guest holds but does
  not use: what reclamation should take); with data unique to this guest, or with ``PATTERN``'s
  content when it is not 0;
- ``grow``: fills ``rate`` bytes a second up to ``size`` and touches every allocated page once
  a second, timing each fill step and each pass (the slowdown when memory is reclaimed);
- ``shared-content``: fills ``size`` bytes with a pattern computed from ``PATTERN`` alone, so
  two guests given the same pattern hold identical pages KSM can merge; then reads a byte of
  each page every 10 s.

Progress lines: ``alloc BYTES SECONDS`` after each fill step, ``touch SECONDS`` after each pass.
"""

from __future__ import annotations

import mmap
import os
import secrets
import subprocess
import sys
import time

PAGE = 4096
STEP = 4 << 20  # bytes filled per step
KINDS = ("idle", "grow", "shared-content")
MAX_SIZE = 16 << 30
MAX_RATE = 1 << 30  # bytes/s
MAX_PATTERN = (1 << 32) - 1
MIN_GUEST_LEFT = 32 << 20  # the guest keeps at least this much MemAvailable
KEEP_TIMINGS = 64


def page_block(first_page: int, pages: int, tag: bytes) -> bytes:
    """``pages`` pages, each different: its index and ``tag`` repeated over the page."""
    return b"".join(((first_page + i).to_bytes(8, "little") + tag) * (PAGE // 16)
                    for i in range(pages))  # fmt: skip


def check_request(kind: str, size: int, rate: int, pattern: int, available: int) -> str | None:
    """Why the guest refuses a workload, or None. ``available`` is MemAvailable in bytes."""
    if kind not in KINDS:
        return f"kind {kind!r} is not one of {list(KINDS)}"
    if not 0 < size <= MAX_SIZE or size % PAGE:
        return f"size {size}: a multiple of {PAGE} in (0, {MAX_SIZE}]"
    if not 0 <= rate <= MAX_RATE or (kind == "grow") != (rate > 0):
        return f"rate {rate}: 1..{MAX_RATE} bytes/s for grow, 0 otherwise"
    if not 0 <= pattern <= MAX_PATTERN:
        return f"pattern {pattern}: 0..{MAX_PATTERN}"
    if size > available - MIN_GUEST_LEFT:
        return f"size {size} exceeds what the guest can spare ({available - MIN_GUEST_LEFT})"
    return None


class WorkloadRunner:
    """The one workload of this agent: a child process and what it last reported."""

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self.kind, self.size, self.allocated = "none", 0, 0
        self.fills: list[float] = []
        self.touches: list[float] = []
        self.error = ""
        self._buf = b""

    def start(self, kind: str, size: int, rate: int, pattern: int) -> None:
        self.stop()
        self.kind, self.size, self.allocated, self.error = kind, size, 0, ""
        self.fills, self.touches, self._buf = [], [], b""
        args = [self.python, "-m", "memvisor.agent.workload", kind, str(size), str(rate),
                str(pattern)]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            self.error = "stopped"

    def state(self) -> str:
        self.poll()
        if self.proc is None:
            return "none"
        code = self.proc.poll()
        if code is None:
            return "running"
        if self.error != "stopped" and not self.error:
            self.error = f"exited with code {code}"
        return "stopped" if self.error == "stopped" else "exited"

    def poll(self) -> None:
        """Read whatever progress the child wrote (never blocks)."""
        if self.proc is None or self.proc.stdout is None:
            return
        try:
            data = self.proc.stdout.read(65536)
        except (BlockingIOError, OSError, ValueError):
            return
        if not data:
            return
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            self._progress(line.split())

    def _progress(self, words: list[bytes]) -> None:
        try:
            if len(words) == 3 and words[0] == b"alloc":
                took, allocated = _seconds(words[2]), int(words[1])
                self.allocated = max(0, min(self.size, allocated))
                self.fills = [*self.fills, took][-KEEP_TIMINGS:]
            elif len(words) == 2 and words[0] == b"touch":
                self.touches = [*self.touches, _seconds(words[1])][-KEEP_TIMINGS:]
        except ValueError:
            return


def _seconds(word: bytes) -> float:
    x = float(word)
    if not 0.0 <= x <= 1e6:  # also refuses nan: the protocol would
        raise ValueError(word)
    return x


# --- the child process ------------------------------------------------------------------------


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _fill(buf: mmap.mmap, start: int, end: int, tag: bytes) -> None:
    for off in range(start, end, STEP):
        n = min(STEP, end - off)
        buf[off : off + n] = page_block(off // PAGE, n // PAGE, tag)


def run_child(kind: str, size: int, rate: int, pattern: int) -> None:
    buf = mmap.mmap(-1, size)
    # the same bytes in every guest given this pattern (shared-content, or any kind with a
    # non-zero pattern); else unique to this guest
    shared = kind == "shared-content" or pattern != 0
    tag = pattern.to_bytes(8, "little") if shared else secrets.token_bytes(8)
    if kind != "grow":
        t = time.monotonic()
        _fill(buf, 0, size, tag)
        _say(f"alloc {size} {time.monotonic() - t:.4f}")
        while True:
            time.sleep(10)
            if kind == "shared-content":
                sum(buf[off] for off in range(0, size, PAGE))
    done = 0
    while True:
        t = time.monotonic()
        if done < size:
            step = min(size - done, max(PAGE, rate // PAGE * PAGE))
            _fill(buf, done, done + step, tag)
            done += step
            _say(f"alloc {done} {time.monotonic() - t:.4f}")
        t = time.monotonic()
        for off in range(0, done, PAGE):
            buf[off] = (buf[off] + 1) & 0xFF
        _say(f"touch {time.monotonic() - t:.4f}")
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))


def main(argv: list[str]) -> int:
    kind, size, rate, pattern = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    problem = check_request(kind, size, rate, pattern, available=MAX_SIZE + MIN_GUEST_LEFT)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    run_child(kind, size, rate, pattern)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
