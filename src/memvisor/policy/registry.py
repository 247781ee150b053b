"""Policies by name: ``get_policy("memvisor", tax=0.5)``, ``get_policy("mom")``, ...

Settings are keyword arguments named like the fields of each policy's settings dataclass;
an unknown name or a bad value is an :class:`~memvisor.errors.InputError` naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from memvisor.errors import InputError
from memvisor.policy.base import Policy
from memvisor.policy.baselines import (
    MomPolicy,
    MomSettings,
    NoPolicy,
    ProxmoxPolicy,
    ProxmoxSettings,
)
from memvisor.policy.scheduler import MemvisorScheduler, SchedulerSettings


def _settings(cls: type[Any], name: str, given: dict[str, Any]) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise InputError(
            f"policy {name!r}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(fields))}"
        )
    try:
        return cls(**given)
    except TypeError as e:
        raise InputError(f"policy {name!r}: {e}") from e


def _memvisor(**kw: Any) -> Policy:
    return MemvisorScheduler(_settings(SchedulerSettings, "memvisor", kw))


def _mom(**kw: Any) -> Policy:
    return MomPolicy(_settings(MomSettings, "mom", kw))


def _proxmox(**kw: Any) -> Policy:
    return ProxmoxPolicy(_settings(ProxmoxSettings, "proxmox", kw))


def _none(**kw: Any) -> Policy:
    if kw:
        raise InputError(f"policy 'none' takes no settings, got {', '.join(sorted(kw))}")
    return NoPolicy()


POLICIES: dict[str, Callable[..., Policy]] = {
    "memvisor": _memvisor,
    "mom": _mom,
    "proxmox": _proxmox,
    "none": _none,
}


def get_policy(name: str, **settings: Any) -> Policy:
    """A fresh policy object (each keeps its own controller state)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise InputError(
            f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}"
        ) from None
    return factory(**settings)
