"""Which mechanism the QEMU backend reports as holding a VM's reclaimed memory: the agent while
it is up and resynced, virtio-balloon otherwise (a real session; the QMP balloon and the link
are stand-ins here, the real ones run in tests/e2e/test_qemu_host.py)."""

from __future__ import annotations

import threading
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from tests.unit.test_agent_host import RecordingBacking, line, reserve, sent

from memvisor.agent import protocol as p
from memvisor.agent.backing import RamLayout
from memvisor.agent.host import AgentSession, ReservationDriver
from memvisor.backends.base import ManualClock
from memvisor.backends.qemu import agentwire
from memvisor.model import PowerState, VMObservation
from memvisor.units import MiB

RAM = 256 * MiB


class Balloon:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def set_balloon(self, nbytes: int) -> None:
        self.calls.append(nbytes)


def wired() -> tuple[Any, AgentSession, ManualClock, Balloon]:
    clock = ManualClock(100.0)
    s = AgentSession("vm1", RamLayout.pc(RAM), RecordingBacking(512), clock)
    balloon = Balloon()
    agent = agentwire.VMAgent(
        s,
        SimpleNamespace(lock=threading.RLock()),
        ReservationDriver(s, balloon),
        None,  # type: ignore[arg-type]
    )
    return SimpleNamespace(agent=agent), s, clock, balloon


def obs() -> VMObservation:
    return VMObservation("vm1", 0.0, PowerState.ON, RAM, 200 * MiB, guest_free=5 * MiB)


def test_no_agent_means_the_balloon() -> None:
    assert agentwire.refine(SimpleNamespace(agent=None), obs()).reclaim_path == "virtio-balloon"  # type: ignore[arg-type]


def test_the_agent_acts_once_resynced_and_the_balloon_takes_over_when_it_is_lost() -> None:
    vm, s, clock, balloon = wired()
    agentwire.set_target(vm.agent, 4 * MiB)
    assert agentwire.refine(vm, obs()).reclaim_path == "virtio-balloon"  # still connecting
    s.connected()
    s.receive(line(p.Hello((1, 2), "t", 4096, "i", 0)))
    s.receive(line(p.Pages(None, "resync", (), (), reset=True)))
    o = agentwire.refine(vm, obs())
    assert o.reclaim_path == "agent" and o.balloon_target == 4 * MiB and o.ballooned == 0
    assert o.guest_free == 5 * MiB  # the agent has sent no stats yet: the balloon's figure
    clock.advance(31)
    s.tick()
    o = agentwire.refine(vm, obs())
    assert o.reclaim_path == "virtio-balloon" and balloon.calls == [4 * MiB]


def test_balloon_only_keeps_the_balloon_with_a_healthy_agent() -> None:
    vm, s, _, balloon = wired()
    s.connected()
    s.receive(line(p.Hello((1, 2), "t", 4096, "i", 0)))
    s.receive(line(p.Pages(None, "resync", (), (), reset=True)))
    agentwire.set_target(vm.agent, 4 * MiB, balloon_only=True)
    assert balloon.calls == [4 * MiB] and s.target_pages == 0
    assert agentwire.refine(vm, obs()).reclaim_path == "virtio-balloon"
    agentwire.set_target(vm.agent, 4 * MiB)  # KSM back on: the agent takes over
    assert balloon.calls == [4 * MiB, 0] and s.target_pages == 1024


def test_a_working_set_sample_taken_while_the_agent_reserved_pages_is_dropped() -> None:
    """The agent writes to the pages it takes; the probe would count them as the workload's."""
    vm, s, _, _ = wired()
    s.connected()
    s.receive(line(p.Hello((1, 2), "t", 4096, "i", 0)))
    s.receive(line(p.Pages(None, "resync", (), (), reset=True)))
    sent(s)
    busy = replace(obs(), active_fraction=0.3)
    assert agentwire.refine(vm, busy).active_fraction == 0.3  # nothing taken yet
    agentwire.set_target(vm.agent, 4 * MiB)
    reserve(s, ((512, 512), (4096, 512)))
    o = agentwire.refine(vm, busy)
    assert o.ballooned == 4 * MiB and o.active_fraction is None  # this interval's sample
    assert agentwire.refine(vm, busy).active_fraction == 0.3  # the next one counts again
