"""E2E: VM lifecycle on real QEMU: a full disk refuses power-on leaving nothing, kill -9 of the
manager and re-attach, a QEMU crash is noticed and cleaned up, orphans are reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvisor.backends.qemu.host import QemuHost
from memvisor.backends.qemu.launcher import LaunchSpec, VMProcess, pid_alive
from memvisor.errors import AdmissionError
from memvisor.guestimage import build_image
from memvisor.model import Backing, PowerState, VMSpec
from memvisor.pools import PoolTree
from memvisor.units import MiB

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MANAGER = """
import sys, time
from pathlib import Path
from memvisor.backends.qemu.host import QemuHost
from memvisor.model import Backing, VMSpec
host = QemuHost(Path(sys.argv[1]), accel="tcg")
host.power_on(VMSpec("keep", 192 * 2**20, reservation=16 * 2**20, backing=Backing.FILE))
print("up", flush=True)
time.sleep(3600)
"""


@pytest.fixture
def small_disk(tmp_path: Path, qemu_as_root: None) -> Iterator[Path]:
    """A 64 MiB filesystem (tmpfs with a size limit) for the state directory."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_refuses_power_on_and_leaves_nothing(small_disk: Path) -> None:
    pools = PoolTree(capacity=4096 * MiB)
    host = QemuHost(small_disk / "state", pools=pools, image=build_image(), accel="tcg")
    spec = VMSpec("big", 256 * MiB, reservation=64 * MiB, backing=Backing.FILE)
    with pytest.raises(AdmissionError, match="power-on refused, nothing created"):
        host.power_on(spec)
    assert not (small_disk / "state" / "vms" / "big").exists()
    assert not list(Path("/sys/fs/cgroup/memory/memvisor").glob("big.*"))
    assert not pools.vm("big").powered_on and pools.unreserved("root") == 4096 * MiB
    assert os.statvfs(small_disk).f_bfree == os.statvfs(small_disk).f_blocks
    assert host.orphans() == []


def test_kill9_of_the_manager_then_reattach_and_crash_cleanup(
    tmp_path: Path, qemu_as_root: None
) -> None:
    state = tmp_path / "state"
    build_image()  # the manager subprocess finds it in the cache
    mgr = subprocess.Popen([sys.executable, "-c", MANAGER, str(state)], stdout=subprocess.PIPE,
                           text=True)  # fmt: skip
    qemu_pid = None
    try:
        assert mgr.stdout is not None and mgr.stdout.readline().strip() == "up"
        os.kill(mgr.pid, signal.SIGKILL)
        mgr.wait(10)
        host = QemuHost(state, accel="tcg")
        assert any("re-attached" in e for e in host.events), host.events
        vm = host.running("keep")
        qemu_pid = vm.process.pid
        obs = host.observe_vm("keep")
        assert obs.power is PowerState.ON and obs.consumed > 16 * MiB
        assert vm.process.qmp().cmd("query-status")["status"] == "running"
        assert host.orphans() == []
        # a QEMU with sockets in our state dir but no record, and a stale dir, are orphans
        paused = LaunchSpec("stray", 64 * MiB, Backing.ANON, extra_args=("-S",))  # CPU stopped
        stray = VMProcess.start(paused, state / "vms" / "stray", build_image())
        try:
            stale = state / "vms" / "ghost"
            stale.mkdir(parents=True)
            (stale / "memory.img").write_bytes(b"")
            found = {(o.kind, o.pid) for o in host.orphans()}
            assert found == {("process", stray.pid), ("files", None)}
            assert any(e.startswith("orphan process") for e in QemuHost(state).events)
        finally:
            stray.stop()
        # QEMU crashes: noticed, swap file removed, record says crashed
        os.kill(qemu_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(qemu_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert host.check_crashes() == ["keep"]
        assert not vm.process.paths.memory.exists()
        assert {r.spec.name: r.power for r in host.records()}["keep"] is PowerState.CRASHED
        again = QemuHost(state, accel="tcg")
        assert "keep" not in {n for n in again.events if "re-attached" in n}
    finally:
        if mgr.poll() is None:
            mgr.kill()
        if qemu_pid is not None and pid_alive(qemu_pid):
            os.kill(qemu_pid, signal.SIGKILL)


def memvisor(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memvisor", "--state", str(state), *args],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


def test_cli_power_on_goes_through_admission(tmp_path: Path, qemu_as_root: None) -> None:
    state = tmp_path / "state"
    build_image()
    assert memvisor(state, "host", "init", "--capacity", "512MiB").returncode == 0
    assert memvisor(state, "vm", "add", "web", "--memory", "448MiB",
                    "--reservation", "400MiB").returncode == 0  # fmt: skip
    assert memvisor(state, "vm", "add", "db", "--memory", "192MiB",
                    "--reservation", "160MiB").returncode == 0  # fmt: skip
    started = memvisor(state, "qemu", "start", "db", "--backing", "anon", "--accel", "tcg")
    assert started.returncode == 0, started.stderr  # 160 MiB of 512 MiB: admitted
    try:
        over = memvisor(state, "qemu", "start", "web", "--accel", "tcg")
        assert over.returncode == 3, over.stderr  # 400 + 160 > 512: refused by admission
        assert not (state / "vms" / "web" / "memory.img").exists()
        listing = json.loads(memvisor(state, "qemu", "list", "--json").stdout)
        (db,) = [v for v in listing["vms"] if v["record"]["spec"]["name"] == "db"]
        assert db["record"]["power"] == "on" and db["observation"]["consumed"] > 0
    finally:
        stop = memvisor(state, "qemu", "stop", "db")
    assert stop.returncode == 0, stop.stderr
    shown = json.loads(memvisor(state, "vm", "show", "db", "--json").stdout)
    assert shown["powered_on"] is False
