"""Host files: parsing into frozen dataclasses, every problem with its key path, dry-run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from memvisor.config import (
    DaemonConfig,
    HostConfig,
    dry_run,
    load_host_file,
    parse_host_config,
)
from memvisor.daemonconfig import PolicyConfig
from memvisor.errors import ConfigError
from memvisor.model import Backing

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "host.toml"
MiB = 2**20
GiB = 2**30


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "host.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as err:
        load_host_file(write(tmp_path, text))
    assert err.value.exit_code == 2
    return dict(err.value.problems)


def test_example_host_file_parses_and_admits() -> None:
    cfg = load_host_file(EXAMPLE)
    assert cfg.capacity == 16 * GiB
    assert [p.name for p in cfg.pools] == ["production", "web", "development", "team-a", "batch"]
    web = {p.name: p for p in cfg.pools}["web"]
    assert (web.parent, web.reservation, web.expandable) == ("production", 2 * GiB, True)
    ci1 = {v.name: v for v in cfg.vms}["ci1"]
    assert (ci1.backing, ci1.vcpus, ci1.power_on) == (Backing.ANON, 1, True)
    assert cfg.daemon == DaemonConfig(
        interval=1.0,
        listen="127.0.0.1:8765",
        policy=PolicyConfig(
            "memvisor",
            {"tax": 0.75, "thresholds": {"high": 0.06, "soft": 0.04, "hard": 0.02, "low": 0.01}},
        ),
    )  # every other [daemon] key: tests/unit/test_config_daemon.py
    result = dry_run(cfg)
    assert result.refusals == ()
    assert result.tree.borrowed("web") == GiB
    assert result.tree.unreserved("root") == 5 * GiB + 512 * MiB
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.capacity = 1  # type: ignore[misc]


def test_defaults_and_vmspec() -> None:
    cfg = parse_host_config({"host": {"capacity": 4096 * MiB}, "vms": {"a": {"memory": "1G"}}}, "t")
    (vm,) = cfg.vms
    assert (vm.pool, vm.reservation, vm.limit, vm.shares, vm.power_on) == (
        "root",
        0,
        None,
        "normal",
        False,
    )
    spec = vm.spec()
    assert (spec.shares, spec.effective_limit, spec.backing, spec.vcpus) == (
        10240,
        GiB,
        Backing.FILE,
        1,
    )
    assert isinstance(cfg, HostConfig) and cfg.pools == ()


def test_every_problem_is_reported_with_its_key_path(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        colour = 1
        [host]
        capacity = "4GiBB"
        size = 3
        [pools.a]
        parent = "b"
        reservation = "2G"
        limit = "1G"
        shares = "huge"
        [pools.b]
        parent = "a"
        expandable = "yes"
        [pools.c]
        parent = "nope"
        [pools.root]
        [vms.web1]
        pool = "a"
        memory = "1G"
        reservation = "2G"
        limit = "3G"
        backing = "disk"
        vcpus = 0
        power_on = 1
        colour = "red"
        [vms.a]
        memory = 1000
        [vms.nomem]
        [vms."bad name"]
        memory = "1G"
        [vms.v2]
        memory = "1G"
        pool = "missing"
        shares = -3
        [daemon]
        interval = -1
        listen = "nowhere"
        port = 3
        """,
    )
    expected = {
        "colour": "unknown key",
        "host.size": "unknown key",
        "host.capacity": "unknown unit 'GiBB'",
        "pools.a.reservation": "2 GiB is more than the limit 1 GiB",
        "pools.a.shares": "expected low, normal, high or an integer",
        "pools.b.expandable": "expected true or false, got 'yes'",
        "pools.c.parent": "no pool named 'nope'",
        "pools.root": "root is the host itself",
        "pools.a.parent": "cycle: a -> b -> a",
        "vms.web1.colour": "unknown key",
        "vms.web1.reservation": "2 GiB is more than the memory 1 GiB",
        "vms.web1.limit": "3 GiB is more than the memory 1 GiB",
        "vms.web1.backing": 'expected "file" or "anon"',
        "vms.web1.vcpus": "expected an integer 1..64, got 0",
        "vms.web1.power_on": "expected true or false, got 1",
        "vms.a.memory": "whole number of MiB",
        "vms.a": "name 'a' is also a pool",
        "vms.nomem.memory": "required",
        "vms.bad name": "vm name 'bad name'",
        "vms.v2.pool": "no pool named 'missing'",
        "vms.v2.shares": "got -3",
        "daemon.interval": "between 0.05 and 3600",
        "daemon.listen": "HOST:PORT",
        "daemon.port": "unknown key",
    }
    for path, text in expected.items():
        assert path in found, f"{path} not reported; got {sorted(found)}"
        assert text in found[path], (path, found[path])
    assert len(found) == len(expected), sorted(set(found) - set(expected))


def test_missing_host_table_and_bad_toml(tmp_path: Path) -> None:
    assert "host" in problems(tmp_path, "[pools.a]\n")
    bad = problems(tmp_path, "[host\ncapacity = 1")
    assert "not valid TOML" in bad[""]
    with pytest.raises(ConfigError, match="cannot read"):
        load_host_file(tmp_path / "absent.toml")


def test_wrong_table_shapes(tmp_path: Path) -> None:
    found = problems(tmp_path, 'host = 3\npools = "x"\n[vms.a]\nmemory = "1G"\n[daemon.x]\n')
    assert "expected a table" in found["host"]
    assert "expected a table of [pools.NAME]" in found["pools"]
    assert "unknown key" in found["daemon.x"]


def test_limit_unlimited_and_integers(tmp_path: Path) -> None:
    cfg = load_host_file(
        write(
            tmp_path,
            """
            [host]
            capacity = 1073741824
            [pools.p]
            limit = "unlimited"
            shares = 5000
            [vms.v]
            pool = "p"
            memory = "512MiB"
            limit = "unlimited"
            reservation = 268435456
            shares = "HIGH"
            """,
        )
    )
    assert cfg.pools[0].limit is None and cfg.pools[0].shares == 5000
    assert cfg.vms[0].limit is None and cfg.vms[0].shares == "high"


def test_dry_run_collects_every_refusal(tmp_path: Path) -> None:
    cfg = load_host_file(
        write(
            tmp_path,
            """
            [host]
            capacity = "4GiB"
            [pools.big]
            reservation = "8GiB"
            [pools.under-big]
            parent = "big"
            [pools.fixed]
            reservation = "1GiB"
            expandable = false
            [vms.a]
            pool = "fixed"
            memory = "1GiB"
            reservation = "768MiB"
            power_on = true
            [vms.b]
            pool = "fixed"
            memory = "1GiB"
            reservation = "512MiB"
            power_on = true
            [vms.c]
            pool = "under-big"
            memory = "1GiB"
            power_on = true
            """,
        )
    )
    result = dry_run(cfg)
    refusals = dict(result.refusals)
    assert "root (host, capacity 4 GiB) has 4 GiB unreserved" in refusals["pools.big.reservation"]
    assert "pool big was refused" in refusals["pools.under-big.parent"]
    assert refusals["vms.b.power_on"] == (
        "power-on b: pool fixed (fixed) has 256 MiB unreserved, needs 512 MiB"
    )
    assert "pool under-big was refused" in refusals["vms.c.pool"]
    assert result.tree.vm("a").powered_on and not result.tree.vm("b").powered_on
    assert result.tree.verify() == []
