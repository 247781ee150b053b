"""Launch one QEMU VM from the guest image and wait until the guest is ready.

The small API the manager, the tests and the other areas use::

    from memvisor.backends.qemu.launcher import LaunchSpec, booted_vm, GuestShell
    with booted_vm(LaunchSpec("t1", memory=256 * MiB), tmp_dir) as vm:
        vm.qmp().cmd("query-balloon")            # QMP (qemu.qmp), the manager's socket
        vm.paths.gdb                             # gdbstub unix socket (mode 0600)
        vm.paths.agent                           # agent virtio-serial port "org.memvisor.agent.0"
        GuestShell(vm.paths.shell).run("cat /proc/meminfo")   # busybox sh in the guest

Every VM gets a directory ``vm_dir`` holding (see :class:`VMPaths`): ``qmp.sock`` (the
manager's QMP), ``qmp-aux.sock`` (a second QMP monitor for tools, e.g. introspection's
``cont``/``gpa2hva``), ``agent.sock`` (virtio-serial port ``org.memvisor.agent.0``),
``shell.sock`` (port ``org.memvisor.shell.0``: a busybox shell, for tests), ``gdb.sock``
(gdbstub), ``console.log`` (serial console), ``qemu.pid`` and, with file backing,
``memory.img`` (the VM's own swap file, C4). QEMU runs with umask 0177, so every socket and the
memory file are mode 0600. QEMU is QMP's server: one client per socket at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memvisor.backends.qemu import swapfile
from memvisor.errors import BackendError, GuestError, InputError
from memvisor.guestimage import (
    AGENT_PORT_NAME,
    READY_MARKER,
    SHELL_PORT_NAME,
    GuestImage,
    build_image,
)
from memvisor.model import Backing
from memvisor.units import MiB

QEMU_BINARY = "qemu-system-x86_64"
BALLOON_ID = "balloon0"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True, slots=True)
class VMPaths:
    """The files of one VM in its own directory."""

    root: Path

    @property
    def qmp(self) -> Path:
        return self.root / "qmp.sock"

    @property
    def qmp_aux(self) -> Path:
        return self.root / "qmp-aux.sock"

    @property
    def agent(self) -> Path:
        return self.root / "agent.sock"

    @property
    def shell(self) -> Path:
        return self.root / "shell.sock"

    @property
    def gdb(self) -> Path:
        return self.root / "gdb.sock"

    @property
    def console(self) -> Path:
        return self.root / "console.log"

    @property
    def pidfile(self) -> Path:
        return self.root / "qemu.pid"

    @property
    def memory(self) -> Path:
        return self.root / "memory.img"


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """How to start one VM. ``memory`` in bytes (a multiple of 2 MiB)."""

    name: str
    memory: int
    backing: Backing = Backing.FILE
    vcpus: int = 1
    accel: str = "tcg"
    mem_merge: bool = True  # anon backing: MADV_MERGEABLE, so KSM may merge it
    free_page_reporting: bool = False
    balloon_stats_interval: int = 2  # seconds; 0 disables guest-stats polling
    extra_cmdline: str = ""
    preallocate: bool = True  # file backing: posix_fallocate the swap file at power-on
    extra_args: tuple[str, ...] = field(default=())

    def validate(self) -> None:
        if not _NAME_RE.match(self.name):
            raise InputError(
                f"VM name {self.name!r}: use 1-63 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if self.memory < 64 * MiB or self.memory % (2 * MiB):
            raise InputError(f"VM {self.name}: memory must be >= 64 MiB and a multiple of 2 MiB")
        if not 1 <= self.vcpus <= 64:
            raise InputError(f"VM {self.name}: vcpus must be 1..64, got {self.vcpus}")
        if self.accel not in ("tcg", "kvm"):
            raise InputError(f"VM {self.name}: accel must be 'tcg' or 'kvm', got {self.accel!r}")


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


def qemu_command(spec: LaunchSpec, image: GuestImage, paths: VMPaths) -> list[str]:
    """The full QEMU command line for ``spec`` (pure: no files touched)."""
    size = f"{spec.memory // MiB}M"
    if spec.backing is Backing.FILE:
        backend = (
            f"memory-backend-file,id=mem0,size={size},mem-path={paths.memory},share=on,"
            f"prealloc=off,merge={_on_off(spec.mem_merge)}"
        )
    else:
        backend = f"memory-backend-ram,id=mem0,size={size},merge={_on_off(spec.mem_merge)}"
    cmdline = f"{image.cmdline} {spec.extra_cmdline}".strip()
    fpr = _on_off(spec.free_page_reporting)
    return [
        QEMU_BINARY,
        "-name", f"memvisor-{spec.name},debug-threads=on",
        "-machine", "pc,memory-backend=mem0",
        "-accel", _accel_option(spec.accel),
        "-m", size,
        "-object", backend,
        "-smp", str(spec.vcpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
        "-chardev", f"file,id=console0,path={paths.console}",
        "-serial", "chardev:console0",
        "-chardev", f"socket,id=qmp0,path={paths.qmp},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        "-chardev", f"socket,id=qmp1,path={paths.qmp_aux},server=on,wait=off",
        "-mon", "chardev=qmp1,mode=control",
        # deflate-on-oom: the guest takes balloon pages back before its OOM killer kills
        # anything (a balloon the guest cannot hold killed init and panicked it: docs/qemu.md)
        "-device",
        f"virtio-balloon-pci,id={BALLOON_ID},deflate-on-oom=on,free-page-reporting={fpr}",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent0,path={paths.agent},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent0,name={AGENT_PORT_NAME}",
        "-chardev", f"socket,id=shell0,path={paths.shell},server=on,wait=off",
        "-device", f"virtserialport,chardev=shell0,name={SHELL_PORT_NAME}",
        "-gdb", f"unix:{paths.gdb},server=on,wait=off",
        "-pidfile", str(paths.pidfile),
        *spec.extra_args,
    ]  # fmt: skip


# TCG's translation cache defaults to 1 GiB in QEMU 7.2 and is touched as it fills; bounded so
# QEMU's own memory stays within the cgroup's overhead allowance (cgroup.QEMU_OVERHEAD).
TCG_TB_SIZE_MIB = 128


def _accel_option(accel: str) -> str:
    return f"tcg,tb-size={TCG_TB_SIZE_MIB}" if accel == "tcg" else accel


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def pid_runs_vm(pid: int, paths: VMPaths) -> bool:
    """True if ``pid`` is a live QEMU of this VM directory (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return pid_alive(pid) and str(paths.qmp).encode() in cmdline


class QMP:
    """A synchronous QMP connection over ``qemu.qmp``'s QMPClient, with timeouts.

    QEMU serves one client per QMP socket: while another process holds it, connecting waits for
    a greeting that never comes, so the connection times out with a clear error instead.
    """

    def __init__(self, path: Path, *, timeout: float = 10.0) -> None:
        from qemu.qmp import QMPClient

        self.path = path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(f"memvisor:{path.parent.name}")
        try:
            self._run(self._client.connect(str(path)))
        except TimeoutError as exc:
            self.close()
            raise BackendError(
                f"QMP {path}: no greeting within {timeout:.0f} s (another client, e.g. the "
                "daemon, holds this socket; tools can use qmp-aux.sock)"
            ) from exc
        except Exception as exc:  # qemu.qmp raises several unrelated types
            self.close()
            raise BackendError(f"QMP {path}: cannot connect: {exc}") from exc

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, self.timeout))

    def cmd(self, name: str, **args: Any) -> Any:
        try:
            return self._run(self._client.execute(name, args or None))
        except Exception as exc:
            raise BackendError(f"QMP {self.path}: {name} failed: {exc}") from exc

    def hmp(self, command: str) -> str:
        """A human-monitor command (e.g. ``gpa2hva 0x0``); returns its text output."""
        return str(self.cmd("human-monitor-command", **{"command-line": command}))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self._client.disconnect())
        with contextlib.suppress(Exception):
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        with contextlib.suppress(Exception):
            self._loop.close()


class VMProcess:
    """A running (or re-attached) QEMU process of one VM."""

    def __init__(
        self, spec: LaunchSpec, paths: VMPaths, pid: int, popen: subprocess.Popen[bytes] | None
    ) -> None:
        self.spec = spec
        self.paths = paths
        self.pid = pid
        self._popen = popen
        self._qmp: QMP | None = None
        self.ready_line: str | None = None

    @classmethod
    def start(
        cls,
        spec: LaunchSpec,
        vm_dir: Path,
        image: GuestImage,
        *,
        cgroup_procs: Path | None = None,
    ) -> VMProcess:
        """Create the VM's directory and swap file (file backing) and start QEMU.

        Refuses cleanly (nothing left behind) if the disk cannot hold the swap file. With
        ``cgroup_procs``, QEMU joins that cgroup before exec, so all its memory is charged there.
        """
        spec.validate()
        paths = VMPaths(vm_dir)
        created_dir = not vm_dir.exists()
        vm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            set_aside_console(paths)
            if spec.backing is Backing.FILE:
                swapfile.create(paths.memory, spec.memory, preallocate=spec.preallocate)
            popen = _spawn(qemu_command(spec, image, paths), paths, cgroup_procs)
        except BaseException:
            _remove_vm_files(paths, remove_dir=created_dir)
            raise
        return cls(spec, paths, popen.pid, popen)

    def alive(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        return pid_runs_vm(self.pid, self.paths)

    def exit_code(self) -> int | None:
        return self._popen.poll() if self._popen is not None else None

    def console_tail(self, nbytes: int = 2000) -> str:
        try:
            data = self.paths.console.read_bytes()[-nbytes:]
        except FileNotFoundError:
            return ""
        return data.decode(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> str:
        """Wait for the guest's readiness line on the serial console; returns that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.console_tail(8192).splitlines():
                if line.startswith(READY_MARKER):
                    self.ready_line = line
                    return line
            if not self.alive():
                raise BackendError(
                    f"VM {self.spec.name}: QEMU exited (code {self.exit_code()}) before the "
                    f"guest was ready; console tail:\n{self.console_tail()}"
                )
            time.sleep(0.1)
        raise BackendError(
            f"VM {self.spec.name}: guest not ready after {timeout:.0f} s; console tail:\n"
            f"{self.console_tail()}"
        )

    def qmp(self) -> QMP:
        """The manager's QMP connection (opened on first use, kept)."""
        if self._qmp is None:
            self._qmp = QMP(self.paths.qmp)
        return self._qmp

    def close_qmp(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def stop(self, timeout: float = 10.0, *, remove_files: bool = True) -> None:
        """Power off: QMP ``quit``, then SIGTERM, then SIGKILL; remove the swap file and
        sockets (the console log stays for post-mortems)."""
        if self.alive():
            with contextlib.suppress(BackendError):
                self.qmp().cmd("quit")
        self.close_qmp()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self._wait_exit(timeout / 2):
                break
            self._signal(sig)
        self._wait_exit(timeout)
        if remove_files:
            _remove_vm_files(self.paths, remove_dir=False)

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.alive():
                os.kill(self.pid, sig)

    def _wait_exit(self, timeout: float) -> bool:
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout)
            return self._popen.poll() is not None
        deadline = time.monotonic() + timeout
        while pid_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not pid_alive(self.pid)


def set_aside_console(paths: VMPaths) -> None:
    """Move a reused directory's console log to ``console.prev.log`` (kept for post-mortems):
    its old readiness line would make :meth:`VMProcess.wait_ready` return before the new
    guest has booted."""
    with contextlib.suppress(FileNotFoundError):
        os.replace(paths.console, paths.root / "console.prev.log")


def _spawn(cmd: list[str], paths: VMPaths, cgroup_procs: Path | None) -> subprocess.Popen[bytes]:
    def in_child() -> None:
        os.umask(0o177)  # sockets and files QEMU creates: mode 0600 (the gdbstub must be)
        if cgroup_procs is not None:
            cgroup_procs.write_text(str(os.getpid()))

    log = paths.root / "qemu.log"
    with log.open("ab") as out:
        try:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=in_child,  # we are single-threaded at this point
                start_new_session=True,  # survives the manager (re-attach after restart)
                close_fds=True,
            )
        except FileNotFoundError as exc:
            raise BackendError(f"{cmd[0]}: not installed (scripts/setup.sh installs QEMU)") from exc
        except subprocess.SubprocessError as exc:
            raise BackendError(f"starting QEMU failed: {exc}") from exc


def _remove_vm_files(paths: VMPaths, *, remove_dir: bool) -> None:
    for p in (paths.memory, paths.qmp, paths.qmp_aux, paths.agent, paths.shell, paths.gdb,
              paths.pidfile):  # fmt: skip
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    if remove_dir:
        for p in paths.root.iterdir():
            p.unlink()
        paths.root.rmdir()


def launch(
    spec: LaunchSpec,
    vm_dir: Path,
    image: GuestImage | None = None,
    *,
    timeout: float = 180.0,
    cgroup_procs: Path | None = None,
) -> VMProcess:
    """Start a VM and wait for its guest's readiness line. Stops it again if it never gets
    ready. ``image`` defaults to :func:`memvisor.guestimage.build_image` (cached)."""
    vm = VMProcess.start(spec, vm_dir, image or build_image(), cgroup_procs=cgroup_procs)
    try:
        vm.wait_ready(timeout)
    except BaseException:
        vm.stop()
        raise
    return vm


@contextlib.contextmanager
def booted_vm(
    spec: LaunchSpec, vm_dir: Path, image: GuestImage | None = None, *, timeout: float = 180.0
) -> Iterator[VMProcess]:
    """A ready VM for the duration of a ``with`` block; powered off afterwards."""
    vm = launch(spec, vm_dir, image, timeout=timeout)
    try:
        yield vm
    finally:
        vm.stop()


@dataclass(frozen=True, slots=True)
class ShellResult:
    rc: int
    output: str


class GuestShell:
    """Run commands in the guest's busybox shell on the ``org.memvisor.shell.0`` port.

    Each ``run`` sends ``{ CMD\\n} </dev/null 2>&1; echo MARKER=$?`` and reads up to the
    marker: stdout and stderr come back interleaved as one text. For tests and benchmarks, not
    for the manager: the guest is untrusted, so the output is capped and timed out.
    """

    MAX_OUTPUT = 16 * MiB

    def __init__(self, path: Path, *, connect_timeout: float = 10.0) -> None:
        self._path = Path(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(connect_timeout)
        try:
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise BackendError(f"guest shell {path}: cannot connect: {exc}") from exc

    def run(self, command: str, *, timeout: float = 60.0, check: bool = False) -> ShellResult:
        token = secrets.token_hex(8)
        marker = f"__MV_RC_{token}="
        self._sock.settimeout(timeout)
        try:
            self._sock.sendall(f"{{ {command}\n}} </dev/null 2>&1; echo {marker}$?\n".encode())
        except OSError as exc:
            raise GuestError(f"guest shell: cannot send {command!r}: {exc}") from exc
        buf = b""
        pattern = re.compile(re.escape(marker).encode() + rb"(\d+)\n")
        deadline = time.monotonic() + timeout
        while not (m := pattern.search(buf)):
            if time.monotonic() > deadline or len(buf) > self.MAX_OUTPUT:
                raise GuestError(f"guest shell: no end marker for {command!r} within limits")
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise GuestError(
                    f"guest shell: {command!r} timed out after {timeout} s{self._console_tail()}"
                ) from exc
            if not chunk:
                raise GuestError(f"guest shell: connection closed during {command!r}")
            buf += chunk
        result = ShellResult(int(m.group(1)), buf[: m.start()].decode(errors="replace"))
        if check and result.rc != 0:
            raise GuestError(f"guest command {command!r} failed ({result.rc}): {result.output}")
        return result

    def _console_tail(self, chars: int = 2000) -> str:
        """The end of the VM's console log (beside the shell socket), for an error message:
        a stuck shell is usually explained there (OOM killer, hung task, panic)."""
        try:
            with open(self._path.with_name("console.log"), "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - chars))
                tail = f.read().decode(errors="replace")
        except OSError:
            return ""
        return f"; end of the guest console:\n{tail}"

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> GuestShell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
