"""Secret backends: the interface every backend implements, and the factory.

A backend turns a secret *name* (from ``secrets:`` in the config) into its current
value. Values travel only inside :class:`SecretValue`, whose ``repr`` never shows the
value, so a stray ``log.debug("%r", v)`` or a traceback's locals cannot leak it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .. import protocol
from ..protocol import ConfigError

if TYPE_CHECKING:
    from ..config import LoadedConfig, SecretRef


@dataclass(frozen=True, slots=True, repr=False)
class SecretValue:
    """One version of a secret. ``repr``/``str`` show the version only, never the value.

    ``lease_id`` is set for dynamic secrets (a Vault lease): the credential exists for
    this one tool call and is revoked through :meth:`Backend.release` when the call's
    lease ends (released, expired, revoked) — or at the next start after a crash.
    """

    value: str
    version: str
    lease_id: str | None = None
    lease_ttl_s: int | None = None
    # Value-free facts for the call's audit event (an issued OAuth token: kind, audience,
    # scopes, cached, its SHA-256 prefix); None for stored secrets.
    audit: Mapping[str, object] | None = None

    def __repr__(self) -> str:
        return f"SecretValue(version={self.version!r}, value=<redacted>)"

    __str__ = __repr__


class BackendError(protocol.Unavailable):
    """The backend cannot serve secrets (unreachable, corrupt store, wrong key)."""

    status = 503
    code = "backend_unavailable"


class SecretNotFound(protocol.SidekeyError):
    """A configured secret (or version) does not exist in its backend.

    503, not 404: the daemon is misconfigured and the caller cannot fix that.
    """

    status = 503
    code = "secret_not_found"


# A backend's clock and the journaling host's may differ by this much (NTP keeps it far
# smaller); an intent's window is widened by it on both sides.
INTENT_CLOCK_SKEW_S = 5.0
# An intent is resolved by the sweep only this long after its deadline: by then every
# host that is still alive has journaled (or revoked) what it got in that window, so a
# credential in the window that nobody journaled is an orphan. Covers the skew above
# plus a journal write (a store call is bounded by its timeout, a few seconds).
INTENT_GRACE_S = 2 * INTENT_CLOCK_SKEW_S


class LeaseJournal(Protocol):
    """Where a backend records the dynamic credentials it creates, durably, so that a
    crashed daemon revokes them at its next start.

    ``intent`` is awaited *before* the backend is asked for a credential (``prefix``: the
    lease ids it will have, e.g. ``database/creds/readonly/``; ``deadline``: the latest
    the backend can create it); ``issued`` *before* the credential is handed out, and it
    resolves the intent in the same atomic step; ``intent_done`` resolves an intent that
    produced nothing; ``revoked`` after the backend confirmed the revocation. A crash
    between the backend's answer and ``issued`` leaves the intent open, and the sweep
    (:func:`sidekey.daemon.lifecycle.Lifecycle.resolve_backend_intents`) looks its prefix up."""

    async def intent(self, backend: str, intent_id: str, prefix: str, *, at: float,
                     deadline: float) -> None: ...

    async def issued(self, backend: str, lease_id: str, expires_at: float, *,
                     intent_id: str | None = None) -> None: ...

    async def intent_done(self, backend: str, intent_id: str) -> None: ...

    async def revoked(self, backend: str, lease_id: str) -> None: ...


class Backend(Protocol):
    """What the daemon needs from a secret backend."""

    name: str

    async def fetch(self, ref: SecretRef) -> SecretValue:
        """Return the value ``ref`` points at (its current version unless pinned; a fresh
        credential for ``kind: dynamic``).

        Raises :class:`SecretNotFound` or :class:`BackendError`; never puts the
        value in an exception message.
        """
        ...

    async def release(self, lease_id: str) -> None:
        """End a dynamic secret's backend lease (revoke it). Raises :class:`BackendError`."""
        ...

    async def rotate(self, ref: SecretRef, value: str) -> str:
        """Write ``value`` as the new current version of ``ref``; return that version.

        A failed rotation leaves the old version current. Raises :class:`BackendError`,
        :class:`SecretNotFound`.
        """
        ...

    async def health(self) -> dict[str, object]:
        """Readiness details, e.g. ``{"type": "local", "ok": True, "secrets": 5}``. No values."""
        ...

    async def aclose(self) -> None:
        """Release connections, threads and files. Idempotent."""
        ...


def build_backends(loaded: LoadedConfig, *, journal: LeaseJournal | None = None) -> dict[str, Backend]:
    """Create one backend per ``backends:`` entry of the config.

    Keys are loaded and local stores are opened (and their key checked) here, so a
    wrong key or a corrupt store refuses start/reload instead of failing calls later.
    Remote backends (Vault, AWS) connect lazily, in worker threads, on first use.
    Backends with ``cache_ttl_s > 0`` are wrapped in a :class:`~.cache.CachedBackend`.
    Raises :class:`ConfigError` naming the backend.
    """
    from ..config import (
        AwsBackendConfig,
        LocalBackendConfig,
        OAuthBackendConfig,
        VaultBackendConfig,
    )
    from .cache import CachedBackend
    from .local import LocalBackend, load_key

    out: dict[str, Backend] = {}
    # oauth backends last: they read their client secret through the others.
    ordered = sorted(loaded.config.backends.items(),
                     key=lambda item: isinstance(item[1], OAuthBackendConfig))
    for name, cfg in ordered:
        backend: Backend
        try:
            if isinstance(cfg, OAuthBackendConfig):
                from .oauth import OAuthBackend

                backend = OAuthBackend(name, cfg, base_dir=loaded.base_dir, secret_backends=out)
            elif isinstance(cfg, LocalBackendConfig):
                key = load_key(
                    loaded.resolve(cfg.key_file) if cfg.key_file else None, cfg.key_credential
                )
                local = LocalBackend(name, loaded.resolve(cfg.path), key)
                local.store.reload_if_changed()
                backend = local
            elif isinstance(cfg, VaultBackendConfig):
                from .vault import VaultBackend

                backend = VaultBackend(name, cfg, base_dir=loaded.base_dir, journal=journal)
            elif isinstance(cfg, AwsBackendConfig):
                from .aws import AwsBackend

                backend = AwsBackend(name, cfg)
            else:  # pragma: no cover - the config union is closed
                raise ConfigError(f"backends.{name}: unsupported backend type")
        except ConfigError as exc:
            raise ConfigError(f"backends.{name}: {exc}") from None
        except protocol.SidekeyError as exc:
            raise ConfigError(f"backends.{name}: {exc.message}") from None
        if not isinstance(cfg, OAuthBackendConfig) and cfg.cache_ttl_s > 0:
            backend = CachedBackend(backend, ttl_s=cfg.cache_ttl_s,
                                    stale_if_error_s=cfg.stale_if_error_s)
        out[name] = backend
    return {name: out[name] for name in loaded.config.backends}


def unwrap(backend: Backend) -> Backend:
    """The backend under any cache wrapper (to start its background task)."""
    inner = getattr(backend, "inner", None)
    return backend if inner is None else unwrap(inner)
