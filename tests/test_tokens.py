"""Resolution tokens: issue/verify, algorithm pinning, claims, key rotation. No I/O but key files."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
import time
from pathlib import Path

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import sidekey.tokens
from sidekey.protocol import MAX_JSON_DEPTH, ConfigError, TokenError
from sidekey.tokens import (
    HMAC_KEY_BYTES,
    MAX_TOKEN_BYTES,
    TOKEN_TYPE,
    HmacKey,
    KeySet,
    PeerClaim,
    ResolutionClaims,
    TokenCodec,
    generate_ed25519,
    load_ed25519_private,
    load_ed25519_public,
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


# --------------------------------------------------------------------------- mutation-testing guards
# Each test below pins a decision a surviving mutant of sidekey.tokens showed was unguarded
# (tools/mutation.py tokens): a boundary, a type check, a refusal that must be a
# TokenError/ConfigError with the right code and never a traceback or a silent accept.


def _b64json(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def sign_raw(codec: TokenCodec, header: object, claims: object) -> str:
    """A token with exactly this header and payload JSON, HS256-signed under the active key."""
    signing_input = f"{_b64json(header)}.{_b64json(claims)}"
    sig = hmac.new(codec.keyset.active.secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


def own_header(codec: TokenCodec, **extra: object) -> dict[str, object]:
    return {"alg": "HS256", "kid": codec.keyset.active.kid, "typ": TOKEN_TYPE, **extra}


def own_claims(**changes: object) -> dict[str, object]:
    claims: dict[str, object] = {
        "iss": "sidekey:test", "aud": "mcp:content-api", "sub": "u1", "agent": None, "sid": None,
        "tool": "list_articles", "jti": "j" * 32, "iat": int(NOW), "nbf": int(NOW),
        "exp": int(NOW) + 60, "args": DIGEST, "peer": {"uid": 1000},
    }
    claims.update(changes)
    return claims


def test_sign_raw_helper_makes_valid_tokens(codec: TokenCodec) -> None:
    """The helper the tests below forge with is itself accepted when nothing is wrong."""
    assert codec.verify(sign_raw(codec, own_header(codec), own_claims()), now=NOW).self_issued


def test_time_window_edges_are_inclusive_of_leeway(codec: TokenCodec) -> None:
    """A token is valid from nbf/iat - leeway through exp + leeway, both ends included, and
    not one instant outside (leeway is 2 s here)."""
    token = issue(codec, ttl_s=60)  # iat = nbf = NOW, exp = NOW + 60
    codec.verify(token, now=NOW + 62)  # exactly exp + leeway: still valid
    assert code_of(codec, token, NOW + 62.001) == "token_expired"
    codec.verify(token, now=NOW - 2)  # exactly nbf - leeway (= iat - leeway): valid
    assert code_of(codec, token, NOW - 2.001) == "token_not_yet_valid"


def test_nbf_and_iat_are_each_enforced_alone(codec: TokenCodec) -> None:
    """A future nbf refuses the token even when iat is past, and a future iat refuses it
    even when nbf is past: neither check depends on the other."""
    future_nbf = sign_raw(codec, own_header(codec), own_claims(nbf=int(NOW) + 30))
    assert code_of(codec, future_nbf) == "token_not_yet_valid"
    codec.verify(future_nbf, now=NOW + 28)  # nbf - leeway, exactly: valid
    future_iat = sign_raw(codec, own_header(codec),
                          own_claims(iat=int(NOW) + 30, exp=int(NOW) + 90))
    assert code_of(codec, future_iat) == "token_not_yet_valid"
    codec.verify(future_iat, now=NOW + 28)  # iat - leeway, exactly: valid


def test_zero_or_negative_lifetime_refused(codec: TokenCodec) -> None:
    """exp must be after iat: a token with exp == iat (or before it) is refused even though
    its "lifetime" is not over the maximum, and the maximum itself is allowed."""
    for exp in (int(NOW), int(NOW) - 1):
        t = sign_raw(codec, own_header(codec), own_claims(exp=exp))
        assert code_of(codec, t) == "token_ttl_too_long", exp
    codec.verify(sign_raw(codec, own_header(codec), own_claims(exp=int(NOW) + 300)), now=NOW)
    t = sign_raw(codec, own_header(codec), own_claims(exp=int(NOW) + 301))
    assert code_of(codec, t) == "token_ttl_too_long"


def _token_of_length(codec: TokenCodec, length: int) -> str:
    """A correctly signed token exactly ``length`` characters long (padded in the header)."""
    for jti_len in range(32, 36):
        claims = own_claims(jti="j" * jti_len)
        base = len(sign_raw(codec, own_header(codec, pad=""), claims))
        for n in range(max(0, (length - base) * 3 // 4 - 8), length):
            token = sign_raw(codec, own_header(codec, pad="p" * n), claims)
            if len(token) == length:
                return token
            if len(token) > length:
                break
    raise AssertionError(f"no token of length {length}")


def test_token_size_cap_is_inclusive(codec: TokenCodec) -> None:
    """MAX_TOKEN_BYTES is the largest token accepted; one byte more is malformed."""
    codec.verify(_token_of_length(codec, MAX_TOKEN_BYTES), now=NOW)
    assert code_of(codec, _token_of_length(codec, MAX_TOKEN_BYTES + 1)) == "token_malformed"


def test_peer_uid_and_pid_are_32_bit(codec: TokenCodec) -> None:
    """A peer uid/pid outside 0..2**32-1 cannot name a real process: the claims are invalid."""
    ok = sign_raw(codec, own_header(codec), own_claims(peer={"uid": 2**32 - 1, "pid": 2**32 - 1}))
    assert codec.verify(ok, now=NOW).claims.peer == PeerClaim(uid=2**32 - 1, pid=2**32 - 1)
    for peer in ({"uid": 2**32}, {"pid": 2**32}, {"uid": -1}):
        t = sign_raw(codec, own_header(codec), own_claims(peer=peer))
        assert code_of(codec, t) == "token_claims_invalid", peer


def test_unknown_claims_refused_even_if_signed(codec: TokenCodec) -> None:
    """A claim this daemon does not know (top level or in peer) is refused, not ignored: an
    issuer that means something by it must not have it silently dropped."""
    t = sign_raw(codec, own_header(codec), own_claims(admin=True))
    assert code_of(codec, t) == "token_claims_invalid"
    t = sign_raw(codec, own_header(codec), own_claims(peer={"uid": 1000, "gid": 0}))
    assert code_of(codec, t) == "token_claims_invalid"


def test_claims_are_immutable_and_keyword_only(codec: TokenCodec) -> None:
    """Verified claims cannot be changed after the signature check, and are never built from
    positional arguments (a swapped uid/pid or sub/tool would still type-check)."""
    claims = codec.verify(issue(codec), now=NOW).claims
    with pytest.raises(AttributeError):
        claims.tool = "delete_everything"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        claims.peer.uid = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        PeerClaim(1000, 42)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        ResolutionClaims(*msgspec.structs.astuple(claims))  # type: ignore[call-arg]


def test_deep_json_refused_in_header_or_payload(codec: TokenCodec) -> None:
    """Nesting deeper than MAX_JSON_DEPTH in either segment alone is malformed (checked
    before decoding, so it never reaches a decoder or the claims check)."""
    deep: object = []
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = [deep]
    t = sign_raw(codec, own_header(codec, x=deep), own_claims())
    assert code_of(codec, t) == "token_malformed"
    t = sign_raw(codec, own_header(codec), own_claims(x=deep))
    assert code_of(codec, t) == "token_malformed"


def test_header_and_payload_must_each_be_objects(codec: TokenCodec) -> None:
    """A header or payload that is JSON but not an object is malformed (not a crash)."""
    for header, claims in (([own_header(codec)], own_claims()), (own_header(codec), [own_claims()]),
                           ("x", own_claims()), (own_header(codec), 1)):
        assert code_of(codec, sign_raw(codec, header, claims)) == "token_malformed"


def test_iss_and_kid_must_each_be_strings(codec: TokenCodec) -> None:
    """A missing or non-string kid, or a non-string iss, is malformed, whichever one is wrong
    (an unhashable one must not crash the key lookup)."""
    header = own_header(codec)
    del header["kid"]
    cases = [
        (header, own_claims()),
        (own_header(codec, kid=1), own_claims()),
        (own_header(codec, kid=["x"]), own_claims()),
        (own_header(codec), own_claims(iss=["sidekey:test"])),
        (own_header(codec), own_claims(iss=7)),
    ]
    for h, c in cases:
        assert code_of(codec, sign_raw(codec, h, c)) == "token_malformed", (h, c)


def test_signature_check_fails_closed_when_the_key_is_refused(keyset_path: Path) -> None:
    """If pyjwt refuses the configured HMAC key (here: 32 bytes that look like an SSH public
    key), no token verifies: neither a forged one nor one honestly signed under it."""
    secret = b"ssh-rsa " + b"k" * (HMAC_KEY_BYTES - 8)
    key = HmacKey(kid="hs-odd", secret=secret, created=NOW)
    codec = TokenCodec(issuer="sidekey:test", keyset=KeySet(active=key, keys={key.kid: key}))
    honest = sign_raw(codec, own_header(codec), own_claims())
    assert code_of(codec, honest) == "token_bad_signature"
    head, payload, _ = honest.split(".")
    assert code_of(codec, f"{head}.{payload}.{'A' * 43}") == "token_bad_signature"


@pytest.mark.parametrize("exc", [ValueError("bad"), TypeError("bad"), jwt.InvalidKeyError("bad")])
def test_signature_check_fails_closed_when_verify_raises(
    codec: TokenCodec, monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    """Whatever the signature algorithm raises is a bad signature (401), never an accept and
    never an unhandled exception."""

    def boom(*_: object) -> bool:
        raise exc

    monkeypatch.setattr(sidekey.tokens._HS256, "verify", boom)
    assert code_of(codec, issue(codec)) == "token_bad_signature"


def test_key_set_created_with_missing_parents_private(tmp_path: Path) -> None:
    """rotate_keyset / generate_ed25519 create every missing directory, mode 0700, and write
    their file 0600."""
    path = tmp_path / "a" / "b" / "token-keys.json"
    rotate_keyset(path, now=NOW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    load_keyset(path)
    pem = tmp_path / "c" / "d" / "issuer.pem"
    generate_ed25519(pem)
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert stat.S_IMODE(pem.parent.stat().st_mode) == 0o700
    load_ed25519_private(pem)


def _keyset_doc(path: Path) -> dict[str, object]:
    doc: dict[str, object] = json.loads(path.read_text())
    return doc


def _write_keyset(path: Path, content: object) -> None:
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    os.chmod(path, 0o600)


def test_key_set_accepts_padded_keys(keyset_path: Path) -> None:
    """Key material in the key-set file is read leniently: an operator who re-pads a key with
    "=" (standard base64url) still has a working key set, with the same key."""
    before = load_keyset(keyset_path)
    doc = _keyset_doc(keyset_path)
    for k in doc["keys"]:  # type: ignore[attr-defined]
        k["k"] += "=" * (-len(k["k"]) % 4)
        assert k["k"].endswith("=")
    _write_keyset(keyset_path, doc)
    assert load_keyset(keyset_path).active.secret == before.active.secret


def _malformed_keysets(good: dict[str, object]) -> list[object]:
    key = good["keys"][0]  # type: ignore[index]
    return [
        b"not json", b"", b"[]", b'"text"', b"1", b"null",
        {}, {**good, "format": "other"}, {**good, "keys": []}, {**good, "active": "nope"},
        {**good, "keys": 5}, {**good, "keys": [1]}, {**good, "keys": [None]},
        {**good, "keys": [{**key, "k": 5}]}, {**good, "keys": [{**key, "created": "soon"}]},
        {**good, "keys": [{**key, "created": None}]}, {**good, "keys": [{"kid": key["kid"]}]},
        {**good, "keys": [{**key, "kid": ["x"]}]}, {**good, "keys": [{**key, "k": "AAAA"}]},
        {**good, "active": 1, "keys": [{**key, "kid": 1}]},
    ]


def test_malformed_key_set_is_a_config_error_naming_the_file(keyset_path: Path) -> None:
    """Every malformed key-set file is a ConfigError that names the file: never a traceback,
    never a key set that loads with the wrong (or no) keys."""
    good = _keyset_doc(keyset_path)
    for content in _malformed_keysets(good):
        _write_keyset(keyset_path, content)
        with pytest.raises(ConfigError) as ei:
            load_keyset(keyset_path)
        assert str(keyset_path) in str(ei.value), content


def test_key_set_file_checks(keyset_path: Path) -> None:
    """The key-set file must be a regular file, not group/other accessible in any way, owned
    by us or root; a directory in its place or an unreadable file is a ConfigError."""
    for mode in (0o640, 0o604, 0o610, 0o601, 0o620, 0o602):
        os.chmod(keyset_path, mode)
        with pytest.raises(ConfigError, match="too open"):
            load_keyset(keyset_path)
    os.chmod(keyset_path, 0o400)
    load_keyset(keyset_path)
    os.chmod(keyset_path, 0o600)
    os.chown(keyset_path, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        load_keyset(keyset_path)
    os.chown(keyset_path, 0, 0)
    load_keyset(keyset_path)
    a_dir = keyset_path.parent / "dir.json"
    a_dir.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_keyset(a_dir)


def test_ed25519_public_key_text_forms(tmp_path: Path) -> None:
    """A configured public key is raw 32 bytes in base64url, with or without "=" padding; any
    other length or alphabet soup is a ConfigError (not a traceback)."""
    raw = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    text = base64.urlsafe_b64encode(raw).decode()
    assert text.endswith("=")
    for form in (text, text.rstrip("=")):
        got = load_ed25519_public(form, None).public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert got == raw
    for bad in ("", "AAAA", text.rstrip("=") + "AAAA", "ab"):
        with pytest.raises(ConfigError, match="invalid Ed25519 public key") as ei:
            load_ed25519_public(bad, None)
        assert "None" not in str(ei.value)
    with pytest.raises(ConfigError, match="needs a public key"):
        load_ed25519_public(None, None)


def test_ed25519_public_key_file_errors_name_the_file(tmp_path: Path) -> None:
    """A key file that is Ed25519 PEM loads; a missing file, a file that is not PEM, and a PEM
    key of another type are each a ConfigError naming the file."""
    priv = Ed25519PrivateKey.generate()
    good = tmp_path / "issuer.pub.pem"
    good.write_bytes(priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert load_ed25519_public(None, good).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    ) == priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ec_pub = tmp_path / "ec.pub.pem"
    ec_pub.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    for path in (tmp_path / "missing.pem", garbage, empty, ec_pub, tmp_path):
        with pytest.raises(ConfigError) as ei:
            load_ed25519_public(None, path)
        assert str(path) in str(ei.value), path
    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        load_ed25519_public(None, ec_pub)
