"""The pool commands, run through memvisor.cli.main and as the installed `memvisor` program."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memvisor.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "host.toml"
MEMVISOR = Path(sys.executable).parent / "memvisor"
MiB = 2**20
GiB = 2**30


class Cli:
    def __init__(self, state: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.state = state
        self.capsys = capsys

    def run(self, *args: str) -> tuple[int, str, str]:
        try:
            rc = main(["--state", str(self.state), *args])
        except SystemExit as exc:  # argparse usage errors
            rc = int(exc.code or 0)
        out, err = self.capsys.readouterr()
        return rc, out, err

    def json(self, *args: str, rc: int = 0) -> Any:
        code, out, err = self.run(*args, "--json")
        assert code == rc, (args, out, err)
        return json.loads(out)


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path / "state", capsys)


def test_build_a_tree_and_admit(cli: Cli) -> None:
    assert cli.json("host", "init", "--capacity", "4GiB")["capacity"] == 4 * GiB
    cli.json("pool", "add", "prod", "--reservation", "1GiB", "--fixed", "--shares", "high")
    cli.json("pool", "add", "dev", "--reservation", "512MiB", "--limit", "2GiB")
    cli.json("pool", "add", "team", "--parent", "dev")
    cli.json("vm", "add", "web1", "--pool", "prod", "--memory", "2GiB", "--reservation", "768MiB")
    cli.json("vm", "add", "web2", "--pool", "prod", "--memory", "1GiB", "--reservation", "512MiB")
    cli.json("vm", "add", "t1", "--pool", "team", "--memory", "2GiB", "--reservation", "1GiB")
    on = cli.json("vm", "power-on", "web1")
    assert on["object"]["powered_on"] is True and on["operation"] == "power-on web1"
    before = cli.json("tree")
    refused = cli.json("vm", "power-on", "web2", rc=3)
    assert refused == {
        "error": "AdmissionError",
        "message": "power-on web2: pool prod (fixed) has 256 MiB unreserved, needs 512 MiB",
    }
    assert cli.json("tree") == before  # refused: nothing changed
    steps = cli.json("vm", "power-on", "t1")["steps"]
    assert [(s["pool"], s["passed_up"]) for s in steps] == [
        ("team", GiB),
        ("dev", 512 * MiB),
        ("root", 0),
    ]
    dev = cli.json("pool", "show", "dev")
    assert (dev["borrowed"], dev["unreserved"], dev["child_pools"]) == (512 * MiB, 0, ["team"])
    tree = cli.json("tree")
    assert tree["capacity"] == 4 * GiB
    assert {p["name"]: p["held"] for p in tree["pools"]}["root"] == 4 * GiB
    assert {v["name"]: v["held"] for v in tree["vms"]} == {"t1": GiB, "web1": 768 * MiB, "web2": 0}
    host = cli.json("host", "show")
    assert (host["reserved"], host["powered_on"], host["pools"]) == (2 * GiB, 2, 3)


def test_set_remove_show_and_text_output(cli: Cli) -> None:
    cli.run("host", "init", "--capacity", "2GiB")
    cli.run("pool", "add", "a", "--reservation", "1GiB")
    rc, out, _ = cli.run("vm", "add", "v", "--pool", "a", "--memory", "1GiB", "--shares", "700")
    assert rc == 0 and out == "add vm v: ok\n"
    assert cli.json("vm", "show", "v")["shares"] == 700
    rc, out, _ = cli.run("vm", "set", "v", "--reservation", "512MiB", "--limit", "768MiB")
    assert rc == 0 and "reservation 0 B -> 512 MiB" in out
    rc, out, _ = cli.run("vm", "power-on", "v")
    assert out == "power-on v: ok; a +512 MiB\n"
    rc, out, _ = cli.run("pool", "set", "a", "--reservation", "256MiB")
    assert rc == 0 and "root releases 512 MiB" in out
    assert cli.json("pool", "show", "a")["borrowed"] == 256 * MiB
    rc, _, err = cli.run("pool", "set", "a", "--fixed")
    assert rc == 3 and "would have reservation 256 MiB but its children hold 512 MiB" in err
    rc, out, _ = cli.run("tree")
    assert rc == 0 and "└─ v" in out.replace("├─ v", "└─ v") and "BORROWED" in out
    rc, out, _ = cli.run("pool", "show", "a")
    assert "children: pools -; VMs v" in out
    rc, _, err = cli.run("pool", "remove", "a")
    assert rc == 2 and "not empty" in err
    rc, _, err = cli.run("vm", "remove", "v")
    assert rc == 2 and "power it off first" in err
    assert cli.run("vm", "power-off", "v")[0] == 0
    assert cli.run("vm", "remove", "v")[0] == 0
    assert cli.run("pool", "remove", "a")[0] == 0
    assert cli.json("host", "show")["pools"] == 0


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["pool", "add", "x", "--reservation=-1G"], "--reservation: '-1G' is not a size"),
        (["pool", "add", "x", "--reservation", "3GiB", "--limit", "1GiB"], "more than its limit"),
        (["pool", "add", "x", "--shares", "lots"], "pool x shares"),
        (["pool", "add", "x", "--parent", "nowhere"], "no pool named 'nowhere'"),
        (["pool", "set", "root", "--reservation", "1G"], "pool root is the host"),
        (["pool", "set", "p"], "nothing to change"),
        (["pool", "set", "p", "--parent", "q"], "a cycle"),
        (["vm", "add", "v"], "--memory is required"),
        (["vm", "add", "p", "--memory", "1G"], "the name is taken by a pool"),
        (["vm", "add", "w", "--memory", "1G", "--reservation", "2G"], "more than its memory"),
        (["vm", "power-on", "ghost"], "no vm named 'ghost'"),
        (["vm", "show", "p"], "(it is a pool)"),
    ],
)
def test_bad_input_exits_2_and_changes_nothing(cli: Cli, args: list[str], text: str) -> None:
    cli.run("host", "init", "--capacity", "2GiB")
    cli.run("pool", "add", "p")
    cli.run("pool", "add", "q", "--parent", "p")
    before = cli.json("tree")
    rc, out, err = cli.run(*args)
    assert rc == 2 and text in err, (out, err)
    assert json.loads(cli.run(*args, "--json")[1])["message"] == err.removeprefix(
        "memvisor: error: "
    ).rstrip("\n")
    assert cli.json("tree") == before


def test_usage_errors_and_uninitialized_state(cli: Cli) -> None:
    rc, _, err = cli.run("tree")
    assert rc == 2 and "host init --capacity" in err
    assert not (cli.state / "pools.sqlite").exists()
    assert cli.run("pool", "add")[0] == 2  # argparse: NAME missing
    assert cli.run("vm", "power-on", "a", "--bogus")[0] == 2
    assert cli.run("host", "init")[0] == 2  # --capacity or --from required
    assert cli.run("host", "init", "--capacity", "1G")[0] == 0
    rc, _, err = cli.run("host", "init", "--capacity", "1G")
    assert rc == 2 and "--force" in err
    assert cli.run("host", "init", "--capacity", "2G", "--force")[0] == 0
    assert cli.json("host", "show")["capacity"] == 2 * GiB


def test_host_init_from_file(cli: Cli, tmp_path: Path) -> None:
    loaded = cli.json("host", "init", "--from", str(EXAMPLE))
    assert len(loaded["vms"]) == 7
    assert cli.json("pool", "show", "web")["borrowed"] == GiB
    too_big = tmp_path / "big.toml"
    too_big.write_text('[host]\ncapacity = "1GiB"\n[pools.p]\nreservation = "2GiB"\n')
    rc, _, err = cli.run("host", "init", "--from", str(too_big), "--force")
    assert rc == 3 and "pools.p.reservation" in err and "nothing stored" in err
    assert cli.json("host", "show")["capacity"] == 16 * GiB


def test_check_example_file(cli: Cli) -> None:
    rc, out, _ = cli.run("check", str(EXAMPLE))
    assert rc == 0
    assert "power-on web2: ok; web +1536 MiB (borrows 1 GiB from its parent)" in out
    assert "every power-on admitted" in out and "HEADROOM" in out
    data = cli.json("check", str(EXAMPLE))
    assert data["ok"] is True and data["refusals"] == []
    assert not cli.state.exists()  # check touches no state


def test_check_reports_every_problem(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[host]\ncapacity = "x"\n[vms.a]\nmemory = "1G"\nreservation = "2G"\nzz = 1\n')
    rc, _, err = cli.run("check", str(bad))
    assert rc == 2
    for path in ("host.capacity", "vms.a.reservation", "vms.a.zz"):
        assert f"  {path}: " in err
    data = cli.json("check", str(bad), rc=2)
    assert [p["path"] for p in data["problems"]] == [
        "host.capacity",
        "vms.a.zz",
        "vms.a.reservation",
    ]
    refused = tmp_path / "refused.toml"
    refused.write_text(
        '[host]\ncapacity = "1G"\n[vms.a]\nmemory = "2G"\nreservation = "2G"\npower_on = true\n'
    )
    rc, out, _ = cli.run("check", str(refused))
    assert rc == 3 and "REFUSED vms.a.power_on: power-on a: root (host" in out
    assert cli.json("check", str(refused), rc=3)["refusals"][0]["path"] == "vms.a.power_on"


def test_installed_program(tmp_path: Path) -> None:
    state = tmp_path / "state"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(MEMVISOR), "--state", str(state), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    assert run("host", "init", "--capacity", "1GiB").returncode == 0
    assert run("vm", "add", "a", "--memory", "1GiB", "--reservation", "768MiB").returncode == 0
    assert run("vm", "add", "b", "--memory", "1GiB", "--reservation", "512MiB").returncode == 0
    assert run("vm", "power-on", "a").returncode == 0
    refused = run("vm", "power-on", "b")
    assert refused.returncode == 3
    assert "root (host, capacity 1 GiB) has 256 MiB unreserved, needs 512 MiB" in refused.stderr
    assert run("vm", "add", "c").returncode == 2
    shown = json.loads(run("tree", "--json").stdout)
    assert [v["powered_on"] for v in shown["vms"]] == [True, False]
    check = subprocess.run([str(MEMVISOR), "check", str(EXAMPLE)], capture_output=True, text=True)
    assert check.returncode == 0 and "production" in check.stdout
