"""The HTTP API: auth, reads, changes, metrics, dashboard files; TestClient and real uvicorn."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakehost import FakeHost, StepBalloonPolicy
from fastapi.testclient import TestClient

from memvisor.api.app import create_app
from memvisor.api.auth import check_listen, load_or_create_token, read_token
from memvisor.api.server import ApiServer
from memvisor.errors import AdmissionError, InputError, NotFoundError
from memvisor.loop import ControlLoop, with_reservations
from memvisor.store import Store
from memvisor.units import GiB, MiB


class FakeController:
    """Admission in miniature: the sum of reservations must fit ``capacity``."""

    def __init__(self, reservations: dict[str, int], capacity: int) -> None:
        self.reservations, self.capacity = reservations, capacity

    def info(self) -> dict[str, Any]:
        return {"backend": "fake", "policy": "step", "interval": 1.0, "thresholds": {"soft": 1}}

    def pools(self) -> dict[str, Any]:
        return {"name": "root", "kind": "pool", "children": []}

    def set_reservation(self, vm: str, reservation: int) -> dict[str, Any]:
        if vm not in self.reservations:
            raise NotFoundError(f"VM {vm!r} does not exist")
        others = sum(r for n, r in self.reservations.items() if n != vm)
        if others + reservation > self.capacity:
            raise AdmissionError(f"{vm}: reservation {reservation} does not fit")
        self.reservations[vm] = reservation
        return {"vm": vm, "reservation": reservation}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[TestClient, str, FakeController, ControlLoop]:
    fake = FakeHost()
    fake.add("a")
    fake.add("b", memory=2 * GiB)
    store = Store.open(tmp_path)
    ctl = FakeController({"a": 0, "b": 0}, capacity=GiB)
    loop = ControlLoop(
        fake, StepBalloonPolicy(), store, fake.clock,
        specs_overlay=with_reservations(ctl.reservations),
    )  # fmt: skip
    loop.tick()
    store.record_hit("a", "do_sys_open", 0xFFFFFFFF812345, 0, {"rdi": "0x1"})
    token = load_or_create_token(tmp_path)
    return TestClient(create_app(store, ctl, token)), token, ctl, loop


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_every_api_route_needs_the_token(setup: Any) -> None:
    client, token, _, _ = setup
    for path in ("/api/v1/host", "/api/v1/vms", "/metrics", "/api/v1/events"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers=auth("wrong" * 8)).status_code == 401
        assert client.get(path, headers={"Authorization": token}).status_code == 401
        assert client.get(path, headers=auth(token)).status_code == 200
    r = client.put("/api/v1/vms/a/reservation", json={"reservation": "1MiB"})
    assert r.status_code == 401


def test_reads(setup: Any) -> None:
    client, token, _, _ = setup
    h = auth(token)
    host = client.get("/api/v1/host", headers=h).json()
    assert host["total"] == 4 * GiB and host["state"] == "high"
    vms = client.get("/api/v1/vms", headers=h).json()
    assert [v["vm"] for v in vms] == ["a", "b"] and vms[0]["ballooned"] == 0
    assert client.get("/api/v1/vms/b", headers=h).json()["memory"] == 2 * GiB
    assert client.get("/api/v1/vms/zz", headers=h).status_code == 404
    assert len(client.get("/api/v1/host/history", headers=h).json()) == 1
    assert len(client.get("/api/v1/vms/a/history", headers=h).json()) == 1
    decisions = client.get("/api/v1/decisions?limit=1", headers=h).json()
    assert len(decisions) == 1 and decisions[0]["reason"].endswith("test step")
    assert client.get("/api/v1/actions", headers=h).json()[0]["ok"] is True
    events = client.get("/api/v1/events", headers=h).json()
    assert {e["kind"] for e in events} == {"vm.seen"}
    assert client.get(f"/api/v1/events?after={events[-1]['id']}", headers=h).json() == []
    (hit,) = client.get("/api/v1/hits", headers=h).json()
    assert hit["symbol"] == "do_sys_open" and hit["address"] == "0xffffffff812345"
    assert client.get("/api/v1/pools", headers=h).json()["name"] == "root"
    assert client.get("/api/v1/info", headers=h).json()["backend"] == "fake"
    assert client.get("/api/v1/decisions?limit=0", headers=h).status_code == 422


def test_set_reservation_goes_through_admission(setup: Any) -> None:
    client, token, ctl, loop = setup
    h = auth(token)
    r = client.put("/api/v1/vms/a/reservation", json={"reservation": "512MiB"}, headers=h)
    assert r.status_code == 200 and ctl.reservations["a"] == 512 * MiB
    r = client.put("/api/v1/vms/b/reservation", json={"reservation": "768MiB"}, headers=h)
    assert r.status_code == 409 and r.json()["error"] == "AdmissionError"
    assert ctl.reservations["b"] == 0  # refused: unchanged
    r = client.put("/api/v1/vms/nope/reservation", json={"reservation": "1MiB"}, headers=h)
    assert r.status_code == 404
    r = client.put("/api/v1/vms/a/reservation", json={"reservation": "lots"}, headers=h)
    assert r.status_code == 422 and "lots" in r.json()["message"]
    loop.tick()  # the next tick sees and records the new reservation
    vms = {v["vm"]: v for v in client.get("/api/v1/vms", headers=h).json()}
    assert vms["a"]["reservation"] == 512 * MiB


def test_metrics_follow_prometheus_conventions(setup: Any) -> None:
    client, token, _, _ = setup
    r = client.get("/metrics", headers=auth(token))
    assert r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()
    assert "# TYPE memvisor_host_free_bytes gauge" in lines
    assert f"memvisor_host_total_bytes {4 * GiB}" in lines
    assert 'memvisor_host_state{state="high"} 1' in lines
    assert 'memvisor_host_state{state="soft"} 0' in lines
    assert f'memvisor_vm_consumed_bytes{{vm="b"}} {GiB}' in lines  # observed before apply
    assert 'memvisor_vm_entitlement_bytes{vm="a"} 536870912' in lines
    assert 'memvisor_vm_active_ratio{vm="a"} 0.25' in lines
    assert 'memvisor_actions_total{result="ok"} 2' in lines
    assert "memvisor_introspection_hits_total 1" in lines
    for line in lines:  # every sample is NAME{labels} NUMBER
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert name.startswith("memvisor_") and float(value) >= 0


def test_openapi_and_dashboard_files_are_served(setup: Any) -> None:
    client, _, _, _ = setup
    spec = client.get("/openapi.json").json()
    assert "/api/v1/vms/{name}/reservation" in spec["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "host-chart" in page.text
    for f in ("app.js", "chart.js", "style.css"):
        assert client.get(f"/static/{f}").status_code == 200
    assert "cdn" not in page.text.lower()


def test_token_file_is_private_and_stable(tmp_path: Path) -> None:
    token = load_or_create_token(tmp_path)
    assert (tmp_path / "api-token").stat().st_mode & 0o777 == 0o600
    assert load_or_create_token(tmp_path) == token == read_token(tmp_path)
    os.chmod(tmp_path / "api-token", 0o644)
    with pytest.raises(InputError, match="chmod 600"):
        read_token(tmp_path)
    with pytest.raises(InputError, match="no API token"):
        read_token(tmp_path / "elsewhere")


def test_listen_beyond_loopback_needs_tls(tmp_path: Path) -> None:
    check_listen("127.0.0.1", None, None)
    check_listen("::1", None, None)
    check_listen("localhost", None, None)
    with pytest.raises(InputError, match="beyond loopback without TLS"):
        check_listen("0.0.0.0", None, None)
    with pytest.raises(InputError, match="go together"):
        check_listen("0.0.0.0", tmp_path / "c.pem", None)
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    with pytest.raises(InputError, match="not found"):
        check_listen("0.0.0.0", cert, key)
    cert.write_text("x")
    key.write_text("x")
    check_listen("0.0.0.0", cert, key)


@pytest.mark.timeout(60)
def test_real_uvicorn_server_on_a_free_port(setup: Any, tmp_path: Path) -> None:
    client, token, ctl, _ = setup
    server = ApiServer(client.app, "127.0.0.1", 0)
    server.start()
    url = server.url
    try:
        assert url.startswith("http://127.0.0.1:") and server.port > 0
        r = httpx.get(f"{server.url}/api/v1/vms", headers=auth(token), timeout=10)
        assert r.status_code == 200 and len(r.json()) == 2
        assert httpx.get(f"{server.url}/api/v1/vms", timeout=10).status_code == 401
        r = httpx.put(
            f"{server.url}/api/v1/vms/b/reservation", json={"reservation": GiB}, headers=auth(token)
        )
        assert r.status_code == 200 and ctl.reservations["b"] == GiB
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/openapi.json", timeout=2)


@pytest.mark.timeout(60)
def test_real_server_with_tls(setup: Any, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    client, token, _, _ = setup
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server = ApiServer(client.app, "127.0.0.1", 0, tls_cert=cert, tls_key=key)
    server.start()
    try:
        assert server.url.startswith("https://")
        r = httpx.get(
            f"{server.url}/api/v1/host",
            headers=auth(token),
            verify=ssl.create_default_context(cafile=cert),
        )
        assert r.status_code == 200 and r.json()["total"] == 4 * GiB
    finally:
        server.stop()
