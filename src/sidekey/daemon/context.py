"""What every room of the daemon shares: its state (:class:`Context`) and the helpers
each handler uses (event building, refusals and their audit bounds, call records,
ending backend leases), the constants more than one room reads, and the pieces
:func:`~sidekey.daemon.app.run` needs before the application exists (:func:`build_codec`,
:class:`StoreJournal`).

Imports nothing else of :mod:`sidekey.daemon`: the rooms (``calls``, ``admin``,
``lifecycle``) import this module, and ``app`` wires them together.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import logging
import math
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .. import logs, protocol
from ..approval_desk import ApprovalDesk
from ..audit import AuditLog
from ..audit.events import format_timestamp, make_event
from ..audit.hmackey import ValueHasher
from ..audit.jsonl import JsonlSink
from ..audit.ratelimit import RejectionLimiter, Suppressed
from ..backends import Backend
from ..backends.oauth import SubjectTokens
from ..config import LoadedConfig, OAuth2Config
from ..encoding import iso_utc
from ..healthcheck import RegistryHealth
from ..leases import LeaseManager
from ..metrics import Metrics
from ..oauth import OAuthVerifier
from ..peer import ExeHashCache, PeerIdentity, servers_of_peer, tier_of
from ..pending import CallRecords
from ..policy import Decision
from ..protocol import BadRequest, SidekeyError, TokenError
from ..server import HttpServer, Request, Response
from ..store import LeaseRecord, StateStore
from ..tokens import TokenCodec, load_ed25519_public, load_keyset, rotate_keyset

# One logger for the whole package, named as before the split (``sidekey.daemon``):
# what operators see in, and filter, the daemon's log lines.
log = logging.getLogger("sidekey.daemon")

ROTATE_PREFIX = "/v1/admin/secrets/"
APPROVALS_PREFIX = "/v1/approvals/"
# /v1/approvals/{id}/{verb}: the verb's method and minimum tier ("wait" is also open to
# the service the approval belongs to: the handler checks that).
APPROVAL_VERBS: dict[str, tuple[str, str]] = {
    "approve": ("POST", "approver"),
    "deny": ("POST", "approver"),
    "wait": ("GET", "service"),
}
# A backend call may re-authenticate once (lookup, login, retry: ~3 backend timeouts).
BACKEND_TIMEOUT_S = 20.0
# Request paths in error messages and audit events are cut to this many characters (an
# anonymous caller chooses them; the whole path is no evidence worth 16 KB per refusal).
MAX_PATH_SHOWN = 200
# Caps for the events a refused caller causes under audit.rejections_per_uid (its full
# refusals and their summaries): with these the audit volume one such uid can cause is
# (burst + 1) x (REJECTION_EVENT_BYTES + 1) bytes per window. A refusal event holds a few
# short strings (code, message with the path cut, exe, unit): about 0.5-2.5 KB.
REJECTION_STRING_BYTES = 512
REJECTION_EVENT_BYTES = 4096
LIMITED_EVENT_CAPS: dict[str, int] = {
    "max_string_bytes": REJECTION_STRING_BYTES, "max_event_bytes": REJECTION_EVENT_BYTES}


@dataclass(frozen=True, slots=True)
class Route:
    tier: str
    handler: Callable[[Request], Awaitable[Response]]


@functools.lru_cache(maxsize=1024)
def _iso_second(second: int) -> str:
    return iso_utc(second, "seconds")


def _iso(ts: float) -> str:
    """UTC ISO-8601 to the second (expiry times); cached, as a call formats several."""
    return _iso_second(int(ts))


def _shown(text: str) -> str:
    """A caller-chosen path (or method) as it may appear in a message or audit event."""
    if len(text) <= MAX_PATH_SHOWN:
        return text
    return f"{text[:MAX_PATH_SHOWN]}…(truncated {len(text) - MAX_PATH_SHOWN} chars)"


def _json(status: int, value: Any) -> Response:
    return Response(status=status, body=protocol.encode(value))


@dataclass(slots=True)
class _PendingCall:
    """What authorize knew about a call, kept until release for the tool_call event.

    Kept encoded (the arguments as the canonical JSON already made for the digest):
    the bytes counted against the budget are the bytes held, whatever the shape of
    the arguments (decoded, 32 KB of ``[[],[],...]`` would take ~20 times more)."""

    arguments: bytes  # canonical JSON
    context: bytes  # JSON of {"auth": ..., "policy": ...}

    @property
    def size(self) -> int:
        return len(self.arguments) + len(self.context)

    def decoded(self) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        context = msgspec.json.decode(self.context)
        return msgspec.json.decode(self.arguments), context["auth"], context["policy"]


class Context:
    """The daemon's state (one instance per daemon process, as
    :class:`~sidekey.daemon.app.Sidekey`) and the helpers every room uses. The rooms are
    mixins on it; ``app`` combines them."""

    # Defined where they belong, used from here or from another room: the lease
    # manager's expiry hook and reload (in ``lifecycle``; ``admin``'s reload endpoint
    # calls it), the route table (in ``app``).
    _lease_expired: Callable[[LeaseRecord], Awaitable[None]]
    reload: Callable[..., Awaitable[tuple[bool, str | None]]]
    # Closes a lease's egress grant (in ``egress``): every lease end comes through
    # _end_lease_backends.
    _egress_close: Callable[[str], None]
    _egress_open: Callable[..., None]
    egress_audit: Callable[[str], dict[str, Any]]
    _routes: Callable[[], dict[tuple[str, str], Route]]

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        store: StateStore,
        audit: AuditLog,
        backends: dict[str, Backend],
        codec: TokenCodec,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.loaded = loaded
        self.cfg = loaded.config
        self.generation = 1  # bumped by every applied reload
        # Each server's OAuth2 settings with this host's issuer sources applied: computed
        # once per config, not on every authorize.
        self._oauth_specs = _oauth_specs(loaded)
        self.trust: ConfigTrust | None = None  # what a reload's config must satisfy
        # MACs sensitive argument values in audit events (set by run(); None: the plain
        # "[REDACTED]" marker). Kept across reloads: a new key would break correlation.
        self.audit_hasher: ValueHasher | None = None
        self._reload_lock = trio.Lock()
        self._dynamic_leases: set[str] = set()  # active leases carrying dynamic credentials
        # Verified user tokens held for two-step redeems of token-exchange secrets.
        self._subjects = SubjectTokens()
        # on_store_failure: local — this host's GCRA state while the store is down
        self._local_rates: OrderedDict[str, float] = OrderedDict()
        self._local_rates_warned = False
        self.store = store
        self.audit = audit
        self.backends = backends
        self.codec = codec
        self.clock = clock
        self.host = socket.gethostname()
        self.daemon_uid = os.getuid()
        self.daemon_gid = os.getgid()
        self.exe_hashes = ExeHashCache()
        self.oauth = OAuthVerifier(base_dir=loaded.base_dir, clock=clock)
        self.registry_health = RegistryHealth(loaded.config.registry)
        self.leases = LeaseManager(store, on_expired=self._lease_expired, clock=clock)
        self.started_at = clock()
        # Call records from authorize (keyed by the token's jti) to the end of the lease
        # (re-keyed by lease id): dropped at expiry, bounded in bytes per server.
        self._calls: CallRecords[_PendingCall] = CallRecords(
            per_owner_bytes=loaded.config.leases.pending_bytes_per_server,
            total_bytes=loaded.config.leases.pending_bytes_total)
        self._calls_warned: dict[str, float] = {}  # server -> when its eviction was logged
        self.server: HttpServer | None = None
        # Audit volume of unattested callers' refusals, per uid (audit.rejections_per_uid).
        limit = loaded.config.audit.rejections_per_uid
        self._rejection_limit = limit
        self.rejections = RejectionLimiter(
            burst=limit.burst, per_seconds=limit.per_seconds, max_keys=limit.max_uids)
        # (generation, any uid may match a selector, uids named, user names named)
        self._uid_classes: tuple[int, bool, frozenset[int], frozenset[str]] | None = None
        self.approvals = ApprovalDesk(
            store=store, audit=audit, event=self.event, config=lambda: self.cfg, clock=clock)
        # One registry for the daemon's life: a reload changes only the label values it
        # accepts (the running config's server and tool names), never re-registers.
        self.metrics = Metrics(lambda: self.cfg)
        self._approvals_pending: tuple[float, int | None] | None = None  # (when, count)
        self._scrape_lock = trio.Lock()
        self._tcp_scrape: tuple[float, bytes] | None = None  # (when, body) last rendered
        self._tcp_render_lock = trio.Lock()
        for sink in audit.sinks:
            if isinstance(sink, JsonlSink):  # the audit file: time each batch commit
                sink.commit_observer = self.metrics.audit_commit
        self.routes: dict[tuple[str, str], Route] = self._routes()

    # ------------------------------------------------------------------ plumbing

    def _peer_facts(self, req: Request) -> tuple[frozenset[str], str]:
        """Servers this connection's peer is attested as, and its tier (cached per conn:
        :meth:`handle` re-checks the peer before every request above anonymous, so the
        cached facts still describe the process on the other end)."""
        cached = req.conn.cache.get("facts")
        if cached is None or cached[2] != self.generation:
            ident = req.peer.identity
            servers = frozenset(
                servers_of_peer(
                    self.cfg.peers,
                    ident,
                    daemon_uid=self.daemon_uid,
                    daemon_gid=self.daemon_gid,
                    exe_hashes=self.exe_hashes,
                    uid_only=self.cfg.attestation.pid_namespace == "uid_only",
                )
            )
            tier = tier_of(
                self.cfg.rbac,
                ident,
                daemon_uid=self.daemon_uid,
                daemon_gid=self.daemon_gid,
                is_service=bool(servers),
            )
            cached = req.conn.cache["facts"] = (servers, tier, self.generation)
        return cached[0], cached[1]

    def event(self, event_type: str, **fields: Any) -> dict[str, Any]:
        if "trace_id" not in fields:
            # The traceparent of the request being handled (None outside one).
            fields["trace_id"] = logs.current_trace_id()
        return make_event(
            event_type,
            host=self.host,
            now=datetime.datetime.fromtimestamp(self.clock(), datetime.UTC),
            redact_keys=self.cfg.audit.redact_keys,
            redact_tool_fields=self.cfg.audit.redact_tool_fields,
            hasher=self.audit_hasher,
            **fields,
        )

    async def _audit_rejection(self, request: Request, exc: SidekeyError) -> None:
        if exc.details.get("audited"):
            exc.details.pop("audited")
            return
        if isinstance(exc, TokenError):
            event_type = "token.rejected"
        elif exc.code in ("token_replayed",):
            event_type = "token.replayed"
        elif exc.code.startswith("peer_"):
            event_type = "peer.rejected"
        else:
            event_type = "request.rejected"
        # A refusal of a caller attested above anonymous is a security decision about a
        # known principal: always written in full. An anonymous caller's are bounded per
        # uid (audit.rejections_per_uid), or it could fill the audit disk.
        limited = self._anonymous_connection(request)
        if limited and not await self._admit_rejection(request.peer.identity.uid, exc.code):
            return
        await self.audit.emit(
            self.event(
                event_type,
                peer=request.peer.identity.audit(),
                request_id=request.request_id,
                error={"code": exc.code, "message": exc.message, "status": exc.status},
                extra={"path": _shown(request.path)},
                **(LIMITED_EVENT_CAPS if limited else {}),
            )
        )

    # ------------------------------------------------------------------ caller bounds

    def _identity_tier(self, ident: PeerIdentity) -> str:
        servers = servers_of_peer(
            self.cfg.peers, ident, daemon_uid=self.daemon_uid, daemon_gid=self.daemon_gid,
            exe_hashes=self.exe_hashes, uid_only=self.cfg.attestation.pid_namespace == "uid_only",
        )
        return tier_of(self.cfg.rbac, ident, daemon_uid=self.daemon_uid,
                       daemon_gid=self.daemon_gid, is_service=bool(servers))

    def _anonymous_connection(self, request: Request) -> bool:
        """Whether the connection's peer, as attested at accept, holds no tier above
        anonymous (cached per connection and config generation)."""
        cached = request.conn.cache.get("anonymous")
        if cached is None or cached[0] != self.generation:
            anonymous = self._identity_tier(request.peer.identity) == "anonymous"
            cached = request.conn.cache["anonymous"] = (self.generation, anonymous)
        return bool(cached[1])

    async def _admit_rejection(self, uid: int, code: str) -> bool:
        """Count one refusal of ``uid``; True when its full event is to be written.
        Writes the summaries of windows that closed (``request.rejected.suppressed``)."""
        limit = self.cfg.audit.rejections_per_uid
        if limit is not self._rejection_limit:  # reloaded
            self._rejection_limit = limit
            self.rejections.configure(
                burst=limit.burst, per_seconds=limit.per_seconds, max_keys=limit.max_uids)
        full = self.rejections.admit(uid, code, self.clock())
        await self._emit_suppressed()
        return full

    async def _emit_suppressed(self) -> None:
        for summary in self.rejections.take():
            await self.audit.emit(self._suppressed_event(summary))

    def _suppressed_event(self, s: Suppressed) -> dict[str, Any]:
        def ts(t: float) -> str:
            return format_timestamp(datetime.datetime.fromtimestamp(t, datetime.UTC))

        return self.event(
            "request.rejected.suppressed",
            peer={"uid": s.key} if s.key >= 0 else None,
            extra={
                "window_start": ts(s.window_start),
                "window_end": ts(s.window_end),
                "closed": s.reason,  # interval | evicted | shutdown
                "written": s.written,
                "suppressed": s.total,
                "by_code": s.counts,
            },
            **LIMITED_EVENT_CAPS,
        )

    # ------------------------------------------------------------------ helpers

    async def _reject(
        self, event_type: str, base: dict[str, Any], exc: SidekeyError, *, jti: str | None = None
    ) -> SidekeyError:
        """Audit a denial, mark it audited and return it for the caller to raise."""
        extra: dict[str, Any] | None = {"jti": jti} if jti else None
        if "oauth_error" in exc.details:  # a token endpoint's refusal (backends.oauth)
            extra = {**(extra or {}), "oauth_error": exc.details["oauth_error"]}
        await self.audit.emit(
            self.event(
                event_type,
                **base,
                error={"code": exc.code, "message": exc.message, "status": exc.status},
                extra=extra,
            )
        )
        exc.details["audited"] = True
        return exc

    # ------------------------------------------------------------------ dynamic secrets

    async def _end_lease_backends(self, lease_id: str) -> None:
        """Revoke the dynamic credentials a tool call's lease carried (no-op for leases
        with static secrets only, the common case: no store query). Drops the values of
        its egress-only secrets and cancels its upstream requests (sidekey.daemon.egress)."""
        self._egress_close(lease_id)
        if lease_id not in self._dynamic_leases:
            return
        self._dynamic_leases.discard(lease_id)
        items = [(b, bl) for b, bl, _ in await self.store.open_backend_leases(lease_id)]
        await self._revoke_backend_leases(items)

    async def _revoke_backend_leases(self, items: Sequence[tuple[str, str | None]]) -> None:
        """Revoke backend leases, each bounded in time. Failures are logged and stay in
        the journal: the next start (or the next sweep) tries again."""
        with trio.CancelScope(shield=True):
            for backend_name, backend_lease_id in items:
                backend = self.backends.get(backend_name)
                if backend is None or backend_lease_id is None:
                    continue
                try:
                    with trio.fail_after(BACKEND_TIMEOUT_S):
                        await backend.release(backend_lease_id)
                except (SidekeyError, trio.TooSlowError) as exc:
                    log.error("could not revoke a dynamic credential's lease in backend %s "
                              "(retried later): %s", backend_name, exc)

    # ------------------------------------------------------------------ call records

    def _remember_call(self, key: str, call: _PendingCall, *, server: str, expires_at: float,
                       now: float) -> None:
        """Keep a call record within the configured budgets (a reload may change them)."""
        leases = self.cfg.leases
        self._calls.set_limits(per_owner_bytes=leases.pending_bytes_per_server,
                               total_bytes=leases.pending_bytes_total)
        evicted = self._calls.put(key, call, owner=server, size=call.size,
                                  expires_at=expires_at, now=now)
        if evicted and now - self._calls_warned.get(server, -math.inf) >= 60.0:
            self._calls_warned[server] = now
            log.warning('call records of server "%s" over budget (leases.pending_bytes_per_server '
                        "or _total): its oldest were dropped; their mcp.tool_call events will "
                        "refer to the mcp.authorize event for the arguments", server)

    def _pending_calls_status(self) -> dict[str, Any]:
        self._calls.sweep(self.clock())
        return self._calls.stats()


def _canonical_capped(arguments: dict[str, Any] | None) -> tuple[str, bytes]:
    """(SHA-256 hex, canonical JSON) of a call's arguments, at most MAX_ARGUMENTS_BYTES."""
    try:
        canonical = protocol.canonical_json(arguments) if arguments is not None else b"{}"
    except (TypeError, ValueError, RecursionError) as exc:  # decode_body bounds the depth
        raise BadRequest("arguments are not canonical JSON", code="bad_arguments") from exc
    if len(canonical) > protocol.MAX_ARGUMENTS_BYTES:
        raise BadRequest(
            f"arguments larger than {protocol.MAX_ARGUMENTS_BYTES} bytes", code="arguments_too_large"
        )
    return hashlib.sha256(canonical).hexdigest(), canonical


def _digest_capped(arguments: dict[str, Any] | None) -> str:
    return _canonical_capped(arguments)[0]


def _denial(decision: Decision) -> SidekeyError:
    """The wire error of a denial: the class that fixes the decision's status (a status
    no class fixes is a local bug: ValueError, answered as 500 internal)."""
    code = decision.code or ("not_found" if decision.status == 404 else "denied")
    return protocol.error_for_status(
        decision.status, decision.message or "denied", code=code, **dict(decision.details)
    )


def build_codec(loaded: LoadedConfig, *, create: bool = True) -> TokenCodec:
    """Load (creating on first start) the token key set and the trusted issuers.

    A reload passes ``create=False``: a vanished key set must not be silently replaced
    (every outstanding token would stop verifying); a rotated one is picked up.
    """
    if create and not loaded.keyset_path.exists():
        kid = rotate_keyset(loaded.keyset_path)
        log.info("created token key set %s (key id %s)", loaded.keyset_path, kid)
    keyset = load_keyset(loaded.keyset_path)
    trusted = {
        ti.issuer: {
            k.kid: load_ed25519_public(
                k.public_key, loaded.resolve(k.public_key_file) if k.public_key_file else None
            )
            for k in ti.keys
        }
        for ti in loaded.config.tokens.trusted_issuers
    }
    return TokenCodec(
        issuer=loaded.token_issuer,
        keyset=keyset,
        trusted=trusted,
        leeway_s=loaded.config.tokens.leeway_seconds,
        max_ttl_s=loaded.config.tokens.ttl_seconds,
    )


def _oauth_specs(loaded: LoadedConfig) -> dict[str, OAuth2Config]:
    specs = {name: loaded.oauth2_for(name) for name in loaded.config.servers}
    return {name: spec for name, spec in specs.items() if spec is not None}


class StoreJournal:
    """:class:`~sidekey.backends.LeaseJournal` on the state store (set once it is open;
    backends are built before it, so that a bad backend config leaves no state behind)."""

    def __init__(self, store: StateStore | None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def _store(self) -> StateStore:
        if self.store is None:
            raise protocol.Unavailable("state store not open yet", code="state_unavailable")
        return self.store

    async def intent(self, backend: str, intent_id: str, prefix: str, *, at: float,
                     deadline: float) -> None:
        await self._store().journal_backend_intent(backend, intent_id, prefix, at=at,
                                                   deadline=deadline)

    async def issued(self, backend: str, lease_id: str, expires_at: float, *,
                     intent_id: str | None = None) -> None:
        await self._store().journal_backend_lease(backend, lease_id, expires_at=expires_at,
                                                  at=self.clock(), intent_id=intent_id)

    async def intent_done(self, backend: str, intent_id: str) -> None:
        await self._store().backend_intent_done(backend, intent_id)

    async def revoked(self, backend: str, lease_id: str) -> None:
        await self._store().backend_lease_revoked(backend, lease_id, at=self.clock())


@dataclass(frozen=True, slots=True)
class ConfigTrust:
    """What a running config requires of the next one: the keys (read once, at the
    start or the last applied reload) and the signing time it was signed at."""

    keys: dict[str, Ed25519PublicKey]
    signed_at: str | None
