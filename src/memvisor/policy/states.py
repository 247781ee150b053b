"""Host free-memory states (high / soft / hard / low) with hysteresis.

Thresholds are fractions of host memory (defaults 6% / 4% / 2% / 1%, ESX's values). Falling
free memory enters SOFT below ``soft``, HARD below ``hard`` and LOW below ``low``. Rising free
memory leaves a state only when it reaches the threshold of the state above: LOW -> HARD at
``hard``, HARD -> SOFT at ``soft``, SOFT -> HIGH at ``high``. So each boundary has a band
(4-6%, 2-4%, 1-2%) in which the state does not change, and reclamation, which aims to bring
free memory back to ``high``, does not flip the state on and off around one threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

from memvisor.errors import InputError
from memvisor.model import HostState

ORDER = (HostState.HIGH, HostState.SOFT, HostState.HARD, HostState.LOW)


@dataclass(frozen=True, slots=True)
class StateThresholds:
    high: float = 0.06
    soft: float = 0.04
    hard: float = 0.02
    low: float = 0.01

    def __post_init__(self) -> None:
        if not 1.0 > self.high > self.soft > self.hard > self.low > 0.0:
            raise InputError(
                "free-memory thresholds must satisfy 1 > high > soft > hard > low > 0, got "
                f"high={self.high} soft={self.soft} hard={self.hard} low={self.low}"
            )

    def entry(self, state: HostState) -> float:
        """Free fraction below which ``state`` is entered from above (HIGH: never)."""
        return {
            HostState.HIGH: 1.0,
            HostState.SOFT: self.soft,
            HostState.HARD: self.hard,
            HostState.LOW: self.low,
        }[state]

    def exit_to(self, state: HostState) -> float:
        """Free fraction at or above which ``state`` is reached from below."""
        return {
            HostState.HIGH: self.high,
            HostState.SOFT: self.soft,
            HostState.HARD: self.hard,
            HostState.LOW: 0.0,
        }[state]


def next_state(current: HostState, free_fraction: float, t: StateThresholds) -> HostState:
    """The state after observing ``free_fraction`` while in ``current`` (pure)."""
    rank = ORDER.index(current)
    for lower in reversed(ORDER[rank + 1 :]):  # the lowest state whose entry is crossed
        if free_fraction < t.entry(lower):
            return lower
    for higher in ORDER[:rank]:  # the highest state whose exit level is reached
        if free_fraction >= t.exit_to(higher):
            return higher
    return current


class FreeMemoryStates:
    """The host's state machine; remembers the current state between observations."""

    def __init__(self, thresholds: StateThresholds | None = None) -> None:
        self.thresholds = thresholds or StateThresholds()
        self.state = HostState.HIGH

    def update(self, free: int, total: int) -> tuple[HostState, HostState]:
        """Observe free memory; returns (previous state, new state)."""
        if total <= 0:
            raise InputError(f"host total memory must be positive, got {total}")
        before = self.state
        self.state = next_state(before, free / total, self.thresholds)
        return before, self.state

    def describe(self, free: int, total: int) -> str:
        """E.g. 'SOFT (free 3.1% < 4%)' for decision reasons."""
        frac = free / total
        s = self.state
        if s is HostState.HIGH:
            return f"HIGH (free {frac:.1%})"
        entry = self.thresholds.entry(s)
        if frac < entry:
            return f"{s.name} (free {frac:.1%} < {entry:.0%})"
        up = self.thresholds.exit_to(ORDER[ORDER.index(s) - 1])
        return f"{s.name} (free {frac:.1%}, leaves at {up:.0%})"
