"""Daemon pieces that need no process: listen addresses, admission of a host file, the pool
tree as the API serves it, the lock and the restart bookkeeping."""

from __future__ import annotations

from pathlib import Path

import pytest

from memvisor.config import parse_host_config
from memvisor.daemon import _take_lock, admit, pool_tree_json, read_daemon_file, split_listen
from memvisor.errors import AdmissionError, InputError
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
