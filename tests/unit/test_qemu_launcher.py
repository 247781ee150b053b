"""The QEMU command line, launch-spec validation and the guest-shell protocol (against a fake
shell on a socketpair; the real guest shell is tested in tests/e2e/test_qemu_launcher.py)."""

from __future__ import annotations

import itertools
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from memvisor.backends.qemu.launcher import (
    GuestShell,
    LaunchSpec,
    VMPaths,
    VMProcess,
    qemu_command,
    set_aside_console,
)
from memvisor.errors import BackendError, GuestError, InputError
from memvisor.guestimage import AGENT_PORT_NAME, READY_MARKER, SHELL_PORT_NAME, GuestImage
from memvisor.model import Backing
from memvisor.units import MiB

IMAGE = GuestImage(Path("/k"), Path("/i"), "d", 1, False)


def _arg_after(cmd: list[str], flag: str, contains: str) -> str:
    return next(b for a, b in itertools.pairwise(cmd) if a == flag and contains in b)


def test_file_backing_command_line() -> None:
    paths = VMPaths(Path("/vm"))
    cmd = qemu_command(LaunchSpec("v", 256 * MiB), IMAGE, paths)
    backend = _arg_after(cmd, "-object", "memory-backend")
    assert backend.startswith("memory-backend-file,id=mem0,size=256M,mem-path=/vm/memory.img")
    assert "share=on" in backend
    assert _arg_after(cmd, "-machine", "pc") == "pc,memory-backend=mem0"
    assert _arg_after(cmd, "-gdb", "unix") == "unix:/vm/gdb.sock,server=on,wait=off"
    assert "init_on_alloc=0" in _arg_after(cmd, "-append", "console")
    assert f"name={AGENT_PORT_NAME}" in " ".join(cmd) and f"name={SHELL_PORT_NAME}" in " ".join(cmd)
    assert "-no-reboot" in cmd and _arg_after(cmd, "-accel", "") == "tcg,tb-size=128"


def test_anon_backing_is_mergeable_ram() -> None:
    cmd = qemu_command(LaunchSpec("v", 128 * MiB, Backing.ANON), IMAGE, VMPaths(Path("/vm")))
    assert _arg_after(cmd, "-object", "memory-backend") == (
        "memory-backend-ram,id=mem0,size=128M,merge=on"
    )


@pytest.mark.parametrize(
    "spec",
    [
        LaunchSpec("bad name", 256 * MiB),
        LaunchSpec("../x", 256 * MiB),
        LaunchSpec("v", 100 * MiB + 4096),
        LaunchSpec("v", 32 * MiB),
        LaunchSpec("v", 256 * MiB, vcpus=0),
        LaunchSpec("v", 256 * MiB, accel="hvf"),
    ],
)
def test_bad_specs_are_refused(spec: LaunchSpec) -> None:
    with pytest.raises(InputError):
        spec.validate()


def _fake_shell(sock: socket.socket, reply: bytes | None) -> None:
    data = b""
    while b"__MV_RC_" not in data or not data.endswith(b"\n"):
        data += sock.recv(4096)
    marker = re.search(rb"echo (__MV_RC_[0-9a-f]+=)", data)
    assert marker is not None
    sock.sendall(reply if reply is not None else b"hello\n" + marker.group(1) + b"7\n")


def test_guest_shell_returns_output_and_exit_code(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    with GuestShell(path) as sh:
        conn, _ = server.accept()
        t = threading.Thread(target=_fake_shell, args=(conn, None))
        t.start()
        result = sh.run("echo hello; exit 7")
        t.join()
    assert result.rc == 7 and result.output == "hello\n"


def test_guest_shell_times_out_on_a_silent_guest(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    with GuestShell(path) as sh:
        conn, _ = server.accept()  # accepted, never answers
        with pytest.raises(GuestError, match="timed out") as err:
            sh.run("true", timeout=0.3)
        assert "console" not in str(err.value)  # no console log beside the socket
        (tmp_path / "console.log").write_text("boot\n" + "x" * 5000 + "\nOut of memory: Killed\n")
        with pytest.raises(GuestError, match="timed out") as err:
            sh.run("true", timeout=0.3)
        assert str(err.value).endswith("Out of memory: Killed\n")  # why it is stuck
        assert "boot" not in str(err.value)  # the end of the log only
        conn.close()


def test_a_reused_directory_does_not_look_ready_from_its_old_console_log(tmp_path: Path) -> None:
    """The previous guest's readiness line must not end wait_ready before the new guest
    boots; the old log is kept beside it."""
    paths = VMPaths(tmp_path)
    paths.console.write_text(f"old boot\n{READY_MARKER} pid=1\n")
    set_aside_console(paths)
    assert not paths.console.exists()
    assert READY_MARKER in (tmp_path / "console.prev.log").read_text()
    proc = subprocess.Popen(["sleep", "30"])  # a live process standing in for QEMU
    try:
        vm = VMProcess(LaunchSpec("reused", 256 * MiB), paths, proc.pid, proc)
        with pytest.raises(BackendError, match="not ready after"):
            vm.wait_ready(timeout=0.5)
        paths.console.write_text(f"{READY_MARKER} pid=2\n")  # the new guest's line
        assert vm.wait_ready(timeout=5).endswith("pid=2")
    finally:
        proc.kill()
        proc.wait()
