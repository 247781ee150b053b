"""`memvisor up` on the simulator takes its settings from the host file's [daemon] table: the
policy and its settings, on_stop, retention and the token file; command-line flags override."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import httpx
import pytest
from daemon_run import HOST_TOML, RunningDaemon, memvisor, write_host_file

from memvisor.poolstore import PoolStore
from memvisor.units import MiB

pytestmark = pytest.mark.timeout(300)

TOKEN = "a-known-token-from-the-operator-0123456789"
DAEMON_TABLE = """
[daemon]
interval = 0.05                  # fast ticks: retention pruning runs every 60 ticks
on_stop = "leave"
keep_observations = "2s"
keep_records = "1h"
token_file = "secret/api-token"  # relative to the host file

[daemon.policy]
name = "memvisor"
tax = 0.5

[daemon.policy.thresholds]
high = 0.1
soft = 0.07
"""


def observation_rows(state: Path) -> tuple[int, float, float]:
    """(rows, oldest wall, newest wall) of the per-tick host time series."""
    with sqlite3.connect(state / "memvisor.db") as db:
        n, oldest, newest = db.execute(
            "SELECT COUNT(*), MIN(wall), MAX(wall) FROM ticks"
        ).fetchone()
    return int(n), float(oldest), float(newest)


def first_event_wall(state: Path) -> float:
    with sqlite3.connect(state / "memvisor.db") as db:
        return float(db.execute("SELECT MIN(wall) FROM events").fetchone()[0])


def test_up_takes_policy_on_stop_retention_and_token_from_the_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    host = write_host_file(tmp_path, text=HOST_TOML.format(capacity="2560MiB") + DAEMON_TABLE)
    (tmp_path / "secret").mkdir()
    token_file = tmp_path / "secret" / "api-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)

    with RunningDaemon(state, host) as d:
        d.wait_ready()
        assert d.token == TOKEN and not (state / "api-token").exists()
        info = d.get("/api/v1/info").json()
        assert info["policy"] == "memvisor" and info["policy_settings"]["tax"] == 0.5
        assert info["on_stop"] == "leave" and info["interval"] == 0.05
        assert info["retention"] == {"observations": 2.0, "records": 3600.0}
        total = d.get("/api/v1/host").json()["total"]
        assert info["thresholds"]["high"] == int(total * 0.1)
        assert info["thresholds"]["soft"] == int(total * 0.07)
        assert info["thresholds"]["hard"] == int(total * 0.02)  # not in the file: default
        assert d.get("/api/v1/vms").status_code == 200
        wrong = {"Authorization": "Bearer " + "x" * 32}
        assert httpx.get(d.url + "/api/v1/vms", headers=wrong, timeout=30).status_code == 401
        r = memvisor(state, "vm", "set-reservation", "web2", "128MiB")  # the CLI finds the token
        assert r.returncode == 0, r.stderr
        d.wait_ticks(130, timeout=240)  # at least two prunes
        rows, oldest, newest = observation_rows(state)
        assert d.stop(signal.SIGTERM) == 0
    ticks = json.loads(memvisor(state, "status", "--json").stdout)["counters"]["ticks"]
    # observations older than 2 s went at each prune; records (1 h) kept: the first events of
    # the run are older than the oldest observation left
    assert rows < ticks, (rows, ticks)
    assert first_event_wall(state) < oldest <= newest
    kinds = [json.loads(x)["kind"] for x in memvisor(state, "events", "--json").stdout.splitlines()]
    assert kinds[-1] == "daemon.stopped"
    assert d.daemon_file()["vms"] == "left running"  # on_stop = "leave" from the file
    with PoolStore.in_state_dir(state).read() as t:
        assert t.vm("web1").powered_on and t.vm("web2").reservation == 128 * MiB

    # flags override the file: shutdown on stop, another policy (with its defaults), retention
    extra = ("--on-stop", "shutdown", "--policy", "mom", "--keep-observations", "1h")
    with RunningDaemon(state, host, *extra) as d2:
        d2.wait_ready()
        info = d2.get("/api/v1/info").json()
        assert (info["policy"], info["policy_settings"], info["on_stop"]) == ("mom", {}, "shutdown")
        assert info["retention"] == {"observations": 3600.0, "records": 3600.0}
        assert d2.token == TOKEN
        assert d2.stop(signal.SIGTERM) == 0
    assert d2.daemon_file()["vms"] == "shut down"
    with PoolStore.in_state_dir(state).read() as t:
        assert not t.vm("web1").powered_on  # reservations released
    assert oct(os.stat(token_file).st_mode & 0o777) == "0o600"


def test_bad_daemon_table_starts_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    bad = '\n[daemon]\non_stop = "reboot"\n[daemon.policy]\nname = "magic"\n'
    host = write_host_file(tmp_path, text=HOST_TOML.format(capacity="2560MiB") + bad)
    r = memvisor(state, "up", str(host), "--backend", "sim")
    assert r.returncode == 2, r.stderr
    assert "daemon.on_stop" in r.stderr and "daemon.policy.name" in r.stderr
    assert not (state / "daemon.json").exists()


def test_token_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    host = write_host_file(
        tmp_path, text=HOST_TOML.format(capacity="2560MiB") + '[daemon]\ntoken_file = "tok"\n'
    )
    (tmp_path / "tok").write_text(TOKEN)
    (tmp_path / "tok").chmod(0o644)
    r = memvisor(state, "up", str(host), "--backend", "sim", "--duration", "5")
    assert r.returncode == 2 and "chmod 600" in r.stderr, r.stderr
