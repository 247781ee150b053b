"""The host file's [daemon] table: every key, its default, every kind of bad value (with its key
path), the policy settings checked against the policy registry, and `memvisor check`'s lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memvisor.config import load_host_file, parse_host_config
from memvisor.daemonconfig import (
    DaemonConfig,
    PolicyConfig,
    describe_daemon,
    duration_seconds,
    parse_duration,
)
from memvisor.errors import ConfigError, InputError
from memvisor.policy import POLICIES
from memvisor.units import MiB

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "host.toml"


def daemon(table: dict[str, Any], base: Path | None = None) -> DaemonConfig:
    return parse_host_config({"host": {"capacity": "1GiB"}, "daemon": table}, "t", base).daemon


def problems(table: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        daemon(table)
    assert err.value.exit_code == 2
    return dict(err.value.problems)


def test_defaults_without_a_daemon_table() -> None:
    d = parse_host_config({"host": {"capacity": "1GiB"}}, "t").daemon
    assert d == DaemonConfig()
    assert (d.interval, d.listen, d.on_stop) == (1.0, "127.0.0.1:8765", "shutdown")
    assert (d.keep_observations, d.keep_records) == (6 * 3600, 7 * 86400)
    assert (d.tls_cert, d.tls_key, d.token_file) == (None, None, None)
    assert d.policy == PolicyConfig("memvisor", {})


def test_every_key_read(tmp_path: Path) -> None:
    d = daemon(
        {
            "interval": 0.5,
            "listen": "0.0.0.0:9000",
            "on_stop": "leave",
            "keep_observations": "90m",
            "keep_records": 3600,
            "tls_cert": "tls/cert.pem",
            "tls_key": "/etc/memvisor/key.pem",
            "token_file": "~/token",
            "policy": {"name": "memvisor", "tax": 0.5, "swap_rate": "64MiB"},
        },
        base=tmp_path,
    )
    assert (d.interval, d.listen, d.on_stop) == (0.5, "0.0.0.0:9000", "leave")
    assert (d.keep_observations, d.keep_records) == (5400.0, 3600.0)
    assert d.tls_cert == tmp_path / "tls/cert.pem"  # relative to the host file's directory
    assert d.tls_key == Path("/etc/memvisor/key.pem")
    assert d.token_file == Path("~/token").expanduser()
    assert d.policy == PolicyConfig("memvisor", {"tax": 0.5, "swap_rate": 64 * MiB})


def test_relative_paths_are_relative_to_the_host_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "host.toml"
    path.parent.mkdir()
    path.write_text('[host]\ncapacity = "1GiB"\n[daemon]\ntoken_file = "api-token"\n')
    assert load_host_file(path).daemon.token_file == tmp_path / "etc" / "api-token"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("interval", 0.01, "between 0.05 and 3600"),
        ("interval", "1s", "between 0.05 and 3600"),
        ("interval", True, "between 0.05 and 3600"),
        ("listen", "8765", "HOST:PORT"),
        ("listen", "127.0.0.1:70000", "HOST:PORT"),
        ("listen", 8765, "HOST:PORT"),
        ("on_stop", "kill", '"shutdown" or "leave"'),
        ("on_stop", True, '"shutdown" or "leave"'),
        ("keep_observations", "6x", "expected a duration"),
        ("keep_observations", "", "expected a duration"),
        ("keep_observations", 0, "positive, finite"),
        ("keep_observations", "-1h", "positive, finite"),
        ("keep_records", "inf", "positive, finite"),
        ("keep_records", False, "expected a duration"),
        ("keep_records", [1], "expected a duration"),
        ("tls_cert", 1, "expected a file path"),
        ("tls_key", "", "expected a file path"),
        ("token_file", "  ", "expected a file path"),
        ("policy", "memvisor", "expected a table"),
    ],
)
def test_bad_values_are_reported_with_their_key_path(key: str, value: Any, message: str) -> None:
    table = {key: value}
    if key in ("tls_cert", "tls_key"):  # the other one is fine: only this value is wrong
        table["tls_key" if key == "tls_cert" else "tls_cert"] = "x.pem"
    found = problems(table)
    path = f"daemon.{key}"
    assert list(found) == [path], found
    assert message in found[path]


def test_every_problem_at_once_unknown_keys_and_tls_pairs() -> None:
    found = problems(
        {"interval": 0, "on_stop": "x", "tls_cert": "c.pem", "bogus": 1, "retention": "1d"}
    )
    assert set(found) == {
        "daemon.interval",
        "daemon.on_stop",
        "daemon.tls_key",
        "daemon.bogus",
        "daemon.retention",
    }
    assert "unknown key" in found["daemon.bogus"] and "keep_records" in found["daemon.bogus"]
    assert "give both or neither" in found["daemon.tls_key"]
    assert "daemon.tls_cert" in problems({"tls_key": "k.pem"})


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_registered_policy_is_accepted_and_builds(name: str) -> None:
    d = daemon({"policy": {"name": name}})
    assert d.policy == PolicyConfig(name, {})
    assert d.policy.build().name == name


def test_policy_name_is_checked_against_the_registry() -> None:
    found = problems({"policy": {"name": "ballooner"}})
    assert list(found) == ["daemon.policy.name"]
    assert "unknown policy 'ballooner'" in found["daemon.policy.name"]
    assert all(n in found["daemon.policy.name"] for n in POLICIES)
    assert "daemon.policy.name" in problems({"policy": {"name": 3}})


def test_policy_settings_and_groups_reach_the_policy() -> None:
    d = daemon(
        {
            "policy": {
                "tax": 0.25,  # name defaults to memvisor
                "free_target": 0.1,
                "dead_band": "8MiB",
                "thresholds": {"high": 0.1, "soft": 0.05},
                "balloon": {"gain": 1, "max_inflate_rate": "64MiB"},
            }
        }
    )
    p = d.policy.build()
    s = p.settings  # type: ignore[attr-defined]
    assert (s.tax, s.free_target, s.dead_band) == (0.25, 0.1, 8 * MiB)
    assert (s.thresholds.high, s.thresholds.soft, s.thresholds.hard) == (0.1, 0.05, 0.02)
    assert (s.balloon.gain, s.balloon.max_inflate_rate) == (1.0, 64 * MiB)
    mom = daemon({"policy": {"name": "mom", "history": 5, "pressure_threshold": 0.3}})
    assert mom.policy.build().settings.history == 5  # type: ignore[attr-defined]


def test_bad_policy_settings_each_reported_with_its_key_path() -> None:
    found = problems(
        {
            "policy": {
                "name": "memvisor",
                "tax": 1.0,  # refused by the policy itself
                "free_target": "lots",  # wrong type
                "swap_rate": "fast",  # not a size
                "dead_band": 1.5,  # not an integer
                "pools": [],  # the daemon's, not the file's
                "gain": 0.5,  # a balloon setting, not the scheduler's
                "thresholds": {"high": 0.03},  # high below soft: the group refuses it
                "balloon": {"gain": True, "speed": 1},
                "activity": 5,
            }
        }
    )
    p = "daemon.policy"
    assert set(found) == {
        f"{p}.tax",
        f"{p}.free_target",
        f"{p}.swap_rate",
        f"{p}.dead_band",
        f"{p}.pools",
        f"{p}.gain",
        f"{p}.thresholds",
        f"{p}.balloon.gain",
        f"{p}.balloon.speed",
        f"{p}.activity",
    }, found
    assert "idle memory tax" in found[f"{p}.tax"]
    assert "finite number" in found[f"{p}.free_target"]
    assert "not a size" in found[f"{p}.swap_rate"]
    assert "expected an integer" in found[f"{p}.dead_band"]
    assert "pool tree" in found[f"{p}.pools"]
    assert "unknown setting" in found[f"{p}.gain"] and "thresholds" in found[f"{p}.gain"]
    assert "high > soft" in found[f"{p}.thresholds"]
    assert "expected a table" in found[f"{p}.activity"]


def test_settings_of_a_policy_without_settings_and_cross_setting_checks() -> None:
    found = problems({"policy": {"name": "none", "tax": 0.5}})
    assert "has no settings" in found["daemon.policy.tax"]
    found = problems({"policy": {"name": "proxmox", "target_use": float("nan")}})
    assert "finite number" in found["daemon.policy.target_use"]
    found = problems({"policy": {"free_target": 1.5}})
    assert "free_target must be in [0, 1)" in found["daemon.policy.free_target"]


def test_durations() -> None:
    assert [duration_seconds(v) for v in ("90s", "15m", "6h", "7d", "2.5", 30)] == [
        90,
        900,
        21600,
        604800,
        2.5,
        30,
    ]
    with pytest.raises(InputError, match="--keep-records: expected a duration"):
        parse_duration("soon", "--keep-records")


def test_example_host_file_sets_the_daemon_and_check_prints_it() -> None:
    d = load_host_file(EXAMPLE).daemon
    assert (d.on_stop, d.keep_observations, d.keep_records) == ("shutdown", 6 * 3600, 7 * 86400)
    assert d.policy.name == "memvisor" and d.policy.settings["tax"] == 0.75
    assert d.policy.build().settings.thresholds.soft == 0.04  # type: ignore[attr-defined]
    text = describe_daemon(d)
    assert "policy memvisor (tax=0.75, thresholds.high=0.06" in text
    assert "on stop: shut the VMs down; keep observations 6h, records 7d" in text
    r = subprocess.run(
        [sys.executable, "-m", "memvisor", "check", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert text in r.stdout and "every power-on admitted" in r.stdout
