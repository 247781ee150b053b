"""``memvisor demo``: three small guests overcommitted on a budget, memvisor reclaiming.

The demo writes a host file with three VMs whose memory adds up to more than the host's
capacity, starts the real daemon on it (``--backend qemu``: real guests under TCG; ``sim``:
the simulator), starts a workload in each guest — one idle, one growing, one whose content is
the same as the idle guest's — and shows the daemon at work: a live terminal view and the
dashboard URL. After ``--duration`` seconds (or Ctrl-C) it stops the daemon and writes an HTML
report (:mod:`memvisor.demoreport`) from what the daemon recorded.

The workloads run through each guest's shell port (a busybox shell on a virtio-serial port):
the agent's protocol only reserves and releases memory. The growing workload times how long
each chunk of memory takes to fill, which is the slowdown the report shows.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from memvisor.api.auth import read_token
from memvisor.daemon import Daemon, DaemonOptions
from memvisor.demoreport import write_report
from memvisor.errors import BackendError, MemvisorError
from memvisor.store import Store
from memvisor.units import format_size

DEMO_VMS = ("idle", "grow", "share")
KSM_DIR = Path("/sys/kernel/mm/ksm")

HOST_FILE = """\
# memvisor demo: 3 x 384 MiB of guests on a 768 MiB budget
[host]
capacity = "768MiB"

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

# Guest programs (Python in the guest image). Same seed -> same bytes: KSM can merge them.
SHARED_CONTENT = (
    "import time\n"
    "buf=bytearray(b''.join(i.to_bytes(4,'little')*1024 for i in range({pages})))\n"
    "open('/tmp/ready','w').write('ok')\n"
    "while True: time.sleep(60)\n"
)
GROWING = (
    "import os,time\n"
    "chunks=[]; log=open('/tmp/progress','w')\n"
    "for i in range({steps}):\n"
    "    t=time.monotonic(); c=bytearray(os.urandom({chunk}))\n"
    "    chunks.append(c); log.write(f'{{i}} {{time.monotonic()-t:.4f}}\\n'); log.flush()\n"
    "    time.sleep(1)\n"
    "while True:\n"
    "    t=time.monotonic()\n"
    "    for c in chunks: c[::4096]=bytes(len(c[::4096]))\n"
    "    log.write(f'touch {{time.monotonic()-t:.4f}}\\n'); log.flush(); time.sleep(1)\n"
)


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


def start_workloads(state_dir: Path, console: Console) -> None:
    """Start each guest's workload through its shell port (QEMU backend)."""
    from memvisor.backends.qemu.launcher import GuestShell, VMPaths
    from memvisor.backends.qemu.vmrecord import vm_dir

    programs = {
        "idle": SHARED_CONTENT.format(pages=24576),  # 96 MiB, then idle
        "share": SHARED_CONTENT.format(pages=24576),  # the same 96 MiB as idle
        "grow": GROWING.format(steps=40, chunk=6 * 2**20),  # +6 MiB/s up to 240 MiB
    }
    for name, program in programs.items():
        shell = GuestShell(VMPaths(vm_dir(state_dir, name)).shell)
        shell.run(f"cat > /tmp/work.py <<'EOF'\n{program}EOF", check=True)
        shell.run("python3 /tmp/work.py >/tmp/work.log 2>&1 &", check=True)
        console.print(f"[dim]workload started in {name}[/]")


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


def guest_slowdown(state_dir: Path) -> dict[str, Any]:
    """The growing workload's own timings, read from the guest at the end."""
    from memvisor.backends.qemu.launcher import GuestShell, VMPaths
    from memvisor.backends.qemu.vmrecord import vm_dir

    text = GuestShell(VMPaths(vm_dir(state_dir, "grow")).shell).run("cat /tmp/progress").output
    fills = [float(p[1]) for p in (line.split() for line in text.splitlines())
             if len(p) == 2 and p[0].isdigit()]  # fmt: skip
    touches = [float(p[1]) for p in (line.split() for line in text.splitlines())
               if len(p) == 2 and p[0] == "touch"]  # fmt: skip
    return {"fills": fills, "touches": touches}


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
        console.print(f"[bold]memvisor demo[/]: {len(DEMO_VMS)} guests of 384 MiB on a 768 MiB "
                      f"budget ({options.backend}); {options.duration:.0f} s")  # fmt: skip
        console.print(f"dashboard: {d.url}/#token={read_token(state_dir)}")
        if options.backend == "qemu":
            start_workloads(state_dir, console)
        threading.Thread(
            target=show_live, args=(Store.open(state_dir), stop_view, console, options.live),
            daemon=True,
        ).start()  # fmt: skip

    def before_stop() -> None:
        if options.backend == "qemu":
            with contextlib.suppress(MemvisorError, OSError):
                extra["slowdown"] = guest_slowdown(state_dir)

    daemon.before_stop = before_stop
    with KsmForDemo() if options.backend == "qemu" else contextlib.nullcontext():
        rc = daemon.run(on_ready=ready)
    stop_view.set()
    report = write_report(Store.open(state_dir), started, options.report, options.backend, extra)
    console.print(f"report: {report}")
    return rc
