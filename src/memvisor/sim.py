"""The simulator's public face: ``from memvisor.sim import load_scenario, simulate``.

A scenario file describes a host, its pools, VMs with workloads, a policy, a duration and a
tick (``docs/simulator.md``); :func:`simulate` runs it with the same policies that drive real
QEMU hosts and returns a :class:`SimResult` of time series. :class:`SimHost` is the simulated
:class:`~memvisor.backends.base.HostBackend` itself, for driving by hand or by the daemon.
"""

from memvisor.backends.sim.config import (
    GuestConfig,
    Phase,
    SimHostConfig,
    SimVMConfig,
    Workload,
)
from memvisor.backends.sim.host import SimHost
from memvisor.backends.sim.run import NoManagement, SimResult, policy_for, simulate
from memvisor.backends.sim.scenario import Scenario, load_scenario, parse_scenario

__all__ = [
    "GuestConfig",
    "NoManagement",
    "Phase",
    "Scenario",
    "SimHost",
    "SimHostConfig",
    "SimResult",
    "SimVMConfig",
    "Workload",
    "load_scenario",
    "parse_scenario",
    "policy_for",
    "simulate",
]
