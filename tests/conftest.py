"""Session-wide safety net: the host's KSM knobs are put back the way the suite found them.

Several tests turn KSM on and fast (and restore it themselves); the daemon and the policies can
change it too. Whatever a test forgets or a crash skips, the session ends with the same
``run``, ``pages_to_scan``, ``sleep_millisecs``, ``smart_scan`` and ``use_zero_pages`` it
started with (a machine where they cannot be read or written is left alone). A SIGTERM (a
stopped CI job, ``kill``) is turned into an interrupt, so that this and every fixture's
teardown (QEMU guests powered off) still run; killed without it, a run that had KSM on left it
on, fast, for the next run on the machine.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from types import FrameType

import pytest

from ksmknobs import KNOBS, KSM, read_knobs


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session", autouse=True)
def restore_ksm() -> Iterator[None]:
    found = read_knobs()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
    now = read_knobs()
    changed = [n for n in KNOBS if n in found and now.get(n) != found[n]]
    for name in changed:
        try:
            (KSM / name).write_text(found[name])
        except OSError as exc:
            print(f"\nKSM: could not put {name} back to {found[name]}: {exc}")
    if changed:
        print("\nKSM: put back " + ", ".join(f"{n}={found[n]}" for n in changed))
