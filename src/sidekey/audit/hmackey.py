"""The per-host audit HMAC key: sensitive argument values become ``hmac-sha256:<hex>``.

Like Vault's audit devices, a value under a sensitive key is not dropped but replaced
by HMAC-SHA256 under a key only this host (and an auditor given the key) holds: two
events carrying the same password show the same string, so they can be correlated,
but nobody reading the log (or a SIEM that receives it) learns the value, and without
the key a short value cannot be guessed by hashing candidates (a plain SHA-256 could).

What is MACed is the value's canonical JSON (msgspec, object keys sorted): a string
``s3cret`` is MACed as the 8 bytes ``"s3cret"`` (with the quotes), so numbers,
objects and lists work and ``1`` and ``"1"`` differ. ``sidekey audit hmac`` computes
the same string for a value read from stdin.

The key: 32 random bytes, stored as 64 hex digits on one line, in
``audit.hmac_key_file`` or the systemd credential ``audit.hmac_key_credential``;
with neither, ``<state.dir>/audit-hmac.key``, created (0600) on the first start. A key
file open to group or others, or owned by another uid, is refused (it may already be
copied: rotate it). The key is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from ..protocol import ConfigError

if TYPE_CHECKING:
    from ..config import LoadedConfig

HMAC_PREFIX = "hmac-sha256:"
HMAC_KEY_BYTES = 32
DEFAULT_KEY_NAME = "audit-hmac.key"
WHAT = "audit HMAC key"

_canonical = msgspec.json.Encoder(order="sorted")


def canonical_json(value: Any) -> bytes:
    """The bytes a value is MACed over: compact JSON, object keys sorted. A value that
    is not JSON (only possible from a library caller) is MACed as its type's marker."""
    try:
        return _canonical.encode(value)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        return _canonical.encode(f"[{type(value).__name__}]")


class ValueHasher:
    """HMAC-SHA256 under one key, the keyed state precomputed once (each value costs a
    ``copy()`` of it plus the hash of the value, not a new key schedule)."""

    __slots__ = ("_base",)

    def __init__(self, key: bytes) -> None:
        if len(key) < HMAC_KEY_BYTES:
            raise ValueError(f"the audit HMAC key must be at least {HMAC_KEY_BYTES} bytes")
        self._base = hmac.new(key, digestmod=hashlib.sha256)

    def __repr__(self) -> str:  # never the key
        return "ValueHasher(<key>)"

    def digest(self, value: Any) -> str:
        """``hmac-sha256:<64 hex>`` of ``value``'s canonical JSON."""
        mac = self._base.copy()
        mac.update(canonical_json(value))
        return HMAC_PREFIX + mac.hexdigest()


def key_path(loaded: LoadedConfig) -> Path | None:
    """Where the key file is (None when it is a systemd credential)."""
    audit = loaded.config.audit
    if audit.hmac_key_credential is not None:
        return None
    if audit.hmac_key_file is not None:
        return loaded.resolve(audit.hmac_key_file)
    return loaded.state_dir / DEFAULT_KEY_NAME


def generate_key_file(path: Path) -> None:
    """Write a new random key (64 hex digits and a newline) to ``path``, atomically,
    mode 0600; refuses to overwrite an existing file."""
    from ..fsutil import atomic_write

    if path.exists():
        raise ConfigError(f"{path}: already exists; refusing to overwrite the {WHAT}")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, (secrets.token_bytes(HMAC_KEY_BYTES).hex() + "\n").encode(), mode=0o600)


def parse_key(text: str, where: object) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != HMAC_KEY_BYTES:
        raise ConfigError(f"{where}: the {WHAT} must be {2 * HMAC_KEY_BYTES} hex digits on one "
                          "line (create one with: openssl rand -hex 32)")
    return key


def load_key(path: Path | None, credential: str | None) -> bytes:
    """Read the key from a private file or a systemd credential. Raises
    :class:`ConfigError` naming the file and the problem, never the key."""
    from ..secretfiles import read_secret

    text = read_secret(path, credential, what=WHAT)
    return parse_key(text, path if credential is None else f"credential {credential}")


def load_hasher(loaded: LoadedConfig, *, create: bool = True) -> ValueHasher:
    """The daemon's hasher: the configured key, or the state directory's (created on
    the first start when ``create``; a configured file is never created)."""
    audit = loaded.config.audit
    path = key_path(loaded)
    if create and path is not None and audit.hmac_key_file is None and not path.exists():
        generate_key_file(path)
    return ValueHasher(load_key(path, audit.hmac_key_credential))
