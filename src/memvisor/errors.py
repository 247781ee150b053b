"""Errors raised by memvisor.

Every error memvisor raises on purpose derives from :class:`MemvisorError`, so callers (the
CLI, the API, the daemon) can tell "the request was wrong or refused" from a bug. Messages say
what failed, for which object, and what to do.

    MemvisorError
    ├── InputError              bad input: a value, a size, a name, a file (CLI exit 2)
    │   └── ConfigError         a config/host/scenario file; carries every problem with its key path
    ├── AdmissionError          refused by admission control; state unchanged (CLI exit 3)
    ├── NotFoundError           a named object (pool, VM, PID, symbol) does not exist (CLI exit 2)
    ├── PermissionNeededError   a host interface needs root / a capability that we lack
    ├── BackendError            a host or VM operation failed (QEMU, QMP, /proc, files)
    │   └── GuestError          the guest (untrusted) sent something invalid or stopped answering
    └── IntrospectionError      the GDB remote protocol peer or a symbol lookup failed
"""

from __future__ import annotations


class MemvisorError(Exception):
    """Root of every error memvisor raises on purpose."""

    exit_code: int = 1


class InputError(MemvisorError, ValueError):
    """The caller gave a bad value: the message names the thing, the field and the value."""

    exit_code = 2


class ConfigError(InputError):
    """A configuration file is invalid. ``problems`` lists every error as (key path, message)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  {path}: {msg}" for path, msg in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s)\n{lines}")


class AdmissionError(MemvisorError):
    """Admission control refused an operation. Nothing was changed."""

    exit_code = 3


class NotFoundError(MemvisorError, KeyError):
    """A named object does not exist."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else ""


class PermissionNeededError(MemvisorError, PermissionError):
    """A host interface needs privileges we do not have (root or CAP_SYS_ADMIN)."""

    exit_code = 4


class BackendError(MemvisorError):
    """A host or VM operation failed."""

    exit_code = 5


class GuestError(BackendError):
    """An untrusted guest sent something invalid, too much, or stopped answering."""


class IntrospectionError(MemvisorError):
    """The GDB remote protocol peer or a guest symbol lookup failed."""

    exit_code = 5
