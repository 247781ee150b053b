"""Count executions of guest code without stopping the VM: a TCG plugin (C5 fast path).

Every gdbstub breakpoint hit stops the whole VM (milliseconds under TCG). For registrations
that only need a count, QEMU's TCG plugin API (7.2 can watch instructions, not read registers)
does it at translation time instead: ``tcgcount.c`` adds an inline ``counter += 1`` before each
watched instruction, so the guest never stops and its memory never changes.

The plugin and the host share a small file (``mmap``): a magic, the number of watched
addresses, the addresses, and one 64-bit counter each. The VM must be started with the plugin
(:func:`qemu_args`); addresses are set at run time (after the KASLR slide is known) with
:meth:`CounterFile.watch`, which then makes QEMU drop its translated code (a breakpoint
inserted and removed through the gdbstub does that) so the next translation adds the counters.

The plugin is built from source with the host's C compiler, once per source version, into the
cache directory.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Protocol

from memvisor.errors import InputError, IntrospectionError

SOURCE = Path(__file__).with_name("tcgcount.c")
MAGIC = 0x746E756F63766D6D  # "mmvcount", little-endian
MAX_ADDRESSES = 64
_HEADER = struct.Struct("<QQQQ")  # magic, n, generation, instructions instrumented
_ADDR_OFF = _HEADER.size
_COUNT_OFF = _ADDR_OFF + 8 * MAX_ADDRESSES
FILE_SIZE = 4096


def build_plugin(cache_dir: Path) -> Path:
    """The compiled plugin (``cc -shared``), cached by the source's hash."""
    source = SOURCE.read_bytes()
    out = cache_dir / "tcgcount" / f"tcgcount-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if out.is_file():
        return out
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise IntrospectionError("the TCG counting plugin needs a C compiler (cc/gcc): none found")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    proc = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(SOURCE)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise IntrospectionError(f"building the TCG counting plugin failed: {proc.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


def qemu_args(plugin: Path, counters: Path) -> tuple[str, ...]:
    """QEMU arguments that load the plugin on ``counters`` (see :meth:`CounterFile.create`)."""
    return ("-plugin", f"{plugin},counters={counters}")


class BreakpointSetter(Protocol):
    def insert_breakpoint(self, addr: int, *, hardware: bool = False) -> None: ...

    def remove_breakpoint(self, addr: int, *, hardware: bool = False) -> None: ...


class CounterFile:
    """The host's side of the shared counter file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, FILE_SIZE)
        finally:
            os.close(fd)
        if _HEADER.unpack_from(self._map, 0)[0] != MAGIC:
            raise InputError(f"{path}: not a memvisor TCG counter file")

    @classmethod
    def create(cls, path: Path) -> CounterFile:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, _HEADER.pack(MAGIC, 0, 0, 0) + bytes(FILE_SIZE - _HEADER.size))
        finally:
            os.close(fd)
        return cls(path)

    def watch(self, addresses: list[int], flusher: BreakpointSetter) -> None:
        """Count ``addresses`` (guest-virtual) from now on; counters restart at 0."""
        if not 0 < len(addresses) <= MAX_ADDRESSES:
            raise InputError(f"{len(addresses)} addresses: count 1..{MAX_ADDRESSES} at a time")
        struct.pack_into("<Q", self._map, 8, 0)  # plugin ignores the table while it changes
        for i, addr in enumerate(addresses):
            struct.pack_into("<QQ", self._map, 0, MAGIC, 0)
            struct.pack_into("<Q", self._map, _ADDR_OFF + 8 * i, addr)
            struct.pack_into("<Q", self._map, _COUNT_OFF + 8 * i, 0)
        struct.pack_into("<Q", self._map, 8, len(addresses))
        # Code translated before now has no counters: a breakpoint change makes QEMU 7.2 flush
        # all translated code, so everything is translated again with them.
        flusher.insert_breakpoint(addresses[0])
        flusher.remove_breakpoint(addresses[0])

    def counts(self) -> list[int]:
        n = min(_HEADER.unpack_from(self._map, 0)[1], MAX_ADDRESSES)
        return [struct.unpack_from("<Q", self._map, _COUNT_OFF + 8 * i)[0] for i in range(n)]

    def instrumented(self) -> int:
        """How many translated instructions got a counter (0 means nothing was translated
        with the plugin: it did not load, or the address is never executed)."""
        return int(_HEADER.unpack_from(self._map, 0)[3])

    def close(self) -> None:
        self._map.close()
