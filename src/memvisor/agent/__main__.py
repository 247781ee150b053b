"""``python3 -m memvisor.agent``: run the agent inside a guest (or, for tests, on a host).

By default it finds the virtio-serial port named ``org.memvisor.agent`` under
/sys/class/virtio-ports; ``--device PATH`` names a port directly, ``--unix PATH`` connects to a
unix socket instead (reconnecting whenever it drops).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

from memvisor.agent.guest import UnixClient, VirtioPort, find_port, run
from memvisor.agent.reserve import MIN_FREE_KBYTES, THP_CONTROL, ProcPagemap, Reservation

DEFAULT_PORT_NAME = "org.memvisor.agent"


MCL_CURRENT, MCL_ONFAULT = 1, 4
AGENT_NICE = -10


def stay_responsive() -> list[str]:
    """Keep the agent quick when the guest runs short of memory, which is exactly when its
    report matters: a higher CPU priority, and its own pages (interpreter, heap) locked in RAM
    as they are touched, so they are not swapped out. Mappings made later (the reservation
    itself) are not locked: the guest must be able to page those out. Best effort; returns
    what could not be done."""
    problems = []
    try:
        os.setpriority(os.PRIO_PROCESS, 0, AGENT_NICE)
    except OSError as exc:
        problems.append(f"cannot raise priority: {exc}")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mlockall(MCL_CURRENT | MCL_ONFAULT) != 0:
            problems.append(f"mlockall failed: {os.strerror(ctypes.get_errno())}")
    except (OSError, AttributeError) as exc:
        problems.append(f"mlockall unavailable: {exc}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memvisor.agent", description=__doc__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port-name", default=DEFAULT_PORT_NAME, help="virtio-serial port name")
    where.add_argument("--device", help="path of the virtio-serial port device")
    where.add_argument("--unix", help="connect to this unix socket instead")
    parser.add_argument("--block-pages", type=int, default=512, help="until the host says")
    parser.add_argument(
        "--thp-control", default=THP_CONTROL, help="THP switch set to madvise if it says never"
    )
    parser.add_argument(
        "--min-free-control", default=MIN_FREE_KBYTES, help="min_free_kbytes to keep as it was"
    )
    args = parser.parse_args(argv)
    try:
        if args.unix:
            channel: UnixClient | VirtioPort = UnixClient(args.unix)
        else:
            channel = VirtioPort(args.device or find_port(args.port_name))
    except OSError as exc:
        print(f"memvisor.agent: {exc}", file=sys.stderr)
        return 1
    print(f"memvisor.agent: serving on {channel.path}", file=sys.stderr, flush=True)
    for problem in stay_responsive():
        print(f"memvisor.agent: {problem}", file=sys.stderr, flush=True)
    try:
        reservation = Reservation(ProcPagemap(), block_pages=args.block_pages)
        reservation.thp_control = args.thp_control
        reservation.min_free_control = args.min_free_control
        run(channel, reservation)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
