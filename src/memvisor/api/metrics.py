"""Prometheus text exposition of the daemon's latest figures.

Names follow Prometheus conventions: a ``memvisor_`` prefix, base units in the name
(``_bytes``, ``_seconds``, ``_ratio``), ``_total`` for counters, one ``vm`` label per VM. The
host's free-memory state is a set of 0/1 gauges ``memvisor_host_state{state=...}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

HOST_STATES = ("high", "soft", "hard", "low")

VM_GAUGES: tuple[tuple[str, str, str], ...] = (
    # (metric suffix, row column, help)
    ("memory_bytes", "memory", "Configured guest RAM."),
    ("consumed_bytes", "consumed", "Host memory used by guest RAM (resident, shared included)."),
    ("shared_bytes", "shared", "Of consumed, bytes in frames shared with other mappings."),
    ("swapped_bytes", "swapped", "Guest RAM written to the VM's own swap file and evicted."),
    ("ballooned_bytes", "ballooned", "Guest memory lent back by balloon or reservation program."),
    ("balloon_target_bytes", "balloon_target", "Bytes the balloon is asked to hold."),
    ("reservation_bytes", "reservation", "Memory reserved for the VM (never reclaimed)."),
    ("limit_bytes", "limit_bytes", "Upper bound of the VM's host memory."),
    ("shares", "shares", "The VM's memory shares."),
    ("entitlement_bytes", "entitlement", "Memory the scheduler entitles the VM to."),
    ("active_ratio", "active_fraction", "Estimated active fraction of guest memory."),
    ("guest_free_bytes", "guest_free", "Free memory as the guest reports it."),
)

COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("loop_ticks_total", "ticks", "Control-loop ticks recorded."),
    ("decisions_total", "decisions", "Scheduler decisions recorded."),
    ("events_total", "events", "VM lifecycle and daemon events recorded."),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self, name: str, kind: str, help_: str, samples: Iterable[tuple[Mapping[str, str], float]]
    ) -> None:
        full = f"memvisor_{name}"
        self.lines.append(f"# HELP {full} {help_}")
        self.lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            self.lines.append(f"{full}{_labels(labels)} {_number(value)}")


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def render(
    host: Mapping[str, Any] | None,
    vms: Sequence[Mapping[str, Any]],
    counters: Mapping[str, int],
    hit_counts: Mapping[tuple[str, str], int],
) -> str:
    """The whole /metrics page."""
    w = _Writer()
    if host is not None:
        w.family(
            "host_total_bytes", "gauge", "Host memory available to VMs.", [({}, host["total"])]
        )
        w.family("host_free_bytes", "gauge", "Free host memory.", [({}, host["free"])])
        state = host.get("state")
        if state:
            w.family(
                "host_state", "gauge", "Free-memory state of the host (1 for the current one).",
                [({"state": s}, 1 if s == state else 0) for s in HOST_STATES],
            )  # fmt: skip
        w.family(
            "ksm_pages_sharing", "gauge", "KSM: pages sharing.", [({}, host["ksm_pages_sharing"])]
        )
        w.family(
            "ksm_pages_shared", "gauge", "KSM: pages shared.", [({}, host["ksm_pages_shared"])]
        )
        if host.get("duration") is not None:
            w.family("loop_tick_duration_seconds", "gauge", "Duration of the latest tick.",
                     [({}, host["duration"])])  # fmt: skip
    w.family("vm_up", "gauge", "1 if the VM is powered on.",
             [({"vm": v["vm"]}, 1 if v["power"] == "on" else 0) for v in vms])  # fmt: skip
    for suffix, column, help_ in VM_GAUGES:
        samples = [({"vm": v["vm"]}, v[column]) for v in vms if v.get(column) is not None]
        if samples:
            w.family(f"vm_{suffix}", "gauge", help_, samples)
    for name, key, help_ in COUNTERS:
        w.family(name, "counter", help_, [({}, counters.get(key, 0))])
    w.family("actions_total", "counter", "Actions applied, by outcome.", [
        ({"result": "ok"}, counters.get("actions_ok", 0)),
        ({"result": "failed"}, counters.get("actions_failed", 0)),
    ])  # fmt: skip
    w.family("introspection_hits_total", "counter", "Monitored guest code executions.",
             [({}, counters.get("hits", 0))])  # fmt: skip
    retained = [({"vm": vm, "symbol": sym}, n) for (vm, sym), n in sorted(hit_counts.items())]
    w.family("introspection_hits_retained", "gauge", "Hits kept in the record, by code.", retained)
    return "\n".join(w.lines) + "\n"
