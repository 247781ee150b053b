"""Sizes and pages: parsing "512MiB"/"2G", formatting, checked conversions.

Sizes are plain ``int`` byte counts everywhere inside memvisor; strings exist only at the edges
(CLI, config files, display). Decimal suffixes (KB, MB, GB, TB) are powers of 1000; binary
suffixes (KiB, ... and the short forms K, M, G, T) are powers of 1024, because that is what
people mean when they write "2G" for a VM.
"""

from __future__ import annotations

import re

from memvisor.errors import InputError

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 * 1024 * 1024

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4

_SUFFIXES: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kib": KiB,
    "kb": 1000,
    "m": MiB,
    "mib": MiB,
    "mb": 1000**2,
    "g": GiB,
    "gib": GiB,
    "gb": 1000**3,
    "t": TiB,
    "tib": TiB,
    "tb": 1000**4,
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int, *, what: str = "size") -> int:
    """Parse a size into bytes. ``what`` names the field in error messages.

    Accepts an int (bytes) or a string such as ``"512MiB"``, ``"2G"``, ``"1.5GiB"``, ``"4096"``.
    The result must be a whole number of bytes and not negative.
    """
    if isinstance(value, bool):
        raise InputError(f"{what}: expected a size, got a boolean {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InputError(f"{what}: size must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise InputError(f"{what}: expected a size such as '512MiB', got {value!r}")
    m = _SIZE_RE.match(value)
    if not m:
        raise InputError(f"{what}: {value!r} is not a size (examples: 4096, 512MiB, 2G, 1.5GiB)")
    number, suffix = m.group(1), m.group(2).lower()
    if suffix not in _SUFFIXES:
        raise InputError(
            f"{what}: unknown unit {m.group(2)!r} in {value!r} (use B, KiB, MiB, GiB, TiB, "
            "K, M, G, T, KB, MB, GB, TB)"
        )
    mult: int = _SUFFIXES[suffix]
    if "." in number:
        whole, frac = number.split(".")
        scaled_num = int(whole + frac) * mult
        denom = int(10 ** len(frac))
        if scaled_num % denom:
            raise InputError(f"{what}: {value!r} is not a whole number of bytes")
        return scaled_num // denom
    return int(number) * mult


def format_size(n: int | float) -> str:
    """Format bytes for people: ``1536 MiB`` -> ``"1.5 GiB"``; exact values stay short."""
    neg = n < 0
    v = float(abs(n))
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if v >= size:
            q = v / size
            text = f"{q:.0f}" if q == int(q) else f"{q:.1f}"
            return f"{'-' if neg else ''}{text} {unit}"
    return f"{'-' if neg else ''}{int(v)} B"


def pages(nbytes: int) -> int:
    """Whole 4 KiB pages in ``nbytes``; refuses sizes that are not page multiples."""
    if nbytes % PAGE_SIZE:
        raise InputError(f"{nbytes} bytes is not a multiple of the page size ({PAGE_SIZE})")
    return nbytes // PAGE_SIZE


def pages_ceil(nbytes: int) -> int:
    """Pages needed to hold ``nbytes`` (rounded up)."""
    return -(-nbytes // PAGE_SIZE)
