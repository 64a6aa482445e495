"""Resolution tokens: issue and verify. Pure apart from the key-set file helpers.

A resolution token is a JWT with ``typ: sidekey-resolution+jwt``. Tokens this daemon
issues are HS256 under a random 256-bit per-host key (cheap, and they never leave the
host: only this daemon redeems them). Tokens from a trusted external issuer (a control
plane) are EdDSA under that issuer's configured Ed25519 public key. The algorithm and
key are chosen from *our* configuration by ``iss`` and ``kid``, never from the token
header; ``jku``/``x5u``/``jwk`` headers are refused outright.

Single use is enforced by the caller (the ``jti`` is burned in the state store).
"""

from __future__ import annotations

import binascii
import functools
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import jwt
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from msgspec import Meta

from .encoding import b64url_decode, b64url_encode, random_hex
from .fsutil import atomic_write
from .protocol import (
    MAX_JSON_DEPTH,
    MAX_TIMESTAMP,
    MAX_TOKEN_TTL_S,
    ConfigError,
    TokenError,
    json_too_deep,
)

log = logging.getLogger(__name__)

TOKEN_TYPE = "sidekey-resolution+jwt"  # noqa: S105 - a JWT typ, not a secret
HMAC_KEY_BYTES = 32
KEYSET_FORMAT = "sidekey-token-keys-v1"
MAX_KEYS_KEPT = 4
MAX_TOKEN_BYTES = 8 * 1024
_FORBIDDEN_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c", "crit", "b64"})

Str = Annotated[str, Meta(min_length=1, max_length=256)]
# Times a token may carry: seconds from 1970 to the end of year 9999 (datetime's range:
# an exp past it would overflow where the call is audited).
Time = Annotated[int, Meta(ge=0, le=MAX_TIMESTAMP)]
U32 = Annotated[int, Meta(ge=0, le=2**32 - 1)]


class PeerClaim(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The attested peer a token is bound to. Every field present must match the redeemer."""

    uid: U32 | None = None
    pid: U32 | None = None
    start: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None  # jiffies since boot


class ResolutionClaims(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    iss: Str
    aud: Annotated[str, Meta(pattern=r"^mcp:[A-Za-z0-9_.:@/-]{1,128}$")]
    sub: Str
    agent: Str | None
    sid: Str | None
    tool: Str
    jti: Annotated[str, Meta(min_length=16, max_length=64)]
    iat: Time
    nbf: Time
    exp: Time
    args: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
    peer: PeerClaim

    @property
    def server(self) -> str:
        return self.aud.removeprefix("mcp:")


_claims_decoder = msgspec.json.Decoder(ResolutionClaims)
# pyjwt's algorithm objects do the signing and verification. The compact-serialization
# framing around them (base64url of two JSON objects) is done here once, strictly: going
# through jwt.encode/decode re-parsed each token three times and cost more than the
# signature itself (~0.1 ms per call on the reference machine).
_ALGORITHMS: dict[str, Any] = jwt.algorithms.get_default_algorithms()
_HS256 = _ALGORITHMS["HS256"]
_EDDSA = _ALGORITHMS["EdDSA"]


@functools.lru_cache(maxsize=64)
def _prepared_hmac(secret: bytes) -> Any:
    """pyjwt's prepared HMAC key (its checks of the key cost ~3x the signature itself),
    once per key secret, not per sign or verify."""
    return _HS256.prepare_key(secret)


@dataclass(frozen=True, slots=True)
class HmacKey:
    kid: str
    secret: bytes
    created: float

    def __repr__(self) -> str:  # never show key material
        return f"HmacKey(kid={self.kid!r})"


@dataclass(frozen=True, slots=True)
class KeySet:
    active: HmacKey
    keys: Mapping[str, HmacKey]


# --------------------------------------------------------------------------- key-set files


def _check_private_file(path: Path) -> None:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"{path}: mode {stat.S_IMODE(st.st_mode):04o} is too open; run chmod 600 {path}"
        )
    if st.st_uid not in (os.getuid(), 0):
        raise ConfigError(f"{path}: owned by uid {st.st_uid}, expected {os.getuid()} or root")


def load_keyset(path: Path) -> KeySet:
    """Load the HMAC key set. Raises :class:`ConfigError` (missing, too open, malformed)."""
    try:
        _check_private_file(path)
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: token key set not found; create it with `sidekey keygen tokens`"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        doc = json.loads(raw)
        # A file that is JSON but not an object must be a ConfigError too, not an AttributeError.
        if not isinstance(doc, dict) or doc.get("format") != KEYSET_FORMAT:
            raise ValueError("format")
        keys = {
            k["kid"]: HmacKey(
                kid=k["kid"], secret=b64url_decode(k["k"], strict=False), created=float(k["created"])
            )
            for k in doc["keys"]
        }
        active = keys[doc["active"]]
        # A non-string kid would load, and every token issued under it would then be refused.
        if not all(isinstance(kid, str) for kid in keys):
            raise ValueError("kid")
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ConfigError(f"{path}: not a valid sidekey token key set") from exc
    if any(len(k.secret) != HMAC_KEY_BYTES for k in keys.values()):
        raise ConfigError(f"{path}: every key must be {HMAC_KEY_BYTES} bytes")
    return KeySet(active=active, keys=keys)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (:func:`sidekey.fsutil.atomic_write`)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, data, mode=0o600)


def rotate_keyset(path: Path, *, now: float | None = None) -> str:
    """Create the key set, or add a new active key to it (old keys keep verifying).

    Returns the new key's ``kid``. At most :data:`MAX_KEYS_KEPT` keys are kept.
    """
    keys: list[dict[str, Any]] = []
    if path.exists():
        current = load_keyset(path)
        keys = [
            {"kid": k.kid, "k": b64url_encode(k.secret), "created": k.created}
            for k in sorted(current.keys.values(), key=lambda k: k.created)
        ]
    created = time.time() if now is None else now
    kid = f"hs-{time.strftime('%Y%m%d', time.gmtime(created))}-{secrets.token_hex(4)}"
    keys.append({"kid": kid, "k": b64url_encode(secrets.token_bytes(HMAC_KEY_BYTES)), "created": created})
    keys = keys[-MAX_KEYS_KEPT:]
    doc = {"format": KEYSET_FORMAT, "active": kid, "keys": keys}
    _write_private(path, json.dumps(doc, indent=1).encode())
    return kid


def generate_ed25519(path: Path) -> tuple[str, str]:
    """Write a new Ed25519 private key (PEM, 0600) to ``path``; return (kid, public key b64url)."""
    if path.exists():
        raise ConfigError(f"{path}: already exists; refusing to overwrite a private key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(path, pem)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"ed-{secrets.token_hex(4)}", b64url_encode(raw)


def load_ed25519_private(path: Path) -> Ed25519PrivateKey:
    _check_private_file(path)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key


def load_ed25519_public(text: str | None, file: Path | None) -> Ed25519PublicKey:
    """Parse a configured trusted-issuer key (raw 32 bytes b64url, or a PEM file)."""
    try:
        if file is not None:
            key = serialization.load_pem_public_key(file.read_bytes())
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(f"{file}: not an Ed25519 public key")
            return key
        if text is None:  # config validation requires one of key / key_file
            raise ConfigError("a trusted issuer needs a public key or a key file")
        # Lenient, as always: an operator may paste the key with "=" padding.
        return Ed25519PublicKey.from_public_bytes(b64url_decode(text, strict=False))
    except (ValueError, binascii.Error, OSError) as exc:
        raise ConfigError(f"invalid Ed25519 public key {'in ' + str(file) if file else ''}: {exc}") from exc


# --------------------------------------------------------------------------- issue / verify


@dataclass(frozen=True, slots=True)
class Verified:
    claims: ResolutionClaims
    self_issued: bool


class TokenCodec:
    """Issues self-signed tokens and verifies self-issued and trusted external tokens."""

    def __init__(
        self,
        *,
        issuer: str,
        keyset: KeySet,
        trusted: Mapping[str, Mapping[str, Ed25519PublicKey]] | None = None,
        leeway_s: int = 5,
        max_ttl_s: int = MAX_TOKEN_TTL_S,
    ) -> None:
        if issuer in (trusted or {}):
            raise ConfigError(f"trusted issuer {issuer!r} has the same name as this daemon")
        self.issuer = issuer
        self.keyset = keyset
        self.trusted = {iss: dict(keys) for iss, keys in (trusted or {}).items()}
        self.leeway_s = leeway_s
        self.max_ttl_s = min(max_ttl_s, MAX_TOKEN_TTL_S)

    def issue(
        self,
        *,
        server: str,
        tool: str,
        user: str,
        agent: str | None,
        session: str | None,
        args_digest: str,
        peer: PeerClaim,
        now: float,
        ttl_s: int,
    ) -> tuple[str, ResolutionClaims]:
        """Return (token, claims) for a token valid ``min(ttl_s, max_ttl)`` seconds from ``now``."""
        iat = int(now)
        claims = ResolutionClaims(
            iss=self.issuer,
            aud=f"mcp:{server}",
            sub=user,
            agent=agent,
            sid=session,
            tool=tool,
            jti=random_hex(),
            iat=iat,
            nbf=iat,
            exp=iat + max(1, min(ttl_s, self.max_ttl_s)),
            args=args_digest,
            peer=peer,
        )
        key = self.keyset.active
        header = b64url_encode(msgspec.json.encode({"alg": "HS256", "kid": key.kid, "typ": TOKEN_TYPE}))
        signing_input = f"{header}.{b64url_encode(msgspec.json.encode(claims))}"
        signature = _HS256.sign(signing_input.encode("ascii"), _prepared_hmac(key.secret))
        return f"{signing_input}.{b64url_encode(signature)}", claims

    def verify(self, token: str, *, now: float) -> Verified:
        """Verify signature, type and every claim. Raises :class:`TokenError` with a code.

        The header and payload are decoded once (strict base64url), unverified, only to
        pick the key (by ``iss`` and ``kid`` from our configuration); pyjwt's algorithm
        for the pinned ``alg`` checks the signature under that key, and the claims are
        decoded strictly (every claim required, unknown claims refused) from the same
        bytes that were verified.
        """
        if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise TokenError("resolution token is malformed", code="token_malformed")
        header_b64, payload_b64, signature_b64 = token.split(".")
        try:
            header_json = b64url_decode(header_b64)
            payload = b64url_decode(payload_b64)
            signature = b64url_decode(signature_b64)
            # Checked before decoding: msgspec recurses (RecursionError, not a 401).
            if json_too_deep(header_json, MAX_JSON_DEPTH) or json_too_deep(payload, MAX_JSON_DEPTH):
                raise ValueError("nested too deeply")
            header = msgspec.json.decode(header_json)
            unverified = msgspec.json.decode(payload)
        except (ValueError, msgspec.DecodeError, RecursionError):
            raise TokenError("resolution token is malformed", code="token_malformed") from None
        if not isinstance(header, dict) or not isinstance(unverified, dict):
            raise TokenError("resolution token is malformed", code="token_malformed")
        if header.get("typ") != TOKEN_TYPE:
            raise TokenError("not a sidekey resolution token (typ)", code="token_wrong_type")
        if _FORBIDDEN_HEADERS & header.keys():
            raise TokenError("token header carries a forbidden key reference", code="token_malformed")
        iss = unverified.get("iss")
        kid = header.get("kid")
        if not isinstance(iss, str) or not isinstance(kid, str):
            raise TokenError("token lacks iss or kid", code="token_malformed")
        key: bytes | Ed25519PublicKey
        if iss == self.issuer:
            hk = self.keyset.keys.get(kid)
            if hk is None:
                raise TokenError("token signed with an unknown key id", code="token_unknown_key")
            key, alg = hk.secret, "HS256"
        elif iss in self.trusted:
            pk = self.trusted[iss].get(kid)
            if pk is None:
                raise TokenError("token signed with an unknown key id", code="token_unknown_key")
            key, alg = pk, "EdDSA"
        else:
            raise TokenError("token issuer is not trusted", code="token_untrusted_issuer")
        if header.get("alg") != alg:
            raise TokenError(f"issuer {iss!r} signs with {alg} only", code="token_wrong_algorithm")
        algorithm = _HS256 if alg == "HS256" else _EDDSA
        signing_input = token[: len(header_b64) + 1 + len(payload_b64)].encode("ascii")
        try:
            prepared = (_prepared_hmac(key) if isinstance(key, bytes)
                        else algorithm.prepare_key(key))
            valid = algorithm.verify(signing_input, prepared, signature)
        except (ValueError, TypeError, jwt.PyJWTError):
            valid = False
        if not valid:
            raise TokenError("token signature is invalid", code="token_bad_signature")
        try:
            claims = _claims_decoder.decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise TokenError(f"token claims are invalid: {exc}", code="token_claims_invalid") from None
        if claims.iss != iss:  # cannot differ (same bytes); kept as a guard
            raise TokenError("token issuer changed under verification", code="token_invalid")
        # Time checks are ours, with an injected clock, so tests can move time.
        if claims.exp - claims.iat > self.max_ttl_s or claims.exp <= claims.iat:
            raise TokenError("token lifetime exceeds the maximum", code="token_ttl_too_long")
        if now > claims.exp + self.leeway_s:
            raise TokenError("token has expired", code="token_expired")
        if now + self.leeway_s < claims.nbf or now + self.leeway_s < claims.iat:
            raise TokenError("token is not valid yet", code="token_not_yet_valid")
        return Verified(claims=claims, self_issued=iss == self.issuer)
