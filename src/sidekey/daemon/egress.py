"""``<METHOD> /v1/egress/<lease_id>/<host>[:port]/<path>``: a tool call's upstream HTTPS
requests, sent by the daemon with the credential injected (issue 16, item 1).

A secret with an ``egress:`` rule (:class:`sidekey.egress.EgressRule`) is fetched at
redeem like any other but never handed out: its value stays in this process, in the
call's :class:`EgressGrant`, until the lease ends (release, expiry, revocation: every
end goes through :meth:`~sidekey.daemon.context.Context._end_lease_backends`, which
closes the grant, drops the value and cancels the requests in flight). Each request is
checked (the lease's holder process, the lease live in the store, method, host, port
and path against the rules, caps), sent with httpx over TLS that is always verified
(the rule's CA bundle or the system's), read within its caps, cleaned of anything that
reveals the credential, and recorded for the call's ``mcp.tool_call`` event. Decisions
are :mod:`sidekey.egress`'s; this module is the I/O.
"""

from __future__ import annotations

import collections
import dataclasses
import http.cookiejar
import ssl
import time
from typing import Any

import httpx
import msgspec
import trio

from .. import egress as eg
from .. import logs
from ..leases import ACTIVE
from ..protocol import (
    BadGateway,
    BadRequest,
    Conflict,
    Denied,
    GatewayTimeout,
    NotFound,
    SidekeyError,
    TooLarge,
    TooManyRequests,
)
from ..server import Request, Response
from ..store import LeaseRecord
from .context import Context, log

# Closed grants whose records wait for their lease's end event (release, expiry,
# revocation pop them); bounded in case an end path never asks.
MAX_ENDED_RECORDS = 10_000
# Connections the daemon keeps to upstreams, per CA bundle (httpx pools them).
MAX_UPSTREAM_CONNECTIONS = 100
MAX_UPSTREAM_KEEPALIVE = 20
# The metrics' endpoint label (never the caller's path).
EGRESS_ENDPOINT = eg.EGRESS_PREFIX + "{lease_id}/{host}/{path}"


def is_egress_path(path: str) -> bool:
    return path.startswith(eg.EGRESS_PREFIX)


@dataclasses.dataclass(slots=True, eq=False)
class EgressGrant:
    """One live lease's egress: its rules, the values (in memory only, until the lease
    ends), the holder process, and what its upstream requests did."""

    lease_id: str
    server: str
    tool: str
    user_id: str | None
    holder: tuple[int, int | None, int | None]  # uid, pid, process start time
    expires_at: float
    rules: dict[str, eg.EgressRule]
    values: dict[str, str]
    needles: tuple[bytes, ...]
    in_flight: int = 0
    count: int = 0
    bytes_in: int = 0
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    record_bytes: int = 0
    dropped: int = 0
    closed: bool = False
    scopes: set[trio.CancelScope] = dataclasses.field(default_factory=set)

    def record(self, entry: dict[str, Any]) -> None:
        size = len(msgspec.json.encode(entry)) + 1
        if (len(self.records) < eg.MAX_AUDIT_ENTRIES
                and self.record_bytes + size <= eg.MAX_AUDIT_BYTES):
            self.records.append(entry)
            self.record_bytes += size
        else:
            self.dropped += 1

    def audit_fields(self) -> dict[str, Any]:
        """A snapshot: a request cancelled by the lease's end records itself later (its
        own egress.failed event says so), never in an event already built."""
        out: dict[str, Any] = {"egress": list(self.records)}
        if self.dropped:
            out["egress_dropped"] = self.dropped
        return out


@dataclasses.dataclass(slots=True)
class EgressState:
    grants: dict[str, EgressGrant] = dataclasses.field(default_factory=dict)
    ended: collections.OrderedDict[str, dict[str, Any]] = dataclasses.field(
        default_factory=collections.OrderedDict)
    clients: dict[str | None, httpx.AsyncClient] = dataclasses.field(default_factory=dict)


class _Failed(Exception):
    """An upstream request that failed: the error to answer and audit."""

    def __init__(self, error: SidekeyError) -> None:
        super().__init__(error.code)
        self.error = error


class Egress(Context):
    """The egress endpoint and the grants' life (a mixin of
    :class:`~sidekey.daemon.app.Sidekey`)."""

    @property
    def egress_state(self) -> EgressState:
        state: EgressState | None = self.__dict__.get("_egress_state_obj")
        if state is None:
            state = self.__dict__["_egress_state_obj"] = EgressState()
        return state

    # ------------------------------------------------------------------ grants

    def _egress_open(self, rec: LeaseRecord, holder: tuple[int, int | None, int | None],
                     secrets: dict[str, tuple[eg.EgressRule, str]]) -> None:
        """Keep the egress-only secrets of a new lease (called at redeem, last)."""
        needles: set[bytes] = set()
        for alias, (rule, value) in secrets.items():
            needles.update(eg.injection(alias, rule, value).needles)
        self.egress_state.grants[rec.lease_id] = EgressGrant(
            lease_id=rec.lease_id, server=rec.server, tool=rec.tool, user_id=rec.user_id,
            holder=holder, expires_at=rec.expires_at,
            rules={a: r for a, (r, _) in secrets.items()},
            values={a: v for a, (_, v) in secrets.items()},
            needles=tuple(sorted(needles, key=len, reverse=True)))

    def _egress_close(self, lease_id: str) -> None:
        """The lease ended: drop the values, cancel requests in flight (they answer
        ``egress_lease_ended``), keep the records for the end's audit event."""
        state = self.egress_state
        grant = state.grants.pop(lease_id, None)
        if grant is None:
            return
        grant.closed = True
        grant.values.clear()
        grant.needles = ()
        for scope in grant.scopes:
            scope.cancel()
        state.ended[lease_id] = grant.audit_fields()
        while len(state.ended) > MAX_ENDED_RECORDS:
            state.ended.popitem(last=False)

    def egress_audit(self, lease_id: str) -> dict[str, Any]:
        """The ``egress`` (and ``egress_dropped``) fields of an ended lease's event;
        empty for a lease without egress."""
        return self.egress_state.ended.pop(lease_id, {})

    async def egress_aclose(self) -> None:
        """Close the upstream connection pools (at shutdown)."""
        clients, self.egress_state.clients = self.egress_state.clients, {}
        for client in clients.values():
            await client.aclose()

    def _egress_client(self, ca_file: str | None) -> httpx.AsyncClient:
        path = str(self.loaded.resolve(ca_file)) if ca_file else None
        client = self.egress_state.clients.get(path)
        if client is None:
            # (httpx's and httpcore's log floors are set at start: sidekey.logs.)
            # Verification is always on: the rule's bundle only, or the system's CAs.
            # trust_env=False: no proxy or CA bundle from the environment; redirects are
            # the MCP server's business (each hop comes back through here, checked).
            context = ssl.create_default_context(cafile=path)
            # No cookie jar: a cookie an upstream sets in one call must never ride along
            # on another call's request (a jar whose policy accepts no domain).
            jar = http.cookiejar.CookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
            client = httpx.AsyncClient(
                verify=context, trust_env=False, follow_redirects=False, cookies=jar,
                limits=httpx.Limits(max_connections=MAX_UPSTREAM_CONNECTIONS,
                                    max_keepalive_connections=MAX_UPSTREAM_KEEPALIVE))
            self.egress_state.clients[path] = client
        return client

    # ------------------------------------------------------------------ the endpoint

    async def egress(self, req: Request) -> Response:
        try:
            target = eg.parse_target(req.path, req.query)
        except eg.BadTarget as exc:
            raise BadRequest(f"egress: {exc}", code="egress_bad_target") from None
        ident = req.peer.identity
        rec = await self.leases.get(target.lease_id)  # 404 lease_not_found
        logs.note(server=rec.server, tool=rec.tool)
        req.call = (rec.server, rec.tool)
        grant = self.egress_state.grants.get(target.lease_id)
        # The holder first (as release does): another process learns nothing about a
        # lease it does not hold, not even its state.
        if (rec.peer_uid, rec.peer_pid) != (ident.uid, ident.pid) or (
                grant is not None and grant.holder != (ident.uid, ident.pid, ident.start_time)):
            raise Denied("only the process holding the lease may send its egress",
                         code="peer_mismatch")
        entry = eg.audit_entry(req.method, target)
        if rec.state != ACTIVE:
            raise await self._egress_refused(
                rec, req, entry, Conflict(f"lease is {rec.state}", code=f"lease_{rec.state}"))
        if grant is None:
            raise await self._egress_refused(rec, req, entry, NotFound(
                "this lease has no egress on this daemon (none configured for the tool, or "
                "the daemon restarted since the redeem)", code="lease_not_found"))
        if self.clock() >= grant.expires_at:
            raise await self._egress_refused(rec, req, entry,
                                             Conflict("lease is expired", code="lease_expired"))
        # Every request that reaches the rules counts, refused ones too: past the cap a
        # call's requests are refused without an event each (the first refusal is
        # audited, the rest counted in egress_dropped), so a looping server cannot turn
        # refusals into unbounded audit volume.
        grant.count += 1
        if grant.count > eg.MAX_REQUESTS_PER_CALL:
            limit = TooManyRequests(
                f"more than {eg.MAX_REQUESTS_PER_CALL} upstream requests in one call",
                code="egress_request_limit")
            if grant.count > eg.MAX_REQUESTS_PER_CALL + 1:
                grant.dropped += 1
                limit.details["audited"] = True
                raise limit
            raise await self._egress_refused(rec, req, entry, limit, grant=grant)
        matched = [(a, r) for a, r in sorted(grant.rules.items())
                   if eg.rule_allows(r, req.method, target)]
        if not matched:
            raise await self._egress_refused(rec, req, entry, Denied(
                eg.why_refused(grant.rules, req.method, target), code="egress_not_allowed"),
                grant=grant)
        max_request = min(r.max_request_bytes if r.max_request_bytes is not None
                          else self.cfg.listen.max_body_bytes for _, r in matched)
        if len(req.body) > max_request:
            raise await self._egress_refused(rec, req, entry, TooLarge(
                f"request body over the rule's {max_request} bytes",
                code="egress_request_too_large"), grant=grant)
        if grant.in_flight >= eg.MAX_IN_FLIGHT_PER_LEASE:
            raise await self._egress_refused(rec, req, entry, TooManyRequests(
                f"more than {eg.MAX_IN_FLIGHT_PER_LEASE} upstream requests of one call at once",
                code="egress_concurrency_limit"), grant=grant)
        grant.in_flight += 1
        started = time.perf_counter()
        entry["bytes_out"] = len(req.body)
        try:
            response = await self._egress_send(req, target, grant, matched, entry)
        except _Failed as failed:
            entry["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
            raise await self._egress_refused(rec, req, entry, failed.error, grant=grant,
                                             event_type="egress.failed") from None
        finally:
            grant.in_flight -= 1
        entry["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
        grant.record(entry)
        return response

    async def _egress_send(self, req: Request, target: eg.Target, grant: EgressGrant,
                           matched: list[tuple[str, eg.EgressRule]],
                           entry: dict[str, Any]) -> Response:
        injections = [eg.injection(a, r, grant.values[a]) for a, r in matched]
        injected_names = [name for inj in injections for name, _ in inj.headers]
        headers = eg.upstream_request_headers(req.headers, injected_names)
        headers += [h for inj in injections for h in inj.headers]
        # An uncompressed answer: what is redacted and capped is what the upstream sent
        # (a compressed one is still decoded, chunk by chunk, within the same cap).
        headers.append(("accept-encoding", "identity"))
        query = eg.upstream_query(target.query, [inj.query for inj in injections if inj.query])
        url = f"https://{target.authority}{target.raw_path}" + (f"?{query}" if query else "")
        timeout_s = min(r.timeout_s for _, r in matched)
        cap = min(r.max_response_bytes for _, r in matched)
        limit = "max_response_bytes"
        tool_limits = self.cfg.limits.per_tool.get(grant.tool)
        if tool_limits is not None and tool_limits.max_result_size_kb is not None:
            left = max(0, tool_limits.max_result_size_kb * 1024 - grant.bytes_in)
            if left < cap:
                cap, limit = left, "max_result_size_kb"
        try:
            client = self._egress_client(matched[0][1].ca_file)
        except (OSError, ssl.SSLError) as exc:
            # The operator's bundle (ca_file) is missing or not PEM: nothing is sent.
            log.error("egress: ca_file of %s.%s cannot be loaded: %s", grant.server, grant.tool,
                      type(exc).__name__)
            raise _Failed(BadGateway("the rule's ca_file cannot be loaded",
                                     code="egress_ca_file_unreadable")) from None
        until_expiry = grant.expires_at - self.clock()
        body = bytearray()
        over = False
        status = 0
        raw_headers: list[tuple[bytes, bytes]] = []
        done = False
        with trio.CancelScope(deadline=trio.current_time() + min(timeout_s, until_expiry)) as scope:
            grant.scopes.add(scope)
            try:
                request = client.build_request(req.method, url, headers=headers, content=req.body,
                                               timeout=httpx.Timeout(timeout_s))
                upstream = await client.send(request, stream=True)
                try:
                    status = upstream.status_code
                    raw_headers = list(upstream.headers.raw)
                    declared = upstream.headers.get("content-length", "")
                    if (declared.isdigit() and int(declared) > cap
                            and "content-encoding" not in upstream.headers):
                        over = True
                    else:
                        async for chunk in upstream.aiter_bytes():
                            body += chunk
                            if len(body) > cap:
                                over = True
                                break
                finally:
                    await upstream.aclose()
                done = True
            except httpx.TimeoutException:
                pass  # answered below, as the deadline would be
            except httpx.HTTPError as exc:
                raise _Failed(_upstream_error(exc)) from None
            finally:
                grant.scopes.discard(scope)
        if not done:
            if grant.closed:
                raise _Failed(Conflict("the lease ended while the upstream request was in flight",
                                       code="egress_lease_ended"))
            why = ("the lease expires" if until_expiry < timeout_s
                   else f"the rule's timeout_s ({timeout_s:g} s)")
            raise _Failed(GatewayTimeout(f"upstream did not answer before {why}",
                                         code="egress_upstream_timeout"))
        entry["status"] = status
        if over:
            raise _Failed(BadGateway(
                f"upstream response over {cap} bytes ({limit})", code="egress_response_too_large",
                limit=limit, max_bytes=cap))
        cleaned, redacted = eg.redact(bytes(body), grant.needles)
        out_headers, content_type, stripped = eg.response_headers(raw_headers, grant.needles)
        grant.bytes_in += len(cleaned)
        entry["bytes_in"] = len(cleaned)
        if redacted or stripped:
            # The upstream sent the credential back: it never reaches the MCP server.
            entry["credential_echoed"] = {"headers_stripped": stripped, "body_redacted": redacted}
            log.warning("egress %s %s: the upstream echoed the injected credential; removed "
                        "(%d headers, %d in the body)", req.method, target.authority, stripped,
                        redacted)
        out_headers.append(eg.UPSTREAM_MARK)
        return Response(status=status, body=cleaned, content_type=content_type,
                        headers=out_headers)

    async def _egress_refused(self, rec: LeaseRecord, req: Request, entry: dict[str, Any],
                              exc: SidekeyError, *, grant: EgressGrant | None = None,
                              event_type: str = "egress.refused") -> SidekeyError:
        """Audit a refused or failed egress request (``egress.refused``: the daemon said
        no; ``egress.failed``: the upstream did), record it in the call's entries and
        return the error, marked audited, for the caller to raise."""
        entry = {**entry, "error": exc.code}
        if grant is not None:
            grant.record(entry)
        await self.audit.emit(self.event(
            event_type, server=rec.server, tool=rec.tool, user_id=rec.user_id,
            agent_id=rec.agent_id, session_id=rec.session_id, lease_id=rec.lease_id,
            peer=req.peer.identity.audit(), request_id=req.request_id,
            error={"code": exc.code, "message": exc.message, "status": exc.status},
            extra={"egress": entry}))
        exc.details["audited"] = True
        return exc


def _upstream_error(exc: httpx.HTTPError) -> SidekeyError:
    """An httpx failure as the caller sees it: the kind, never the URL (its query may
    hold the credential) or the exception's text (it may quote the request)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or "certificate verification failed"
            return BadGateway(f"upstream TLS certificate not trusted: {reason}",
                              code="egress_tls_failed")
        if isinstance(cause, ssl.SSLError):
            return BadGateway(f"upstream TLS handshake failed ({cause.reason or 'ssl error'})",
                              code="egress_tls_failed")
        cause = cause.__cause__ or cause.__context__
    return BadGateway(f"upstream unavailable ({type(exc).__name__})",
                      code="egress_upstream_unavailable")
