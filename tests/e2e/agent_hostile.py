"""A hostile stand-in for the agent, run inside a guest by tests/e2e/test_agent_e2e.py.

It opens the agent's virtio-serial port and sends what a broken or malicious guest could:
garbage, out-of-range and unaligned pages, replies to requests never made, an over-long line,
then a flood for ``FLOOD_SECONDS``. Prints how many bytes it got out.
"""

import json
import os
import sys
import time

FLOOD_SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 8.0


def port(name: str = "org.memvisor.agent.0") -> str:
    root = "/sys/class/virtio-ports"
    for entry in os.listdir(root):
        with open(f"{root}/{entry}/name") as f:
            if f.read().strip() == name:
                return f"/dev/{entry}"
    raise SystemExit(f"no port {name}")


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def main() -> None:
    fd = os.open(port(), os.O_RDWR)
    hello = {"type": "hello", "versions": [1], "agent": "evil", "page_size": 4096}
    nasty = [
        line({**hello, "instance": "evil", "held": 0}),
        b"\x00\xff garbage\n",
        b"{not json}\n",
        b"[" * 5000 + b"\n",
        line(
            {
                "type": "pages",
                "re": None,
                "reason": "resync",
                "add": [[1 << 30, 512]],
                "remove": [],
                "reset": True,
            }
        ),
        line(
            {
                "type": "pages",
                "re": None,
                "reason": "resync",
                "add": [[-1, 512]],
                "remove": [],
                "reset": True,
            }
        ),
        line(
            {
                "type": "pages",
                "re": 99,
                "reason": "reserve",
                "add": [[512, 512]],
                "remove": [],
                "reset": False,
            }
        ),
        line(
            {
                "type": "pages",
                "re": None,
                "reason": "resync",
                "add": [[100, 7], [100, 7]],
                "remove": [],
                "reset": True,
            }
        ),
        line({"type": "done", "re": 12345, "requested": 1, "achieved": 1, "held": 1, "swapped": 0}),
        b"A" * 100_000 + b"\n",
    ]
    sent = sum(write_all(fd, data) for data in nasty)
    os.set_blocking(fd, False)
    flood = line({"type": "stats", "seq": 1, "uptime": 1.0, "meminfo": {}, "vmstat": {}}) * 500
    end = time.monotonic() + FLOOD_SECONDS
    while time.monotonic() < end:
        sent += write_all(fd, flood, end)
    print(f"hostile: sent {sent} bytes")


def write_all(fd: int, data: bytes, until: float = float("inf")) -> int:
    """The port takes at most 32 KiB per write: loop, so lines arrive whole."""
    done = 0
    while done < len(data) and time.monotonic() < until:
        try:
            done += os.write(fd, data[done:])
        except BlockingIOError:
            time.sleep(0.01)
    return done


main()
