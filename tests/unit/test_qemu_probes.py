"""Guest statistics from virtio-balloon are untrusted: bad values are dropped (a fake QMP here;
the real stats are read in tests/e2e/test_qemu_host.py). The sharing probe keeps one sampling
context per VM (real /proc files of a real process: this test process's own buffer stands in
for a VM's guest RAM)."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from memvisor.backends.qemu import probes
from memvisor.model import VMSpec
from memvisor.units import MiB


class FakeQMP:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def cmd(self, name: str, **args: Any) -> Any:
        assert name == "qom-get" and args["property"] == "guest-stats"
        return self.answer


def _vm(answer: Any) -> Any:
    process = SimpleNamespace(qmp=lambda: FakeQMP(answer))
    return SimpleNamespace(spec=VMSpec("v", 256 * MiB), process=process, last_stats={},
                           last_stats_time=None)  # fmt: skip


def test_valid_stats_pass_and_bad_ones_are_dropped() -> None:
    stats = {
        "stat-free-memory": 100 * MiB,
        "stat-available-memory": 10 * 2**40,  # more than the VM has: a lie
        "stat-swap-out": -1,  # QEMU's "not reported"
        "stat-swap-in": True,  # not an int
        "stat-major-faults": "7",  # not an int
        "stat-minor-faults": 12,
    }
    got = probes.guest_stats(_vm({"stats": stats, "last-update": 1}))
    assert got == {"stat-free-memory": 100 * MiB, "stat-minor-faults": 12}


def test_malformed_answers_give_nothing() -> None:
    for answer in (None, [], {"stats": "x"}, {"nostats": {}}):
        assert probes.guest_stats(_vm(answer)) == {}


def test_swap_out_rate_from_consecutive_stats() -> None:
    vm = _vm({})
    assert probes._swap_out_rate(vm, {"stat-swap-out": 0}, 10.0) == 0.0
    rate = probes._swap_out_rate(vm, {"stat-swap-out": 4096 * 100}, 12.0)
    assert rate == 50.0


def fake_vm(pid: int, memory: int) -> Any:
    return SimpleNamespace(
        process=SimpleNamespace(pid=pid),
        spec=SimpleNamespace(memory=memory),
        sharing_ctx=None,
        sharing_hva=None,
    )


@pytest.fixture
def buffer() -> Any:
    if not os.access("/proc/kpagecount", os.R_OK):
        pytest.skip("needs root: /proc/kpagecount unreadable")
    buf = mmap.mmap(-1, 4 * MiB)
    buf.write(b"x" * (4 * MiB))
    yield buf
    buf.close()


def address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def test_the_context_is_opened_once_and_reopened_when_the_address_changes(buffer: Any) -> None:
    vm = fake_vm(os.getpid(), 2 * MiB)
    hva = address(buffer)
    first = probes._sharing(vm, hva)
    ctx = vm.sharing_ctx
    assert first is not None and first.sampled > 0 and ctx is not None
    assert probes._sharing(vm, hva) is not None and vm.sharing_ctx is ctx  # kept
    assert probes._sharing(vm, hva + 2 * MiB) is not None
    assert vm.sharing_ctx is not ctx and vm.sharing_hva == hva + 2 * MiB  # reopened
    probes.close_sharing(vm)
    assert vm.sharing_ctx is None and vm.sharing_hva is None


def test_a_context_whose_process_exited_is_dropped(buffer: Any) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        maps = Path(f"/proc/{child.pid}/maps").read_text().splitlines()
        start, end = (int(x, 16) for x in maps[0].split()[0].split("-"))
        vm = fake_vm(child.pid, end - start)
        assert probes._sharing(vm, start) is not None and vm.sharing_ctx is not None
    finally:
        child.kill()
        child.wait()
    assert probes._sharing(vm, start) is None  # gone: not another process's pages
    assert vm.sharing_ctx is None
