"""E2E: the QEMU host backend on real guests (TCG): one file-backed and two anonymous VMs.

Balloon an anonymous VM and see host memory drop; swap 64 MiB of chosen guest pages of the
file VM out to its own file with the guest's data intact; KSM merges identical pages of the two
anonymous VMs and the sharing metric sees it. The VMs boot once for the module.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ksmknobs import ksm_knobs
from memvisor.backends.base import HostBackend
from memvisor.backends.qemu import hostmem
from memvisor.backends.qemu.host import QemuHost
from memvisor.backends.qemu.launcher import GuestShell
from memvisor.guestimage import build_image
from memvisor.model import (
    Backing,
    PowerState,
    SetBalloon,
    SetKsm,
    SetSwapTarget,
    VMObservation,
    VMSpec,
)
from memvisor.sharing.sampler import sample_guest_ram
from memvisor.units import PAGE_SIZE, MiB

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
MEMBUF = Path(__file__).parent / "guest" / "membuf.py"


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory, qemu_as_root: None) -> Iterator[QemuHost]:
    image = build_image(extra_files={"/opt/test/membuf.py": MEMBUF})
    h = QemuHost(tmp_path_factory.mktemp("state"), image=image, accel="tcg")
    try:
        h.power_on(VMSpec("filevm", 256 * MiB, reservation=32 * MiB, backing=Backing.FILE))
        h.power_on(VMSpec("anon1", 256 * MiB, backing=Backing.ANON))
        h.power_on(VMSpec("anon2", 256 * MiB, backing=Backing.ANON))
        yield h
    finally:
        for rec in h.records():
            if rec.power is PowerState.ON:
                h.power_off(rec.spec.name)


def shell(host: QemuHost, name: str) -> GuestShell:
    return GuestShell(host.running(name).process.paths.shell)


def start_membuf(host: QemuHost, name: str, mib: int, seed: int) -> dict[str, object]:
    """Run the buffer program in the guest; returns its ranges and checksum once it is up."""
    with shell(host, name) as sh:
        sh.run(f"mkdir -p /tmp/mb && setsid python3 -S /opt/test/membuf.py {mib} {seed} /tmp/mb"
               " >/tmp/mb/log 2>&1 &", check=True)  # fmt: skip
        for _ in range(300):
            out = sh.run("cat /tmp/mb/ranges 2>/dev/null && echo && cat /tmp/mb/sum").output
            if out.strip() and "\n" in out.strip():
                ranges_text, checksum = out.strip().rsplit("\n", 1)
                return {"ranges": json.loads(ranges_text), "sum": checksum.strip()}
            time.sleep(0.5)
        raise AssertionError(sh.run("cat /tmp/mb/log").output)


def guest_checksum(host: QemuHost, name: str) -> str:
    with shell(host, name) as sh:
        sh.run("rm -f /tmp/mb/sum2; touch /tmp/mb/check", check=True)
        for _ in range(300):
            out = sh.run("cat /tmp/mb/sum2 2>/dev/null").output.strip()
            if out:
                return out.split()[0]
            time.sleep(0.5)
    raise AssertionError("the guest never checksummed its buffer again")


@contextmanager
def ksm_set(
    host: QemuHost, run: int, pages_to_scan: int | None = None, sleep_millisecs: int | None = None
) -> Iterator[None]:
    """KSM set for a test through the backend, put back as found afterwards."""
    saved = hostmem.ksm_stats()
    host.apply(SetKsm(run, pages_to_scan, sleep_millisecs))
    try:
        yield
    finally:
        host.apply(SetKsm(saved.run, saved.pages_to_scan, saved.sleep_millisecs))


def cgroup_usage(host: QemuHost, name: str) -> int:
    cg = host.running(name).cgroup
    assert cg is not None, "no memory cgroup"
    return cg.usage()


def test_backend_satisfies_the_protocol_and_observes(host: QemuHost) -> None:
    assert isinstance(host, HostBackend)
    obs = {o.name: o for o in host.observe_vms()}
    assert set(obs) == {"filevm", "anon1", "anon2"}
    for o in obs.values():
        assert o.power is PowerState.ON and 32 * MiB < o.consumed <= 256 * MiB
        assert o.sharing is not None and o.sharing.sampled > 0
    assert host.observe_host().total > 0


def test_balloon_lowers_host_memory(host: QemuHost) -> None:
    """Anonymous RAM with KSM off: the agent's reservation would free nothing, so
    virtio-balloon acts (KSM settings are put back after)."""
    with ksm_set(host, run=0):
        balloon_anon1(host)


def balloon_anon1(host: QemuHost) -> None:
    with shell(host, "anon1") as sh:  # touch guest memory, then free it inside the guest
        sh.run("dd if=/dev/urandom of=/tmp/fill bs=1M count=96 2>/dev/null; rm /tmp/fill",
               check=True, timeout=120)  # fmt: skip
    before = host.observe_vm("anon1", sharing=False).consumed
    usage_before = cgroup_usage(host, "anon1")
    result = host.apply(SetBalloon("anon1", 128 * MiB))
    assert result.ok and result.reclaim_path == "virtio-balloon", result.message
    time.sleep(1)
    after = host.observe_vm("anon1", sharing=False)
    assert after.ballooned >= 120 * MiB
    assert before - after.consumed >= 64 * MiB, result.message
    assert usage_before - cgroup_usage(host, "anon1") >= 64 * MiB, "cgroup charge did not drop"
    assert host.apply(SetBalloon("anon1", 128 * MiB)).achieved < 8 * MiB  # idempotent
    assert host.apply(SetBalloon("anon1", 0)).ok  # deflate: the KSM test needs the memory
    after = host.observe_vm("anon1", sharing=False)
    assert after.ballooned < 4 * MiB and after.reclaim_path == "virtio-balloon"


def test_swap_out_64mib_to_the_vms_own_file(host: QemuHost) -> None:
    buf = start_membuf(host, "filevm", 64, seed=7)
    gpa_ranges = [(int(a), int(n)) for a, n in buf["ranges"]]  # type: ignore[union-attr]
    assert sum(n for _, n in gpa_ranges) == 64 * MiB
    vm = host.running("filevm")
    path = vm.process.paths.memory
    swaps_before = Path("/proc/swaps").read_text()
    other_before = host.observe_vm("anon2", sharing=False).consumed
    usage_before = cgroup_usage(host, "filevm")
    result = host.swap_out_guest("filevm", gpa_ranges)
    print(result.message)
    # The buffer's own pages are judged exactly below. ``achieved`` is the net drop of the
    # whole file's residency: the running guest faults pages in elsewhere meanwhile (a full
    # run under load once freed 59.7 MiB net after evicting 68 MiB of 2 MiB-widened chunks;
    # the message now splits chunk and elsewhere residency), hence the margin.
    assert result.ok and result.achieved >= 48 * MiB, result.message
    assert host.observe_vm("filevm", sharing=False).swapped >= 56 * MiB
    resident = hostmem.file_resident_pages(path)
    written = hostmem.pages_in_extents(hostmem.written_extents(path), len(resident))
    pages = [p for gpa, n in gpa_ranges for p in range(gpa // PAGE_SIZE, (gpa + n) // PAGE_SIZE)]
    still = sum(bool(resident[p]) for p in pages)
    # Page cache folios are 2 MiB, and each 2 MiB chunk of the buffer holds ~8 pages of other
    # guest memory (504 of 512 pages are the buffer's): one touch of those (the buffer program
    # polls for its next command) brings ~2 MiB of buffer pages back with it. 8.3 MiB of them
    # were back once, a fraction of a second after the eviction (docs/backends.md).
    assert still * PAGE_SIZE < 16 * MiB, f"{still} buffer pages still resident"
    assert all(written[p] for p in pages), "buffer pages are not in the VM's file"
    assert usage_before - cgroup_usage(host, "filevm") >= 48 * MiB, "host memory did not drop"
    assert Path("/proc/swaps").read_text() == swaps_before  # no host swap device was used
    assert abs(host.observe_vm("anon2", sharing=False).consumed - other_before) < 16 * MiB
    assert guest_checksum(host, "filevm") == buf["sum"]
    back = hostmem.file_resident_pages(path)
    assert sum(bool(back[p]) for p in pages) * PAGE_SIZE >= 60 * MiB  # faulted back from file


def test_swap_target_never_goes_below_the_reservation(host: QemuHost) -> None:
    result = host.apply(SetSwapTarget("filevm", 0))
    assert result.ok, result.message
    resident = host.observe_vm("filevm", sharing=False).consumed
    assert resident >= 32 * MiB - 2 * MiB, result.message  # guest activity may add, never less
    assert not host.apply(SetSwapTarget("anon2", 0)).ok  # anonymous: no swap file


KPF_KSM = 1 << 21


def ksm_fraction(pid: int, hva: int, gpa_ranges: list[tuple[int, int]]) -> float:
    """Fraction of the guest pages in ``gpa_ranges`` whose host frame is a KSM page."""
    merged = total = 0
    with open(f"/proc/{pid}/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
        for gpa, length in gpa_ranges:
            pm.seek((hva + gpa) // PAGE_SIZE * 8)
            entries = pm.read(length // PAGE_SIZE * 8)
            for i in range(0, len(entries), 8):
                entry = int.from_bytes(entries[i : i + 8], "little")
                total += 1
                if entry >> 63:
                    kf.seek((entry & ((1 << 55) - 1)) * 8)
                    merged += bool(int.from_bytes(kf.read(8), "little") & KPF_KSM)
    return merged / total


def test_ksm_merges_identical_pages_of_two_anonymous_vms(host: QemuHost) -> None:
    """Judged on the buffers' own pages, not on a before/after difference: KSM may already run
    on this host, and the guests' free pages it merged are what the buffers get written into."""
    vms = [host.running(n) for n in ("anon1", "anon2")]
    # Kernel >= 6.7 "smart scan" skips pages whose earlier merge attempts failed (our guests'
    # pages before the buffers were written): scan every page every pass while we measure.
    with ksm_knobs(smart_scan=0):
        ranges = [start_membuf(host, n, 64, seed=42)["ranges"] for n in ("anon1", "anon2")]
        buffers = [[(int(a), int(n)) for a, n in r] for r in ranges]  # type: ignore[union-attr]
        with ksm_set(host, 1, 5000, 10):
            deadline = time.monotonic() + 180  # ksmd shares a loaded host with other VMs
            fractions, last_gain = [0.0, 0.0], time.monotonic()
            while time.monotonic() < deadline:
                now = [ksm_fraction(v.process.pid, host.ram_hva(v), b)
                       for v, b in zip(vms, buffers, strict=True)]  # fmt: skip
                if min(now) > min(fractions) + 0.01:
                    last_gain = time.monotonic()
                fractions = now
                # some host THPs may stay unsplit; stop once merging has settled
                if min(now) >= 0.9 or (min(now) >= 0.15 and time.monotonic() - last_gain > 30):
                    break
                time.sleep(2)
            merged = min(fractions)
            # Random pages identical only across the two VMs: any KSM page in a buffer is a merge
            # of the two. A full run once settled at 0.18 in both VMs (host THPs left unsplit, we
            # think), quiet runs merge >= 0.9; the metric checks below scale with what merged.
            assert merged >= 0.15, f"buffer pages merged by KSM: {fractions}"
            for v in vms:
                # the sharing metric over the whole guest RAM sees at least the merged buffer
                stats = sample_guest_ram(v.process.pid, host.ram_hva(v), v.spec.memory,
                                         samples=4000, seed=1)  # fmt: skip
                buffer_share = merged * 64 * MiB / (stats.resident_pages * PAGE_SIZE)
                assert stats.ksm_fraction >= 0.8 * buffer_share, stats
                assert stats.shared_fraction >= 0.8 * buffer_share, stats
                assert stats.expected_freed_per_page < 1 - 0.4 * buffer_share, stats
            obs = host.observe_vm("anon2")
            assert obs.sharing is not None and obs.shared >= 0.8 * merged * 64 * MiB


HOG = "python3 -S -c \"b = b'x' * (48 << 20); print('hog ok', len(b) >> 20)\""


def test_a_balloon_the_guest_cannot_hold_does_not_kill_it(host: QemuHost) -> None:
    """virtio-balloon at the largest target the backend allows (the guest keeps 64 MiB). This
    guest's kernel, RAM-resident root file system, agent and buffer program do not fit in
    64 MiB: before QEMU's ``deflate-on-oom`` was switched on, the guest's OOM killer killed
    init during the inflation and the kernel panicked. Now the guest takes balloon pages back
    before it kills anything, and a 48 MiB allocation inside it succeeds."""
    # anonymous RAM without KSM: virtio-balloon acts, not the agent
    with ksm_set(host, run=0), _deflated_after(host, "anon2"):
        result = host.apply(SetBalloon("anon2", 256 * MiB))
        print(result.message)
        assert "clamped" in result.message and result.reclaim_path == "virtio-balloon"
        with shell(host, "anon2") as sh:
            out = sh.run(HOG, timeout=240)
        vm = host.running("anon2")
        assert vm.process.alive(), vm.process.console_tail()
        assert out.rc == 0 and "hog ok 48" in out.output, (out, vm.process.console_tail())
        obs = host.observe_vm("anon2", sharing=False)
        print(f"after the allocation: ballooned {obs.ballooned / MiB:.0f} MiB of "
              f"{obs.balloon_target / MiB:.0f} MiB")  # fmt: skip
        assert obs.power is PowerState.ON and obs.ballooned < 192 * MiB


@contextmanager
def _deflated_after(host: QemuHost, name: str) -> Iterator[None]:
    try:
        yield
    finally:
        host.apply(SetBalloon(name, 0))


def wait_path(host: QemuHost, name: str, path: str, timeout: float) -> VMObservation:
    deadline = time.monotonic() + timeout
    obs = host.observe_vm(name, sharing=False)
    while obs.reclaim_path != path and time.monotonic() < deadline:
        time.sleep(1)
        obs = host.observe_vm(name, sharing=False)
    assert obs.reclaim_path == path, f"{name}: reclaimed by {obs.reclaim_path!r}, not {path}"
    return obs


STOP_MEMBUF = (  # the swap test's buffer program: the guest needs its memory back
    "for p in $(pidof python3); do if grep -q membuf /proc/$p/cmdline; then kill $p; fi; done"
)
KILL_AGENT = (  # the agent and the restart loop /init runs it in (its parent)
    "for p in $(pidof python3); do if grep -q memvisor.agent /proc/$p/cmdline; then "
    "kill -9 $(awk '{print $4}' /proc/$p/stat) $p; fi; done"
)


def test_the_agent_reclaims_first_and_the_balloon_takes_over_when_it_dies(
    host: QemuHost,
) -> None:
    """Last in the module: it kills filevm's agent. Host memory is the residency of the VM's
    backing file (mincore), measured here independently of the backend."""
    target = 96 * MiB
    path = host.running("filevm").process.paths.memory
    wait_path(host, "filevm", "agent", 120)
    with shell(host, "filevm") as sh:  # back the guest's free frames on the host first
        sh.run(STOP_MEMBUF, check=True)
        sh.run("dd if=/dev/zero of=/dev/null bs=128M count=1", timeout=120, check=True)
    res0 = int(hostmem.file_resident_pages(path).sum()) * PAGE_SIZE
    result = host.apply(SetBalloon("filevm", target))
    time.sleep(1.5)  # the session measures residency once a second
    res1 = int(hostmem.file_resident_pages(path).sum()) * PAGE_SIZE
    obs = host.observe_vm("filevm", sharing=False)
    print(f"agent: {result.message}; backing file resident {res0 / MiB:.0f} -> "
          f"{res1 / MiB:.0f} MiB; observed ballooned {obs.ballooned / MiB:.0f} MiB, guest "
          f"MemAvailable {(obs.guest_free or 0) / MiB:.0f} MiB")  # fmt: skip
    assert result.ok and result.reclaim_path == "agent", result.message
    assert res0 - res1 >= 0.85 * target and result.achieved >= 0.85 * target
    assert obs.reclaim_path == "agent" and obs.ballooned == target == obs.balloon_target
    assert obs.guest_free is not None and obs.guest_free < 256 * MiB - target
    assert host.running("filevm").record.reclaim_target == target  # in vm.json for a restart
    actual0 = host.running("filevm").process.qmp().cmd("query-balloon")["actual"]
    assert actual0 == 256 * MiB  # the balloon has not acted
    host.close()  # the manager goes away; a new one re-attaches (the fixture still powers off)
    again = QemuHost(host.state_dir, image=host.image(), accel="tcg")
    try:
        check_reattached_agent_keeps_its_reservation(again, target, res1)
        kill_agent_and_see_the_balloon_take_over(again, target)
    finally:
        again.close()


def check_reattached_agent_keeps_its_reservation(host: QemuHost, target: int, res1: int) -> None:
    started = time.monotonic()
    obs = wait_path(host, "filevm", "agent", 120)
    took = time.monotonic() - started
    time.sleep(1.5)
    res2 = int(hostmem.file_resident_pages(host.running("filevm").process.paths.memory).sum())
    print(f"re-attached: the agent re-reported {obs.ballooned / MiB:.0f} MiB in {took:.1f} s; "
          f"backing file resident {res2 * PAGE_SIZE / MiB:.0f} MiB")  # fmt: skip
    assert obs.ballooned == target == obs.balloon_target  # kept, not released to 0
    assert res2 * PAGE_SIZE <= res1 + 16 * MiB


def kill_agent_and_see_the_balloon_take_over(host: QemuHost, target: int) -> None:
    with shell(host, "filevm") as sh:
        sh.run(KILL_AGENT, check=True)
    started = time.monotonic()
    obs = wait_path(host, "filevm", "virtio-balloon", 90)
    took = time.monotonic() - started
    actual = 0
    for _ in range(100):
        actual = host.running("filevm").process.qmp().cmd("query-balloon")["actual"]
        if actual <= 256 * MiB - target + 4 * MiB:
            break
        time.sleep(0.2)
    obs = host.observe_vm("filevm", sharing=False)
    print(f"agent killed: virtio-balloon took over after {took:.1f} s; balloon actual "
          f"{actual / MiB:.0f} MiB, observed ballooned {obs.ballooned / MiB:.0f} MiB")  # fmt: skip
    assert obs.reclaim_path == "virtio-balloon" and obs.ballooned >= target - 4 * MiB
    result = host.apply(SetBalloon("filevm", 0))
    assert result.reclaim_path == "virtio-balloon" and "agent lost" in result.message, result
