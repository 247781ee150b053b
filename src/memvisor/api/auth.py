"""API access: the bearer token in the state directory and the rules for where to listen.

The token is generated once (``secrets.token_urlsafe``) into ``STATE/api-token`` with mode
0600 and required on every API call (``Authorization: Bearer TOKEN``). A token file that other
users can read is refused, not used. The API listens on loopback unless TLS is configured:
binding to any other address needs a certificate and a key, because the token would otherwise
cross the network in clear text.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import stat
from pathlib import Path

from memvisor.errors import InputError

TOKEN_FILE = "api-token"


def load_or_create_token(state_dir: Path) -> str:
    """The API token of this state directory, created (mode 0600) on first use."""
    path = state_dir / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_token(state_dir)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def read_token(state_dir: Path) -> str:
    """Read an existing token; refuses a file readable by group or others."""
    path = state_dir / TOKEN_FILE
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: no API token (start the daemon with `memvisor up`)") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InputError(
            f"{path}: mode {stat.S_IMODE(mode):04o} lets other users read the API token; "
            f"run `chmod 600 {path}`"
        )
    token = path.read_text().strip()
    if len(token) < 16:
        raise InputError(f"{path}: the API token is too short (need at least 16 characters)")
    return token


def token_matches(expected: str, authorization: str | None) -> bool:
    """Constant-time check of an ``Authorization: Bearer ...`` header."""
    if not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(host: str, tls_cert: Path | None, tls_key: Path | None) -> None:
    """Refuse to listen beyond loopback without TLS (a certificate and its key)."""
    if (tls_cert is None) != (tls_key is None):
        raise InputError("--tls-cert and --tls-key go together: give both or neither")
    for p in (tls_cert, tls_key):
        if p is not None and not p.is_file():
            raise InputError(f"TLS file {p}: not found")
    if not is_loopback(host) and tls_cert is None:
        raise InputError(
            f"--listen {host}: refusing to serve the API beyond loopback without TLS; "
            "give --tls-cert and --tls-key (the bearer token is required either way)"
        )
