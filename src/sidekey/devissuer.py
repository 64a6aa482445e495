"""A local OAuth2 token issuer for trying sidekey out and for tests.

In production the user's bearer tokens come from the organisation's identity provider
and sidekey only verifies them. To run the quickstart without one, ``sidekey keygen
issuer`` creates an Ed25519 key pair plus a JWKS file that ``oauth2_issuers`` in the
main config points at, and ``sidekey token user`` mints access tokens with that key
for a server's issuer and audience. The tokens are ordinary EdDSA JWTs: sidekey
verifies them exactly like tokens from a real issuer.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .encoding import b64url_encode
from .fsutil import atomic_write
from .protocol import ConfigError
from .tokens import generate_ed25519, load_ed25519_private

MAX_USER_TOKEN_TTL_S = 24 * 3600


def jwks_for(private: Ed25519PrivateKey, kid: str) -> dict[str, Any]:
    """The public JWKS (RFC 7517 / RFC 8037 OKP) for an Ed25519 private key."""
    raw = private.public_key().public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )
    return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw), "kid": kid,
                      "use": "sig", "alg": "EdDSA"}]}


def create_issuer(private_key_file: Path, jwks_file: Path) -> str:
    """Create an Ed25519 key pair (private key 0600) and its JWKS file; return the kid."""
    kid, _ = generate_ed25519(private_key_file)
    write_jwks(private_key_file, jwks_file, kid)
    return kid


def write_jwks(private_key_file: Path, jwks_file: Path, kid: str) -> None:
    private = load_ed25519_private(private_key_file)
    jwks_file.parent.mkdir(parents=True, exist_ok=True)
    # Public: 0644, readable by the daemon whatever uid it runs as.
    atomic_write(jwks_file, (json.dumps(jwks_for(private, kid), indent=1) + "\n").encode(), mode=0o644)


def kid_of(jwks_file: Path) -> str:
    try:
        doc = json.loads(jwks_file.read_text())
        kid = doc["keys"][0]["kid"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ConfigError(f"{jwks_file}: not a JWKS written by `sidekey keygen issuer`") from exc
    if not isinstance(kid, str):
        raise ConfigError(f"{jwks_file}: key without a kid")
    return kid


def mint_user_token(
    private_key_file: Path,
    *,
    kid: str,
    issuer: str,
    audience: str,
    subject: str,
    scopes: Sequence[str],
    ttl_s: int = 3600,
    now: float | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """An EdDSA access token as an identity provider would issue it."""
    if not 0 < ttl_s <= MAX_USER_TOKEN_TTL_S:
        raise ConfigError(f"ttl must be between 1 and {MAX_USER_TOKEN_TTL_S} seconds")
    iat = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "scope": " ".join(scopes),
        "iat": iat,
        "nbf": iat,
        "exp": iat + ttl_s,
        "jti": uuid.uuid4().hex,
        **(extra or {}),
    }
    private = load_ed25519_private(private_key_file)
    return jwt.encode(claims, private, algorithm="EdDSA", headers={"kid": kid, "typ": "at+jwt"})
