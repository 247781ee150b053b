"""``memvisor demo`` completes with a bounded duration and writes its report: on the simulator,
and with three real guests under TCG (e2e)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from daemon_run import free_port, memvisor, require_qemu_and_root


def summary(report: Path) -> dict[str, str]:
    text = report.read_text()
    rows = re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", text)
    assert text.count("data:image/png;base64,") == 4  # host, consumed, ballooned, swapped
    return dict(rows)


@pytest.mark.timeout(300)
def test_demo_on_the_simulator(tmp_path: Path) -> None:
    report = tmp_path / "demo.html"
    listen = f"127.0.0.1:{free_port()}"
    r = memvisor(tmp_path / "state", "demo", "--backend", "sim", "--duration", "15",
                 "--report", str(report), "--listen", listen, timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "dashboard: " in r.stdout and "#token=" in r.stdout.replace("\n", "")
    s = summary(report)
    assert s["VMs"].startswith("3, 1.1 GiB") and s["host budget"] == "576 MiB"
    assert "throughput" in s["grow"]  # the simulator's own measure of slowdown
    assert int(s["decisions"]) > 0, s  # overcommitted 2:1: memvisor has to reclaim


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_demo_with_three_real_guests(tmp_path: Path) -> None:
    require_qemu_and_root()
    report = tmp_path / "demo.html"
    r = memvisor(tmp_path / "state", "demo", "--duration", "40", "--report", str(report),
                 "--listen", f"127.0.0.1:{free_port()}", timeout=800)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    for vm in ("idle", "grow", "share"):  # through the agent's workload.start, not a shell
        assert f"workload started in {vm} through its agent" in r.stdout
    s = summary(report)
    assert s["host budget"] == "576 MiB"
    assert "filling 6 MiB" in s["grow: filling memory (guest)"]  # timings measured inside the guest
    assert int(s["decisions"]) > 0, s  # overcommitted 2:1: memvisor has to reclaim
    assert not list((tmp_path / "state" / "vms").glob("*/memory.img"))  # guests shut down
