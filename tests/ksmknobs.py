"""The host's KSM knobs for tests: read them, or set some for a block and put them back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

KSM = Path("/sys/kernel/mm/ksm")
KNOBS = ("pages_to_scan", "sleep_millisecs", "smart_scan", "use_zero_pages", "run")  # run last


def read_knobs() -> dict[str, str]:
    """The knobs this kernel has, as text (a machine without KSM: none)."""
    out = {}
    for name in KNOBS:
        try:
            out[name] = (KSM / name).read_text().strip()
        except OSError:
            continue
    return out


@contextmanager
def ksm_knobs(**values: int) -> Iterator[None]:
    """Set the given knobs for the block (``run`` last, so KSM starts with the new rate) and put
    each back as found afterwards (``run`` first). A knob this kernel lacks (``smart_scan``
    before 6.7) is left out."""
    names = sorted((n for n in values if (KSM / n).exists()), key=lambda n: n == "run")
    saved = {n: (KSM / n).read_text().strip() for n in names}
    try:
        for name in names:
            (KSM / name).write_text(str(values[name]))
        yield
    finally:
        for name in reversed(names):
            (KSM / name).write_text(saved[name])
