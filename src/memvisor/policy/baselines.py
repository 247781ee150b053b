"""Baseline policies from their published algorithms, for comparison in the same runs.

- ``mom``: oVirt MOM's default balloon rules (``doc/balloon.rules``). Host free < 20% of host
  memory: shrink every guest by at most 5% of its current size, but not below what it uses plus
  a free margin that scales with host pressure (20% x host_free / 20%; below 5% host free the
  margin turns negative, forcing the guest to swap). Otherwise grow every ballooned guest by 5%
  (at least to used + 20% of its maximum). Changes under 0.25% of the current size are
  skipped. Statistics are averages over the last 10 samples (MOM's ``StatAvg``).
- ``proxmox``: Proxmox VE's autoballoon (``PVE::AutoBalloon::compute_alg1`` called by
  ``pvestatd`` every 10 s): aim at 80% host memory use; the difference is distributed over the
  VMs by shares above each VM's minimum memory, at most 100 MiB per VM per round; requests
  within +-10 MiB are ignored. Shrinking asks VMs with enough free memory first, growing asks
  VMs under memory pressure first.
- ``none``: no management; the host kernel alone.

Sizes follow the originals: they speak of a guest's current memory ``balloon_cur`` (what it
may use), which here is ``memory - balloon target``. Both baselines keep a VM's reservation:
its guaranteed memory in oVirt, its minimum memory in Proxmox.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from memvisor.model import Decision, SetBalloon, Snapshot, VMObservation, VMSpec
from memvisor.policy.base import mib, running
from memvisor.units import MiB


class NoPolicy:
    """The host kernel alone: never decides anything."""

    name = "none"

    def plan(self, snapshot: Snapshot) -> list[Decision]:
        return []


# --- oVirt MOM -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MomSettings:
    pressure_threshold: float = 0.20
    pressure_critical: float = 0.05
    min_guest_free_percent: float = 0.20
    max_balloon_change_percent: float = 0.05
    min_balloon_change_percent: float = 0.0025
    history: int = 10  # samples averaged by StatAvg


class MomPolicy:
    """oVirt MOM's default auto-balloon rules."""

    name = "mom"

    def __init__(self, settings: MomSettings | None = None) -> None:
        self.settings = settings or MomSettings()
        self._host_free: deque[float] = deque(maxlen=self.settings.history)
        self._cur: dict[str, deque[float]] = {}
        self._unused: dict[str, deque[float]] = {}

    def _avg(self, table: dict[str, deque[float]], vm: str, value: float) -> float:
        d = table.setdefault(vm, deque(maxlen=self.settings.history))
        d.append(value)
        return sum(d) / len(d)

    def plan(self, snapshot: Snapshot) -> list[Decision]:
        host = snapshot.host
        self._host_free.append(host.free / host.total)
        host_free = sum(self._host_free) / len(self._host_free)
        out = []
        for spec, obs in running(snapshot):
            if obs.guest_free is None:
                continue  # MOM needs the guest's memory statistics
            cur = spec.memory - obs.balloon_target
            used = self._avg(self._cur, spec.name, cur) - self._avg(
                self._unused, spec.name, obs.guest_free
            )
            if host_free < self.settings.pressure_threshold:
                new, why = self._shrink(spec, cur, used, host_free)
            else:
                new, why = self._grow(spec, cur, used)
            if new is not None:
                target = spec.memory - int(max(new, spec.reservation))
                if target != obs.balloon_target:
                    text = (
                        f"{spec.name}: mom: host free {host_free:.1%} (average), {why}: guest "
                        f"memory {mib(cur)}→{mib(spec.memory - target)} MiB"
                    )
                    out.append(Decision(SetBalloon(spec.name, max(target, 0)), text))
        return out

    def _big_enough(self, cur: float, new: float) -> bool:
        return abs(new - cur) > self.settings.min_balloon_change_percent * cur

    def _shrink(
        self, spec: VMSpec, cur: float, used: float, host_free: float
    ) -> tuple[float | None, str]:
        s = self.settings
        if host_free <= s.pressure_critical:
            guest_free_percent = -0.05 + host_free
        else:
            guest_free_percent = s.min_guest_free_percent * host_free / s.pressure_threshold
        floor = used + guest_free_percent * cur
        new = max(cur * (1 - s.max_balloon_change_percent), floor)
        if new <= cur and self._big_enough(cur, new):
            return new, f"< {s.pressure_threshold:.0%}: shrink (floor {mib(floor)} MiB)"
        return None, ""

    def _grow(self, spec: VMSpec, cur: float, used: float) -> tuple[float | None, str]:
        s = self.settings
        top = float(spec.memory)
        if cur >= top:
            return None, ""
        new = min(cur * (1 + s.max_balloon_change_percent), top)
        new = max(new, used + s.min_guest_free_percent * top)
        if self._big_enough(cur, new):
            return min(new, top), f">= {s.pressure_threshold:.0%}: grow"
        return None, ""


# --- Proxmox VE autoballoon ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxmoxSettings:
    target_use: float = 0.80
    max_change: int = 100 * MiB  # per VM per round
    dead_band: int = 10 * MiB
    interval: float = 10.0  # seconds between rounds (pvestatd)
    default_shares: int = 1000
    min_memory_fraction: float = 0.25  # a VM's minimum memory when its reservation is lower


@dataclass
class _PveVM:
    name: str
    balloon: int  # current guest memory
    balloon_min: int
    maxmem: int
    shares: int
    freemem: int | None


class ProxmoxPolicy:
    """Proxmox VE's autoballoon (compute_alg1), run every ``interval`` seconds."""

    name = "proxmox"

    def __init__(self, settings: ProxmoxSettings | None = None) -> None:
        self.settings = settings or ProxmoxSettings()
        self._last: float | None = None

    def plan(self, snapshot: Snapshot) -> list[Decision]:
        s = self.settings
        now = snapshot.host.time
        if self._last is not None and now - self._last < s.interval:
            return []
        self._last = now
        host = snapshot.host
        used = host.total - host.free
        goal = int(host.total * s.target_use - used)
        vms = [self._status(spec, obs) for spec, obs in running(snapshot)]
        res = compute_alg1(vms, goal, s.max_change, s.dead_band)
        out = []
        for vm in vms:
            if vm.name in res and res[vm.name] != vm.balloon:
                new = res[vm.name]
                text = (
                    f"{vm.name}: proxmox: host use {used / host.total:.1%}, target "
                    f"{s.target_use:.0%} (goal {goal / MiB:+.0f} MiB): guest memory "
                    f"{mib(vm.balloon)}→{mib(new)} MiB by shares {vm.shares}"
                )
                out.append(Decision(SetBalloon(vm.name, vm.maxmem - new), text))
        return out

    def _status(self, spec: VMSpec, obs: VMObservation) -> _PveVM:
        floor = max(spec.reservation, int(self.settings.min_memory_fraction * spec.memory))
        return _PveVM(
            name=spec.name,
            balloon=spec.memory - obs.balloon_target,
            balloon_min=min(floor, spec.memory),
            maxmem=spec.memory,
            shares=spec.effective_shares or self.settings.default_shares,
            freemem=obs.guest_free,
        )


def compute_alg1(
    vms: Sequence[_PveVM], goal: int, max_change: int, dead_band: int
) -> dict[str, int]:
    """New guest memory sizes (only for VMs that change), following compute_alg1."""
    res: dict[str, int] = {}
    pressured = [
        v
        for v in vms
        if not (v.freemem and v.freemem > v.balloon_min * 0.25 and v.balloon >= v.balloon_min)
    ]
    roomy = [v for v in vms if v not in pressured]
    if goal > dead_band:
        rest = _change(res, pressured, goal, max_change)  # VMs under pressure first
        if rest >= goal:
            _change(res, list(vms), rest, max_change)
    elif goal < -dead_band:
        rest = _change(res, roomy, goal, max_change)  # VMs with free memory first
        if rest <= goal:
            _change(res, list(vms), rest, max_change)
    return res


def _change(res: dict[str, int], idlist: Sequence[_PveVM], amount: int, max_change: int) -> int:
    """Distribute ``amount`` bytes by shares above each VM's floor; returns what is left."""
    rest, repeat, progress = amount, True, 1
    done: set[str] = set()
    while rest and repeat and progress:
        repeat, progress = False, 0
        todo = [v for v in idlist if v.name not in done]
        alloc_old = sum(res.get(v.name, v.balloon) - v.balloon_min for v in todo)
        shares_total = sum(v.shares for v in todo)
        if shares_total == 0:
            break
        alloc_new = alloc_old + rest
        changes = 0
        for v in todo:
            desired = v.balloon_min + int(alloc_new / shares_total * v.shares)
            if desired > v.maxmem or desired < v.balloon_min:
                desired = min(max(desired, v.balloon_min), v.maxmem)
                repeat = True
            if amount > 0 and desired > v.balloon:
                new = min(v.balloon + max_change, desired)
            elif desired < v.balloon:
                new = max(v.balloon - max_change, desired)
            else:
                done.add(v.name)
                continue
            old = res.get(v.name, v.balloon)
            res[v.name] = new
            if new != old:
                changes += new - old
                progress += abs(new - v.balloon)
                repeat = True
        rest -= changes
    return rest
