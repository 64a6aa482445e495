"""The governed call: ``POST /v1/authorize`` (policy, quotas, approval, user-token
verification; a held call's 202), ``POST /v1/redeem`` (the secrets, under a lease) and
``POST /v1/release`` (the lease's end and the ``mcp.tool_call`` event).
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Any

import trio

from .. import approvals, logs, protocol, quotas
from ..approval_desk import HeldCall
from ..approvals import Approval
from ..backends import Backend, SecretValue
from ..backends.oauth import Subject, SubjectTokenRequired, SubjectTokenUnavailable
from ..config import SecretRef
from ..leases import ACTIVE, RELEASED, REVOKED, new_lease_id
from ..peer import tier_allows
from ..policy import CallFacts, Decision, decide
from ..protocol import (
    AccessToken,
    AuthorizeRequest,
    Denied,
    RedeemRequest,
    ReleaseRequest,
    SidekeyError,
)
from ..server import Request, Response
from ..store import CounterOp, LeaseRecord, StateUnavailable, gcra
from ..tokens import PeerClaim
from .context import (
    BACKEND_TIMEOUT_S,
    Context,
    _canonical_capped,
    _denial,
    _digest_capped,
    _iso,
    _json,
    _PendingCall,
    log,
)

MAX_PENDING_CALLS = 100_000  # entries of the local rate-limit fallback kept in memory


class Calls(Context):
    """The call path's endpoints and steps (a mixin of
    :class:`~sidekey.daemon.app.Sidekey`)."""

    async def _verify_user_token(
        self, body: AuthorizeRequest, servers: frozenset[str]
    ) -> tuple[AccessToken | None, SidekeyError | None]:
        """Verify the bearer token against the server's issuer and audience, but only
        for a process attested as that server: others must not make us fetch JWKS."""
        return await self._verify_token_for(body.server, body.user_token, servers)

    async def _verify_token_for(
        self, server: str, user_token: str | None, servers: frozenset[str]
    ) -> tuple[AccessToken | None, SidekeyError | None]:
        """:meth:`_verify_user_token` for any request naming a server and a user token
        (``authorize``; ``sessions/end`` uses it too, so both decide the same user)."""
        if user_token is None or server not in servers or server not in self.cfg.servers:
            return None, None
        oauth = self._oauth_specs.get(server)
        if oauth is None:
            return None, None
        try:
            return await self.oauth.verify(user_token, oauth), None
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
            self.metrics.quota_refused(shed.limit)
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
                self.metrics.quota_refused(denial.limit)
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
            limit = exc.details.get("limit")
            if isinstance(limit, str):  # approvals.max_pending_per_user
                self.metrics.quota_refused(limit)
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
        logs.note(server=body.server, tool=body.tool)
        req.call = (body.server, body.tool)
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
        self.metrics.decision(body.server, body.tool, decision.outcome, decision.code)
        if held is not None:
            logs.note(code=decision.code)
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
        # The verified user token, as the subject of the tool's token exchanges: handed
        # to the redeem of this request, or held in memory (never persisted) until the
        # two-step redeem of this jti or the resolution token's expiry.
        subject = None
        if user_token is not None and body.user_token is not None and any(
                ref.kind == "oauth_token_exchange"
                for ref in self.loaded.secrets_for(body.server, body.tool).values()):
            subject = Subject(token=body.user_token, issuer=user_token.issuer,
                              subject=user_token.subject, expires_at=float(user_token.expires_at))
            if not body.redeem:
                self._subjects.put(claims.jti, subject, now=now,
                                   expires_at=float(claims.exp + self.codec.leeway_s))
        lease = None
        if body.redeem:
            # One request for both steps: the same checks and records as a redeem by
            # this connection's peer (the token is bound to it), and the token itself
            # never leaves the daemon.
            lease = await self._redeem(req, token, body.arguments, subject=subject, one_step=True)
        return _json(
            200,
            protocol.AuthorizeResponse(
                decision="allow",
                request_id=req.request_id,
                resolution_token=None if lease is not None else token,
                lease=lease,
                expires_at=lease.expires_at if lease is not None else _iso(claims.exp),
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
        return _json(200, await self._redeem(req, body.resolution_token, body.arguments))

    async def _redeem(self, req: Request, resolution_token: str,
                      arguments: dict[str, Any] | None, *, subject: Subject | None = None,
                      one_step: bool = False) -> protocol.LeaseResponse:
        """Exchange a resolution token for a lease (POST /v1/redeem, or the second half of
        an authorize with ``redeem: true``, which passes the verified user token as
        ``subject``)."""
        now = self.clock()
        verified = self.codec.verify(resolution_token, now=now)
        claims = verified.claims
        logs.note(server=claims.server, tool=claims.tool)
        req.call = (claims.server, claims.tool)
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
        if arguments is not None and _digest_capped(arguments) != claims.args:
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
        if not one_step:
            subject = self._subjects.pop(claims.jti, now=now)
        values: dict[str, SecretValue] = {}
        try:
            try:
                for alias, ref in refs.items():
                    backend = self.backends[ref.backend]
                    fetched = False
                    started = time.perf_counter()
                    try:
                        with trio.fail_after(BACKEND_TIMEOUT_S):
                            if ref.kind == "oauth_token_exchange":
                                values[alias] = await self._exchange(
                                    backend, ref, subject, one_step=one_step)
                            else:
                                values[alias] = await backend.fetch(ref)
                        fetched = True
                    finally:
                        self.metrics.backend_fetch(ref.backend, time.perf_counter() - started,
                                                   ok=fetched)
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
        # A lease never outlives its credentials: a dynamic one that dies sooner (its own
        # TTL, or the Vault token that issued it: Vault revokes a token's leases with it)
        # ends the lease at that instant.
        credential_ttls = [v.lease_ttl_s for v in values.values() if v.lease_ttl_s is not None]
        if credential_ttls:
            expires_at = min(expires_at, now + min(credential_ttls))
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
                # Presenting the arguments at redeem is optional on the wire (older
                # clients, curl): true means they were presented and matched the digest
                # bound into the token, false that the check did not run (the
                # mcp.authorize event with this jti names the arguments authorized).
                "arguments_checked": arguments is not None,
                "secrets": [
                    {"name": a, "backend": refs[a].backend, "version": v.version,
                     **(v.audit or {}),
                     **({"egress": True} if refs[a].egress is not None else {})}
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
        # Egress-only secrets stay here, with the lease (sidekey.daemon.egress).
        egress = {a: (r.egress, values[a].value) for a, r in refs.items()
                  if r.egress is not None and a in values}
        if egress:
            self._egress_open(rec, (ident.uid, ident.pid, ident.start_time), egress)
        return protocol.LeaseResponse(
            lease_id=rec.lease_id,
            expires_at=_iso(expires_at),
            server=claims.server,
            tool=claims.tool,
            secrets={alias: v.value for alias, v in values.items() if alias not in egress},
            request_id=req.request_id,
            egress=sorted(egress),
        )

    @staticmethod
    async def _exchange(backend: Backend, ref: SecretRef, subject: Subject | None, *,
                        one_step: bool) -> SecretValue:
        """A ``kind: oauth_token_exchange`` secret: the backend exchanges the call's
        verified user token (sidekey.backends.oauth)."""
        if subject is None:
            if one_step:
                raise SubjectTokenRequired(
                    f"secret {ref.label} is a token exchange of the user's token, and this "
                    "call has no verified user token", code="subject_token_required")
            raise SubjectTokenUnavailable(
                f"secret {ref.label} is a token exchange of the user's token, which this "
                "daemon no longer holds for this resolution token (restarted, evicted, or "
                "authorized on another host): authorize again, or use authorize with "
                "redeem: true", code="subject_token_unavailable")
        exchange = getattr(backend, "exchange", None)
        if exchange is None:  # config checks refuse this; fail closed anyway
            raise SubjectTokenRequired(f"backend {ref.backend} cannot exchange tokens",
                                       code="subject_token_required")
        value: SecretValue = await exchange(ref, subject)
        return value

    async def release(self, req: Request) -> Response:
        body: ReleaseRequest = protocol.decode_body(req.body, ReleaseRequest)
        ident = req.peer.identity
        _, tier = self._peer_facts(req)
        # Read, holder check (an admin may release any lease) and compare-and-set in one
        # store step where the store can (Redis: one script, one round trip).
        holder = None if tier_allows(tier, "admin") else (ident.uid, ident.pid)
        rec, ended = await self.leases.end_held(body.lease_id, RELEASED, holder=holder)
        logs.note(server=rec.server, tool=rec.tool)
        req.call = (rec.server, rec.tool)
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
                extra={**({} if call is not None else {"jti": rec.jti, "call_record": "dropped"}),
                       # Its upstream requests through egress (sidekey.daemon.egress).
                       **self.egress_audit(rec.lease_id)} or None,
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
