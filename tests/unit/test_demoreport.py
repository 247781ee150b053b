"""The demo's report from a record filled by the control loop over the in-test host."""

from __future__ import annotations

import re
from pathlib import Path

from fakehost import FakeHost, StepBalloonPolicy

from memvisor.demoreport import slowdowns, write_report
from memvisor.loop import ControlLoop
from memvisor.store import Store
from memvisor.units import GiB


def test_report_has_summary_plots_and_decisions(tmp_path: Path) -> None:
    fake = FakeHost(total=2 * GiB)
    fake.add("a")
    fake.add("b")
    store = Store.open(tmp_path)
    loop = ControlLoop(fake, StepBalloonPolicy(), store, fake.clock)
    for _ in range(5):
        loop.tick()
    extra = {"slowdown": {"fills": [0.1, 0.1, 0.1, 0.3, 0.3], "touches": [0.2, 0.4]}}
    out = write_report(store, 0.0, tmp_path / "r.html", "fake", extra)
    text = out.read_text()
    rows = dict(re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", text))
    assert rows["VMs"] == "2, 2 GiB configured" and rows["host budget"] == "2 GiB"
    assert rows["lent back by balloons"] == "512 MiB at the end, 512 MiB peak"  # 4 x 64 x 2
    assert rows["decisions"] == "10"
    assert "x3.00" in rows["grow: filling memory (guest)"]  # filling got 3 times slower
    assert "300 ms over 2 passes" in rows["grow: touching memory (guest)"]
    assert text.count("data:image/png;base64,") == 4
    assert "test step" in text


def test_slowdown_from_simulated_throughput() -> None:
    series = {"v": [{"throughput": t} for t in (100.0, 100.0, 50.0, 50.0)]}
    ((name, text),) = slowdowns(series, {})
    assert name == "v" and "x2.00" in text
