"""Admin and approver endpoints: health and status, the registry inventory
(``GET /v1/registry``), minting tokens (``POST /v1/tokens``), the reload endpoint, the
approvals list and verbs, and secret rotation.
"""

from __future__ import annotations

import datetime
import os
import secrets
import urllib.parse
from typing import Any

import msgspec
import trio

from .. import approvals, protocol, registry
from ..approval_desk import parse_timeout
from ..approval_desk import wire as approval_wire
from ..approvals import APPROVAL_ID
from ..leases import ACTIVE, REVOKED
from ..peer import tier_allows
from ..protocol import BadRequest, NotFound, SidekeyError, TokenRequest, Unprocessable
from ..server import Request, Response
from ..store import MAX_APPROVALS_LISTED, StateUnavailable
from ..tokens import PeerClaim
from .context import (
    APPROVAL_VERBS,
    APPROVALS_PREFIX,
    BACKEND_TIMEOUT_S,
    ROTATE_PREFIX,
    Context,
    _digest_capped,
    _iso,
    _json,
    log,
)


class Admin(Context):
    """The admin, approver and status endpoints (a mixin of
    :class:`~sidekey.daemon.app.Sidekey`)."""

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
            # Per sink: type, ok, whether calls wait for it, and events lost (no paths or
            # addresses: this endpoint is anonymous).
            "audit": {"ok": audit.get("ok"), "sinks": [
                {"sink": h.get("sink"), "name": h.get("name", h.get("sink")), "ok": h.get("ok"),
                 "required": h.get("required", True), "dropped": h.get("dropped", 0)}
                for h in audit.get("sinks", ())]},
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

    async def registry_list(self, req: Request) -> Response:
        """``GET /v1/registry?stale=DAYS&owner=NAME&as_of=YYYY-MM-DD`` (tier security):
        the inventory of the running config (every server the central registry lists or
        this host declares) with each server's latest health check. ``stale``: only
        servers last reviewed more than DAYS days before ``as_of`` (default today, UTC,
        by the daemon's clock), never-reviewed ones included; ``owner``: only that
        owner's. A bad parameter is 400 ``query_param_invalid`` / ``query_param_unknown``."""
        query = registry.parse_query(req.query)
        today = query.as_of or datetime.datetime.fromtimestamp(self.clock(), datetime.UTC).date()
        rows = registry.select(registry.listing(self.cfg, today=today), today=today,
                               stale_days=query.stale_days, owner=query.owner)
        health: dict[str, dict[str, Any]] = self.registry_health.status()
        if not self.cfg.policy.registry_health_checks:
            # Not polled (policy.registry_health_checks: false): say so, not "unknown".
            health = {name: {"state": "disabled", "url": target.url}
                      for name, target in self.registry_health.targets.items()}
        return _json(200, {
            "as_of": today.isoformat(),
            "registry_version": self.cfg.registry.version,
            "filters": {"stale": query.stale_days, "owner": query.owner},
            "servers": [registry.row_record(r, today=today, health=health.get(r.server))
                        for r in rows],
            "request_id": req.request_id,
        })

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

    async def admin_reload(self, req: Request) -> Response:
        if req.body.strip() not in (b"", b"{}"):
            raise BadRequest("reload takes no body", code="invalid_request")
        applied, error = await self.reload(source="api", peer=req.peer.identity.audit())
        if not applied:
            err = Unprocessable(error or "config rejected", code="config_rejected")
            err.details["audited"] = True
            raise err
        return _json(200, {"outcome": "applied", "generation": self.generation,
                           "request_id": req.request_id})

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
                        extra={"reason": f'secret "{name}" rotated',
                               **self.egress_audit(rec.lease_id)},
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
