"""The real daemon with two real guests under TCG: reservation change through the API,
``status --json`` checked against the host's own view measured here independently (page-cache
residency of the file backing, KSM counters, file sizes, QEMU pids), ``kill -9`` of the daemon
and ``memvisor up`` again re-attaching to the same QEMU processes with their balloons intact.

One daemon run per module (booting costs ~10 s of a core per guest)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_run import RunningDaemon, memvisor, require_qemu_and_root

from memvisor.backends.qemu.launcher import QMP, VMPaths, pid_runs_vm
from memvisor.backends.qemu.vmrecord import load_all, vm_dir
from memvisor.poolstore import PoolStore
from memvisor.units import MiB

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

HOST = """\
[host]
capacity = "1GiB"

[vms.fvm]
memory = "256MiB"
reservation = "64MiB"
backing = "file"
power_on = true

[vms.avm]
memory = "256MiB"
backing = "anon"
power_on = true
"""


def resident_bytes(path: Path) -> int:
    """Page-cache residency of a file, by util-linux fincore (mincore(2))."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return int(out.split()[0])


def ksm_counter(name: str) -> int:
    return int(Path(f"/sys/kernel/mm/ksm/{name}").read_text())


def pids(state: Path) -> dict[str, int]:
    return {r.spec.name: r.pid for r in load_all(state) if r.pid is not None}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    require_qemu_and_root()
    d = tmp_path_factory.mktemp("daemon-qemu")
    (d / "host.toml").write_text(HOST)
    state = d / "state"
    yield state, d / "host.toml"
    for name, pid in pids(state).items():  # never leave a guest behind
        if pid_runs_vm(pid, VMPaths(vm_dir(state, name))):
            os.kill(pid, signal.SIGKILL)


def start(state: Path, host: Path) -> RunningDaemon:
    # policy "none": this test checks the daemon, not the scheduler; nothing moves balloons
    return RunningDaemon(state, host, "--accel", "tcg", "--policy", "none", backend="qemu")


def test_up_reservation_consistency_kill9_reattach(setup: tuple[Path, Path]) -> None:
    state, host = setup
    with start(state, host) as d:
        d.wait_ready(timeout=400, ticks=3)
        first_pids = pids(state)
        assert set(first_pids) == {"fvm", "avm"}
        vms = {v["vm"]: v for v in d.get("/api/v1/vms").json()}
        assert {n: v["power"] for n, v in vms.items()} == {"fvm": "on", "avm": "on"}

        r = d.put("/api/v1/vms/fvm/reservation", {"reservation": "128MiB"})
        assert r.status_code == 200, r.text
        assert d.put("/api/v1/vms/avm/reservation", {"reservation": "2GiB"}).status_code == 422
        d.wait_ticks(2)
        check_status_against_host(state, reservation=128 * MiB)

        # a balloon set behind the daemon's back, through QEMU's second QMP socket
        aux = QMP(VMPaths(vm_dir(state, "avm")).qmp_aux)
        aux.cmd("balloon", value=192 * MiB)
        aux.close()
        assert d.stop(signal.SIGKILL) == -9
    assert pids(state) == first_pids
    assert all(pid_runs_vm(p, VMPaths(vm_dir(state, n))) for n, p in first_pids.items())

    with start(state, host) as d2:
        d2.wait_ready(timeout=300)
        d2.wait_ticks(2)
        assert pids(state) == first_pids  # the same QEMU processes: re-attached, not rebooted
        events = [e["message"] for e in d2.get("/api/v1/events?limit=1000").json()]
        assert any("re-attached" in m for m in events), events
        vms = {v["vm"]: v for v in d2.get("/api/v1/vms").json()}
        assert vms["fvm"]["reservation"] == 128 * MiB  # the live change survived
        assert abs(vms["avm"]["ballooned"] - 64 * MiB) <= 4 * MiB, vms["avm"]
        check_status_against_host(state, reservation=128 * MiB)
        assert d2.stop(signal.SIGTERM) == 0
    assert not any(pid_runs_vm(p, VMPaths(vm_dir(state, n))) for n, p in first_pids.items())
    assert not (vm_dir(state, "fvm") / "memory.img").exists()  # swap file removed at power-off
    with PoolStore.in_state_dir(state).read() as tree:
        assert not tree.vm("fvm").powered_on


def check_status_against_host(state: Path, reservation: int) -> None:
    ksm_before = ksm_counter("pages_sharing")
    r = memvisor(state, "status", "--json")
    assert r.returncode == 0, r.stderr
    status: dict[str, Any] = json.loads(r.stdout)
    ksm_after = ksm_counter("pages_sharing")
    vms = {v["vm"]: v for v in status["vms"]}
    assert status["daemon"]["running"] is True
    assert vms["fvm"]["reservation"] == reservation
    memory_file = VMPaths(vm_dir(state, "fvm")).memory
    assert memory_file.stat().st_size == 256 * MiB == vms["fvm"]["memory"]
    resident = resident_bytes(memory_file)
    tolerance = max(16 * MiB, resident // 10)  # the guest is idle; a tick passes in between
    assert abs(vms["fvm"]["consumed"] - resident) <= tolerance, (vms["fvm"], resident)
    host = status["host"]
    low, high = sorted((ksm_before, ksm_after))
    slack = max(2048, high // 10)  # ksmd may scan between the daemon's tick and our reads
    assert low - slack <= host["ksm_pages_sharing"] <= high + slack, (host, low, high)
    qemu_rss = {
        n: int(Path(f"/proc/{p}/status").read_text().split("VmRSS:")[1].split()[0]) * 1024
        for n, p in pids(state).items()
    }
    assert 0 < vms["avm"]["consumed"] <= qemu_rss["avm"] + 16 * MiB  # guest RAM within QEMU
