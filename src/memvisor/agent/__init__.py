"""The guest reservation program (C2): an agent inside each guest and its host-side session.

``protocol`` (shared), ``reserve``, ``guest`` and ``__main__`` run inside the guest and use the
Python 3.11 standard library only; ``host``, ``backing`` and ``link`` run in the manager.
"""

# Files (relative to src/) the guest image must contain to run ``python3 -m memvisor.agent``.
# All stdlib-only. The image builder packs exactly these.
GUEST_MODULES: tuple[str, ...] = (
    "memvisor/__init__.py",
    "memvisor/errors.py",
    "memvisor/agent/__init__.py",
    "memvisor/agent/__main__.py",
    "memvisor/agent/protocol.py",
    "memvisor/agent/reserve.py",
    "memvisor/agent/guest.py",
    "memvisor/agent/prefetch.py",
    "memvisor/agent/workload.py",
)
