"""Guest statistics from virtio-balloon are untrusted: bad values are dropped (a fake QMP here;
the real stats are read in tests/e2e/test_qemu_host.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

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
