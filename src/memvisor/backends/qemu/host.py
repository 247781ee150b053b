"""The real host backend: QEMU VMs with per-VM swap files, probes and actions.

:class:`QemuHost` implements :class:`memvisor.backends.base.HostBackend`. It keeps one
directory per VM under ``<state>/vms/<name>`` (see :mod:`.vmrecord`, :mod:`.launcher`).
Creating a ``QemuHost`` re-attaches to the VMs its records say are on (QEMU survives the
manager) and cleans up after those that died; :meth:`QemuHost.orphans` reports what no record
owns.

Every measurement comes from the host, never from QEMU's RSS: the residency of the VM's file
(file backing), ``smaps`` of the exact guest RAM mapping (anonymous backing), KSM's per-process
counter, ``/proc/meminfo``. Working set: ``/proc/PID/clear_refs`` then, one observation later,
``Referenced`` of the RAM mapping (this kernel has no page_idle; this is the accessed-bit
method of Gregg's wss, over the whole RAM at no per-page cost; it also ages the pages for the
host's own reclaim, which is what we want for guest RAM).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from memvisor.agent.protocol import WorkloadStatus
from memvisor.backends.base import Clock, RealClock
from memvisor.backends.qemu import accel as accel_mod
from memvisor.backends.qemu import actions, agentwire, hostmem, probes, swapout, vmrecord
from memvisor.backends.qemu.agentwire import VMAgent
from memvisor.backends.qemu.cgroup import MemoryCgroup
from memvisor.backends.qemu.launcher import (
    BALLOON_ID,
    LaunchSpec,
    VMPaths,
    VMProcess,
    pid_runs_vm,
)
from memvisor.backends.qemu.vmrecord import Orphan, VMRecord
from memvisor.errors import BackendError, InputError, NotFoundError
from memvisor.guestimage import GuestImage, build_image
from memvisor.model import (
    Action,
    ActionResult,
    Backing,
    HostObservation,
    PowerState,
    SetBalloon,
    SetKsm,
    SetSwapTarget,
    VMObservation,
    VMSpec,
)
from memvisor.sharing.sampler import Context
from memvisor.units import PAGE_SIZE, MiB, format_size

SHARING_SAMPLES = 1000  # FACTS: within ~2 points of a full scan's shared fraction
# a swap limit under the guest's working set: this much came back from the file in one tick
THRASH_WARN = 16 * MiB
THRASH_WARN_EVERY = 60.0  # seconds between two such events for one VM


@dataclass
class RunningVM:
    """A powered-on VM as the manager holds it."""

    record: VMRecord
    process: VMProcess
    cgroup: MemoryCgroup | None
    ram_hva: int | None = None
    balloon_target: int = 0
    refs_cleared_at: float | None = None
    last_stats: dict[str, Any] = field(default_factory=dict)
    last_stats_time: float | None = None
    agent: VMAgent | None = None
    sharing_ctx: Context | None = None  # memvisor.sharing sampling context, kept per VM
    sharing_hva: int | None = None  # the RAM address it was opened for
    refaults: swapout.RefaultTracker | None = None  # chunks the guest faulted back (swap-out)
    thrash_warned: float | None = None  # when an event said its standing swap limit thrashes

    @property
    def spec(self) -> VMSpec:
        return self.record.spec


class QemuHost:
    """Real VMs on this host. ``pools`` (a :class:`memvisor.pools.PoolTree`) admits power-on."""

    def __init__(
        self,
        state_dir: Path,
        *,
        pools: Any = None,
        image: GuestImage | None = None,
        accel: str | None = None,
        clock: Clock | None = None,
        use_cgroups: bool = True,
        preallocate: bool = True,
    ) -> None:
        self.state_dir = state_dir
        self.pools = pools
        self._image = image
        self._accel_override = accel
        self.clock = clock or RealClock()
        self.use_cgroups = use_cgroups
        self.preallocate = preallocate
        # cgroup names are host-wide: tell apart managers with different state directories
        self._scope = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
        self._records: dict[str, VMRecord] = {}
        self._running: dict[str, RunningVM] = {}
        # what attach found (re-attached, crashed, cleaned) and what holding a VM's limits
        # met later; a daemon takes them with drain_events() at every tick
        self.events: list[str] = []
        # Functions that refine each VM's observation, e.g. with the guest agent's report:
        # ``host.observers.append(lambda o: replace(o, **observation_fields(report_of(o.name))))``
        self.observers: list[Callable[[VMObservation], VMObservation]] = []
        self._attach()
        for orphan in self.orphans():  # found and reported at start
            self.events.append(f"orphan {orphan.kind} {orphan.path} pid={orphan.pid}: "
                               f"{orphan.detail}")  # fmt: skip

    # --- lifecycle ---------------------------------------------------------------------------

    def _attach(self) -> None:
        for record in vmrecord.load_all(self.state_dir):
            self._records[record.spec.name] = record
            if record.power not in (PowerState.ON, PowerState.STARTING, PowerState.STOPPING):
                continue
            paths = VMPaths(vmrecord.vm_dir(self.state_dir, record.spec.name))
            if record.pid is not None and pid_runs_vm(record.pid, paths):
                self._running[record.spec.name] = self._attached(record, paths)
                self.events.append(f"{record.spec.name}: re-attached to QEMU pid {record.pid}")
            else:
                self._mark_crashed(record, "QEMU was gone when the manager started")

    def _attached(self, record: VMRecord, paths: VMPaths) -> RunningVM:
        launch = _launch_spec(record.spec, record.accel)
        proc = VMProcess(launch, paths, record.pid or 0, None)
        cg = None
        if record.cgroup_version and record.cgroup_path:
            cg = MemoryCgroup.existing(record.cgroup_version, Path(record.cgroup_path))
        vm = RunningVM(record, proc, cg)
        with contextlib.suppress(BackendError):
            actual = int(proc.qmp().cmd("query-balloon")["actual"])
            vm.balloon_target = max(0, record.spec.memory - actual)
        vm.agent = agentwire.start(self, vm, record.reclaim_target, vm.balloon_target)
        return vm

    def image(self) -> GuestImage:
        if self._image is None:
            self._image = build_image()
        return self._image

    def power_on(self, spec: VMSpec, *, timeout: float = 180.0) -> VMRecord:
        """Admit, create the swap file and cgroup, start QEMU, wait for the guest. Refusals
        (admission, disk space) leave nothing behind."""
        name = spec.name
        _launch_spec(spec, "tcg").validate()
        if name in self._running:
            raise InputError(f"power-on {name}: already on (pid {self._running[name].process.pid})")
        image = self.image()
        accel = accel_mod.choose(self._accel_override).accel
        self._admit(spec)
        cg: MemoryCgroup | None = None
        proc: VMProcess | None = None
        try:
            if self.use_cgroups:
                hard = spec.memory if spec.backing is Backing.ANON else spec.effective_limit
                cg = MemoryCgroup.create(
                    name, reservation=spec.reservation, limit=hard, scope=self._scope
                )
            vdir = vmrecord.vm_dir(self.state_dir, name)
            launch = _launch_spec(spec, accel, self.preallocate)
            proc = VMProcess.start(launch, vdir, image, cgroup_procs=cg.procs if cg else None)
            record = VMRecord(
                spec, PowerState.STARTING, proc.pid, accel, str(image.kernel), str(image.initrd),
                cg.version if cg else None, str(cg.path) if cg else None, time.time(),
            )  # fmt: skip
            vmrecord.save(self.state_dir, record)
            proc.wait_ready(timeout)
            record = record.with_(power=PowerState.ON)
            vm = RunningVM(record, proc, cg)
            self._start_stats_polling(vm)
            vm.agent = agentwire.start(self, vm, 0, 0)
        except BaseException:
            if proc is not None:
                proc.stop()
            if cg is not None:
                cg.remove()
            self._release(spec)
            if proc is not None:
                self._save(VMRecord(spec, PowerState.OFF, message="power-on failed"))
            raise
        self._running[name] = vm
        self._save(record)
        return record

    def power_off(self, name: str) -> VMRecord:
        vm = self._running.pop(name, None)
        if vm is None:
            raise NotFoundError(f"power-off {name}: no powered-on VM of that name")
        self._save(vm.record.with_(power=PowerState.STOPPING))
        if vm.agent is not None:
            vm.agent.close()
        probes.close_sharing(vm)
        vm.process.stop()
        if vm.cgroup is not None:
            vm.cgroup.remove()
        self._release(vm.spec)
        record = vm.record.with_(power=PowerState.OFF, pid=None, message="powered off")
        self._save(record)
        return record

    def set_reservation(self, name: str, reservation: int) -> VMRecord:
        """Record a new reservation (admission is the caller's): swap-out respects it at once
        and the VM's memory cgroup protects it (v2 memory.min; v1 soft limit)."""
        vm = self.running(name)
        if not 0 <= reservation <= vm.spec.memory:
            raise InputError(f"{name}: reservation must be within 0..memory, got {reservation}")
        spec = replace(vm.spec, reservation=reservation)
        if vm.cgroup is not None:
            hard = spec.memory if spec.backing is Backing.ANON else spec.effective_limit
            vm.cgroup.configure(reservation=reservation, limit=hard)
        vm.record = vm.record.with_(spec=spec)
        self._save(vm.record)
        return vm.record

    def close(self) -> None:
        """Drop QMP connections; VMs keep running (a later QemuHost re-attaches)."""
        for vm in self._running.values():
            if vm.agent is not None:
                vm.agent.close()
                vm.agent = None
            probes.close_sharing(vm)
            vm.process.close_qmp()

    def records(self) -> list[VMRecord]:
        return [self._records[n] for n in sorted(self._records)]

    def running(self, name: str) -> RunningVM:
        self.check_crashes()
        try:
            return self._running[name]
        except KeyError:
            raise NotFoundError(f"VM {name}: not powered on") from None

    def orphans(self) -> list[Orphan]:
        known = {vm.process.pid for vm in self._running.values()}
        return vmrecord.find_orphans(self.state_dir, known)

    def check_crashes(self) -> list[str]:
        """Notice VMs whose QEMU died; clean up their swap file, cgroup and admission."""
        crashed = [n for n, vm in self._running.items() if not vm.process.alive()]
        for name in crashed:
            vm = self._running.pop(name)
            code = vm.process.exit_code()
            if vm.agent is not None:
                vm.agent.close()
            probes.close_sharing(vm)
            vm.process.close_qmp()
            if vm.cgroup is not None:
                vm.cgroup.remove()
            self._mark_crashed(vm.record, f"QEMU exited (code {code})")
        return crashed

    def _mark_crashed(self, record: VMRecord, why: str) -> None:
        paths = VMPaths(vmrecord.vm_dir(self.state_dir, record.spec.name))
        for p in (paths.memory, paths.qmp, paths.qmp_aux, paths.agent, paths.shell, paths.gdb):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if record.cgroup_version and record.cgroup_path:
            cg = MemoryCgroup.existing(record.cgroup_version, Path(record.cgroup_path))
            if cg is not None:
                with contextlib.suppress(OSError):
                    cg.remove()
        self._release(record.spec)
        self._save(record.with_(power=PowerState.CRASHED, pid=None, message=why))
        self.events.append(f"{record.spec.name}: crashed: {why}; swap file removed")

    def record_reclaim_target(self, vm: RunningVM, target: int) -> None:
        """Keep the reservation target in vm.json (a restarted manager gives it back to the
        agent before its link starts)."""
        if vm.record.reclaim_target != target:
            vm.record = vm.record.with_(reclaim_target=target)
            self._save(vm.record)

    def record_swap_limit(self, vm: RunningVM, limit: int | None) -> None:
        """Keep the standing resident limit in vm.json; ``None``: no limit."""
        if vm.record.swap_limit != limit:
            vm.record = vm.record.with_(swap_limit=limit)
            self._save(vm.record)
        if limit is None:
            vm.thrash_warned = None  # a limit set later may be warned about at once

    def drain_events(self) -> list[str]:
        """The events since the last call (all of them at the first), oldest first."""
        out, self.events = self.events, []
        return out

    def _hold_swap_limit(self, vm: RunningVM) -> None:
        """A swap target is a standing limit (model.SetSwapTarget): pages the guest touched
        back in since the last tick are written back to its file again. Enforced once per
        observation, i.e. once per control-loop tick; between ticks the guest may exceed it.
        When more than :data:`THRASH_WARN` came back since the last tick, the limit is under
        the guest's working set (in 2 MiB chunks) and holds only at ticks: said in an event,
        at most once per :data:`THRASH_WARN_EVERY` seconds per VM while it has a limit (the
        scheduler moves a limit a little at a time: one event, not one per new value)."""
        limit = vm.record.swap_limit
        if limit is None:
            return
        resident = hostmem.file_resident_pages(vm.process.paths.memory)
        now = self.clock.now()
        back = actions.refault_tracker(vm, resident).update(resident, now) * PAGE_SIZE
        last = vm.thrash_warned
        if back >= THRASH_WARN and (last is None or now - last >= THRASH_WARN_EVERY):
            vm.thrash_warned = now
            self.events.append(
                f"{vm.spec.name}: {format_size(back)} of its memory came back from its swap file "
                f"since the last tick; the swap limit {format_size(limit)} is under the guest's "
                "working set and holds only at each tick (docs/backends.md)"
            )
        if int(resident.sum()) * PAGE_SIZE > max(limit, vm.spec.reservation) + swapout.LIMIT_SLACK:
            action = SetSwapTarget(vm.spec.name, limit)
            result = actions.set_swap_target(self, vm, action, resident)
            if not result.ok:
                self.events.append(f"{vm.spec.name}: holding the swap limit: {result.message}")

    def _save(self, record: VMRecord) -> None:
        self._records[record.spec.name] = record
        vmrecord.save(self.state_dir, record)

    def _admit(self, spec: VMSpec) -> None:
        if self.pools is None:
            return
        if spec.name not in self.pools:
            self.pools.add_vm(spec.name, spec.pool, spec.memory, spec.reservation, spec.limit)
        self.pools.power_on(spec.name)  # raises AdmissionError, changing nothing

    def _release(self, spec: VMSpec) -> None:
        if self.pools is not None and spec.name in self.pools:
            with contextlib.suppress(InputError):
                self.pools.power_off(spec.name)

    def _start_stats_polling(self, vm: RunningVM) -> None:
        path = f"/machine/peripheral/{BALLOON_ID}"
        vm.process.qmp().cmd("qom-set", path=path, property="guest-stats-polling-interval", value=2)

    # --- HostBackend -------------------------------------------------------------------------

    def specs(self) -> list[VMSpec]:
        return [r.spec for r in self.records()]

    def observe_host(self) -> HostObservation:
        info = hostmem.meminfo()
        return HostObservation(
            time=self.clock.now(),
            total=info.get("MemTotal", 0),
            free=info.get("MemAvailable", info.get("MemFree", 0)),
            ksm=hostmem.ksm_stats(),
        )

    def observe_vms(self) -> list[VMObservation]:
        self.check_crashes()
        out = []
        for name, record in sorted(self._records.items()):
            if name in self._running:
                out.append(self.observe_vm(name))
            else:
                out.append(
                    VMObservation(name, self.clock.now(), record.power, record.spec.memory, 0)
                )
        return out

    def observe_vm(self, name: str, *, sharing: bool = True) -> VMObservation:
        vm = self.running(name)
        self._hold_swap_limit(vm)
        obs = agentwire.refine(vm, probes.observe(self, vm, sharing=sharing))
        for refine in self.observers:
            obs = refine(obs)
        return obs

    def ram_hva(self, vm: RunningVM) -> int:
        """Host-virtual address of guest RAM in QEMU (``gpa2hva 0``), checked against maps."""
        if vm.ram_hva is None:
            text = vm.process.qmp().hmp("gpa2hva 0")
            m = re.search(r"is (0x[0-9a-fA-F]+)", text)
            if m is None:
                raise BackendError(f"VM {vm.spec.name}: gpa2hva 0 answered {text!r}")
            vm.ram_hva = int(m.group(1), 16)
        return vm.ram_hva

    def swap_out_guest(self, name: str, gpa_ranges: list[tuple[int, int]]) -> ActionResult:
        """Swap out chosen guest-physical ranges (address, length) of a file-backed VM to its
        own file; never below its reservation. What the host got back is measured."""
        vm = self.running(name)
        if vm.spec.backing is not Backing.FILE:
            raise InputError(f"{name}: only file-backed VMs have a swap file")
        spans = [s for gpa, n in gpa_ranges for s in swapout.pc_file_spans(gpa, n, vm.spec.memory)]
        return actions.swap_out_ranges(self, vm, spans)

    def start_workload(
        self, name: str, kind: str, size: int, rate: int = 0, pattern: int = 0
    ) -> WorkloadStatus:
        """Start a workload in the guest through its agent (protocol v2; see docs/protocol.md)
        and return the guest's answer (state ``running``, or ``refused`` with the reason)."""
        agent = self._agent(name)
        return agentwire.run_workload_request(
            agent, lambda s: s.start_workload(kind, size, rate, pattern)
        )

    def workload_status(self, name: str) -> WorkloadStatus:
        return agentwire.run_workload_request(self._agent(name), lambda s: s.query_workload())

    def _agent(self, name: str) -> VMAgent:
        agent = self.running(name).agent
        if agent is None:
            raise BackendError(f"VM {name}: no guest agent (see the backend's events)")
        return agent

    def apply(self, action: Action) -> ActionResult:
        if isinstance(action, SetBalloon):
            return actions.set_balloon(self, self.running(action.vm), action)
        if isinstance(action, SetSwapTarget):
            return actions.set_swap_target(self, self.running(action.vm), action)
        if isinstance(action, SetKsm):
            return actions.set_ksm(action)
        raise InputError(f"unknown action {action!r}")


def _launch_spec(spec: VMSpec, accel: str, preallocate: bool = True) -> LaunchSpec:
    return LaunchSpec(
        spec.name, spec.memory, spec.backing, spec.vcpus, accel, preallocate=preallocate
    )
