"""``memvisor demo``: three small guests overcommitted on a budget, memvisor reclaiming.

The demo writes a host file with three VMs whose memory adds up to more than the host's
capacity, starts the real daemon on it (``--backend qemu``: real guests under TCG; ``sim``:
the simulator), starts a workload in each guest — one idle, one growing, one whose content is
the same as the idle guest's — and shows the daemon at work: a live terminal view and the
dashboard URL. After ``--duration`` seconds (or Ctrl-C) it stops the daemon and writes an HTML
report (:mod:`memvisor.demoreport`) from what the daemon recorded.

The workloads are started through each guest's agent (protocol v2 ``workload.start``, see
docs/protocol.md); the guest shell port is for tests only. The growing workload times how long
each chunk of memory takes to fill and each pass over its memory, which is the slowdown the
report shows (read back with ``workload.query``).
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from memvisor.api.auth import read_token
from memvisor.daemon import Daemon, DaemonOptions
from memvisor.demoreport import write_report
from memvisor.errors import BackendError, MemvisorError
from memvisor.store import Store
from memvisor.units import MiB, format_size

if TYPE_CHECKING:
    from memvisor.backends.qemu.host import QemuHost

DEMO_VMS = ("idle", "grow", "share")
KSM_DIR = Path("/sys/kernel/mm/ksm")

HOST_FILE = """\
# memvisor demo: 3 x 384 MiB of guests on a 576 MiB budget (half of their 1152 MiB)
[host]
capacity = "576MiB"

[vms.idle]
memory = "384MiB"
backing = "anon"
power_on = true

[vms.grow]
memory = "384MiB"
reservation = "96MiB"
backing = "file"
power_on = true

[vms.share]
memory = "384MiB"
backing = "anon"
power_on = true

[daemon]
interval = 1.0
listen = "{listen}"
"""

# Workloads started through each guest's agent (protocol v2 workload.start): the idle guest
# fills 96 MiB once and leaves it; the share guest holds the same 96 MiB of content (same
# pattern: KSM can merge them); the grow guest adds 6 MiB/s up to 240 MiB and touches it all.
PATTERN = 0x6D656D76
WORKLOADS = {
    "idle": ("idle", 96 * MiB, 0, PATTERN),
    "share": ("shared-content", 96 * MiB, 0, PATTERN),
    "grow": ("grow", 240 * MiB, 6 * MiB, 0),
}


@dataclass(frozen=True, slots=True)
class DemoOptions:
    backend: str = "qemu"
    duration: float = 120.0
    report: Path = Path("memvisor-demo.html")
    listen: str = "127.0.0.1:8765"
    live: bool = True


def check_qemu() -> None:
    """Say why QEMU cannot run here (and offer the simulator) before anything starts."""
    from memvisor.backends.qemu.launcher import QEMU_BINARY
    from memvisor.guestimage import find_kernel_tree

    hint = "; run `memvisor demo --backend sim` to see the same demo on the simulator"
    if shutil.which(QEMU_BINARY) is None:
        raise BackendError(f"QEMU cannot run here: {QEMU_BINARY} is not installed{hint}")
    try:
        find_kernel_tree()
    except MemvisorError as exc:
        raise BackendError(f"QEMU cannot run here: no guest kernel ({exc}){hint}") from None


class KsmForDemo:
    """Turns KSM on at a demo-friendly rate and puts the host's settings back afterwards."""

    KEYS = ("run", "pages_to_scan", "sleep_millisecs")

    def __init__(self) -> None:
        self.saved: dict[str, str] = {}

    def __enter__(self) -> KsmForDemo:
        with contextlib.suppress(OSError):
            self.saved = {k: (KSM_DIR / k).read_text().strip() for k in self.KEYS}
            for k, v in (("pages_to_scan", "5000"), ("sleep_millisecs", "20"), ("run", "1")):
                (KSM_DIR / k).write_text(v)
        return self

    def __exit__(self, *exc: object) -> None:
        for k in reversed(self.KEYS):
            if k in self.saved:
                with contextlib.suppress(OSError):
                    (KSM_DIR / k).write_text(self.saved[k])


def start_workloads(qemu: QemuHost, console: Console) -> None:
    """Start each guest's workload through its agent (QEMU backend)."""
    for name, (kind, size, rate, pattern) in WORKLOADS.items():
        status = qemu.start_workload(name, kind, size, rate, pattern)
        if status.state != "running":
            raise BackendError(f"{name}: the guest refused the {kind} workload: {status.error}")
        console.print(f"[dim]workload started in {name} through its agent: {kind}, "
                      f"{format_size(size)}[/]")  # fmt: skip


def live_table(store: Store) -> Table:
    host = store.latest_host()
    title = "waiting for the first tick"
    if host:
        title = (
            f"host {host['state'].upper()}: free {format_size(host['free'])} of "
            f"{format_size(host['total'])}, KSM sharing {host['ksm_pages_sharing']} pages"
        )
    table = Table("VM", "consumed", "shared", "ballooned", "swapped", "entitlement", title=title)
    for v in store.latest_vms():
        ent = format_size(v["entitlement"]) if v["entitlement"] is not None else "–"
        table.add_row(v["vm"], *(format_size(v[k]) for k in ("consumed", "shared", "ballooned",
                      "swapped")), ent)  # fmt: skip
    decisions = store.decisions(3)
    if decisions:
        table.caption = "\n".join(d["reason"][:140] for d in decisions)
    return table


def show_live(store: Store, stop: threading.Event, console: Console, live: bool) -> None:
    if live:
        with Live(live_table(store), console=console, refresh_per_second=2) as view:
            while not stop.wait(1.0):
                view.update(live_table(store))
        return
    while not stop.wait(10.0):  # not a terminal (CI): a line every 10 s
        host = store.latest_host()
        if host:
            print(f"demo: tick {host['id']}: host {host['state']}, free "
                  f"{format_size(host['free'])}", flush=True)  # fmt: skip


def guest_slowdown(qemu: QemuHost) -> dict[str, Any]:
    """The growing workload's own timings (fill steps, passes over its memory), from its
    agent's ``workload.status``."""
    status = qemu.workload_status("grow")
    return {"fills": list(status.fills), "touches": list(status.touches)}


def qemu_of(daemon: Daemon) -> QemuHost:
    from memvisor.hostbackends import QemuManagedHost

    if not isinstance(daemon.host, QemuManagedHost):
        raise BackendError("the demo's workloads need the QEMU backend")
    return daemon.host.qemu


def run_demo(state_dir: Path, options: DemoOptions) -> int:
    console = Console()
    if options.backend == "qemu":
        check_qemu()
    state_dir.mkdir(parents=True, exist_ok=True)
    host_file = state_dir / "demo-host.toml"
    host_file.write_text(HOST_FILE.format(listen=options.listen))
    daemon = Daemon(
        host_file, state_dir,
        DaemonOptions(backend=options.backend, duration=options.duration, accel="tcg"
                      if options.backend == "qemu" else None),
    )  # fmt: skip
    started = time.time()
    stop_view = threading.Event()
    extra: dict[str, Any] = {}

    def ready(d: Daemon) -> None:
        console.print(f"[bold]memvisor demo[/]: {len(DEMO_VMS)} guests of 384 MiB on a 576 MiB "
                      f"budget ({options.backend}); {options.duration:.0f} s")  # fmt: skip
        console.print(f"dashboard: {d.url}/#token={read_token(state_dir)}")
        if options.backend == "qemu":
            start_workloads(qemu_of(d), console)
        threading.Thread(
            target=show_live, args=(Store.open(state_dir), stop_view, console, options.live),
            daemon=True,
        ).start()  # fmt: skip

    def before_stop() -> None:
        if options.backend == "qemu":
            with contextlib.suppress(MemvisorError, OSError):
                extra["slowdown"] = guest_slowdown(qemu_of(daemon))

    daemon.before_stop = before_stop
    with KsmForDemo() if options.backend == "qemu" else contextlib.nullcontext():
        rc = daemon.run(on_ready=ready)
    stop_view.set()
    report = write_report(Store.open(state_dir), started, options.report, options.backend, extra)
    console.print(f"report: {report}")
    return rc
