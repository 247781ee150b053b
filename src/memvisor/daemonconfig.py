"""The host file's ``[daemon]`` table: how ``memvisor up`` runs this host.

::

    [daemon]
    interval = 1.0                     # control loop period, seconds (0.05..3600)
    listen = "127.0.0.1:8765"          # HTTP API / dashboard / metrics address
    on_stop = "shutdown"               # or "leave": VMs keep running when the daemon stops
    keep_observations = "6h"           # retention of the per-tick time series
    keep_records = "7d"                # retention of decisions, actions, events, hits
    tls_cert = "/etc/memvisor/cert.pem"  # HTTPS (both or neither; needed beyond loopback)
    tls_key = "/etc/memvisor/key.pem"
    token_file = "/etc/memvisor/api-token"  # bearer token (default STATE/api-token)

    [daemon.policy]
    name = "memvisor"                  # a policy of memvisor.policy's registry
    tax = 0.75                         # its settings, named like its settings' fields
    [daemon.policy.thresholds]         # a settings group is a sub-table
    high = 0.08

Durations are seconds (numbers) or strings such as "90s", "15m", "6h", "7d". Relative paths are
relative to the host file's directory. Policy settings are checked against the policy itself
(the registry builds it once with them), so a setting the policy does not have, a value of the
wrong type, or a value the policy refuses is reported with its key path. ``pools`` is not a
setting of the file: the daemon gives the policy the file's pool tree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from math import isfinite
from pathlib import Path
from typing import Any

from memvisor.errors import InputError
from memvisor.policy import POLICIES, Policy, get_policy
from memvisor.units import parse_size

DAEMON_KEYS = (
    "interval", "listen", "on_stop", "keep_observations", "keep_records",
    "tls_cert", "tls_key", "token_file", "policy",
)  # fmt: skip
ON_STOP = ("shutdown", "leave")
_ON_STOP_TEXT = {"shutdown": "shut the VMs down", "leave": "leave the VMs running"}
DAEMON_SUPPLIED_SETTINGS = ("pools",)  # the daemon passes these from the pool tree
DEFAULT_KEEP_OBSERVATIONS = 6 * 3600.0
DEFAULT_KEEP_RECORDS = 7 * 86400.0

Problem = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """A policy by name and the settings the file gives it (sub-tables as nested dicts)."""

    name: str = "memvisor"
    settings: Mapping[str, Any] = field(default_factory=dict)

    def build(self, **extra: Any) -> Policy:
        """The policy, with this file's settings and ``extra`` (e.g. ``pools``)."""
        # the registry takes a group (thresholds, ...) as its settings object: the policy's
        # default one, reached through a default instance, with the file's keys replaced
        defaults = getattr(get_policy(self.name), "settings", None)
        kwargs = {
            key: dataclasses.replace(getattr(defaults, key), **value)
            if isinstance(value, Mapping)
            else value
            for key, value in self.settings.items()
        }
        return get_policy(self.name, **kwargs, **extra)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    interval: float = 1.0
    listen: str = "127.0.0.1:8765"
    policy: PolicyConfig = PolicyConfig()
    on_stop: str = "shutdown"
    keep_observations: float = DEFAULT_KEEP_OBSERVATIONS  # seconds
    keep_records: float = DEFAULT_KEEP_RECORDS
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_file: Path | None = None  # None: STATE/api-token


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(value: object) -> float:
    """Seconds from a positive number or a string such as ``90s``, ``15m``, ``6h``, ``7d``."""
    wrong = InputError(f"expected a duration such as 90s, 15m, 6h, 7d (or seconds), got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise wrong
    if isinstance(value, str):
        unit = value[-1:] if value[-1:] in _DURATION_UNITS else "s"
        number = value[:-1] if value[-1:] in _DURATION_UNITS else value
        try:
            seconds = float(number) * _DURATION_UNITS[unit]
        except ValueError:
            raise wrong from None
    else:
        seconds = float(value)
    if not 0 < seconds < float("inf"):
        raise InputError(f"must be a positive, finite duration, got {value!r}")
    return seconds


def parse_duration(value: object, what: str) -> float:
    """:func:`duration_seconds` for a command-line option named ``what``."""
    try:
        return duration_seconds(value)
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None


def format_duration(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        if seconds >= _DURATION_UNITS[unit] and seconds % _DURATION_UNITS[unit] == 0:
            return f"{seconds / _DURATION_UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def _interval(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.05 <= value <= 3600:
        raise InputError(f"expected seconds between 0.05 and 3600, got {value!r}")
    return float(value)


def _listen(value: object) -> str:
    host, _, port = str(value).rpartition(":")
    if not isinstance(value, str) or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f'expected "HOST:PORT" such as "127.0.0.1:8765", got {value!r}')
    return value


def _on_stop(value: object) -> str:
    if value not in ON_STOP:
        raise InputError(f'expected "shutdown" or "leave", got {value!r}')
    return str(value)


def _path(base: Path | None) -> Callable[[object], Path]:
    def check(value: object) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"expected a file path, got {value!r}")
        path = Path(value).expanduser()
        return base / path if base is not None and not path.is_absolute() else path

    return check


def parse_daemon_table(d: Mapping[str, Any], problem: Problem, base: Path | None) -> DaemonConfig:
    """The ``[daemon]`` table (unknown keys already reported by the caller)."""

    def get(key: str, default: Any, check: Callable[[object], Any]) -> Any:
        if key not in d:
            return default
        try:
            return check(d[key])
        except InputError as exc:
            problem(f"daemon.{key}", str(exc))
            return default

    cfg = DaemonConfig(
        interval=get("interval", 1.0, _interval),
        listen=get("listen", "127.0.0.1:8765", _listen),
        policy=parse_policy_table(d["policy"], problem) if "policy" in d else PolicyConfig(),
        on_stop=get("on_stop", "shutdown", _on_stop),
        keep_observations=get("keep_observations", DEFAULT_KEEP_OBSERVATIONS, duration_seconds),
        keep_records=get("keep_records", DEFAULT_KEEP_RECORDS, duration_seconds),
        tls_cert=get("tls_cert", None, _path(base)),
        tls_key=get("tls_key", None, _path(base)),
        token_file=get("token_file", None, _path(base)),
    )
    for given, missing in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
        if given in d and missing not in d:
            problem(f"daemon.{missing}", f"required with daemon.{given}: give both or neither")
    return cfg


def parse_policy_table(raw: object, problem: Problem) -> PolicyConfig:
    """``[daemon.policy]``: ``name`` and the policy's own settings, each checked."""
    path = "daemon.policy"
    if not isinstance(raw, dict):
        problem(path, f"expected a table with name = one of {', '.join(sorted(POLICIES))}")
        return PolicyConfig()
    name = raw.get("name", "memvisor")
    if name not in POLICIES:
        problem(f"{path}.name", f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
        return PolicyConfig()
    defaults = getattr(get_policy(name), "settings", None)
    given = {k: v for k, v in raw.items() if k != "name"}
    settings = _settings(defaults, given, path, problem, name)
    for key, value in list(settings.items()):
        try:  # one at a time first, so that a refused value is reported with its own key
            PolicyConfig(name, {key: value}).build()
        except (InputError, TypeError, ValueError) as exc:
            problem(f"{path}.{key}", str(exc))
            del settings[key]
    if len(settings) != len(given):
        return PolicyConfig(name)
    result = PolicyConfig(name, settings)
    try:
        result.build()  # the policy's own checks across settings (e.g. free_target)
    except (InputError, TypeError, ValueError) as exc:
        problem(path, str(exc))
        return PolicyConfig(name)
    return result


def _fields(settings: object) -> tuple[str, ...]:
    """The settings a policy (or group) has: its settings dataclass's fields, seen through a
    default instance, so that only the registry is imported (``loop.thresholds_of`` too)."""
    if settings is None or not dataclasses.is_dataclass(settings):
        return ()
    names = (f.name for f in dataclasses.fields(settings))
    return tuple(n for n in names if n not in DAEMON_SUPPLIED_SETTINGS)


def _settings(
    defaults: object, given: Mapping[str, Any], path: str, problem: Problem, policy: str
) -> dict[str, Any]:
    """Checked settings; each bad one is reported (and left out)."""
    known = _fields(defaults)
    out: dict[str, Any] = {}
    for key, value in given.items():
        where = f"{path}.{key}"
        if key in DAEMON_SUPPLIED_SETTINGS and path == "daemon.policy":
            problem(where, "not a setting of the file: the daemon gives the file's pool tree")
            continue
        if key not in known:
            what = f"known: {', '.join(known)}" if known else f"policy {policy!r} has no settings"
            problem(where, f"unknown setting of policy {policy!r} ({what})")
            continue
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default):
            group = _group(default, value, where, problem, policy)
            if group is not None:
                out[key] = group
            continue
        try:
            out[key] = _scalar(value, default)
        except InputError as exc:
            problem(where, str(exc))
    return out


def _group(
    default: Any, value: object, where: str, problem: Problem, policy: str
) -> dict[str, Any] | None:
    """A settings group (``[daemon.policy.thresholds]``), checked by building it."""
    if not isinstance(value, dict):
        problem(where, f"expected a table ([{where}]), got {value!r}")
        return None
    checked = _settings(default, value, where, problem, policy)
    if len(checked) != len(value):
        return None  # its problems are reported key by key
    try:
        dataclasses.replace(default, **checked)
    except (InputError, TypeError, ValueError) as exc:
        problem(where, str(exc))
        return None
    return checked


def _scalar(value: object, default: object) -> object:
    """A setting of the same kind as its default (integers may be written as sizes)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(f"expected true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, str):
            try:
                return parse_size(value, what="size")
            except InputError as exc:
                raise InputError(str(exc).removeprefix("size: ")) from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(
                f'expected an integer (bytes may be a size such as "4MiB"), got {value!r}'
            )
        return value
    if isinstance(default, float) or default is None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not isfinite(value):
            raise InputError(f"expected a finite number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise InputError(f"expected a string, got {value!r}")
        return value
    raise InputError(f"cannot be set in a host file (a {type(default).__name__})")


def describe_daemon(d: DaemonConfig) -> str:
    """A few lines for ``memvisor check``: how ``memvisor up`` will run this host."""
    settings = ", ".join(_flat(d.policy.settings)) or "default settings"
    tls = f" over TLS ({d.tls_cert}, {d.tls_key})" if d.tls_cert else ""
    token = d.token_file or "STATE/api-token"
    return (
        f"daemon: policy {d.policy.name} ({settings})\n"
        f"        loop every {d.interval:g} s; API on {d.listen}{tls}, token in {token}\n"
        f"        on stop: {_ON_STOP_TEXT[d.on_stop]}; keep observations "
        f"{format_duration(d.keep_observations)}, records {format_duration(d.keep_records)}"
    )


def _flat(settings: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in settings.items():
        if isinstance(value, Mapping):
            out.extend(_flat(value, f"{prefix}{key}."))
        else:
            out.append(
                f"{prefix}{key}={value:g}" if isinstance(value, float) else f"{prefix}{key}={value}"
            )
    return out
