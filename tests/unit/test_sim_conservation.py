"""Conservation: every tick, frames used <= host frames and every page is in exactly one state,
whatever the policy does (here: random balloon, swap and KSM actions)."""

from __future__ import annotations

import numpy as np
import pytest
from simhelpers import host, vm, workload

from memvisor.backends.sim.pages import PRIVATE, UNTOUCHED
from memvisor.model import SetBalloon, SetKsm, SetSwapTarget
from memvisor.units import MiB


def overcommitted(seed: int = 0):
    wl = workload(common=0.4, zero=0.1, skew=0.9, page_cache=8 * MiB)
    vms = [vm(f"v{i}", wl, reservation=(16 * MiB if i == 0 else 0)) for i in range(4)]
    return host(300 * MiB, vms, seed=seed)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_invariants_hold_every_tick_under_random_actions(seed: int) -> None:
    h = overcommitted(seed)
    rng = np.random.default_rng(seed)
    assert h.check() == []
    for _ in range(40):
        for spec in h.specs():
            r = rng.random()
            if r < 0.3:
                h.apply(SetBalloon(spec.name, int(rng.integers(0, 80)) * MiB))
            elif r < 0.5:
                h.apply(SetSwapTarget(spec.name, int(rng.integers(0, 128)) * MiB))
        if rng.random() < 0.1:
            h.apply(SetKsm(run=int(rng.integers(0, 3))))
        h.step()
        assert h.check() == []
        used = h.pt.frames_used()
        assert used <= h.pt.capacity
        counts = h.pt.counts.sum(axis=1)
        assert list(counts) == [v.pages for v in h.vms]


def test_reserved_memory_is_never_swapped() -> None:
    h = overcommitted()
    h.apply(SetSwapTarget("v0", 0))
    for _ in range(5):
        h.step()
    obs = {o.name: o for o in h.observe_vms()}
    assert obs["v0"].consumed >= 16 * MiB
    assert obs["v1"].swapped > 0  # the host kernel reclaimed from unreserved VMs instead


def test_check_reports_a_corrupted_counter() -> None:
    h = overcommitted()
    h.pt.counts[1, PRIVATE] += 1
    h.pt.counts[1, UNTOUCHED] -= 1
    assert any("state counts" in p for p in h.check())


def test_check_reports_frames_over_capacity() -> None:
    h = overcommitted()
    h.pt.capacity = h.pt.frames_used() - 1
    assert any("frames used" in p for p in h.check())
