"""``memvisor sim``: the table, the JSON series and the HTML report of a real (short) run."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from memvisor.cli import main

EXAMPLE = Path(__file__).parents[2] / "examples" / "scenarios" / "idle-tax.toml"


@pytest.mark.timeout(180)
def test_sim_writes_json_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "o.json", tmp_path / "r.html"
    rc = main(
        [
            "sim",
            str(EXAMPLE),
            "--duration",
            "20",
            "--seed",
            "3",
            "--json",
            str(out),
            "--report",
            str(report),
            "--check",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "idle" in printed and "busy" in printed and "saved by sharing" in printed
    data = json.loads(out.read_text())
    assert data["seed"] == 3 and len(data["time"]) == 20
    busy = data["vms"]["busy"]
    for key in (
        "consumed",
        "shared",
        "swapped",
        "ballooned",
        "guest_swapped",
        "active",
        "entitlement",
        "throughput",
    ):
        assert len(busy[key]) == 20, key
    assert set(data["host"]["state"]) <= {"high", "soft", "hard", "low"}
    assert len(data["host"]["free"]) == 20
    html = report.read_text()
    assert html.count("data:image/png;base64,") >= 5
    first = html.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n"


def test_sim_json_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", str(EXAMPLE), "--duration", "3", "--policy", "none", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["policy"] == "none" and data["summary"]["decisions"] == 0


def test_sim_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[host]\nmemory = "1GiB"\n[vms.a]\nmemroy = "1GiB"\n')
    assert main(["sim", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "vms.a.memroy" in err and "vms.a.memory" in err
    assert main(["sim", str(EXAMPLE), "--duration", "-1"]) == 2
