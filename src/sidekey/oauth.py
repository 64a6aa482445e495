"""OAuth2 access tokens: verify the user's bearer token (a JWT) for one MCP server.

An MCP server that declares ``oauth2:`` hands sidekey the bearer token its user
presented. :class:`OAuthVerifier` checks it against that server's configured issuer
and returns an :class:`~sidekey.protocol.AccessToken`, or raises
:class:`~sidekey.protocol.TokenError` (401; 403 for a token meant for another
audience) or :class:`~sidekey.protocol.Unavailable` (503: no signing keys can be had).

Keys come from the issuer's JWKS: a local file (``jwks_file``, for air-gapped hosts,
reloaded when it changes), an explicit ``jwks_uri``, or the ``jwks_uri`` named by the
issuer's discovery document (OpenID Connect Discovery, then RFC 8414). Fetches go
through ``httpx`` (https only, except for loopback hosts; no redirects; bodies capped;
every wait bounded), are cached for ``jwks_ttl_s`` and coalesced: concurrent callers
that need a refresh share one fetch. An unknown ``kid`` refreshes at most once per
``refresh_min_interval_s``; a failed refresh keeps the keys already cached.

The algorithm comes from the token header but must be both pinned by the server's
configuration and one of RS256/ES256/EdDSA, and the key found by ``kid`` must be of
the type that algorithm needs, so ``none``, HMAC and key-confusion tokens are refused
before any signature check. Header and payload are decoded once, strictly (strict
base64url, JSON objects, no duplicate names), and the signature is checked with
pyjwt's algorithm objects on the exact bytes received.

Verified tokens are cached (bounded LRU) until their ``exp``: an agent presents the
same bearer token for many calls, and a signature check costs far more than a hash.
The cache holds the token's SHA-256 (never the token) and the :class:`AccessToken`
made from its claims (subject, audience, scopes, client id, short string claims); the
daemon's purge task (:meth:`OAuthVerifier.run_purger`) drops an entry at most
:data:`~sidekey.expiry.PURGE_INTERVAL_S` after its ``exp``, looked up again or not.
An entry remembers the key-set generation it was verified under and is never used
once that issuer's key set has changed.

Error codes (``TokenError``, 401 unless noted):

==========================  ==========================================================
``token_malformed``         not a compact JWS, bad base64url/JSON/UTF-8, duplicate
                            names, longer than 16 KiB
``token_forbidden_header``  ``crit``, ``jku``, ``x5u``, ``jwk``, ``x5c`` (or ``b64``,
                            ``zip``, ``enc``) in the header
``token_wrong_algorithm``   ``alg`` not pinned for the server or not RS256/ES256/EdDSA
                            (``none``, HS*), or not the algorithm of the ``kid``'s key
``token_unknown_key``       no ``kid``, or a ``kid`` the issuer does not publish (after
                            at most one rate-limited refresh)
``token_bad_signature``     the signature does not verify
``token_claims_invalid``    ``iss``/``exp``/``aud``/``sub`` missing or mistyped,
                            ``scope``/``scp``/``client_id``/``azp`` mistyped, a time
                            claim (``exp``, ``nbf``, ``iat``, ``auth_time``) not a
                            finite number in 0..253402300799 (year 9999)
``issuer_mismatch``         ``iss`` is not the configured issuer
``audience_mismatch``       (403) ``aud`` does not contain the configured audience
``token_expired``           ``exp`` + leeway is past
``token_not_yet_valid``     ``nbf`` or ``iat`` is beyond now + leeway
==========================  ==========================================================

``Unavailable`` (503) ``jwks_unavailable``: no keys for the issuer could be loaded (the
message says why: unreachable, timeout, HTTP status, redirect, insecure URL, bad
discovery document or JWKS, missing file).
"""

from __future__ import annotations

import binascii
import hashlib
import json
import logging
import math
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import trio
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from .config import OAuth2Config
from .encoding import b64url_decode
from .expiry import PURGE_INTERVAL_S, ExpiryIndex, run_purger
from .protocol import (
    MAX_JSON_DEPTH,
    MAX_TIMESTAMP,
    AccessToken,
    TokenError,
    Unavailable,
    json_too_deep,
)

log = logging.getLogger(__name__)


class AudienceMismatch(TokenError):
    """A valid token meant for another audience: 403, not 401 (the user is known; the
    token is not for this server). Still a :class:`TokenError` (audited token.rejected)."""

    status = 403
    code = "audience_mismatch"


# Plain string claims kept on a verified token for policy (e.g. a department claim).
MAX_STRING_CLAIMS = 32
MAX_STRING_CLAIM = 256

# --------------------------------------------------------------------------- limits

MAX_TOKEN_CHARS = 16 * 1024
MAX_DOCUMENT_BYTES = 1024 * 1024  # discovery documents and JWKS
MAX_JWKS_KEYS = 100
MIN_RSA_BITS = 2048
# A local JWKS file is re-stat'ed at most this often (a stat is cheap, but it is a
# thread hop, and the file only changes when an operator deploys a new one).
FILE_CHECK_INTERVAL_S = 1.0
# With no keys at all, a failed fetch is retried no sooner than this (or the refresh
# interval if shorter): callers get a fast 503 instead of each waiting on a dead issuer.
NO_KEYS_RETRY_S = 2.0
# A discovered jwks_uri is trusted this long before the discovery document is re-read.
DISCOVERY_TTL_S = 3600.0
MAX_CLAIM_REPR = 120

SUPPORTED_ALGORITHMS = frozenset({"RS256", "ES256", "EdDSA"})
# Header parameters that would make the token choose or extend its own verification.
FORBIDDEN_HEADERS = frozenset({"crit", "jku", "x5u", "jwk", "x5c", "b64", "zip", "enc"})
# JWK members that only a private key has: a JWKS publishing them is misconfigured and
# such a key is never used (pyjwt would load it as a private key).
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_PRIVATE_REASON = "carries private or symmetric key material (never used; fix the JWKS)"

_ALGORITHMS: dict[str, Any] = jwt.algorithms.get_default_algorithms()
_USER_AGENT = "sidekey-oauth/1"


# --------------------------------------------------------------------------- small helpers


class _FetchError(Exception):
    """Keys could not be obtained from a source; the message says why (no secrets)."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise ValueError(f"duplicate member {name!r}")
        out[name] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _strict_json(data: bytes) -> Any:
    """UTF-8 JSON with duplicate member names, NaN/Infinity and nesting deeper than
    :data:`~sidekey.protocol.MAX_JSON_DEPTH` refused (json.loads recurses: a token or a
    JWKS document of nested brackets must be malformed, not a RecursionError). Raises
    ValueError."""
    if json_too_deep(data, MAX_JSON_DEPTH):
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    # Decode first: json.loads(bytes) would also accept UTF-16/32, which JWTs never are.
    text = data.decode("utf-8")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except RecursionError:  # not reachable after the depth check; kept as a guard
        raise ValueError("nested too deeply") from None


def _is_text(value: Any, *, max_len: int = 1024) -> bool:
    """A non-empty string that survives UTF-8 encoding (JSON allows lone surrogates)."""
    if not isinstance(value, str) or not value or len(value) > max_len:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _show(value: Any) -> str:
    """A claim value for an error message: repr'd and truncated (it is remote input)."""
    text = repr(value)
    return text if len(text) <= MAX_CLAIM_REPR else text[: MAX_CLAIM_REPR - 3] + "..."


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    )


def _is_time(value: Any) -> bool:
    """A NumericDate sidekey can compute and print with: finite, 0..year 9999 (a larger
    ``exp`` would overflow datetime where the call is audited)."""
    return _is_number(value) and 0 <= value <= MAX_TIMESTAMP


def _verify_signature(alg: str, key: Any, signing_input: bytes, signature: bytes) -> bool:
    """Check one JWS signature with pyjwt's algorithm object for ``alg``.

    A module-level function so the tests can count signature checks.
    """
    algorithm = _ALGORITHMS[alg]
    try:
        return bool(algorithm.verify(signing_input, key, signature))
    except (ValueError, TypeError, jwt.PyJWTError):
        return False


def check_url(url: str, *, allow_http_hosts: frozenset[str], what: str) -> None:
    """Refuse a URL sidekey must not fetch: not https (loopback http aside), credentials
    in it, a fragment, or no host. Raises :class:`_FetchError`; nothing is sent."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        raise _FetchError(f"{what} {url!r} is not a valid URL") from exc
    if not host:
        raise _FetchError(f"{what} {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise _FetchError(f"{what} must not carry credentials in the URL")
    if parts.fragment:
        raise _FetchError(f"{what} {url!r} must not have a fragment")
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and host in allow_http_hosts:
        return
    allowed = ", ".join(sorted(allow_http_hosts)) or "none"
    raise _FetchError(
        f"{what} {url!r} must use https (plain http is allowed only for: {allowed})"
    )


def discovery_urls(issuer: str) -> list[tuple[str, str]]:
    """The metadata URLs to try for ``issuer``, in order, as (label, url).

    OpenID Connect Discovery appends ``/.well-known/openid-configuration`` to the issuer;
    RFC 8414 inserts ``/.well-known/oauth-authorization-server`` between the host and the
    issuer's path (if any).
    """
    parts = urlsplit(issuer)
    if parts.query or parts.fragment:
        raise _FetchError(f"issuer {issuer!r} must not have a query or fragment (RFC 8414)")
    oidc = issuer.rstrip("/") + "/.well-known/openid-configuration"
    path = parts.path.rstrip("/")
    rfc8414 = f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{path}"
    return [("OpenID Connect discovery", oidc), ("RFC 8414 metadata", rfc8414)]


# --------------------------------------------------------------------------- key sets


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    alg: str
    key: Any  # a cryptography public key object, ready for pyjwt's Algorithm.verify

    def __repr__(self) -> str:  # never show key material
        return f"_Key(kid={self.kid!r}, alg={self.alg!r})"


@dataclass(frozen=True, slots=True)
class _KeySet:
    by_kid: Mapping[str, Mapping[str, _Key]]  # kid -> alg -> key
    fingerprint: str  # SHA-256 over the accepted public JWKs: changes iff the key set does

    def kids(self) -> list[str]:
        return sorted(self.by_kid)


def _alg_for_jwk(jwk: Mapping[str, Any]) -> str | None:
    """The one algorithm a JWK may verify, from its type and curve; None if unsupported."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        return "RS256"
    if kty == "EC" and crv == "P-256":
        return "ES256"
    if kty == "OKP" and crv == "Ed25519":
        return "EdDSA"
    return None


def _key_fits(alg: str, key: Any) -> bool:
    if alg == "RS256":
        return isinstance(key, RSAPublicKey) and key.key_size >= MIN_RSA_BITS
    if alg == "ES256":
        return isinstance(key, EllipticCurvePublicKey) and isinstance(key.curve, SECP256R1)
    if alg == "EdDSA":
        return isinstance(key, Ed25519PublicKey)
    return False


def parse_jwks(doc: Any, *, where: str) -> _KeySet:
    """Parse a JWKS document into the signing keys sidekey can use.

    Keys are skipped (and logged) when their ``use`` is not ``sig``, their ``key_ops``
    exclude ``verify``, they lack a ``kid``, carry private members, declare an ``alg``
    other than the one their type fits, or are of an unsupported type or size. Raises
    :class:`_FetchError` if the document is not a JWKS or no key is usable.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise _FetchError(f"{where} is not a JWKS (a JSON object with a 'keys' array)")
    raw_keys: list[Any] = doc["keys"]
    if len(raw_keys) > MAX_JWKS_KEYS:
        raise _FetchError(f"{where} has {len(raw_keys)} keys (at most {MAX_JWKS_KEYS})")
    by_kid: dict[str, dict[str, _Key]] = {}
    accepted: list[Any] = []
    skipped: list[str] = []
    for index, jwk in enumerate(raw_keys):
        reason = _unusable(jwk)
        alg = _alg_for_jwk(jwk) if reason is None else None
        if reason is None and alg is None:  # _unusable refuses these already; never use one
            reason = "has an unsupported key type"
        if alg is not None:
            try:
                key = jwt.PyJWK(jwk, algorithm=alg).key
            except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
                key, reason = None, f"cannot be loaded ({exc.__class__.__name__})"
            if reason is None and not _key_fits(alg, key):
                reason = f"is not a usable {alg} public key (RSA keys need {MIN_RSA_BITS} bits)"
            if reason is None:
                kid = jwk["kid"]
                if alg in by_kid.get(kid, {}):
                    reason = f"repeats kid {kid!r} for {alg}"
                else:
                    by_kid.setdefault(kid, {})[alg] = _Key(kid=kid, alg=alg, key=key)
                    accepted.append({k: jwk[k] for k in sorted(jwk) if k not in ("use", "key_ops")})
                    continue
        label = jwk.get("kid") if isinstance(jwk, dict) else None
        skipped.append(f"key {index} (kid {label!r}) {reason}")
    for line in skipped:
        # Published private or symmetric key material is an issuer misconfiguration
        # worth an operator's attention; other skipped keys are routine (encryption keys).
        level = logging.WARNING if line.endswith(_PRIVATE_REASON) else logging.INFO
        log.log(level, "%s: ignoring %s", where, line)
    if not by_kid:
        detail = f": {'; '.join(skipped)}" if skipped else ""
        raise _FetchError(f"{where} has no usable signing keys (RS256/ES256/EdDSA){detail}")
    fingerprint = hashlib.sha256(
        json.dumps(accepted, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    return _KeySet(by_kid=by_kid, fingerprint=fingerprint)


def _unusable(jwk: Any) -> str | None:
    """Why a JWK is not a signing key sidekey will use, or None if it may be."""
    if not isinstance(jwk, dict):
        return "is not a JSON object"
    if _PRIVATE_JWK_MEMBERS & jwk.keys():
        return _PRIVATE_REASON
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > 256:
        return "has no kid"
    use = jwk.get("use")
    if use is not None and use != "sig":
        return f"has use {_show(use)}, not 'sig'"
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return "has key_ops without 'verify'"
    alg = _alg_for_jwk(jwk)
    if alg is None:
        return f"has unsupported type {_show(jwk.get('kty'))}/{_show(jwk.get('crv'))}"
    declared = jwk.get("alg")
    if declared is not None and declared != alg:
        return f"declares alg {_show(declared)}, but sidekey uses {jwk.get('kty')} keys for {alg} only"
    return None


# --------------------------------------------------------------------------- per-issuer state


@dataclass(eq=False, slots=True)
class _Source:
    """One issuer's key source (file, URI or discovery) and what was loaded from it."""

    issuer: str
    kind: str  # "jwks_file" | "jwks_uri" | "discovery"
    location: str  # the file path, the jwks_uri, or the issuer (discovery)
    keys: _KeySet | None = None
    generation: int = 0
    fetched_at: float | None = None  # clock() of the last successful load
    checked_at: float | None = None  # clock() of the last completed attempt (ok or not)
    last_error: str | None = None
    last_error_at: float | None = None
    inflight: trio.Event | None = None
    discovered_uri: str | None = None
    discovered_at: float | None = None
    file_signature: tuple[int, int, int] | None = None  # (ino, size, mtime_ns)
    fetches: int = 0


@dataclass(frozen=True, slots=True)
class _CacheEntry:
    token: AccessToken
    source: _Source
    generation: int
    alg: str


@dataclass(slots=True)
class _Parsed:
    alg: str
    kid: str
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


# --------------------------------------------------------------------------- the verifier


class OAuthVerifier:
    """Verifies OAuth2 bearer tokens (JWTs) against each MCP server's configured issuer.

    One instance serves every server; keys are kept per issuer and key source.
    ``clock`` returns unix seconds and drives token times, caches and refresh limits;
    network waits are bounded by ``fetch_timeout_s`` in trio time.
    """

    def __init__(
        self,
        *,
        base_dir: Path,
        clock: Callable[[], float] = time.time,
        fetch_timeout_s: float = 5.0,
        refresh_min_interval_s: float = 30.0,
        jwks_ttl_s: float = 300.0,
        leeway_s: int = 30,
        cache_size: int = 10_000,
        allow_http_hosts: frozenset[str] = frozenset({"127.0.0.1", "::1", "localhost"}),
    ) -> None:
        if fetch_timeout_s <= 0 or refresh_min_interval_s < 0 or jwks_ttl_s <= 0:
            raise ValueError("fetch_timeout_s and jwks_ttl_s must be > 0, refresh interval >= 0")
        if leeway_s < 0 or cache_size < 0:
            raise ValueError("leeway_s and cache_size must be >= 0")
        self.base_dir = base_dir
        self.clock = clock
        self.fetch_timeout_s = fetch_timeout_s
        self.refresh_min_interval_s = refresh_min_interval_s
        self.jwks_ttl_s = jwks_ttl_s
        self.leeway_s = leeway_s
        self.cache_size = cache_size
        self.allow_http_hosts = allow_http_hosts
        self._sources: dict[tuple[str, str, str], _Source] = {}
        self._cache: OrderedDict[tuple[bytes, str, str], _CacheEntry] = OrderedDict()
        # Cache keys by the token's exp, soonest first, for purge_expired().
        self._expiry: ExpiryIndex[tuple[bytes, str, str]] = ExpiryIndex()
        self._client: httpx.AsyncClient | None = None
        self._closed = False
        self._file_limiter = trio.CapacityLimiter(2)

    # ------------------------------------------------------------------ public

    async def verify(self, token: str, oauth: OAuth2Config) -> AccessToken:
        """Verify ``token`` for a server configured with ``oauth``.

        Returns the :class:`AccessToken` (subject, audience, scopes, expiry, client id).
        Raises :class:`TokenError` with a ``code`` (see the module's error table; status
        403 for ``audience_mismatch``) or :class:`Unavailable` (``jwks_unavailable``)
        when no signing keys for the issuer can be had. Messages never contain the token.
        """
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise TokenError(
                f"bearer token is empty or longer than {MAX_TOKEN_CHARS} characters",
                code="token_malformed",
            )
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError:
            raise TokenError("bearer token is not a JWT (non-ASCII)", code="token_malformed") from None
        source = self._source(oauth)
        digest = hashlib.sha256(raw).digest()
        cache_key = (digest, oauth.issuer, oauth.audience)

        entry = self._cache.get(cache_key)
        if entry is not None:
            hit = await self._cache_hit(cache_key, entry, source, oauth)
            if hit is not None:
                return hit

        parsed = self._parse(token, oauth)
        key = await self._key_for(source, parsed.kid, parsed.alg)
        if not _verify_signature(parsed.alg, key.key, parsed.signing_input, parsed.signature):
            raise TokenError(
                f"bearer token signature does not verify under key {parsed.kid!r} of "
                f"{oauth.issuer}; the token was altered or not issued by this issuer",
                code="token_bad_signature",
            )
        access = self._check_claims(parsed.claims, oauth)
        if self.cache_size > 0:
            # No await since _key_for: source.generation is the one ``key`` came from.
            self._cache[cache_key] = _CacheEntry(
                token=access, source=source, generation=source.generation, alg=parsed.alg
            )
            self._cache.move_to_end(cache_key)
            self._expiry.add(access.expires_at, cache_key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            if len(self._expiry) > 2 * self.cache_size:
                # Items of evicted or replaced entries pile up under churn: rebuild from
                # the live entries, O(n) once per cache_size insertions.
                self._expiry.rebuild((e.token.expires_at, k) for k, e in self._cache.items())
        return access

    async def probe(self, oauth: OAuth2Config) -> tuple[str, str, list[str]]:
        """Load the issuer's signing keys as a token verification would (JWKS file, jwks_uri
        or discovery; bounded by ``fetch_timeout_s``): ``(source kind, location, kids)``.
        For ``check-config --probe``. Raises :class:`Unavailable` (``jwks_unavailable``)
        naming the issuer and why."""
        source = self._source(oauth)
        keys = await self._ensure_keys(source, want=None)
        return source.kind, source.location, keys.kids()

    def purge_expired(self) -> int:
        """Drop every cached token whose ``exp`` has passed (a hit needs ``now < exp``,
        so such an entry is never served again); return how many were dropped."""
        now = self.clock()
        dropped = 0
        for key in self._expiry.due(now):
            entry = self._cache.get(key)
            if entry is not None and now >= entry.token.expires_at:
                del self._cache[key]
                dropped += 1
        return dropped

    async def run_purger(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run :meth:`purge_expired` every :data:`~sidekey.expiry.PURGE_INTERVAL_S` (trio
        time) until cancelled; the daemon starts it."""
        await run_purger(self.purge_expired, interval_s=PURGE_INTERVAL_S,
                         task_status=task_status)

    def status(self) -> dict[str, Any]:
        """Per issuer key source: kind, location, key ids, fetch times, last error and
        cached-token count; plus the cache totals. Never contains key material."""
        now = self.clock()
        per_source: dict[int, int] = {}
        for entry in self._cache.values():
            if entry.token.expires_at > now and entry.generation == entry.source.generation:
                per_source[id(entry.source)] = per_source.get(id(entry.source), 0) + 1
        issuers = []
        for src in self._sources.values():
            keys = src.keys
            issuers.append(
                {
                    "issuer": src.issuer,
                    "source": src.kind,
                    "location": src.location,
                    "jwks_uri": src.discovered_uri if src.kind == "discovery" else None,
                    "key_ids": keys.kids() if keys else [],
                    "algorithms": sorted({a for m in keys.by_kid.values() for a in m})
                    if keys
                    else [],
                    "generation": src.generation,
                    "fetched_at": src.fetched_at,
                    "checked_at": src.checked_at,
                    "fetches": src.fetches,
                    "last_error": src.last_error,
                    "last_error_at": src.last_error_at,
                    "cached_tokens": per_source.get(id(src), 0),
                }
            )
        return {
            "issuers": issuers,
            "cache": {"size": len(self._cache), "max": self.cache_size},
        }

    async def aclose(self) -> None:
        """Close the HTTP client. Cached keys keep verifying; no fetch happens after this."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # ------------------------------------------------------------------ cache

    async def _cache_hit(
        self,
        cache_key: tuple[bytes, str, str],
        entry: _CacheEntry,
        source: _Source,
        oauth: OAuth2Config,
    ) -> AccessToken | None:
        if self.clock() >= entry.token.expires_at or entry.source is not source:
            self._cache.pop(cache_key, None)
            return None
        if entry.alg not in oauth.algorithms:
            return None  # another server with a narrower pin: verify afresh (and refuse)
        # Keep the key set as fresh as for a full verification (a revoked key must stop
        # working within jwks_ttl_s), but do not check the signature again.
        try:
            await self._ensure_keys(source, want=None)
        except Unavailable:
            return None
        if source.generation != entry.generation:
            self._cache.pop(cache_key, None)
            return None
        if cache_key in self._cache:  # another task may have evicted it while we waited
            self._cache.move_to_end(cache_key)
        return entry.token

    # ------------------------------------------------------------------ parsing and claims

    def _parse(self, token: str, oauth: OAuth2Config) -> _Parsed:
        malformed = TokenError(
            "bearer token is not a well-formed JWS compact JWT (header.payload.signature)",
            code="token_malformed",
        )
        if token.count(".") != 2:
            raise malformed
        header_b64, payload_b64, signature_b64 = token.split(".")
        if not header_b64 or not payload_b64:
            raise malformed
        try:
            header = _strict_json(b64url_decode(header_b64))
            payload = b64url_decode(payload_b64)
            signature = b64url_decode(signature_b64)
            claims = _strict_json(payload)
        except (ValueError, binascii.Error):
            raise malformed from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise malformed
        forbidden = sorted(FORBIDDEN_HEADERS & header.keys())
        if forbidden:
            raise TokenError(
                f"bearer token header carries {', '.join(forbidden)}: sidekey never lets a "
                "token choose or extend its own verification",
                code="token_forbidden_header",
            )
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in SUPPORTED_ALGORITHMS or alg not in oauth.algorithms:
            pinned = [a for a in oauth.algorithms if a in SUPPORTED_ALGORITHMS]
            raise TokenError(
                f"bearer token algorithm {_show(alg)} is not accepted for issuer "
                f"{oauth.issuer} (accepted: {', '.join(pinned) or 'none'})",
                code="token_wrong_algorithm",
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise TokenError(
                "bearer token header has no kid; the issuer must name its signing key",
                code="token_unknown_key",
            )
        typ = header.get("typ")
        if typ is not None and not isinstance(typ, str):
            raise malformed
        # Refuse a token for another issuer before looking for keys: it would only cost a
        # JWKS refresh to find out its kid is unknown.
        iss = claims.get("iss")
        if iss is None:
            raise TokenError("bearer token has no iss claim", code="token_claims_invalid")
        if iss != oauth.issuer:
            raise TokenError(
                f"bearer token was issued by {_show(iss)}, but this server accepts tokens "
                f"from {oauth.issuer!r} only",
                code="issuer_mismatch",
            )
        signing_input = token[: len(header_b64) + 1 + len(payload_b64)].encode("ascii")
        return _Parsed(alg=alg, kid=kid, claims=claims, signing_input=signing_input, signature=signature)

    def _check_claims(self, claims: dict[str, Any], oauth: OAuth2Config) -> AccessToken:
        """Claims of a token whose signature verified. Time checks use the injected clock."""
        now = self.clock()
        for name in ("exp", "aud", "sub"):
            if name not in claims:
                raise TokenError(f"bearer token has no {name} claim", code="token_claims_invalid")
        exp = claims["exp"]
        for name in ("exp", "nbf", "iat", "auth_time"):
            if name in claims and not _is_time(claims[name]):
                raise TokenError(
                    f"bearer token {name} is not a time between 0 and {MAX_TIMESTAMP} "
                    "(a finite number of seconds)",
                    code="token_claims_invalid",
                )
        sub = claims["sub"]
        if not _is_text(sub):
            raise TokenError("bearer token sub is not a non-empty string", code="token_claims_invalid")
        aud = claims["aud"]
        if _is_text(aud):
            audience: tuple[str, ...] = (aud,)
        elif isinstance(aud, list) and aud and all(_is_text(a) for a in aud):
            audience = tuple(aud)
        else:
            raise TokenError(
                "bearer token aud is not a string or a list of strings", code="token_claims_invalid"
            )
        scopes = self._scopes(claims)
        client_id = claims.get("client_id", claims.get("azp"))
        if client_id is not None and not _is_text(client_id):
            raise TokenError("bearer token client_id/azp is not a string", code="token_claims_invalid")

        if oauth.audience not in audience:
            raise AudienceMismatch(
                f"bearer token is for audience {_show(list(audience))}, not this server's "
                f"{oauth.audience!r}; request a token for {oauth.audience!r}",
                code="audience_mismatch",
            )
        if now > exp + self.leeway_s:
            raise TokenError(
                f"bearer token expired at {int(exp)} (now {int(now)}); obtain a new token",
                code="token_expired",
            )
        for name in ("nbf", "iat"):
            if name in claims and now + self.leeway_s < claims[name]:
                raise TokenError(
                    f"bearer token is not valid before {int(claims[name])} ({name}; now "
                    f"{int(now)}); check the clocks of this host and the issuer",
                    code="token_not_yet_valid",
                )
        return AccessToken(
            issuer=oauth.issuer,
            subject=sub,
            audience=audience,
            scopes=scopes,
            expires_at=int(exp),
            client_id=client_id,
            string_claims=tuple(sorted(
                (k, v) for k, v in claims.items()
                if isinstance(v, str) and len(v) <= MAX_STRING_CLAIM
                and k not in ("iss", "sub", "aud", "scope", "jti")
            ))[:MAX_STRING_CLAIMS],
        )

    @staticmethod
    def _scopes(claims: dict[str, Any]) -> frozenset[str]:
        """Scopes from ``scope`` (RFC 8693/9068: space-separated) and ``scp`` (a list, as
        Okta and others send; a space-separated string, as Entra ID sends)."""
        scopes: set[str] = set()
        for name in ("scope", "scp"):
            value = claims.get(name)
            if value is None:
                continue
            if isinstance(value, str) and (not value or _is_text(value, max_len=8192)):
                scopes.update(value.split())
            elif isinstance(value, list) and all(_is_text(s, max_len=256) for s in value):
                scopes.update(value)
            else:
                raise TokenError(
                    f"bearer token {name} is neither a string nor a list of strings",
                    code="token_claims_invalid",
                )
        return frozenset(scopes)

    # ------------------------------------------------------------------ keys

    def _source(self, oauth: OAuth2Config) -> _Source:
        if oauth.jwks_file:
            path = Path(oauth.jwks_file)
            if not path.is_absolute():
                path = self.base_dir / path
            kind, location = "jwks_file", str(path)
        elif oauth.jwks_uri:
            kind, location = "jwks_uri", oauth.jwks_uri
        else:
            kind, location = "discovery", oauth.issuer
        ident = (oauth.issuer, kind, location)
        src = self._sources.get(ident)
        if src is None:
            src = self._sources[ident] = _Source(issuer=oauth.issuer, kind=kind, location=location)
        return src

    async def _key_for(self, source: _Source, kid: str, alg: str) -> _Key:
        keys = await self._ensure_keys(source, want=kid)
        by_alg = keys.by_kid.get(kid)
        if by_alg is None:
            raise TokenError(
                f"bearer token is signed with key {_show(kid)}, which {source.issuer} does not "
                f"publish (known: {', '.join(keys.kids())})",
                code="token_unknown_key",
            )
        key = by_alg.get(alg)
        if key is None:
            raise TokenError(
                f"key {_show(kid)} of {source.issuer} is for {', '.join(sorted(by_alg))}, "
                f"not {alg}; the token's alg does not fit its key",
                code="token_wrong_algorithm",
            )
        return key

    def _due(self, source: _Source, want: str | None, now: float) -> bool:
        """Whether a load should start now (rate limits included)."""
        last = source.checked_at
        if source.keys is None:
            retry = min(self.refresh_min_interval_s, NO_KEYS_RETRY_S)
            return last is None or source.last_error is None or now - last >= retry
        if last is None:
            # Keys are only stored after checked_at is (see _load): keys never checked
            # would be an inconsistency; loading again is the safe answer (rate limits
            # still apply once checked_at is set by that load).
            return True
        if source.kind == "jwks_file":
            return now - last >= FILE_CHECK_INTERVAL_S
        since = now - last
        if since < self.refresh_min_interval_s:
            return False
        stale = source.fetched_at is None or now - source.fetched_at >= self.jwks_ttl_s
        unknown = want is not None and want not in source.keys.by_kid
        return stale or unknown

    async def _ensure_keys(self, source: _Source, *, want: str | None) -> _KeySet:
        """The source's keys, loading them first if stale or if ``want`` is an unknown kid
        (rate-limited). Concurrent callers share one load. Raises :class:`Unavailable`."""
        while True:
            if source.inflight is not None:
                # Someone is loading: share its result (then re-check; it may have been
                # cancelled, in which case one of the waiters loads).
                await source.inflight.wait()
                continue
            if not self._due(source, want, self.clock()):
                break
            event = source.inflight = trio.Event()
            try:
                await self._load(source)
            finally:
                source.inflight = None
                event.set()
            break
        if source.keys is None:
            raise Unavailable(
                f"cannot get the signing keys of OAuth issuer {source.issuer} "
                f"({source.kind} {source.location}): {source.last_error}",
                code="jwks_unavailable",
                issuer=source.issuer,
            )
        return source.keys

    async def _load(self, source: _Source) -> None:
        """One bounded load attempt; records success or failure on ``source``."""
        try:
            with trio.fail_after(self.fetch_timeout_s):
                if source.kind == "jwks_file":
                    keys = await self._load_file(source)
                else:
                    keys = await self._load_remote(source)
        except (_FetchError, trio.TooSlowError) as exc:
            message = (
                f"timed out after {self.fetch_timeout_s:g}s"
                if isinstance(exc, trio.TooSlowError)
                else str(exc)
            )
            now = self.clock()
            source.checked_at = now
            source.last_error, source.last_error_at = message, now
            if source.keys is not None:
                log.warning(
                    "OAuth issuer %s: refreshing keys failed, keeping %d cached key(s): %s",
                    source.issuer, len(source.keys.by_kid), message,
                )
            else:
                log.warning("OAuth issuer %s: no signing keys: %s", source.issuer, message)
            return
        now = self.clock()
        source.checked_at = now
        source.last_error = None
        if keys is None:  # file unchanged
            return
        source.fetched_at = now
        if source.keys is None or keys.fingerprint != source.keys.fingerprint:
            source.generation += 1
            log.info(
                "OAuth issuer %s: key set generation %d from %s: kids %s",
                source.issuer, source.generation, source.kind, ", ".join(keys.kids()),
            )
        source.keys = keys

    async def _load_file(self, source: _Source) -> _KeySet | None:
        """Reload the JWKS file if its (inode, size, mtime) changed; None if unchanged."""
        path = Path(source.location)
        known = source.file_signature if source.keys is not None else None
        # abandon_on_cancel: a hung file system (NFS) must not outlast fetch_timeout_s.
        sig, data = await trio.to_thread.run_sync(
            _read_file_if_changed, path, known, limiter=self._file_limiter, abandon_on_cancel=True
        )
        if data is None:
            return None
        where = f"JWKS file {path}"
        try:
            doc = _strict_json(data)
        except ValueError as exc:
            raise _FetchError(f"{where} is not valid JSON: {exc}") from None
        keys = parse_jwks(doc, where=where)
        source.file_signature = sig
        source.fetches += 1
        return keys

    async def _load_remote(self, source: _Source) -> _KeySet:
        if source.kind == "jwks_uri":
            return await self._fetch_jwks(source, source.location)
        now = self.clock()
        uri = source.discovered_uri
        fresh_enough = (
            source.discovered_at is not None and now - source.discovered_at < DISCOVERY_TTL_S
        )
        if uri is not None and fresh_enough:
            try:
                return await self._fetch_jwks(source, uri)
            except _FetchError:
                # The issuer may have moved its JWKS: re-read the metadata below.
                pass
        fresh = await self._discover(source.issuer)
        source.discovered_uri, source.discovered_at = fresh, self.clock()
        return await self._fetch_jwks(source, fresh)

    async def _fetch_jwks(self, source: _Source, uri: str) -> _KeySet:
        doc = await self._get_json(uri, what="jwks_uri")
        source.fetches += 1
        return parse_jwks(doc, where=f"JWKS {uri}")

    async def _discover(self, issuer: str) -> str:
        """The issuer's jwks_uri from OIDC discovery, else RFC 8414 metadata."""
        check_url(issuer, allow_http_hosts=self.allow_http_hosts, what="issuer")
        errors: list[str] = []
        for label, url in discovery_urls(issuer):
            try:
                doc = await self._get_json(url, what=label)
                if not isinstance(doc, dict):
                    raise _FetchError(f"{label} {url} is not a JSON object")
                if doc.get("issuer") != issuer:
                    raise _FetchError(
                        f"{label} {url} names issuer {_show(doc.get('issuer'))}, not the "
                        f"configured {issuer!r} (they must be identical)"
                    )
                uri = doc.get("jwks_uri")
                if not isinstance(uri, str) or not uri:
                    raise _FetchError(f"{label} {url} has no jwks_uri")
                check_url(uri, allow_http_hosts=self.allow_http_hosts, what="discovered jwks_uri")
                return uri
            except _FetchError as exc:
                errors.append(str(exc))
        raise _FetchError(
            "discovery failed (set jwks_uri or jwks_file to skip it): " + "; ".join(errors)
        )

    async def _get_json(self, url: str, *, what: str) -> Any:
        """GET ``url`` and decode its JSON body: status 200, no redirect, body capped."""
        check_url(url, allow_http_hosts=self.allow_http_hosts, what=what)
        if self._closed:
            raise _FetchError("the OAuth verifier is closed")
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.fetch_timeout_s,
                follow_redirects=False,
                # No proxies, netrc or CA bundles from the environment: what sidekey
                # fetches and trusts depends on its configuration only.
                trust_env=False,
                headers={"Accept": "application/json", "User-Agent": _USER_AGENT},
            )
        body = bytearray()
        try:
            async with self._client.stream("GET", url) as response:
                if response.status_code != 200:
                    hint = " (redirects are not followed)" if response.is_redirect else ""
                    raise _FetchError(f"{what} {url} answered HTTP {response.status_code}{hint}")
                length = response.headers.get("content-length", "")
                if length.isdigit() and int(length) > MAX_DOCUMENT_BYTES:
                    raise _FetchError(f"{what} {url} is larger than {MAX_DOCUMENT_BYTES} bytes")
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise _FetchError(f"{what} {url} is larger than {MAX_DOCUMENT_BYTES} bytes")
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            detail = str(exc) or exc.__class__.__name__
            raise _FetchError(f"{what} {url}: {exc.__class__.__name__}: {detail}") from exc
        try:
            return _strict_json(bytes(body))
        except ValueError:
            raise _FetchError(f"{what} {url} did not return valid JSON") from None


def _read_file_if_changed(
    path: Path, known: tuple[int, int, int] | None
) -> tuple[tuple[int, int, int] | None, bytes | None]:
    """(signature, bytes) of a JWKS file, bytes None if the signature equals ``known``.

    Runs in a worker thread. Raises :class:`_FetchError` for a missing, special or
    oversized file.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise _FetchError(f"JWKS file {path} is not a regular file")
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        if sig == known:
            return sig, None
        if st.st_size > MAX_DOCUMENT_BYTES:
            raise _FetchError(f"JWKS file {path} is larger than {MAX_DOCUMENT_BYTES} bytes")
        with open(path, "rb") as fh:
            data = fh.read(MAX_DOCUMENT_BYTES + 1)
    except FileNotFoundError:
        raise _FetchError(f"JWKS file {path} does not exist") from None
    except OSError as exc:
        raise _FetchError(f"JWKS file {path} cannot be read: {exc.strerror}") from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise _FetchError(f"JWKS file {path} is larger than {MAX_DOCUMENT_BYTES} bytes")
    # The stat precedes the read: if the file changes in between, the next check sees a
    # new signature and reloads, so a half-seen update is never kept.
    return sig, data
