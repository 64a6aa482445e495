"""The daemon: wires config, state store, audit, backends, tokens and leases together
and implements the v1 endpoints on top of :mod:`sidekey.server`.

Every endpoint declares its minimum RBAC tier in :data:`ROUTES`. Every security
decision (allow, deny, rejection, replay, release, expiry) writes an audit event,
durably, *before* the response leaves; if audit cannot record, the call fails 503.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import logging
import math
import os
import pwd
import secrets
import signal
import socket
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import approvals, hardening, protocol, quotas, systemd
from .approval_desk import ApprovalDesk, HeldCall, parse_timeout
from .approval_desk import wire as approval_wire
from .approvals import APPROVAL_ID, Approval
from .audit import AuditLog, AuditSink
from .audit.events import format_timestamp, make_event
from .audit.jsonl import open_jsonl_sink
from .audit.ratelimit import RejectionLimiter, Suppressed
from .backends import INTENT_GRACE_S, Backend, SecretValue, build_backends, unwrap
from .config import Config, LoadedConfig, OAuth2Config, RbacEntry, SecretRef, load_config
from .healthcheck import RegistryHealth
from .leases import ACTIVE, RELEASED, REVOKED, LeaseManager, new_lease_id
from .oauth import OAuthVerifier
from .peer import (
    ExeHashCache,
    PeerHandle,
    PeerIdentity,
    servers_of_peer,
    tier_allows,
    tier_of,
)
from .pending import CallRecords
from .policy import CallFacts, Decision, decide
from .protocol import (
    AccessToken,
    AuthorizeRequest,
    BadRequest,
    ConfigError,
    Denied,
    NotFound,
    RedeemRequest,
    ReleaseRequest,
    SidekeyError,
    TokenError,
    TokenRequest,
)
from .server import HttpServer, Request, Response, bind_unix_socket, error_response
from .store import (
    MAX_APPROVALS_LISTED,
    BackendIntent,
    CounterOp,
    LeaseRecord,
    StateStore,
    StateUnavailable,
    gcra,
    open_configured_store,
)
from .store.sqlite import reinitialize_if_empty
from .tokens import PeerClaim, TokenCodec, load_ed25519_public, load_keyset, rotate_keyset

log = logging.getLogger(__name__)

ROTATE_PREFIX = "/v1/admin/secrets/"
APPROVALS_PREFIX = "/v1/approvals/"
# How often each host reads rotation notices (to drop its cached copies).
ROTATION_POLL_S = 1.0
# /v1/approvals/{id}/{verb}: the verb's method and minimum tier ("wait" is also open to
# the service the approval belongs to: the handler checks that).
APPROVAL_VERBS: dict[str, tuple[str, str]] = {
    "approve": ("POST", "approver"),
    "deny": ("POST", "approver"),
    "wait": ("GET", "service"),
}
# PeerHandle.recheck's refusals: the connection is closed after answering one.
PEER_LOST_CODES = frozenset({"peer_gone", "peer_changed"})
MAX_PENDING_CALLS = 100_000  # entries of the local rate-limit fallback kept in memory
# How often expired call records are dropped when no authorize comes to do it.
CALL_RECORD_SWEEP_S = 1.0
# A backend call may re-authenticate once (lookup, login, retry: ~3 backend timeouts).
BACKEND_TIMEOUT_S = 20.0
REVOCATION_RETRY_S = 60.0
# Request paths in error messages and audit events are cut to this many characters (an
# anonymous caller chooses them; the whole path is no evidence worth 16 KB per refusal).
MAX_PATH_SHOWN = 200
# How often closed rejection-audit windows are summarised when their uid is quiet.
REJECTION_FLUSH_S = 1.0
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
    return datetime.datetime.fromtimestamp(second, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


class Sidekey:
    """The application: one instance per daemon process."""

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
        self._reload_lock = trio.Lock()
        self._dynamic_leases: set[str] = set()  # active leases carrying dynamic credentials
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
        self.routes: dict[tuple[str, str], Route] = {
            ("GET", "/v1/approvals"): Route("approver", self.list_approvals),
            ("GET", "/v1/health"): Route("anonymous", self.health),
            ("POST", "/v1/authorize"): Route("service", self.authorize),
            ("POST", "/v1/redeem"): Route("service", self.redeem),
            ("POST", "/v1/release"): Route("service", self.release),
            ("POST", "/v1/tokens"): Route("admin", self.mint_token),
            ("GET", "/v1/status"): Route("admin", self.status),
            ("POST", "/v1/admin/reload"): Route("admin", self.admin_reload),
        }

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
        return make_event(
            event_type,
            host=self.host,
            now=datetime.datetime.fromtimestamp(self.clock(), datetime.UTC),
            redact_keys=self.cfg.audit.redact_keys,
            redact_tool_fields=self.cfg.audit.redact_tool_fields,
            **fields,
        )

    async def handle(self, request: Request) -> Response:
        route = self.routes.get((request.method, request.path))
        if route is None and request.path.startswith(ROTATE_PREFIX) and request.path.endswith("/rotate"):
            route = Route("security", self.rotate_secret) if request.method == "POST" else None
        if route is None and request.path.startswith(APPROVALS_PREFIX):
            verb = APPROVAL_VERBS.get(request.path.rsplit("/", 1)[-1])
            if verb is not None and request.method == verb[0]:
                route = Route(verb[1], self.approval_verb)
        try:
            if route is None:
                if any(path == request.path for _, path in self.routes):
                    raise SidekeyError(
                        f"{_shown(request.method)} is not allowed on {_shown(request.path)}",
                        code="method_not_allowed",
                    )
                raise NotFound(f"no endpoint {_shown(request.path)}", code="not_found")
            if route.tier != "anonymous":
                # The connection's identity was read at accept; the socket may since have
                # been passed to another process (SCM_RIGHTS) or its process may have
                # exited or setuid()'d. Every request that needs a tier (all of them
                # change or reveal state) re-checks the pinned process first: peer_gone /
                # peer_changed, audited as peer.rejected.
                request.peer.recheck()
            _, tier = self._peer_facts(request)
            if not tier_allows(tier, route.tier):
                raise Denied(
                    f"{_shown(request.path)} requires tier {route.tier}; this process is {tier}",
                    code="peer_rejected",
                )
            return await route.handler(request)
        except SidekeyError as exc:
            if exc.code == "method_not_allowed":
                exc.status = 405
            try:
                await self._audit_rejection(request, exc)
                response = error_response(exc, request.request_id)
            except SidekeyError as audit_exc:
                response = error_response(audit_exc, request.request_id)
            if exc.code in PEER_LOST_CODES:
                # The process this connection was attested for is gone or changed for
                # good: one refusal (one audit event) per connection, not one per
                # request whoever holds the socket now pipelines.
                response.headers.append((b"connection", b"close"))
            return response
        except Exception as exc:
            log.exception("internal error handling %s %s", request.method, request.path[:256])
            err = SidekeyError("internal error", code="internal")
            err.status = 500
            # A bug, not a verdict: recorded all the same (the exception's type only; its
            # message may quote request data), so a fault an attacker can trigger shows.
            try:
                # An anonymous caller that found such a fault must not get unbounded audit
                # volume out of it either (audit.rejections_per_uid, like its refusals).
                limited = self._anonymous_connection(request)
                if not limited or await self._admit_rejection(request.peer.identity.uid, err.code):
                    await self.audit.emit(self.event(
                        "request.failed",
                        peer=request.peer.identity.audit(),
                        request_id=request.request_id,
                        error={"code": err.code, "message": err.message, "status": err.status},
                        extra={"path": request.path[:256], "method": request.method[:16],
                               "exception": type(exc).__name__},
                        **(LIMITED_EVENT_CAPS if limited else {}),
                    ))
            except Exception:  # audit down: the log line above is all there is
                log.exception("could not audit the internal error of %s", request.request_id)
            return error_response(err, request.request_id)

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

    async def rejected(
        self, peer: PeerHandle | None, error: SidekeyError, request_id: str, *, uid: int | None = None
    ) -> None:
        """Called by the server for transport-level rejections (bad HTTP, too large,
        unattestable peer, too many connections). ``uid``: the peer's uid from
        SO_PEERCRED when there is no attested peer. Bounded per uid whoever the caller is:
        none of these is a decision about a principal, and most come before attestation."""
        event_type = "peer.rejected" if error.code.startswith("peer_") else "request.rejected"
        key = peer.identity.uid if peer is not None else uid
        if not await self._admit_rejection(-1 if key is None else key, error.code):
            return
        if peer is not None:
            who: dict[str, Any] | None = peer.identity.audit()
        else:
            who = {"uid": uid} if uid is not None else None
        await self.audit.emit(
            self.event(
                event_type,
                peer=who,
                request_id=request_id,
                error={"code": error.code, "message": error.message, "status": error.status},
                **LIMITED_EVENT_CAPS,
            )
        )

    # ------------------------------------------------------------------ caller bounds

    def _identity_tier(self, ident: PeerIdentity) -> str:
        servers = servers_of_peer(
            self.cfg.peers, ident, daemon_uid=self.daemon_uid, daemon_gid=self.daemon_gid,
            exe_hashes=self.exe_hashes,
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

    def connection_class(self, uid: int, identity: PeerIdentity | None) -> str:
        """The server's hook for per-uid connection slots: ``"service"`` or ``"anonymous"``.

        With ``identity`` (after attestation): anonymous unless the peer holds a tier above
        anonymous. Without (at accept, uid only): anonymous only when no selector could
        give this uid more, i.e. the daemon's uid is not it, and every peers/rbac selector
        that does not pin a uid or user (gid, group, unit, exe only) is absent: such a
        selector could match any uid, so then every uid counts as service until attested.
        """
        if identity is not None:
            return "anonymous" if self._identity_tier(identity) == "anonymous" else "service"
        if uid == self.daemon_uid:
            return "service"
        classes = self._uid_classes
        if classes is None or classes[0] != self.generation:
            classes = self._uid_classes = (self.generation, *_selector_uids(self.cfg, self.daemon_uid))
        _, any_uid, uids, users = classes
        if any_uid or uid in uids:
            return "service"
        return "service" if users and _uid_name(uid) in users else "anonymous"

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

    async def run_rejection_flusher(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Summarise rejection windows that closed while their uid stayed quiet."""
        task_status.started()
        while True:
            await trio.sleep(REJECTION_FLUSH_S)
            self.rejections.expire(self.clock())
            try:
                await self._emit_suppressed()
            except SidekeyError as exc:
                log.warning("cannot write request.rejected.suppressed: %s", exc)

    async def close_rejection_windows(self) -> None:
        """At shutdown: write the counts of every open window (none is lost)."""
        self.rejections.close_all(self.clock())
        try:
            await self._emit_suppressed()
        except SidekeyError as exc:
            log.warning("cannot write request.rejected.suppressed at shutdown: %s", exc)

    # ------------------------------------------------------------------ endpoints

    async def health(self, req: Request) -> Response:
        store = self.store.health()
        audit = self.audit.health()
        backends = {name: await b.health() for name, b in self.backends.items()}
        ok = bool(store.get("ok")) and bool(audit.get("ok")) and all(
            bool(b.get("ok")) for b in backends.values()
        )
        body = {
            "status": "ok" if ok else "degraded",
            "store": {"ok": store.get("ok"),
                      **({"reason": store["reason"]} if store.get("reason") else {})},
            "audit": {"ok": audit.get("ok")},
            "backends": {
                n: {k: b[k] for k in ("ok", "type", "reachable", "authenticated", "token_ttl_s")
                    if k in b}
                for n, b in backends.items()
            },
        }
        return _json(200 if ok else 503, body)

    async def status(self, req: Request) -> Response:
        backends = {name: await b.health() for name, b in self.backends.items()}
        server = self.server
        try:
            pending: int | None = len(await self.approvals.list([approvals.PENDING],
                                                                limit=MAX_APPROVALS_LISTED))
        except StateUnavailable:
            pending = None  # the store's health says why
        return _json(
            200,
            {
                "host": self.host,
                "pid": os.getpid(),
                "uptime_s": round(self.clock() - self.started_at, 3),
                "config": str(self.loaded.path),
                "socket": str(self.loaded.socket_path),
                "token_issuer": self.codec.issuer,
                "token_key_id": self.codec.keyset.active.kid,
                "leases": {"active": self.leases.active_count},
                # Call records held in memory (authorize -> lease end) and their budgets.
                "pending_calls": self._pending_calls_status(),
                "approvals": {"pending": pending, "waiting": self.approvals.waiting},
                "connections": server.active_connections if server else 0,
                "in_flight": server.in_flight if server else 0,
                "store": self.store.health(),
                "audit": self.audit.health(),
                "backends": backends,
                "servers": sorted(self.cfg.servers),
                "registry_health": self.registry_health.status(),
                "oauth2": self.oauth.status(),
                "config_generation": self.generation,
            },
        )

    async def _verify_user_token(
        self, body: AuthorizeRequest, servers: frozenset[str]
    ) -> tuple[AccessToken | None, SidekeyError | None]:
        """Verify the bearer token against the server's issuer and audience, but only
        for a process attested as that server: others must not make us fetch JWKS."""
        if body.user_token is None or body.server not in servers or body.server not in self.cfg.servers:
            return None, None
        oauth = self._oauth_specs.get(body.server)
        if oauth is None:
            return None, None
        try:
            return await self.oauth.verify(body.user_token, oauth), None
        except SidekeyError as exc:
            return None, exc

    async def _apply_quotas(
        self, decision: Decision, body: AuthorizeRequest, now: float,
        user_token: AccessToken | None = None,
    ) -> tuple[Decision, int | None]:
        """The quota step after the policy chain (``limits:``): sessions, per user per
        tool, per user, counted in the state store (shared across hosts with Redis).
        Fails closed: a store failure is 503 state_unavailable."""
        claims = dict(user_token.string_claims) if user_token is not None else None
        department = quotas.department_of(
            claims, decision.user_id, claim=self.cfg.policy.department_claim,
            user_map=self.cfg.policy.user_departments)
        # Long-polls for approvals wait for a human, not for this host: not shed load.
        in_flight = (self.server.in_flight if self.server is not None else 0) - self.approvals.waiting
        priority = quotas.priority_of(self.cfg.limits, department)
        if quotas.shed(priority, in_flight, self.cfg.policy.max_in_flight):
            shed = quotas.overloaded(priority, in_flight, self.cfg.policy.max_in_flight)
            return dataclasses.replace(
                decision, outcome="deny", code=shed.code, message=shed.message, status=shed.status,
                details={**shed.details, "retry_after_s": shed.retry_after_s},
            ), None
        plan = quotas.plan(
            self.cfg.limits, user=decision.user_id, tool=body.tool, department=department,
            session_id=body.session_id,
            now=datetime.datetime.fromtimestamp(now, datetime.UTC),
            session_idle_s=self.cfg.policy.session_idle_seconds,
        )
        rules = list(decision.rules_matched)
        # The approval rule's window counter rides in the same round trip, last: it
        # counts only a call that passed every quota (as it would one step later).
        window = (self.approvals.window_op(decision.user_id, body.tool, now)
                  if body.approval_id is None else None)
        answers = await self._quota_answers(plan, window)
        calls_in_window = answers[-1] if window is not None and len(answers) > len(plan.checks) else None
        results: list[Any] = []
        for check, answer in zip(plan.checks, answers, strict=False):
            if isinstance(check, quotas.MonthlyCheck):
                for alert in quotas.alerts(plan, [*results, answer]):
                    await self.audit.emit(self.event(
                        "quota.threshold", user_id=decision.user_id, server=body.server,
                        tool=body.tool, extra=alert.event_fields()))
            results.append(answer)
            denial = quotas.check_denial(check, answer, now=plan.now)
            if denial is not None:
                return dataclasses.replace(
                    decision, outcome="deny", rules_matched=tuple(rules), code=denial.code,
                    message=denial.message, status=denial.status,
                    details={**denial.details, "limit": denial.limit,
                             **({"retry_after_s": denial.retry_after_s}
                                if denial.retry_after_s is not None else {})},
                ), None
            rules.append(check.rule)
        return dataclasses.replace(decision, rules_matched=tuple(rules)), calls_in_window

    async def _quota_answers(self, plan: quotas.QuotaPlan, extra: CounterOp | None = None) -> list[Any]:
        """The plan's checks (and ``extra``, last) in one store round trip, stopping at
        the first refusal. With ``state.on_store_failure: local`` and the store down,
        check by check: rate limits on this host's memory, the rest fail closed
        (``extra`` is then left to its owner)."""
        ops = quotas.store_ops(plan)
        if extra is not None:
            ops.append(extra)
        try:
            return list(await self.store.quota_apply(ops, now=plan.now_s))
        except StateUnavailable:
            if self.cfg.state.on_store_failure != "local":
                raise
        answers: list[Any] = []
        for check in plan.checks:
            answer: Any
            if isinstance(check, quotas.SessionCheck):
                answer = await self.store.session_touch(
                    check.user, check.session_id, now=plan.now_s, idle_s=check.idle_s,
                    max_sessions=check.max_sessions)
            elif isinstance(check, quotas.RateCheck):
                answer = await self._rate_check(check, plan.now_s)
            else:
                answer = await self.store.counter_incr(check.key, expires_at=check.expires_at_s)
            answers.append(answer)
            if quotas.check_denial(check, answer, now=plan.now) is not None:
                break
        return answers

    async def _rate_check(self, check: quotas.RateCheck, now: float) -> tuple[bool, float]:
        """The store's GCRA; with ``state.on_store_failure: local`` a failing store falls
        back to this host's memory for rate counters only (sessions, monthly quotas and
        token burning always fail closed)."""
        try:
            return await self.store.rate_check(
                check.key, limit=check.limit, period_s=check.period_s, now=now)
        except StateUnavailable:
            if self.cfg.state.on_store_failure != "local":
                raise
        if not self._local_rates_warned:
            log.warning("state store unavailable: counting rate limits on this host only")
            self._local_rates_warned = True
        result = gcra(self._local_rates.get(check.key), limit=check.limit,
                      period_s=check.period_s, now=now, cost=1)
        if result.allowed:
            self._local_rates[check.key] = result.new_tat
            while len(self._local_rates) > MAX_PENDING_CALLS:
                self._local_rates.popitem(last=False)
        return result.allowed, result.retry_after_s

    async def _apply_approvals(
        self, decision: Decision, body: AuthorizeRequest, args_digest: str, now: float,
        req: Request, calls_in_window: int | None = None,
    ) -> tuple[Decision, Approval | None]:
        """The approval step, last in the chain: hold the call (202 pending_approval,
        audited as approval.requested) or redeem the approval it presents."""
        if body.approval_id is None and not approvals.has_rule(self.cfg.limits, body.tool):
            return decision, None  # most calls: nothing to hold, nothing to redeem
        call = HeldCall(
            server=body.server, tool=body.tool, user=decision.user_id, agent=body.agent_id,
            session_id=body.session_id, args_digest=args_digest, arguments=body.arguments,
            peer=req.peer.identity.audit(), request_id=req.request_id,
            policy=decision.policy_record(), peer_user=req.peer.identity.user,
        )
        try:
            rule, held = await self.approvals.check(call, approval_id=body.approval_id, now=now,
                                                    calls_in_window=calls_in_window)
        except protocol.Unavailable:
            raise  # store or audit down: 503, not a verdict on the call
        except SidekeyError as exc:
            return dataclasses.replace(
                decision, outcome="deny", code=exc.code, message=exc.message, status=exc.status,
                details={k: v for k, v in exc.details.items() if k != "audited"},
            ), None
        rules = (*decision.rules_matched, rule) if rule else decision.rules_matched
        if held is None:
            return dataclasses.replace(decision, rules_matched=rules), None
        pending = approvals.pending_denial(held)
        return dataclasses.replace(
            decision, outcome="pending_approval", rules_matched=rules, code=pending.code,
            message=pending.message, status=pending.status,
        ), held

    def _held_response(self, decision: Decision, held: Approval, req: Request) -> Response:
        return _json(
            approvals.STATUS_PENDING,
            protocol.AuthorizeResponse(
                decision="pending_approval",
                request_id=req.request_id,
                expires_at=_iso(held.expires_at.timestamp()),
                policy=protocol.DecisionBody(
                    decision="pending_approval",
                    rules_matched=list(decision.rules_matched),
                    warnings=list(decision.warnings),
                ),
                user_id=decision.user_id,
                approval_id=held.id,
                message=decision.message,
            ),
        )

    async def authorize(self, req: Request) -> Response:
        body: AuthorizeRequest = protocol.decode_body(req.body, AuthorizeRequest)
        args_digest, args_json = _canonical_capped(body.arguments)
        servers, _ = self._peer_facts(req)
        ident = req.peer.identity
        user_token, token_error = await self._verify_user_token(body, servers)
        now = self.clock()
        decision = decide(
            self.cfg,
            CallFacts(
                server=body.server,
                tool=body.tool,
                peer_uid=ident.uid,
                peer_user=ident.user,
                peer_servers=servers,
                agent_id=body.agent_id,
                session_id=body.session_id,
                args_digest=args_digest,
                now=datetime.datetime.fromtimestamp(now, datetime.UTC),
                user_token=user_token,
                token_error=token_error,
                token_presented=body.user_token is not None,
                server_version=body.server_version,
                require_version=self.cfg.policy.require_server_version,
            ),
        )
        calls_in_window: int | None = None
        if decision.allowed:
            decision, calls_in_window = await self._apply_quotas(decision, body, now, user_token)
        held: Approval | None = None
        if decision.allowed:
            decision, held = await self._apply_approvals(
                decision, body, args_digest, now, req, calls_in_window)
        if held is not None:
            return self._held_response(decision, held, req)
        auth: dict[str, Any] = {
            "token_issuer": user_token.issuer if user_token else None,
            "scopes": sorted(user_token.scopes) if user_token else [],
            "token_exp": _iso(user_token.expires_at) if user_token else None,
            "verified": user_token is not None,
        }
        common: dict[str, Any] = {
            "server": body.server,
            "tool": body.tool,
            "user_id": decision.user_id,
            "agent_id": body.agent_id,
            "session_id": body.session_id,
            "arguments": body.arguments,
            "auth": auth,
            "policy": decision.policy_record(),
            "peer": ident.audit(),
            "request_id": req.request_id,
        }
        if not decision.allowed:
            err = _denial(decision)
            event_type = "peer.rejected" if decision.code == "peer_mismatch" else "mcp.authorize"
            await self.audit.emit(
                self.event(
                    event_type,
                    **common,
                    error={"code": err.code, "message": err.message, "status": err.status},
                )
            )
            err.details["audited"] = True
            err.details["rules_matched"] = list(decision.rules_matched)
            raise err
        token, claims = self.codec.issue(
            server=body.server,
            tool=body.tool,
            user=decision.user_id,
            agent=body.agent_id,
            session=body.session_id,
            args_digest=args_digest,
            peer=PeerClaim(uid=ident.uid, pid=ident.pid, start=ident.start_time),
            now=now,
            ttl_s=self.cfg.tokens.ttl_seconds,
        )
        # Queued, not awaited: the token grants nothing until redeemed, and the redeem's
        # durable event is committed after this one (same sinks, FIFO). Denials above
        # are durable before the response.
        extra: dict[str, Any] = {"jti": claims.jti, "token_exp": _iso(claims.exp)}
        if body.approval_id is not None:
            extra["approval_id"] = body.approval_id
        await self.audit.emit(self.event("mcp.authorize", **common, extra=extra), durable=False)
        self._remember_call(
            claims.jti,
            _PendingCall(arguments=args_json,
                         context=protocol.encode({"auth": auth, "policy": decision.policy_record()})),
            server=body.server,
            # Redeemable until exp + leeway: the record is needed no longer.
            expires_at=float(claims.exp + self.codec.leeway_s),
            now=now,
        )
        return _json(
            200,
            protocol.AuthorizeResponse(
                decision="allow",
                request_id=req.request_id,
                resolution_token=token,
                expires_at=_iso(claims.exp),
                secrets=sorted(decision.secrets),
                policy=protocol.DecisionBody(
                    decision="allow",
                    rules_matched=list(decision.rules_matched),
                    warnings=list(decision.warnings),
                ),
                user_id=decision.user_id,
            ),
        )

    async def redeem(self, req: Request) -> Response:
        body: RedeemRequest = protocol.decode_body(req.body, RedeemRequest)
        now = self.clock()
        verified = self.codec.verify(body.resolution_token, now=now)
        claims = verified.claims
        ident = req.peer.identity
        servers, _ = self._peer_facts(req)
        base: dict[str, Any] = {
            "server": claims.server,
            "tool": claims.tool,
            "user_id": claims.sub,
            "agent_id": claims.agent,
            "session_id": claims.sid,
            "peer": ident.audit(),
            "request_id": req.request_id,
        }
        if claims.server not in servers:
            raise await self._reject(
                "peer.rejected", base, Denied(
                    f'the calling process is not attested as server "{claims.server}"',
                    code="peer_mismatch",
                ), jti=claims.jti,
            )
        bound = claims.peer
        if (
            (bound.uid is not None and bound.uid != ident.uid)
            or (bound.pid is not None and bound.pid != ident.pid)
            or (bound.start is not None and bound.start != ident.start_time)
        ):
            raise await self._reject(
                "peer.rejected", base, Denied(
                    "the token is bound to another process", code="peer_mismatch"
                ), jti=claims.jti,
            )
        if body.arguments is not None and _digest_capped(body.arguments) != claims.args:
            raise await self._reject(
                "token.rejected", base, Denied(
                    "arguments differ from the ones the token was issued for",
                    code="arguments_mismatch",
                ), jti=claims.jti,
            )
        if not await self.store.burn_jti(claims.jti, float(claims.exp + self.codec.leeway_s)):
            raise await self._reject(
                "token.replayed", base, protocol.Conflict(
                    "resolution token was already redeemed", code="token_replayed"
                ), jti=claims.jti,
            )
        refs = self.loaded.secrets_for(claims.server, claims.tool)
        values: dict[str, SecretValue] = {}
        try:
            try:
                for alias, ref in refs.items():
                    backend = self.backends[ref.backend]
                    with trio.fail_after(BACKEND_TIMEOUT_S):
                        values[alias] = await backend.fetch(ref)
            except BaseException:
                # Dynamic credentials already created for this call must not outlive it.
                await self._revoke_backend_leases(
                    [(refs[a].backend, v.lease_id) for a, v in values.items() if v.lease_id]
                )
                raise
        except trio.TooSlowError:
            raise await self._reject(
                "request.rejected", base, protocol.Unavailable(
                    "secret backend timed out", code="backend_unavailable"
                ), jti=claims.jti,
            ) from None
        except SidekeyError as exc:
            raise await self._reject("request.rejected", base, exc, jti=claims.jti) from None
        dynamic = [(refs[a].backend, v.lease_id) for a, v in values.items() if v.lease_id]
        expires_at = min(float(claims.exp), now + self.cfg.leases.max_ttl_seconds)
        rec = LeaseRecord(
            lease_id=new_lease_id(),
            jti=claims.jti,
            server=claims.server,
            tool=claims.tool,
            user_id=claims.sub,
            agent_id=claims.agent,
            session_id=claims.sid,
            secrets=tuple(sorted(values)),
            created_at=now,
            expires_at=expires_at,
            state=ACTIVE,
            ended_at=None,
            peer_pid=ident.pid,
            peer_uid=ident.uid,
        )
        await self.leases.create(rec)
        if dynamic:
            await self.store.attach_backend_leases(rec.lease_id, dynamic)
            self._dynamic_leases.add(rec.lease_id)
        # The record now lives as long as the lease (plus leeway: a release racing the
        # expiry task still finds it).
        self._calls.move(claims.jti, rec.lease_id, expires_at=expires_at + self.codec.leeway_s,
                         now=now)
        redeem_event = self.event(
            "mcp.redeem",
            **base,
            lease_id=rec.lease_id,
            extra={
                "jti": claims.jti,
                "token_issuer": claims.iss,
                "self_issued": verified.self_issued,
                "secrets": [
                    {"name": a, "backend": refs[a].backend, "version": v.version}
                    for a, v in sorted(values.items())
                ],
                "expires_at": _iso(expires_at),
            },
        )
        try:
            await self.audit.emit(redeem_event)
        except SidekeyError:
            # Not recorded, so not handed out: the lease must not stay active.
            with trio.CancelScope(shield=True):
                await self.leases.end(rec, REVOKED)
                await self._end_lease_backends(rec.lease_id)
            raise
        # Last gate before any secret leaves: is the attested process still the one
        # that is connected (not exited, not setuid'd, pid not recycled)?
        try:
            req.peer.recheck()
        except SidekeyError as exc:
            await self.leases.end(rec, REVOKED)
            await self._end_lease_backends(rec.lease_id)
            rejected = await self._reject("peer.rejected", {**base, "lease_id": rec.lease_id}, exc)
            await self.leases.audited(rec.lease_id)  # peer.rejected names the lease: its end event
            raise rejected from None
        return _json(
            200,
            protocol.LeaseResponse(
                lease_id=rec.lease_id,
                expires_at=_iso(expires_at),
                server=claims.server,
                tool=claims.tool,
                secrets={alias: v.value for alias, v in values.items()},
                request_id=req.request_id,
            ),
        )

    async def release(self, req: Request) -> Response:
        body: ReleaseRequest = protocol.decode_body(req.body, ReleaseRequest)
        rec = await self.leases.get(body.lease_id)
        ident = req.peer.identity
        _, tier = self._peer_facts(req)
        if (rec.peer_uid, rec.peer_pid) != (ident.uid, ident.pid) and not tier_allows(tier, "admin"):
            raise Denied("only the process holding the lease may release it", code="peer_mismatch")
        ended = await self.leases.end(rec, RELEASED)
        await self._end_lease_backends(rec.lease_id)
        call = self._calls.pop(rec.lease_id, None)
        arguments, call_auth, call_policy = call.decoded() if call is not None else (None, None, None)
        result: dict[str, Any] = {"status": body.status}
        if body.duration_ms is not None:
            result["duration_ms"] = body.duration_ms
        withhold = False
        if body.result_size_bytes is not None:
            result["result_size_bytes"] = body.result_size_bytes
            withhold = quotas.max_result_size_exceeded(self.cfg.limits, rec.tool, body.result_size_bytes)
            if withhold:
                result["withheld"] = True  # over max_result_size_kb: the client drops it
        if body.error is not None:
            result["error"] = body.error
        await self.audit.emit(
            self.event(
                "mcp.tool_call",
                server=rec.server,
                tool=rec.tool,
                user_id=rec.user_id,
                agent_id=rec.agent_id,
                session_id=rec.session_id,
                arguments=arguments,
                result=result,
                auth=call_auth,
                policy=call_policy,
                peer=ident.audit(),
                lease_id=rec.lease_id,
                request_id=req.request_id,
                # No record (evicted for the server's memory budget, or the daemon
                # restarted): the call's mcp.authorize event (same jti) has the arguments.
                extra=None if call is not None else {"jti": rec.jti, "call_record": "dropped"},
            )
        )
        # The end's event is durable: the lease leaves leases_unaudited (a crash before
        # this line makes the next start write lease.recovered for it; see leases.py).
        await self.leases.audited(rec.lease_id)
        return _json(
            200,
            protocol.ReleaseResponse(lease_id=rec.lease_id, state=ended.state,
                                     request_id=req.request_id, withhold_result=withhold),
        )

    async def mint_token(self, req: Request) -> Response:
        body: TokenRequest = protocol.decode_body(req.body, TokenRequest)
        if body.server not in self.cfg.servers or body.tool not in self.cfg.servers[body.server].tool_scopes:
            raise NotFound(f"unknown server or tool: {body.server}/{body.tool}", code="tool_unknown")
        token, claims = self.codec.issue(
            server=body.server,
            tool=body.tool,
            user=body.user,
            agent=body.agent_id,
            session=body.session_id,
            args_digest=_digest_capped(body.arguments),
            peer=PeerClaim(),
            now=self.clock(),
            ttl_s=body.ttl_seconds,
        )
        await self.audit.emit(
            self.event(
                "token.issued",
                server=body.server,
                tool=body.tool,
                user_id=body.user,
                agent_id=body.agent_id,
                session_id=body.session_id,
                arguments=body.arguments,
                peer=req.peer.identity.audit(),
                request_id=req.request_id,
                extra={"jti": claims.jti, "token_exp": _iso(claims.exp)},
            )
        )
        return _json(
            200,
            protocol.TokenResponse(
                resolution_token=token, jti=claims.jti, expires_at=_iso(claims.exp),
                request_id=req.request_id,
            ),
        )

    # ------------------------------------------------------------------ approvals

    async def list_approvals(self, req: Request) -> Response:
        """``GET /v1/approvals?state=pending`` (tier approver): held calls, oldest first.
        ``state`` is pending (the default), approved, denied, expired, redeemed or all;
        ``limit`` at most 1000."""
        query = urllib.parse.parse_qs(req.query, keep_blank_values=True)
        state = (query.get("state") or ["pending"])[-1]
        if state != "all" and state not in approvals.STATES:
            raise BadRequest(
                f"state must be all or one of {', '.join(sorted(approvals.STATES))}",
                code="invalid_request")
        try:
            limit = int((query.get("limit") or [str(MAX_APPROVALS_LISTED)])[-1])
        except ValueError:
            raise BadRequest("limit must be an integer", code="invalid_request") from None
        if not 1 <= limit <= MAX_APPROVALS_LISTED:
            raise BadRequest(f"limit must be between 1 and {MAX_APPROVALS_LISTED}",
                             code="invalid_request")
        found = await self.approvals.list(None if state == "all" else [state], limit=limit)
        now = self.clock()
        return _json(200, {"approvals": [approval_wire(a, now) for a in found],
                           "request_id": req.request_id})

    async def approval_verb(self, req: Request) -> Response:
        """``POST /v1/approvals/{id}/approve`` and ``.../deny`` (tier approver; deny needs
        a reason), ``GET /v1/approvals/{id}/wait?timeout=S`` (tier approver, or the
        service the held call belongs to): long-polls until the approval is decided or
        expires, or ``S`` seconds pass (capped by ``approvals.max_wait_seconds``)."""
        approval_id, _, verb = req.path[len(APPROVALS_PREFIX):].partition("/")
        if verb not in APPROVAL_VERBS or not APPROVAL_ID.fullmatch(approval_id):
            raise NotFound(f"no approval {approval_id[:80]!r}", code="approval_not_found")
        ident = req.peer.identity
        if verb == "wait":
            servers, tier = self._peer_facts(req)
            timeout_s = parse_timeout(req.query, default=0.0)
            if not tier_allows(tier, "approver"):
                # A service may wait on its own held calls only.
                current = await self.approvals.store.get_approval(approval_id)
                if current is None or current.server not in servers:
                    raise NotFound(f"no approval {approval_id}", code="approval_not_found")
            approval, pending = await self.approvals.wait(approval_id, timeout_s=timeout_s)
            # A long poll may outlive the process that asked (or its uid): check again
            # before the decision is handed to whoever holds the socket now.
            req.peer.recheck()
            return _json(200, {"approval": approval_wire(approval, self.clock()),
                               "timed_out": pending, "request_id": req.request_id})
        body: protocol.ApprovalDecisionRequest = protocol.decode_body(
            req.body or b"{}", protocol.ApprovalDecisionRequest)
        _, tier = self._peer_facts(req)
        decided = await self.approvals.decide(
            approval_id, verdict=verb, reason=body.reason, peer=ident.audit(),
            peer_user=ident.user, request_id=req.request_id, owner=tier == "owner",
        )
        return _json(200, {"approval": approval_wire(decided, self.clock()),
                           "request_id": req.request_id})

    # ------------------------------------------------------------------ rotation

    async def rotate_secret(self, req: Request) -> Response:
        """``POST /v1/admin/secrets/{name}/rotate`` (tier security): write a new version to
        the secret's own backend, drop cached copies, optionally revoke the leases that
        still hold the old one. The value comes in the body or is generated here; it is
        never logged or audited, only the versions are."""
        name = urllib.parse.unquote(req.path[len(ROTATE_PREFIX) : -len("/rotate")])
        body: protocol.RotateRequest = protocol.decode_body(req.body, protocol.RotateRequest)
        if (body.value is None) == (body.generate is None):
            raise BadRequest("send exactly one of value or generate", code="invalid_request")
        matches = [
            (server, tool, ref)
            for server, tools in self.cfg.secrets.items()
            for tool, refs in tools.items()
            for ref in refs.values()
            if ref.label == name and (body.backend is None or ref.backend == body.backend)
        ]
        if not matches:
            raise NotFound(f'no secret "{name}" is mapped to any tool', code="secret_unknown")
        backends_named = sorted({ref.backend for _, _, ref in matches})
        if len(backends_named) > 1:
            raise BadRequest(f'"{name}" exists in backends {", ".join(backends_named)}; choose one '
                             "with backend", code="invalid_request")
        ref = matches[0][2]
        if ref.kind == "dynamic":
            raise BadRequest(f'"{name}" is a dynamic secret: its backend creates one per call',
                             code="invalid_request")
        backend = self.backends[ref.backend]
        value = body.value if body.value is not None else secrets.token_urlsafe(body.generate or 32)[
            : body.generate or 32
        ]
        base: dict[str, Any] = {"peer": req.peer.identity.audit(), "request_id": req.request_id}
        try:
            with trio.fail_after(BACKEND_TIMEOUT_S):
                old_version = (await backend.fetch(ref)).version
                new_version = await backend.rotate(ref, value)
        except (SidekeyError, trio.TooSlowError) as exc:
            err = exc if isinstance(exc, SidekeyError) else protocol.Unavailable(
                "secret backend timed out", code="backend_unavailable")
            await self.audit.emit(self.event(
                "secret.rotated", **base,
                error={"code": err.code, "message": err.message, "status": err.status},
                extra={"outcome": "failed", "secret": name, "backend": ref.backend},
            ))
            err.details["audited"] = True
            raise err from None
        # Every host (this one included) drops its cached copies when it reads the notice;
        # this one does at once.
        invalidate = getattr(backend, "invalidate", None)
        if invalidate is not None:
            invalidate(ref)
        try:
            await self.store.note_rotation(msgspec.json.encode(ref).decode(), at=self.clock())
        except StateUnavailable:
            log.warning('rotation of "%s" not posted to the state store: other hosts keep their '
                        "cached copy until it expires", name)
        revoked = 0
        if body.revoke_leases:
            pairs = {(server, tool) for server, tool, _ in matches}
            for rec in await self.store.leases_in_state(ACTIVE):
                if (rec.server, rec.tool) in pairs:
                    try:
                        await self.leases.end(rec, REVOKED)
                    except SidekeyError:
                        continue  # ended meanwhile
                    await self._end_lease_backends(rec.lease_id)
                    self._calls.pop(rec.lease_id, None)
                    revoked += 1
                    await self.audit.emit(self.event(
                        "lease.revoked", server=rec.server, tool=rec.tool, user_id=rec.user_id,
                        agent_id=rec.agent_id, session_id=rec.session_id, lease_id=rec.lease_id,
                        extra={"reason": f'secret "{name}" rotated'},
                    ))
                    await self.leases.audited(rec.lease_id)
        await self.audit.emit(self.event(
            "secret.rotated", **base,
            extra={"outcome": "applied", "secret": name, "backend": ref.backend,
                   "old_version": old_version, "new_version": new_version,
                   "leases_revoked": revoked},
        ))
        return _json(200, {"secret": name, "backend": ref.backend, "old_version": old_version,
                           "new_version": new_version, "leases_revoked": revoked,
                           "request_id": req.request_id})

    async def watch_rotations(
        self, *, interval_s: float = ROTATION_POLL_S,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Read the rotation notices other hosts (or this one) post to the state store
        and drop the cached copies of those secrets here, within ``interval_s``."""
        cursor: str | None
        try:
            cursor = await self.store.rotation_cursor()
        except StateUnavailable:
            cursor = None  # a degraded start (corrupt state database): read it once back
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            try:
                if cursor is None:
                    cursor = await self.store.rotation_cursor()
                    continue
                payloads, cursor = await self.store.rotations_after(cursor)
            except StateUnavailable:
                continue  # logged by the store; read on when it is back
            for payload in payloads:
                try:
                    ref = msgspec.json.decode(payload, type=SecretRef)
                except msgspec.DecodeError:  # not JSON, or not a SecretRef
                    log.warning("ignoring a malformed rotation notice")
                    continue
                invalidate = getattr(self.backends.get(ref.backend), "invalidate", None)
                if invalidate is not None:
                    dropped = invalidate(ref)
                    log.info('rotation notice for "%s" (%s): %d cached entries dropped',
                             ref.label, ref.backend, dropped)

    # ------------------------------------------------------------------ reload

    async def reload(self, *, source: str, peer: dict[str, Any] | None = None) -> tuple[bool, str | None]:
        """Load the config again and swap it in atomically, or keep the old one.

        Returns (applied, error). Every attempt writes a ``config.reloaded`` event with
        ``outcome`` applied or rejected. Leases in flight are not touched: they live
        in the state store and were granted under the policy of their time.
        """
        async with self._reload_lock:
            old = self.loaded
            try:
                new = await trio.to_thread.run_sync(load_config, old.path)
                trust = check_config_signature(new, running=self.trust)
                _check_restart_only(old, new)
                new_codec = build_codec(new, create=False)
            except (ConfigError, SidekeyError) as exc:
                error = str(exc)
                log.error("config reload (%s) rejected, keeping the running config: %s", source, error)
                await self.audit.emit(
                    self.event(
                        "config.reloaded",
                        peer=peer,
                        extra={"outcome": "rejected", "source": source, "reason": error,
                               "generation": self.generation},
                    )
                )
                return False, error
            self.loaded, self.cfg, self.codec, self.trust = new, new.config, new_codec, trust
            self._oauth_specs = _oauth_specs(new)
            self.generation += 1
            self.registry_health.update_config(new.config.registry)
            log.info("config reloaded (%s): generation %d", source, self.generation)
            await self.audit.emit(
                self.event(
                    "config.reloaded",
                    peer=peer,
                    extra={"outcome": "applied", "source": source, "generation": self.generation,
                           "files": [f.name for f in new.files]},
                )
            )
            return True, None

    async def admin_reload(self, req: Request) -> Response:
        if req.body.strip() not in (b"", b"{}"):
            raise BadRequest("reload takes no body", code="invalid_request")
        applied, error = await self.reload(source="api", peer=req.peer.identity.audit())
        if not applied:
            err = SidekeyError(error or "config rejected", code="config_rejected")
            err.status = 422
            err.details["audited"] = True
            raise err
        return _json(200, {"outcome": "applied", "generation": self.generation,
                           "request_id": req.request_id})

    # ------------------------------------------------------------------ helpers

    async def _reject(
        self, event_type: str, base: dict[str, Any], exc: SidekeyError, *, jti: str | None = None
    ) -> SidekeyError:
        """Audit a denial, mark it audited and return it for the caller to raise."""
        extra = {"jti": jti} if jti else None
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
        with static secrets only, the common case: no store query)."""
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

    async def reconcile_lease_events(self) -> int:
        """At start: write ``lease.recovered`` for every lease that ended without its end
        event being known to be written (a crash between the two), and mark it. A crash
        during this repeats the event at the next start (at least once, never lost).
        Returns how many. Raises AuditUnavailable / StateUnavailable (start fails)."""
        count = 0
        seen: set[str] = set()  # a mark that failed to stick must not loop forever
        while batch := [r for r in await self.leases.unaudited() if r.lease_id not in seen]:
            # One fsync per batch: the events are queued and the last one commits them
            # all (a sink commits queued events before a later durable one); only then
            # are the leases marked.
            for i, rec in enumerate(batch):
                seen.add(rec.lease_id)
                await self.audit.emit(self.event(
                    "lease.recovered", server=rec.server, tool=rec.tool, user_id=rec.user_id,
                    agent_id=rec.agent_id, session_id=rec.session_id, lease_id=rec.lease_id,
                    peer={"pid": rec.peer_pid, "uid": rec.peer_uid},
                    extra={"state": rec.state,
                           "ended_at": None if rec.ended_at is None else _iso(rec.ended_at),
                           "reason": "the daemon stopped between the lease's end and its "
                                     "audit event; the call's outcome is unknown"},
                ), durable=i == len(batch) - 1)
            for rec in batch:
                await self.leases.audited(rec.lease_id)
                count += 1
        if count:
            log.warning("wrote lease.recovered for %d leases that ended just before a crash", count)
        return count

    async def sweep_backend_leases(self) -> int:
        """At start: revoke every journaled dynamic credential still open. After a crash
        nobody can say whether the call that held it is still running, so the
        conservative answer holds: the credential dies, and its tool call's lease (if it
        is still active) is revoked with it. Returns how many credentials were revoked.
        Credentials Vault issued that never reached the journal are found through their
        intents (:meth:`resolve_backend_intents`; those still within their grace are
        resolved by :meth:`retry_revocations` a little later)."""
        orphans = await self.resolve_backend_intents()
        open_items = await self.store.open_backend_leases()
        if not open_items:
            return orphans
        log.info("revoking %d dynamic credentials left from before the restart", len(open_items))
        await self._revoke_backend_leases([(b, bl) for b, bl, _ in open_items])
        for lease_id in {lid for _, _, lid in open_items if lid is not None}:
            rec = await self.store.get_lease(lease_id)
            if rec is None or rec.state != ACTIVE:
                continue
            try:
                await self.leases.end(rec, REVOKED)
            except SidekeyError:
                continue
            await self.audit.emit(self.event(
                "lease.revoked", server=rec.server, tool=rec.tool, user_id=rec.user_id,
                agent_id=rec.agent_id, session_id=rec.session_id, lease_id=rec.lease_id,
                extra={"reason": "daemon restarted: its dynamic credentials were revoked"},
            ))
            await self.leases.audited(rec.lease_id)
        return orphans + len(open_items)

    async def resolve_backend_intents(self) -> int:
        """Resolve every journaled intent whose deadline passed more than
        :data:`~sidekey.backends.INTENT_GRACE_S` ago (its call crashed or failed before
        its credential, if any, was journaled): the backend revokes what it issued under
        the intent's prefix in the intent's window that nobody journaled. Intents of one
        prefix share one listing. An intent whose backend fails stays open (next round).
        Never raises for a backend or store outage. Returns how many credentials were
        revoked."""
        try:
            intents = await self.store.open_backend_intents()
        except SidekeyError as exc:
            log.warning("intent sweep skipped: %s", exc)
            return 0
        now = self.clock()
        groups: dict[tuple[str, str], list[BackendIntent]] = {}
        for intent in intents:
            if now >= intent.deadline + INTENT_GRACE_S:
                groups.setdefault((intent.backend, intent.prefix), []).append(intent)
        revoked = 0
        for (name, prefix), group in groups.items():
            backend = self.backends.get(name)
            sweep = getattr(unwrap(backend), "sweep_orphans", None) if backend else None
            if sweep is None:
                log.error("%d open intents for backend %r, which is not configured (or cannot "
                          "sweep): credentials under %s may live until their TTL",
                          len(group), name, prefix)
                continue
            try:
                with trio.fail_after(BACKEND_TIMEOUT_S):
                    revoked += await sweep(
                        prefix, [(i.at, i.deadline) for i in group],
                        functools.partial(self.store.backend_leases_known, name))
                for intent in group:
                    await self.store.backend_intent_done(intent.backend, intent.intent_id)
            except (SidekeyError, trio.TooSlowError) as exc:
                log.warning("cannot resolve %d intents under %s in backend %r yet: %s",
                            len(group), prefix, name, exc)
        return revoked

    async def retry_revocations(
        self, *, interval_s: float = REVOCATION_RETRY_S,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Forever: retry revoking dynamic credentials whose tool call is over but whose
        revocation failed (backend down at the time). Pool credentials (no call yet)
        are the backend's own business and are skipped."""
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            try:
                active = {rec.lease_id for rec in await self.store.leases_in_state(ACTIVE)}
                stale = [(b, bl) for b, bl, lid in await self.store.open_backend_leases()
                         if lid is not None and lid not in active]
            except SidekeyError as exc:
                log.warning("revocation retry skipped: %s", exc)
                continue
            if stale:
                log.info("retrying the revocation of %d dynamic credentials", len(stale))
                await self._revoke_backend_leases(stale)
            await self.resolve_backend_intents()

    async def _lease_expired(self, rec: LeaseRecord) -> None:
        self._calls.pop(rec.lease_id, None)
        await self._end_lease_backends(rec.lease_id)
        await self.audit.emit(
            self.event(
                "lease.expired",
                server=rec.server,
                tool=rec.tool,
                user_id=rec.user_id,
                agent_id=rec.agent_id,
                session_id=rec.session_id,
                lease_id=rec.lease_id,
                peer={"pid": rec.peer_pid, "uid": rec.peer_uid},
                extra={"expires_at": _iso(rec.expires_at)},
            )
        )

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

    async def sweep_call_records(
        self, *, interval_s: float = CALL_RECORD_SWEEP_S,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Forever: drop call records past their expiry (tokens never redeemed, leases
        that ended without a release) when no authorize comes along to do it."""
        task_status.started()
        while True:
            await trio.sleep(interval_s)
            self._calls.sweep(self.clock())


@functools.lru_cache(maxsize=4096)
def _uid_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _selector_uids(cfg: Config, daemon_uid: int) -> tuple[bool, frozenset[int], frozenset[str]]:
    """Which uids a peers or rbac selector can lift above anonymous, from the config
    alone: (any uid may: some selector pins neither uid nor user, the uids named, the
    user names named)."""
    any_uid = False
    uids: set[int] = set()
    users: set[str] = set()
    for selectors in cfg.peers.values():
        for sel in selectors:
            if sel.uid is not None:
                uids.add(daemon_uid if sel.uid == "self" else int(sel.uid))
            elif sel.user is not None:
                users.add(sel.user)
            else:
                any_uid = True
    for tier in ("owner", "admin", "security", "approver", "service"):
        entry: RbacEntry = getattr(cfg.rbac, tier)
        uids.update(daemon_uid if u == "self" else int(u) for u in entry.uids)
        users.update(entry.users)
        if entry.gids or entry.groups or entry.units:
            any_uid = True
    return any_uid, frozenset(uids), frozenset(users)


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
    cls: type[SidekeyError] = NotFound if decision.status == 404 else Denied
    err = cls(decision.message or "denied", code=decision.code, **dict(decision.details))
    err.status = decision.status
    return err


# --------------------------------------------------------------------------- running


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


async def run(loaded: LoadedConfig, *, socket_path: Path | None = None, init: bool = False) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the process exit code.

    ``init``: start a new state database in place of an empty (0-byte) ``state.db``
    (without it such a file stops the start: ``state_db_empty``).
    """
    # First, before any key is loaded: no core dumps, no ptrace/proc access by others
    # of our uid (see sidekey.hardening).
    hardening.protect_process_memory()
    cfg = loaded.config
    path = socket_path or loaded.socket_path
    trust = check_config_signature(loaded, running=None)
    # Files the daemon writes: a loose mode is fixed (with a warning), a foreign owner
    # or a directory others can write to stops the start.
    file_warnings = hardening.check_daemon_files(hardening.daemon_files(loaded), fix=True)
    try:
        hardening.check_key_files(hardening.key_files(loaded))
    except hardening.UnsafePathError as exc:
        # Reported like the key loaders' own refusals: a config error naming the file.
        raise ConfigError(f"{exc} [{exc.code}]") from None
    reinitialized = (
        init and cfg.state.backend == "sqlite" and reinitialize_if_empty(loaded.state_dir)
    )
    # Cheap checks that can fail first (backend keys, the socket), so a failed start
    # leaves no state behind; everything opened is closed on every way out.
    journal = StoreJournal(None)
    backends = build_backends(loaded, journal=journal)
    store: StateStore | None = None
    audit: AuditLog | None = None
    sock: socket.socket | None = None
    inherited = None
    try:
        inherited = systemd.listen_socket()
        sock = inherited if inherited is not None else bind_unix_socket(path, cfg.listen.mode_int)
        if inherited is not None and isinstance(inherited.getsockname(), str):
            path = Path(inherited.getsockname())
        codec = build_codec(loaded)
        loaded.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = await open_configured_store(loaded)
        journal.store = store
        sink: AuditSink = open_jsonl_sink(loaded.audit_path, fsync=cfg.audit.fsync)
        audit = AuditLog([sink])
    except BaseException:
        await _close_all(backends, store, audit)
        if sock is not None:
            sock.close()
            if inherited is None:
                path.unlink(missing_ok=True)
        raise
    for warning in loaded.warnings:
        log.warning("config: %s", warning)
    app = Sidekey(loaded, store=store, audit=audit, backends=backends, codec=codec)
    app.trust = trust
    server = HttpServer(app, cfg.listen)
    app.server = server
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)  # type: ignore[attr-defined]
            await nursery.start(store.run_maintenance)  # type: ignore[attr-defined]
            recovered = 0
            if store.health().get("reason") == "state_corrupt":
                # Degraded start (SqliteStore.open found the file damaged): /v1/health
                # says why and every call fails closed; recovery and sweeps wait for a
                # repaired or restored database.
                log.error("state database is corrupt: lease recovery and backend sweeps skipped")
            else:
                recovered = await app.leases.recover()
                await app.reconcile_lease_events()
                # Before the backends' own tasks start: their warm pools journal credentials
                # that belong to no call yet, and must not be taken for leftovers.
                await app.sweep_backend_leases()
            for tools in cfg.secrets.values():
                for refs in tools.values():
                    for ref in refs.values():
                        register = getattr(unwrap(backends[ref.backend]), "register", None)
                        if ref.kind == "dynamic" and ref.pool_size and register is not None:
                            register(ref)  # fill its warm pool now, not at the first call
            for backend in backends.values():
                runner = getattr(unwrap(backend), "run", None)
                if runner is not None:  # token renewal, warm pools
                    await nursery.start(runner)
                purger = getattr(backend, "run_purger", None)
                if purger is not None:  # drops expired cached values (backends.cache)
                    await nursery.start(purger)
            # Drops verified-token cache entries at their exp (sidekey.expiry).
            await nursery.start(app.oauth.run_purger)
            await nursery.start(
                functools.partial(app.retry_revocations, interval_s=cfg.leases.revocation_retry_s)
            )
            await nursery.start(app.leases.run)
            await nursery.start(app.sweep_call_records)
            await nursery.start(app.approvals.run_sweeper)
            await nursery.start(app.run_rejection_flusher)
            await nursery.start(app.watch_rotations)
            await nursery.start(app.approvals.run_webhook)
            if cfg.policy.registry_health_checks:
                await nursery.start(app.registry_health.run)
            await audit.emit(
                app.event(
                    "daemon.started",
                    extra={
                        "pid": os.getpid(),
                        "socket": str(path),
                        "config": str(loaded.path),
                        "leases_recovered": recovered,
                        # Start-up hardening (sidekey.hardening): modes it fixed, and
                        # whether an empty state database was replaced (--init).
                        **({"files_fixed": file_warnings} if file_warnings else {}),
                        **({"state_reinitialized": True} if reinitialized else {}),
                    },
                )
            )
            nursery.start_soon(_signals, server, app)

            async def closed() -> None:
                if inherited is None:
                    path.unlink(missing_ok=True)

            async with trio.open_nursery() as serving:
                await serving.start(
                    lambda task_status: server.serve(sock, on_closed=closed, task_status=task_status)
                )
                log.info("sidekey listening on %s (pid %d)", path, os.getpid())
                systemd.notify("READY=1")
            # serve() has returned: the listener is closed and connections drained.
            systemd.notify("STOPPING=1")
            await app.close_rejection_windows()
            await audit.emit(app.event("daemon.stopped", extra={"pid": os.getpid()}))
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await app.oauth.aclose()
        await _close_all(backends, store, audit)
    return 0


def _oauth_specs(loaded: LoadedConfig) -> dict[str, OAuth2Config]:
    specs = {name: loaded.oauth2_for(name) for name in loaded.config.servers}
    return {name: spec for name, spec in specs.items() if spec is not None}


def _check_restart_only(old: LoadedConfig, new: LoadedConfig) -> None:
    """Refuse a reload that changes what only a restart can apply."""
    a, b = old.config, new.config
    changed = [
        name
        for name, x, y in (
            ("listen", a.listen, b.listen),
            ("state", a.state, b.state),
            ("backends", a.backends, b.backends),
            ("tokens.issuer", a.tokens.issuer, b.tokens.issuer),
            ("tokens.keyset", a.tokens.keyset, b.tokens.keyset),
            ("audit.path", a.audit.path, b.audit.path),
            ("audit.fsync", a.audit.fsync, b.audit.fsync),
            ("policy.registry_health_checks", a.policy.registry_health_checks,
             b.policy.registry_health_checks),
        )
        if x != y
    ]
    if changed:
        raise ConfigError(
            f"{new.path.name}: changes {', '.join(changed)}, which only a restart applies; "
            "nothing was reloaded"
        )


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


def check_config_signature(new: LoadedConfig, *, running: ConfigTrust | None) -> ConfigTrust | None:
    """Verify the detached signature of ``new`` when the running config (on reload) or
    ``new`` itself requires one. On reload the running config's cached keys decide, so
    a new config can neither switch the check off nor bring its own keys; an older
    signature than the running one's (a rollback) is refused. Returns what the new
    config will require of its successor. Raises :class:`ConfigError`."""
    from .signing import trusted_keys, verify_config_details

    wants = new.config.config_signing.require_signed_config
    if running is None and not wants:
        return None
    keys = running.keys if running is not None else trusted_keys(new)
    if not keys:
        raise ConfigError(
            f"{new.path.name}: $.config_signing.trusted_keys: require_signed_config needs at "
            "least one trusted key"
        )
    verified = verify_config_details(new, keys, contents=new.contents)
    if running is not None and running.signed_at and verified.signed_at < running.signed_at:
        raise ConfigError(
            f"{new.path.name}.sig: signed at {verified.signed_at}, before the running config "
            f"({running.signed_at}); refusing a rollback"
        )
    log.info("config signature ok (key %s, signed at %s)", verified.kid, verified.signed_at)
    if not wants:
        return None
    return ConfigTrust(keys=trusted_keys(new), signed_at=verified.signed_at)


async def _close_all(
    backends: dict[str, Backend], store: StateStore | None, audit: AuditLog | None
) -> None:
    with trio.CancelScope(shield=True):
        for b in backends.values():
            await b.aclose()
        if store is not None:
            await store.aclose()
        if audit is not None:
            await audit.aclose()


async def _signals(server: HttpServer, app: Sidekey) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                try:
                    await app.reload(source="SIGHUP")
                except SidekeyError as exc:  # audit down: logged, the old config stays
                    log.error("config reload failed: %s", exc)
                continue
            log.info("received %s: stopping", signal.Signals(signum).name)
            server.stop()
            app.approvals.stop()
            return
