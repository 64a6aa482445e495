"""OAuthVerifier against a real OAuth2/OIDC issuer on loopback (tests/oauth_issuer.py).

Token times, caches and refresh limits run on an injected clock (``FakeClock``); the
HTTP fetches are real, so every test runs under a ``trio.fail_after`` limit and every
failure case asserts that it came back within its bound.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import msgspec
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric import rsa

from oauth_issuer import DEFAULT_SUBJECT, OAuthIssuer, b64url, public_jwk
from sidekey import oauth
from sidekey.config import OAuth2Config
from sidekey.oauth import MAX_TOKEN_CHARS, OAuthVerifier
from sidekey.protocol import AccessToken, TokenError, Unavailable

LIMIT_S = 15.0  # per test; the verifier's own bounds are far smaller
START = 1_800_000_000.0
LEEWAY = 30


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def cfg(**fields: Any) -> OAuth2Config:
    """Build the config section the way the daemon does: by decoding."""
    return msgspec.convert(fields, OAuth2Config)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def issuer(clock: FakeClock) -> Iterator[OAuthIssuer]:
    with OAuthIssuer(clock=clock) as iss:
        yield iss


@pytest.fixture
async def make_verifier(clock: FakeClock, tmp_path: Path) -> AsyncIterator[Callable[..., OAuthVerifier]]:
    made: list[OAuthVerifier] = []

    def make(**kw: Any) -> OAuthVerifier:
        kw.setdefault("base_dir", tmp_path)
        kw.setdefault("clock", clock)
        kw.setdefault("fetch_timeout_s", 2.0)
        kw.setdefault("leeway_s", LEEWAY)
        verifier = OAuthVerifier(**kw)
        made.append(verifier)
        return verifier

    yield make
    for verifier in made:
        await verifier.aclose()


@pytest.fixture
def verifier(make_verifier: Callable[..., OAuthVerifier]) -> OAuthVerifier:
    return make_verifier()


@pytest.fixture
def sig_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every signature check the verifier makes (by alg)."""
    calls: list[str] = []
    real = oauth._verify_signature

    def counting(alg: str, key: Any, signing_input: bytes, signature: bytes) -> bool:
        calls.append(alg)
        return real(alg, key, signing_input, signature)

    monkeypatch.setattr(oauth, "_verify_signature", counting)
    return calls


async def refused(verifier: OAuthVerifier, token: str, conf: OAuth2Config) -> TokenError:
    with pytest.raises(TokenError) as ei:
        await verifier.verify(token, conf)
    err = ei.value
    if token:
        assert token not in err.message and token not in str(err)
    if token.count(".") == 2 and len(token) > 40:
        assert token.split(".")[2] not in err.message or not token.split(".")[2]
    return err


async def unavailable(verifier: OAuthVerifier, token: str, conf: OAuth2Config) -> Unavailable:
    with pytest.raises(Unavailable) as ei:
        await verifier.verify(token, conf)
    assert ei.value.code == "jwks_unavailable"
    assert ei.value.status == 503
    assert token not in ei.value.message
    return ei.value


# --------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_valid_token_each_algorithm(issuer: OAuthIssuer, verifier: OAuthVerifier, alg: str) -> None:
    with trio.fail_after(LIMIT_S):
        claims = issuer.claims(scope="articles:read articles:write")
        token = issuer.mint(claims, alg=alg)
        got = await verifier.verify(token, cfg(**issuer.oauth2()))
    assert got == AccessToken(
        issuer=issuer.issuer,
        subject=DEFAULT_SUBJECT,
        audience=(issuer.audience,),
        scopes=frozenset({"articles:read", "articles:write"}),
        expires_at=claims["exp"],
        client_id="test-agent",
        # string claims keep azp / client_id too (policy.agent_claims binds the agent to them)
        string_claims=tuple(sorted((k, v) for k, v in claims.items()
                                   if k in ("azp", "client_id") and isinstance(v, str))),
    )
    assert issuer.counts["oidc"] == 1 and issuer.counts["jwks"] == 1


async def test_scp_list_and_azp(issuer: OAuthIssuer, verifier: OAuthVerifier) -> None:
    with trio.fail_after(LIMIT_S):
        claims = issuer.claims(scope=None, scp=["db:read", "db:write"], client_id=None, azp="cli-7")
        got = await verifier.verify(issuer.mint(claims), cfg(**issuer.oauth2()))
    assert got.scopes == {"db:read", "db:write"}
    assert got.client_id == "cli-7"


async def test_scp_as_string_and_no_scopes(issuer: OAuthIssuer, verifier: OAuthVerifier) -> None:
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        got = await verifier.verify(issuer.mint(issuer.claims(scope=None, scp="a b")), conf)
        assert got.scopes == {"a", "b"}
        got = await verifier.verify(issuer.mint(issuer.claims(scope=None, client_id=None)), conf)
        assert got.scopes == frozenset() and got.client_id is None


async def test_audience_list_containing_ours(issuer: OAuthIssuer, verifier: OAuthVerifier) -> None:
    with trio.fail_after(LIMIT_S):
        aud = ["https://other.example.test", issuer.audience]
        got = await verifier.verify(issuer.mint(issuer.claims(aud=aud)), cfg(**issuer.oauth2()))
    assert got.audience == tuple(aud)


async def test_leeway_accepts_slightly_expired(
    issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock
) -> None:
    with trio.fail_after(LIMIT_S):
        token = issuer.mint(issuer.claims(ttl=60, nbf=int(clock.now) + 10))
        await verifier.verify(token, cfg(**issuer.oauth2()))  # nbf within leeway
        clock.advance(60 + LEEWAY - 1)
        await verifier.verify(token, cfg(**issuer.oauth2()))  # exp within leeway


# --------------------------------------------------------------------------- key sources


async def test_discovery_rfc8414_fallback_for_issuer_with_path(
    clock: FakeClock, make_verifier: Callable[..., OAuthVerifier]
) -> None:
    with OAuthIssuer(path="/realms/test", discovery="oauth", clock=clock) as iss, trio.fail_after(LIMIT_S):
        assert iss.oauth_path == "/.well-known/oauth-authorization-server/realms/test"
        got = await make_verifier().verify(iss.mint(iss.claims(), alg="EdDSA"), cfg(**iss.oauth2()))
        assert got.issuer == iss.base_url + "/realms/test"
        # OIDC appends to the issuer (404 here), RFC 8414 inserts before the path.
        assert iss.requests == [
            "/realms/test/.well-known/openid-configuration",
            "/.well-known/oauth-authorization-server/realms/test",
            "/jwks.json",
        ]


async def test_discovery_oidc_for_issuer_with_path(
    clock: FakeClock, make_verifier: Callable[..., OAuthVerifier]
) -> None:
    with OAuthIssuer(path="/tenant1", discovery="oidc", clock=clock) as iss, trio.fail_after(LIMIT_S):
        await make_verifier().verify(iss.mint(iss.claims()), cfg(**iss.oauth2()))
        assert iss.requests == ["/tenant1/.well-known/openid-configuration", "/jwks.json"]


async def test_explicit_jwks_uri_skips_discovery(
    clock: FakeClock, make_verifier: Callable[..., OAuthVerifier]
) -> None:
    with OAuthIssuer(discovery="none", clock=clock) as iss, trio.fail_after(LIMIT_S):
        conf = cfg(**iss.oauth2(jwks_uri=iss.jwks_uri))
        await make_verifier().verify(iss.mint(iss.claims(), alg="ES256"), conf)
        assert iss.requests == ["/jwks.json"]


async def test_discovery_is_reused_across_refreshes(
    issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock
) -> None:
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        clock.advance(400)  # past jwks_ttl_s: keys refreshed, discovery document kept
        await verifier.verify(issuer.mint(issuer.claims()), conf)
    assert issuer.counts["discovery"] == 1 and issuer.counts["jwks"] == 2


async def test_jwks_file_and_reload_on_change(
    issuer: OAuthIssuer, make_verifier: Callable[..., OAuthVerifier], clock: FakeClock, tmp_path: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        issuer.write_jwks(tmp_path / "jwks.json")
        verifier = make_verifier(base_dir=tmp_path)
        conf = cfg(issuer="https://idp.airgapped.example", audience="api", jwks_file="jwks.json")
        claims = issuer.claims(iss=conf.issuer, aud="api")
        old = issuer.mint(claims)
        assert (await verifier.verify(old, conf)).subject == DEFAULT_SUBJECT

        issuer.rotate()  # old keys withdrawn
        issuer.write_jwks(tmp_path / "jwks.json")
        new = issuer.mint(claims)
        # The file is re-stat'ed at most once a second.
        assert (await refused(verifier, new, conf)).code == "token_unknown_key"
        clock.advance(1.5)
        assert (await verifier.verify(new, conf)).subject == DEFAULT_SUBJECT
        # The old token was cached, but under the previous key set: not used any more.
        assert (await refused(verifier, old, conf)).code == "token_unknown_key"
        status = verifier.status()["issuers"][0]
        assert status["source"] == "jwks_file" and status["generation"] == 2
        assert status["location"] == str(tmp_path / "jwks.json")
    assert issuer.requests == []  # air-gapped: no HTTP at all


async def test_jwks_file_touched_but_unchanged_keeps_cache(
    issuer: OAuthIssuer, make_verifier: Callable[..., OAuthVerifier], clock: FakeClock,
    tmp_path: Path, sig_checks: list[str],
) -> None:
    with trio.fail_after(LIMIT_S):
        path = issuer.write_jwks(tmp_path / "jwks.json")
        verifier = make_verifier()
        conf = cfg(issuer=issuer.issuer, audience=issuer.audience, jwks_file=str(path))
        token = issuer.mint(issuer.claims())
        await verifier.verify(token, conf)
        issuer.write_jwks(path)  # same keys, new mtime
        clock.advance(2)
        await verifier.verify(token, conf)
        assert sig_checks == ["RS256"]
        assert verifier.status()["issuers"][0]["generation"] == 1


async def test_jwks_file_missing_or_invalid(
    issuer: OAuthIssuer, verifier: OAuthVerifier, tmp_path: Path, clock: FakeClock
) -> None:
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2(jwks_file="nope.json"))
        err = await unavailable(verifier, issuer.mint(issuer.claims()), conf)
        assert "does not exist" in err.message
        (tmp_path / "bad.json").write_text("{not json")
        err = await unavailable(verifier, issuer.mint(issuer.claims()), cfg(**issuer.oauth2(jwks_file="bad.json")))
        assert "not valid JSON" in err.message


# --------------------------------------------------------------------------- the attack matrix


def _hs256_with_public_pem(iss: OAuthIssuer) -> str:
    return iss.mint(iss.claims(), alg="HS256", kid=iss.kids["RS256"], key=iss.public_pem("RS256"))


def _tampered(iss: OAuthIssuer) -> str:
    header, _, sig = iss.mint(iss.claims()).split(".")
    payload = b64url(json.dumps(iss.claims(sub="mallory")).encode())
    return f"{header}.{payload}.{sig}"


def _foreign_key(iss: OAuthIssuer) -> str:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return iss.mint(iss.claims(), kid=iss.kids["RS256"], key=other)


def _raw(iss: OAuthIssuer, header: bytes, payload: bytes) -> str:
    return iss.sign(header, payload, alg="RS256", key=iss.private_key("RS256"))


def _dup_claim(iss: OAuthIssuer) -> str:
    claims = json.dumps(iss.claims())[:-1] + ', "sub": "mallory"}'
    header = json.dumps({"alg": "RS256", "kid": iss.kids["RS256"]})
    return _raw(iss, header.encode(), claims.encode())


ATTACKS: dict[str, tuple[Callable[[OAuthIssuer], str], str]] = {
    "alg none": (lambda i: i.mint(i.claims(), alg="none", kid=i.kids["RS256"]), "token_wrong_algorithm"),
    "alg none no kid": (lambda i: i.mint(i.claims(), alg="none"), "token_wrong_algorithm"),
    "alg None casing": (lambda i: i.mint(i.claims(), alg="None", kid=i.kids["RS256"]), "token_wrong_algorithm"),
    "hs256 with rsa public pem": (_hs256_with_public_pem, "token_wrong_algorithm"),
    "rs512": (lambda i: i.mint(i.claims(), alg="RS512", kid=i.kids["RS256"], key=i.private_key("RS256")), "token_wrong_algorithm"),
    "ps256": (lambda i: i.mint(i.claims(), alg="PS256", kid=i.kids["RS256"], key=i.private_key("RS256")), "token_wrong_algorithm"),
    "es256 header on rsa kid": (lambda i: i.mint(i.claims(), alg="ES256", kid=i.kids["RS256"]), "token_wrong_algorithm"),
    "alg not a string": (lambda i: i.mint(i.claims(), headers={"alg": ["RS256"]}), "token_wrong_algorithm"),
    "no alg": (lambda i: i.mint(i.claims(), headers={"alg": None}), "token_wrong_algorithm"),
    "jku": (lambda i: i.mint(i.claims(), headers={"jku": i.jwks_uri}), "token_forbidden_header"),
    "x5u": (lambda i: i.mint(i.claims(), headers={"x5u": "https://evil.example/cert.pem"}), "token_forbidden_header"),
    "jwk": (lambda i: i.mint(i.claims(), headers={"jwk": i.jwks()["keys"][0]}), "token_forbidden_header"),
    "x5c": (lambda i: i.mint(i.claims(), headers={"x5c": ["MIIB"]}), "token_forbidden_header"),
    "crit": (lambda i: i.mint(i.claims(), headers={"crit": ["exp"], "exp": 1}), "token_forbidden_header"),
    "no kid": (lambda i: i.mint(i.claims(), headers={"kid": None}), "token_unknown_key"),
    "empty kid": (lambda i: i.mint(i.claims(), headers={"kid": ""}), "token_unknown_key"),
    "unknown kid": (lambda i: i.mint(i.claims(), kid="not-published"), "token_unknown_key"),
    "tampered payload": (_tampered, "token_bad_signature"),
    "signed by another key": (_foreign_key, "token_bad_signature"),
    "truncated signature": (lambda i: i.mint(i.claims(), alg="ES256")[:-8], "token_bad_signature"),
    "expired": (lambda i: i.mint(i.claims(now=START - 400)), "token_expired"),
    "nbf in the future": (lambda i: i.mint(i.claims(nbf=int(START) + 120)), "token_not_yet_valid"),
    "iat in the future": (lambda i: i.mint(i.claims(now=START + 120)), "token_not_yet_valid"),
    "missing exp": (lambda i: i.mint(i.claims(exp=None)), "token_claims_invalid"),
    "exp not a number": (lambda i: i.mint(i.claims(exp="never")), "token_claims_invalid"),
    "exp a bool": (lambda i: i.mint(i.claims(exp=True)), "token_claims_invalid"),
    "missing iss": (lambda i: i.mint(i.claims(iss=None)), "token_claims_invalid"),
    "missing aud": (lambda i: i.mint(i.claims(aud=None)), "token_claims_invalid"),
    "missing sub": (lambda i: i.mint(i.claims(sub=None)), "token_claims_invalid"),
    "empty sub": (lambda i: i.mint(i.claims(sub="")), "token_claims_invalid"),
    "aud not strings": (lambda i: i.mint(i.claims(aud=[1, 2])), "token_claims_invalid"),
    "scope not a string": (lambda i: i.mint(i.claims(scope=7)), "token_claims_invalid"),
    "scp not strings": (lambda i: i.mint(i.claims(scp=[1])), "token_claims_invalid"),
    "wrong issuer": (lambda i: i.mint(i.claims(iss="https://evil.example")), "issuer_mismatch"),
    "issuer trailing slash": (lambda i: i.mint(i.claims(iss=i.issuer + "/")), "issuer_mismatch"),
    "wrong audience": (lambda i: i.mint(i.claims(aud="https://other.example.test")), "audience_mismatch"),
    "audience list without ours": (lambda i: i.mint(i.claims(aud=["a", "b"])), "audience_mismatch"),
    "lone surrogate sub": (lambda i: i.mint(i.claims(sub="\ud800")), "token_claims_invalid"),
    "utf-16 payload": (lambda i: _raw(i, json.dumps({"alg": "RS256", "kid": i.kids["RS256"]}).encode(), json.dumps(i.claims()).encode("utf-16")), "token_malformed"),
    "duplicate claim": (_dup_claim, "token_malformed"),
    "header is a list": (lambda i: _raw(i, b"[1]", json.dumps(i.claims()).encode()), "token_malformed"),
    "payload is a string": (lambda i: _raw(i, json.dumps({"alg": "RS256", "kid": i.kids["RS256"]}).encode(), b'"x"'), "token_malformed"),
    "NaN exp": (lambda i: _raw(i, json.dumps({"alg": "RS256", "kid": i.kids["RS256"]}).encode(), json.dumps(i.claims()).replace('"exp": ', '"exp": NaN, "x": ').encode()), "token_malformed"),
}

GARBAGE = [
    "",
    "garbage",
    "a.b",
    "a.b.c.d",
    "..",
    "!!!.eyJ9.sig",
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0=.c2ln",  # padded base64
    "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln",  # payload not JSON
    "Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
    "é.é.é",
    "a" * (MAX_TOKEN_CHARS + 1),
]


@pytest.mark.parametrize("name", list(ATTACKS))
async def test_attack_matrix(issuer: OAuthIssuer, verifier: OAuthVerifier, name: str) -> None:
    build, code = ATTACKS[name]
    with trio.fail_after(LIMIT_S):
        token = build(issuer)
        err = await refused(verifier, token, cfg(**issuer.oauth2()))
    assert err.code == code, err.message
    assert err.status == (403 if code == "audience_mismatch" else 401)
    assert isinstance(err, TokenError)


@pytest.mark.parametrize("token", GARBAGE, ids=range(len(GARBAGE)))
async def test_garbage_is_malformed(issuer: OAuthIssuer, verifier: OAuthVerifier, token: str) -> None:
    with trio.fail_after(LIMIT_S):
        err = await refused(verifier, token, cfg(**issuer.oauth2()))
    assert err.code == "token_malformed"
    assert issuer.requests == []  # nothing fetched for garbage


async def test_wrong_issuer_fetches_nothing(issuer: OAuthIssuer, verifier: OAuthVerifier) -> None:
    with trio.fail_after(LIMIT_S):
        token = issuer.mint(issuer.claims(iss="https://evil.example"), kid="evil-kid")
        assert (await refused(verifier, token, cfg(**issuer.oauth2()))).code == "issuer_mismatch"
    assert issuer.requests == []


async def test_alg_outside_the_servers_pinned_list(
    issuer: OAuthIssuer, verifier: OAuthVerifier, sig_checks: list[str]
) -> None:
    with trio.fail_after(LIMIT_S):
        token = issuer.mint(issuer.claims(), alg="ES256")
        # Verified (and cached) for a server that accepts ES256 ...
        await verifier.verify(token, cfg(**issuer.oauth2()))
        # ... but refused for one pinned to RS256, even though the cache holds it.
        pinned = cfg(**issuer.oauth2(algorithms=["RS256"]))
        err = await refused(verifier, token, pinned)
        assert err.code == "token_wrong_algorithm"
        assert "RS256" in err.message
        assert (await verifier.verify(issuer.mint(issuer.claims()), pinned)).subject == DEFAULT_SUBJECT
    assert sig_checks == ["ES256", "RS256"]


# --------------------------------------------------------------------------- refresh rules


async def test_unknown_kid_refreshes_once_then_rate_limited(
    issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock
) -> None:
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        assert issuer.counts["jwks"] == 1
        # Within refresh_min_interval_s of the last fetch: no fetch for an unknown kid.
        assert (await refused(verifier, issuer.mint(issuer.claims(), kid="k1"), conf)).code == "token_unknown_key"
        assert issuer.counts["jwks"] == 1
        clock.advance(31)
        assert (await refused(verifier, issuer.mint(issuer.claims(), kid="k2"), conf)).code == "token_unknown_key"
        assert issuer.counts["jwks"] == 2  # exactly one refresh
        assert (await refused(verifier, issuer.mint(issuer.claims(), kid="k3"), conf)).code == "token_unknown_key"
        assert issuer.counts["jwks"] == 2  # rate-limited
        clock.advance(31)
        await refused(verifier, issuer.mint(issuer.claims(), kid="k4"), conf)
        assert issuer.counts["jwks"] == 3
    assert issuer.counts["discovery"] == 1


async def test_one_verification_loads_the_keys_at_most_once_without_a_rate_limit(
    issuer: OAuthIssuer, make_verifier: Callable[..., OAuthVerifier]
) -> None:
    """With refresh_min_interval_s 0 every load is due at once again: a token with an
    unknown kid costs one JWKS fetch and is refused (not a fetch loop), and so does a
    verification while the JWKS endpoint fails."""
    verifier = make_verifier(refresh_min_interval_s=0)
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        assert issuer.counts["jwks"] == 1
        err = await refused(verifier, issuer.mint(issuer.claims(), kid="unknown"), conf)
        assert err.code == "token_unknown_key"
        assert issuer.counts["jwks"] == 2
    fresh = make_verifier(refresh_min_interval_s=0)
    issuer.add_route("/jwks.json", status=500, body=b"down")
    with trio.fail_after(LIMIT_S), pytest.raises(Unavailable):
        await fresh.verify(issuer.mint(issuer.claims()), conf)
    assert issuer.counts["jwks"] == 3


async def test_concurrent_loads_coalesce(issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock) -> None:
    conf = cfg(**issuer.oauth2())
    results: list[AccessToken] = []

    async def one(alg: str) -> None:
        results.append(await verifier.verify(issuer.mint(issuer.claims(), alg=alg), conf))

    with trio.fail_after(LIMIT_S):
        issuer.set_delay(0.2)
        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(one, ("RS256", "ES256", "EdDSA")[i % 3])
        assert len(results) == 12
        assert issuer.counts["discovery"] == 1 and issuer.counts["jwks"] == 1

        # A rotation with overlap: many callers with the new kid share one refresh.
        issuer.rotate(keep_old=True)
        clock.advance(31)
        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(one, ("RS256", "ES256", "EdDSA")[i % 3])
        assert len(results) == 24
        assert issuer.counts["jwks"] == 2


async def test_refresh_after_ttl_even_for_cache_hits(
    issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock, sig_checks: list[str]
) -> None:
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        token = issuer.mint(issuer.claims(ttl=3600))
        await verifier.verify(token, conf)
        clock.advance(301)  # past jwks_ttl_s
        await verifier.verify(token, conf)
        assert issuer.counts["jwks"] == 2  # the key set was refreshed ...
        assert sig_checks == ["RS256"]  # ... unchanged, so the cached entry still counts


# --------------------------------------------------------------------------- verified-token cache


async def test_cache_hit_skips_signature_and_ends_at_exp(
    issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock, sig_checks: list[str]
) -> None:
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        token = issuer.mint(issuer.claims(ttl=120), alg="EdDSA")
        first = await verifier.verify(token, conf)
        for _ in range(5):
            assert await verifier.verify(token, conf) == first
        assert sig_checks == ["EdDSA"]
        assert verifier.status()["cache"]["size"] == 1

        clock.advance(120)  # at exp: the entry is no longer used; leeway still accepts it
        assert await verifier.verify(token, conf) == first
        assert sig_checks == ["EdDSA", "EdDSA"]
        clock.advance(LEEWAY + 1)
        assert (await refused(verifier, token, conf)).code == "token_expired"


async def test_cache_is_per_audience_and_not_for_failures(
    issuer: OAuthIssuer, verifier: OAuthVerifier, sig_checks: list[str]
) -> None:
    with trio.fail_after(LIMIT_S):
        token = issuer.mint(issuer.claims(aud=[issuer.audience, "b"]))
        await verifier.verify(token, cfg(**issuer.oauth2()))
        await verifier.verify(token, cfg(**issuer.oauth2(audience="b")))
        assert len(sig_checks) == 2  # a separate entry per (issuer, audience)
        err = await refused(verifier, token, cfg(**issuer.oauth2(audience="c")))
        assert err.code == "audience_mismatch" and err.status == 403
        await refused(verifier, token, cfg(**issuer.oauth2(audience="c")))
        assert len(sig_checks) == 4  # failures are not cached
        bad = _tampered(issuer)
        for _ in range(2):
            assert (await refused(verifier, bad, cfg(**issuer.oauth2()))).code == "token_bad_signature"
        assert len(sig_checks) == 6


async def test_cache_is_bounded_lru(
    issuer: OAuthIssuer, make_verifier: Callable[..., OAuthVerifier], sig_checks: list[str]
) -> None:
    with trio.fail_after(LIMIT_S):
        verifier = make_verifier(cache_size=2)
        conf = cfg(**issuer.oauth2())
        a, b, c = (issuer.mint(issuer.claims()) for _ in range(3))
        for token in (a, b, a, c):  # c evicts b (least recently used), not a
            await verifier.verify(token, conf)
        assert verifier.status()["cache"] == {"size": 2, "max": 2}
        assert len(sig_checks) == 3
        await verifier.verify(a, conf)
        assert len(sig_checks) == 3
        await verifier.verify(b, conf)
        assert len(sig_checks) == 4


async def test_rotation_invalidates_cached_tokens(
    issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock, sig_checks: list[str]
) -> None:
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        old = issuer.mint(issuer.claims(ttl=3600))
        await verifier.verify(old, conf)
        await verifier.verify(old, conf)
        assert sig_checks == ["RS256"]

        issuer.rotate()  # old keys withdrawn, new kids
        clock.advance(31)
        new = issuer.mint(issuer.claims(ttl=3600))
        assert (await verifier.verify(new, conf)).subject == DEFAULT_SUBJECT
        assert issuer.counts["jwks"] == 2
        # The old token's cache entry belongs to the previous key set: it is not used,
        # and its key is gone.
        assert (await refused(verifier, old, conf)).code == "token_unknown_key"
        assert verifier.status()["issuers"][0]["generation"] == 2


async def test_overlap_rotation_reverifies_old_tokens(
    issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock, sig_checks: list[str]
) -> None:
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        old = issuer.mint(issuer.claims(ttl=3600))
        await verifier.verify(old, conf)
        issuer.rotate(keep_old=True)
        clock.advance(31)
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        await verifier.verify(old, conf)  # still valid, but checked again under the new set
        assert sig_checks == ["RS256", "RS256", "RS256"]


# --------------------------------------------------------------------------- an unreachable issuer


async def test_issuer_slow_gives_unavailable_within_timeout(
    issuer: OAuthIssuer, make_verifier: Callable[..., OAuthVerifier]
) -> None:
    verifier = make_verifier(fetch_timeout_s=0.5)
    issuer.set_delay(30)
    with trio.fail_after(LIMIT_S):
        err = await unavailable(verifier, issuer.mint(issuer.claims()), cfg(**issuer.oauth2()))
    # Ended by the verifier's own 0.5 s timeout (it says so), not by a wall-clock guess here.
    assert "timed out after 0.5s" in err.message
    assert verifier.status()["issuers"][0]["last_error"] == "timed out after 0.5s"


@pytest.mark.parametrize("refuse", [False, True], ids=["http-500", "connection-refused"])
async def test_issuer_down_without_cached_keys(
    issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock, refuse: bool
) -> None:
    conf = cfg(**issuer.oauth2())
    token = issuer.mint(issuer.claims())
    with trio.fail_after(LIMIT_S):
        issuer.set_down(True, refuse=refuse)
        err = await unavailable(verifier, token, conf)
        assert ("ConnectError" if refuse else "HTTP 500") in err.message
        assert issuer.issuer in err.message
        seen = list(issuer.requests)
        # Failed just now: callers get a fast 503 without hammering the issuer.
        await unavailable(verifier, token, conf)
        assert issuer.requests == seen
        issuer.set_down(False)
        clock.advance(3)
        assert (await verifier.verify(token, conf)).subject == DEFAULT_SUBJECT


async def test_cached_keys_survive_a_failed_refresh(
    issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        issuer.set_down(True)
        clock.advance(301)  # keys stale: a refresh is due, and fails
        got = await verifier.verify(issuer.mint(issuer.claims(), alg="ES256"), conf)
        assert got.subject == DEFAULT_SUBJECT
        assert issuer.counts["jwks"] == 2
        status = verifier.status()["issuers"][0]
        assert "HTTP 500" in status["last_error"] and status["fetched_at"] == START
        assert any("keeping 3 cached key(s)" in r.getMessage() for r in caplog.records)
        # An unknown kid is still a token error, not an outage.
        clock.advance(31)
        err = await refused(verifier, issuer.mint(issuer.claims(), kid="new"), conf)
        assert err.code == "token_unknown_key"
        issuer.set_down(False)
        clock.advance(31)
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        assert verifier.status()["issuers"][0]["last_error"] is None


# --------------------------------------------------------------------------- what is fetched, and how


async def test_discovery_document_for_another_issuer_is_refused(
    issuer: OAuthIssuer, verifier: OAuthVerifier
) -> None:
    issuer.discovery_overrides = {"issuer": "https://evil.example"}
    with trio.fail_after(LIMIT_S):
        err = await unavailable(verifier, issuer.mint(issuer.claims()), cfg(**issuer.oauth2()))
    assert "'https://evil.example'" in err.message and "identical" in err.message
    assert issuer.counts["jwks"] == 0


async def test_discovery_document_without_jwks_uri(issuer: OAuthIssuer, verifier: OAuthVerifier) -> None:
    issuer.discovery_overrides = {"jwks_uri": None}
    with trio.fail_after(LIMIT_S):
        err = await unavailable(verifier, issuer.mint(issuer.claims()), cfg(**issuer.oauth2()))
    assert "has no jwks_uri" in err.message


async def test_discovered_plain_http_jwks_uri_is_refused(issuer: OAuthIssuer, verifier: OAuthVerifier) -> None:
    issuer.discovery_overrides = {"jwks_uri": "http://keys.example.test/jwks.json"}
    with trio.fail_after(LIMIT_S):
        err = await unavailable(verifier, issuer.mint(issuer.claims()), cfg(**issuer.oauth2()))
    assert "must use https" in err.message


@pytest.mark.parametrize(
    "fields",
    [
        {"issuer": "https://idp.example.test", "jwks_uri": "http://192.0.2.10/jwks.json"},
        {"issuer": "http://idp.example.test"},  # discovery over plain http
        {"issuer": "https://idp.example.test", "jwks_uri": "https://user:pw@idp.example.test/jwks"},
        {"issuer": "https://idp.example.test", "jwks_uri": "ftp://idp.example.test/jwks"},
    ],
    ids=["http-jwks-uri", "http-issuer", "credentials", "ftp"],
)
async def test_insecure_urls_refused_without_a_request(
    issuer: OAuthIssuer, make_verifier: Callable[..., OAuthVerifier],
    monkeypatch: pytest.MonkeyPatch, fields: dict[str, str],
) -> None:
    async def no_requests(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a request was sent")

    monkeypatch.setattr(httpx.AsyncClient, "send", no_requests)
    verifier = make_verifier()
    conf = cfg(audience=issuer.audience, **fields)
    token = issuer.mint(issuer.claims(iss=fields["issuer"]))
    with trio.fail_after(1.0):
        err = await unavailable(verifier, token, conf)
    assert "https" in err.message or "credentials" in err.message


async def test_redirects_are_not_followed(issuer: OAuthIssuer, verifier: OAuthVerifier) -> None:
    moved = issuer.add_route("/moved", status=302, headers={"Location": issuer.jwks_uri})
    with trio.fail_after(LIMIT_S):
        err = await unavailable(verifier, issuer.mint(issuer.claims()), cfg(**issuer.oauth2(jwks_uri=moved)))
    assert "HTTP 302 (redirects are not followed)" in err.message
    assert issuer.counts["jwks"] == 0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b" " * (1024 * 1024 + 1), "larger than"),
        (b"{not json", "did not return valid JSON"),
        (b'{"keys": "nope"}', "is not a JWKS"),
        (b'{"keys": []}', "no usable signing keys"),
        (b'[{"keys": []}]', "is not a JWKS"),
    ],
    ids=["oversized", "not-json", "keys-not-list", "no-keys", "not-object"],
)
async def test_bad_jwks_documents(
    issuer: OAuthIssuer, verifier: OAuthVerifier, body: bytes, expected: str
) -> None:
    url = issuer.add_route("/bad-jwks", body=body, headers={"Content-Type": "application/json"})
    with trio.fail_after(LIMIT_S):
        err = await unavailable(verifier, issuer.mint(issuer.claims()), cfg(**issuer.oauth2(jwks_uri=url)))
    assert expected in err.message


async def test_unusable_jwks_entries_are_ignored(
    issuer: OAuthIssuer, verifier: OAuthVerifier, caplog: pytest.LogCaptureFixture
) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    enc = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaked = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(leaked, as_dict=True)
    issuer.extra_jwks = [
        public_jwk(weak, kid="weak", alg="RS256"),
        {**public_jwk(enc, kid="enc", alg="RS256"), "use": "enc"},
        {**public_jwk(enc, kid="ops", alg="RS256"), "key_ops": ["encrypt"]},
        {**public_jwk(enc, kid="ps", alg="RS256"), "alg": "PS256"},
        {**private_jwk, "kid": "leaked", "use": "sig"},
        {"kty": "oct", "kid": "hmac", "k": b64url(issuer.public_pem())},
        {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        "not an object",
    ]
    conf = cfg(**issuer.oauth2())
    with trio.fail_after(LIMIT_S):
        await verifier.verify(issuer.mint(issuer.claims()), conf)  # good keys still load
        for kid, key in [("weak", weak), ("enc", enc), ("ops", enc), ("ps", enc), ("leaked", leaked)]:
            err = await refused(verifier, issuer.mint(issuer.claims(), kid=kid, key=key), conf)
            assert err.code == "token_unknown_key", kid
        err = await refused(
            verifier, issuer.mint(issuer.claims(), alg="HS256", kid="hmac", key=issuer.public_pem()), conf
        )
        assert err.code == "token_wrong_algorithm"
    assert sorted(verifier.status()["issuers"][0]["key_ids"]) == sorted(issuer.kids.values())
    assert any(
        r.levelname == "WARNING" and "'leaked'" in r.getMessage() and "private" in r.getMessage()
        for r in caplog.records
    )


# --------------------------------------------------------------------------- status and lifecycle


async def test_status_has_no_key_material(issuer: OAuthIssuer, verifier: OAuthVerifier) -> None:
    with trio.fail_after(LIMIT_S):
        token = issuer.mint(issuer.claims())
        await verifier.verify(token, cfg(**issuer.oauth2()))
    status = verifier.status()
    assert status["cache"] == {"size": 1, "max": 10_000}
    [entry] = status["issuers"]
    assert entry["issuer"] == issuer.issuer
    assert entry["source"] == "discovery" and entry["jwks_uri"] == issuer.jwks_uri
    assert sorted(entry["key_ids"]) == sorted(issuer.kids.values())
    assert entry["algorithms"] == ["ES256", "EdDSA", "RS256"]
    assert entry["fetched_at"] == START and entry["last_error"] is None
    assert entry["cached_tokens"] == 1
    text = json.dumps(status)  # JSON-serialisable, and nothing secret or key-like in it
    for jwk in issuer.jwks()["keys"]:
        for member in ("n", "x", "y"):
            if member in jwk:
                assert jwk[member] not in text
    assert token not in text and token.split(".")[2] not in text


async def test_aclose_then_cached_keys_only(
    issuer: OAuthIssuer, make_verifier: Callable[..., OAuthVerifier], clock: FakeClock
) -> None:
    verifier = make_verifier()
    conf = cfg(**issuer.oauth2())
    with trio.fail_after(LIMIT_S):
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        await verifier.aclose()
        await verifier.aclose()  # idempotent
        await verifier.verify(issuer.mint(issuer.claims()), conf)  # cached keys
        other = make_verifier()
        await other.aclose()
        err = await unavailable(other, issuer.mint(issuer.claims()), conf)
        assert "closed" in err.message


def test_issuer_usable_from_sync_code(tmp_path: Path) -> None:
    """The loopback issuer needs no event loop: plain blocking clients work too."""
    with OAuthIssuer(discovery="both") as iss:
        doc = httpx.get(iss.base_url + iss.oidc_path, timeout=5).json()
        assert doc["issuer"] == iss.issuer and doc["jwks_uri"] == iss.jwks_uri
        assert httpx.get(iss.base_url + iss.oauth_path, timeout=5).json() == doc
        jwks = httpx.get(iss.jwks_uri, timeout=5).json()
        assert {k["alg"] for k in jwks["keys"]} == {"RS256", "ES256", "EdDSA"}
        assert all(k["use"] == "sig" and k["kid"] for k in jwks["keys"])
        assert iss.counts == {"jwks": 1, "discovery": 2, "oidc": 1, "oauth": 1, "other": 0}
        claims = iss.claims()
        assert claims["exp"] - claims["iat"] == 300
        assert claims["iat"] <= time.time() + 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(iss.jwks_uri, timeout=2)


# --------------------------------------------------------------------------- timed purge


async def test_cached_claims_are_purged_at_exp_without_any_lookup(
    issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock
) -> None:
    """A verified token nobody presents again leaves the cache at its exp (before: it
    stayed until the same token came back, or LRU eviction)."""
    conf = cfg(**issuer.oauth2())
    with trio.fail_after(LIMIT_S):
        await verifier.verify(issuer.mint(issuer.claims(ttl=60, sub="short")), conf)
        await verifier.verify(issuer.mint(issuer.claims(ttl=600, sub="long")), conf)

    def subjects() -> list[str]:
        return sorted(e.token.subject for e in verifier._cache.values())

    assert subjects() == ["long", "short"]
    assert verifier.purge_expired() == 0
    clock.advance(59.9)
    assert verifier.purge_expired() == 0  # still servable from the cache
    clock.advance(0.1)
    assert verifier.purge_expired() == 1
    assert subjects() == ["long"]
    clock.advance(600)
    assert verifier.purge_expired() == 1
    assert verifier._cache == {} and len(verifier._expiry) == 0


async def test_token_cache_expiry_index_is_bounded(
    issuer: OAuthIssuer, make_verifier: Callable[..., OAuthVerifier]
) -> None:
    verifier = make_verifier(cache_size=3)
    conf = cfg(**issuer.oauth2())
    with trio.fail_after(LIMIT_S):
        for i in range(20):
            await verifier.verify(issuer.mint(issuer.claims(sub=f"user{i}")), conf)
            assert len(verifier._expiry) <= 2 * verifier.cache_size
    assert len(verifier._cache) == 3


# --------------------------------------------------------------------------- boundaries (mutation testing)
# Each test below pins a limit or a branch that a surviving mutant of oauth.py showed
# no other test held (issue 10 item 1).


def test_constructor_limits() -> None:
    """Zero is a legal leeway, cache size and refresh interval; a zero TTL or timeout and
    a negative anything are configuration errors, not "refresh on every call"/"never"."""
    base = Path("/nonexistent")
    verifier = OAuthVerifier(base_dir=base, leeway_s=0, cache_size=0, refresh_min_interval_s=0)
    assert verifier.cache_size == 0 and verifier.leeway_s == 0
    for bad in (
        {"jwks_ttl_s": 0}, {"jwks_ttl_s": -1}, {"fetch_timeout_s": 0},
        {"refresh_min_interval_s": -1}, {"leeway_s": -1}, {"cache_size": -1},
    ):
        with pytest.raises(ValueError):
            OAuthVerifier(base_dir=base, **bad)


async def test_not_before_exactly_at_leeway_is_accepted(
    issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock
) -> None:
    """nbf/iat may lie up to leeway_s in the future, inclusive; one second more is refused."""
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        edge = int(clock.now) + LEEWAY
        for name in ("nbf", "iat"):
            await verifier.verify(issuer.mint(issuer.claims(**{name: edge})), conf)
            err = await refused(verifier, issuer.mint(issuer.claims(**{name: edge + 1})), conf)
            assert err.code == "token_not_yet_valid" and f"({name};" in err.message


async def test_exp_at_max_timestamp_is_a_time(issuer: OAuthIssuer, verifier: OAuthVerifier) -> None:
    """MAX_TIMESTAMP itself is a valid NumericDate; one more is token_claims_invalid."""
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        got = await verifier.verify(issuer.mint(issuer.claims(exp=oauth.MAX_TIMESTAMP)), conf)
        assert got.expires_at == oauth.MAX_TIMESTAMP
        err = await refused(verifier, issuer.mint(issuer.claims(exp=oauth.MAX_TIMESTAMP + 1)), conf)
        assert err.code == "token_claims_invalid"


async def test_string_claims_up_to_the_length_cap(issuer: OAuthIssuer, verifier: OAuthVerifier) -> None:
    """A string claim of exactly MAX_STRING_CLAIM characters reaches the policy; a longer
    one is dropped (policies match on it, so the cap must be exact)."""
    with trio.fail_after(LIMIT_S):
        edge, over = "e" * oauth.MAX_STRING_CLAIM, "o" * (oauth.MAX_STRING_CLAIM + 1)
        got = await verifier.verify(
            issuer.mint(issuer.claims(tenant=edge, team=over)), cfg(**issuer.oauth2())
        )
    assert got.claim("tenant") == edge and got.claim("team") is None


async def test_keys_not_refetched_between_refresh_interval_and_ttl(
    issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock
) -> None:
    """Past refresh_min_interval_s but before jwks_ttl_s, known keys are not refetched
    (staleness is measured from the last fetch)."""
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        clock.advance(verifier.refresh_min_interval_s + 1)
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        assert issuer.counts["jwks"] == 1
        clock.advance(verifier.jwks_ttl_s)
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        assert issuer.counts["jwks"] == 2


async def test_discovery_is_reread_after_its_ttl(
    issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock
) -> None:
    """The discovered jwks_uri is trusted for less than DISCOVERY_TTL_S: at exactly that age
    the next key load re-reads the issuer's metadata (it may have moved its JWKS)."""
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        clock.advance(oauth.DISCOVERY_TTL_S)  # keys stale, discovery exactly TTL old
        await verifier.verify(issuer.mint(issuer.claims()), conf)
    assert issuer.counts["discovery"] == 2 and issuer.counts["jwks"] == 2


async def test_jwks_file_rechecked_exactly_at_the_interval(
    issuer: OAuthIssuer, make_verifier: Callable[..., OAuthVerifier], clock: FakeClock, tmp_path: Path
) -> None:
    """A rotated JWKS file is seen once FILE_CHECK_INTERVAL_S has passed, inclusive."""
    with trio.fail_after(LIMIT_S):
        path = issuer.write_jwks(tmp_path / "jwks.json")
        verifier = make_verifier()
        conf = cfg(issuer=issuer.issuer, audience=issuer.audience, jwks_file=str(path))
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        issuer.rotate()
        issuer.write_jwks(path)
        clock.advance(oauth.FILE_CHECK_INTERVAL_S)
        assert (await verifier.verify(issuer.mint(issuer.claims()), conf)).subject == DEFAULT_SUBJECT


async def test_typ_header_optional_but_must_be_a_string(issuer: OAuthIssuer, verifier: OAuthVerifier) -> None:
    """typ may be absent (RFC 7515); present, it must be a string."""
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        await verifier.verify(issuer.mint(issuer.claims(), headers={"typ": None}), conf)
        err = await refused(verifier, issuer.mint(issuer.claims(), headers={"typ": 1}), conf)
        assert err.code == "token_malformed"


async def test_overlong_kid_in_header_is_refused_before_any_fetch(
    issuer: OAuthIssuer, verifier: OAuthVerifier
) -> None:
    """A kid over 256 characters, empty or not a string is "no kid": refused without a
    key lookup or JWKS fetch."""
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        for kid in ("k" * 257, "", 5, ["k"]):
            err = await refused(verifier, issuer.mint(issuer.claims(), headers={"kid": kid}), conf)
            assert err.code == "token_unknown_key" and "has no kid" in err.message, kid
    assert issuer.requests == []


def test_unusable_jwk_kid_length_and_curve_pairs() -> None:
    """A JWK kid over 256 characters is not usable; OKP and EC keys are usable only with
    the curve of their algorithm (an X25519 key is not an Ed25519 key)."""
    assert oauth._unusable({"kty": "RSA", "kid": "k" * 257}) == "has no kid"
    for kid in ("", 5, None, ["k"]):
        assert oauth._unusable({"kty": "RSA", "kid": kid}) == "has no kid", kid
    assert oauth._unusable({"kty": "RSA", "kid": "k" * 256}) is None
    for kty, crv in [("OKP", "X25519"), ("OKP", "Ed448"), ("EC", "Ed25519"), ("EC", "P-384")]:
        assert oauth._alg_for_jwk({"kty": kty, "crv": crv}) is None, (kty, crv)
        reason = oauth._unusable({"kty": kty, "crv": crv, "kid": "k"})
        assert reason is not None and reason.startswith("has unsupported type"), (kty, crv)


@pytest.mark.parametrize("scope", ["a\ud800b", "s " * 4097], ids=["lone-surrogate", "over-8192"])
async def test_scope_string_must_be_text_within_cap(
    issuer: OAuthIssuer, verifier: OAuthVerifier, scope: str
) -> None:
    """A scope string that is not UTF-8 text or exceeds 8192 characters is refused, never
    split into scopes."""
    with trio.fail_after(LIMIT_S):
        err = await refused(verifier, issuer.mint(issuer.claims(scope=scope)), cfg(**issuer.oauth2()))
    assert err.code == "token_claims_invalid" and "scope" in err.message


@pytest.mark.parametrize("token", [None, b"a.b.c", 7, ""], ids=["none", "bytes", "int", "empty"])
async def test_non_string_token_is_malformed(
    issuer: OAuthIssuer, verifier: OAuthVerifier, token: Any
) -> None:
    """A token that is not a non-empty str is token_malformed (not a TypeError)."""
    with trio.fail_after(LIMIT_S):
        with pytest.raises(TokenError) as ei:
            await verifier.verify(token, cfg(**issuer.oauth2()))
    assert ei.value.code == "token_malformed" and "empty or longer" in ei.value.message


@pytest.mark.parametrize("exc", [ValueError, TypeError, jwt.PyJWTError])
async def test_signature_check_that_raises_is_a_bad_signature(
    issuer: OAuthIssuer, verifier: OAuthVerifier, monkeypatch: pytest.MonkeyPatch, exc: type[Exception]
) -> None:
    """Fail closed: a signature check that raises counts as a bad signature."""

    class Raising:
        def verify(self, *_: Any) -> bool:
            raise exc("boom")

    monkeypatch.setitem(oauth._ALGORITHMS, "RS256", Raising())
    with trio.fail_after(LIMIT_S):
        err = await refused(verifier, issuer.mint(issuer.claims()), cfg(**issuer.oauth2()))
    assert err.code == "token_bad_signature"


async def test_proxy_environment_is_ignored(
    issuer: OAuthIssuer, verifier: OAuthVerifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issuer traffic never goes through a proxy named in the environment (it could see
    and rewrite the keys sidekey trusts): with a dead proxy configured, fetches still work."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with trio.fail_after(LIMIT_S):
        got = await verifier.verify(issuer.mint(issuer.claims()), cfg(**issuer.oauth2()))
    assert got.subject == DEFAULT_SUBJECT


async def test_fetch_error_names_the_cause(
    issuer: OAuthIssuer, verifier: OAuthVerifier
) -> None:
    """An HTTP failure's message carries the exception's own text, not only its class."""
    issuer.set_down(True, refuse=True)
    with trio.fail_after(LIMIT_S):
        err = await unavailable(verifier, issuer.mint(issuer.claims()), cfg(**issuer.oauth2()))
    assert "ConnectError: ConnectError" not in err.message
    assert "ConnectError: " in err.message


def test_check_url_http_refusal_names_the_hosts_allowed_plain_http() -> None:
    """The operator is told which hosts may use plain http (or that none may)."""
    with pytest.raises(oauth._FetchError, match=r"allowed only for: none\)"):
        oauth.check_url("http://idp.example.com/jwks", allow_http_hosts=frozenset(), what="jwks_uri")
    with pytest.raises(oauth._FetchError, match=r"allowed only for: 127\.0\.0\.1, localhost\)"):
        oauth.check_url("http://idp.example.com/jwks",
                        allow_http_hosts=frozenset({"localhost", "127.0.0.1"}), what="jwks_uri")


def test_check_url_unparseable_url() -> None:
    """A URL urlsplit cannot parse is a refusal naming it, not a ValueError."""
    with pytest.raises(oauth._FetchError, match="is not a valid URL"):
        oauth.check_url("https://[::1", allow_http_hosts=frozenset(), what="jwks_uri")


async def test_hung_jwks_file_read_is_abandoned_at_the_timeout(
    issuer: OAuthIssuer, make_verifier: Callable[..., OAuthVerifier], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A JWKS file read that hangs (a dead NFS mount) ends at fetch_timeout_s: the verifier
    answers while the read is still blocked, instead of waiting for the thread."""
    release = threading.Event()
    outcome: list[bool] = []

    def hung(path: Path, known: Any) -> Any:
        outcome.append(release.wait(10))  # True: released by the test after verify answered
        raise oauth._FetchError("hung read ended")

    monkeypatch.setattr(oauth, "_read_file_if_changed", hung)
    verifier = make_verifier(fetch_timeout_s=0.3)
    conf = cfg(**issuer.oauth2(jwks_file=str(tmp_path / "jwks.json")))
    try:
        with trio.fail_after(LIMIT_S):
            err = await unavailable(verifier, issuer.mint(issuer.claims()), conf)
        assert "timed out" in err.message
    finally:
        release.set()
    for _ in range(100):
        if outcome:
            break
        time.sleep(0.05)
    assert outcome == [True]


async def test_unchanged_jwks_file_is_not_reread(
    issuer: OAuthIssuer, make_verifier: Callable[..., OAuthVerifier], clock: FakeClock, tmp_path: Path
) -> None:
    """The periodic check of a JWKS file is a stat: an unchanged file is not read and
    parsed again (a large key file must not cost a parse every second)."""
    with trio.fail_after(LIMIT_S):
        path = issuer.write_jwks(tmp_path / "jwks.json")
        verifier = make_verifier()
        conf = cfg(issuer=issuer.issuer, audience=issuer.audience, jwks_file=str(path))
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        clock.advance(oauth.FILE_CHECK_INTERVAL_S * 2)
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        assert verifier.status()["issuers"][0]["fetches"] == 1


def _token_of_length(iss: OAuthIssuer, length: int) -> str:
    """A validly signed token exactly ``length`` characters long (padded by a claim)."""
    # base64url lengths skip every value = 1 (mod 4): vary a header member as well.
    claims = iss.claims(pad="")
    base = len(iss.mint(claims))
    for extra in range((length - base) * 3 // 4 - 8, (length - base) * 3 // 4 + 8):
        for hdr in range(4):
            token = iss.mint({**claims, "pad": "p" * max(extra, 0)}, headers={"x": "h" * hdr})
            if len(token) == length:
                return token
    raise AssertionError(f"no token of length {length}")


async def test_token_length_cap_is_exact(issuer: OAuthIssuer, verifier: OAuthVerifier) -> None:
    """A signed token of MAX_TOKEN_CHARS characters verifies; one character more is refused
    before any parsing, however valid its signature."""
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        await verifier.verify(_token_of_length(issuer, MAX_TOKEN_CHARS), conf)
        err = await refused(verifier, _token_of_length(issuer, MAX_TOKEN_CHARS + 1), conf)
    assert err.code == "token_malformed" and "longer than" in err.message


async def test_header_kid_of_256_characters_is_looked_up(
    issuer: OAuthIssuer, verifier: OAuthVerifier
) -> None:
    """256 characters is still a kid (the cap is inclusive): it is looked up in the JWKS."""
    with trio.fail_after(LIMIT_S):
        err = await refused(verifier, issuer.mint(issuer.claims(), kid="k" * 256), cfg(**issuer.oauth2()))
    assert err.code == "token_unknown_key" and "does not publish" in err.message


async def test_jwks_document_of_exactly_the_size_cap(issuer: OAuthIssuer, verifier: OAuthVerifier) -> None:
    """A JWKS of exactly MAX_DOCUMENT_BYTES (Content-Length included) is accepted; the
    oversized case is in test_bad_jwks_documents."""
    doc = json.dumps(issuer.jwks()).encode()
    body = doc + b" " * (oauth.MAX_DOCUMENT_BYTES - len(doc))
    url = issuer.add_route("/edge-jwks", body=body, headers={"Content-Type": "application/json"})
    with trio.fail_after(LIMIT_S):
        got = await verifier.verify(issuer.mint(issuer.claims()), cfg(**issuer.oauth2(jwks_uri=url)))
    assert got.subject == DEFAULT_SUBJECT


async def test_exp_boundary_with_leeway(issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock) -> None:
    """A token is accepted until exactly exp + leeway_s and refused one second later."""
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        exp = int(clock.now) - LEEWAY
        await verifier.verify(issuer.mint(issuer.claims(exp=exp, iat=exp - 60)), conf)
        err = await refused(verifier, issuer.mint(issuer.claims(exp=exp - 1, iat=exp - 60)), conf)
    assert err.code == "token_expired"


async def test_refresh_limits_are_inclusive(
    issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock
) -> None:
    """An unknown kid may trigger a refresh once exactly refresh_min_interval_s has passed,
    and keys are stale at exactly jwks_ttl_s."""
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        clock.advance(verifier.refresh_min_interval_s)
        await refused(verifier, issuer.mint(issuer.claims(), kid="new-kid"), conf)
        assert issuer.counts["jwks"] == 2
        clock.advance(verifier.jwks_ttl_s)
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        assert issuer.counts["jwks"] == 3


async def test_no_keys_retry_after_exactly_the_retry_interval(
    issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock
) -> None:
    """Without keys, a failed load is retried once NO_KEYS_RETRY_S has passed, inclusive."""
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        issuer.set_down(True)
        await unavailable(verifier, issuer.mint(issuer.claims()), conf)
        issuer.set_down(False)
        clock.advance(oauth.NO_KEYS_RETRY_S)
        assert (await verifier.verify(issuer.mint(issuer.claims()), conf)).subject == DEFAULT_SUBJECT


def test_jwks_key_count_cap_is_exact(issuer: OAuthIssuer) -> None:
    """MAX_JWKS_KEYS entries are parsed; one more refuses the whole document."""
    good = issuer.jwks()["keys"][:1]
    filler = ["not an object"] * (oauth.MAX_JWKS_KEYS - 1)
    assert oauth.parse_jwks({"keys": good + filler}, where="t").kids() == [good[0]["kid"]]
    with pytest.raises(oauth._FetchError, match="at most"):
        oauth.parse_jwks({"keys": good + filler + ["x"]}, where="t")


async def test_jwks_file_of_exactly_the_size_cap(
    issuer: OAuthIssuer, make_verifier: Callable[..., OAuthVerifier], tmp_path: Path
) -> None:
    """A JWKS file of exactly MAX_DOCUMENT_BYTES loads; one byte more is refused."""
    doc = json.dumps(issuer.jwks()).encode()
    (tmp_path / "edge.json").write_bytes(doc + b" " * (oauth.MAX_DOCUMENT_BYTES - len(doc)))
    (tmp_path / "over.json").write_bytes(doc + b" " * (oauth.MAX_DOCUMENT_BYTES + 1 - len(doc)))
    with trio.fail_after(LIMIT_S):
        token = issuer.mint(issuer.claims())
        await make_verifier().verify(token, cfg(**issuer.oauth2(jwks_file="edge.json")))
        err = await unavailable(make_verifier(), token, cfg(**issuer.oauth2(jwks_file="over.json")))
    assert "larger than" in err.message


def test_oversized_jwks_file_read_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that grows between stat and read is still capped at MAX_DOCUMENT_BYTES."""
    path = tmp_path / "grow.json"
    path.write_bytes(b" " * oauth.MAX_DOCUMENT_BYTES)
    real_open = open

    def growing_open(p: Any, mode: str = "r", *a: Any, **kw: Any) -> Any:
        if Path(p) == path:
            with real_open(p, "ab") as fh:
                fh.write(b" ")
        return real_open(p, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", growing_open)
    with pytest.raises(oauth._FetchError, match="larger than"):
        oauth._read_file_if_changed(path, None)
    path.write_bytes(b" " * (oauth.MAX_DOCUMENT_BYTES - 1))
    assert len(oauth._read_file_if_changed(path, None)[1] or b"") == oauth.MAX_DOCUMENT_BYTES


async def test_text_claim_length_caps_are_exact(issuer: OAuthIssuer, verifier: OAuthVerifier) -> None:
    """sub up to 1024 characters and a scope string up to 8192 are accepted; one more each
    is token_claims_invalid."""
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        got = await verifier.verify(issuer.mint(issuer.claims(sub="s" * 1024, scope="a" * 8192)), conf)
        assert got.subject == "s" * 1024 and got.scopes == {"a" * 8192}
        for over in ({"sub": "s" * 1025}, {"scope": "a" * 8193}):
            err = await refused(verifier, issuer.mint(issuer.claims(**over)), conf)
            assert err.code == "token_claims_invalid", over


def test_documented_limits() -> None:
    """The limits are part of the contract (operators size tokens and JWKS by them): a
    change must be deliberate, here and in the docs, not a slip of a constant."""
    assert (oauth.MAX_TOKEN_CHARS, oauth.MAX_DOCUMENT_BYTES, oauth.MAX_JWKS_KEYS) == (16384, 1048576, 100)
    assert (oauth.MIN_RSA_BITS, oauth.MAX_STRING_CLAIMS, oauth.MAX_STRING_CLAIM) == (2048, 32, 256)
    assert (oauth.FILE_CHECK_INTERVAL_S, oauth.NO_KEYS_RETRY_S, oauth.DISCOVERY_TTL_S) == (1.0, 2.0, 3600.0)
    assert oauth.MAX_TIMESTAMP == 253402300799  # 9999-12-31T23:59:59Z


async def test_scp_list_items_and_times_at_their_limits(
    issuer: OAuthIssuer, verifier: OAuthVerifier
) -> None:
    """scp list items may be 256 characters (257 is refused); a time of 0 (1970) is a
    valid NumericDate, -1 is not; at most MAX_STRING_CLAIMS string claims are kept."""
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        extra = {f"c{i:02}": "v" for i in range(oauth.MAX_STRING_CLAIMS + 5)}
        got = await verifier.verify(
            issuer.mint(issuer.claims(scope=None, scp=["x" * 256], iat=0, nbf=0, **extra)), conf
        )
        assert got.scopes == {"x" * 256}
        assert len(got.string_claims) == oauth.MAX_STRING_CLAIMS
        for over in ({"scp": ["x" * 257]}, {"iat": -1}, {"nbf": -1}):
            err = await refused(verifier, issuer.mint(issuer.claims(**over)), conf)
            assert err.code == "token_claims_invalid", over


async def test_moved_jwks_is_found_by_rereading_discovery(
    issuer: OAuthIssuer, verifier: OAuthVerifier, clock: FakeClock
) -> None:
    """If the cached jwks_uri stops answering, the discovery document is read again at
    once (the issuer may have moved its keys) rather than failing the refresh."""
    with trio.fail_after(LIMIT_S):
        conf = cfg(**issuer.oauth2())
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        issuer.rotate()
        issuer.add_route("/jwks.json", status=404, body=b"{}")
        moved = issuer.add_route("/keys-v2", body=json.dumps(issuer.jwks()).encode())
        issuer.discovery_overrides["jwks_uri"] = moved
        clock.advance(verifier.refresh_min_interval_s)
        got = await verifier.verify(issuer.mint(issuer.claims()), conf)
    assert got.subject == DEFAULT_SUBJECT and issuer.counts["discovery"] == 2


async def test_unreadable_jwks_file_paths_are_unavailable(
    issuer: OAuthIssuer, verifier: OAuthVerifier, tmp_path: Path
) -> None:
    """A JWKS file path that is a directory or that the OS refuses (name too long) gives
    jwks_unavailable with the reason, not an OSError."""
    with trio.fail_after(LIMIT_S):
        token = issuer.mint(issuer.claims())
        (tmp_path / "dir.json").mkdir()
        err = await unavailable(verifier, token, cfg(**issuer.oauth2(jwks_file="dir.json")))
        assert "not a regular file" in err.message
        err = await unavailable(verifier, token, cfg(**issuer.oauth2(jwks_file="n" * 300)))
        assert "cannot be read" in err.message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user@idp.example.test/jwks", "credentials"),
        ("https://:pw@idp.example.test/jwks", "credentials"),
        ("https://idp.example.test/jwks#frag", "fragment"),
        ("https:///jwks", "has no host"),
        ("http://idp.example.test/jwks", "must use https"),
        ("ftp://127.0.0.1/jwks", "must use https"),
        ("HTTPS://idp.example.test/jwks", None),
        ("https://idp.example.test/jwks", None),
        ("http://127.0.0.1:8080/jwks", None),
    ],
)
def test_check_url_each_rule(url: str, expected: str | None) -> None:
    """Each rule of check_url on its own: a username alone or a password alone is a
    credential, a fragment or a missing host is refused, http only for allowed hosts."""
    allow = frozenset({"127.0.0.1"})
    if expected is None:
        oauth.check_url(url, allow_http_hosts=allow, what="jwks_uri")
    else:
        with pytest.raises(oauth._FetchError, match=expected):
            oauth.check_url(url, allow_http_hosts=allow, what="jwks_uri")


@pytest.mark.parametrize("exc", [jwt.PyJWTError, ValueError, TypeError, KeyError])
def test_jwk_that_fails_to_load_is_skipped(
    issuer: OAuthIssuer, monkeypatch: pytest.MonkeyPatch, exc: type[Exception]
) -> None:
    """Whatever a key loader raises for a malformed JWK, that key is skipped with its
    reason (pyjwt wraps most errors today; the guard must not depend on it)."""

    def raising(*_: Any, **__: Any) -> Any:
        raise exc("bad key")

    monkeypatch.setattr(oauth.jwt, "PyJWK", raising)
    with pytest.raises(oauth._FetchError, match=rf"cannot be loaded \({exc.__name__}\)"):
        oauth.parse_jwks(issuer.jwks(), where="t")


@pytest.mark.parametrize(
    "claims",
    [{"aud": []}, {"client_id": 5}, {"client_id": None, "azp": ["x"]}, {"auth_time": "yesterday"},
     {"aud": [""]}],
    ids=["aud-empty-list", "client-id-int", "azp-list", "auth-time-text", "aud-empty-string"],
)
async def test_more_invalid_claims(issuer: OAuthIssuer, verifier: OAuthVerifier, claims: dict[str, Any]) -> None:
    """Claims that are present but of the wrong shape are token_claims_invalid (401), never
    read as "no audience"/"no client" (an empty aud list is not an audience mismatch)."""
    with trio.fail_after(LIMIT_S):
        err = await refused(verifier, issuer.mint(issuer.claims(**claims)), cfg(**issuer.oauth2()))
    assert err.code == "token_claims_invalid" and err.status == 401


async def test_hung_jwks_files_tie_up_at_most_two_threads(
    issuer: OAuthIssuer, make_verifier: Callable[..., OAuthVerifier], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Reads of JWKS files on a hung file system occupy at most two worker threads, however
    many sources wait (abandoned reads keep their thread until the OS returns)."""
    release = threading.Event()
    lock = threading.Lock()
    active, peak = [0], [0]

    def hung(path: Path, known: Any) -> Any:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            release.wait(10)
            raise oauth._FetchError("hung read ended")
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(oauth, "_read_file_if_changed", hung)
    verifier = make_verifier(fetch_timeout_s=0.3)
    token = issuer.mint(issuer.claims())

    async def one(i: int) -> None:
        await unavailable(verifier, token, cfg(**issuer.oauth2(jwks_file=str(tmp_path / f"{i}.json"))))

    try:
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(one, i)
        for _ in range(50):  # a loaded machine may start the second thread late
            if peak[0] >= 2:
                break
            time.sleep(0.05)
    finally:
        release.set()
    assert peak[0] == 2


async def test_key_set_fingerprint_ignores_member_order(
    issuer: OAuthIssuer, make_verifier: Callable[..., OAuthVerifier], clock: FakeClock, tmp_path: Path
) -> None:
    """Re-serialising the same keys (members, even nested ones, in another order) is not a
    rotation: the generation stays and cached tokens stay valid."""
    path = tmp_path / "jwks.json"

    def write(meta: dict[str, int]) -> None:
        keys = [{**dict(reversed(list(k.items()))), "meta": meta} for k in issuer.jwks()["keys"]]
        path.write_text(json.dumps({"keys": keys}))

    with trio.fail_after(LIMIT_S):
        write({"a": 1, "b": 2})
        verifier = make_verifier()
        conf = cfg(issuer=issuer.issuer, audience=issuer.audience, jwks_file=str(path))
        await verifier.verify(issuer.mint(issuer.claims()), conf)
        write({"b": 2, "a": 1})
        later = path.stat().st_mtime + 5  # same size: make sure the stat signature changes
        os.utime(path, (later, later))
        clock.advance(2)
        await verifier.verify(issuer.mint(issuer.claims()), conf)
    status = verifier.status()["issuers"][0]
    assert status["fetches"] == 2 and status["generation"] == 1


async def test_cached_token_is_not_served_to_a_server_with_another_key_source(
    issuer: OAuthIssuer, verifier: OAuthVerifier, tmp_path: Path
) -> None:
    """Two servers with the same issuer and audience but different key sources (discovery
    vs a pinned JWKS file): a token verified for one is not a cache hit for the other."""
    with trio.fail_after(LIMIT_S):
        token = issuer.mint(issuer.claims())
        await verifier.verify(token, cfg(**issuer.oauth2()))
        issuer.rotate()  # the file pins only the new keys
        issuer.write_jwks(tmp_path / "pinned.json")
        err = await refused(verifier, token, cfg(**issuer.oauth2(jwks_file="pinned.json")))
    assert err.code == "token_unknown_key"


def test_no_usable_keys_message_lists_the_skipped_keys() -> None:
    """The operator sees why each key was skipped, and no dangling detail when none was."""
    with pytest.raises(oauth._FetchError) as ei:
        oauth.parse_jwks({"keys": []}, where="JWKS t")
    assert str(ei.value) == "JWKS t has no usable signing keys (RS256/ES256/EdDSA)"
    with pytest.raises(oauth._FetchError) as ei:
        oauth.parse_jwks({"keys": ["x"]}, where="JWKS t")
    assert str(ei.value).endswith("(RS256/ES256/EdDSA): key 0 (kid None) is not a JSON object")


async def test_http_error_message_mentions_redirects_only_for_redirects(
    issuer: OAuthIssuer, verifier: OAuthVerifier
) -> None:
    """An HTTP 500 is reported as such, without the redirect hint (it would mislead)."""
    issuer.set_down(True)
    with trio.fail_after(LIMIT_S):
        err = await unavailable(verifier, issuer.mint(issuer.claims()), cfg(**issuer.oauth2()))
    assert "answered HTTP 500" in err.message and "redirect" not in err.message


async def test_url_httpx_cannot_use_is_a_fetch_error(verifier: OAuthVerifier) -> None:
    """A URL that passes check_url but that httpx refuses (a NUL in the host) is a fetch
    error naming the cause, not an exception escaping the verifier."""
    with trio.fail_after(LIMIT_S), pytest.raises(oauth._FetchError, match="InvalidURL"):
        await verifier._get_json("https://a\x00b.example/jwks", what="jwks_uri")


def test_strict_json_depth_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deep nesting is a ValueError (malformed), never a RecursionError: by the depth check,
    and by the guard behind it should the check ever miss."""
    deep = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(ValueError, match="nested deeper"):
        oauth._strict_json(deep)
    monkeypatch.setattr(oauth, "json_too_deep", lambda *_: False)
    with pytest.raises(ValueError, match="nested too deeply"):
        oauth._strict_json(deep)


async def test_waiter_loads_itself_when_the_shared_load_is_cancelled(
    issuer: OAuthIssuer, verifier: OAuthVerifier
) -> None:
    """A caller waiting on another caller's key load does not inherit that caller's
    cancellation: when the shared load is cancelled, the waiter loads the keys itself."""
    conf = cfg(**issuer.oauth2())
    token = issuer.mint(issuer.claims())
    got: list[AccessToken] = []
    with trio.fail_after(LIMIT_S):
        issuer.set_delay(0.3)
        async with trio.open_nursery() as nursery:
            first = trio.CancelScope()

            async def cancelled_caller() -> None:
                with first:
                    await verifier.verify(token, conf)

            async def waiter() -> None:
                got.append(await verifier.verify(token, conf))

            nursery.start_soon(cancelled_caller)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()
    assert [t.subject for t in got] == [DEFAULT_SUBJECT]


async def test_purge_at_exact_exp_and_after_lru_eviction(
    issuer: OAuthIssuer, make_verifier: Callable[..., OAuthVerifier], clock: FakeClock
) -> None:
    """purge_expired drops an entry at exactly its exp, and skips index items whose entry
    was already evicted (no crash, nothing counted)."""
    conf = cfg(**issuer.oauth2())
    with trio.fail_after(LIMIT_S):
        small = make_verifier(cache_size=1)
        await small.verify(issuer.mint(issuer.claims(ttl=60, sub="a")), conf)
        await small.verify(issuer.mint(issuer.claims(ttl=600, sub="b")), conf)  # evicts a
        plain = make_verifier()
        await plain.verify(issuer.mint(issuer.claims(ttl=60)), conf)
    clock.now = float(int(clock.now) + 60)  # exactly exp (claims() floors iat)
    assert small.purge_expired() == 0 and len(small._cache) == 1
    assert plain.purge_expired() == 1 and plain._cache == {}


@pytest.mark.parametrize("issuer_url", ["https://idp.example.test/?tenant=1", "https://idp.example.test/#x"])
def test_discovery_refuses_issuer_with_query_or_fragment(issuer_url: str) -> None:
    """RFC 8414: an issuer identifier has no query and no fragment; either alone is refused."""
    with pytest.raises(oauth._FetchError, match="must not have a query or fragment"):
        oauth.discovery_urls(issuer_url)


def test_unusable_jwk_use_key_ops_and_alg_members() -> None:
    """use/key_ops/alg are optional; present, they must say "sig", list "verify" (a list,
    not a string that happens to contain it) and name the key type's algorithm."""
    base = {"kty": "RSA", "kid": "k"}
    assert oauth._unusable(base) is None
    assert oauth._unusable({**base, "use": "sig", "key_ops": ["sign", "verify"], "alg": "RS256"}) is None
    assert oauth._unusable({**base, "use": "enc"}) == "has use 'enc', not 'sig'"
    for ops in ("verify", ["sign"], {"verify": 1}):
        assert oauth._unusable({**base, "key_ops": ops}) == "has key_ops without 'verify'", ops
    reason = oauth._unusable({**base, "alg": "RS512"})
    assert reason is not None and reason.startswith("declares alg 'RS512'")


async def test_empty_scope_string_means_no_scopes(issuer: OAuthIssuer, verifier: OAuthVerifier) -> None:
    """scope "" (some issuers send it for client-credentials tokens) is no scopes, not an
    invalid token."""
    with trio.fail_after(LIMIT_S):
        got = await verifier.verify(issuer.mint(issuer.claims(scope="")), cfg(**issuer.oauth2()))
    assert got.scopes == frozenset()


@pytest.mark.parametrize("uri", [5, "", ["https://idp.example.test/jwks"]], ids=["int", "empty", "list"])
async def test_discovery_jwks_uri_must_be_a_non_empty_string(
    issuer: OAuthIssuer, verifier: OAuthVerifier, uri: Any
) -> None:
    """A discovery document whose jwks_uri is not a non-empty string has no jwks_uri
    (jwks_unavailable naming that), not a crash or a request to an empty URL."""
    issuer.discovery_overrides["jwks_uri"] = uri
    with trio.fail_after(LIMIT_S):
        err = await unavailable(verifier, issuer.mint(issuer.claims()), cfg(**issuer.oauth2()))
    assert "has no jwks_uri" in err.message
