"""The guest agent (C2) wired into the QEMU backend: the primary way to take memory from a guest.

Per running VM: an :class:`~memvisor.agent.host.AgentSession` over the VM's RAM backing (the
VM's file, punched; or QEMU's anonymous RAM, merged by KSM), an
:class:`~memvisor.agent.link.AgentLink` thread on the VM's ``agent.sock`` and a
:class:`~memvisor.agent.host.ReservationDriver` that puts the reservation target on the agent,
or on virtio-balloon while the agent is lost or was never there. Observations say which of
the two holds the memory (``VMObservation.reclaim_path``).

The target is recorded in the VM's ``vm.json``; a re-attaching manager gives it to the fresh
session *before* the link starts, so the agent's re-report is kept, not released.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from memvisor.agent.backing import AnonKsmBacking, FileBacking, RamLayout
from memvisor.agent.host import AgentSession, AgentState, ReservationDriver, observation_fields
from memvisor.agent.link import AgentLink
from memvisor.agent.protocol import WorkloadStatus
from memvisor.errors import BackendError, MemvisorError
from memvisor.model import Backing, VMObservation

if TYPE_CHECKING:
    from memvisor.backends.qemu.host import QemuHost, RunningVM

log = logging.getLogger(__name__)
AGENT = "agent"
BALLOON = "virtio-balloon"


class QmpBalloon:
    """virtio-balloon of one VM through QMP (``balloon`` takes the guest's new size)."""

    def __init__(self, vm: RunningVM) -> None:
        self.vm = vm

    def set_balloon(self, nbytes: int) -> None:
        self.vm.process.qmp().cmd("balloon", value=self.vm.spec.memory - nbytes)
        self.vm.balloon_target = nbytes


@dataclass
class VMAgent:
    session: AgentSession
    link: AgentLink
    driver: ReservationDriver
    backing: FileBacking | AnonKsmBacking
    held_at_probe: int = 0  # bytes the agent held at the previous observation

    def path(self) -> str:
        """Which mechanism holds the target now."""
        return AGENT if self.driver.agent_acting and not self.driver.balloon_bytes else BALLOON

    def close(self) -> None:
        self.link.stop()
        self.backing.close()


def start(host: QemuHost, vm: RunningVM, target: int, balloon_bytes: int) -> VMAgent | None:
    """Session, driver and link for a running VM; ``target`` is the recorded reservation
    target, ``balloon_bytes`` what virtio-balloon holds now. None (balloon only, reported in
    ``host.events``) if the VM's RAM backing cannot be opened."""
    name = vm.spec.name
    layout = RamLayout.pc(vm.spec.memory)
    backing: FileBacking | AnonKsmBacking
    try:
        if vm.spec.backing is Backing.FILE:
            backing = FileBacking(str(vm.process.paths.memory), layout)
        else:
            backing = AnonKsmBacking(vm.process.pid, host.ram_hva(vm), layout)
    except MemvisorError as exc:
        host.events.append(f"{name}: no guest agent ({exc}); virtio-balloon only")
        return None
    session = AgentSession(name, layout, backing, host.clock)
    driver = ReservationDriver(session, QmpBalloon(vm), balloon_bytes)
    if balloon_bytes > 0:
        # The balloon holds memory (a fallback before the restart, or set behind our back):
        # it stays with the balloon, intact and accounted, until the next SetBalloon.
        driver.balloon_only, target = True, balloon_bytes
    # Before the link starts: the agent's re-report must meet the recorded target, not 0.
    driver.target = target
    session.set_target(0 if driver.balloon_only else target)
    link = AgentLink(session, str(vm.process.paths.agent))
    link.start()
    return VMAgent(session, link, driver, backing)


def set_target(agent: VMAgent, nbytes: int, *, balloon_only: bool = False) -> None:
    with agent.link.lock:
        agent.driver.balloon_only = balloon_only
        agent.driver.set_target(nbytes)


def refine(vm: RunningVM, obs: VMObservation) -> VMObservation:
    """The observation with the agent's fields and the path that holds the target (one tick:
    the driver is synced here, so a lost agent hands over to the balloon within a tick)."""
    agent = vm.agent
    if agent is None:
        return replace(obs, reclaim_path=BALLOON)
    with agent.link.lock:
        agent.driver.sync()
        report = agent.session.report()
        path = agent.path()
    guest_free = report.guest_free if report.guest_free is not None else obs.guest_free
    # The working-set probe counts guest pages referenced since the previous observation; the
    # agent writes to every page it takes, so an interval in which it took pages would count
    # them as the workload's (measured on an idle 256 MiB anonymous guest: 0.30 in the interval
    # of a 96 MiB reservation against 0.06-0.09 around it). That sample is dropped.
    took = report.held_present > agent.held_at_probe
    agent.held_at_probe = report.held_present
    if took:
        obs = replace(obs, active_fraction=None)
    if path == BALLOON:
        return replace(obs, guest_free=guest_free, reclaim_path=BALLOON)
    fields = observation_fields(report)
    fields["guest_free"] = guest_free
    return replace(obs, **fields, reclaim_path=AGENT)  # type: ignore[arg-type]


def run_workload_request(
    agent: VMAgent, send: Callable[[AgentSession], int], timeout: float = 60.0
) -> WorkloadStatus:
    """Send a workload request once the agent is up; wait for its ``workload.status``."""
    deadline = time.monotonic() + timeout
    rid: int | None = None
    while time.monotonic() < deadline:
        with agent.link.lock:
            s = agent.session
            if rid is None and s.state in (AgentState.READY, AgentState.DEGRADED) and s.synced:
                rid = send(s)
            elif rid is not None and s.workload_answered(rid) and s.workload is not None:
                if s.workload.re == rid:
                    return s.workload
                raise BackendError(f"agent {s.vm}: workload request {rid} got no answer")
        time.sleep(0.1)
    state = agent.session.state.value
    raise BackendError(f"agent {agent.session.vm}: no workload answer within {timeout:.0f} s "
                       f"(agent {state})")  # fmt: skip
