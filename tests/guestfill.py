"""Make a real guest touch its free memory, as any guest that has been running has: the
contract suite's ``fill`` and the e2e swap tests use it."""

from __future__ import annotations

from pathlib import Path

from memvisor.backends.qemu.launcher import GuestShell
from memvisor.units import MiB

FILL_MARGIN = 24 * MiB  # free guest memory left untouched by fill(), so the guest stays healthy

# Allocates and writes all of the guest's free memory but the margin, then exits (freeing it):
# the guest's free pages are then backed on the host, as on any guest that has been running.
# Every page differs (its offset in its first bytes), so KSM, if it runs, merges none of them.
FILL_PROGRAM = (
    "import re; t = open('/proc/meminfo').read(); "
    "free = int(re.search(r'MemFree: +(\\d+)', t).group(1)) * 1024; "
    f"n = max(0, free - {FILL_MARGIN}); b = bytearray(b'\\xa5') * n; "
    "exec('for i in range(0, n, 4096): b[i:i + 8] = i.to_bytes(8, \\'little\\')'); print(n)"
)


def fill_guest(shell: Path) -> None:
    """Run :data:`FILL_PROGRAM` in the guest whose shell socket is ``shell``."""
    with GuestShell(shell) as sh:
        sh.run(f'python3 -S -c "{FILL_PROGRAM}"', check=True, timeout=180)
