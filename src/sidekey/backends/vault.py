"""The ``vault`` backend: HashiCorp Vault through hvac.

What it does with Vault (API paths relative to ``/v1``):

* **Authentication.** ``auth: token`` reads the token from a file or a systemd
  credential and asks ``auth/token/lookup-self`` for its TTL; ``auth: approle`` logs in
  at ``auth/<approle_mount>/login`` with ``role_id`` and a ``secret_id`` read from a file
  or a credential. :meth:`VaultBackend.run` renews the token (``auth/token/renew-self``)
  before it runs out; a token that cannot be renewed (or is rejected) is replaced by a
  fresh AppRole login, or for ``auth: token`` by the file's current content (so a
  token rotated on disk, e.g. by Vault Agent, is picked up). A call answered with 403
  checks the token (lookup-self): if the token is bad it re-authenticates and retries
  once; if the token is fine the 403 is the policy's answer and is reported as such.
* **Static secrets** are KV v2 reads (``<mount>/data/<path>``, optionally a pinned
  version); rotation writes a new version with check-and-set on the version it read.
* **Dynamic secrets** (``kind: dynamic``) are reads of ``<mount>/<path>`` (for example
  ``database/creds/readonly``) that return a fresh credential with a Vault lease. The
  lease is written to the :class:`~sidekey.backends.LeaseJournal` *before* the value is
  handed out and revoked (``sys/leases/revoke/<lease_id>``, synchronous) when the tool
  call's lease ends. With ``pool_size`` a few credentials are issued ahead of time, each
  handed out once. A credential dies with the token that issued it (Vault revokes a
  token's leases when the token expires, is revoked or runs out of uses): its expiry is
  capped at the token's, a new token retires the pooled credentials of the old one, and
  a token about to die is replaced before it issues anything.
* **Crash between Vault's answer and the journal.** Before the read, an *intent* is
  journaled: "a credential may appear under ``database/creds/readonly/`` between now and
  ``deadline``" (the whole issuing call is bounded, so the deadline holds). Journaling
  the lease resolves the intent atomically. An intent still open after its deadline +
  :data:`~sidekey.backends.INTENT_GRACE_S` is resolved by :meth:`VaultBackend.sweep_orphans`:
  list the leases under the prefix (``LIST sys/leases/lookup/<prefix>``, which needs
  ``sudo`` on that path), drop the ones journaled by anyone (any host on the same
  state store) or pooled, read each remaining lease's ``issue_time``
  (``PUT sys/leases/lookup``) and revoke those issued inside the intent's window.
  Not ``sys/leases/revoke-prefix``: the prefix is the *role*, shared by every host,
  by the warm pool and by calls in flight, and Vault lease ids carry no per-host or
  per-request marker, so a prefix revocation would kill live credentials of others.
  (Vault API: https://developer.hashicorp.com/vault/api-docs/system/leases -- "List
  leases" LIST /sys/leases/lookup/:prefix, sudo, ``{"data": {"keys": [...]}}``; "Read
  lease" PUT /sys/leases/lookup -> ``data.issue_time``; hvac ``sys.list_leases`` /
  ``sys.read_lease``.) What remains: a host that does not share the state store but
  uses the same role can lose a credential it got within the same few seconds as a
  crashed host's intent (its call fails; nothing leaks). Give such hosts a role each.

Every hvac call runs in a worker thread behind a :class:`trio.CapacityLimiter`, bounded
by ``trio.fail_after(timeout_s + CALL_MARGIN_S)`` with ``abandon_on_cancel=True``: a hung
Vault never blocks the event loop (the abandoned thread ends by itself at the HTTP
timeout and keeps its limiter slot until then). A credential whose issuing call was
abandoned is revoked as soon as the thread sees it, never leaked silently.

Secret material -- the token, the AppRole secret_id, the values -- never appears in a
log line, an exception message, :meth:`VaultBackend.health` or a ``repr``. hvac and
``requests`` exceptions are translated here and not chained (``from None``): a
``requests`` exception holds the prepared request, headers (the token) and body
included.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import math
import os
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import hvac
import hvac.exceptions
import msgspec
import requests
import requests.adapters
import trio

from ..config import resolve_path
from ..protocol import BadRequest, ConfigError, SidekeyError
from ..secretfiles import check_private as _check_private
from ..secretfiles import read_secret as _read_secret
from . import INTENT_CLOCK_SKEW_S, BackendError, LeaseJournal, SecretNotFound, SecretValue

if TYPE_CHECKING:
    from ..config import SecretRef, VaultBackendConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

# Extra time the trio side waits beyond the HTTP timeout before it gives up on a call
# (requests applies its timeout per socket operation, so a call can take a bit longer).
CALL_MARGIN_S = 0.5
# A pooled credential with less TTL left than max(2 * timeout_s, this) is revoked
# instead of handed out: the tool call would outlive it.
MIN_POOL_TTL_S = 30.0
# The background loops never spin faster than this, and retry failures this often.
MIN_RECHECK_S = 0.1
RETRY_INTERVAL_S = 5.0
MAX_SLEEP_S = 300.0
# health() asks Vault (lookup-self) at most this often; in between it reports what the
# last call saw. The health endpoint is anonymous: it must not become a Vault load test.
HEALTH_PROBE_INTERVAL_S = 10.0
# A revocation that keeps failing is left to the journal sweep / Vault's own TTL.
MAX_REVOKE_ATTEMPTS = 5
MAX_ERROR_CHARS = 300
MAX_LEASE_ID_CHARS = 1024
# The calls one issuance may make (the read, a re-authentication of two calls, the
# read again): the issuing call is bounded by this many call budgets, and so is its
# intent's deadline.
ISSUE_CALLS = 4
# An orphan sweep looks at most this many unjournaled leases under one prefix per round.
MAX_ORPHAN_SCAN = 10_000

_ERRNO_RE = re.compile(r"\[Errno -?\d+\] ([^'\"()\]]+)")
# Vault's answers to a revocation of a lease it does not know (any more).
_UNKNOWN_LEASE_RE = re.compile(r"lease not found|invalid lease|lease .*not exist", re.IGNORECASE)
_UNKNOWN_ROLE_RE = re.compile(r"unknown role|role .*not exist|no such role", re.IGNORECASE)

_STATUS: dict[type[hvac.exceptions.VaultError], int] = {
    hvac.exceptions.InvalidRequest: 400,
    hvac.exceptions.Unauthorized: 401,
    hvac.exceptions.Forbidden: 403,
    hvac.exceptions.InvalidPath: 404,
    hvac.exceptions.PreconditionFailed: 412,
    hvac.exceptions.RateLimitExceeded: 429,
    hvac.exceptions.InternalServerError: 500,
    hvac.exceptions.VaultNotInitialized: 501,
    hvac.exceptions.BadGateway: 502,
    hvac.exceptions.VaultDown: 503,
}


class _StatusAdapter(hvac.adapters.JSONAdapter):
    """hvac's JSON adapter, keeping the HTTP status (and ``Retry-After``) on the error it
    raises: hvac maps only nine statuses to exception classes and raises every other one
    (405, 412, 504, Vault's 472/473 ...) as ``UnexpectedError`` without its number."""

    def _raise_for_error(self, method: str, url: str, response: requests.Response) -> None:
        try:
            super()._raise_for_error(method, url, response)  # type: ignore[misc]
        except hvac.exceptions.VaultError as exc:
            exc.status_code = response.status_code  # type: ignore[attr-defined]
            exc.retry_after = response.headers.get("Retry-After")  # type: ignore[attr-defined]
            raise


def _status_of(exc: hvac.exceptions.VaultError) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else _STATUS.get(type(exc))


def _kv_version_gone(exc: hvac.exceptions.VaultError) -> tuple[int, str] | None:
    """For a KV v2 read answered 404: ``(version, "deleted at <time>" | "destroyed")`` when
    the secret exists but its version is deleted or destroyed (Vault sends the version's
    metadata with ``data: null``; vault-plugin-secrets-kv path_data.go pathDataRead), None
    when there is no such secret (404 ``{"errors": []}``)."""
    body = exc.json if isinstance(exc.json, dict) else None
    data = body.get("data") if body is not None else None
    meta = data.get("metadata") if isinstance(data, dict) else None
    if not isinstance(meta, dict):
        return None
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version <= 0:
        return None
    if meta.get("destroyed") is True:
        return version, "destroyed"
    deleted = meta.get("deletion_time")
    if isinstance(deleted, str) and deleted:
        return version, f"deleted at {deleted[:40]}"
    return None


# --------------------------------------------------------------------------- Vault's answers
# Only the fields sidekey reads; Vault sends more (and adds fields over time), so unknown
# fields are allowed here, unlike sidekey's own wire messages.


class _R(msgspec.Struct, frozen=True, kw_only=True):
    pass


class _TokenAuth(_R, frozen=True, kw_only=True):
    client_token: str = ""
    lease_duration: int = 0
    renewable: bool = False
    num_uses: int = 0  # 0: unlimited


class _AuthResponse(_R, frozen=True, kw_only=True):
    auth: _TokenAuth


class _LookupData(_R, frozen=True, kw_only=True):
    ttl: int = 0  # what is left
    creation_ttl: int = 0  # what a grant gives (what renewals restore)
    renewable: bool = False
    num_uses: int = 0  # uses left; 0: unlimited


class _LookupResponse(_R, frozen=True, kw_only=True):
    data: _LookupData


class _KvMetadata(_R, frozen=True, kw_only=True):
    version: int


class _KvVersion(_R, frozen=True, kw_only=True):
    data: dict[str, Any] | None = None
    metadata: _KvMetadata


class _KvReadResponse(_R, frozen=True, kw_only=True):
    data: _KvVersion


class _KvWriteResponse(_R, frozen=True, kw_only=True):
    data: _KvMetadata


class _LeaseList(_R, frozen=True, kw_only=True):
    keys: list[str] = []


class _LeaseListResponse(_R, frozen=True, kw_only=True):
    data: _LeaseList


class _LeaseInfo(_R, frozen=True, kw_only=True):
    issue_time: str = ""


class _LeaseInfoResponse(_R, frozen=True, kw_only=True):
    data: _LeaseInfo


class _LeaseResponse(_R, frozen=True, kw_only=True):
    lease_id: str = ""
    lease_duration: int = 0
    renewable: bool = False
    data: dict[str, Any] | None = None


# --------------------------------------------------------------------------- helpers


@dataclass(slots=True, repr=False)
class _Credential:
    """A dynamic credential Vault issued: the value lives in ``data`` only."""

    lease_id: str
    data: dict[str, Any]
    lease_duration: int
    # On the backend's clock: the lease's end, or the issuing token's expiry if sooner
    # (Vault revokes a token's leases with the token; lease_duration ignores the token).
    expires_at: float
    token_serial: int  # which token issued it (see VaultBackend._token_serial)

    def __repr__(self) -> str:
        return f"_Credential(lease_id={self.lease_id!r}, data=<redacted>)"


@dataclass(frozen=True, slots=True)
class _KvGone:
    """A KV v2 secret whose current version is deleted or destroyed (it still counts for
    check-and-set: Vault compares cas with current_version, which deletion keeps)."""

    version: int
    how: str  # "deleted at <time>" or "destroyed"


@dataclass(slots=True)
class _Pool:
    """Warm credentials for one ``<mount>/<path>``, oldest first."""

    mount: str
    path: str
    target: int
    items: collections.deque[_Credential] = field(default_factory=collections.deque)
    disabled: str | None = None  # why the pool is not refilled (issued TTLs too short)
    failing: bool = False  # a refill failed; logged once per streak

    @property
    def label(self) -> str:
        return f"{self.mount}/{self.path}"


class _Handoff:
    """Shared by the trio task that issues a credential and the worker thread doing it.

    If the task gives up (timeout, cancellation) while the thread still runs, whichever
    side sees the lease id last is responsible for revoking it: the thread revokes it
    itself when it finds the call abandoned; the task queues it when the thread had
    delivered it just before the task gave up.
    """

    __slots__ = ("_abandoned", "_lease_id", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._lease_id: str | None = None

    def deliver(self, lease_id: str) -> bool:
        """Thread side: record the lease; False if the task has already given up."""
        with self._lock:
            if self._abandoned:
                return False
            self._lease_id = lease_id
            return True

    def abandon(self) -> str | None:
        """Task side: give up; returns a lease id delivered but never received."""
        with self._lock:
            self._abandoned = True
            return self._lease_id


def _transport_reason(exc: requests.exceptions.RequestException) -> str:
    """A short, secret-free reason for a transport failure."""
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error"
    if isinstance(exc, requests.exceptions.Timeout):
        return "timed out"
    match = _ERRNO_RE.search(str(exc))
    if match:
        return match.group(1).strip().lower()
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "connection failed"
    return type(exc).__name__


def _errors_of(exc: hvac.exceptions.VaultError) -> str:
    errors = exc.errors
    if isinstance(errors, list):
        text = "; ".join(str(e) for e in errors if e)
    elif errors:
        text = str(errors)
    else:
        text = ""
    return text[:MAX_ERROR_CHARS]


def _segments(value: str | None, what: str, label: str) -> str:
    """``value`` without leading/trailing slashes; refuses empty and dot segments (a
    reference must not climb out of its mount)."""
    if value is None:
        raise SecretNotFound(f"vault secret {label}: a vault reference needs mount and path")
    stripped = value.strip("/")
    parts = stripped.split("/")
    if not stripped or any(p in ("", ".", "..") for p in parts):
        raise SecretNotFound(f"vault secret {label}: invalid {what} {value!r}")
    return stripped


def _as_text(value: object) -> str:
    """A KV value as the string handed to the tool: strings as they are, anything else
    (numbers, nested objects) as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


# --------------------------------------------------------------------------- the backend


class VaultBackend:
    """:class:`~sidekey.backends.Backend` over HashiCorp Vault (see the module doc).

    The constructor reads and checks the auth material files (so a missing or
    world-readable token refuses start) but does no network I/O: the first call, or
    :meth:`run`, authenticates. Raises :class:`ConfigError`.
    """

    def __init__(
        self,
        name: str,
        cfg: VaultBackendConfig,
        *,
        base_dir: Path,
        journal: LeaseJournal | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._cfg = cfg
        self._journal = journal
        self._clock = clock
        self._addr = cfg.addr.rstrip("/")
        self._limiter = trio.CapacityLimiter(cfg.max_concurrency)

        def resolve(p: str | None) -> Path | None:
            return resolve_path(base_dir, p) if p is not None else None

        self._token_path = resolve(cfg.token_file)
        self._secret_id_path = resolve(cfg.secret_id_file)
        if cfg.auth == "token":
            if (cfg.token_file is None) == (cfg.token_credential is None):
                raise ConfigError("auth token needs exactly one of token_file or token_credential")
        else:
            if not cfg.role_id:
                raise ConfigError("auth approle needs role_id")
            if (cfg.secret_id_file is None) == (cfg.secret_id_credential is None):
                raise ConfigError(
                    "auth approle needs exactly one of secret_id_file or secret_id_credential"
                )
        verify: bool | str = True
        if cfg.ca_file is not None:
            ca = resolve_path(base_dir, cfg.ca_file)
            if not ca.is_file():
                raise ConfigError(f"{ca}: ca_file does not exist or is not a file")
            verify = str(ca)
        cert: tuple[str, str] | None = None
        if (cfg.client_cert is None) != (cfg.client_key is None):
            raise ConfigError("set both client_cert and client_key, or neither")
        if cfg.client_cert is not None and cfg.client_key is not None:
            cert_path = resolve_path(base_dir, cfg.client_cert)
            key_path = resolve_path(base_dir, cfg.client_key)
            if not cert_path.is_file():
                raise ConfigError(f"{cert_path}: client_cert does not exist or is not a file")
            try:
                key_st = os.stat(key_path)
            except OSError as exc:
                raise ConfigError(f"{key_path}: cannot read client_key: {exc.strerror}") from None
            _check_private(key_path, key_st, "client key")
            cert = (str(cert_path), str(key_path))
        # Read the auth material now: a bad file refuses start. It is read again at
        # every (re-)authentication, so a rotated file is picked up.
        material = self._read_auth_material()

        # One HTTP connection pool for all worker threads (urllib3 pools are thread
        # safe), as large as the limiter lets calls run at once; no HTTP-level retries:
        # the timeouts above are the whole budget of a call.
        session = requests.Session()
        http = requests.adapters.HTTPAdapter(
            pool_connections=1, pool_maxsize=cfg.max_concurrency, max_retries=0
        )
        session.mount("https://", http)
        session.mount("http://", http)
        session.verify = verify
        session.cert = cert
        self._session = session
        # The stubs type `timeout` as int; requests takes a float, and 0.5 s must not
        # become 0. token="" (not None) keeps hvac from reading $VAULT_TOKEN/~/.vault-token.
        options: dict[str, Any] = {
            "url": self._addr,
            "token": "",
            "namespace": cfg.namespace,
            "verify": verify,
            "cert": cert,
            "timeout": cfg.timeout_s,
            "session": session,
            "adapter": _StatusAdapter,
        }
        self._client = hvac.Client(**options)
        # Logins go through a client that never carries a token: a stale token in the
        # header of a login request is at best useless.
        self._login_client = hvac.Client(**options)
        if cfg.auth == "token":
            self._client.token = material
        del material

        # Authentication state (the token itself lives only in the hvac client).
        self._auth_lock = trio.Lock()
        self._auth_gen = 0
        # Bumped when the client's token is replaced (not when the same one is looked up
        # again): credentials issued under an older token die when that token does.
        self._token_serial = 0
        self._authenticated = False
        self._token_expires_at: float | None = None  # None: the token never expires
        self._token_granted_s = 0
        self._token_renewable = False
        self._token_num_uses = 0  # uses left when last seen; 0: unlimited
        self._renewal_exhausted = False  # renew-self no longer extends the token
        self._auth_wakeup = trio.Event()
        # What the last call saw, for health().
        self._reachable: bool | None = None
        self._last_error: str | None = None
        self._last_probe = -math.inf
        self._probe_error: str | None = None  # what the last health probe found wrong
        self._health_lock = trio.Lock()
        # Warm pools and credentials waiting for revocation (lease id -> attempts).
        self._pools: dict[tuple[str, str], _Pool] = {}
        self._to_revoke: dict[str, int] = {}
        self._pool_wakeup = trio.Event()
        self._closing = False
        self._closed = False

    # ------------------------------------------------------------------ public API

    def register(self, ref: SecretRef) -> None:
        """Keep a warm pool for ``ref`` if it is ``kind: dynamic`` with ``pool_size > 0``
        (no-op otherwise). :meth:`run` fills it; :meth:`fetch` registers on first use,
        so calling this at start only makes the first calls fast."""
        if ref.kind != "dynamic" or ref.pool_size <= 0:
            return
        mount = _segments(ref.mount, "mount", ref.label)
        path = _segments(ref.path, "path", ref.label)
        pool = self._pools.get((mount, path))
        if pool is None:
            self._pools[(mount, path)] = _Pool(mount=mount, path=path, target=ref.pool_size)
            self._pool_wakeup.set()
        elif ref.pool_size > pool.target:
            pool.target = ref.pool_size
            self._pool_wakeup.set()

    def pooled_lease_ids(self) -> frozenset[str]:
        """Lease ids of pooled credentials not handed out yet (journaled, but not tied
        to a tool call: a journal sweep must leave them alone)."""
        return frozenset(c.lease_id for p in self._pools.values() for c in p.items)

    async def fetch(self, ref: SecretRef) -> SecretValue:
        """The KV v2 value ``ref`` selects, or a fresh credential for ``kind: dynamic``
        (journaled before it is returned). Raises :class:`SecretNotFound`,
        :class:`BackendError`."""
        if ref.kind == "dynamic":
            return await self._fetch_dynamic(ref)
        return await self._fetch_static(ref)

    async def release(self, lease_id: str) -> None:
        """Revoke a dynamic credential's Vault lease, then mark it revoked in the journal.

        A lease Vault no longer knows (expired, already revoked) counts as revoked.
        Raises :class:`BackendError` (the journal keeps the lease for a later retry).
        """
        if not lease_id or len(lease_id) > MAX_LEASE_ID_CHARS:
            raise BadRequest("invalid vault lease id", code="bad_lease_id")
        # A journal sweep may name a pooled credential (journaled, no tool call yet):
        # take it out of the pool so it is never handed out after its revocation.
        for pool in self._pools.values():
            for cred in list(pool.items):
                if cred.lease_id == lease_id:
                    pool.items.remove(cred)
                    self._pool_wakeup.set()
        self._to_revoke.pop(lease_id, None)
        await self._revoke(lease_id)
        log.debug("vault backend %r: revoked lease %s", self.name, lease_id)
        if self._journal is not None:
            await self._journal.revoked(self.name, lease_id)

    async def rotate(self, ref: SecretRef, value: str) -> str:
        """Write ``value`` as a new KV v2 version of ``ref``'s secret; returns the version.

        The key written is ``ref.key``, else the secret's single key, else ``"value"``
        for a secret that does not exist yet (it is created). Other keys of the secret
        are kept. The write is a check-and-set on the version read, so a concurrent
        writer's version is never silently overwritten. A failed write leaves the old
        version current. Raises :class:`BackendError`, :class:`SecretNotFound`,
        :class:`BadRequest` (dynamic secrets cannot be rotated).
        """
        if ref.kind != "static":
            raise BadRequest(
                f"vault secret {ref.label} is kind: dynamic; Vault issues those, they cannot be rotated",
                code="rotate_unsupported",
            )
        if not isinstance(value, str) or not value:
            raise BadRequest("secret value is empty", code="secret_empty")
        mount = _segments(ref.mount, "mount", ref.label)
        path = _segments(ref.path, "path", ref.label)
        label = f"{mount}/{path}"
        current = await self._authed(
            f"KV read of {label}", lambda: self._w_kv_read(mount, path, None, missing_ok=True), label
        )
        if current is None:
            data: dict[str, Any] = {}
            cas = 0
            before = "absent"
        elif isinstance(current, _KvGone):
            # The next version is written from scratch (the keys of a deleted version
            # cannot be read), with cas on the deleted one: Vault's current_version.
            data, cas = {}, current.version
            before = f"{cas} ({current.how})"
            log.warning("vault backend %r: the current version %d of %s was %s; rotation "
                        "writes version %d with only the rotated key", self.name, cas, label,
                        current.how, cas + 1)
        else:
            parsed = self._parse(current, _KvReadResponse, f"KV read of {label}")
            data = dict(parsed.data.data or {})
            cas = parsed.data.metadata.version
            before = str(cas)
        if ref.key is not None:
            key = ref.key
        elif len(data) == 1:
            (key,) = data
        elif not data:
            key = "value"
        else:
            raise SecretNotFound(
                f"vault secret {label} has {len(data)} keys ({', '.join(sorted(data))}); "
                "set key to say which one to rotate"
            )
        # The worker thread gets its own dict, never touched again here: a cancelled
        # call abandons its thread, which may still be serialising the request.
        payload = {**data, key: value}
        try:
            written = await self._authed(
                f"KV write of {label}",
                lambda: self._w_kv_write(mount, path, payload, cas),
                label,
                secrets=(value,),
            )
        except BackendError as exc:
            raise BackendError(
                f"{exc.message} (the rotation of {label} may not have been applied; "
                f"its current version stays {before} unless Vault confirmed the write)"
            ) from None
        version = str(self._parse(written, _KvWriteResponse, f"KV write of {label}").data.version)
        log.info("vault backend %r: rotated %s#%s to version %s", self.name, label, key, version)
        return version

    async def health(self) -> dict[str, object]:
        """``{"type": "vault", "ok", "reachable", "authenticated", "token_ttl_s", "auth",
        "pools": {label: size}, "error"?}``. Asks Vault at most every
        :data:`HEALTH_PROBE_INTERVAL_S`; never shows a token or a value."""
        if (
            not self._closing
            and trio.current_time() - self._last_probe >= HEALTH_PROBE_INTERVAL_S
            and not self._health_lock.locked()
        ):
            async with self._health_lock:
                self._last_probe = trio.current_time()
                try:
                    # sys/health is unauthenticated: it spends no use of the token.
                    sealed = await self._call("health check", self._w_sys_health)
                    if sealed is not None:
                        raise BackendError(f"vault at {self._addr} is {sealed}")
                    await self._ensure_auth()
                    if self._token_num_uses == 0:
                        # lookup-self spends a use: only for tokens with no use limit (it
                        # finds a token revoked behind sidekey's back; a limited token's
                        # health rests on its TTL as last seen).
                        raw = await self._call("token lookup", self._w_lookup_self)
                        data = self._parse(raw, _LookupResponse, "token lookup").data
                        self._set_token(data.ttl, data.renewable, data.creation_ttl)
                        self._note_uses(data.num_uses)
                    self._last_error = None
                    self._probe_error = None
                except hvac.exceptions.VaultError as exc:
                    if isinstance(exc, hvac.exceptions.Forbidden):
                        # The token was revoked (or expired) behind sidekey's back: the
                        # next call authenticates again.
                        self._authenticated = False
                    self._last_error = self._probe_error = self._translate(exc, "token lookup").message
                except SidekeyError as exc:
                    self._probe_error = exc.message  # recorded by the failing call too
        ttl: int | None = None
        if self._authenticated and self._token_expires_at is not None:
            ttl = max(0, int(self._token_expires_at - self._clock()))
        authenticated = self._authenticated and not self._token_expired()
        ok = bool(self._reachable) and authenticated and not self._closing and self._probe_error is None
        info: dict[str, object] = {
            "type": "vault",
            "ok": ok,
            "reachable": self._reachable,
            "authenticated": authenticated,
            "token_ttl_s": ttl,
            "auth": self._cfg.auth,
            "pools": {p.label: len(p.items) for p in self._pools.values()},
        }
        if not ok:
            info["error"] = (
                "backend closed" if self._closing
                else self._probe_error or self._last_error or "not connected yet"
            )
        return info

    async def probe(self, refs: Sequence[SecretRef]) -> list[dict[str, object]]:
        """What sidekey will ask of Vault for ``refs`` that the token's policy does not
        allow: one ``{"path", "capability", "needed_for", "required"}`` per missing
        capability (empty: everything is granted). ``required`` is false for what only
        an operator's action needs (``sidekey rotate``). One request (``POST
        sys/capabilities-self``, in Vault's default policy), which counts one use of a
        token with ``num_uses``. Raises :class:`BackendError` (Vault down, login failed).

        The policy this checks against is ``examples/vault/sidekey-policy.hcl``.
        """
        wanted: list[tuple[str, str, str, bool]] = [
            ("auth/token/lookup-self", "read", "checking the token", True),
            ("auth/token/renew-self", "update", "renewing the token", True),
        ]
        for ref in refs:
            mount = _segments(ref.mount, "mount", ref.label)
            path = _segments(ref.path, "path", ref.label)
            if ref.kind == "dynamic":
                role = f"{mount}/{path}"
                wanted += [
                    (role, "read", f"issuing credentials from {role}", True),
                    # URL form: the probe path stands for any lease id under the role.
                    (f"sys/leases/revoke/{role}/lease-id", "update",
                     f"revoking {role} credentials at release", True),
                    (f"sys/leases/lookup/{role}/", "list",
                     f"finding {role} credentials orphaned by a crash", True),
                    (f"sys/leases/lookup/{role}/", "sudo",
                     f"finding {role} credentials orphaned by a crash", True),
                    ("sys/leases/lookup", "update", "reading an orphaned lease's issue time", True),
                ]
            else:
                data = f"{mount}/data/{path}"
                wanted += [
                    (data, "read", f"reading {ref.label}", True),
                    (data, "update", f"rotating {ref.label} (sidekey rotate)", False),
                ]
        paths = sorted({p for p, _, _, _ in wanted})
        raw = await self._authed(
            "capability check", lambda: self._w_capabilities(paths), "sys/capabilities-self")
        body = raw.get("data") if isinstance(raw, dict) else None
        if not isinstance(body, dict):
            raise BackendError("vault capability check: unexpected response (no data)")
        missing: list[dict[str, object]] = []
        seen: set[tuple[str, str]] = set()
        for path, capability, why, required in wanted:
            caps = body.get(path)
            granted = set(caps) if isinstance(caps, list) else set()
            if "root" in granted or (capability in granted and "deny" not in granted):
                continue
            if (path, capability) in seen:
                continue
            seen.add((path, capability))
            missing.append({"path": path, "capability": capability, "needed_for": why,
                            "required": required})
        return missing

    async def aclose(self) -> None:
        """Revoke pooled credentials never handed out (bounded in time: what cannot be
        revoked stays in the journal), then close the HTTP session. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._pool_wakeup.set()
        self._auth_wakeup.set()
        leftovers = [c.lease_id for p in self._pools.values() for c in p.items]
        leftovers += list(self._to_revoke)
        for pool in self._pools.values():
            pool.items.clear()
        self._to_revoke.clear()
        if leftovers and self._authenticated:
            with trio.CancelScope(shield=True), trio.move_on_after(
                self._cfg.timeout_s + CALL_MARGIN_S
            ) as scope:
                async with trio.open_nursery() as nursery:
                    for lease_id in leftovers:
                        nursery.start_soon(self._revoke_quietly, lease_id)
            if scope.cancelled_caught:
                log.warning("vault backend %r: closing before every unused pooled credential "
                            "was revoked; the journal keeps the rest", self.name)
        self._closed = True
        self._session.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the token alive and the warm pools full, until cancelled or closed.

        Reports started at once: a Vault that is down at start delays nothing; calls
        fail with :class:`BackendError` until it is back.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._auth_loop)
            nursery.start_soon(self._pool_loop)
            task_status.started()

    # ------------------------------------------------------------------ static secrets

    async def _fetch_static(self, ref: SecretRef) -> SecretValue:
        mount = _segments(ref.mount, "mount", ref.label)
        path = _segments(ref.path, "path", ref.label)
        label = f"{mount}/{path}" + (f" version {ref.version}" if ref.version else "")
        raw = await self._authed(
            f"KV read of {label}", lambda: self._w_kv_read(mount, path, ref.version), label
        )
        parsed = self._parse(raw, _KvReadResponse, f"KV read of {label}").data
        data = parsed.data or {}
        version = str(parsed.metadata.version)
        if ref.key is not None:
            if ref.key not in data:
                raise SecretNotFound(
                    f"vault secret {mount}/{path} version {version} has no key {ref.key!r} "
                    f"(keys: {', '.join(sorted(data)) or 'none'})",
                    code="secret_key_not_found",
                )
            return SecretValue(value=_as_text(data[ref.key]), version=version)
        if len(data) != 1:
            raise SecretNotFound(
                f"vault secret {mount}/{path} has {len(data)} keys "
                f"({', '.join(sorted(data)) or 'none'}); set key to pick one",
                code="secret_key_not_found",
            )
        (only,) = data.values()
        return SecretValue(value=_as_text(only), version=version)

    # ------------------------------------------------------------------ dynamic secrets

    async def _fetch_dynamic(self, ref: SecretRef) -> SecretValue:
        mount = _segments(ref.mount, "mount", ref.label)
        path = _segments(ref.path, "path", ref.label)
        cred: _Credential | None = None
        if ref.pool_size > 0:
            self.register(ref)
            pool = self._pools[(mount, path)]
            cred = self._take_pooled(pool)
        if cred is None:
            cred = await self._issue(mount, path)
        try:
            value = self._select(cred, ref, f"{mount}/{path}")
        except SecretNotFound:
            with trio.CancelScope(shield=True):
                await self._revoke_quietly(cred.lease_id)  # never handed out
            raise
        ttl = max(0, int(cred.expires_at - self._clock()))
        return SecretValue(value=value, version="dynamic", lease_id=cred.lease_id, lease_ttl_s=ttl)

    @staticmethod
    def _select(cred: _Credential, ref: SecretRef, label: str) -> str:
        if ref.key is None:
            return json.dumps(cred.data, separators=(",", ":"))
        if ref.key not in cred.data:
            raise SecretNotFound(
                f"vault credential from {label} has no key {ref.key!r} "
                f"(keys: {', '.join(sorted(cred.data)) or 'none'})",
                code="secret_key_not_found",
            )
        return _as_text(cred.data[ref.key])

    def _pool_threshold(self) -> float:
        return max(2 * self._cfg.timeout_s, MIN_POOL_TTL_S)

    def _take_pooled(self, pool: _Pool) -> _Credential | None:
        """The oldest pooled credential with enough TTL left (each handed out once);
        stale ones are queued for revocation. Always wakes the refill."""
        self._pool_wakeup.set()
        now = self._clock()
        while pool.items:
            cred = pool.items.popleft()
            if cred.token_serial == self._token_serial and cred.expires_at - now >= self._pool_threshold():
                return cred
            log.info("vault backend %r: pooled credential %s for %s has too little TTL left or "
                     "an old token issued it; revoking it instead of handing it out", self.name,
                     cred.lease_id, pool.label)
            self._to_revoke.setdefault(cred.lease_id, 0)
        return None

    def _issue_budget(self) -> float:
        return ISSUE_CALLS * (self._cfg.timeout_s + CALL_MARGIN_S)

    async def _issue(self, mount: str, path: str) -> _Credential:
        """A fresh credential from ``<mount>/<path>``, journaled before it is returned
        (and announced by an intent before Vault is asked: see the module doc)."""
        label = f"{mount}/{path}"
        intent_id: str | None = None
        journal = self._journal
        if journal is not None:
            intent_id = f"int_{uuid.uuid4().hex}"
            at = self._clock()
            # The last moment Vault can create this credential: every request is sent
            # within the budget (fail_after below), and an abandoned worker thread's
            # request reaches Vault within one more call timeout (connect + send).
            deadline = at + self._issue_budget() + self._cfg.timeout_s + CALL_MARGIN_S
            await journal.intent(self.name, intent_id, f"{label}/", at=at, deadline=deadline)
        handoff = _Handoff()
        try:
            with trio.fail_after(self._issue_budget()):
                await self._ensure_token_life(self._pool_threshold())
                serial, token_expires = self._token_serial, self._token_expires_at
                raw = await self._authed(
                    f"read of {label}", lambda: self._w_issue(mount, path, handoff), label
                )
                if self._token_serial != serial:
                    # Re-authenticated during the call (a 403 retry, or another task):
                    # the credential may be the old token's; count it as the older one.
                    token_expires = min(token_expires or math.inf,
                                        self._token_expires_at or math.inf)
        except BaseException as exc:
            orphan = handoff.abandon()
            if orphan is not None:
                # The thread delivered a lease just as we gave up on it: nobody will
                # hand it out, so it is revoked in the background (and if that fails and
                # the daemon dies, the intent, left open, lets the sweep find it).
                self._to_revoke.setdefault(orphan, 0)
                self._pool_wakeup.set()
            elif journal is not None and intent_id is not None and isinstance(exc, SecretNotFound):
                # Vault answered (unknown role): it created nothing. Other failures may
                # have a request still on its way; the sweep resolves those intents.
                await self._intent_done_quietly(journal, intent_id)
            if isinstance(exc, trio.TooSlowError):
                raise BackendError(f"vault read of {label} did not complete within "
                                   f"{self._issue_budget():g} s") from None
            raise
        try:
            parsed = self._parse(raw, _LeaseResponse, f"read of {label}")
            if not parsed.lease_id or parsed.lease_duration <= 0 or not parsed.data:
                raise BackendError(
                    f"vault read of {label} returned no leased credential (lease_id, "
                    "lease_duration and data are required): is it really a dynamic secret?"
                )
        except BackendError:
            lease_id = raw.get("lease_id") if isinstance(raw, dict) else None
            if isinstance(lease_id, str) and lease_id:
                with trio.CancelScope(shield=True):
                    await self._revoke_quietly(lease_id)
            raise
        cred = _Credential(
            lease_id=parsed.lease_id,
            data=dict(parsed.data),
            lease_duration=parsed.lease_duration,
            expires_at=min(self._clock() + parsed.lease_duration,
                           math.inf if token_expires is None else token_expires),
            token_serial=serial,
        )
        if self._journal is not None:
            try:
                await self._journal.issued(self.name, cred.lease_id, cred.expires_at,
                                           intent_id=intent_id)
            except BaseException:
                # Not journaled means not revocable after a crash: never hand it out.
                with trio.CancelScope(shield=True):
                    await self._revoke_quietly(cred.lease_id)
                raise
        log.debug("vault backend %r: issued lease %s from %s (ttl %d s)",
                  self.name, cred.lease_id, label, cred.lease_duration)
        return cred

    async def _intent_done_quietly(self, journal: LeaseJournal, intent_id: str) -> None:
        try:
            with trio.CancelScope(shield=True):
                await journal.intent_done(self.name, intent_id)
        except Exception as exc:  # left open: the sweep resolves it later
            log.debug("vault backend %r: intent %s not resolved: %s", self.name, intent_id,
                      getattr(exc, "message", type(exc).__name__))

    async def sweep_orphans(
        self,
        prefix: str,
        windows: Sequence[tuple[float, float]],
        is_journaled: Callable[[list[str]], Awaitable[set[str]]],
    ) -> int:
        """Revoke the credentials under lease-id ``prefix`` that Vault issued within one of
        ``windows`` (``(at, deadline)`` on the journaling host's clock, widened by
        :data:`~sidekey.backends.INTENT_CLOCK_SKEW_S`) and that nobody journaled
        (``is_journaled`` answers which of a list are) nor pooled. Returns how many were
        revoked. Raises :class:`BackendError` (Vault down, no ``sudo`` on
        ``sys/leases/lookup``, a revocation failed): the caller keeps its intents open
        and tries again.
        """
        if not prefix.endswith("/") or len(prefix) > MAX_LEASE_ID_CHARS:
            raise BadRequest("invalid vault lease prefix", code="bad_lease_id")
        _segments(prefix, "lease prefix", prefix)
        listed = await self._authed(
            f"lease list of {prefix}", lambda: self._w_list_leases(prefix), prefix)
        keys = [] if listed is None else self._parse(
            listed, _LeaseListResponse, f"lease list of {prefix}").data.keys
        # Keys ending in "/" are deeper levels (another role whose name continues ours
        # is a sibling, not a child: database/creds/ro/ vs database/creds/ro2/).
        ids = [prefix + k for k in keys if k and not k.endswith("/")][:MAX_ORPHAN_SCAN]
        if not ids:
            return 0
        skip = await is_journaled(ids) | self.pooled_lease_ids() | set(self._to_revoke)
        revoked = 0
        for lease_id in ids:
            if lease_id in skip or len(lease_id) > MAX_LEASE_ID_CHARS:
                continue
            issued = await self._lease_issue_time(lease_id)
            if issued is None or not any(
                at - INTENT_CLOCK_SKEW_S <= issued <= deadline + INTENT_CLOCK_SKEW_S
                for at, deadline in windows
            ):
                continue
            if not await self._revoke_quietly(lease_id):
                raise BackendError(f"vault backend {self.name!r}: could not revoke the orphaned "
                                   f"lease {lease_id}")
            log.warning("vault backend %r: revoked lease %s, issued for a call that crashed "
                        "before it was journaled", self.name, lease_id)
            revoked += 1
        return revoked

    async def _lease_issue_time(self, lease_id: str) -> float | None:
        """When Vault issued ``lease_id`` (epoch seconds); None if it is gone already."""
        raw = await self._authed(
            "lease lookup", lambda: self._w_read_lease(lease_id), "the lease")
        if raw is None:
            return None
        text = self._parse(raw, _LeaseInfoResponse, "lease lookup").data.issue_time
        try:
            # RFC 3339 with nanoseconds (2017-04-30T10:18:11.228946471-04:00); Python 3.11
            # reads it (digits past microseconds are dropped).
            return datetime.datetime.fromisoformat(text).timestamp()
        except ValueError:
            log.warning("vault backend %r: lease %s has an unreadable issue_time; left to its "
                        "TTL", self.name, lease_id)
            return None

    async def _revoke(self, lease_id: str) -> None:
        await self._authed("lease revocation", lambda: self._w_revoke(lease_id), "the lease")

    async def _revoke_quietly(self, lease_id: str) -> bool:
        """Revoke and un-journal; log (with the lease id only) instead of raising."""
        try:
            await self._revoke(lease_id)
        except SidekeyError as exc:
            log.warning("vault backend %r: could not revoke lease %s: %s",
                        self.name, lease_id, exc.message)
            return False
        if self._journal is not None:
            try:
                await self._journal.revoked(self.name, lease_id)
            except Exception as exc:
                log.warning("vault backend %r: lease %s revoked but not marked in the journal: %s",
                            self.name, lease_id, getattr(exc, "message", type(exc).__name__))
        return True

    async def _revoke_pending(self) -> bool:
        """Revoke queued leases (orphans, stale pooled ones); True if some must be retried."""
        retry = False
        for lease_id in list(self._to_revoke):
            if self._closing:
                return False
            if await self._revoke_quietly(lease_id):
                self._to_revoke.pop(lease_id, None)
                continue
            attempts = self._to_revoke.get(lease_id, 0) + 1
            if attempts >= MAX_REVOKE_ATTEMPTS:
                log.error("vault backend %r: giving up revoking lease %s after %d attempts "
                          "(the journal sweep or Vault's TTL ends it)", self.name, lease_id, attempts)
                self._to_revoke.pop(lease_id, None)
            else:
                self._to_revoke[lease_id] = attempts
                retry = True
        return retry

    async def _refill(self, pool: _Pool) -> bool:
        """Top ``pool`` up to its target; False if Vault failed (retry later)."""
        now = self._clock()
        for cred in list(pool.items):
            if cred.token_serial != self._token_serial or cred.expires_at - now < self._pool_threshold():
                pool.items.remove(cred)
                self._to_revoke.setdefault(cred.lease_id, 0)
        while not self._closing and pool.disabled is None and len(pool.items) < pool.target:
            try:
                cred = await self._issue(pool.mount, pool.path)
            except Exception as exc:  # incl. a failing journal: never end run()
                if not pool.failing:
                    log.warning("vault backend %r: cannot refill the warm pool of %s: %s",
                                self.name, pool.label,
                                exc.message if isinstance(exc, SidekeyError) else repr(exc))
                pool.failing = True
                return False
            pool.failing = False
            if self._closing:
                await self._revoke_quietly(cred.lease_id)
                return True
            if cred.lease_duration < self._pool_threshold():
                pool.disabled = (f"credentials from {pool.label} live {cred.lease_duration} s, "
                                 f"less than the {self._pool_threshold():g} s a pooled one needs")
            elif 0 < self._token_granted_s < self._pool_threshold():
                # Every credential dies with its token: a pooled one would never last.
                pool.disabled = (f"vault tokens live {self._token_granted_s} s, less than the "
                                 f"{self._pool_threshold():g} s a pooled credential needs (its "
                                 "token's death revokes it); raise the token TTL")
            if pool.disabled is not None:
                log.warning("vault backend %r: warm pool disabled: %s", self.name, pool.disabled)
                await self._revoke_quietly(cred.lease_id)
                return True
            pool.items.append(cred)
        return True

    async def _pool_loop(self) -> None:
        while not self._closing:
            self._pool_wakeup = trio.Event()
            retry = await self._revoke_pending()
            for pool in list(self._pools.values()):
                if not await self._refill(pool):
                    retry = True
            if self._closing:
                return
            if self._to_revoke and not retry:
                continue  # queued while we refilled
            delay = MAX_SLEEP_S
            now = self._clock()
            for pool in self._pools.values():
                for cred in pool.items:
                    delay = min(delay, cred.expires_at - self._pool_threshold() - now)
            if retry:
                delay = min(delay, RETRY_INTERVAL_S)
            with trio.move_on_after(max(delay, 0.0)):
                await self._pool_wakeup.wait()

    # ------------------------------------------------------------------ authentication

    def _read_auth_material(self) -> str:
        """The token (auth: token) or the AppRole secret_id, read now (runs in a worker
        thread after start). Raises :class:`ConfigError`."""
        cfg = self._cfg
        if cfg.auth == "token":
            return _read_secret(self._token_path, cfg.token_credential, what="vault token")
        return _read_secret(self._secret_id_path, cfg.secret_id_credential, what="AppRole secret_id")

    def _token_expired(self) -> bool:
        return self._token_expires_at is not None and self._clock() >= self._token_expires_at

    def _set_token(self, ttl: int, renewable: bool, granted: int = 0) -> None:
        """Record a token's remaining ``ttl`` (0: never expires) and the TTL a grant
        gives it (``granted``; default ``ttl``)."""
        self._token_granted_s = max(ttl, granted, 0)
        self._token_expires_at = self._clock() + ttl if ttl > 0 else None
        self._token_renewable = renewable

    def _note_uses(self, num_uses: int) -> None:
        """Record a token's use limit. Every authenticated Vault request spends one use,
        a refused one too (V vault/request_handling.go handleRequest: UseToken runs before
        the ACL outcome is acted on), and the last use revokes the token with every
        credential it issued: sidekey wants unlimited tokens (token_num_uses=0)."""
        if num_uses > 0 and self._token_num_uses == 0:
            log.warning("vault backend %r: the vault token has num_uses %d: every Vault call "
                        "spends one and the last one revokes the token with its credentials; "
                        "give sidekey's role token_num_uses=0 (health checks then spend none)",
                        self.name, num_uses)
        self._token_num_uses = max(0, num_uses)

    def _renew_threshold(self) -> float:
        # renew_before_s, but never more than half the TTL Vault grants: a token whose
        # TTL is shorter than renew_before_s would otherwise be renewed in a loop.
        return min(self._cfg.renew_before_s, self._token_granted_s / 2)

    async def _ensure_auth(self) -> None:
        if self._authenticated and not self._token_expired():
            return
        async with self._auth_lock:
            if self._authenticated and not self._token_expired():
                return
            await self._authenticate()

    async def _authenticate(self) -> None:
        """Log in (AppRole) or load the token file and look the token up. Holds
        ``_auth_lock``. Raises :class:`BackendError`."""
        self._authenticated = False
        try:
            if self._cfg.auth == "approle":
                raw = await self._call("AppRole login", self._w_login)
                auth = self._parse(raw, _AuthResponse, "AppRole login").auth
                if not auth.client_token:
                    raise BackendError(f"vault AppRole login at {self._addr} returned no token")
                self._client.token = auth.client_token
                self._set_token(auth.lease_duration, auth.renewable)
                self._note_uses(auth.num_uses)
                changed = True
                how = f"logged in with AppRole (mount {self._cfg.approle_mount})"
            else:
                changed = await self._call("token load", self._w_load_token)
                raw = await self._call("token lookup", self._w_lookup_self)
                data = self._parse(raw, _LookupResponse, "token lookup").data
                self._set_token(data.ttl, data.renewable, data.creation_ttl)
                self._note_uses(data.num_uses)
                how = "loaded a new token" if changed else "checked its token"
        except hvac.exceptions.VaultError as exc:
            raise self._auth_failed(exc) from None
        except ConfigError as exc:
            self._last_error = str(exc)
            raise BackendError(f"vault backend {self.name!r}: {exc}") from None
        self._auth_gen += 1
        if changed:
            self._token_serial += 1
            self._retire_old_credentials()
        self._authenticated = True
        self._renewal_exhausted = False
        self._last_error = None
        self._auth_wakeup.set()
        log.info("vault backend %r: %s (token ttl %s, renewable %s)", self.name, how,
                 f"{self._token_granted_s} s" if self._token_expires_at else "none",
                 self._token_renewable)

    def _retire_old_credentials(self) -> None:
        """A new token is in use: pooled credentials issued under an older one die with
        that token (Vault's expiration manager revokes a token's leases when it expires,
        is revoked or runs out of uses: vault/expiration.go RevokeByToken), whatever
        their lease_duration said. They are never handed out: revoked now (while the old
        token may still be alive) and replaced from the new token."""
        for pool in self._pools.values():
            old = [c for c in pool.items if c.token_serial != self._token_serial]
            for cred in old:
                pool.items.remove(cred)
                self._to_revoke.setdefault(cred.lease_id, 0)
            if old:
                log.info("vault backend %r: new vault token: revoking %d pooled credential(s) "
                         "of %s issued under the old one", self.name, len(old), pool.label)
        self._pool_wakeup.set()

    def _token_left(self) -> float:
        """Seconds the current token has left (inf: it never expires)."""
        if self._token_expires_at is None:
            return math.inf
        return self._token_expires_at - self._clock()

    async def _ensure_token_life(self, need_s: float) -> None:
        """Before issuing a credential: the credential dies with the token that issues
        it, so a token with less than ``need_s`` left is replaced first when a new one
        would live longer (AppRole logs in again; auth: token re-reads its file). A
        token whose whole TTL is shorter than ``need_s`` cannot be helped: its
        credentials carry its expiry (and pools refuse them, saying why)."""
        await self._ensure_auth()
        if self._token_left() >= min(need_s, self._token_granted_s / 2):
            return
        async with self._auth_lock:
            if self._token_left() >= min(need_s, self._token_granted_s / 2):
                return
            if self._cfg.auth == "approle" or await self._load_token():
                log.info("vault backend %r: the token has %.0f s left, less than a credential "
                         "needs; authenticating again before issuing", self.name, self._token_left())
                await self._authenticate()

    def _token_source(self) -> str:
        return str(self._token_path or f"credential {self._cfg.token_credential}")

    async def _load_token(self) -> bool:
        """Re-read the token file; True if it holds a new token (now in use)."""
        try:
            return await self._call("token load", self._w_load_token)
        except ConfigError as exc:
            self._last_error = str(exc)
            raise BackendError(f"vault backend {self.name!r}: {exc}") from None

    def _auth_failed(self, exc: hvac.exceptions.VaultError) -> BackendError:
        errors = self._scrub(_errors_of(exc))
        if self._cfg.auth == "approle":
            message = (f"vault AppRole login at {self._addr} (mount {self._cfg.approle_mount}) "
                       f"failed (HTTP {_status_of(exc) or '?'}): {errors or 'no reason given'}")
        elif isinstance(exc, hvac.exceptions.Forbidden):
            message = (f"the vault token from {self._token_source()} is invalid or expired (permission "
                       f"denied at {self._addr}); put a valid token there")
        else:
            message = self._translate(exc, "token lookup").message
        self._last_error = message
        return BackendError(message)

    async def _reauthenticate(self, gen: int) -> bool:
        """After a 403: True if the token was replaced (retry the call), False if the
        token is fine and the 403 is the policy's answer. Raises :class:`BackendError`."""
        async with self._auth_lock:
            if self._auth_gen != gen and self._authenticated:
                return True  # another task has re-authenticated meanwhile
            if self._authenticated and not (self._cfg.auth == "approle" and self._token_num_uses > 0):
                # (A limited-use AppRole token logs in again instead: a login spends no
                # use, a lookup would spend one more.)
                try:
                    raw = await self._call("token lookup", self._w_lookup_self)
                except hvac.exceptions.Forbidden:
                    pass  # the token is bad: authenticate again
                except hvac.exceptions.VaultError as exc:
                    raise self._translate(exc, "token lookup") from None
                else:
                    data = self._parse(raw, _LookupResponse, "token lookup").data
                    self._set_token(data.ttl, data.renewable, data.creation_ttl)
                    self._note_uses(data.num_uses)
                    return False
            log.info("vault backend %r: token rejected; authenticating again", self.name)
            await self._authenticate()
            return True

    async def _renew(self) -> None:
        """Renew the token, or replace it when it cannot be renewed. Raises
        :class:`BackendError`."""
        async with self._auth_lock:
            if not self._authenticated or self._token_expired():
                await self._authenticate()
                return
            if self._token_expires_at is None:
                return
            left = self._token_expires_at - self._clock()
            if not self._token_renewable or self._renewal_exhausted:
                # Nothing to renew: AppRole logs in again; auth: token re-reads its file
                # (a rotated token is picked up) and otherwise waits for the expiry.
                if self._cfg.auth == "token" and not await self._load_token():
                    if not self._renewal_exhausted:
                        log.warning("vault backend %r: the vault token expires in %d s and "
                                    "cannot be renewed; replace it in %s", self.name, left,
                                    self._token_source())
                    self._renewal_exhausted = True
                    return
                await self._authenticate()
                return
            try:
                raw = await self._call("token renewal", self._w_renew_self)
            except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest) as exc:
                log.warning("vault backend %r: token renewal refused (%s); authenticating again",
                            self.name, self._scrub(_errors_of(exc)) or _status_of(exc))
                await self._authenticate()
                return
            except hvac.exceptions.VaultError as exc:
                raise self._translate(exc, "token renewal") from None
            auth = self._parse(raw, _AuthResponse, "token renewal").auth
            self._set_token(auth.lease_duration, auth.renewable)
            log.debug("vault backend %r: renewed the token (ttl %d s)", self.name,
                      auth.lease_duration)
            if auth.lease_duration <= left:
                # Vault capped the renewal (the token's max TTL): renewing again gains
                # nothing.
                if self._cfg.auth == "approle":
                    log.info("vault backend %r: token reached its max TTL; logging in again",
                             self.name)
                    await self._authenticate()
                else:
                    self._renewal_exhausted = True
                    log.warning("vault backend %r: the vault token expires in %d s and cannot be "
                                "renewed further (max TTL); replace it in %s", self.name,
                                auth.lease_duration, self._token_source())

    def _next_auth_check(self) -> float:
        """Seconds until the auth loop should look at the token again."""
        if not self._authenticated:
            return RETRY_INTERVAL_S
        if self._token_expires_at is None:
            return MAX_SLEEP_S
        left = self._token_expires_at - self._clock()
        # Exhausted: nothing to renew, re-read the token file when it runs out.
        due = left if self._renewal_exhausted else left - self._renew_threshold()
        return min(max(due, MIN_RECHECK_S), MAX_SLEEP_S)

    async def _auth_loop(self) -> None:
        first = True
        failing = False
        while not self._closing:
            self._auth_wakeup = trio.Event()
            failed = False
            try:
                if first or not self._authenticated:
                    await self._ensure_auth()
                elif self._token_expires_at is not None and (
                    self._token_expires_at - self._clock() <= self._renew_threshold()
                    or (self._renewal_exhausted and self._token_expired())
                ):
                    await self._renew()
            except SidekeyError as exc:
                failed = True
                # Once per failure streak: Vault being down must not flood the log.
                (log.debug if failing else log.warning)(
                    "vault backend %r: %s (retrying every %g s)", self.name, exc.message,
                    RETRY_INTERVAL_S)
            except Exception:
                failed = True  # a bug must not end run(): the daemon's nursery would die
                log.exception("vault backend %r: token maintenance failed", self.name)
            if failing and not failed:
                log.info("vault backend %r: authenticated again", self.name)
            failing = failed
            first = False
            if self._closing:
                return
            delay = RETRY_INTERVAL_S if failed else self._next_auth_check()
            with trio.move_on_after(delay):
                await self._auth_wakeup.wait()

    # ------------------------------------------------------------------ calls

    async def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one blocking hvac call in a worker thread, bounded in time.

        Transport failures and timeouts become :class:`BackendError`; Vault's own
        error answers (:class:`hvac.exceptions.VaultError`) pass through for the caller.
        """
        if self._closed:
            raise BackendError(f"vault backend {self.name!r} is closed")
        limit = self._cfg.timeout_s + CALL_MARGIN_S
        try:
            with trio.fail_after(limit):
                result = await trio.to_thread.run_sync(
                    fn, limiter=self._limiter, abandon_on_cancel=True
                )
        except trio.TooSlowError:
            raise self._unreachable(what, f"no answer within {limit:g} s") from None
        except requests.exceptions.RequestException as exc:
            raise self._unreachable(what, _transport_reason(exc)) from None
        except hvac.exceptions.VaultError:
            self._reachable = True
            raise
        self._reachable = True
        self._last_error = None
        return result

    def _unreachable(self, what: str, reason: str) -> BackendError:
        self._reachable = False
        self._last_error = f"vault at {self._addr} unreachable: {what}: {reason}"
        return BackendError(self._last_error)

    async def _authed(
        self, what: str, fn: Callable[[], T], label: str, *, secrets: tuple[str, ...] = ()
    ) -> T:
        """:meth:`_call` with a token: authenticates first; a 403 re-authenticates (if
        the token was the problem) and retries once. Vault errors are translated."""
        await self._ensure_auth()
        gen = self._auth_gen
        try:
            return await self._call(what, fn)
        except hvac.exceptions.Forbidden:
            pass  # the token may be stale: re-authenticate and retry once, below
        except hvac.exceptions.VaultError as exc:
            raise self._translate(exc, what, secrets) from None
        if not await self._reauthenticate(gen):
            raise self._denied(what, label)
        try:
            return await self._call(what, fn)
        except hvac.exceptions.Forbidden:
            raise self._denied(what, label) from None
        except hvac.exceptions.VaultError as exc:
            raise self._translate(exc, what, secrets) from None

    def _denied(self, what: str, label: str) -> BackendError:
        who = "the AppRole's token" if self._cfg.auth == "approle" else "the configured token"
        message = (f"vault denied the {what} (permission denied): the policy of {who} "
                   f"does not allow it{f' (namespace {self._cfg.namespace})' if self._cfg.namespace else ''}"
                   " -- or the mount does not exist, which Vault refuses the same way; "
                   "`sidekey check-config --probe` names the missing capability")
        self._last_error = message
        return BackendError(message)

    def _translate(
        self, exc: hvac.exceptions.VaultError, what: str, secrets: tuple[str, ...] = ()
    ) -> SidekeyError:
        status = _status_of(exc)
        errors = self._scrub(_errors_of(exc), *secrets)
        detail = f": {errors}" if errors else ""
        if isinstance(exc, hvac.exceptions.InvalidPath):
            gone = _kv_version_gone(exc)
            if gone is not None:
                version, how = gone
                return SecretNotFound(
                    f"{what}: version {version} of this secret was {how} in vault; undelete it "
                    "or write a new version (sidekey rotate writes the next one)",
                    code="secret_deleted",
                )
            return SecretNotFound(f"{what}: vault has no such secret (404{detail})")
        if isinstance(exc, hvac.exceptions.VaultDown):
            message = f"vault at {self._addr} is sealed or unavailable (503{detail})"
        elif isinstance(exc, hvac.exceptions.RateLimitExceeded):
            retry = getattr(exc, "retry_after", None)
            after = f"; retry after {retry[:20]} s" if isinstance(retry, str) and retry else ""
            message = f"vault at {self._addr} rate-limited the {what} (429{detail}{after})"
        else:
            message = f"vault {what} failed (HTTP {status or 'status unknown'}{detail})"
        self._last_error = message
        return BackendError(message)

    def _scrub(self, text: str, *extra: str) -> str:
        """Defence in depth: Vault's error texts never quote secrets, but if one did,
        the token (and the value being written) must not travel on."""
        token = self._client.token
        for secret in (token, *extra):
            if secret and len(secret) >= 4:
                text = text.replace(secret, "<redacted>")
        return text

    def _parse(self, raw: object, tp: type[T], what: str) -> T:
        if isinstance(raw, requests.Response):
            # hvac returns the raw response when the status is not 200 (e.g. 204).
            raise BackendError(f"vault {what}: unexpected HTTP {raw.status_code} without a body")
        try:
            return msgspec.convert(raw, tp)
        except msgspec.ValidationError as exc:
            # The message names the field and the expected type, never the value.
            raise BackendError(f"vault {what}: unexpected response ({exc})") from None

    # ------------------------------------------------------------------ worker threads
    # Everything below runs in a worker thread: blocking, no trio calls.

    def _w_sys_health(self) -> str | None:
        """None if Vault can serve requests (active, or a standby that forwards), else
        what it is ("sealed", "not initialized", "answering HTTP <n>")."""
        resp = self._client.adapter.get(
            "/v1/sys/health", params={"standbyok": "true", "perfstandbyok": "true"},
            raise_exception=False,
        )
        status = resp.status_code if isinstance(resp, requests.Response) else 200
        if status == 200:
            return None
        return {503: "sealed", 501: "not initialized"}.get(status, f"answering HTTP {status}")

    def _w_lookup_self(self) -> Any:
        return self._client.adapter.get("/v1/auth/token/lookup-self")

    def _w_renew_self(self) -> Any:
        return self._client.adapter.post("/v1/auth/token/renew-self", json={})

    def _w_login(self) -> Any:
        secret_id = self._read_auth_material()
        return self._login_client.auth.approle.login(
            role_id=self._cfg.role_id, secret_id=secret_id, use_token=False,
            mount_point=self._cfg.approle_mount,
        )

    def _w_load_token(self) -> bool:
        token = self._read_auth_material()
        if token == self._client.token:
            return False
        self._client.token = token
        return True

    def _w_kv_read(
        self, mount: str, path: str, version: int | None, *, missing_ok: bool = False
    ) -> Any:
        try:
            return self._client.secrets.kv.v2.read_secret_version(
                path=path, version=version, mount_point=mount, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath as exc:
            if not missing_ok:
                raise
            gone = _kv_version_gone(exc)
            return None if gone is None else _KvGone(*gone)

    def _w_kv_write(self, mount: str, path: str, data: dict[str, Any], cas: int) -> Any:
        return self._client.secrets.kv.v2.create_or_update_secret(
            path=path, secret=data, cas=cas, mount_point=mount
        )

    def _w_issue(self, mount: str, path: str, handoff: _Handoff) -> Any:
        url = "/v1/" + urllib.parse.quote(f"{mount}/{path}")
        try:
            raw = self._client.adapter.get(url)
        except hvac.exceptions.InvalidRequest as exc:
            # The database engine answers an unknown role with 400 "unknown role".
            if _UNKNOWN_ROLE_RE.search(_errors_of(exc)):
                raise hvac.exceptions.InvalidPath(errors=exc.errors) from None
            raise
        lease_id = raw.get("lease_id") if isinstance(raw, dict) else None
        if isinstance(lease_id, str) and lease_id and not handoff.deliver(lease_id):
            # The trio side gave up on this call: nobody will hand this credential out.
            log.info("vault backend %r: revoking lease %s issued after its call was abandoned",
                     self.name, lease_id)
            try:
                self._w_revoke(lease_id)
            except (hvac.exceptions.VaultError, requests.exceptions.RequestException):
                log.warning("vault backend %r: could not revoke abandoned lease %s (Vault ends "
                            "it at its TTL)", self.name, lease_id)
        return raw

    def _w_capabilities(self, paths: list[str]) -> Any:
        return self._client.adapter.post("/v1/sys/capabilities-self", json={"paths": paths})

    def _w_list_leases(self, prefix: str) -> Any:
        try:
            # hvac's sys.list_leases(prefix), through the adapter like every call here.
            return self._client.adapter.list("/v1/sys/leases/lookup/" + urllib.parse.quote(prefix))
        except hvac.exceptions.InvalidPath:
            return None  # Vault answers an empty listing with 404

    def _w_read_lease(self, lease_id: str) -> Any:
        try:
            # hvac's sys.read_lease(lease_id)
            return self._client.adapter.put("/v1/sys/leases/lookup", json={"lease_id": lease_id})
        except hvac.exceptions.InvalidPath:
            return None
        except hvac.exceptions.InvalidRequest as exc:
            if _UNKNOWN_LEASE_RE.search(_errors_of(exc)):
                return None  # expired or revoked meanwhile
            raise

    def _w_revoke(self, lease_id: str) -> None:
        # Synchronous revocation, Vault's default for this endpoint (sync: true; 204 once
        # the secrets engine has dropped the credential, 400 if the engine failed and the
        # lease stays): when release returns, the credential is gone, and the audit record
        # can say so. The wait is this call's timeout (timeout_s); a revocation that does
        # not answer in time is retried from the queue (revoking a revoked lease is a 204:
        # Vault answers an unknown lease id the same way), and the journal keeps the
        # lease until one answers. (Vault: vault/logical_system.go handleLeaseRevoke;
        # API docs "Revoke lease".)
        # The URL form sys/leases/revoke/<lease_id> lets a policy scope revocation to the
        # roles' lease prefixes (path "sys/leases/revoke/database/creds/readonly/*"); no
        # lease_id in the body, which would override the URL's.
        url = "/v1/sys/leases/revoke/" + urllib.parse.quote(lease_id, safe="/")
        try:
            self._client.adapter.put(url, json={"sync": True})
        except hvac.exceptions.InvalidPath:
            return  # not known: expired or revoked already
        except hvac.exceptions.InvalidRequest as exc:
            if _UNKNOWN_LEASE_RE.search(_errors_of(exc)):
                return
            raise
