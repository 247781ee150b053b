"""The reservation program in a real guest (QEMU, TCG, 512 MiB, file backing, zram swap).

One VM for the module; the tests run in order and the last one replaces the agent by a
hostile program. Host memory is measured as the residency of the VM's backing file (mincore),
never from QEMU's RSS.
"""

from __future__ import annotations

import base64
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ksmknobs import ksm_knobs
from memvisor.agent.backing import AnonKsmBacking, FileBacking, RamLayout
from memvisor.agent.host import (
    AgentSession,
    AgentState,
    ReservationDriver,
    observation_fields,
)
from memvisor.agent.link import AgentLink
from memvisor.backends.base import RealClock
from memvisor.backends.qemu.launcher import GuestShell, VMProcess
from memvisor.model import Backing, PowerState, VMObservation, VMSpec
from memvisor.policy.balloon import BalloonController
from memvisor.units import MiB

pytestmark = pytest.mark.e2e
MEMORY = 512 * MiB
RESERVE = 128 * MiB
PAGE = 4096


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the VM's backing file and QEMU's sockets are root's")


class QmpBalloon:
    """virtio-balloon through QMP: ``balloon`` takes the guest's new size."""

    def __init__(self, vm: VMProcess) -> None:
        self.vm = vm

    def set_balloon(self, nbytes: int) -> None:
        self.vm.qmp().cmd("balloon", value=MEMORY - nbytes)


@dataclass
class AgentVM:
    vm: VMProcess
    backing: FileBacking | AnonKsmBacking
    session: AgentSession
    link: AgentLink
    driver: ReservationDriver

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            with self.link.lock:
                if cond():
                    return time.monotonic() - start
            time.sleep(0.05)
        events = "\n".join(str(e) for e in list(self.session.events)[-10:])
        raise AssertionError(f"{what}: not within {timeout} s; events:\n{events}")

    def set_target(self, nbytes: int) -> None:
        with self.link.lock:
            self.driver.set_target(nbytes)

    def settled(self, pages: int) -> Callable[[], bool]:
        s = self.session
        return lambda: s.agent_held == pages and not s.busy and s.synced

    def meminfo(self, shell: GuestShell, key: str) -> int:
        out = shell.run(f"grep '^{key}:' /proc/meminfo", check=True).output
        return int(out.split()[1]) * 1024

    def resident(self) -> int:
        assert isinstance(self.backing, FileBacking)
        return self.backing.resident_total() * PAGE


@pytest.fixture(scope="module")
def agent_vm(vm_factory: Callable[..., VMProcess]) -> Iterator[AgentVM]:
    require_root()
    vm = vm_factory("agent0", memory=MEMORY, backing=Backing.FILE)
    layout = RamLayout.pc(MEMORY)
    backing = FileBacking(str(vm.paths.memory), layout)
    session = AgentSession("agent0", layout, backing, RealClock())
    link = AgentLink(session, str(vm.paths.agent), lost_retry_s=600.0)
    driver = ReservationDriver(session, QmpBalloon(vm))
    link.start()
    avm = AgentVM(vm, backing, session, link, driver)
    try:
        avm.wait(lambda: session.state is AgentState.READY and session.synced, 120, "hello")
        yield avm
    finally:
        avm.link.stop()
        backing.close()


@pytest.mark.timeout(300)
def test_inflate_frees_host_memory_and_deflate_gives_it_back(agent_vm: AgentVM) -> None:
    a = agent_vm
    with GuestShell(a.vm.paths.shell) as sh:
        # Touch most of the guest's free memory once, so its free frames are backed on the
        # host: a reservation can only free backing that exists.
        sh.run("dd if=/dev/zero of=/dev/null bs=300M count=1", timeout=120, check=True)
        avail0 = a.meminfo(sh, "MemAvailable")
        host0 = a.resident()
        a.set_target(RESERVE)
        took = a.wait(a.settled(RESERVE // PAGE), 120, "inflate")
        time.sleep(1.5)  # one measuring interval
        host1 = a.resident()
        avail1 = a.meminfo(sh, "MemAvailable")
        with a.link.lock:
            report = a.session.report()
        print(
            f"inflate {RESERVE // MiB} MiB in {took:.2f} s; host backing {host0 / MiB:.0f} -> "
            f"{host1 / MiB:.0f} MiB; guest MemAvailable {avail0 / MiB:.0f} -> "
            f"{avail1 / MiB:.0f} MiB; session says freed {report.freed / MiB:.0f} MiB"
        )
        assert host0 - host1 >= 0.85 * RESERVE
        assert report.freed >= 0.95 * RESERVE and report.held_present == RESERVE
        assert avail0 - avail1 >= 0.8 * RESERVE
        held = a.session.held_ranges()
        restart_manager(a, RESERVE)
        took = a.wait(
            lambda: a.session.synced and a.session.agent_held == RESERVE // PAGE,
            60,
            "the agent re-reports to a restarted manager",
        )
        print(f"manager restarted: the agent re-reported its {RESERVE // MiB} MiB in {took:.2f} s")
        assert a.session.held_ranges() == held and a.session.violations == 0
        a.set_target(0)
        took = a.wait(a.settled(0), 120, "deflate")
        avail2 = a.meminfo(sh, "MemAvailable")
        print(f"deflate in {took:.2f} s; guest MemAvailable back to {avail2 / MiB:.0f} MiB")
        assert avail2 >= avail0 - 16 * MiB
        assert a.session.held_ranges() == [] and a.session.violations == 0


def restart_manager(a: AgentVM, target: int) -> None:
    """Drop the host side and start a fresh session and link, as a restarted manager does."""
    a.link.stop()
    a.session = AgentSession("agent0", RamLayout.pc(MEMORY), a.backing, RealClock())
    a.driver = ReservationDriver(a.session, QmpBalloon(a.vm))
    a.driver.set_target(target)  # what the manager's state says the agent should hold
    a.link = AgentLink(a.session, str(a.vm.paths.agent), lost_retry_s=600.0)
    a.link.start()


def _observation(a: AgentVM) -> VMObservation:
    with a.link.lock:
        report = a.session.report()
    return VMObservation(
        name="agent0",
        time=a.session.clock.now(),
        power=PowerState.ON,
        memory=MEMORY,
        consumed=a.resident(),
        **observation_fields(report),  # type: ignore[arg-type]
    )


@pytest.mark.timeout(400)
def test_guest_pressure_pages_reserved_pages_out_and_the_controller_deflates(
    agent_vm: AgentVM,
) -> None:
    a = agent_vm
    a.set_target(RESERVE)
    a.wait(a.settled(RESERVE // PAGE), 120, "inflate")
    with GuestShell(a.vm.paths.shell) as sh:
        avail = a.meminfo(sh, "MemAvailable")
        size = (avail + 96 * MiB) // MiB  # bigger than the guest's free memory
        result: dict[str, str] = {}
        prog = f"import time; b = b'x' * ({size} << 20); time.sleep(12)"

        def workload() -> None:
            result["out"] = sh.run(f'python3 -S -c "{prog}"; echo rc=$?', timeout=240).output

        worker = threading.Thread(target=workload)
        started = time.monotonic()
        worker.start()
        try:
            a.wait(lambda: a.session.pageout_rate() > 0, 180, "page-out report")
            seen = time.monotonic() - started
            obs = _observation(a)
            print(
                f"workload of {size} MiB (guest had {avail / MiB:.0f} MiB available): "
                f"reserved pages paged out, reported {seen:.1f} s after the workload "
                f"started, at {obs.reserved_paged_out_rate:.0f} pages/s"
            )
            assert obs.reserved_paged_out_rate > 0
            spec = VMSpec("agent0", MEMORY, backing=Backing.FILE)
            step = BalloonController().step(obs, spec, RESERVE, a.session.clock.now())
            print(f"controller: {step}")
            assert step.limited and step.target < RESERVE and "reserved pages" in step.note
            a.set_target(step.target)
            pages = step.target // PAGE // 512 * 512
            a.wait(lambda: a.session.agent_held <= pages, 120, "deflate by the controller")
        finally:
            worker.join()
        assert "rc=0" in result["out"], result["out"]  # the workload was not OOM-killed
    a.set_target(0)
    a.wait(a.settled(0), 120, "deflate")


HOLD = (  # holds argv[1] MiB, writes its pid to argv[2], sleeps
    "import os, sys, time\nb = b'x' * (int(sys.argv[1]) << 20)\n"
    "open(sys.argv[2], 'w').write(str(os.getpid()))\ntime.sleep(900)\n"
)
# reads process argv[1]'s largest anonymous mapping through /proc/PID/mem, 1 MiB at a time with
# argv[2] seconds between: its swapped pages come back one fault at a time, as a waking
# workload's do
READER = """
import sys, time
pid, pause = sys.argv[1], float(sys.argv[2])
maps = [l.split()[0] for l in open('/proc/%s/maps' % pid) if ' rw-p ' in l]
best = max(maps, key=lambda r: int(r.split('-')[1], 16) - int(r.split('-')[0], 16))
lo, hi = (int(x, 16) for x in best.split('-'))
with open('/proc/%s/mem' % pid, 'rb', 0) as m:
    for at in range(lo, hi, 1 << 20):
        m.seek(at)
        m.read(1 << 20)
        time.sleep(pause)
"""


def _vm_swap(sh: GuestShell, pid: str) -> int:
    out = sh.run(f"grep VmSwap /proc/{pid}/status", check=True).output
    return int(out.split()[1]) * 1024


def _pswpin(sh: GuestShell) -> int:
    return int(sh.run("grep '^pswpin ' /proc/vmstat", check=True).output.split()[1])


def test_a_release_while_the_guest_pages_in_reads_swap_back_in_bulk(agent_vm: AgentVM) -> None:
    """Two idle buffers pushed to the guest's swap by a large allocation; a reader faults the
    small one back page by page (>= 1 MiB/s of swap-ins, a waking workload); the host then
    releases the reservation: the agent asks the kernel to read the swapped memory back at
    once (MADV_WILLNEED: into the swap cache). Reading the big buffer afterwards, which nothing
    touched meanwhile, then finds its pages in memory: little swap I/O."""
    a = agent_vm
    with GuestShell(a.vm.paths.shell) as sh:
        for path, text in (("/tmp/hold.py", HOLD), ("/tmp/reader.py", READER)):
            code = base64.b64encode(text.encode()).decode()
            sh.run(f"echo {code} | base64 -d > {path}", check=True)
        pids = {}
        for name, mib in (("small", 40), ("big", 80)):  # the oldest is swapped first
            sh.run(f"setsid python3 -S /tmp/hold.py {mib} /tmp/{name}.ready >/dev/null 2>&1 &",
                   check=True)  # fmt: skip
            for _ in range(240):
                pids[name] = sh.run(f"cat /tmp/{name}.ready 2>/dev/null").output.strip()
                if pids[name]:
                    break
                time.sleep(0.5)
        a.set_target(RESERVE)  # what the host will hand back
        a.wait(a.settled(RESERVE // PAGE), 120, "inflate")
        hog = (a.meminfo(sh, "MemAvailable") + 160 * MiB) // MiB  # pushes the buffers to swap
        sh.run(f"python3 -S -c \"b = b'x' * ({hog} << 20)\"; true", timeout=240)
        big0, small0 = _vm_swap(sh, pids["big"]), _vm_swap(sh, pids["small"])
        print(f"swapped: big {big0 / MiB:.0f} MiB, small {small0 / MiB:.0f} MiB")
        assert big0 >= 32 * MiB and small0 >= 16 * MiB, "the allocation did not push both out"
        sh.run(f"setsid python3 -S /tmp/reader.py {pids['small']} 0.2 >/dev/null 2>&1 &",
               check=True)  # fmt: skip
        time.sleep(3)  # two agent scans see the swap-ins
        a.set_target(0)
        a.wait(a.settled(0), 120, "release")
        time.sleep(3)
        sh.run("kill $(ps | grep '[r]eader.py' | awk '{print $1}')")
        before = _pswpin(sh)
        sh.run(f"python3 -S /tmp/reader.py {pids['big']} 0", check=True, timeout=240)
        read = (_pswpin(sh) - before) * PAGE
        print(f"reading the big buffer after the release: {read / MiB:.1f} MiB from the swap "
              f"device, of {big0 / MiB:.0f} MiB it had swapped")  # fmt: skip
        assert read <= big0 // 4
        sh.run(f"kill {pids['big']} {pids['small']}")
    a.set_target(0)
    a.wait(a.settled(0), 120, "deflate")


def _replace_agent_with(sh: GuestShell, program: Path, args: str) -> str:
    # Stop the restart loop /init runs the agent in (the agent's parent), then the agent.
    sh.run(
        "for p in $(pidof python3); do kill -9 $(awk '{print $4}' /proc/$p/stat) $p; done",
        check=True,
    )
    code = base64.b64encode(program.read_bytes()).decode()
    sh.run(f"echo {code} | base64 -d > /tmp/hostile.py", check=True)
    return sh.run(f"python3 -S /tmp/hostile.py {args}", timeout=180, check=True).output


@pytest.mark.timeout(400)
def test_a_hostile_agent_does_no_harm_and_is_reported(agent_vm: AgentVM) -> None:
    a = agent_vm
    a.set_target(64 * MiB)
    a.wait(a.settled(64 * MiB // PAGE), 120, "inflate")
    host0 = a.resident()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with GuestShell(a.vm.paths.shell) as sh:
        out = _replace_agent_with(sh, Path(__file__).with_name("agent_hostile.py"), "8")
    print(out.strip())
    a.wait(lambda: a.session.state is AgentState.LOST, 60, "hostile agent lost")
    # Nothing of the VM was freed by the hostile input (measured before the balloon acts).
    assert a.resident() >= host0 - 4 * MiB
    with a.link.lock:
        a.driver.sync()
        events = [e.detail for e in a.session.events if e.kind == "violation"]
        report = a.session.report()
    codes = {d.split(":")[0] for d in events}
    print(f"{report.violations} violations, codes {sorted(codes)}; lost: {a.session.lost_reason}")
    assert {"range", "json", "limit"} <= codes
    assert report.fallback_to_balloon and a.driver.balloon_bytes == 64 * MiB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0 < 64 * MiB
    assert a.link.running()
    actual = 0
    for _ in range(100):
        actual = a.vm.qmp().cmd("query-balloon")["actual"]
        if actual <= MEMORY - 60 * MiB:
            break
        time.sleep(0.2)
    assert actual <= MEMORY - 60 * MiB  # virtio-balloon took over the reservation


@pytest.mark.timeout(400)
def test_anon_backing_reservation_is_reclaimed_by_ksm(
    vm_factory: Callable[..., VMProcess],
) -> None:
    """Anonymous guest RAM: nothing is punched; the reserved pages are zero and KSM merges
    them. Host memory is QEMU's own pages of guest RAM (pagemap + kpageflags, KSM and zero
    pages excluded), measured over the whole RAM."""
    require_root()
    vm = vm_factory("agentanon", memory=MEMORY, backing=Backing.ANON)
    hva = int(vm.qmp().hmp("gpa2hva 0").split()[-1], 16)
    layout = RamLayout.pc(MEMORY)
    backing = AnonKsmBacking(vm.pid, hva, layout)
    session = AgentSession("agentanon", layout, backing, RealClock())
    link = AgentLink(session, str(vm.paths.agent), lost_retry_s=600.0)
    link.start()
    a = AgentVM(vm, backing, session, link, ReservationDriver(session, QmpBalloon(vm)))
    whole_ram = [(r.first_pfn, r.pages) for r in layout.regions]
    try:
        a.wait(lambda: session.state is AgentState.READY and session.synced, 120, "hello")
        with (
            GuestShell(vm.paths.shell) as sh,
            ksm_knobs(pages_to_scan=5000, sleep_millisecs=10, run=1),
        ):
            # Fill most free guest memory with data KSM cannot merge, then free it: the
            # reservation's frames then hold garbage until the agent zero-fills them.
            prog = "import os; b = os.urandom(300 << 20)"
            sh.run(f'python3 -S -c "{prog}"', timeout=180, check=True)
            time.sleep(2)
            own0 = backing.resident_pages(whole_ram) * PAGE
            a.set_target(RESERVE)
            a.wait(a.settled(RESERVE // PAGE), 120, "inflate")
            took = a.wait(
                lambda: backing.resident_pages(session.held_ranges()) < RESERVE // PAGE // 20,
                180,
                "KSM merges the reserved zero pages",
            )
            own1 = backing.resident_pages(whole_ram) * PAGE
            print(
                f"anon: KSM reclaimed the reservation {took:.1f} s after inflating; QEMU's own "
                f"guest RAM pages {own0 / MiB:.0f} -> {own1 / MiB:.0f} MiB"
            )
            assert own0 - own1 >= 0.8 * RESERVE
            assert session.report().mechanism == "ksm-zero-merge"
            a.set_target(0)
            a.wait(a.settled(0), 120, "deflate")
    finally:
        link.stop()
        backing.close()
