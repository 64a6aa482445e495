"""Resolution tokens: issue/verify, algorithm pinning, claims, key rotation. No I/O but key files."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sidekey.protocol import ConfigError, TokenError
from sidekey.tokens import (
    TOKEN_TYPE,
    PeerClaim,
    TokenCodec,
    generate_ed25519,
    load_ed25519_private,
    load_keyset,
    rotate_keyset,
)

NOW = 1_800_000_000.0
DIGEST = "a" * 64


@pytest.fixture
def keyset_path(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "token-keys.json"
    rotate_keyset(path, now=NOW)
    return path


@pytest.fixture
def codec(keyset_path: Path) -> TokenCodec:
    return TokenCodec(issuer="sidekey:test", keyset=load_keyset(keyset_path), leeway_s=2)


def issue(codec: TokenCodec, **kw: object) -> str:
    args: dict[str, object] = dict(
        server="content-api", tool="list_articles", user="u1", agent="a1", session="s1",
        args_digest=DIGEST, peer=PeerClaim(uid=1000, pid=42, start=7), now=NOW, ttl_s=300,
    )
    args.update(kw)
    token, _ = codec.issue(**args)  # type: ignore[arg-type]
    return token


def code_of(codec: TokenCodec, token: str, now: float = NOW) -> str:
    with pytest.raises(TokenError) as ei:
        codec.verify(token, now=now)
    return ei.value.code


def test_round_trip(codec: TokenCodec) -> None:
    token = issue(codec)
    v = codec.verify(token, now=NOW + 10)
    assert v.self_issued
    c = v.claims
    assert (c.server, c.tool, c.sub, c.agent, c.sid, c.args) == ("content-api", "list_articles", "u1", "a1", "s1", DIGEST)
    assert c.exp - c.iat == 300 and c.peer == PeerClaim(uid=1000, pid=42, start=7)
    assert jwt.get_unverified_header(token)["typ"] == TOKEN_TYPE


def test_keyset_file_is_private(keyset_path: Path) -> None:
    assert stat.S_IMODE(keyset_path.stat().st_mode) == 0o600
    os.chmod(keyset_path, 0o644)
    with pytest.raises(ConfigError, match="too open"):
        load_keyset(keyset_path)


def test_missing_keyset_names_keygen(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sidekey keygen tokens"):
        load_keyset(tmp_path / "nope.json")


def test_ttl_capped_at_300(codec: TokenCodec) -> None:
    token = issue(codec, ttl_s=10_000)
    c = codec.verify(token, now=NOW).claims
    assert c.exp - c.iat == 300


def test_expired_and_not_yet_valid(codec: TokenCodec) -> None:
    token = issue(codec, ttl_s=60)
    codec.verify(token, now=NOW + 61)  # within leeway (2 s)
    assert code_of(codec, token, NOW + 63) == "token_expired"
    assert code_of(codec, token, NOW - 10) == "token_not_yet_valid"


def test_tampered_payload_rejected(codec: TokenCodec) -> None:
    token = issue(codec)
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["tool"] = "delete_everything"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert code_of(codec, f"{head}.{forged}.{sig}") == "token_bad_signature"


def test_alg_none_rejected(codec: TokenCodec) -> None:
    claims = codec.verify(issue(codec), now=NOW).claims
    header = {"alg": "none", "typ": TOKEN_TYPE, "kid": codec.keyset.active.kid}
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    from msgspec import to_builtins

    token = f"{enc(header)}.{enc(to_builtins(claims))}."
    assert code_of(codec, token) in ("token_wrong_algorithm", "token_malformed")


def test_wrong_typ_and_forbidden_headers(codec: TokenCodec) -> None:
    key = codec.keyset.active
    claims = jwt.decode(issue(codec), options={"verify_signature": False})
    t1 = jwt.encode(claims, key.secret, algorithm="HS256", headers={"kid": key.kid, "typ": "JWT"})
    assert code_of(codec, t1) == "token_wrong_type"
    t2 = jwt.encode(claims, key.secret, algorithm="HS256",
                    headers={"kid": key.kid, "typ": TOKEN_TYPE, "jku": "https://evil/jwks"})
    assert code_of(codec, t2) == "token_malformed"


def test_missing_claim_rejected(codec: TokenCodec) -> None:
    key = codec.keyset.active
    claims = jwt.decode(issue(codec), options={"verify_signature": False})
    for name in ("exp", "jti", "args", "peer", "agent"):
        partial = {k: v for k, v in claims.items() if k != name}
        t = jwt.encode(partial, key.secret, algorithm="HS256", headers={"kid": key.kid, "typ": TOKEN_TYPE})
        assert code_of(codec, t) in ("token_invalid", "token_claims_invalid"), name


def test_lifetime_over_300_rejected_even_if_signed(codec: TokenCodec) -> None:
    key = codec.keyset.active
    claims = jwt.decode(issue(codec), options={"verify_signature": False})
    claims["exp"] = claims["iat"] + 3600
    t = jwt.encode(claims, key.secret, algorithm="HS256", headers={"kid": key.kid, "typ": TOKEN_TYPE})
    assert code_of(codec, t) == "token_ttl_too_long"


def test_unknown_kid_and_untrusted_issuer(codec: TokenCodec) -> None:
    key = codec.keyset.active
    claims = jwt.decode(issue(codec), options={"verify_signature": False})
    t = jwt.encode(claims, key.secret, algorithm="HS256", headers={"kid": "nope", "typ": TOKEN_TYPE})
    assert code_of(codec, t) == "token_unknown_key"
    claims["iss"] = "someone-else"
    t = jwt.encode(claims, key.secret, algorithm="HS256", headers={"kid": key.kid, "typ": TOKEN_TYPE})
    assert code_of(codec, t) == "token_untrusted_issuer"


def test_rotation_old_key_still_verifies(keyset_path: Path, codec: TokenCodec) -> None:
    old_token = issue(codec)
    new_kid = rotate_keyset(keyset_path, now=NOW + 1)
    rotated = TokenCodec(issuer="sidekey:test", keyset=load_keyset(keyset_path))
    assert rotated.keyset.active.kid == new_kid != codec.keyset.active.kid
    rotated.verify(old_token, now=NOW)
    assert jwt.get_unverified_header(issue(rotated))["kid"] == new_kid


def _external(tmp_path: Path) -> tuple[Ed25519PrivateKey, str, TokenCodec, TokenCodec]:
    from sidekey.tokens import load_ed25519_public

    kid, pub = generate_ed25519(tmp_path / "cp.pem")
    priv = load_ed25519_private(tmp_path / "cp.pem")
    rotate_keyset(tmp_path / "k.json", now=NOW)
    ks = load_keyset(tmp_path / "k.json")
    codec = TokenCodec(issuer="sidekey:test", keyset=ks,
                       trusted={"control-plane": {kid: load_ed25519_public(pub, None)}})
    return priv, kid, codec, TokenCodec(issuer="sidekey:test", keyset=ks)


def _claims() -> dict[str, object]:
    return {
        "iss": "control-plane", "aud": "mcp:content-api", "sub": "u1", "agent": None, "sid": None,
        "tool": "list_articles", "jti": "j" * 32, "iat": int(NOW), "nbf": int(NOW),
        "exp": int(NOW) + 120, "args": DIGEST, "peer": {},
    }


def test_trusted_external_issuer_eddsa(tmp_path: Path) -> None:
    priv, kid, codec, untrusting = _external(tmp_path)
    token = jwt.encode(_claims(), priv, algorithm="EdDSA", headers={"kid": kid, "typ": TOKEN_TYPE})
    v = codec.verify(token, now=NOW)
    assert not v.self_issued and v.claims.iss == "control-plane"
    assert code_of(untrusting, token) == "token_untrusted_issuer"


def test_external_issuer_algorithm_pinned(tmp_path: Path) -> None:
    """HS256 signed with the issuer's *public key* as the HMAC secret must not verify."""
    priv, kid, codec, _ = _external(tmp_path)
    pub_raw = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    token = jwt.encode(_claims(), pub_raw, algorithm="HS256", headers={"kid": kid, "typ": TOKEN_TYPE})
    assert code_of(codec, token) == "token_wrong_algorithm"
    other = Ed25519PrivateKey.generate()
    forged = jwt.encode(_claims(), other, algorithm="EdDSA", headers={"kid": kid, "typ": TOKEN_TYPE})
    assert code_of(codec, forged) == "token_bad_signature"


def test_garbage_tokens(codec: TokenCodec) -> None:
    for junk in ("", "a.b", "a.b.c", "x" * 9000, "....", "eyJ.eyJ.sig"):
        with pytest.raises(TokenError):
            codec.verify(junk, now=time.time())


def test_interoperates_with_standard_jws(codec: TokenCodec) -> None:
    """Our framing is plain RFC 7515 compact JWS: pyjwt reads our tokens and we read its."""
    key = codec.keyset.active
    token = issue(codec)
    decoded = jwt.decode(token, key.secret, algorithms=["HS256"],
                         options={"verify_aud": False, "verify_iat": False, "verify_nbf": False,
                                  "verify_exp": False})
    assert decoded["tool"] == "list_articles" and decoded["peer"] == {"uid": 1000, "pid": 42, "start": 7}
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "kid": key.kid, "typ": TOKEN_TYPE}
    again = jwt.encode(decoded, key.secret, algorithm="HS256", headers={"kid": key.kid, "typ": TOKEN_TYPE})
    assert codec.verify(again, now=NOW).claims.jti == decoded["jti"]


def test_signature_framing_is_strict(codec: TokenCodec) -> None:
    key = codec.keyset.active
    head, payload, sig = issue(codec).split(".")
    assert code_of(codec, f"{head}.{payload}.{sig[:-4]}") == "token_bad_signature"
    assert code_of(codec, f"{head}.{payload}.") == "token_bad_signature"
    assert code_of(codec, f"{head}.{payload}.{sig}=") == "token_malformed"  # padding
    assert code_of(codec, f"{head}.{payload}.{sig[:-1]}!") == "token_malformed"  # alphabet
    other = jwt.encode(
        jwt.decode(f"{head}.{payload}.{sig}", options={"verify_signature": False}),
        os.urandom(32), algorithm="HS256", headers={"kid": key.kid, "typ": TOKEN_TYPE},
    )
    assert code_of(codec, other) == "token_bad_signature"
    unencoded = jwt.encode(
        jwt.decode(f"{head}.{payload}.{sig}", options={"verify_signature": False}),
        key.secret, algorithm="HS256", headers={"kid": key.kid, "typ": TOKEN_TYPE, "b64": False},
    )
    assert code_of(codec, unencoded) in ("token_malformed", "token_bad_signature")
