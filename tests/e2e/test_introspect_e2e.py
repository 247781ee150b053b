"""Hidden monitoring (C5) and forced execution (C6) against a real QEMU guest (TCG).

One guest (KASLR on) serves the monitoring, hiding, forced-call and CLI tests; a second,
short-lived guest checks symbol resolution with ``nokaslr``.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon_run import RunningDaemon, write_host_file

from memvisor.backends.qemu.launcher import GuestShell, VMProcess
from memvisor.cli import main as cli_main
from memvisor.guestimage import GuestImage, find_kernel_tree
from memvisor.introspect import symbols, tcgcount
from memvisor.introspect.inject import CallResult, Injector
from memvisor.introspect.monitor import Monitor, argument_filter, detect_accelerator
from memvisor.introspect.rsp import GdbClient, resume_vm

pytestmark = pytest.mark.e2e

SYSCALLS = b"""
import os, sys
count, base = int(sys.argv[1]), int(sys.argv[2])
for i in range(count):
    try:
        os.getpriority(os.PRIO_PROCESS, base + i)  # no such PID: ESRCH, still one syscall
    except ProcessLookupError:
        pass
print("calls done", count)
"""

# Reads kernel memory the way the guest sees it: /proc/kallsyms for the address, /proc/kcore
# (an ELF core of the kernel's address space) for the bytes.
PEEK = b"""
import struct, sys
name, length = sys.argv[1], int(sys.argv[2])
addr = next(int(l.split()[0], 16) for l in open("/proc/kallsyms") if l.split()[2] == name)
with open("/proc/kcore", "rb") as f:
    head = f.read(64)
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    f.seek(phoff)
    table = f.read(phentsize * phnum)
    for i in range(phnum):
        ptype, _fl, off, vaddr, _pa, filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
        if ptype == 1 and vaddr <= addr < vaddr + filesz:
            f.seek(off + addr - vaddr)
            print(hex(addr), f.read(length).hex())
            break
"""


@pytest.fixture(scope="module")
def image(image_factory: Callable[..., GuestImage]) -> GuestImage:
    return image_factory(extra_files={"/opt/test/syscalls.py": SYSCALLS, "/opt/test/peek.py": PEEK})


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def kernel_symbols(state_dir: Path) -> symbols.KernelSymbols:
    return symbols.load_symbols(find_kernel_tree().vmlinuz, state_dir / "cache")


@pytest.fixture(scope="module")
def vm(vm_factory: Callable[..., VMProcess], image: GuestImage) -> VMProcess:
    return vm_factory("introspect", image=image)


@pytest.fixture(scope="module")
def gsh(vm: VMProcess) -> Iterator[GuestShell]:
    """One shell connection for the module: guest programs run as background jobs in the
    guest, so no host thread has to wait on the guest while the VM is being monitored."""
    with GuestShell(vm.paths.shell) as sh:
        yield sh


@pytest.fixture
def monitor(vm: VMProcess, kernel_symbols: symbols.KernelSymbols) -> Iterator[Monitor]:
    client = GdbClient.connect_unix(str(vm.paths.gdb), timeout=10.0)
    try:
        symbols.find_kaslr_slide(client, kernel_symbols)
        yield Monitor(client, kernel_symbols, accel=detect_accelerator(client))
    finally:
        client.close()  # detaches: breakpoints removed, VM resumed


def start_job(gsh: GuestShell, name: str, command: str) -> None:
    gsh.run(f"rm -f /tmp/{name}.out; ( {command} ) > /tmp/{name}.out 2>&1 &", check=True)


def job_output(gsh: GuestShell, name: str, monitor: Monitor | None = None) -> str:
    """The job's output so far (the VM must run: resumed here if a monitor holds it)."""
    if monitor is not None and not monitor.client.running:
        monitor.client.resume()
    try:
        return gsh.run(f"cat /tmp/{name}.out", timeout=60).output
    finally:
        if monitor is not None:
            monitor.client.interrupt()


def wait_job(gsh: GuestShell, name: str, expect: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while expect not in (out := job_output(gsh, name)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return out


@pytest.mark.timeout(240)
def test_monitor_counts_every_syscall_with_its_arguments(gsh: GuestShell, monitor: Monitor) -> None:
    assert monitor.symbols.slide != 0  # KASLR on, found and validated on linux_banner
    calls, base = 12, 424200
    reg = monitor.watch_symbol("__x64_sys_getpriority", max_rate=1000)
    monitor.client.resume()
    start_job(gsh, "count", f"python3 /opt/test/syscalls.py {calls} {base}")
    monitor.run(duration=120, until=lambda: reg.hits >= calls)
    monitor.run(duration=3)  # nothing more may come
    assert f"calls done {calls}" in job_output(gsh, "count", monitor)
    assert reg.hits == calls
    hits = [h for h in monitor.hits if h.registration == reg.name]
    assert [h.syscall_arguments[:2] for h in hits if h.syscall_arguments] == [
        (0, base + i) for i in range(calls)
    ]
    assert all(h.location == "__x64_sys_getpriority" and h.vcpu == 1 for h in hits)
    assert all(h.registers["cs"] & 3 == 0 for h in hits)  # kernel mode


@pytest.mark.timeout(240)
def test_filter_and_rate_limit_keep_the_guest_running(gsh: GuestShell, monitor: Monitor) -> None:
    base = 777000
    reg = monitor.watch_symbol(
        "__x64_sys_getpriority",
        hit_filter=argument_filter(1, base + 3, syscall=True),
        max_rate=1000,
    )
    monitor.client.resume()
    start_job(gsh, "filter", f"python3 /opt/test/syscalls.py 10 {base}")
    monitor.run(duration=120, until=lambda: reg.hits + reg.filtered_out >= 10)
    assert (reg.hits, reg.filtered_out) == (1, 9)
    monitor.unwatch(reg)
    # a hot loop against a low limit: suspended, and the guest program still finishes
    hot = monitor.watch_symbol("__x64_sys_getpriority", max_rate=5)
    monitor.client.resume()
    start_job(gsh, "hot", "python3 /opt/test/syscalls.py 3000 1")
    monitor.run(duration=15)
    assert "calls done 3000" in job_output(gsh, "hot", monitor)
    assert hot.suspensions >= 1 and 5 <= hot.hits < 3000


@pytest.mark.timeout(180)
def test_monitored_code_reads_unchanged_from_the_guest(gsh: GuestShell, monitor: Monitor) -> None:
    name = "__x64_sys_getpriority"
    addr = monitor.symbols.address(name)
    before = monitor.client.read_memory(addr, 16)
    monitor.watch_symbol(name)
    monitor.client.resume()  # breakpoint armed, guest running
    seen = gsh.run(f"python3 /opt/test/peek.py {name} 16", timeout=60).output.split()
    monitor.client.interrupt()
    assert seen[0] == hex(addr)  # the guest's own kallsyms agrees with our symbol + slide
    assert bytes.fromhex(seen[1]) == before
    assert before[0] != 0xCC
    assert monitor.client.read_memory(addr, 16) == before


@pytest.mark.timeout(180)
def test_forced_call_returns_the_kernel_value_twice(
    vm: VMProcess, gsh: GuestShell, monitor: Monitor
) -> None:
    files_stat = monitor.symbols.address("files_stat")
    in_memory = int.from_bytes(monitor.client.read_memory(files_stat + 16, 8), "little")
    injector = Injector(monitor)
    first = injector.call_now(injector.function("get_max_files"))
    second = injector.call_now(injector.function("get_max_files"))
    assert first.value == second.value == in_memory
    scratch = monitor.symbols.address("startup_64")
    original = monitor.client.read_memory(scratch, 64)
    added = injector.call_now(injector.snippet("add", bytes.fromhex("4889f84801f0c3"), 40, 2))
    assert added.value == 42
    assert monitor.client.read_memory(scratch, 64) == original  # snippet bytes restored
    monitor.client.close()  # detach: QEMU resumes the VM
    assert vm.qmp().cmd("query-status")["status"] == "running"
    out = gsh.run("cat /proc/sys/fs/file-max; echo healthy", timeout=60).output.split()
    assert out == [str(in_memory), "healthy"]


@pytest.mark.timeout(180)
def test_cli_inject_and_monitor(
    vm: VMProcess,
    gsh: GuestShell,
    state_dir: Path,
    kernel_symbols: symbols.KernelSymbols,
    capsys: pytest.CaptureFixture[str],
) -> None:
    common = ["--gdb-socket", str(vm.paths.gdb), "--kernel", str(find_kernel_tree().vmlinuz)]
    state = ["--state", str(state_dir)]  # symbols already cached there
    assert cli_main([*state, "inject", "vm", *common, "--call", "get_max_files", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["value"] == int(gsh.run("cat /proc/sys/fs/file-max").output)
    start_job(gsh, "cli", "sleep 4; python3 /opt/test/syscalls.py 3 5150")
    rc = cli_main(
        [*state, "monitor", "vm", *common, "--symbol", "__x64_sys_getpriority", "--count", "3",
         "--duration", "120", "--json"]
    )  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "calls done 3" in wait_job(gsh, "cli", "calls done")
    assert rc == 0 and lines[-1]["summary"]["hits"] == 3
    assert [h["syscall_arguments"][1] for h in lines[:-1]] == ["0x141e", "0x141f", "0x1420"]


def hits_total(daemon: RunningDaemon) -> int:
    for line in daemon.get("/metrics").text.splitlines():
        if line.startswith("memvisor_introspection_hits_total "):
            return int(float(line.split()[1]))
    raise AssertionError("no memvisor_introspection_hits_total in /metrics")


@pytest.mark.timeout(300)
def test_monitor_hits_reach_the_running_daemons_api(
    vm: VMProcess, gsh: GuestShell, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``memvisor monitor`` records into the state directory's store while a daemon (simulator
    backend) runs on it and writes it every tick; the daemon's API then lists the hits."""
    state = tmp_path / "state"
    common = ["--gdb-socket", str(vm.paths.gdb), "--kernel", str(find_kernel_tree().vmlinuz)]
    monitor_cmd = [
        "--state", str(state), "monitor", "vm", *common, "--symbol", "__x64_sys_getpriority",
        "--duration", "120", "--json",
    ]  # fmt: skip
    with RunningDaemon(state, write_host_file(tmp_path)) as daemon:
        daemon.wait_ready()
        start_job(gsh, "rec", "sleep 8; python3 /opt/test/syscalls.py 3 7000")
        assert cli_main([*monitor_cmd, "--count", "3"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert "calls done 3" in wait_job(gsh, "rec", "calls done")
        assert lines[-1]["summary"]["record"]["recorded"] == 3
        assert lines[-1]["summary"]["record"]["dropped"] == 0
        daemon.wait_ticks(2)  # the daemon kept writing the same database
        hits = daemon.get("/api/v1/hits?vm=vm").json()
        assert [h["detail"]["syscall_arguments"][1] for h in hits] == ["0x1b5a", "0x1b59", "0x1b58"]
        printed = {h["seq"]: h for h in lines[:-1]}
        for h in hits:
            assert h["vm"] == "vm" and h["symbol"] == "__x64_sys_getpriority"
            assert h["address"] == printed[h["detail"]["seq"]]["address"]
            assert h["vcpu"] == printed[h["detail"]["seq"]]["vcpu"]
            assert h["detail"]["registers"]["rip"] == h["address"]
        assert hits_total(daemon) == 3
        start_job(gsh, "norec", "sleep 5; python3 /opt/test/syscalls.py 2 7100")
        assert cli_main([*monitor_cmd, "--count", "2", "--no-record"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert lines[-1]["summary"]["hits"] == 2 and "record" not in lines[-1]["summary"]
        assert "calls done 2" in wait_job(gsh, "norec", "calls done")
        assert len(daemon.get("/api/v1/hits?vm=vm").json()) == 3 and hits_total(daemon) == 3
        assert daemon.stop() == 0


@pytest.mark.timeout(240)
def test_symbols_without_kaslr(
    vm_factory: Callable[..., VMProcess], image: GuestImage, kernel_symbols: symbols.KernelSymbols
) -> None:
    plain = vm_factory("nokaslr", image=image, extra_cmdline="nokaslr")
    with GdbClient.connect_unix(str(plain.paths.gdb)) as client:
        assert symbols.find_kaslr_slide(client, kernel_symbols) == 0
    plain.stop()


@pytest.mark.timeout(240)
def test_tcg_plugin_counts_exactly_without_stopping(
    vm_factory: Callable[..., VMProcess],
    image: GuestImage,
    kernel_symbols: symbols.KernelSymbols,
    state_dir: Path,
) -> None:
    plugin = tcgcount.build_plugin(state_dir / "cache")
    counters = tcgcount.CounterFile.create(state_dir / "counters")
    extra = tcgcount.qemu_args(plugin, counters.path)
    counted = vm_factory("tcgcount", image=image, extra_args=extra)
    with GdbClient.connect_unix(str(counted.paths.gdb)) as client:
        symbols.find_kaslr_slide(client, kernel_symbols)
        counters.watch([kernel_symbols.address("__x64_sys_getpriority")], client)
    # detached: while the guest runs nobody is connected to the gdbstub at all
    with GuestShell(counted.paths.shell) as sh:
        out = sh.run("python3 /opt/test/syscalls.py 500 1", timeout=120).output
    assert "calls done 500" in out
    assert counters.counts() == [500]
    assert counters.instrumented() >= 1
    counters.close()
    counted.stop()


@pytest.mark.timeout(240)
def test_two_vcpus_hits_and_forced_calls(
    vm_factory: Callable[..., VMProcess], image: GuestImage, kernel_symbols: symbols.KernelSymbols
) -> None:
    smp = vm_factory("smp", image=image, vcpus=2)
    with GuestShell(smp.paths.shell) as sh, GdbClient.connect_unix(str(smp.paths.gdb)) as client:
        symbols.find_kaslr_slide(client, kernel_symbols)
        assert client.threads() == [1, 2]
        monitor = Monitor(client, kernel_symbols)
        injector = Injector(monitor)
        results: list[CallResult] = []
        reg = monitor.watch_symbol("__x64_sys_getpriority", max_rate=1000)
        injector.on_hit(reg, injector.function("get_max_files"), results.append)
        client.resume()
        jobs = "for i in 1 2 3 4; do python3 /opt/test/syscalls.py 5 100 & done; wait"
        start_job(sh, "smp", jobs)
        monitor.run(duration=120, until=lambda: reg.hits >= 20)
        assert reg.hits == 20 and not injector.errors
        expected = int.from_bytes(
            client.read_memory(kernel_symbols.address("files_stat") + 16, 8), "little"
        )
        assert [r.value for r in results] == [expected] * 20
        assert [r.vcpu for r in results] == [h.vcpu for h in monitor.hits]
        client.close()
        assert wait_job(sh, "smp", "calls done").count("calls done 5") >= 1
        assert sh.run("cat /proc/sys/fs/file-max").output.split() == [str(expected)]
    smp.stop()


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


@pytest.mark.timeout(180)
def test_terminated_or_killed_clients_do_not_freeze_the_guest(
    vm: VMProcess, gsh: GuestShell, state_dir: Path, kernel_symbols: symbols.KernelSymbols
) -> None:
    gdb = str(vm.paths.gdb)
    monitor_cmd = [sys.executable, "-m", "memvisor", "--state", str(state_dir), "monitor", "vm",
                   "--gdb-socket", gdb, "--kernel", str(find_kernel_tree().vmlinuz),
                   "--symbol", "__x64_sys_getpriority", "--duration", "600"]  # fmt: skip
    with subprocess.Popen(monitor_cmd, stdout=subprocess.PIPE, text=True) as proc:
        time.sleep(1)
        deadline = time.monotonic() + 60
        line = ""
        while not line and time.monotonic() < deadline:  # a hit proves it is attached
            gsh.run("python3 /opt/test/syscalls.py 1 99", timeout=60)
            line = read_line(proc, 2)
        assert "__x64_sys_getpriority" in line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
    assert vm.qmp().cmd("query-status")["status"] == "running"  # it detached on SIGTERM
    assert "calls done 1" in gsh.run("python3 /opt/test/syscalls.py 1 99", timeout=60).output
    # SIGKILL cannot be caught: QEMU keeps the VM paused; resume_vm recovers it
    holder = "from memvisor.introspect.rsp import GdbClient as G; import sys, time; "
    holder += "G.connect_unix(sys.argv[1]); print('attached', flush=True); time.sleep(600)"
    with subprocess.Popen(
        [sys.executable, "-c", holder, gdb], stdout=subprocess.PIPE, text=True
    ) as proc:
        assert read_line(proc, 60).strip() == "attached"
        proc.kill()
        proc.wait(30)
    assert vm.qmp().cmd("query-status")["status"] == "paused"
    resume_vm(gdb)
    assert vm.qmp().cmd("query-status")["status"] == "running"
    assert "calls done 1" in gsh.run("python3 /opt/test/syscalls.py 1 99", timeout=60).output


@pytest.mark.timeout(180)
def test_timer_and_condition_triggers(vm: VMProcess, monitor: Monitor) -> None:
    expected = int.from_bytes(
        monitor.client.read_memory(monitor.symbols.address("files_stat") + 16, 8), "little"
    )
    injector = Injector(monitor)
    by_timer: list[CallResult] = []
    by_condition: list[CallResult] = []
    fired = []

    def condition() -> bool:  # a host-side state, true once
        fired.append(True)
        return len(fired) == 3

    injector.every(0.5, injector.function("get_max_files"), by_timer.append)
    injector.when(condition, injector.function("get_max_files"), by_condition.append, poll=0.3)
    monitor.run(duration=6)
    assert len(by_timer) >= 2 and {r.value for r in by_timer} == {expected}
    assert {r.trigger for r in by_timer} == {"timer"}
    assert [(r.value, r.trigger) for r in by_condition] == [(expected, "condition")]
    assert not injector.errors
    monitor.client.close()
    assert vm.qmp().cmd("query-status")["status"] == "running"
