"""Hand-made snapshots for the policy unit tests (tests/unit/test_policy_*.py)."""

from __future__ import annotations

from memvisor.model import (
    Backing,
    HostObservation,
    PowerState,
    SharingSample,
    Snapshot,
    VMObservation,
    VMSpec,
)
from memvisor.units import MiB


def vm(
    name: str,
    memory: int = 1024 * MiB,
    consumed: int | None = None,
    *,
    reservation: int = 0,
    shares: int = 0,
    limit: int | None = None,
    pool: str = "root",
    balloon: int = 0,
    guest_free: int | None = 512 * MiB,
    active: float | None = 1.0,
    freed_per_page: float | None = None,
    shared: int = 0,
    reserved_rate: float = 0.0,
    guest_paging: float = 0.0,
    time: float = 0.0,
    backing: Backing = Backing.FILE,
) -> tuple[VMSpec, VMObservation]:
    spec = VMSpec(
        name,
        memory,
        reservation=reservation,
        limit=limit,
        shares=shares,
        pool=pool,
        backing=backing,
    )
    sample = None
    if freed_per_page is not None:
        sample = SharingSample(
            sampled=1000,
            present=1000,
            swapped=0,
            mean_harmonic=1 / freed_per_page,
            expected_freed_per_page=freed_per_page,
            shared_fraction=1 - freed_per_page,
        )
    obs = VMObservation(
        name=name,
        time=time,
        power=PowerState.ON,
        memory=memory,
        consumed=memory - balloon if consumed is None else consumed,
        shared=shared,
        ballooned=balloon,
        balloon_target=balloon,
        guest_free=guest_free,
        reserved_paged_out_rate=reserved_rate,
        guest_swapped_out_rate=guest_paging,
        active_fraction=active,
        sharing=sample,
    )
    return spec, obs


def snapshot(
    vms: list[tuple[VMSpec, VMObservation]], total: int, free: int, time: float = 0.0
) -> Snapshot:
    return Snapshot(
        host=HostObservation(time=time, total=total, free=free),
        specs=tuple(s for s, _ in vms),
        vms=tuple(o for _, o in vms),
    )
