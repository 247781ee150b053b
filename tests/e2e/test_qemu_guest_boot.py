"""E2E: the guest image boots under QEMU; QMP, the shell port, the gdbstub socket and extra
files work. One guest for the whole module."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from memvisor.backends.qemu.launcher import QMP, GuestShell, VMProcess
from memvisor.errors import BackendError
from memvisor.guestimage import GuestImage
from memvisor.units import MiB

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PROGRAM = b"import os, sys\nprint('pid', os.getpid(), 'args', sys.argv[1:])\n"


@pytest.fixture(scope="module")
def vm(vm_factory: Callable[..., VMProcess], image_factory: Callable[..., GuestImage]) -> VMProcess:
    image = image_factory(extra_files={"/opt/test/hello.py": PROGRAM})
    return vm_factory("launch0", memory=256 * MiB, image=image)


def test_guest_reports_ready_with_swap_and_ports(vm: VMProcess) -> None:
    assert vm.ready_line is not None
    assert "swap=/dev/zram0" in vm.ready_line
    assert "shell_port=/dev/vport" in vm.ready_line and "agent_port=/dev/vport" in vm.ready_line


def test_qmp_sees_the_balloon_and_the_memory(vm: VMProcess) -> None:
    assert vm.qmp().cmd("query-balloon")["actual"] == 256 * MiB
    devs = vm.qmp().cmd("qom-list", path="/machine/peripheral")
    assert "balloon0" in {d["name"] for d in devs}


def test_shell_runs_commands_and_reports_exit_codes(vm: VMProcess) -> None:
    with GuestShell(vm.paths.shell) as sh:
        assert sh.run("echo out; echo err >&2").output == "out\nerr\n"
        assert sh.run("sh -c 'exit 3'").rc == 3
        meminfo = sh.run("cat /proc/meminfo", check=True).output
        assert "MemTotal" in meminfo
        assert "init_on_alloc=0" in sh.run("cat /proc/cmdline").output


def test_extra_python_program_runs_in_the_guest(vm: VMProcess) -> None:
    with GuestShell(vm.paths.shell) as sh:
        out = sh.run("python3 -S /opt/test/hello.py a b", check=True).output
    assert "args ['a', 'b']" in out


def test_sockets_are_private(vm: VMProcess) -> None:
    for path in (vm.paths.gdb, vm.paths.qmp, vm.paths.agent, vm.paths.shell):
        mode = Path(path).stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, path


def test_a_second_qmp_client_times_out_and_the_aux_socket_works(vm: VMProcess) -> None:
    vm.qmp().cmd("query-status")  # the manager's connection is held
    with pytest.raises(BackendError, match="no greeting"):
        QMP(vm.paths.qmp, timeout=2)
    aux = QMP(vm.paths.qmp_aux)
    try:
        assert aux.cmd("query-status")["status"] == "running"
        assert "Host virtual address" in aux.hmp("gpa2hva 0")
    finally:
        aux.close()
