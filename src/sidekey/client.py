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

import contextlib
import logging
import os
import pwd
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import httpcore
import httpx
import msgspec

from . import __version__

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
_BASE_URL = "http://sidekey"
_HEADERS = {"user-agent": f"sidekey-client/{__version__}", "accept": "application/json"}
_JSON = {"content-type": "application/json"}

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
    ) -> None:
        self.lease_id = lease_id
        self.expires_at = expires_at
        self.server = server
        self.tool = tool
        self.secrets: Mapping[str, str] = _SecretMap(secrets)
        self.request_id = request_id
        self.result_size_bytes: int | None = None
        self.withhold_result = False

    def __repr__(self) -> str:
        return (
            f"Lease(lease_id={self.lease_id!r}, server={self.server!r}, tool={self.tool!r}, "
            f"expires_at={self.expires_at!r}, secrets={sorted(self.secrets)!r}, "
            f"withhold_result={self.withhold_result!r})"
        )

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("sidekey leases cannot be pickled")


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
    status: int, data: Any, headers: httpx.Headers, what: str
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


def _retry_after(details: Mapping[str, Any] | None, headers: httpx.Headers) -> float | None:
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
    status: int, body: bytes, headers: httpx.Headers, what: str, ok: frozenset[int]
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


def _transport_error(exc: httpx.HTTPError, what: str) -> SidekeyClientError:
    """Translate an httpx failure once, at the I/O edge, into a few kinds."""
    name = type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError | httpx.NetworkError):
        return ConnectionFailed(f"{what}: cannot reach sidekey ({name}: {exc})")
    if isinstance(exc, httpx.TimeoutException):
        return RequestTimeout(f"{what}: sidekey did not answer in time ({name})")
    return ProtocolError(f"{what}: broken HTTP exchange with sidekey ({name})")


def _check_length(resp: httpx.Response, what: str) -> None:
    declared = resp.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
        raise ProtocolError(f"{what}: response over {MAX_RESPONSE_BYTES} bytes",
                            status=resp.status_code)


def _append_capped(buf: bytearray, chunk: bytes, status: int, what: str) -> None:
    buf += chunk
    if len(buf) > MAX_RESPONSE_BYTES:
        raise ProtocolError(f"{what}: response over {MAX_RESPONSE_BYTES} bytes", status=status)


def _timeout(timeout: float) -> httpx.Timeout:
    if not timeout > 0:
        raise ValueError("timeout must be a positive number of seconds")
    return httpx.Timeout(timeout)


_OK = frozenset({200})
_OK_OR_HELD = frozenset({200, 202})


# --------------------------------------------------------------------------- transports


def _no_tls() -> ssl.SSLContext:
    # TLS is never used on the Unix socket. httpx builds a client SSL context per
    # transport; the default one loads the CA bundle (tens of ms at first use). An
    # empty, verifying context costs nothing and would fail any handshake closed.
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


_HTTPX_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5)


def _pool_options(path: str) -> dict[str, Any]:
    """What httpx's transport gives its own connection pool (no TLS, _HTTPX_LIMITS, the
    socket path): the transports replace that pool with one on a checking backend."""
    return {
        "ssl_context": _no_tls(),
        "max_connections": _HTTPX_LIMITS.max_connections,
        "max_keepalive_connections": _HTTPX_LIMITS.max_keepalive_connections,
        "keepalive_expiry": _HTTPX_LIMITS.keepalive_expiry,
        "uds": path,
    }


_SyncStream: Callable[[socket.socket], httpcore.NetworkStream] | None
try:  # The stream class is not exported; without it the stock backend is used.
    from httpcore._backends.sync import SyncStream as _ImportedSyncStream

    _SyncStream = _ImportedSyncStream
except ImportError:  # pragma: no cover
    _SyncStream = None


class _UnixBackend(httpcore.SyncBackend):
    """httpcore's sync backend, but a failed connect closes its socket, and a daemon
    that runs as an unexpected uid is refused before anything is sent.

    httpcore 1.0 leaves the socket of a failed ``connect()`` (daemon down) to the
    garbage collector, which then warns (``ResourceWarning``). trio and anyio close it.
    """

    def __init__(self, allowed_uids: frozenset[int] | None = None) -> None:
        self.allowed_uids = allowed_uids

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        if _SyncStream is None:  # pragma: no cover - httpcore moved its stream class
            stream = super().connect_unix_socket(path, timeout, socket_options)
            try:
                _check_daemon_peer(stream.get_extra_info("socket"), self.allowed_uids, path)
            except BaseException:
                stream.close()
                raise
            return stream
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(timeout)
            sock.connect(path)
            _check_daemon_peer(sock, self.allowed_uids, path)
        except TimeoutError as exc:
            sock.close()
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            sock.close()
            raise httpcore.ConnectError(str(exc)) from exc
        except BaseException:
            sock.close()
            raise
        return _SyncStream(sock)


class _UnixTransport(httpx.HTTPTransport):
    """httpx's HTTP/1.1 transport over a Unix socket with :class:`_UnixBackend`."""

    def __init__(self, path: str, allowed_uids: frozenset[int] | None = None) -> None:
        super().__init__(uds=path, verify=_no_tls(), trust_env=False, limits=_HTTPX_LIMITS)
        self._pool = httpcore.ConnectionPool(**_pool_options(path), network_backend=_UnixBackend(allowed_uids))


class _CheckedAsyncBackend(httpcore.AsyncNetworkBackend):
    """httpcore's auto-detected async backend (asyncio or trio), plus the daemon uid
    check of :class:`_UnixBackend` on every new Unix-socket connection."""

    def __init__(self, allowed_uids: frozenset[int] | None) -> None:
        from httpcore._backends.auto import AutoBackend

        self._inner = AutoBackend()
        self.allowed_uids = allowed_uids

    # httpcore's AsyncNetworkBackend interface names these parameters `timeout`.
    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None, socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:  # pragma: no cover - only Unix sockets are used
        return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        try:
            _check_daemon_peer(stream.get_extra_info("socket"), self.allowed_uids, path)
        except BaseException:
            await stream.aclose()
            raise
        return stream

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _AsyncUnixTransport(httpx.AsyncHTTPTransport):
    """httpx's async HTTP/1.1 transport over a Unix socket with :class:`_CheckedAsyncBackend`."""

    def __init__(self, path: str, allowed_uids: frozenset[int] | None) -> None:
        super().__init__(uds=path, verify=_no_tls(), trust_env=False, limits=_HTTPX_LIMITS)
        self._pool = httpcore.AsyncConnectionPool(**_pool_options(path), network_backend=_CheckedAsyncBackend(allowed_uids))


# --------------------------------------------------------------------------- sync client


class Client:
    """Synchronous client. Thread-safe; the HTTP connection pool is created on first use.

    ``transport`` is for tests (an ``httpx.MockTransport``); by default the client
    speaks HTTP/1.1 over ``socket_path`` (see :func:`resolve_socket_path`), and only to
    a daemon running as ``expected_uid`` or root (see :func:`resolve_daemon_uids`):
    otherwise a request raises :class:`DaemonIdentityError` before anything is sent.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
        expected_uid: int | str | None = None,
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.daemon_uids = resolve_daemon_uids(expected_uid)
        self.timeout = _timeout(timeout)
        self._transport = transport
        self._http: httpx.Client | None = None
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"Client(socket_path={self.socket_path!r})"

    def _client(self) -> httpx.Client:
        with self._lock:
            if self._closed:
                raise RuntimeError("sidekey client is closed")
            if self._http is None:
                transport = self._transport or _UnixTransport(self.socket_path, self.daemon_uids)
                self._http = httpx.Client(
                    transport=transport, base_url=_BASE_URL, timeout=self.timeout,
                    headers=_HEADERS, trust_env=False,
                )
            return self._http

    def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None,
        ok: frozenset[int] = _OK, timeout: httpx.Timeout | None = None,
    ) -> tuple[int, dict[str, Any]]:
        what = f"{method} {path}"
        content = _encoder.encode(body) if body is not None else None
        http = self._client()
        try:
            with http.stream(
                method, path, content=content, headers=_JSON if content is not None else None,
                timeout=timeout or self.timeout,
            ) as resp:
                _check_length(resp, what)
                buf = bytearray()
                for chunk in resp.iter_bytes():
                    _append_capped(buf, chunk, resp.status_code, what)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, what) from None
        return resp.status_code, _interpret(resp.status_code, bytes(buf), resp.headers, what, ok)

    def health(self) -> dict[str, Any]:
        """``GET /v1/health``: liveness and readiness of store, backends and audit."""
        return self._call("GET", "/v1/health")[1]

    def status(self) -> dict[str, Any]:
        """``GET /v1/status`` (operator tier): leases, quotas, backends, registry."""
        return self._call("GET", "/v1/status")[1]

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
    ) -> AuthorizeResult:
        """Ask for a decision on one tool call.

        Returns an ``allow`` result with a single-use ``resolution_token``. Raises
        :class:`ApprovalPending` when the call is held (or, with
        ``raise_on_pending=False``, returns the ``pending_approval`` result), and
        :class:`AccessDenied`, :class:`RateLimited`, ... when it is refused. After an
        approver approved a held call, present its ``approval_id`` with exactly the same
        call (arguments included) to get the token.
        """
        body = _authorize_body(server, tool, user_token, agent_id, session_id, arguments,
                               server_version, approval_id)
        status, data = self._call("POST", "/v1/authorize", body, _OK_OR_HELD)
        return _authorize_result(status, data, raise_on_pending)

    def wait_for_approval(self, approval_id: str, timeout_s: float) -> dict[str, Any]:
        """Long-poll ``GET /v1/approvals/{id}/wait`` until the approval is decided or
        expires, or ``timeout_s`` passes; returns the approval (``state`` says which)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            chunk = max(0.0, min(MAX_WAIT_CHUNK_S, deadline - time.monotonic()))
            _, data = self._call("GET", _approval_path(approval_id, "wait") + f"?timeout={chunk:.3f}",
                                 timeout=_timeout(chunk + (self.timeout.read or DEFAULT_TIMEOUT_S)))
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

    def redeem(self, resolution_token: str, arguments: Mapping[str, Any] | None = None) -> Lease:
        """Exchange a resolution token for a :class:`Lease` with the secrets.

        ``arguments``, when given, must be the ones the token was issued for.
        """
        body = _drop_none(resolution_token=resolution_token,
                          arguments=dict(arguments) if arguments is not None else None)
        status, data = self._call("POST", "/v1/redeem", body)
        return _lease(status, data)

    def release(
        self,
        lease_id: str | Lease,
        status: ReleaseStatus,
        duration_ms: int,
        result_size_bytes: int | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        """End a lease with the call's outcome; returns the daemon's answer.

        Given a :class:`Lease`, its ``withhold_result`` is updated from the answer.
        """
        return self._release(lease_id, status, duration_ms, result_size_bytes, error, None)

    def _release(
        self,
        lease_id: str | Lease,
        status: ReleaseStatus,
        duration_ms: int,
        result_size_bytes: int | None,
        error: str | None,
        timeout: httpx.Timeout | None,
    ) -> dict[str, Any]:
        lease = lease_id if isinstance(lease_id, Lease) else None
        lid = lease.lease_id if lease is not None else str(lease_id)
        body = _release_body(lid, status, duration_ms, result_size_bytes, error)
        code, data = self._call("POST", "/v1/release", body, timeout=timeout)
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
        """
        kw = dict(user_token=user_token, agent_id=agent_id, session_id=session_id,
                  arguments=arguments, server_version=server_version)
        # Authorize and redeem in one request (this process runs the tool).
        try:
            status, data = self._call("POST", "/v1/authorize",
                                      _authorize_redeem_body(server, tool, kw, None), _OK_OR_HELD)
            lease = _redeemed_lease(status, data)
        except ApprovalPending as pending:
            if approval_timeout_s is None:
                raise
            approved = _approval_outcome(
                self.wait_for_approval(pending.approval_id, approval_timeout_s), pending)
            status, data = self._call("POST", "/v1/authorize",
                                      _authorize_redeem_body(server, tool, kw, approved),
                                      _OK_OR_HELD)
            lease = _redeemed_lease(status, data)
        started = time.monotonic()
        try:
            yield lease
        except BaseException as exc:
            if isinstance(exc, GeneratorExit):
                raise
            outcome, error = _release_outcome(exc, None)
            try:
                self._release(lease, outcome, _elapsed_ms(started), lease.result_size_bytes,
                              error, httpx.Timeout(RELEASE_AFTER_FAILURE_TIMEOUT_S))
            except SidekeyClientError as rel:
                log.warning("releasing lease %s after a failed tool call failed: %s",
                            lease.lease_id, rel.code)
            raise
        self.release(lease, "success", _elapsed_ms(started), lease.result_size_bytes)

    def close(self) -> None:
        """Close the connection pool. The client cannot be used afterwards."""
        with self._lock:
            self._closed = True
            http, self._http = self._http, None
        if http is not None:
            http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------- async client


class AsyncClient:
    """Asynchronous client for asyncio and trio; the same API as :class:`Client`.

    ``transport`` is for tests (an ``httpx.MockTransport``). Create one per process
    and share it between tasks; the connection pool is created on first use.
    ``expected_uid``: as for :class:`Client`.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
        expected_uid: int | str | None = None,
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.daemon_uids = resolve_daemon_uids(expected_uid)
        self.timeout = _timeout(timeout)
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"AsyncClient(socket_path={self.socket_path!r})"

    def _client(self) -> httpx.AsyncClient:
        # No await between check and set: no lock needed within one event loop.
        if self._closed:
            raise RuntimeError("sidekey client is closed")
        if self._http is None:
            transport = self._transport or _AsyncUnixTransport(self.socket_path, self.daemon_uids)
            self._http = httpx.AsyncClient(
                transport=transport, base_url=_BASE_URL, timeout=self.timeout, headers=_HEADERS,
                trust_env=False,
            )
        return self._http

    async def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None,
        ok: frozenset[int] = _OK, http_timeout: httpx.Timeout | None = None,
    ) -> tuple[int, dict[str, Any]]:
        what = f"{method} {path}"
        content = _encoder.encode(body) if body is not None else None
        http = self._client()
        try:
            async with http.stream(
                method, path, content=content, headers=_JSON if content is not None else None,
                timeout=http_timeout or self.timeout,
            ) as resp:
                _check_length(resp, what)
                buf = bytearray()
                async for chunk in resp.aiter_bytes():
                    _append_capped(buf, chunk, resp.status_code, what)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, what) from None
        return resp.status_code, _interpret(resp.status_code, bytes(buf), resp.headers, what, ok)

    async def health(self) -> dict[str, Any]:
        """``GET /v1/health``. See :meth:`Client.health`."""
        return (await self._call("GET", "/v1/health"))[1]

    async def status(self) -> dict[str, Any]:
        """``GET /v1/status``. See :meth:`Client.status`."""
        return (await self._call("GET", "/v1/status"))[1]

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
    ) -> AuthorizeResult:
        """Ask for a decision on one tool call. See :meth:`Client.authorize`."""
        body = _authorize_body(server, tool, user_token, agent_id, session_id, arguments,
                               server_version, approval_id)
        status, data = await self._call("POST", "/v1/authorize", body, _OK_OR_HELD)
        return _authorize_result(status, data, raise_on_pending)

    async def wait_for_approval(self, approval_id: str, timeout_s: float) -> dict[str, Any]:
        """See :meth:`Client.wait_for_approval`."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            chunk = max(0.0, min(MAX_WAIT_CHUNK_S, deadline - time.monotonic()))
            _, data = await self._call(
                "GET", _approval_path(approval_id, "wait") + f"?timeout={chunk:.3f}",
                http_timeout=_timeout(chunk + (self.timeout.read or DEFAULT_TIMEOUT_S)))
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

    async def redeem(
        self, resolution_token: str, arguments: Mapping[str, Any] | None = None
    ) -> Lease:
        """Exchange a resolution token for a :class:`Lease`. See :meth:`Client.redeem`."""
        body = _drop_none(resolution_token=resolution_token,
                          arguments=dict(arguments) if arguments is not None else None)
        status, data = await self._call("POST", "/v1/redeem", body)
        return _lease(status, data)

    async def release(
        self,
        lease_id: str | Lease,
        status: ReleaseStatus,
        duration_ms: int,
        result_size_bytes: int | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        """End a lease with the call's outcome. See :meth:`Client.release`."""
        lease = lease_id if isinstance(lease_id, Lease) else None
        lid = lease.lease_id if lease is not None else str(lease_id)
        body = _release_body(lid, status, duration_ms, result_size_bytes, error)
        code, data = await self._call("POST", "/v1/release", body)
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
    ) -> AsyncIterator[Lease]:
        """Authorize, redeem, yield the :class:`Lease`, release with the outcome.

        On a successful body the lease is released as ``success`` and a failed release
        raises. If the body raises, it is released as ``error``; if the body is
        cancelled, as ``cancelled``. Either way that release is shielded from
        cancellation but bounded by ``RELEASE_AFTER_FAILURE_TIMEOUT_S``, its failure is
        only logged, and the body's exception propagates unchanged. Approval holds as in
        :meth:`Client.tool_call`.
        """
        kw = dict(user_token=user_token, agent_id=agent_id, session_id=session_id,
                  arguments=arguments, server_version=server_version)
        # Authorize and redeem in one request (this process runs the tool).
        try:
            status, data = await self._call("POST", "/v1/authorize",
                                            _authorize_redeem_body(server, tool, kw, None),
                                            _OK_OR_HELD)
            lease = _redeemed_lease(status, data)
        except ApprovalPending as pending:
            if approval_timeout_s is None:
                raise
            approval = await self.wait_for_approval(pending.approval_id, approval_timeout_s)
            status, data = await self._call(
                "POST", "/v1/authorize",
                _authorize_redeem_body(server, tool, kw, _approval_outcome(approval, pending)),
                _OK_OR_HELD)
            lease = _redeemed_lease(status, data)
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
                    await self.release(lease, outcome, duration, lease.result_size_bytes, error)
                    released = True
            except SidekeyClientError as rel:
                log.warning("releasing lease %s after a %s tool call failed: %s",
                            lease.lease_id, outcome, rel.code)
            else:
                if not released:
                    log.warning("releasing lease %s after a %s tool call timed out",
                                lease.lease_id, outcome)
            raise
        await self.release(lease, "success", _elapsed_ms(started), lease.result_size_bytes)

    async def close(self) -> None:
        """Close the connection pool. The client cannot be used afterwards."""
        self._closed = True
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

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
    "BadRequestError",
    "Client",
    "ConflictError",
    "ConnectionFailed",
    "DaemonIdentityError",
    "Lease",
    "NotFoundError",
    "ProtocolError",
    "RateLimited",
    "RequestTimeout",
    "RequestTooLarge",
    "ServiceUnavailable",
    "SidekeyClientError",
    "TokenRejected",
    "resolve_daemon_uids",
    "resolve_socket_path",
]
