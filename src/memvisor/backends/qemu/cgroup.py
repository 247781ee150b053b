"""A memory cgroup per VM: hold off the host's reclaim below the reservation, enforce limits.

cgroup v2 (``memory`` in the unified hierarchy): ``memory.min`` = reservation (the kernel never
reclaims the group below it), ``memory.max`` = limit + QEMU's own overhead.

cgroup v1 (this project's CI machine): there is no ``memory.min``/``memory.low``. What v1
allows: ``memory.limit_in_bytes`` = limit + overhead (hard limit, same as v2's max) and
``memory.soft_limit_in_bytes`` = reservation (under global pressure the kernel reclaims first
from groups above their soft limit). The gap: v1 protects nothing absolutely; a host under
enough pressure can still reclaim a VM below its reservation. With no host swap, anonymous
guest RAM cannot be reclaimed at all, so the gap matters for file-backed VMs only, whose
reclaim writes to the VM's own swap file.

The group also measures what a VM really costs the host: ``memory.stat`` (v1 ``rss``,
``cache``, ``mapped_file``; v2 ``anon``, ``file``) counts guest RAM and QEMU together.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path

from memvisor.errors import BackendError, PermissionNeededError
from memvisor.units import MiB

QEMU_OVERHEAD = 384 * MiB  # QEMU's own memory under TCG (~110 MiB) + code buffer headroom
V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")
GROUP = "memvisor"


def detect() -> tuple[str, Path] | None:
    """("v1", root) or ("v2", root) of the memory controller, or None if there is none."""
    if (V1_ROOT / "memory.limit_in_bytes").exists():
        return "v1", V1_ROOT
    controllers = V2_ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return "v2", V2_ROOT
    return None


class MemoryCgroup:
    """The memory cgroup of one VM (``<root>/memvisor/<vm>.<scope>``)."""

    def __init__(self, version: str, path: Path) -> None:
        self.version = version
        self.path = path

    @classmethod
    def create(
        cls, vm: str, *, reservation: int, limit: int, scope: str = ""
    ) -> MemoryCgroup | None:
        """Create (or reuse) and configure the VM's group ``memvisor/<vm>[.<scope>]``; None if
        the host has no memory controller (the VM runs unconstrained: the probes still work).
        ``scope`` tells apart managers with different state directories on one host."""
        found = detect()
        if found is None:
            return None
        version, root = found
        group = cls(version, root / GROUP / (f"{vm}.{scope}" if scope else vm))
        try:
            if version == "v2":
                _enable_memory_controller(root)
            group.path.mkdir(parents=True, exist_ok=True)
            group.configure(reservation=reservation, limit=limit)
        except PermissionError as exc:
            raise PermissionNeededError(f"memory cgroup {group.path}: needs root: {exc}") from exc
        except OSError as exc:
            raise BackendError(f"memory cgroup {group.path}: {exc}") from exc
        return group

    @classmethod
    def existing(cls, version: str, path: Path) -> MemoryCgroup | None:
        return cls(version, path) if path.is_dir() else None

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def configure(self, *, reservation: int, limit: int) -> None:
        hard = limit + QEMU_OVERHEAD
        if self.version == "v2":
            (self.path / "memory.min").write_text(str(reservation))
            (self.path / "memory.max").write_text(str(hard))
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(hard))
            (self.path / "memory.soft_limit_in_bytes").write_text(str(reservation))

    def stat(self) -> dict[str, int]:
        out: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for line in (self.path / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if value.strip().isdigit():
                    out[key] = int(value)
        return out

    def usage(self) -> int:
        name = "memory.current" if self.version == "v2" else "memory.usage_in_bytes"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return 0

    def remove(self, timeout: float = 5.0) -> bool:
        """Remove the group once it is empty. A QEMU that just died may still be exiting (or
        be a zombie not yet reaped by its new parent): retry on EBUSY until ``timeout``.
        Returns False if the group is still busy (it is then left for the next clean-up)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.rmdir(self.path)
                return True
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    return False
                time.sleep(0.1)


def _enable_memory_controller(root: Path) -> None:
    (root / GROUP).mkdir(exist_ok=True)
    for parent in (root, root / GROUP):
        ctl = parent / "cgroup.subtree_control"
        if "memory" not in ctl.read_text().split():
            ctl.write_text("+memory")
