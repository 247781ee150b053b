"""Start a real ``memvisor up`` process for end-to-end tests, and talk to its API.

The daemon runs as its own process (``python -m memvisor``) exactly as an operator starts it;
tests reach it only through its HTTP API, its CLI and its state directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

HOST_TOML = """\
[host]
capacity = "{capacity}"

[pools.prod]
reservation = "1GiB"
expandable = true

[vms.web1]
pool = "prod"
memory = "1GiB"
reservation = "256MiB"
power_on = true

[vms.web2]
pool = "prod"
memory = "1GiB"
backing = "anon"
power_on = true

[vms.batch]
memory = "1GiB"
backing = "anon"
power_on = true

[vms.spare]
memory = "512MiB"
"""


def require_qemu() -> None:
    """Skip (with the reason) unless QEMU and the guest kernel are installed."""
    import pytest

    from memvisor.backends.qemu.launcher import QEMU_BINARY
    from memvisor.errors import InputError
    from memvisor.guestimage import find_kernel_tree

    if shutil.which(QEMU_BINARY) is None:
        pytest.skip(f"needs QEMU: {QEMU_BINARY} not installed (scripts/setup.sh)")
    try:
        find_kernel_tree()
    except InputError as exc:
        pytest.skip(f"needs the guest kernel: {exc}")


def require_root() -> None:
    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root: host memory interfaces (/proc/PID/pagemap, KSM, cgroups)")


def require_qemu_and_root() -> None:
    """Skip, saying why, unless QEMU, the guest kernel and root are all here."""
    require_qemu()
    require_root()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_host_file(directory: Path, capacity: str = "2560MiB", text: str | None = None) -> Path:
    path = directory / "host.toml"
    path.write_text(text if text is not None else HOST_TOML.format(capacity=capacity))
    return path


def memvisor(state: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memvisor", "--state", str(state), *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


class RunningDaemon:
    def __init__(self, state: Path, host_file: Path, *extra: str, backend: str = "sim") -> None:
        self.state = state
        self.port = free_port()
        self.log = open(state.parent / f"daemon-{self.port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "memvisor", "--state", str(state), "up", str(host_file),
             "--backend", backend, "--listen", f"127.0.0.1:{self.port}", *extra],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = ""

    def wait_ready(self, timeout: float = 120.0, ticks: int = 2) -> RunningDaemon:
        """Until the API answers and the loop has recorded ``ticks`` ticks."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.output()}")
            info = self.daemon_file()
            if info.get("state") == "running" and info.get("pid") == self.proc.pid:
                token_file = info.get("token_file") or self.state / "api-token"
                self.token = Path(token_file).read_text().strip()
                try:
                    if self.get("/metrics").status_code == 200 and self.ticks() >= ticks:
                        return self
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"daemon not ready in {timeout} s: {self.output()}")

    def daemon_file(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.state / "daemon.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return data

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers(), timeout=30)

    def put(self, path: str, body: Any) -> httpx.Response:
        return httpx.put(self.url + path, json=body, headers=self.headers(), timeout=30)

    def ticks(self) -> int:
        for line in self.get("/metrics").text.splitlines():
            if line.startswith("memvisor_loop_ticks_total "):
                return int(line.split()[1])
        return 0

    def wait_ticks(self, more: int, timeout: float = 60.0) -> None:
        target = self.ticks() + more
        deadline = time.monotonic() + timeout
        while self.ticks() < target:
            assert time.monotonic() < deadline, f"fewer than {more} ticks in {timeout} s"
            time.sleep(0.2)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def __enter__(self) -> RunningDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()
