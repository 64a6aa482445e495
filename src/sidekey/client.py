"""Python client for MCP servers: call the sidekey daemon over its Unix socket.

Every governed tool call is authorize -> redeem -> run -> release. ``tool_call`` does
all of it: it yields a :class:`Lease` whose ``secrets`` live only for the body of the
``with`` block, and on exit releases the lease with the outcome (``success``,
``error`` with the exception's class name, or ``cancelled``) and the measured duration.

Usage in an MCP server on asyncio (the same code runs under trio)::

    import httpx
    from sidekey.client import AccessDenied, AsyncClient

    sidekey = AsyncClient()  # $SIDEKEY_SOCKET or /run/sidekey/sidekey.sock

    async def list_articles(user_token: str, agent_id: str, query: str) -> str:
        args = {"query": query}
        async with sidekey.tool_call(
            server="content-api", tool="list_articles",
            user_token=user_token, agent_id=agent_id, arguments=args,
        ) as lease:
            async with httpx.AsyncClient() as http:
                r = await http.get("https://cms.example/api/articles", params=args,
                                   headers={"Authorization": f"Bearer {lease.secrets['cms_token']}"})
            lease.result_size_bytes = len(r.content)
            return r.text

The sync :class:`Client` has the same methods for threaded servers. Errors are
:class:`SidekeyClientError` subclasses with the daemon's stable ``code``,
the HTTP ``status`` and the ``request_id`` to quote in a support ticket. Secret values
and the user's token never appear in exception messages, reprs or logs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import pwd
import select
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import h11
import msgspec

from . import __version__, tracecontext

log = logging.getLogger(__name__)

SOCKET_ENV = "SIDEKEY_SOCKET"
# The uid (or user name) the daemon runs as; see resolve_daemon_uids.
DAEMON_UID_ENV = "SIDEKEY_DAEMON_UID"
DEFAULT_SOCKET_PATH = "/run/sidekey/sidekey.sock"
DEFAULT_TIMEOUT_S = 10.0
# Releasing after a failed or cancelled body is best effort: shielded from the
# caller's cancellation, but never allowed to hold the caller up for long.
RELEASE_AFTER_FAILURE_TIMEOUT_S = 5.0
# The daemon's answers are small; anything bigger is a broken or hostile peer.
MAX_RESPONSE_BYTES = 1024 * 1024
MAX_ERROR_NAME_LEN = 512  # ReleaseRequest.error max_length
MAX_DURATION_MS = 86_400_000  # ReleaseRequest.duration_ms upper bound
# Egress (Lease.transport): an upstream answer passed back may be this big at most (the
# daemon's rule caps it lower: max_response_bytes, at most 64 MiB), and a request waits
# this long by default (the daemon bounds the upstream by the rule's timeout_s <= 60 s).
EGRESS_MAX_RESPONSE_BYTES = 64 * 1024 * 1024 + 64 * 1024
EGRESS_TIMEOUT_S = 65.0

ReleaseStatus = Literal["success", "error", "cancelled"]
_RELEASE_STATUSES = frozenset({"success", "error", "cancelled"})


# --------------------------------------------------------------------------- errors


class SidekeyClientError(Exception):
    """A call to sidekey failed. ``code`` is the daemon's stable wire code (or a local one).

    ``status`` is the HTTP status (``None`` when no HTTP response was received),
    ``request_id`` the daemon's id for the request and ``details`` its structured hints.
    """

    code: str = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.status = status
        self.request_id = request_id
        self.details: dict[str, Any] = dict(details or {})

    def __str__(self) -> str:
        where = f"HTTP {self.status}, " if self.status is not None else ""
        rid = f", request_id={self.request_id}" if self.request_id else ""
        return f"{self.message} ({where}code={self.code}{rid})"


class BadRequestError(SidekeyClientError):
    code = "bad_request"


class TokenRejected(SidekeyClientError):
    """401: a token was refused: the user's OAuth2 bearer token (missing, expired,
    forged, wrong issuer...) or the resolution token (malformed, expired, forged)."""

    code = "token_invalid"


class AccessDenied(SidekeyClientError):
    """403: policy or peer attestation denied the call; ``details`` names the rules."""

    code = "denied"


class NotFoundError(SidekeyClientError):
    code = "not_found"


class ConflictError(SidekeyClientError):
    """409: replay or illegal state transition (token used, lease already released)."""

    code = "conflict"


class RequestTooLarge(SidekeyClientError):
    code = "body_too_large"


class RateLimited(SidekeyClientError):
    """429: a quota is exhausted. ``retry_after_s`` says when to retry, if known."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class ServiceUnavailable(SidekeyClientError):
    """503: an audit sink, the state store or a secret backend cannot serve the call."""

    code = "unavailable"


class BadGatewayError(SidekeyClientError):
    """502: a server the daemon called for this request (an OAuth token endpoint, an
    upstream) answered something it cannot use; the operator's to fix, not the caller's."""

    code = "bad_gateway"


class ConnectionFailed(SidekeyClientError):
    """The daemon could not be reached (socket missing, refused, connection reset)."""

    code = "connection_failed"


class RequestTimeout(SidekeyClientError):
    """The daemon did not answer within the client's timeout."""

    code = "timeout"


class ProtocolError(SidekeyClientError):
    """The daemon's answer is not the documented JSON (or is over the size cap)."""

    code = "protocol_error"


class DaemonIdentityError(SidekeyClientError):
    """The process serving the socket does not run as the expected uid (SO_PEERCRED):
    it may be an impostor that replaced the socket. Nothing was sent to it."""

    code = "daemon_identity"


class ApprovalPending(SidekeyClientError):
    """202: the call is held for human approval; ``approval_id`` identifies it."""

    code = "approval_pending"

    def __init__(
        self, message: str, *, approval_id: str, expires_at: str | None = None, **kw: Any
    ) -> None:
        super().__init__(message, **kw)
        self.approval_id = approval_id
        self.expires_at = expires_at


_STATUS_ERRORS: dict[int, type[SidekeyClientError]] = {
    400: BadRequestError,
    401: TokenRejected,
    403: AccessDenied,
    404: NotFoundError,
    409: ConflictError,
    413: RequestTooLarge,
    429: RateLimited,
    502: BadGatewayError,
    503: ServiceUnavailable,
}


# --------------------------------------------------------------------------- results


class _SecretMap(Mapping[str, str]):
    """Read-only alias -> value mapping whose repr shows the aliases only."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, str]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: '***'" for k in self._data) + "}"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("sidekey secrets cannot be pickled")


class Lease:
    """The secrets for one tool call. ``repr``/``str`` show secret names, never values.

    Set ``result_size_bytes`` in the body of ``tool_call`` to report the result size on
    release. ``withhold_result`` is set after release when the daemon says the result
    must not be returned to the agent.
    """

    __slots__ = (
        "_client",
        "egress",
        "expires_at",
        "lease_id",
        "request_id",
        "result_size_bytes",
        "secrets",
        "server",
        "tool",
        "withhold_result",
    )

    def __init__(
        self,
        *,
        lease_id: str,
        expires_at: str,
        server: str,
        tool: str,
        secrets: Mapping[str, str],
        request_id: str | None = None,
        egress: tuple[str, ...] = (),
    ) -> None:
        self.lease_id = lease_id
        self.expires_at = expires_at
        self.server = server
        self.tool = tool
        self.secrets: Mapping[str, str] = _SecretMap(secrets)
        self.request_id = request_id
        self.result_size_bytes: int | None = None
        self.withhold_result = False
        # Secrets the daemon injects into upstream requests instead of handing them out
        # (sidekey.egress): send those requests through transport() / http_client().
        self.egress = egress
        self._client: Client | AsyncClient | None = None  # set by the client that redeemed it

    def transport(self) -> Any:
        """An httpx transport that sends each request through the daemon's egress for
        this lease (``https://`` URLs only): an ``httpx.AsyncBaseTransport`` for a lease
        of an :class:`AsyncClient` (asyncio or trio), an ``httpx.BaseTransport`` for one
        of a :class:`Client`. The daemon checks the request against the tool's egress
        rules, injects the credential and answers the upstream's response; a refusal
        raises the :class:`SidekeyClientError` for its code (``egress_not_allowed``,
        ``lease_released``, ``egress_upstream_timeout``...). Needs httpx (``pip install
        httpx``, or the ``mcp`` extra), imported only here."""
        return _egress_transport().transport(self._bound_client(), self.lease_id)

    def http_client(self, **kw: Any) -> Any:
        """``httpx.AsyncClient`` (or ``httpx.Client`` for a sync :class:`Client`'s
        lease) over :meth:`transport`; ``kw`` go to its constructor (``base_url``,
        ``headers``, ``timeout``...). Use it only within the tool call: after release
        the daemon refuses the lease's egress."""
        return _egress_transport().http_client(self._bound_client(), self.lease_id, kw)

    def _bound_client(self) -> Client | AsyncClient:
        if self._client is None:
            raise RuntimeError("this lease was not redeemed by a sidekey client: no egress")
        return self._client

    def __repr__(self) -> str:
        return (
            f"Lease(lease_id={self.lease_id!r}, server={self.server!r}, tool={self.tool!r}, "
            f"expires_at={self.expires_at!r}, secrets={sorted(self.secrets)!r}, "
            f"egress={sorted(self.egress)!r}, withhold_result={self.withhold_result!r})"
        )

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("sidekey leases cannot be pickled")


def _egress_transport() -> Any:
    """sidekey.egress_transport, which needs httpx (not a dependency of the client)."""
    try:
        from . import egress_transport
    except ImportError as exc:
        if exc.name == "httpx":
            raise ImportError("Lease.transport() and Lease.http_client() need httpx: "
                              "pip install httpx", name="httpx") from exc
        raise
    return egress_transport


@dataclass(frozen=True, slots=True)
class AuthorizeResult:
    """The daemon's decision. ``resolution_token`` is set when ``decision == "allow"``."""

    decision: str
    request_id: str | None
    resolution_token: str | None = field(default=None, repr=False)
    expires_at: str | None = None
    secrets: tuple[str, ...] = ()
    policy: dict[str, Any] = field(default_factory=dict)
    user_id: str | None = None
    approval_id: str | None = None


@dataclass(frozen=True, slots=True)
class Introspection:
    """The daemon's verdict on a user's bearer token (``POST /v1/introspect``).

    ``active`` false: the token did not verify; ``code`` says which check failed
    (``token_expired``, ``audience_mismatch``, ``token_bad_signature``...) and
    ``message`` how. ``active`` true: the verified token's subject (``sub``), issuer
    (``iss``), audiences (``aud``; ``audience`` is the server's configured one),
    ``scopes``, ``client_id`` (its ``client_id`` claim, else ``azp``), expiry (``exp``
    in epoch seconds, ``expires_at`` ISO-8601) and its other short string ``claims``.
    Never holds the token itself.
    """

    active: bool
    server: str
    request_id: str | None = None
    code: str | None = None
    message: str | None = None
    sub: str | None = None
    iss: str | None = None
    aud: tuple[str, ...] = ()
    audience: str | None = None
    scopes: frozenset[str] = frozenset()
    client_id: str | None = None
    exp: int | None = None
    expires_at: str | None = None
    claims: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """The daemon's answer to ``POST /v1/sessions/end``: ``ended`` is true when the
    session was counted against ``concurrent_sessions`` and is not any more; false when
    it was unknown, already ended or had gone idle (ending is idempotent). ``user_id``
    is the user whose session it was (decided as for a call)."""

    ended: bool
    session_id: str
    user_id: str
    server: str
    request_id: str | None = None


# --------------------------------------------------------------------------- wire (pure)


class _Body(msgspec.Struct, kw_only=True):
    """Response shapes. Unknown fields are tolerated: the daemon may add fields."""


class _ErrorBody(_Body, kw_only=True):
    code: str
    message: str
    request_id: str | None = None
    details: dict[str, Any] | None = None


class _ErrorEnvelope(_Body, kw_only=True):
    error: _ErrorBody


class _LeaseBody(_Body, kw_only=True):
    lease_id: str
    expires_at: str
    server: str
    tool: str
    secrets: dict[str, str]
    request_id: str | None = None
    egress: list[str] = msgspec.field(default_factory=list)


class _AuthorizeBody(_Body, kw_only=True):
    decision: str
    request_id: str | None = None
    resolution_token: str | None = None
    expires_at: str | None = None
    secrets: list[str] = msgspec.field(default_factory=list)
    policy: dict[str, Any] = msgspec.field(default_factory=dict)
    user_id: str | None = None
    approval_id: str | None = None
    lease: _LeaseBody | None = None  # an allow asked with "redeem": true


class _ReleaseBody(_Body, kw_only=True):
    lease_id: str
    state: str
    request_id: str | None = None
    withhold_result: bool = False


class _IntrospectBody(_Body, kw_only=True):
    active: bool
    server: str
    request_id: str | None = None
    code: str | None = None
    message: str | None = None
    sub: str | None = None
    iss: str | None = None
    aud: list[str] = msgspec.field(default_factory=list)
    audience: str | None = None
    scopes: list[str] = msgspec.field(default_factory=list)
    client_id: str | None = None
    exp: int | None = None
    expires_at: str | None = None
    claims: dict[str, str] = msgspec.field(default_factory=dict)


class _SessionEndBody(_Body, kw_only=True):
    ended: bool
    session_id: str
    user_id: str
    server: str
    request_id: str | None = None


class _TokenBody(_Body, kw_only=True):
    resolution_token: str
    jti: str
    expires_at: str
    request_id: str | None = None


_encoder = msgspec.json.Encoder()


def resolve_socket_path(socket_path: str | os.PathLike[str] | None = None) -> str:
    """The socket to use: the argument, else ``$SIDEKEY_SOCKET``, else the default."""
    if socket_path is not None:
        return os.fspath(socket_path)
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET_PATH


def resolve_daemon_uids(expected_uid: int | str | None = None) -> frozenset[int]:
    """The uids the daemon may run as: ``expected_uid`` (a uid or a user name), else
    ``$SIDEKEY_DAEMON_UID``, else this process's own uid. Root is always accepted: it
    can do anything anyway, and under systemd socket activation the listening socket
    (whose credentials SO_PEERCRED reports) was created by systemd as root.

    The default (root or yourself) fits the quickstart (one user runs both) and the
    shipped systemd units (socket activation); a daemon that binds its own socket under
    a dedicated user needs ``SIDEKEY_DAEMON_UID=<that user>``. Raises ValueError for an
    unknown user name or a negative uid.
    """
    value: int | str | None = expected_uid
    if value is None:
        value = os.environ.get(DAEMON_UID_ENV) or None
    if value is None:
        return frozenset({0, os.geteuid()})
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            value = int(text)
        else:
            try:
                value = pwd.getpwnam(text).pw_uid
            except KeyError:
                raise ValueError(f"daemon uid: no user named {text[:64]!r}") from None
    if isinstance(value, bool) or value < 0:
        raise ValueError("daemon uid must be a user name or a uid >= 0")
    return frozenset({0, int(value)})


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _check_daemon_peer(sock: Any, allowed: frozenset[int] | None, path: str) -> None:
    """Raise DaemonIdentityError unless the peer of connected ``sock`` runs as an allowed uid.

    SO_PEERCRED gives the credentials of the process that called listen() on the other
    end, which only the kernel can vouch for: checked before the first byte is sent.
    """
    if allowed is None:
        return
    try:
        _pid, uid, _gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except (OSError, AttributeError, struct.error) as exc:
        raise DaemonIdentityError(
            f"{path}: cannot read the daemon's credentials (SO_PEERCRED): {exc}"
        ) from None
    if uid not in allowed:
        raise DaemonIdentityError(
            f"{path}: the process serving this socket runs as uid {uid}, not as "
            f"{' or '.join(str(u) for u in sorted(allowed))}; refusing to send anything to it "
            f"(if the daemon runs under its own user, set {DAEMON_UID_ENV} to it)"
        )


def _drop_none(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _authorize_body(
    server: str,
    tool: str,
    user_token: str | None,
    agent_id: str | None,
    session_id: str | None,
    arguments: Mapping[str, Any] | None,
    server_version: str | None,
    approval_id: str | None = None,
) -> dict[str, Any]:
    return _drop_none(
        server=server,
        tool=tool,
        user_token=user_token,
        agent_id=agent_id,
        session_id=session_id,
        arguments=dict(arguments or {}),
        server_version=server_version,
        approval_id=approval_id,
    )


def _authorize_redeem_body(server: str, tool: str, kw: Mapping[str, Any],
                           approval_id: str | None) -> dict[str, Any]:
    """An authorize that also redeems (``redeem: true``): one round trip for both."""
    body = _authorize_body(server, tool, kw.get("user_token"), kw.get("agent_id"),
                           kw.get("session_id"), kw.get("arguments"), kw.get("server_version"),
                           approval_id)
    body["redeem"] = True
    return body


def _approval_path(approval_id: str, verb: str) -> str:
    return "/v1/approvals/" + urllib.parse.quote(approval_id, safe="") + "/" + verb


# The longest single long-poll request; longer waits are several of them.
MAX_WAIT_CHUNK_S = 60.0


def _approval_outcome(approval: Mapping[str, Any], pending: ApprovalPending) -> str:
    """After a wait: the approval id to present if approved, else raise why not."""
    state = approval.get("state")
    aid = pending.approval_id
    if state == "approved":
        return aid
    if state == "pending":
        raise pending
    if state == "denied":
        by = approval.get("decided_by") or "an approver"
        raise AccessDenied(
            f"approval {aid} was denied by {by}: {approval.get('reason') or 'no reason given'}",
            code="approval_denied", status=403, request_id=pending.request_id,
        )
    raise ConflictError(f"approval {aid} is {state}; request the call again",
                        code=f"approval_{state}", status=409, request_id=pending.request_id)


def _registry_path(stale_days: int | None, owner: str | None, as_of: str | None) -> str:
    query = urllib.parse.urlencode(_drop_none(stale=stale_days, owner=owner, as_of=as_of))
    return "/v1/registry" + (f"?{query}" if query else "")


def _release_body(
    lease_id: str,
    status: str,
    duration_ms: int,
    result_size_bytes: int | None,
    error: str | None,
) -> dict[str, Any]:
    if status not in _RELEASE_STATUSES:
        raise ValueError(f"release status must be one of {sorted(_RELEASE_STATUSES)}")
    return _drop_none(
        lease_id=lease_id,
        status=status,
        duration_ms=min(max(int(duration_ms), 0), MAX_DURATION_MS),
        result_size_bytes=result_size_bytes,
        error=error[:MAX_ERROR_NAME_LEN] if error is not None else None,
    )


def _error_from_response(
    status: int, data: Any, headers: Mapping[str, str], what: str
) -> SidekeyClientError:
    """Map an error response to its typed exception (never echoing the raw body)."""
    header_rid = headers.get("x-request-id")
    try:
        env = msgspec.convert(data, _ErrorEnvelope)
    except msgspec.ValidationError:
        return ProtocolError(
            f"{what}: HTTP {status} without a sidekey error body",
            status=status,
            request_id=header_rid,
        )
    err = env.error
    cls = _STATUS_ERRORS.get(status, SidekeyClientError)
    kw: dict[str, Any] = dict(
        code=err.code,
        status=status,
        request_id=err.request_id or header_rid,
        details=err.details,
    )
    if cls is RateLimited:
        return RateLimited(err.message, retry_after_s=_retry_after(err.details, headers), **kw)
    return cls(err.message, **kw)


def _retry_after(details: Mapping[str, Any] | None, headers: Mapping[str, str]) -> float | None:
    candidates: list[Any] = []
    if details:
        candidates += [details.get("retry_after_s"), details.get("retry_after")]
    candidates.append(headers.get("retry-after"))
    for value in candidates:
        if isinstance(value, bool) or value is None:
            continue
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            continue
        if seconds >= 0 and seconds == seconds and seconds != float("inf"):
            return seconds
    return None


def _interpret(
    status: int, body: bytes, headers: Mapping[str, str], what: str, ok: frozenset[int]
) -> dict[str, Any]:
    """Decode a response: the JSON object on a success status, else raise its error."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        data = None
    if status in ok:
        if not isinstance(data, dict):
            raise ProtocolError(
                f"{what}: response is not a JSON object",
                status=status,
                request_id=headers.get("x-request-id"),
            )
        return data
    raise _error_from_response(status, data, headers, what)


def _convert(data: dict[str, Any], kind: type[Any], status: int, what: str) -> Any:
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        # msgspec names the path and expected type, never the offending value.
        raise ProtocolError(
            f"{what}: unexpected response shape: {exc}",
            status=status,
            request_id=data.get("request_id") if isinstance(data.get("request_id"), str) else None,
        ) from None


def _authorize_result(status: int, data: dict[str, Any], raise_on_pending: bool) -> AuthorizeResult:
    what = "POST /v1/authorize"
    body: _AuthorizeBody = _convert(data, _AuthorizeBody, status, what)
    result = AuthorizeResult(
        decision=body.decision,
        request_id=body.request_id,
        resolution_token=body.resolution_token,
        expires_at=body.expires_at,
        secrets=tuple(body.secrets),
        policy=body.policy,
        user_id=body.user_id,
        approval_id=body.approval_id,
    )
    if status == 202 and body.decision == "pending_approval":
        if not body.approval_id:
            raise ProtocolError(f"{what}: pending approval without approval_id", status=status,
                                request_id=body.request_id)
        if raise_on_pending:
            raise ApprovalPending(
                f"call held for human approval (approval_id={body.approval_id})",
                approval_id=body.approval_id,
                expires_at=body.expires_at,
                status=status,
                request_id=body.request_id,
            )
        return result
    if status == 200 and body.decision == "allow" and (body.resolution_token or body.lease):
        return result
    # Fail closed: anything but a documented allow or hold is not a permission.
    raise ProtocolError(
        f"{what}: undocumented decision for HTTP {status}", status=status,
        request_id=body.request_id,
    )


def _introspection(status: int, data: dict[str, Any], server: str) -> Introspection:
    what = "POST /v1/introspect"
    body: _IntrospectBody = _convert(data, _IntrospectBody, status, what)
    if body.server != server:
        raise ProtocolError(f"{what}: answer for another server", status=status,
                            request_id=body.request_id)
    if not body.active:
        return Introspection(active=False, server=server, request_id=body.request_id,
                             code=body.code or "token_invalid", message=body.message)
    # Fail closed: an "active" answer without who, whose and until when is no verdict.
    if not body.sub or not body.iss or body.exp is None:
        raise ProtocolError(f"{what}: active answer without sub, iss or exp", status=status,
                            request_id=body.request_id)
    return Introspection(
        active=True, server=server, request_id=body.request_id, sub=body.sub, iss=body.iss,
        aud=tuple(body.aud), audience=body.audience, scopes=frozenset(body.scopes),
        client_id=body.client_id, exp=body.exp, expires_at=body.expires_at,
        claims=dict(body.claims),
    )


def _session_end_body(session_id: str, user_token: str | None, server: str | None) -> dict[str, Any]:
    return _drop_none(session_id=session_id, user_token=user_token, server=server)


def _session_end(status: int, data: dict[str, Any], session_id: str) -> SessionEnd:
    what = "POST /v1/sessions/end"
    body: _SessionEndBody = _convert(data, _SessionEndBody, status, what)
    if body.session_id != session_id:
        raise ProtocolError(f"{what}: answer for another session", status=status,
                            request_id=body.request_id)
    return SessionEnd(ended=body.ended, session_id=body.session_id, user_id=body.user_id,
                      server=body.server, request_id=body.request_id)


def _redeemed_lease(status: int, data: dict[str, Any]) -> Lease:
    """The lease of an authorize asked with ``redeem: true`` (raises as
    :func:`_authorize_result` for a hold or a refusal; an allow without a lease fails
    closed)."""
    _authorize_result(status, data, raise_on_pending=True)
    lease = data.get("lease")
    if not isinstance(lease, dict):
        raise ProtocolError("POST /v1/authorize: allow without the lease asked for",
                            status=status, request_id=data.get("request_id"))
    return _lease(status, lease)


def _lease(status: int, data: dict[str, Any]) -> Lease:
    body: _LeaseBody = _convert(data, _LeaseBody, status, "POST /v1/redeem")
    return Lease(
        lease_id=body.lease_id,
        expires_at=body.expires_at,
        server=body.server,
        tool=body.tool,
        secrets=body.secrets,
        request_id=body.request_id,
        egress=tuple(body.egress),
    )


def _release_outcome(
    exc: BaseException, cancelled: type[BaseException] | None
) -> tuple[ReleaseStatus, str | None]:
    """How a body that raised ``exc`` is reported: (status, error class name)."""
    if isinstance(exc, Exception):
        return "error", type(exc).__name__
    if cancelled is not None:
        if isinstance(exc, cancelled):
            return "cancelled", None
        if isinstance(exc, BaseExceptionGroup) and exc.subgroup(
            lambda e: not isinstance(e, cancelled | BaseExceptionGroup)
        ) is None:
            return "cancelled", None
    # KeyboardInterrupt, SystemExit: the call did not finish.
    return "cancelled", type(exc).__name__


def _elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def _check_length(headers: Mapping[str, str], status: int, what: str,
                  cap: int | None = None) -> None:
    cap = MAX_RESPONSE_BYTES if cap is None else cap
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise ProtocolError(f"{what}: response over {cap} bytes", status=status)


def _append_capped(buf: bytearray, chunk: bytes, status: int, what: str,
                   cap: int | None = None) -> None:
    cap = MAX_RESPONSE_BYTES if cap is None else cap
    buf += chunk
    if len(buf) > cap:
        raise ProtocolError(f"{what}: response over {cap} bytes", status=status)


def _timeout(timeout: float) -> float:
    if not timeout > 0:
        raise ValueError("timeout must be a positive number of seconds")
    return float(timeout)


_OK = frozenset({200})
_OK_OR_HELD = frozenset({200, 202})


# --------------------------------------------------------------------------- HTTP/1.1 over the socket
#
# A minimal HTTP/1.1 client: h11 frames and parses (no hand parsing), the socket is a
# plain AF_UNIX stream. Per client object a small pool: idle kept-alive connections are
# reused (the common case is one), concurrent requests open more up to MAX_CONNECTIONS.
# Every NEW connection is checked with SO_PEERCRED before its first byte is sent.

# An idle connection is reused only this long. The daemon closes idle connections after
# listen.idle_timeout_s (120 s by default); staying well under it keeps clear of the race
# in which the daemon closes a connection while a request is on its way (such a request
# is not retried: it may have reached the daemon).
KEEPALIVE_EXPIRY_S = 5.0
# Connections one client object may have open at once (requests beyond wait for one,
# within their own timeout), and how many idle ones it keeps.
MAX_CONNECTIONS = 32
MAX_IDLE_CONNECTIONS = 8
_RECV_BYTES = 65536
# The response head (status line and headers) h11 will buffer; the daemon's are < 1 KiB.
_MAX_HEAD_BYTES = 16 * 1024
_HEADERS = (
    (b"host", b"sidekey"),
    (b"user-agent", f"sidekey-client/{__version__}".encode()),
    (b"accept", b"application/json"),
)
_BODY_HEADERS = ((b"content-type", b"application/json"),)


def _header_builder() -> Callable[[int | None], Any]:
    """Request headers for h11, without re-validating the constant ones per request.

    h11 validates every header of every event it is given (regexes per name and value:
    about a tenth of the client's CPU per call). Ours are constants, so h11 validates
    them once, here, and each request gets them in h11's own normalized form plus a
    content-length built from an int. If this h11's Headers cannot be built that way
    (its internals changed), the plain (validated per request) list is used.
    """
    def plain(length: int | None) -> Any:
        headers = list(_HEADERS)
        if length is not None:
            headers += [*_BODY_HEADERS, (b"content-length", b"%d" % length)]
        return headers

    try:
        checked = h11.Request(method="POST", target="/", headers=plain(0)).headers
        cls: Any = type(checked)
        get_items = [(name, name, value) for name, value in _HEADERS]
        post_items = get_items + [(name, name, value) for name, value in _BODY_HEADERS]
        length_name = b"content-length"

        def fast(length: int | None) -> Any:
            if length is None:
                return cls(list(get_items))
            return cls([*post_items, (length_name, length_name, b"%d" % length)])

        if list(fast(0)) != list(checked) or list(fast(None)) != list(
                h11.Request(method="GET", target="/", headers=plain(None)).headers):
            return plain
        return fast
    except Exception:  # pragma: no cover - a future h11
        return plain


_request_headers = _header_builder()

# Per-request headers beyond the constant ones (a traceparent).
_ExtraHeaders = tuple[tuple[bytes, bytes], ...]


def _trace_headers(traceparent: str | None) -> _ExtraHeaders:
    """The ``traceparent`` header to send: the caller's W3C Trace Context value, passed
    on so the daemon can put its trace-id in the call's audit events. A malformed one is
    dropped (the spec has a receiver ignore it; the call goes on without it)."""
    if traceparent is None:
        return ()
    if not isinstance(traceparent, str):
        raise TypeError("traceparent must be a str")
    if not tracecontext.valid(traceparent):
        log.debug("not sending a malformed traceparent header")
        return ()
    return ((tracecontext.HEADER.encode(), traceparent.encode("ascii")),)


@dataclass(frozen=True, slots=True)
class TransportRequest:
    """What a test ``transport`` gets: the request as the client would send it."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class TransportResponse:
    """What a test ``transport`` answers (``headers`` with lower-case names)."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


SyncTransport = Callable[[TransportRequest], TransportResponse]
AsyncTransport = Callable[[TransportRequest], Awaitable[TransportResponse]]


def _transport_request(method: str, target: str, body: bytes | None,
                       extra: _ExtraHeaders = ()) -> TransportRequest:
    headers = {k.decode(): v.decode() for k, v in _HEADERS}
    if body is not None:
        headers.update({k.decode(): v.decode() for k, v in _BODY_HEADERS})
        headers["content-length"] = str(len(body))
    headers.update({k.decode(): v.decode() for k, v in extra})
    return TransportRequest(method, target, headers, body or b"")


def _transport_response(resp: TransportResponse, what: str) -> tuple[int, Mapping[str, str], bytes]:
    """A test transport's answer, through the same size checks as the socket's."""
    headers = {k.lower(): v for k, v in resp.headers.items()}
    _check_length(headers, resp.status, what)
    buf = bytearray()
    _append_capped(buf, resp.body, resp.status, what)
    return resp.status, headers, bytes(buf)


# Writing failed with one of these: the daemon closed (or reset) the connection. It may
# have answered first (an early 413), so the answer is read before anything else.
_SEND_CLOSED = (BrokenPipeError, ConnectionResetError)


class _Exchange:
    """One HTTP/1.1 connection's h11 state plus the response being read (pure: no I/O)."""

    __slots__ = ("body", "h", "head", "headers", "status_code", "what")
    cap: int | None = None  # the largest answer accepted (None: MAX_RESPONSE_BYTES)

    def __init__(self, h: h11.Connection, what: str) -> None:
        self.h = h
        self.what = what
        self.status_code = 0
        self.headers: dict[str, str] = {}
        self.head: Any = ()  # the response's headers as h11 gave them (repeats kept)
        self.body = bytearray()

    def request_bytes(self, method: str, target: str, body: bytes | None,
                      extra: _ExtraHeaders = ()) -> bytes:
        headers = _request_headers(None if body is None else len(body))
        if extra:
            headers = [*headers, *extra]  # validated by h11, like any header it is given
        h = self.h
        out = h.send(h11.Request(method=method, target=target, headers=headers)) or b""
        if body:
            out += h.send(h11.Data(data=body)) or b""
        return out + (h.send(h11.EndOfMessage()) or b"")

    def feed(self, data: bytes) -> bool:
        """Give the parser ``data`` (``b""`` at end of stream); True when the response is
        complete. Raises ProtocolError for a malformed, truncated or oversized answer."""
        h = self.h
        try:
            h.receive_data(data)
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    return False
                if isinstance(event, h11.Response):
                    self.status_code = event.status_code
                    self.head = event.headers
                    self.headers = {k.decode("latin-1"): v.decode("latin-1")
                                    for k, v in event.headers}
                    _check_length(self.headers, self.status_code, self.what, self.cap)
                elif isinstance(event, h11.Data):
                    _append_capped(self.body, event.data, self.status_code, self.what, self.cap)
                elif isinstance(event, h11.EndOfMessage):
                    return True
                elif isinstance(event, h11.ConnectionClosed):
                    raise ProtocolError(f"{self.what}: sidekey closed the connection "
                                        f"without an answer")
                # InformationalResponse (1xx): wait for the final response.
        except h11.ProtocolError as exc:
            raise ProtocolError(
                f"{self.what}: broken HTTP exchange with sidekey ({type(exc).__name__}: {exc})",
                status=self.status_code or None) from None

    def reusable(self) -> bool:
        """After a complete response: can the connection carry the next request?"""
        h = self.h
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
            return True
        return False


class _EgressExchange(_Exchange):
    """An egress request (Lease.transport): the MCP server's own headers, not the
    client's constant ones, and an upstream-sized answer."""

    __slots__ = ("send_headers",)
    cap = EGRESS_MAX_RESPONSE_BYTES

    def __init__(self, h: h11.Connection, what: str,
                 send_headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(h, what)
        self.send_headers = send_headers

    def request_bytes(self, method: str, target: str, body: bytes | None,
                      extra: _ExtraHeaders = ()) -> bytes:
        headers = [(b"host", b"sidekey"), *self.send_headers,
                   (b"content-length", b"%d" % len(body or b""))]
        h = self.h
        out = h.send(h11.Request(method=method, target=target, headers=headers)) or b""
        if body:
            out += h.send(h11.Data(data=body)) or b""
        return out + (h.send(h11.EndOfMessage()) or b"")


ExchangeFactory = Callable[[h11.Connection, str], _Exchange]


def _connect_failed(exc: BaseException, what: str) -> ConnectionFailed:
    return ConnectionFailed(f"{what}: cannot reach sidekey ({type(exc).__name__}: {exc})")


def _io_failed(exc: OSError, what: str) -> SidekeyClientError:
    if isinstance(exc, TimeoutError):
        return RequestTimeout(f"{what}: sidekey did not answer in time")
    return ConnectionFailed(f"{what}: connection to sidekey failed ({type(exc).__name__}: {exc})")


def _peer_closed(sock: socket.socket) -> bool:
    """Has the daemon closed this idle connection (or sent something unasked)? One
    non-blocking peek: EOF, an error or unexpected bytes all mean "do not reuse"."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False  # nothing to read: still open, nothing unasked
    except OSError:
        return True
    return True  # b"" (end of stream) or bytes nobody asked for


class _Conn:
    """A connected, peer-checked socket and its h11 state. ``pid``: the process that
    opened it; after a fork the child never uses (or shuts down) its parent's."""

    __slots__ = ("h", "idle_since", "pid", "sock", "tsock")

    def __init__(self, sock: socket.socket, tsock: Any = None) -> None:
        self.sock = sock
        self.tsock = tsock  # the trio socket wrapping ``sock``, under trio
        self.h = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD_BYTES)
        self.pid = os.getpid()
        self.idle_since = 0.0

    def close(self) -> None:
        # close(), never shutdown(): in a forked child this drops only the child's copy of
        # the descriptor, leaving the parent's connection intact.
        if self.tsock is not None:
            try:
                self.tsock.close()  # tells trio first, in case a task waits on it
                return
            except (RuntimeError, OSError):
                pass  # outside the trio run that used it: nobody can be waiting
        with contextlib.suppress(OSError):
            self.sock.close()


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def _wait(sock: socket.socket, deadline: float, events: int) -> None:
    """Block until ``sock`` is ready (or hung up) or raise TimeoutError at ``deadline``.

    The sync client's sockets stay non-blocking: one poll() per wait instead of
    switching the socket's timeout (a syscall each time) before every operation.
    """
    poller = select.poll()
    poller.register(sock, events)
    if not poller.poll(max(1, math.ceil(_remaining(deadline) * 1000))):
        raise TimeoutError("timed out")


class _SyncPool:
    """The sync client's connections (thread-safe). Created per process: see Client._pool."""

    def __init__(self, path: str, allowed: frozenset[int] | None) -> None:
        self.path = path
        self.allowed = allowed
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.idle: list[_Conn] = []
        self.closed = False

    def _connect(self, deadline: float, what: str) -> _Conn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(self.path)
            _check_daemon_peer(sock, self.allowed, self.path)
            sock.setblocking(False)  # from now on, waits are _wait's
        except OSError as exc:
            sock.close()
            raise _connect_failed(exc, what) from None
        except BaseException:
            sock.close()
            raise
        return _Conn(sock)

    def _checkout(self) -> _Conn | None:
        """An idle connection that is fresh and still open, if there is one."""
        now = time.monotonic()
        while True:
            with self.lock:
                if not self.idle:
                    return None
                conn = self.idle.pop()
            if now - conn.idle_since <= KEEPALIVE_EXPIRY_S and not _peer_closed(conn.sock):
                return conn
            conn.close()

    def _checkin(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        with self.lock:
            if not self.closed and len(self.idle) < MAX_IDLE_CONNECTIONS:
                self.idle.append(conn)
                return
        conn.close()

    @staticmethod
    def _send(conn: _Conn, data: bytes, deadline: float) -> None:
        sock = conn.sock
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                _wait(sock, deadline, select.POLLOUT)
                continue
            view = view[sent:]

    @staticmethod
    def _read(conn: _Conn, ex: _Exchange, deadline: float, after_failed_send: bool) -> bool:
        """Read the whole response; True when done. After a failed send, False if the
        daemon said nothing at all (end of stream or reset before the first byte)."""
        sock = conn.sock
        first = True
        while True:
            try:
                _wait(sock, deadline, select.POLLIN)
                data = sock.recv(_RECV_BYTES)
            except ConnectionResetError:
                if after_failed_send and first:
                    return False
                raise
            if after_failed_send and first and not data:
                return False
            first = False
            if ex.feed(data):
                return True

    def request(self, method: str, target: str, body: bytes | None, timeout: float,
                what: str, extra: _ExtraHeaders = (),
                exchange: ExchangeFactory = _Exchange) -> tuple[int, Mapping[str, str], bytes]:
        deadline = time.monotonic() + timeout
        if not self.slots.acquire(timeout=timeout):
            raise RequestTimeout(f"{what}: all {MAX_CONNECTIONS} connections to sidekey stayed "
                                 f"busy for the whole timeout")
        try:
            conn = self._checkout()
            reused = conn is not None
            if conn is None:
                conn = self._connect(deadline, what)
            try:
                ex = exchange(conn.h, what)
                try:
                    self._send(conn, ex.request_bytes(method, target, body, extra), deadline)
                except _SEND_CLOSED:
                    if not self._read(conn, ex, deadline, after_failed_send=True):
                        if not reused:
                            raise
                        # A kept-alive connection the daemon had closed (restart, idle
                        # timeout): no complete request reached it, so it is sent once
                        # more, on a new connection. Never after a complete send.
                        conn.close()
                        conn = self._connect(deadline, what)
                        ex = exchange(conn.h, what)
                        self._send(conn, ex.request_bytes(method, target, body, extra), deadline)
                        self._read(conn, ex, deadline, after_failed_send=False)
                else:
                    self._read(conn, ex, deadline, after_failed_send=False)
            except OSError as exc:
                conn.close()
                raise _io_failed(exc, what) from None
            except BaseException:
                conn.close()
                raise
            if ex.reusable():
                self._checkin(conn)
            else:
                conn.close()
            return ex.status_code, ex.headers, bytes(ex.body)
        finally:
            self.slots.release()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    def abandon(self) -> None:
        """In a forked child: drop the parent's connections without touching its locks."""
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


def _event_loop() -> tuple[str, object]:
    """The running async library and an identity of its loop (asyncio or trio)."""
    try:
        return "asyncio", asyncio.get_running_loop()
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            return "trio", trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
    raise RuntimeError("sidekey AsyncClient needs a running asyncio or trio event loop")


class _AsyncPool:
    """The async client's connections, bound to one process and one event loop."""

    def __init__(self, path: str, allowed: frozenset[int] | None, lib: str,
                 loop: object) -> None:
        self.path = path
        self.allowed = allowed
        self.lib = lib
        self.loop = loop
        self.pid = os.getpid()
        self.idle: list[_Conn] = []
        self.active = 0
        self.waiters: collections.deque[anyio.Event] = collections.deque()
        self.closed = False

    async def _connect(self, what: str) -> _Conn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            tsock: Any = None
            if self.lib == "trio":
                import trio

                tsock = trio.socket.from_stdlib_socket(sock)
                await tsock.connect(self.path)
            else:
                await asyncio.get_running_loop().sock_connect(sock, self.path)
            _check_daemon_peer(sock, self.allowed, self.path)
        except OSError as exc:
            sock.close()
            raise _connect_failed(exc, what) from None
        except BaseException:
            sock.close()
            raise
        return _Conn(sock, tsock)

    async def _send(self, conn: _Conn, data: bytes) -> None:
        if conn.tsock is not None:
            view = memoryview(data)
            while view:
                sent = await conn.tsock.send(view)
                view = view[sent:]
        else:
            await asyncio.get_running_loop().sock_sendall(conn.sock, data)

    async def _read(self, conn: _Conn, ex: _Exchange, after_failed_send: bool) -> bool:
        """As :meth:`_SyncPool._read` (the deadline is the caller's cancel scope)."""
        first = True
        while True:
            try:
                data = await self._recv(conn)
            except ConnectionResetError:
                if after_failed_send and first:
                    return False
                raise
            if after_failed_send and first and not data:
                return False
            first = False
            if ex.feed(data):
                return True

    async def _recv(self, conn: _Conn) -> bytes:
        if conn.tsock is not None:
            data: bytes = await conn.tsock.recv(_RECV_BYTES)
            return data
        return await asyncio.get_running_loop().sock_recv(conn.sock, _RECV_BYTES)

    async def _acquire(self) -> None:
        while self.active >= MAX_CONNECTIONS:
            event = anyio.Event()
            self.waiters.append(event)
            try:
                await event.wait()
            except BaseException:
                if event.is_set():  # woken, but leaving: pass the turn on
                    self._wake()
                else:
                    self.waiters.remove(event)
                raise
        self.active += 1

    def _wake(self) -> None:
        if self.waiters:
            self.waiters.popleft().set()

    def _release(self) -> None:
        self.active -= 1
        self._wake()

    def _checkout(self) -> _Conn | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if now - conn.idle_since <= KEEPALIVE_EXPIRY_S and not _peer_closed(conn.sock):
                return conn
            conn.close()
        return None

    def _checkin(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        if not self.closed and len(self.idle) < MAX_IDLE_CONNECTIONS:
            self.idle.append(conn)
        else:
            conn.close()

    async def request(self, method: str, target: str, body: bytes | None, timeout_s: float,
                      what: str, extra: _ExtraHeaders = (),
                      exchange: ExchangeFactory = _Exchange) -> tuple[int, Mapping[str, str], bytes]:
        phase = "wait"  # for a timeout: waiting for a slot, connecting, or the exchange
        try:
            with anyio.fail_after(timeout_s):
                await self._acquire()
                try:
                    conn = self._checkout()
                    reused = conn is not None
                    if conn is None:
                        phase = "connect"
                        conn = await self._connect(what)
                    phase = "exchange"
                    try:
                        ex = exchange(conn.h, what)
                        try:
                            await self._send(conn, ex.request_bytes(method, target, body, extra))
                        except _SEND_CLOSED:
                            if not await self._read(conn, ex, after_failed_send=True):
                                if not reused:
                                    raise
                                # As in _SyncPool.request: sent once more, on a new
                                # connection, only when no complete request went out.
                                conn.close()
                                phase = "connect"
                                conn = await self._connect(what)
                                phase = "exchange"
                                ex = exchange(conn.h, what)
                                await self._send(conn, ex.request_bytes(method, target, body, extra))
                                await self._read(conn, ex, after_failed_send=False)
                        else:
                            await self._read(conn, ex, after_failed_send=False)
                    except OSError as exc:
                        conn.close()
                        raise _io_failed(exc, what) from None
                    except BaseException:
                        conn.close()
                        raise
                    if ex.reusable():
                        self._checkin(conn)
                    else:
                        conn.close()
                    return ex.status_code, ex.headers, bytes(ex.body)
                finally:
                    self._release()
        except TimeoutError:
            if phase == "connect":
                raise ConnectionFailed(f"{what}: cannot reach sidekey (connect timed out)") from None
            if phase == "wait":
                raise RequestTimeout(f"{what}: all {MAX_CONNECTIONS} connections to sidekey "
                                     f"stayed busy for the whole timeout") from None
            raise RequestTimeout(f"{what}: sidekey did not answer in time") from None

    def close(self) -> None:
        self.closed = True
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


# --------------------------------------------------------------------------- sync client


class Client:
    """Synchronous client. Thread-safe; the connection pool is created on first use.

    The client speaks HTTP/1.1 over ``socket_path`` (see :func:`resolve_socket_path`),
    keeps connections alive between calls (one per concurrently calling thread, up to
    ``MAX_CONNECTIONS``), and talks only to a daemon running as ``expected_uid`` or root
    (see :func:`resolve_daemon_uids`): a new connection to anything else raises
    :class:`DaemonIdentityError` before anything is sent. ``timeout`` bounds each request
    as a whole (waiting for a connection, connecting, sending, the full answer).
    ``transport`` is for tests: a function from :class:`TransportRequest` to
    :class:`TransportResponse` that replaces the socket.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: SyncTransport | None = None,
        expected_uid: int | str | None = None,
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.daemon_uids = resolve_daemon_uids(expected_uid)
        self.timeout = _timeout(timeout)
        self._transport = transport
        self._http: _SyncPool | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False

    def __repr__(self) -> str:
        return f"Client(socket_path={self.socket_path!r})"

    def _pool(self) -> _SyncPool:
        pool = self._http
        if pool is not None and pool.pid == os.getpid() and not self._closed:
            return pool
        if self._pid != os.getpid():
            # Forked: connections (and locks, maybe held by a thread that did not fork)
            # belong to the parent. The child opens its own; it only closes its copies.
            self._pid = os.getpid()
            self._lock = threading.Lock()
            inherited, self._http = self._http, None
            if inherited is not None:
                inherited.abandon()
        with self._lock:
            if self._closed:
                raise RuntimeError("sidekey client is closed")
            if self._http is None:
                self._http = _SyncPool(self.socket_path, self.daemon_uids)
            return self._http

    def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None,
        ok: frozenset[int] = _OK, timeout: float | None = None, extra: _ExtraHeaders = (),
    ) -> tuple[int, dict[str, Any]]:
        what = f"{method} {path}"
        content = _encoder.encode(body) if body is not None else None
        if self._transport is not None:
            if self._closed:
                raise RuntimeError("sidekey client is closed")
            status, headers, raw = _transport_response(
                self._transport(_transport_request(method, path, content, extra)), what)
        else:
            status, headers, raw = self._pool().request(
                method, path, content, timeout or self.timeout, what, extra)
        return status, _interpret(status, raw, headers, what, ok)

    def health(self) -> dict[str, Any]:
        """``GET /v1/health``: liveness and readiness of store, backends and audit."""
        return self._call("GET", "/v1/health")[1]

    def status(self) -> dict[str, Any]:
        """``GET /v1/status`` (operator tier): leases, quotas, backends, registry."""
        return self._call("GET", "/v1/status")[1]

    def registry(self, *, stale_days: int | None = None, owner: str | None = None,
                 as_of: str | None = None) -> dict[str, Any]:
        """``GET /v1/registry`` (security tier): every server the central registry lists
        or the host declares, with owner, version, status, deprecation, last review and
        health; ``stale_days``: only those last reviewed more than that many days before
        ``as_of`` (YYYY-MM-DD, default today), never-reviewed included; ``owner``: only
        that owner's. Returns the body (``servers``, ``as_of``, ...)."""
        return self._call("GET", _registry_path(stale_days, owner, as_of))[1]

    def authorize(
        self,
        server: str,
        tool: str,
        *,
        user_token: str | None = None,
        agent_id: str | None = None,
        session_id: str | None = None,
        arguments: Mapping[str, Any] | None = None,
        server_version: str | None = None,
        raise_on_pending: bool = True,
        approval_id: str | None = None,
        traceparent: str | None = None,
    ) -> AuthorizeResult:
        """Ask for a decision on one tool call.

        Returns an ``allow`` result with a single-use ``resolution_token``. Raises
        :class:`ApprovalPending` when the call is held (or, with
        ``raise_on_pending=False``, returns the ``pending_approval`` result), and
        :class:`AccessDenied`, :class:`RateLimited`, ... when it is refused. After an
        approver approved a held call, present its ``approval_id`` with exactly the same
        call (arguments included) to get the token.

        ``traceparent``: the W3C Trace Context header of the request being served (e.g.
        the MCP request's), sent on so the daemon records its trace-id as ``trace_id`` in
        the call's audit events; a malformed one is not sent.
        """
        body = _authorize_body(server, tool, user_token, agent_id, session_id, arguments,
                               server_version, approval_id)
        status, data = self._call("POST", "/v1/authorize", body, _OK_OR_HELD,
                                  extra=_trace_headers(traceparent))
        return _authorize_result(status, data, raise_on_pending)

    def wait_for_approval(self, approval_id: str, timeout_s: float) -> dict[str, Any]:
        """Long-poll ``GET /v1/approvals/{id}/wait`` until the approval is decided or
        expires, or ``timeout_s`` passes; returns the approval (``state`` says which)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            chunk = max(0.0, min(MAX_WAIT_CHUNK_S, deadline - time.monotonic()))
            _, data = self._call("GET", _approval_path(approval_id, "wait") + f"?timeout={chunk:.3f}",
                                 timeout=_timeout(chunk + self.timeout))
            approval: dict[str, Any] = data["approval"]
            if approval.get("state") != "pending" or time.monotonic() >= deadline:
                return approval

    def list_approvals(self, state: str = "pending", limit: int | None = None) -> list[dict[str, Any]]:
        """``GET /v1/approvals`` (approver tier): held calls in ``state`` (or ``all``)."""
        query = urllib.parse.urlencode(_drop_none(state=state, limit=limit))
        _, data = self._call("GET", "/v1/approvals?" + query)
        approvals: list[dict[str, Any]] = data["approvals"]
        return approvals

    def approve(self, approval_id: str, reason: str | None = None) -> dict[str, Any]:
        """``POST /v1/approvals/{id}/approve`` (approver tier); returns the approval."""
        _, data = self._call("POST", _approval_path(approval_id, "approve"), _drop_none(reason=reason))
        approval: dict[str, Any] = data["approval"]
        return approval

    def deny(self, approval_id: str, reason: str) -> dict[str, Any]:
        """``POST /v1/approvals/{id}/deny`` (approver tier, reason required)."""
        _, data = self._call("POST", _approval_path(approval_id, "deny"), {"reason": reason})
        approval: dict[str, Any] = data["approval"]
        return approval

    def introspect(self, server: str, token: str) -> Introspection:
        """Verify a user's bearer ``token`` for ``server`` (``POST /v1/introspect``) with
        the daemon's issuer config; this process must be attested as ``server``.

        Returns an :class:`Introspection`: ``active`` with the token's subject, scopes
        and expiry, or inactive with the ``code`` of the check it failed (a bad token is
        not an exception). Raises :class:`AccessDenied` (``peer_mismatch``: not attested
        as ``server``), :class:`NotFoundError` (``server_unknown``),
        :class:`BadRequestError` (``token_too_large``...), :class:`ServiceUnavailable`
        (``jwks_unavailable``: the issuer's keys cannot be had).
        """
        status, data = self._call("POST", "/v1/introspect", {"server": server, "token": token})
        return _introspection(status, data, server)

    def end_session(self, session_id: str, user_token: str | None = None, *,
                    server: str | None = None) -> SessionEnd:
        """The MCP session ``session_id`` (as given to :meth:`tool_call`) has ended: it stops
        counting against the user's ``concurrent_sessions`` now, not after
        ``session_idle_seconds`` (``POST /v1/sessions/end``). The user is decided as for a
        call: ``user_token``'s subject for a server with ``oauth2``, else this process's
        uid, so only that user's sessions can be ended. ``server``: the server the session
        belongs to (optional when this process is attested as one server only).

        Idempotent: returns a :class:`SessionEnd` whose ``ended`` is False for an
        unknown or already ended session. Raises :class:`TokenRejected`,
        :class:`AccessDenied` (``peer_mismatch``), :class:`BadRequestError`
        (``server_required``), :class:`ServiceUnavailable` (``state_unavailable``).
        """
        status, data = self._call("POST", "/v1/sessions/end",
                                  _session_end_body(session_id, user_token, server))
        return _session_end(status, data, session_id)

    def redeem(self, resolution_token: str, arguments: Mapping[str, Any] | None = None, *,
               traceparent: str | None = None) -> Lease:
        """Exchange a resolution token for a :class:`Lease` with the secrets.

        ``arguments``, when given, must be the ones the token was issued for.
        """
        body = _drop_none(resolution_token=resolution_token,
                          arguments=dict(arguments) if arguments is not None else None)
        status, data = self._call("POST", "/v1/redeem", body, extra=_trace_headers(traceparent))
        lease = _lease(status, data)
        lease._client = self
        return lease

    def release(
        self,
        lease_id: str | Lease,
        status: ReleaseStatus,
        duration_ms: int,
        result_size_bytes: int | None = None,
        error: str | None = None,
        *,
        traceparent: str | None = None,
    ) -> dict[str, Any]:
        """End a lease with the call's outcome; returns the daemon's answer.

        Given a :class:`Lease`, its ``withhold_result`` is updated from the answer.
        """
        return self._release(lease_id, status, duration_ms, result_size_bytes, error, None,
                             traceparent)

    def _release(
        self,
        lease_id: str | Lease,
        status: ReleaseStatus,
        duration_ms: int,
        result_size_bytes: int | None,
        error: str | None,
        timeout: float | None,
        traceparent: str | None = None,
    ) -> dict[str, Any]:
        lease = lease_id if isinstance(lease_id, Lease) else None
        lid = lease.lease_id if lease is not None else str(lease_id)
        body = _release_body(lid, status, duration_ms, result_size_bytes, error)
        code, data = self._call("POST", "/v1/release", body, timeout=timeout,
                                extra=_trace_headers(traceparent))
        parsed: _ReleaseBody = _convert(data, _ReleaseBody, code, "POST /v1/release")
        if lease is not None:
            lease.withhold_result = parsed.withhold_result
        return data

    def issue_token(
        self,
        server: str,
        tool: str,
        user: str,
        *,
        agent_id: str | None = None,
        session_id: str | None = None,
        arguments: Mapping[str, Any] | None = None,
        ttl_seconds: int | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/tokens`` (admin tier): mint a resolution token."""
        body = _drop_none(server=server, tool=tool, user=user, agent_id=agent_id,
                          session_id=session_id, arguments=dict(arguments or {}),
                          ttl_seconds=ttl_seconds)
        status, data = self._call("POST", "/v1/tokens", body)
        _convert(data, _TokenBody, status, "POST /v1/tokens")
        return data

    def rotate_secret(
        self,
        name: str,
        *,
        value: str | None = None,
        generate: int | None = None,
        backend: str | None = None,
        revoke_leases: bool = False,
    ) -> dict[str, Any]:
        """``POST /v1/admin/secrets/{name}/rotate`` (security tier): a new version in the
        secret's backend; returns ``{secret, backend, old_version, new_version,
        leases_revoked}``. Exactly one of ``value`` and ``generate`` (a length)."""
        body = _drop_none(value=value, generate=generate, backend=backend,
                          revoke_leases=revoke_leases)
        path = "/v1/admin/secrets/" + urllib.parse.quote(name, safe="") + "/rotate"
        _, data = self._call("POST", path, body)
        return data

    @contextlib.contextmanager
    def tool_call(
        self,
        server: str,
        tool: str,
        *,
        user_token: str | None = None,
        agent_id: str | None = None,
        session_id: str | None = None,
        arguments: Mapping[str, Any] | None = None,
        server_version: str | None = None,
        approval_timeout_s: float | None = None,
        approval_id: str | None = None,
        traceparent: str | None = None,
    ) -> Iterator[Lease]:
        """Authorize, redeem, yield the :class:`Lease`, release with the outcome.

        If the body raises, the lease is released as ``error`` (``cancelled`` for
        ``KeyboardInterrupt``/``SystemExit``) and the body's exception propagates; a
        failed release is then only logged. After a successful body a failed release
        raises.

        A call held for human approval raises :class:`ApprovalPending` (with its
        ``approval_id``) at once, or, with ``approval_timeout_s``, waits that long for
        the verdict: approved -> the call goes on; denied -> :class:`AccessDenied`
        (``approval_denied``); expired -> :class:`ConflictError`; still pending ->
        :class:`ApprovalPending`.

        ``approval_id`` retries a call that was held earlier and has since been approved:
        the daemon lets it through once, and only for exactly the same call (server,
        tool, user, agent, arguments); presenting it before a verdict is refused
        (``approval_pending``), after a denial ``approval_denied``.

        ``traceparent`` (W3C Trace Context) goes with the authorize and the release, so
        the call's audit events carry its trace-id as ``trace_id`` (see :meth:`authorize`).
        """
        kw = dict(user_token=user_token, agent_id=agent_id, session_id=session_id,
                  arguments=arguments, server_version=server_version)
        trace = _trace_headers(traceparent)
        # Authorize and redeem in one request (this process runs the tool).
        try:
            status, data = self._call("POST", "/v1/authorize",
                                      _authorize_redeem_body(server, tool, kw, approval_id),
                                      _OK_OR_HELD, extra=trace)
            lease = _redeemed_lease(status, data)
        except ApprovalPending as pending:
            if approval_timeout_s is None:
                raise
            approved = _approval_outcome(
                self.wait_for_approval(pending.approval_id, approval_timeout_s), pending)
            status, data = self._call("POST", "/v1/authorize",
                                      _authorize_redeem_body(server, tool, kw, approved),
                                      _OK_OR_HELD, extra=trace)
            lease = _redeemed_lease(status, data)
        lease._client = self
        started = time.monotonic()
        try:
            yield lease
        except BaseException as exc:
            if isinstance(exc, GeneratorExit):
                raise
            outcome, error = _release_outcome(exc, None)
            try:
                self._release(lease, outcome, _elapsed_ms(started), lease.result_size_bytes,
                              error, RELEASE_AFTER_FAILURE_TIMEOUT_S, traceparent)
            except SidekeyClientError as rel:
                log.warning("releasing lease %s after a failed tool call failed: %s",
                            lease.lease_id, rel.code)
            raise
        self.release(lease, "success", _elapsed_ms(started), lease.result_size_bytes,
                     traceparent=traceparent)

    def _egress(self, method: str, target: str, headers: list[tuple[bytes, bytes]],
                body: bytes, timeout: float) -> tuple[int, Any, bytes]:
        """One egress request (Lease.transport): (status, h11 headers, body)."""
        if self._transport is not None:
            raise RuntimeError("egress needs the daemon's socket, not a test transport")
        made: list[_Exchange] = []

        def exchange(h: h11.Connection, what: str) -> _Exchange:
            made.append(_EgressExchange(h, what, headers))
            return made[-1]

        status, _, raw = self._pool().request(method, target, body, _timeout(timeout),
                                              f"{method} egress", exchange=exchange)
        return status, made[-1].head, raw

    def close(self) -> None:
        """Close the connection pool. The client cannot be used afterwards."""
        self._closed = True
        pool, self._http = self._http, None
        if pool is not None:
            if pool.pid == os.getpid():
                pool.close()
            else:
                pool.abandon()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------- async client


class AsyncClient:
    """Asynchronous client for asyncio and trio; the same API as :class:`Client`.

    Create one per process and share it between tasks: connections are kept alive and
    reused (one per concurrent request, up to ``MAX_CONNECTIONS``); the pool is created
    on first use, for the event loop it is used in (a client used from another loop, or
    after a fork, opens new connections). ``timeout``, ``expected_uid``: as for
    :class:`Client`. ``transport`` is for tests: an async function from
    :class:`TransportRequest` to :class:`TransportResponse`.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: AsyncTransport | None = None,
        expected_uid: int | str | None = None,
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.daemon_uids = resolve_daemon_uids(expected_uid)
        self.timeout = _timeout(timeout)
        self._transport = transport
        self._http: _AsyncPool | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncClient(socket_path={self.socket_path!r})"

    def _pool(self) -> _AsyncPool:
        # No await between check and set: no lock needed within one event loop.
        if self._closed:
            raise RuntimeError("sidekey client is closed")
        lib, loop = _event_loop()
        pool = self._http
        if pool is not None and pool.loop is loop and pool.pid == os.getpid():
            return pool
        if pool is not None:
            # Another process (forked) or another event loop: those sockets are not ours
            # to use here. Close only our descriptors (never shutdown: see _Conn.close).
            pool.close()
        self._http = _AsyncPool(self.socket_path, self.daemon_uids, lib, loop)
        return self._http

    async def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None,
        ok: frozenset[int] = _OK, http_timeout: float | None = None, extra: _ExtraHeaders = (),
    ) -> tuple[int, dict[str, Any]]:
        what = f"{method} {path}"
        content = _encoder.encode(body) if body is not None else None
        if self._transport is not None:
            if self._closed:
                raise RuntimeError("sidekey client is closed")
            status, headers, raw = _transport_response(
                await self._transport(_transport_request(method, path, content, extra)), what)
        else:
            status, headers, raw = await self._pool().request(
                method, path, content, http_timeout or self.timeout, what, extra)
        return status, _interpret(status, raw, headers, what, ok)

    async def health(self) -> dict[str, Any]:
        """``GET /v1/health``. See :meth:`Client.health`."""
        return (await self._call("GET", "/v1/health"))[1]

    async def status(self) -> dict[str, Any]:
        """``GET /v1/status``. See :meth:`Client.status`."""
        return (await self._call("GET", "/v1/status"))[1]

    async def registry(self, *, stale_days: int | None = None, owner: str | None = None,
                       as_of: str | None = None) -> dict[str, Any]:
        """``GET /v1/registry``. See :meth:`Client.registry`."""
        return (await self._call("GET", _registry_path(stale_days, owner, as_of)))[1]

    async def authorize(
        self,
        server: str,
        tool: str,
        *,
        user_token: str | None = None,
        agent_id: str | None = None,
        session_id: str | None = None,
        arguments: Mapping[str, Any] | None = None,
        server_version: str | None = None,
        raise_on_pending: bool = True,
        approval_id: str | None = None,
        traceparent: str | None = None,
    ) -> AuthorizeResult:
        """Ask for a decision on one tool call. See :meth:`Client.authorize`."""
        body = _authorize_body(server, tool, user_token, agent_id, session_id, arguments,
                               server_version, approval_id)
        status, data = await self._call("POST", "/v1/authorize", body, _OK_OR_HELD,
                                        extra=_trace_headers(traceparent))
        return _authorize_result(status, data, raise_on_pending)

    async def wait_for_approval(self, approval_id: str, timeout_s: float) -> dict[str, Any]:
        """See :meth:`Client.wait_for_approval`."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            chunk = max(0.0, min(MAX_WAIT_CHUNK_S, deadline - time.monotonic()))
            _, data = await self._call(
                "GET", _approval_path(approval_id, "wait") + f"?timeout={chunk:.3f}",
                http_timeout=_timeout(chunk + self.timeout))
            approval: dict[str, Any] = data["approval"]
            if approval.get("state") != "pending" or time.monotonic() >= deadline:
                return approval

    async def list_approvals(
        self, state: str = "pending", limit: int | None = None
    ) -> list[dict[str, Any]]:
        """See :meth:`Client.list_approvals`."""
        query = urllib.parse.urlencode(_drop_none(state=state, limit=limit))
        _, data = await self._call("GET", "/v1/approvals?" + query)
        approvals: list[dict[str, Any]] = data["approvals"]
        return approvals

    async def approve(self, approval_id: str, reason: str | None = None) -> dict[str, Any]:
        """See :meth:`Client.approve`."""
        _, data = await self._call("POST", _approval_path(approval_id, "approve"),
                                   _drop_none(reason=reason))
        approval: dict[str, Any] = data["approval"]
        return approval

    async def deny(self, approval_id: str, reason: str) -> dict[str, Any]:
        """See :meth:`Client.deny`."""
        _, data = await self._call("POST", _approval_path(approval_id, "deny"), {"reason": reason})
        approval: dict[str, Any] = data["approval"]
        return approval

    async def introspect(self, server: str, token: str) -> Introspection:
        """Verify a user's bearer token for ``server``. See :meth:`Client.introspect`."""
        status, data = await self._call("POST", "/v1/introspect",
                                         {"server": server, "token": token})
        return _introspection(status, data, server)

    async def end_session(self, session_id: str, user_token: str | None = None, *,
                          server: str | None = None) -> SessionEnd:
        """End the MCP session ``session_id``. See :meth:`Client.end_session`."""
        status, data = await self._call("POST", "/v1/sessions/end",
                                        _session_end_body(session_id, user_token, server))
        return _session_end(status, data, session_id)

    async def redeem(
        self, resolution_token: str, arguments: Mapping[str, Any] | None = None, *,
        traceparent: str | None = None,
    ) -> Lease:
        """Exchange a resolution token for a :class:`Lease`. See :meth:`Client.redeem`."""
        body = _drop_none(resolution_token=resolution_token,
                          arguments=dict(arguments) if arguments is not None else None)
        status, data = await self._call("POST", "/v1/redeem", body,
                                        extra=_trace_headers(traceparent))
        lease = _lease(status, data)
        lease._client = self
        return lease

    async def release(
        self,
        lease_id: str | Lease,
        status: ReleaseStatus,
        duration_ms: int,
        result_size_bytes: int | None = None,
        error: str | None = None,
        *,
        traceparent: str | None = None,
    ) -> dict[str, Any]:
        """End a lease with the call's outcome. See :meth:`Client.release`."""
        lease = lease_id if isinstance(lease_id, Lease) else None
        lid = lease.lease_id if lease is not None else str(lease_id)
        body = _release_body(lid, status, duration_ms, result_size_bytes, error)
        code, data = await self._call("POST", "/v1/release", body,
                                      extra=_trace_headers(traceparent))
        parsed: _ReleaseBody = _convert(data, _ReleaseBody, code, "POST /v1/release")
        if lease is not None:
            lease.withhold_result = parsed.withhold_result
        return data

    async def issue_token(
        self,
        server: str,
        tool: str,
        user: str,
        *,
        agent_id: str | None = None,
        session_id: str | None = None,
        arguments: Mapping[str, Any] | None = None,
        ttl_seconds: int | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/tokens`` (admin tier): mint a resolution token."""
        body = _drop_none(server=server, tool=tool, user=user, agent_id=agent_id,
                          session_id=session_id, arguments=dict(arguments or {}),
                          ttl_seconds=ttl_seconds)
        status, data = await self._call("POST", "/v1/tokens", body)
        _convert(data, _TokenBody, status, "POST /v1/tokens")
        return data

    @contextlib.asynccontextmanager
    async def tool_call(
        self,
        server: str,
        tool: str,
        *,
        user_token: str | None = None,
        agent_id: str | None = None,
        session_id: str | None = None,
        arguments: Mapping[str, Any] | None = None,
        server_version: str | None = None,
        approval_timeout_s: float | None = None,
        approval_id: str | None = None,
        traceparent: str | None = None,
    ) -> AsyncIterator[Lease]:
        """Authorize, redeem, yield the :class:`Lease`, release with the outcome.

        On a successful body the lease is released as ``success`` and a failed release
        raises. If the body raises, it is released as ``error``; if the body is
        cancelled, as ``cancelled``. Either way that release is shielded from
        cancellation but bounded by ``RELEASE_AFTER_FAILURE_TIMEOUT_S``, its failure is
        only logged, and the body's exception propagates unchanged. Approval holds and
        ``approval_id`` and ``traceparent`` as in :meth:`Client.tool_call`.
        """
        kw = dict(user_token=user_token, agent_id=agent_id, session_id=session_id,
                  arguments=arguments, server_version=server_version)
        trace = _trace_headers(traceparent)
        # Authorize and redeem in one request (this process runs the tool).
        try:
            status, data = await self._call("POST", "/v1/authorize",
                                            _authorize_redeem_body(server, tool, kw, approval_id),
                                            _OK_OR_HELD, extra=trace)
            lease = _redeemed_lease(status, data)
        except ApprovalPending as pending:
            if approval_timeout_s is None:
                raise
            approval = await self.wait_for_approval(pending.approval_id, approval_timeout_s)
            status, data = await self._call(
                "POST", "/v1/authorize",
                _authorize_redeem_body(server, tool, kw, _approval_outcome(approval, pending)),
                _OK_OR_HELD, extra=trace)
            lease = _redeemed_lease(status, data)
        lease._client = self
        started = time.monotonic()
        try:
            yield lease
        except BaseException as exc:
            if isinstance(exc, GeneratorExit):
                raise
            outcome, error = _release_outcome(exc, anyio.get_cancelled_exc_class())
            duration = _elapsed_ms(started)
            released = False
            try:
                with anyio.CancelScope(shield=True), anyio.move_on_after(
                    RELEASE_AFTER_FAILURE_TIMEOUT_S
                ):
                    await self.release(lease, outcome, duration, lease.result_size_bytes, error,
                                       traceparent=traceparent)
                    released = True
            except SidekeyClientError as rel:
                log.warning("releasing lease %s after a %s tool call failed: %s",
                            lease.lease_id, outcome, rel.code)
            else:
                if not released:
                    log.warning("releasing lease %s after a %s tool call timed out",
                                lease.lease_id, outcome)
            raise
        await self.release(lease, "success", _elapsed_ms(started), lease.result_size_bytes,
                           traceparent=traceparent)

    async def _egress(self, method: str, target: str, headers: list[tuple[bytes, bytes]],
                      body: bytes, timeout_s: float) -> tuple[int, Any, bytes]:
        """One egress request (Lease.transport): (status, h11 headers, body)."""
        if self._transport is not None:
            raise RuntimeError("egress needs the daemon's socket, not a test transport")
        made: list[_Exchange] = []

        def exchange(h: h11.Connection, what: str) -> _Exchange:
            made.append(_EgressExchange(h, what, headers))
            return made[-1]

        status, _, raw = await self._pool().request(method, target, body, _timeout(timeout_s),
                                                    f"{method} egress", exchange=exchange)
        return status, made[-1].head, raw

    async def close(self) -> None:
        """Close the connection pool. The client cannot be used afterwards."""
        self._closed = True
        pool, self._http = self._http, None
        if pool is not None:
            pool.close()

    aclose = close

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


__all__ = [
    "DEFAULT_SOCKET_PATH",
    "SOCKET_ENV",
    "AccessDenied",
    "ApprovalPending",
    "AsyncClient",
    "AuthorizeResult",
    "BadGatewayError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "ConnectionFailed",
    "DaemonIdentityError",
    "Introspection",
    "Lease",
    "NotFoundError",
    "ProtocolError",
    "RateLimited",
    "RequestTimeout",
    "RequestTooLarge",
    "ServiceUnavailable",
    "SessionEnd",
    "SidekeyClientError",
    "TokenRejected",
    "resolve_daemon_uids",
    "resolve_socket_path",
]
