"""Wire messages and error codes of the sidekey v1 interface. Pure: no I/O.

Every request body is decoded into a frozen ``msgspec.Struct`` that forbids unknown
fields, so a typo in a client is a precise 400 rather than a silently ignored field.
Errors form a small tree: :class:`SidekeyError` subclasses carry a stable wire
``code`` and an HTTP status; anything else raised inside the daemon is a local bug
and becomes a 500 ``internal`` without details.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# ---------------------------------------------------------------------------
# Limits that are part of the contract (not tunables).
MAX_TOKEN_TTL_S = 300
MAX_NAME_LEN = 128
MAX_ARGUMENTS_BYTES = 32 * 1024
# Nesting depth of a call's arguments (a request body may nest one level more). Decoders
# and encoders recurse: deeper input is refused before any of them sees it.
MAX_JSON_DEPTH = 32
# Largest time claim (exp, iat, nbf) accepted in any token: 9999-12-31T23:59:59Z, the
# last second datetime can format. Larger values are refused as invalid claims.
MAX_TIMESTAMP = 253_402_300_799

Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_LEN, pattern=r"^[A-Za-z0-9_.:@/-]+$")]
# An agent is often named by its MCP client ("Claude Desktop", "VS Code (Copilot)"): words
# of name characters and ( ) +, single spaces between them, none leading or trailing.
AgentName = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_LEN,
                                pattern=r"^[A-Za-z0-9_.:@/()+-]+( [A-Za-z0-9_.:@/()+-]+)*$")]
Opaque = Annotated[str, Meta(min_length=1, max_length=256)]
UserToken = Annotated[str, Meta(max_length=16 * 1024)]
ApprovalId = Annotated[str, Meta(pattern=r"^apr_[A-Za-z0-9_-]{1,64}$")]
ResolutionToken = Annotated[str, Meta(min_length=1, max_length=8 * 1024)]


# ---------------------------------------------------------------------------
# Errors


class SidekeyError(Exception):
    """An error whose ``code`` travels on the wire. Subclasses fix the HTTP status."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details


class BadRequest(SidekeyError):
    status = 400
    code = "bad_request"


class TokenError(SidekeyError):
    """The resolution token is malformed, expired, forged or otherwise unusable."""

    status = 401
    code = "token_invalid"


class Denied(SidekeyError):
    """Policy or peer attestation denied the call."""

    status = 403
    code = "denied"


class NotFound(SidekeyError):
    status = 404
    code = "not_found"


class Conflict(SidekeyError):
    """Replay or illegal state transition (token already used, lease already released)."""

    status = 409
    code = "conflict"


class TooLarge(SidekeyError):
    status = 413
    code = "body_too_large"


class Unavailable(SidekeyError):
    """A dependency (audit sink, state store, secret backend) cannot serve the call."""

    status = 503
    code = "unavailable"


class GatewayTimeout(SidekeyError):
    """An upstream the daemon called for the caller did not answer in time."""

    status = 504
    code = "gateway_timeout"


class MethodNotAllowed(SidekeyError):
    """The path exists, but not for this method."""

    status = 405
    code = "method_not_allowed"


class RequestTimeout(SidekeyError):
    """The request head or body did not arrive in time."""

    status = 408
    code = "request_timeout"


class Unprocessable(SidekeyError):
    """The request was understood but its content cannot be applied (e.g. a config reload
    whose new configuration is invalid)."""

    status = 422
    code = "unprocessable"


class TooManyRequests(SidekeyError):
    """A limit on the caller's volume fired; ``details`` may carry ``retry_after_s``."""

    status = 429
    code = "rate_limited"


class HeadersTooLarge(SidekeyError):
    status = 431
    code = "headers_too_large"


class Internal(SidekeyError):
    """A local bug (never a verdict on the caller): the message says no more than that."""

    status = 500
    code = "internal"


class BadGateway(SidekeyError):
    """A server sidekey called for the caller (an OAuth token endpoint, an upstream)
    answered something sidekey cannot use: 502. Not the caller's fault, nor the user's."""

    status = 502
    code = "bad_gateway"


class Unsupported(SidekeyError):
    """The HTTP framing uses a feature the server does not implement (an unknown transfer coding: 501)."""

    status = 501
    code = "not_implemented"


# The class to raise when the status is data (a policy decision, a framing error), so no
# caller sets ``status`` on an instance after construction. Every status a SidekeyError
# subclass anywhere in sidekey fixes is here (tests/test_error_statuses.py checks).
ERROR_CLASS_BY_STATUS: dict[int, type[SidekeyError]] = {
    cls.status: cls
    for cls in (
        BadRequest, TokenError, Denied, NotFound, MethodNotAllowed, RequestTimeout, Conflict,
        TooLarge, Unprocessable, TooManyRequests, HeadersTooLarge, Internal, Unsupported,
        BadGateway, Unavailable, GatewayTimeout,
    )
}


def error_for_status(status: int, message: str, *, code: str, **details: Any) -> SidekeyError:
    """A :class:`SidekeyError` of the class that fixes ``status``, with ``code`` and ``details``.

    An HTTP status no class fixes is a local bug (a new status without its class):
    ValueError, which the daemon answers as 500 ``internal`` (fail closed).
    """
    cls = ERROR_CLASS_BY_STATUS.get(status)
    if cls is None:
        raise ValueError(f"no SidekeyError class fixes HTTP status {status}")
    return cls(message, code=code, **details)


class ConfigError(Exception):
    """The configuration is invalid. The message names the file and the path."""


# ---------------------------------------------------------------------------
# Requests


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A verified OAuth2 access token (the user's bearer token), as policy sees it.

    Produced by :mod:`sidekey.oauth` only after signature, issuer, audience and time
    checks passed; ``scopes`` come from ``scope`` (space-separated) or ``scp`` (list).
    """

    issuer: str
    subject: str
    audience: tuple[str, ...]
    scopes: frozenset[str]
    expires_at: int
    client_id: str | None = None
    # The token's other top-level string claims (e.g. a department), for policy.
    string_claims: tuple[tuple[str, str], ...] = ()

    def claim(self, name: str) -> str | None:
        return dict(self.string_claims).get(name)


class _Req(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class AuthorizeRequest(_Req, frozen=True, kw_only=True):
    server: Name
    tool: Name
    user_token: UserToken | None = None
    agent_id: AgentName | None = None
    session_id: Opaque | None = None
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)
    server_version: Annotated[str, Meta(max_length=64)] | None = None
    # The id of an approved approval for exactly this call (after a 202 pending_approval).
    approval_id: ApprovalId | None = None
    # Redeem the token in this same request (the caller is the process that runs the
    # tool): an allow then answers with the lease instead of the token. Every check and
    # both audit records (mcp.authorize, mcp.redeem) are as for the two requests.
    redeem: bool = False


class ApprovalDecisionRequest(_Req, frozen=True, kw_only=True):
    # Required to deny; optional to approve. Recorded in the approval and in audit.
    reason: Annotated[str, Meta(min_length=1, max_length=512)] | None = None


class RedeemRequest(_Req, frozen=True, kw_only=True):
    resolution_token: ResolutionToken
    # Optional: the arguments the tool will run with; if given they must match the
    # digest bound into the token.
    arguments: dict[str, Any] | None = None


ReleaseStatus = Literal["success", "error", "cancelled"]


class ReleaseRequest(_Req, frozen=True, kw_only=True):
    lease_id: Opaque
    status: ReleaseStatus
    duration_ms: Annotated[int, Meta(ge=0, le=86_400_000)] | None = None
    result_size_bytes: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    error: Annotated[str, Meta(max_length=512)] | None = None


class RotateRequest(_Req, frozen=True, kw_only=True):
    """``POST /v1/admin/secrets/{name}/rotate``: exactly one of value / generate."""

    value: Annotated[str, Meta(min_length=1, max_length=64 * 1024)] | None = None
    generate: Annotated[int, Meta(ge=16, le=4096)] | None = None
    backend: Name | None = None
    revoke_leases: bool = False


class IntrospectRequest(_Req, frozen=True, kw_only=True):
    """``POST /v1/introspect``: verify a user's bearer token for ``server``, whose process
    the caller must be attested as. ``token`` is checked for length in the handler (a
    precise ``token_too_large``), not here; the body cap bounds it first."""

    server: Name
    token: Annotated[str, Meta(min_length=1)]


class SessionEndRequest(_Req, frozen=True, kw_only=True):
    """``POST /v1/sessions/end``: the MCP session ``session_id`` (as sent in
    ``authorize``) has ended; stop counting it against ``concurrent_sessions``. The
    user is decided as ``authorize`` decides it, for ``server`` (default: the one
    server the caller is attested as)."""

    session_id: Opaque
    user_token: UserToken | None = None
    server: Name | None = None


class TokenRequest(_Req, frozen=True, kw_only=True):
    """``POST /v1/tokens``: an admin mints a resolution token for a server's peer."""

    server: Name
    tool: Name
    user: Name
    agent_id: AgentName | None = None
    session_id: Opaque | None = None
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)
    ttl_seconds: Annotated[int, Meta(gt=0, le=MAX_TOKEN_TTL_S)] = MAX_TOKEN_TTL_S


# ---------------------------------------------------------------------------
# Responses (encoded only; plain Structs)


class ErrorBody(msgspec.Struct, kw_only=True):
    code: str
    message: str
    request_id: str
    details: dict[str, Any] | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorBody


class DecisionBody(msgspec.Struct, kw_only=True):
    decision: Literal["allow", "deny", "pending_approval"]
    rules_matched: list[str]
    warnings: list[str] = msgspec.field(default_factory=list)


class AuthorizeResponse(msgspec.Struct, kw_only=True):
    decision: Literal["allow", "pending_approval"]
    request_id: str
    resolution_token: str | None = None
    # The token's expiry (allow), or the approval's (pending_approval).
    expires_at: str | None = None
    secrets: list[str] = msgspec.field(default_factory=list)
    policy: DecisionBody
    user_id: str
    # pending_approval (HTTP 202): the held call's approval id and why it is held.
    approval_id: str | None = None
    message: str | None = None
    # An allow asked with "redeem": true: the lease (resolution_token is then null).
    lease: LeaseResponse | None = None


class LeaseResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    lease_id: str
    expires_at: str
    server: str
    tool: str
    secrets: dict[str, str]
    request_id: str
    # Secrets of the call used through egress only (never in ``secrets``; sidekey.egress).
    egress: list[str] = []


class ReleaseResponse(msgspec.Struct, kw_only=True):
    lease_id: str
    state: str
    request_id: str
    # The result is larger than the tool's max_result_size_kb: do not return it.
    withhold_result: bool = False


class IntrospectResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """``POST /v1/introspect`` (always HTTP 200, as RFC 7662): ``active`` true with the
    verified token's facts, or false with the ``code`` (and ``message``) of the check it
    failed. Never carries the token."""

    active: bool
    request_id: str
    server: str
    # inactive
    code: str | None = None
    message: str | None = None
    # active
    sub: str | None = None
    iss: str | None = None
    aud: list[str] | None = None
    audience: str | None = None  # the server's configured audience the token carries
    scopes: list[str] | None = None
    client_id: str | None = None  # the token's client_id, else its azp
    exp: int | None = None  # epoch seconds
    expires_at: str | None = None  # the same instant, ISO-8601 UTC
    claims: dict[str, str] | None = None  # other short top-level string claims, capped


class SessionEndResponse(msgspec.Struct, kw_only=True):
    """``ended``: the session was counted and is not any more; false when it was
    unknown, already ended or gone idle (ending is idempotent)."""

    ended: bool
    session_id: str
    user_id: str
    server: str
    request_id: str


class TokenResponse(msgspec.Struct, kw_only=True):
    resolution_token: str
    jti: str
    expires_at: str
    request_id: str


# ---------------------------------------------------------------------------
# Helpers


def canonical_json(value: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8. Used for argument digests."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def arguments_digest(arguments: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of the tool-call arguments."""
    try:
        return hashlib.sha256(canonical_json(arguments)).hexdigest()
    except (TypeError, ValueError) as exc:
        raise BadRequest("arguments are not canonical JSON", code="bad_arguments") from exc


_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}
_encoder = msgspec.json.Encoder()


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_ONE_BRACKET_KIND = bytes.maketrans(b"{}", b"[]")


def json_too_deep(data: bytes, max_depth: int) -> bool:
    """Whether the JSON text ``data`` nests arrays/objects deeper than ``max_depth``.

    Iterative and at C speed (no recursion, no per-byte Python loop). Almost every
    document has fewer brackets than ``max_depth`` and is answered by two counts.
    Otherwise strings are cut out (escaped backslashes, then escaped quotes removed, so
    the quotes left delimit strings), the brackets kept, and innermost pairs peeled off
    at most ``max_depth`` times; whatever is left is deeper (or unbalanced with that
    many open brackets: refused as well, as a decoder would recurse into it).
    """
    if data.count(b"[") + data.count(b"{") <= max_depth:
        return False
    unescaped = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[0::2])
    brackets = outside.translate(_ONE_BRACKET_KIND, _NOT_BRACKETS)
    if b"[" * (max_depth + 1) in brackets:
        return True  # the usual shape of a deep document: a run of opening brackets
    for depth in range(max_depth + 1):
        if not brackets:
            return False
        peeled = brackets.replace(b"[]", b"")
        if peeled == brackets:  # unbalanced: what is left opens this many more levels
            return depth + brackets.count(b"[") > max_depth
        brackets = peeled
    return True


def decode_body(body: bytes, kind: type[_Req]) -> Any:
    """Decode and validate a JSON request body into ``kind`` or raise :class:`BadRequest`.

    Nesting is checked first (the body holds ``arguments``, which may nest
    :data:`MAX_JSON_DEPTH` levels): 400 ``json_too_deep``, never a RecursionError.
    """
    if json_too_deep(body, MAX_JSON_DEPTH + 1):
        raise BadRequest(
            f"request body nests JSON deeper than {MAX_JSON_DEPTH + 1} levels "
            f"(arguments may nest {MAX_JSON_DEPTH})",
            code="json_too_deep",
        )
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request: {exc}", code="invalid_request") from exc
    except msgspec.DecodeError as exc:
        raise BadRequest("body is not valid JSON", code="invalid_json") from exc
    except RecursionError:  # not reachable after the depth check; kept as a guard
        raise BadRequest("request body nests JSON too deeply", code="json_too_deep") from None


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def error_body(exc: SidekeyError, request_id: str) -> bytes:
    details = exc.details or None
    return encode(
        ErrorResponse(
            error=ErrorBody(code=exc.code, message=exc.message, request_id=request_id, details=details)
        )
    )
