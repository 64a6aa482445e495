"""Per-call downstream tokens from an OAuth 2.0 token endpoint (``type: oauth`` backends).

A secret of ``kind: oauth_token_exchange`` is an access token for the tool's downstream
API, obtained by RFC 8693 token exchange of the user's bearer token — the one the daemon
verified at authorize — so the MCP server acts with *that user's* rights, not with a
shared service key. A secret of ``kind: oauth_client_credentials`` is a machine token
from the client credentials grant (RFC 6749 section 4.4). The grant is a form POST over
httpx (a maintained HTTP/TLS stack; verification always on, no redirects, no proxies
or CA bundles from the environment), checked field by field against the RFCs: no OAuth
library on the daemon's path offers the token-exchange grant with bounded reads.

**Client authentication.** ``client_id`` plus a secret read through another backend
(never written in the config), sent as HTTP Basic (``client_secret_basic``, each part
form-urlencoded first, RFC 6749 section 2.3.1) or in the form (``client_secret_post``).

**Caching.** An issued token is kept in memory (never on disk) until ``expires_in -
refresh_margin_s``, and for an exchanged token never past the subject token's own
``exp``. Keys: the reference's audience, resource, scopes and token types, plus — for
an exchange — the SHA-256 of the subject token itself: one user's token is never
served to another user, nor to another token of the same user (which may carry other
scopes, or have been revoked). A token without ``expires_in`` is not cached. Concurrent
misses for one key share one request (single flight); at most ``max_cached_tokens``
entries (least recently used go first); :meth:`OAuthBackend.run_purger` drops expired
ones.

**Errors** (never with the token, the client secret or the IdP's text verbatim):

==============================  ====  ============================================
``token_exchange_denied``       403   the IdP refused the grant for this user or
                                      target: ``invalid_grant``, ``unauthorized_client``,
                                      ``access_denied``, ``invalid_scope``,
                                      ``invalid_target`` (``details.oauth_error``)
``token_endpoint_refused``      502   the IdP refused sidekey's request itself
                                      (``invalid_client``, ``invalid_request``,
                                      ``unsupported_grant_type``, any other code): fix
                                      the backend's client or parameters
``token_endpoint_unavailable``  503   timeout (``timeout_s``), connection refused,
                                      HTTP 5xx or 429
``token_endpoint_bad_response`` 502   an answer that is not the RFC's: not JSON,
                                      missing/mistyped fields, wrong token type,
                                      larger than 64 KiB, a redirect
``subject_token_required``      403   an exchange without a verified user token
``subject_token_unavailable``   409   a two-step redeem whose user token this daemon
                                      no longer holds (restart, eviction, another
                                      host): authorize again
==============================  ====  ============================================
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_plus

import httpx
import trio

from .. import protocol
from ..expiry import PURGE_INTERVAL_S, ExpiryIndex, run_purger
from . import Backend, SecretValue

if TYPE_CHECKING:
    from ..config import OAuthBackendConfig, SecretRef

log = logging.getLogger(__name__)

GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 - a URN
GRANT_CLIENT_CREDENTIALS = "client_credentials"
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a URN

MAX_RESPONSE_BYTES = 64 * 1024
MAX_ISSUED_TOKEN_CHARS = 16 * 1024
MAX_EXPIRES_IN_S = 366 * 86400
MAX_OAUTH_ERROR_CHARS = 64
MAX_DESCRIPTION_CHARS = 120
TOKEN_DIGEST_CHARS = 16  # hex chars of SHA-256 in audit events: correlation, not the token
# Subject tokens kept for two-step redeems (authorize, then POST /v1/redeem).
SUBJECT_MAX_ENTRIES = 10_000
SUBJECT_MAX_BYTES = 32 * 1024 * 1024
_USER_AGENT = "sidekey-oauth/1"
# check-config --probe sends this as the subject token: the IdP must refuse it.
PROBE_SUBJECT_TOKEN = "sidekey-check-config-probe"  # noqa: S105 - a marker, not a secret

# RFC 6749 section 5.2 / RFC 8693 section 2.2.2 codes that refuse *this grant* for this
# user or target: the caller learns a 403; other codes mean sidekey's request is wrong.
DENIAL_ERRORS = frozenset(
    {"invalid_grant", "unauthorized_client", "access_denied", "invalid_scope", "invalid_target"}
)
# RFC 6749 section 5.2: error and error_description are %x20-21 / %x23-5B / %x5D-7E.
_ERROR_CHARS = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]+")
# A run this long of token characters in an error_description may be an echoed token
# or secret: such a description is not passed on at all.
_TOKENISH = re.compile(r"[A-Za-z0-9_\-.~+/=]{20,}")
_VISIBLE = re.compile(r"[\x21-\x7e]+")


class TokenExchangeDenied(protocol.Denied):
    status = 403
    code = "token_exchange_denied"


class TokenEndpointRefused(protocol.BadGateway):
    status = 502
    code = "token_endpoint_refused"


class TokenEndpointBadResponse(protocol.BadGateway):
    status = 502
    code = "token_endpoint_bad_response"


class TokenEndpointUnavailable(protocol.Unavailable):
    status = 503
    code = "token_endpoint_unavailable"


class SubjectTokenRequired(protocol.Denied):
    status = 403
    code = "subject_token_required"


class SubjectTokenUnavailable(protocol.Conflict):
    status = 409
    code = "subject_token_unavailable"


@dataclass(frozen=True, slots=True, repr=False)
class Subject:
    """The user's verified bearer token, as the subject of a token exchange."""

    token: str
    issuer: str
    subject: str
    expires_at: float  # unix seconds (the token's exp)

    def __repr__(self) -> str:
        return f"Subject(issuer={self.issuer!r}, subject={self.subject!r}, token=<redacted>)"

    __str__ = __repr__

    @property
    def size(self) -> int:
        return len(self.token) + len(self.issuer) + len(self.subject) + 64


def token_digest(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:TOKEN_DIGEST_CHARS]


class SubjectTokens:
    """Verified user tokens held from authorize to the two-step redeem, keyed by the
    resolution token's jti, in memory only (never persisted: after a restart such a
    redeem fails with ``subject_token_unavailable``). Bounded in entries and bytes (the
    oldest go first) and dropped at the resolution token's expiry."""

    def __init__(self, *, max_entries: int = SUBJECT_MAX_ENTRIES,
                 max_bytes: int = SUBJECT_MAX_BYTES) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[Subject, float]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, jti: str, subject: Subject, *, expires_at: float, now: float) -> None:
        # Oldest first: entries share one TTL, so the expired ones are at the front (the
        # daemon's periodic sweep catches any that a TTL change left behind).
        while self._items:
            first, (_, first_exp) = next(iter(self._items.items()))
            if now < first_exp:
                break
            self._drop(first)
        self._drop(jti)
        self._items[jti] = (subject, expires_at)
        self._bytes += subject.size
        while self._items and (len(self._items) > self.max_entries or self._bytes > self.max_bytes):
            self._drop(next(iter(self._items)))

    def pop(self, jti: str, *, now: float) -> Subject | None:
        item = self._items.get(jti)
        self._drop(jti)
        if item is None or now >= item[1]:
            return None
        return item[0]

    def sweep(self, now: float) -> None:
        for jti in [j for j, (_, exp) in self._items.items() if now >= exp]:
            self._drop(jti)

    def _drop(self, jti: str) -> None:
        item = self._items.pop(jti, None)
        if item is not None:
            self._bytes -= item[0].size


_Key = tuple[str, str | None, str | None, tuple[str, ...], str | None, str | None, bytes | None]


def _key(ref: SecretRef, subject: Subject | None) -> _Key:
    digest = hashlib.sha256(subject.token.encode()).digest() if subject is not None else None
    return (ref.kind, ref.audience, ref.resource, tuple(sorted(set(ref.scopes))),
            ref.requested_token_type, ref.subject_token_type, digest)


@dataclass(frozen=True, slots=True, repr=False)
class _Issued:
    value: str
    expires_at: float | None  # clock() seconds after which it is not served; None: not cached
    lifetime_s: float | None  # expires_in as issued
    scopes: tuple[str, ...]
    issued_token_type: str | None
    digest: str

    def __repr__(self) -> str:
        return f"_Issued(digest={self.digest!r}, value=<redacted>)"


class _Flight:
    __slots__ = ("done", "error", "issued")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.issued: _Issued | None = None
        self.error: Exception | None = None


def _form_quote(text: str) -> str:
    return quote_plus(text, safe="")


def _description(raw: Any, secret: str) -> str | None:
    """An error_description safe to pass on: RFC characters, capped, and dropped if it
    carries a token-like run or the client secret (an IdP may echo what it received)."""
    if not isinstance(raw, str) or not raw or not _ERROR_CHARS.fullmatch(raw):
        return None
    if _TOKENISH.search(raw) or (secret and secret in raw):
        return None
    return raw if len(raw) <= MAX_DESCRIPTION_CHARS else raw[: MAX_DESCRIPTION_CHARS - 3] + "..."


class OAuthBackend:
    """A :class:`~sidekey.backends.Backend` whose secrets are tokens from a token endpoint.

    ``secret_backends``: where the client secret is read (the other backends).
    ``clock``: monotonic seconds for cache expiry (trio's clock by default, so tests can
    use an autojump clock); ``wall``: unix seconds, to compare with a subject's ``exp``.
    """

    def __init__(
        self,
        name: str,
        cfg: OAuthBackendConfig,
        *,
        base_dir: Path,
        secret_backends: Mapping[str, Backend],
        clock: Callable[[], float] = trio.current_time,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.base_dir = base_dir
        self._secret_backends = secret_backends
        self._clock = clock
        self._wall = wall
        self._entries: OrderedDict[_Key, _Issued] = OrderedDict()
        self._expiry: ExpiryIndex[_Key] = ExpiryIndex()
        self._inflight: dict[_Key, _Flight] = {}
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        self.requests = 0  # token requests sent (health; tests)
        self._hits = 0
        self._misses = 0
        self._last_error: str | None = None
        if cfg.ca_file:
            ca = base_dir / cfg.ca_file if not Path(cfg.ca_file).is_absolute() else Path(cfg.ca_file)
            try:
                self._ssl = ssl.create_default_context(cafile=str(ca))
            except (OSError, ssl.SSLError) as exc:
                raise protocol.ConfigError(f"ca_file {ca}: cannot load: {exc}") from None
        else:
            self._ssl = ssl.create_default_context()

    def __repr__(self) -> str:
        return f"OAuthBackend(name={self.name!r}, entries={len(self._entries)})"

    # ------------------------------------------------------------------ Backend protocol

    async def fetch(self, ref: SecretRef) -> SecretValue:
        """A client-credentials token for ``ref``. A token exchange needs the user's token:
        :meth:`exchange`; here it is refused (``subject_token_required``)."""
        if ref.kind == "oauth_token_exchange":
            raise SubjectTokenRequired(
                f"secret {ref.label} of backend {self.name} is a token exchange: it needs "
                "the call's verified user token", code="subject_token_required")
        return await self._token(ref, None)

    async def exchange(self, ref: SecretRef, subject: Subject) -> SecretValue:
        """A token for ``ref`` issued to ``subject``'s user by RFC 8693 token exchange."""
        if ref.kind != "oauth_token_exchange":
            return await self._token(ref, None)
        return await self._token(ref, subject)

    async def release(self, lease_id: str) -> None:
        """Nothing to end: issued tokens expire on their own."""

    async def rotate(self, ref: SecretRef, value: str) -> str:
        raise protocol.BadRequest(
            f"secret {ref.label} of backend {self.name} is issued by a token endpoint: "
            "nothing to rotate", code="invalid_request")

    async def health(self) -> dict[str, object]:
        """Counts and the last request's error code; no network call (``check-config
        --probe`` reaches the endpoint), never a token. ``ok`` stays true through an IdP
        outage: it fails the calls that need a token (503), not the daemon's readiness
        for every other tool; ``reachable`` says whether the last request got an answer."""
        return {
            "type": "oauth",
            "ok": True,
            "reachable": self._last_error != TokenEndpointUnavailable.code,
            "token_endpoint": self.cfg.token_endpoint,
            "requests": self.requests,
            "last_error": self._last_error,
            "cache": {"entries": len(self._entries), "hits": self._hits, "misses": self._misses},
        }

    async def aclose(self) -> None:
        self._closed = True
        self._entries.clear()
        self._expiry.clear()
        self._inflight.clear()
        client, self._client = self._client, None
        if client is not None:
            with trio.CancelScope(shield=True):
                await client.aclose()

    # ------------------------------------------------------------------ probe

    async def probe(self, refs: list[SecretRef]) -> list[dict[str, Any]]:
        """``check-config --probe``: reach the token endpoint and authenticate. Client
        credentials secrets are fetched by the probe's own loop; for a token exchange a
        dummy subject token is sent and any OAuth error but ``invalid_client`` (the client
        authenticated, the dummy was refused) counts as reached. Raises the errors of a
        token request."""
        for ref in refs:
            if ref.kind != "oauth_token_exchange":
                continue
            dummy = Subject(token=PROBE_SUBJECT_TOKEN, issuer="", subject="", expires_at=0.0)
            form = self._form(ref, dummy)
            try:
                await self._request(ref, form)
            except TokenExchangeDenied:
                pass
            except TokenEndpointRefused as exc:
                if exc.details.get("oauth_error") == "invalid_client":
                    raise
            break  # one round trip answers for the endpoint and the client
        return []

    # ------------------------------------------------------------------ cache

    async def _token(self, ref: SecretRef, subject: Subject | None) -> SecretValue:
        if self._closed:
            raise TokenEndpointUnavailable(f"backend {self.name!r} is closed")
        key = _key(ref, subject)
        counted = False
        while True:
            issued = self._fresh(key)
            if issued is not None:
                if not counted:
                    self._hits += 1
                return self._value(ref, issued, cached=True)
            if not counted:
                self._misses += 1
                counted = True
            flight = self._inflight.get(key)
            if flight is None:
                flight = self._inflight[key] = _Flight()
                return self._value(ref, await self._lead(key, ref, subject, flight), cached=False)
            await flight.done.wait()
            if flight.error is not None:
                shared = _copy(flight.error)
                if shared is flight.error:
                    raise shared
                raise shared from flight.error
            if flight.issued is not None:
                return self._value(ref, flight.issued, cached=True)
            # The leader was cancelled: the first waiter here leads the next request.

    def _fresh(self, key: _Key) -> _Issued | None:
        issued = self._entries.get(key)
        if issued is None:
            return None
        if issued.expires_at is not None and self._clock() < issued.expires_at:
            self._entries.move_to_end(key)
            return issued
        del self._entries[key]
        return None

    async def _lead(self, key: _Key, ref: SecretRef, subject: Subject | None,
                    flight: _Flight) -> _Issued:
        try:
            issued = await self._obtain(ref, subject)
        except Exception as exc:
            flight.error = exc
            raise
        else:
            flight.issued = issued
            if issued.expires_at is not None and not self._closed \
                    and self._inflight.get(key) is flight:
                self._entries[key] = issued
                self._entries.move_to_end(key)
                self._expiry.add(issued.expires_at, key)
                while len(self._entries) > self.cfg.max_cached_tokens:
                    self._entries.popitem(last=False)
                if len(self._expiry) > 2 * self.cfg.max_cached_tokens:
                    self._expiry.rebuild(
                        (e.expires_at, k) for k, e in self._entries.items() if e.expires_at)
            return issued
        finally:
            if self._inflight.get(key) is flight:
                del self._inflight[key]
            flight.done.set()

    def purge_expired(self) -> int:
        now = self._clock()
        dropped = 0
        for key in self._expiry.due(now):
            issued = self._entries.get(key)
            if issued is not None and issued.expires_at is not None and now >= issued.expires_at:
                del self._entries[key]
                dropped += 1
        return dropped

    async def run_purger(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await run_purger(self.purge_expired, interval_s=PURGE_INTERVAL_S, task_status=task_status)

    def _value(self, ref: SecretRef, issued: _Issued, *, cached: bool) -> SecretValue:
        remaining = None
        if issued.expires_at is not None:
            # A lease never outlives its token (calls.py ends the lease at lease_ttl_s).
            remaining = max(1, math.floor(issued.expires_at + self.cfg.refresh_margin_s
                                          - self._clock()))
        elif issued.lifetime_s is not None:
            remaining = max(1, math.floor(issued.lifetime_s))
        facts: dict[str, Any] = {
            "kind": ref.kind,
            "audience": ref.audience,
            "resource": ref.resource,
            "scopes": list(issued.scopes),
            "cached": cached,
            "token_sha256": issued.digest.removeprefix("sha256:"),
        }
        return SecretValue(value=issued.value, version=issued.digest, lease_ttl_s=remaining,
                           audit={k: v for k, v in facts.items() if v is not None})

    # ------------------------------------------------------------------ the grant

    def _form(self, ref: SecretRef, subject: Subject | None) -> dict[str, str]:
        form: dict[str, str] = {}
        if subject is not None:
            form["grant_type"] = GRANT_TOKEN_EXCHANGE
            form["subject_token"] = subject.token
            form["subject_token_type"] = ref.subject_token_type or TOKEN_TYPE_ACCESS_TOKEN
            form["requested_token_type"] = ref.requested_token_type or TOKEN_TYPE_ACCESS_TOKEN
        else:
            form["grant_type"] = GRANT_CLIENT_CREDENTIALS
        if ref.audience is not None:
            form["audience"] = ref.audience
        if ref.resource is not None:
            form["resource"] = ref.resource
        if ref.scopes:
            form["scope"] = " ".join(ref.scopes)
        return form

    async def _obtain(self, ref: SecretRef, subject: Subject | None) -> _Issued:
        started = self._clock()
        doc = await self._request(ref, self._form(ref, subject))
        issued = self._parse(ref, doc, subject, started)
        self._last_error = None
        return issued

    async def _client_secret(self) -> str:
        ref = self.cfg.client_secret
        backend = self._secret_backends.get(ref.backend)
        if backend is None:  # config checks refuse this; guard anyway
            raise TokenEndpointRefused(f"backend {self.name}: no backend {ref.backend!r} for "
                                       "the client secret", code="token_endpoint_refused")
        return (await backend.fetch(ref)).value

    async def _request(self, ref: SecretRef, form: dict[str, str]) -> dict[str, Any]:
        """POST the form; the decoded JSON object of a 200, else raise the mapped error."""
        where = f"token endpoint of backend {self.name}"
        timeout = self.cfg.timeout_s
        secret = ""
        try:
            with trio.fail_after(timeout):
                secret = await self._client_secret()
                headers = {"Accept": "application/json",
                           "Content-Type": "application/x-www-form-urlencoded"}
                body = dict(form)
                if self.cfg.client_auth == "client_secret_basic":
                    pair = f"{_form_quote(self.cfg.client_id)}:{_form_quote(secret)}"
                    headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
                else:
                    body["client_id"] = self.cfg.client_id
                    body["client_secret"] = secret
                encoded = "&".join(f"{_form_quote(k)}={_form_quote(v)}" for k, v in body.items())
                if self._client is None:
                    self._client = httpx.AsyncClient(
                        timeout=timeout, follow_redirects=False, trust_env=False,
                        verify=self._ssl, headers={"User-Agent": _USER_AGENT})
                self.requests += 1
                status, raw = await self._post(encoded.encode(), headers)
        except trio.TooSlowError:
            raise self._fail(TokenEndpointUnavailable(
                f"{where} did not answer within {timeout:g} s",
                code="token_endpoint_unavailable")) from None
        except httpx.HTTPError as exc:
            raise self._fail(TokenEndpointUnavailable(
                f"{where}: {exc.__class__.__name__}", code="token_endpoint_unavailable")) from None
        if status >= 500 or status == 429:
            raise self._fail(TokenEndpointUnavailable(
                f"{where} answered HTTP {status}", code="token_endpoint_unavailable",
                http_status=status))
        doc = self._json(raw, status, where) if raw is not None else None
        if status == 200:
            if doc is None:
                raise self._fail(TokenEndpointBadResponse(
                    f"{where}: the answer is larger than {MAX_RESPONSE_BYTES} bytes",
                    code="token_endpoint_bad_response"))
            return doc
        if status in (400, 401, 403) and doc is not None and isinstance(doc.get("error"), str):
            error = doc["error"]
            if not _ERROR_CHARS.fullmatch(error) or len(error) > MAX_OAUTH_ERROR_CHARS:
                raise self._fail(TokenEndpointBadResponse(
                    f"{where} answered HTTP {status} with a malformed error code",
                    code="token_endpoint_bad_response"))
            details: dict[str, Any] = {"oauth_error": error}
            described = _description(doc.get("error_description"), secret)
            if described is not None:
                details["oauth_error_description"] = described
            if error in DENIAL_ERRORS:
                raise self._fail(TokenExchangeDenied(
                    f"the token endpoint refused the grant for {ref.label}: {error}",
                    code="token_exchange_denied", **details))
            raise self._fail(TokenEndpointRefused(
                f"{where} refused sidekey's request: {error}; check the backend's client "
                "credentials and the secret's parameters", code="token_endpoint_refused",
                **details))
        hint = " (redirects are not followed)" if 300 <= status < 400 else ""
        raise self._fail(TokenEndpointBadResponse(
            f"{where} answered HTTP {status} without an OAuth error{hint}",
            code="token_endpoint_bad_response", http_status=status))

    async def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes | None]:
        """(status, body) with the body capped (None: over the cap)."""
        if self._client is None:  # pragma: no cover - _request creates it first
            raise TokenEndpointUnavailable("no HTTP client", code="token_endpoint_unavailable")
        buf = bytearray()
        async with self._client.stream("POST", self.cfg.token_endpoint, content=body,
                                       headers=headers) as response:
            async for chunk in response.aiter_bytes():
                buf += chunk
                if len(buf) > MAX_RESPONSE_BYTES:
                    return response.status_code, None
            return response.status_code, bytes(buf)

    def _json(self, raw: bytes, status: int, where: str) -> dict[str, Any] | None:
        from ..oauth import _strict_json

        try:
            doc = _strict_json(raw)
        except (ValueError, UnicodeDecodeError):
            if status == 200:
                raise self._fail(TokenEndpointBadResponse(
                    f"{where}: the answer is not JSON", code="token_endpoint_bad_response")) from None
            return None
        if not isinstance(doc, dict):
            if status == 200:
                raise self._fail(TokenEndpointBadResponse(
                    f"{where}: the answer is not a JSON object", code="token_endpoint_bad_response"))
            return None
        return doc

    def _fail(self, exc: protocol.SidekeyError) -> protocol.SidekeyError:
        self._last_error = exc.code
        return exc

    def _parse(self, ref: SecretRef, doc: dict[str, Any], subject: Subject | None,
               started: float) -> _Issued:
        """RFC 8693 section 2.2.1 / RFC 6749 section 5.1, strictly."""
        where = f"token endpoint of backend {self.name}"

        def bad(problem: str) -> protocol.SidekeyError:
            return self._fail(TokenEndpointBadResponse(f"{where}: {problem}",
                                                       code="token_endpoint_bad_response"))

        token = doc.get("access_token")
        if not isinstance(token, str) or not token or len(token) > MAX_ISSUED_TOKEN_CHARS \
                or not _VISIBLE.fullmatch(token):
            raise bad("access_token is missing, empty, too long or not printable ASCII")
        requested = ref.requested_token_type or TOKEN_TYPE_ACCESS_TOKEN
        issued_type = doc.get("issued_token_type")
        if subject is not None:
            if not isinstance(issued_type, str):
                raise bad("issued_token_type is missing (RFC 8693 section 2.2.1)")
            if issued_type != requested:
                raise bad(f"issued_token_type is {issued_type[:80]!r}, not the requested "
                          f"{requested!r}")
        elif issued_type is not None and not isinstance(issued_type, str):
            raise bad("issued_token_type is not a string")
        token_type = doc.get("token_type")
        if not isinstance(token_type, str):
            raise bad("token_type is missing")
        bearer = token_type.lower() == "bearer"
        if not bearer and not (subject is not None and token_type == "N_A"  # noqa: S105
                               and requested != TOKEN_TYPE_ACCESS_TOKEN):
            raise bad(f"token_type {token_type[:40]!r} is not Bearer: sidekey hands out "
                      "bearer tokens only")
        expires_in = doc.get("expires_in")
        if expires_in is not None and (
            isinstance(expires_in, bool) or not isinstance(expires_in, int | float)
            or not math.isfinite(expires_in) or not 0 < expires_in <= MAX_EXPIRES_IN_S
        ):
            raise bad(f"expires_in is not a number of seconds in 1..{MAX_EXPIRES_IN_S}")
        scope = doc.get("scope")
        if scope is not None and (not isinstance(scope, str) or len(scope) > 4096):
            raise bad("scope is not a string")
        scopes = tuple(scope.split()) if scope is not None else tuple(ref.scopes)
        expires_at: float | None = None
        if expires_in is not None:
            # From when the request was sent: the token's clock started at most then.
            expires_at = started + float(expires_in) - self.cfg.refresh_margin_s
            if subject is not None:
                expires_at = min(expires_at, started + subject.expires_at - self._wall()
                                 - self.cfg.refresh_margin_s)
            if expires_at <= self._clock():
                expires_at = None  # too short-lived to cache: used for this call only
        return _Issued(value=token, expires_at=expires_at,
                       lifetime_s=float(expires_in) if expires_in is not None else None,
                       scopes=scopes,
                       issued_token_type=issued_type if isinstance(issued_type, str) else None,
                       digest=token_digest(token))


def _copy(exc: Exception) -> Exception:
    """A copy of a shared error for one more waiter (see backends.cache._shared_error)."""
    import copy

    try:
        clone = copy.copy(exc)
    except Exception:
        return exc
    return clone if type(clone) is type(exc) else exc
