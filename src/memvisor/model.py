"""The shared vocabulary: frozen dataclasses for VM specs, observations, actions and decisions.

Every backend (real QEMU, simulator) produces the same observations and accepts the same
actions, so the control loop and the policies run unchanged on both. All sizes are bytes
(``int``); all times are seconds from the backend's :class:`~memvisor.backends.base.Clock`.
Fields added later must have defaults so existing producers keep working.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Backing(enum.StrEnum):
    """How a VM's guest RAM is backed on the host."""

    FILE = "file"  # a file in the VM's own directory: its per-VM swap file (C4)
    ANON = "anon"  # anonymous memory that KSM may merge (C1's sharing source)


class PowerState(enum.StrEnum):
    OFF = "off"
    STARTING = "starting"
    ON = "on"
    STOPPING = "stopping"
    CRASHED = "crashed"


class HostState(enum.StrEnum):
    """Free-memory state of the host, from most to least free memory."""

    HIGH = "high"
    SOFT = "soft"
    HARD = "hard"
    LOW = "low"


@dataclass(frozen=True, slots=True)
class VMSpec:
    """What the operator configured for a VM."""

    name: str
    memory: int
    reservation: int = 0
    limit: int | None = None  # None: the configured memory
    shares: int = 0  # resolved integer shares (0: normal = 10 x configured MiB)
    pool: str = "root"
    backing: Backing = Backing.FILE
    vcpus: int = 1

    @property
    def effective_limit(self) -> int:
        return self.memory if self.limit is None else min(self.limit, self.memory)

    @property
    def effective_shares(self) -> int:
        return self.shares if self.shares > 0 else 10 * (self.memory // 2**20)


@dataclass(frozen=True, slots=True)
class SharingSample:
    """Result of sampling a context's pages (C1). Counts are in pages."""

    sampled: int
    present: int
    swapped: int
    mean_harmonic: float  # of kpagecount over present pages
    expected_freed_per_page: float  # mean of 1/count = 1 / harmonic mean; 0 if nothing present
    shared_fraction: float  # present pages that are shared (count > 1, KSM or zero page)
    # Added by memvisor.sharing (defaults keep older producers working):
    mean_arithmetic: float | None = None  # of kpagecount over frames with a count (>= 1)
    mean_geometric: float | None = None
    median: float | None = None
    ksm_fraction: float = 0.0  # present pages in KSM frames
    zero_fraction: float = 0.0  # present pages mapping the shared zero page
    resident_pages: float = 0.0  # estimated present pages in the whole context (ranking ties)


@dataclass(frozen=True, slots=True)
class VMObservation:
    """One observation of a VM, as measured on the host (never from QEMU's RSS)."""

    name: str
    time: float
    power: PowerState
    memory: int  # configured guest RAM
    consumed: int  # host memory really used by guest RAM (resident; shared frames included)
    shared: int = 0  # of consumed, bytes in frames shared with other mappings (KSM, zero page)
    swapped: int = 0  # bytes of guest RAM written out to the VM's own swap file and evicted
    ballooned: int = 0  # bytes lent back by balloon or reservation program
    balloon_target: int = 0  # bytes the balloon is asked to hold
    guest_free: int | None = None  # guest's free memory as the guest reports it
    guest_swapped_out_rate: float = 0.0  # guest's own paging, pages/s
    reserved_paged_out_rate: float = 0.0  # reservation-program pages the guest paged out, pages/s
    active_fraction: float | None = None  # sampled working-set estimate, 0..1 of memory
    sharing: SharingSample | None = None
    throughput: float | None = None  # workload progress per second, where known (simulator)
    # the standing SetSwapTarget limit the backend holds, bytes (None: no limit); a restarted
    # manager learns from it which limits it set before
    resident_limit: int | None = None
    # which mechanism holds ``ballooned``: "agent" (guest reservation program, C2),
    # "virtio-balloon" (fallback or no agent), "" where not known (simulator)
    reclaim_path: str = ""


@dataclass(frozen=True, slots=True)
class KsmStats:
    run: int = 0
    pages_shared: int = 0
    pages_sharing: int = 0
    pages_to_scan: int = 0
    sleep_millisecs: int = 0
    full_scans: int = 0


@dataclass(frozen=True, slots=True)
class HostObservation:
    time: float
    total: int  # host memory available to VMs (capacity)
    free: int
    ksm: KsmStats = field(default_factory=KsmStats)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a policy sees at one instant: the host, each VM's spec and observation."""

    host: HostObservation
    specs: tuple[VMSpec, ...]
    vms: tuple[VMObservation, ...]

    def spec(self, name: str) -> VMSpec:
        for s in self.specs:
            if s.name == name:
                return s
        raise KeyError(name)


# --- actions: each is idempotent (a target, not a delta) -------------------------------------


@dataclass(frozen=True, slots=True)
class SetBalloon:
    """Ask the VM's balloon / reservation program to hold ``target`` bytes."""

    vm: str
    target: int


@dataclass(frozen=True, slots=True)
class SetSwapTarget:
    """Keep at most ``resident_limit`` bytes of the VM's guest RAM resident on the host by
    writing the rest to the VM's own swap file. Never below the VM's reservation."""

    vm: str
    resident_limit: int


@dataclass(frozen=True, slots=True)
class SetKsm:
    run: int
    pages_to_scan: int | None = None
    sleep_millisecs: int | None = None


Action = SetBalloon | SetSwapTarget | SetKsm


@dataclass(frozen=True, slots=True)
class Decision:
    """An action and the reason a person needs to understand it."""

    action: Action
    reason: str


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What applying an action really achieved, measured on the host."""

    action: Action
    ok: bool
    achieved: int = 0  # bytes really freed (or granted back), as measured
    message: str = ""
    reclaim_path: str = ""  # for SetBalloon: "agent" or "virtio-balloon" (which one acted)
