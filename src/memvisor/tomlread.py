"""Reading parsed TOML without stopping at the first problem.

Host files (``memvisor.config``) and simulator scenarios (``memvisor.backends.sim.scenario``)
report every problem with its key path, so a user fixes a file in one pass. Both read through
:class:`TomlReader`; each adds the helpers its own format needs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from memvisor.errors import InputError


class TomlReader:
    """Reads typed values out of parsed TOML, recording every problem with its key path."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append((path, message))

    def table(self, value: object, path: str, keys: tuple[str, ...]) -> dict[str, Any]:
        """``value`` as a table whose keys are all in ``keys``; unknown keys are problems."""
        if not isinstance(value, dict):
            self.problem(path, f"expected a table, got {type(value).__name__}")
            return {}
        for key in value:
            if key not in keys:
                self.problem(
                    f"{path}.{key}" if path else key, f"unknown key (known: {', '.join(keys)})"
                )
        return value

    def get(
        self,
        t: Mapping[str, Any],
        path: str,
        key: str,
        convert: Callable[[Any], Any],
        default: Any,
    ) -> Any:
        """``convert(t[key])``, or ``default`` when the key is absent or its value is bad (a
        problem at ``path.key``; a message that already starts with that path is not repeated)."""
        if key not in t:
            return default
        try:
            return convert(t[key])
        except (InputError, ValueError) as exc:
            where = f"{path}.{key}" if path else key
            self.problem(where, str(exc).removeprefix(f"{where}: "))
            return default
