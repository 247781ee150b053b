"""Where memvisor keeps its state: ``--state DIR``, else ``$MEMVISOR_STATE``, else the user's
state home (``$XDG_STATE_HOME/memvisor``, default ``~/.local/state/memvisor``)."""

from __future__ import annotations

import os
from pathlib import Path

from memvisor.errors import InputError


def default_state_dir() -> Path:
    env = os.environ.get("MEMVISOR_STATE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "memvisor"


def resolve_state_dir(arg: str | None, *, create: bool = True) -> Path:
    """The state directory for a command; created (mode 0700) unless ``create`` is False."""
    path = Path(arg) if arg else default_state_dir()
    if path.exists() and not path.is_dir():
        raise InputError(f"--state {path}: exists and is not a directory")
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path
