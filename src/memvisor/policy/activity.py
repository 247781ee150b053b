"""Active-memory estimates: sampled working-set fractions smoothed by two moving averages.

Each VM's sampled active fraction feeds a fast exponentially weighted moving average and a
slow one that holds peaks: it rises at once to a higher sample and decays toward lower ones
with a long half-life (600 s). The estimate is the larger of the two. When a VM's working set
grows the estimate follows at the next sample; when it shrinks the slow average still
remembers the larger set, so memory is taken away from a VM only after it has stayed idle for
many minutes (respond fast to growth, slowly to decay — the rule ESX uses for its idle memory
tax). Holding the peak rather than averaging matters for periodic load: a plain slow average of
a VM busy half of the time settles at half its working set, and the VM's working set would be
reclaimed in every pause and faulted back when it resumes.

Time comes only from the observations: weights depend on the seconds between two samples, so
the estimate does not depend on how often the policy runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from memvisor.errors import InputError


@dataclass(frozen=True, slots=True)
class ActivitySettings:
    fast_half_life: float = 2.0  # seconds for the fast average to forget half of the past
    slow_half_life: float = 600.0  # a VM idle for ten minutes keeps ~half its protection
    unknown: float = 1.0  # assumed active fraction before any sample (1: no idle tax)

    def __post_init__(self) -> None:
        if not 0 < self.fast_half_life <= self.slow_half_life:
            raise InputError(
                "activity: need 0 < fast_half_life <= slow_half_life, got "
                f"{self.fast_half_life} and {self.slow_half_life}"
            )
        if not 0.0 <= self.unknown <= 1.0:
            raise InputError(f"activity.unknown must be in [0, 1], got {self.unknown}")


@dataclass(slots=True)
class _Averages:
    time: float
    fast: float
    slow: float


def ewma_weight(dt: float, half_life: float) -> float:
    """Weight of a new sample that arrives ``dt`` seconds after the previous one."""
    return float(1.0 - 0.5 ** (max(dt, 0.0) / half_life))


class ActivityEstimator:
    """Per-VM fast/slow moving averages of the sampled active fraction."""

    def __init__(self, settings: ActivitySettings | None = None) -> None:
        self.settings = settings or ActivitySettings()
        self._avg: dict[str, _Averages] = {}

    def update(self, vm: str, time: float, sample: float | None) -> float:
        """Feed one sample (None: no sample this time) and return the current estimate."""
        if sample is not None:
            sample = min(max(float(sample), 0.0), 1.0)  # the guest-side estimate is untrusted
            avg = self._avg.get(vm)
            if avg is None:
                self._avg[vm] = _Averages(time, sample, sample)
            elif time > avg.time:
                dt = time - avg.time
                s = self.settings
                avg.fast += ewma_weight(dt, s.fast_half_life) * (sample - avg.fast)
                if sample > avg.slow:  # the slow average holds peaks: it rises at once
                    avg.slow = sample
                else:  # and forgets them with the slow half-life
                    avg.slow += ewma_weight(dt, s.slow_half_life) * (sample - avg.slow)
                avg.time = time
        return self.estimate(vm)

    def estimate(self, vm: str) -> float:
        avg = self._avg.get(vm)
        return self.settings.unknown if avg is None else max(avg.fast, avg.slow)

    def recent(self, vm: str) -> float:
        """The fast average alone: how active the VM is right now. The scheduler does not use
        it: :meth:`estimate`, which forgets activity slowly, answers both the idle tax and
        "will a page reclaimed now be touched again soon?"."""
        avg = self._avg.get(vm)
        return self.settings.unknown if avg is None else avg.fast

    def forget(self, vm: str) -> None:
        self._avg.pop(vm, None)

    def retain(self, vms: set[str]) -> None:
        """Forget every VM not in ``vms``."""
        for vm in self._avg.keys() - vms:
            del self._avg[vm]

    def export(self) -> dict[str, tuple[float, float, float]]:
        """Each VM's averages as (time of the last sample, fast, slow): what a restarted
        manager needs to go on where this one stopped (see :meth:`restore`)."""
        return {vm: (a.time, a.fast, a.slow) for vm, a in self._avg.items()}

    def restore(self, saved: dict[str, tuple[float, float, float]]) -> list[str]:
        """Take up averages saved by :meth:`export`, on the same clock: the next sample decays
        them by the time that has passed since, as if the manager had never stopped. Values
        outside 0..1 or times that are not finite are refused (the VMs named in the returned
        list); VMs this estimator already has samples for keep their own."""
        refused = []
        for vm, (time, fast, slow) in saved.items():
            if not (math.isfinite(time) and 0.0 <= fast <= 1.0 and 0.0 <= slow <= 1.0):
                refused.append(vm)
                continue
            self._avg.setdefault(vm, _Averages(time, fast, slow))
        return refused
