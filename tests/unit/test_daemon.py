"""Daemon pieces that need no process: listen addresses, admission of a host file, the pool
tree as the API serves it, the lock and the restart bookkeeping."""

from __future__ import annotations

from pathlib import Path

import pytest

from memvisor.config import parse_host_config
from memvisor.daemon import (
    Daemon,
    DaemonOptions,
    _take_lock,
    admit,
    load_token_file,
    pool_tree_json,
    read_daemon_file,
    read_token_file,
    split_listen,
)
from memvisor.daemonconfig import PolicyConfig
from memvisor.errors import AdmissionError, InputError
from memvisor.store import Retention
from memvisor.units import GiB, MiB

HOST = {
    "host": {"capacity": "2GiB"},
    "pools": {"prod": {"reservation": "1GiB", "expandable": False}},
    "vms": {
        "a": {"pool": "prod", "memory": "1GiB", "reservation": "512MiB", "power_on": True},
        "b": {"memory": "512MiB", "power_on": False},
    },
}


def test_split_listen() -> None:
    assert split_listen("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert split_listen("[::1]:9000") == ("::1", 9000)
    for bad in ("8765", "host:", "host:99999", ":80"):
        with pytest.raises(InputError, match="HOST:PORT"):
            split_listen(bad)


def test_admit_and_the_tree_as_json() -> None:
    tree = admit(parse_host_config(HOST, "host.toml"))
    root = pool_tree_json(tree, "root")
    assert root["reservation"] == 2 * GiB and root["reserved"] == GiB
    (prod,) = [c for c in root["children"] if c["name"] == "prod"]
    assert prod["expandable"] is False and prod["unreserved"] == 512 * MiB
    assert prod["children"] == [
        {"name": "a", "kind": "vm", "memory": GiB, "reservation": 512 * MiB, "limit": GiB,
         "shares": 10240, "power": "on"}
    ]  # fmt: skip
    assert {"name": "b", "kind": "vm", "power": "off"}.items() <= root["children"][-1].items()


def test_admission_refusal_names_every_problem() -> None:
    c = {"pool": "prod", "memory": "1GiB", "reservation": "768MiB", "power_on": True}
    bad = {**HOST, "vms": {**HOST["vms"], "c": c}}  # type: ignore[dict-item]
    with pytest.raises(AdmissionError, match="nothing started") as exc:
        admit(parse_host_config(bad, "host.toml"))
    assert "vms.c.power_on" in str(exc.value)


def test_one_lock_per_state_dir(tmp_path: Path) -> None:
    (tmp_path / "daemon.json").write_text('{"pid": 4242, "state": "running"}')
    held = _take_lock(tmp_path)
    try:
        with pytest.raises(InputError, match=r"already running on .* \(pid 4242\)"):
            _take_lock(tmp_path)
    finally:
        held.close()
    _take_lock(tmp_path).close()  # released with the file
    assert read_daemon_file(tmp_path) == {"pid": 4242, "state": "running"}
    (tmp_path / "daemon.json").write_text("{not json")
    assert read_daemon_file(tmp_path) is None


def _daemon(tmp_path: Path, options: DaemonOptions) -> Daemon:
    host = tmp_path / "host.toml"
    host.write_text(
        '[host]\ncapacity = "1GiB"\n[daemon]\ninterval = 2.0\non_stop = "leave"\n'
        'keep_observations = "1h"\nkeep_records = "2d"\ntls_cert = "c.pem"\ntls_key = "k.pem"\n'
        'token_file = "tok"\n[daemon.policy]\nname = "memvisor"\ntax = 0.5\n'
    )
    return Daemon(host, tmp_path / "state", options)


def test_settings_come_from_the_host_file(tmp_path: Path) -> None:
    d = _daemon(tmp_path, DaemonOptions(backend="sim"))
    assert (d.interval, d.on_stop, d.listen) == (2.0, "leave", ("127.0.0.1", 8765))
    assert d.retention == Retention(observations=3600.0, records=2 * 86400.0)
    assert (d.tls_cert, d.tls_key, d.token_file) == (
        tmp_path / "c.pem",
        tmp_path / "k.pem",
        tmp_path / "tok",
    )
    assert d.policy_config == PolicyConfig("memvisor", {"tax": 0.5})


def test_flags_override_the_host_file(tmp_path: Path) -> None:
    flags = DaemonOptions(
        backend="sim", interval=0.5, listen="127.0.0.1:9999", on_stop="shutdown",
        keep_records=60.0, tls_cert=Path("/x/cert.pem"), token_file=Path("/x/tok"),
    )  # fmt: skip
    d = _daemon(tmp_path, flags)
    assert (d.interval, d.on_stop, d.listen) == (0.5, "shutdown", ("127.0.0.1", 9999))
    assert d.retention == Retention(observations=3600.0, records=60.0)  # one flag, one key
    assert (d.tls_cert, d.tls_key) == (Path("/x/cert.pem"), None)  # the pair comes from flags
    assert d.token_file == Path("/x/tok")
    same = _daemon(tmp_path, DaemonOptions(policy="memvisor"))
    assert same.policy_config == PolicyConfig("memvisor", {"tax": 0.5})  # the file's settings
    other = _daemon(tmp_path, DaemonOptions(policy="mom"))
    assert other.policy_config == PolicyConfig("mom", {})  # another policy: its defaults
    with pytest.raises(InputError, match="--policy 'magic'"):
        _daemon(tmp_path, DaemonOptions(policy="magic"))
    with pytest.raises(InputError, match="--on-stop 'reboot'"):
        _daemon(tmp_path, DaemonOptions(on_stop="reboot"))


def test_token_file_created_private_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "tok"
    token = load_token_file(path)
    assert len(token) >= 16 and (path.stat().st_mode & 0o777) == 0o600
    assert load_token_file(path) == read_token_file(path) == token
    path.chmod(0o640)
    with pytest.raises(InputError, match="chmod 600"):
        read_token_file(path)
    path.write_text("short")
    path.chmod(0o600)
    with pytest.raises(InputError, match="too short"):
        read_token_file(path)
    with pytest.raises(InputError, match="cannot read"):
        read_token_file(tmp_path / "missing" / "tok")
    with pytest.raises(InputError, match="cannot create"):
        load_token_file(tmp_path / "missing" / "tok")
