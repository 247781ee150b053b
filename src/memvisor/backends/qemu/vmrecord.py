"""What the manager records about each VM in the state directory, and finding orphans.

``<state>/vms/<name>/vm.json`` holds the spec, the power state, QEMU's pid, the accelerator,
the image and the memory cgroup. It is written atomically (temp file + rename) before and after
every lifecycle step, so a manager killed at any point can re-attach to running VMs (their
pid and sockets are in the record) and clean up after the ones that died.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from memvisor.backends.qemu.launcher import VMPaths, pid_alive
from memvisor.errors import BackendError
from memvisor.model import Backing, PowerState, VMSpec

RECORD = "vm.json"


@dataclass(frozen=True, slots=True)
class VMRecord:
    spec: VMSpec
    power: PowerState
    pid: int | None = None
    accel: str = "tcg"
    kernel: str = ""
    initrd: str = ""
    cgroup_version: str | None = None
    cgroup_path: str | None = None
    started: float | None = None  # wall-clock time of power-on
    message: str = ""
    reclaim_target: int = 0  # bytes the agent (or balloon fallback) is asked to hold
    swap_limit: int | None = None  # standing SetSwapTarget resident limit (file backing)

    def with_(self, **changes: Any) -> VMRecord:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"]["backing"] = self.spec.backing.value
        data["power"] = self.power.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VMRecord:
        spec = dict(data["spec"])
        spec["backing"] = Backing(spec["backing"])
        fields = dict(data)
        fields["spec"] = VMSpec(**spec)
        fields["power"] = PowerState(data["power"])
        return cls(**fields)


def vm_dir(state_dir: Path, name: str) -> Path:
    return state_dir / "vms" / name


def save(state_dir: Path, record: VMRecord) -> None:
    path = vm_dir(state_dir, record.spec.name) / RECORD
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=1))
    os.replace(tmp, path)


def load_all(state_dir: Path) -> list[VMRecord]:
    out: list[VMRecord] = []
    root = state_dir / "vms"
    if not root.is_dir():
        return out
    for path in sorted(root.glob(f"*/{RECORD}")):
        try:
            out.append(VMRecord.from_json(json.loads(path.read_text())))
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"{path}: unreadable VM record ({exc}); move it aside") from exc
    return out


@dataclass(frozen=True, slots=True)
class Orphan:
    """Something of memvisor's on the host that no VM record accounts for."""

    kind: str  # "process": a QEMU with our sockets, unknown; "files": leftovers, no process
    path: str
    pid: int | None
    detail: str


def find_orphans(state_dir: Path, known_pids: set[int]) -> list[Orphan]:
    """QEMU processes whose sockets live under ``state_dir`` but that no record owns, and VM
    directories holding a swap file or sockets with no live QEMU."""
    vms_root = str((state_dir / "vms").resolve())
    orphans: list[Orphan] = []
    live_dirs: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"qemu-system-x86_64"):
            continue
        pid = int(proc.name)
        for arg in argv:
            text = arg.decode(errors="replace")
            if "qmp.sock" in text and vms_root in text:
                path = text.split("path=", 1)[-1].split(",", 1)[0]
                live_dirs.add(str(Path(path).parent))
                if pid not in known_pids and pid_alive(pid):
                    orphans.append(Orphan("process", path, pid, "QEMU not in any VM record"))
    for d in sorted((state_dir / "vms").glob("*")) if (state_dir / "vms").is_dir() else []:
        paths = VMPaths(d)
        leftovers = [p.name for p in (paths.memory, paths.qmp, paths.gdb) if p.exists()]
        if leftovers and str(d.resolve()) not in live_dirs:
            orphans.append(Orphan("files", str(d), None, f"no QEMU but {', '.join(leftovers)}"))
    return orphans
