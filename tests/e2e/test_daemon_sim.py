"""The real daemon (``memvisor up --backend sim``) as an operator runs it: API, CLI, metrics,
live reservation changes through admission control, SIGTERM, kill -9 and restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_run import RunningDaemon, memvisor, write_host_file

from memvisor.poolstore import PoolStore
from memvisor.units import GiB, MiB

pytestmark = pytest.mark.timeout(300)


def test_up_serves_api_status_metrics_and_stops_on_sigterm(tmp_path: Path) -> None:
    state, host = tmp_path / "state", write_host_file(tmp_path)
    with RunningDaemon(state, host) as d:
        d.wait_ready()
        vms = {v["vm"]: v for v in d.get("/api/v1/vms").json()}
        assert set(vms) == {"web1", "web2", "batch"}  # spare is not power_on
        assert vms["web1"]["reservation"] == 256 * MiB and vms["web1"]["pool"] == "prod"
        assert all(v["consumed"] > 0 and v["entitlement"] for v in vms.values())
        host_row = d.get("/api/v1/host").json()
        assert host_row["total"] == 2560 * MiB and host_row["state"] in (
            "high",
            "soft",
            "hard",
            "low",
        )
        tree = d.get("/api/v1/pools").json()
        prod = next(c for c in tree["children"] if c["name"] == "prod")
        assert {c["name"] for c in prod["children"]} == {"web1", "web2"}
        metrics = d.get("/metrics").text
        assert 'memvisor_vm_consumed_bytes{vm="batch"}' in metrics
        assert "memvisor_host_free_bytes" in metrics
        assert d.get("/api/v1/decisions").status_code == 200
        status = json.loads(memvisor(state, "status", "--json").stdout)
        assert status["daemon"]["running"] is True and status["daemon"]["pid"] == d.proc.pid
        assert {v["vm"] for v in status["vms"]} == set(vms)
        assert d.stop(signal.SIGTERM) == 0
    assert d.daemon_file()["state"] == "stopped"
    kinds = [
        json.loads(line)["kind"] for line in memvisor(state, "events", "--json").stdout.splitlines()
    ]
    assert kinds[-1] == "daemon.stopped" and "daemon.started" in kinds
    status = json.loads(memvisor(state, "status", "--json").stdout)
    assert status["daemon"]["running"] is False
    with PoolStore.in_state_dir(state).read() as t:
        assert not t.vm("web1").powered_on  # shut down: reservations released


def test_set_reservation_live_through_admission(tmp_path: Path) -> None:
    state, host = tmp_path / "state", write_host_file(tmp_path, capacity="2GiB")
    with RunningDaemon(state, host) as d:
        d.wait_ready()
        r = memvisor(state, "vm", "set-reservation", "web2", "512MiB", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["reservation"] == 512 * MiB
        assert memvisor(state, "vm", "set-reservation", "batch", "1GiB").returncode == 0
        d.wait_ticks(2)
        vms = {v["vm"]: v for v in d.get("/api/v1/vms").json()}
        assert vms["web2"]["reservation"] == 512 * MiB and vms["batch"]["reservation"] == GiB
        # the root now gives out all 2 GiB (prod 1 GiB, batch 1 GiB): prod cannot borrow more
        r = memvisor(state, "vm", "set-reservation", "web2", "1GiB")
        assert r.returncode == 3 and "web2" in r.stderr, r.stderr
        r2 = d.put("/api/v1/vms/web2/reservation", {"reservation": "1GiB"})
        assert r2.status_code == 409 and r2.json()["error"] == "AdmissionError"
        with PoolStore.in_state_dir(state).read() as t:
            assert t.vm("web2").reservation == 512 * MiB  # refused: unchanged
        assert memvisor(state, "vm", "set-reservation", "nope", "1MiB").returncode == 2
        assert memvisor(state, "vm", "set-reservation", "web1", "lots").returncode == 2
        r = memvisor(state, "vm", "set-reservation", "web1", "2GiB")
        assert r.returncode == 2 and "more than its memory" in r.stderr
        events = memvisor(state, "events", "--vm", "web2").stdout
        assert "reservation 0 B -> 512 MiB" in events
        follower = subprocess.Popen(
            [sys.executable, "-m", "memvisor", "--state", str(state), "events", "--follow",
             "--json", "--limit", "0"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(5)  # the follower starts and skips what is already recorded
        assert memvisor(state, "vm", "set-reservation", "web1", "128MiB").returncode == 0
        assert follower.stdout is not None
        followed = json.loads(follower.stdout.readline())  # the new event, as it happened
        assert followed["kind"] == "vm.reservation" and followed["vm"] == "web1"
        follower.terminate()
        follower.wait(10)
        assert d.stop() == 0
    r = memvisor(state, "vm", "set-reservation", "web2", "1MiB")
    assert r.returncode == 5 and "no memvisor daemon is running" in r.stderr


def test_kill_9_then_up_again_recovers_with_live_reservations(tmp_path: Path) -> None:
    state, host = tmp_path / "state", write_host_file(tmp_path)
    with RunningDaemon(state, host) as d:
        d.wait_ready()
        assert d.put("/api/v1/vms/web2/reservation", {"reservation": GiB // 2}).status_code == 200
        ticks_before = d.ticks()
        assert d.stop(signal.SIGKILL) == -9
    assert d.daemon_file()["state"] == "running"  # it had no chance to say otherwise
    with RunningDaemon(state, host) as d2:
        d2.wait_ready()
        d2.wait_ticks(2)
        vms = {v["vm"]: v for v in d2.get("/api/v1/vms").json()}
        assert vms["web2"]["reservation"] == GiB // 2  # kept across the crash
        assert d2.ticks() >= ticks_before + 2  # the record goes on from where it was
        kinds = [e["kind"] for e in d2.get("/api/v1/events?limit=1000").json()]
        assert "daemon.recovered" in kinds
        assert d2.stop() == 0


def test_one_daemon_per_state_dir(tmp_path: Path) -> None:
    state, host = tmp_path / "state", write_host_file(tmp_path)
    with RunningDaemon(state, host) as d:
        d.wait_ready(ticks=1)
        r = memvisor(state, "up", str(host), "--backend", "sim", "--listen", "127.0.0.1:1")
        assert r.returncode == 2 and f"pid {d.proc.pid}" in r.stderr
        assert d.stop() == 0


def test_admission_refusal_starts_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    host = write_host_file(tmp_path, capacity="512MiB")  # pool prod alone reserves 1 GiB
    r = memvisor(state, "up", str(host), "--backend", "sim")
    assert r.returncode == 3 and "admission refused, nothing started" in r.stderr, r.stderr
    assert "pools.prod.reservation" in r.stderr
    assert not (state / "daemon.json").exists()


def test_non_loopback_listen_needs_tls(tmp_path: Path) -> None:
    state, host = tmp_path / "state", write_host_file(tmp_path)
    r = memvisor(state, "up", str(host), "--backend", "sim", "--listen", "0.0.0.0:8999")
    assert r.returncode == 2 and "without TLS" in r.stderr
