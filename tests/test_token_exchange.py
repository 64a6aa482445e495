"""Per-user downstream tokens: ``type: oauth`` backends (RFC 8693 token exchange and the
RFC 6749 client credentials grant) against a loopback IdP (tests/oauth_issuer.py's token
endpoint), through a real daemon; plus the backend's cache on an injected clock.

The IdP verifies the subject token as its own, mints a JWT for the downstream audience
with the subject's ``sub`` and counts requests, so caching is observable from outside.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import yaml

from harness import Daemon
from oauth_issuer import OAuthIssuer
from sidekey.backends import SecretValue
from sidekey.backends.local import LocalStore, load_key
from sidekey.backends.oauth import OAuthBackend, Subject
from sidekey.client import Client
from sidekey.config import OAuthBackendConfig, SecretRef, load_config
from sidekey.protocol import ConfigError

DOWNSTREAM = "https://downstream.example.test"
CLIENT_ID = "sidekey-test"
LIMIT_S = 30.0


def _client_secret() -> str:
    return "client-SECRET-" + os.urandom(8).hex()


@pytest.fixture
def issuer() -> Iterator[OAuthIssuer]:
    with OAuthIssuer(audience="mcp:content-api") as iss:
        yield iss


def _user_token(issuer: OAuthIssuer, user: str, **claims: Any) -> str:
    return issuer.mint(issuer.claims(sub=user, scope="content:read content:write", **claims),
                       alg="ES256")


def _governed(make_daemon: Any, issuer: OAuthIssuer, *, backend: dict[str, Any] | None = None,
              secrets: dict[str, Any] | None = None, start: bool = True) -> Daemon:
    """A daemon whose servers trust ``issuer`` and whose backend ``idp`` is its token
    endpoint; create_article gets a per-user token, list_articles a machine token."""
    secret = _client_secret()
    issuer.clients[CLIENT_ID] = secret
    idp: dict[str, Any] = {"type": "oauth", "token_endpoint": issuer.token_endpoint,
                           "client_id": CLIENT_ID,
                           "client_secret": {"backend": "local", "name": "oauth/client-secret"},
                           "timeout_s": 2}
    idp.update(backend or {})
    mapping = secrets or {
        "content-api": {
            "create_article": {"DOWNSTREAM_TOKEN": {
                "backend": "idp", "kind": "oauth_token_exchange", "audience": DOWNSTREAM,
                "scopes": ["articles:write"]}},
            "list_articles": {"MACHINE_TOKEN": {
                "backend": "idp", "kind": "oauth_client_credentials", "audience": DOWNSTREAM,
                "scopes": ["articles:read"]}},
        },
    }
    d: Daemon = make_daemon({"backends": {"idp": idp}, "secrets": mapping})
    path = d.root / "mcp-server-registry.yaml"
    doc = yaml.safe_load(path.read_text())
    for spec in doc["servers"].values():
        spec["oauth2"]["issuer"] = issuer.issuer
    path.write_text(yaml.safe_dump(doc))
    store = LocalStore(d.root / "state" / "secrets.enc", load_key(d.root / "keys" / "local.key", None))
    store.put("oauth/client-secret", secret)
    d.client_secret = secret  # type: ignore[attr-defined]
    return d.start() if start else d


def _call(d: Daemon, token: str | None, *, tool: str = "create_article",
          redeem: bool = True) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"server": "content-api", "tool": tool, "agent_id": "content-writer",
                            "arguments": {"t": 1}, "redeem": redeem}
    if token is not None:
        body["user_token"] = token
    return d.request("POST", "/v1/authorize", body, timeout=LIMIT_S)


def _lease_secret(result: tuple[int, dict[str, Any]], name: str) -> str:
    status, body = result
    assert status == 200, body
    value = body["lease"]["secrets"][name]
    assert isinstance(value, str)
    return value


def _redeem_facts(d: Daemon, request_id: str) -> dict[str, Any]:
    for event in d.wait_events("mcp.redeem", 1):
        if event.get("request_id") == request_id:
            (entry,) = [s for s in event["secrets"] if s["name"] in ("DOWNSTREAM_TOKEN",
                                                                      "MACHINE_TOKEN")]
            return dict(entry)
    raise AssertionError(f"no mcp.redeem event for {request_id}")


def _refusal_audited(d: Daemon, result: tuple[int, dict[str, Any]], code: str, status: int) -> None:
    got, body = result
    assert (got, body.get("error", {}).get("code")) == (status, code), body
    request_id = body["error"]["request_id"]
    events = [e for e in d.audit_events() if e.get("request_id") == request_id]
    assert any(e.get("error", {}).get("code") == code for e in events), events
    assert not [e for e in events if e["event_type"] == "mcp.redeem"], "a lease was handed out"


# --------------------------------------------------------------------------- daemon


def test_two_users_get_their_own_downstream_tokens(make_daemon: Any, issuer: OAuthIssuer) -> None:
    d = _governed(make_daemon, issuer)
    alice_user, bob_user = _user_token(issuer, "alice"), _user_token(issuer, "bob")
    first = _call(d, alice_user)
    alice = _lease_secret(first, "DOWNSTREAM_TOKEN")
    bob = _lease_secret(_call(d, bob_user), "DOWNSTREAM_TOKEN")
    assert alice != bob
    a, b = (issuer.verify_issued(t, audience=DOWNSTREAM) for t in (alice, bob))
    assert (a["sub"], b["sub"]) == ("alice", "bob")
    assert a["act"] == {"sub": CLIENT_ID} and a["scope"] == "articles:write"
    # The stored CONTENT_API_KEY rides along unchanged.
    assert first[1]["lease"]["secrets"]["CONTENT_API_KEY"] == d.secrets["content-api/write-key"]
    # alice again: her cached token, no new exchange.
    again = _call(d, alice_user)
    assert _lease_secret(again, "DOWNSTREAM_TOKEN") == alice
    assert issuer.token_count("token-exchange") == 2
    facts = _redeem_facts(d, first[1]["request_id"])
    assert facts["kind"] == "oauth_token_exchange" and facts["audience"] == DOWNSTREAM
    assert facts["scopes"] == ["articles:write"] and facts["cached"] is False
    assert facts["version"] == "sha256:" + facts["token_sha256"]
    assert _redeem_facts(d, again[1]["request_id"])["cached"] is True
    # Neither issued token, nor the client secret, nor the user tokens are in anything
    # the daemon wrote (audit, log, state).
    d.stop()
    written = d.everything_written()
    for value in (alice, bob, d.client_secret, alice_user, bob_user):  # type: ignore[attr-defined]
        assert value.encode() not in written


def test_a_cached_token_is_refreshed_near_its_expiry(make_daemon: Any, issuer: OAuthIssuer) -> None:
    # Cached for expires_in - refresh_margin_s = 3 s.
    issuer.token_expires_in = 4
    d = _governed(make_daemon, issuer, backend={"refresh_margin_s": 1})
    user = _user_token(issuer, "alice")
    started = time.monotonic()
    first = _lease_secret(_call(d, user), "DOWNSTREAM_TOKEN")
    second = _lease_secret(_call(d, user), "DOWNSTREAM_TOKEN")
    if time.monotonic() - started < 2.5:  # a machine this slow proves nothing either way
        assert second == first and issuer.token_count("token-exchange") == 1
    time.sleep(max(0.0, 3.2 - (time.monotonic() - started)))
    status, body = _call(d, user)
    third = _lease_secret((status, body), "DOWNSTREAM_TOKEN")
    assert third != first
    assert issuer.token_count("token-exchange") == (2 if second == first else 3)
    # The lease does not outlive its token (4 s).
    end = datetime.datetime.fromisoformat(body["lease"]["expires_at"].replace("Z", "+00:00"))
    assert end.timestamp() <= time.time() + 5


@pytest.mark.parametrize("mode", ["invalid_grant", "invalid_target", "invalid_scope"])
def test_a_refused_exchange_is_a_clear_audited_refusal(make_daemon: Any, issuer: OAuthIssuer,
                                                        mode: str) -> None:
    d = _governed(make_daemon, issuer)
    issuer.token_mode = mode
    result = _call(d, _user_token(issuer, "alice"))
    _refusal_audited(d, result, "token_exchange_denied", 403)
    assert result[1]["error"]["details"]["oauth_error"] == mode
    (event,) = [e for e in d.audit_events() if e.get("request_id") == result[1]["error"]["request_id"]
                and e["event_type"] == "request.rejected"]
    assert event["oauth_error"] == mode and event["error"]["status"] == 403
    # A target the IdP does not serve, without a forced mode: invalid_target too.
    issuer.token_mode, issuer.token_audiences = None, {"https://other.example.test"}
    result = _call(d, _user_token(issuer, "bob"))
    _refusal_audited(d, result, "token_exchange_denied", 403)
    assert result[1]["error"]["details"]["oauth_error"] == "invalid_target"


def test_a_rejected_client_is_not_the_users_fault(make_daemon: Any, issuer: OAuthIssuer) -> None:
    d = _governed(make_daemon, issuer)
    issuer.clients[CLIENT_ID] = "another secret"
    result = _call(d, _user_token(issuer, "alice"))
    _refusal_audited(d, result, "token_endpoint_refused", 502)
    assert result[1]["error"]["details"]["oauth_error"] == "invalid_client"


@pytest.mark.parametrize("fault", ["down", "slow", "refused"])
def test_the_idp_down_is_a_503_within_the_timeout(make_daemon: Any, issuer: OAuthIssuer,
                                                  fault: str) -> None:
    d = _governed(make_daemon, issuer, backend={"timeout_s": 1})
    user = _user_token(issuer, "alice")
    # The daemon has the IdP's signing keys before the IdP goes away (its JWKS is served
    # by the same loopback server).
    _lease_secret(_call(d, _user_token(issuer, "warm-up")), "DOWNSTREAM_TOKEN")
    issuer.token_delay = 60.0
    if fault == "refused":
        issuer.set_down(True, refuse=True)
    else:
        issuer.token_mode = fault
    started = time.monotonic()
    result = _call(d, user)
    elapsed = time.monotonic() - started
    _refusal_audited(d, result, "token_endpoint_unavailable", 503)
    # Cut at timeout_s (1 s), not the IdP's 60 s; the slack is for a loaded machine.
    assert elapsed < 20, elapsed
    # Readiness stays up (other tools still work); the backend says it is unreachable.
    status, health = d.request("GET", "/v1/health")
    assert status == 200 and health["backends"]["idp"] == {"ok": True, "type": "oauth",
                                                           "reachable": False}, health
    if fault == "refused":
        issuer.set_down(False)


def test_client_credentials_are_cached_per_audience(make_daemon: Any, issuer: OAuthIssuer) -> None:
    other = "https://reports.example.test"
    mapping = {"content-api": {
        "list_articles": {"MACHINE_TOKEN": {"backend": "idp", "kind": "oauth_client_credentials",
                                            "audience": DOWNSTREAM}},
        "create_article": {"MACHINE_TOKEN": {"backend": "idp", "kind": "oauth_client_credentials",
                                             "audience": other}},
    }}
    d = _governed(make_daemon, issuer, secrets=mapping)
    alice, bob = _user_token(issuer, "alice"), _user_token(issuer, "bob")
    t1 = _lease_secret(_call(d, alice, tool="list_articles"), "MACHINE_TOKEN")
    t2 = _lease_secret(_call(d, bob, tool="list_articles"), "MACHINE_TOKEN")
    t3 = _lease_secret(_call(d, alice, tool="create_article"), "MACHINE_TOKEN")
    t4 = _lease_secret(_call(d, bob, tool="create_article"), "MACHINE_TOKEN")
    assert t1 == t2 and t3 == t4 and t1 != t3  # a machine token: the same for every user
    assert issuer.token_count("client_credentials") == 2
    assert issuer.verify_issued(t1, audience=DOWNSTREAM)["sub"] == CLIENT_ID
    assert issuer.verify_issued(t3, audience=other)["sub"] == CLIENT_ID
    assert issuer.token_count("token-exchange") == 0


def test_client_secret_post(make_daemon: Any, issuer: OAuthIssuer) -> None:
    d = _governed(make_daemon, issuer, backend={"client_auth": "client_secret_post"})
    token = _lease_secret(_call(d, _user_token(issuer, "carol")), "DOWNSTREAM_TOKEN")
    assert issuer.verify_issued(token, audience=DOWNSTREAM)["sub"] == "carol"
    assert issuer.token_requests[-1]["client_id"] == CLIENT_ID


def test_the_python_client_tool_call(make_daemon: Any, issuer: OAuthIssuer) -> None:
    d = _governed(make_daemon, issuer)
    with Client(d.socket, timeout=LIMIT_S) as client, client.tool_call(
        "content-api", "create_article", user_token=_user_token(issuer, "dave"),
        agent_id="content-writer", arguments={"t": 1},
    ) as lease:
        token = lease.secrets["DOWNSTREAM_TOKEN"]
    assert issuer.verify_issued(token, audience=DOWNSTREAM)["sub"] == "dave"


def test_two_step_flow_and_after_a_restart(make_daemon: Any, issuer: OAuthIssuer) -> None:
    d = _governed(make_daemon, issuer)
    user = _user_token(issuer, "erin")
    status, body = _call(d, user, redeem=False)
    assert status == 200 and body["resolution_token"], body
    status, lease = d.request("POST", "/v1/redeem", {"resolution_token": body["resolution_token"],
                                                      "arguments": {"t": 1}}, timeout=LIMIT_S)
    assert status == 200, lease
    token = lease["secrets"]["DOWNSTREAM_TOKEN"]
    assert issuer.verify_issued(token, audience=DOWNSTREAM)["sub"] == "erin"
    # Authorized before a restart, redeemed after: the user token was in memory only.
    status, body = _call(d, user, redeem=False)
    assert status == 200, body
    d.restart()
    result = d.request("POST", "/v1/redeem", {"resolution_token": body["resolution_token"],
                                              "arguments": {"t": 1}}, timeout=LIMIT_S)
    _refusal_audited(d, result, "subject_token_unavailable", 409)


def _probe(d: Daemon) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run(
        [sys.executable, "-m", "sidekey", "check-config", "--probe", "--config", str(d.config_path)],
        capture_output=True, text=True, timeout=LIMIT_S, env=env, cwd=d.root)


def test_check_config_probe_reaches_the_token_endpoint(make_daemon: Any, issuer: OAuthIssuer) -> None:
    d = _governed(make_daemon, issuer, start=False)
    done = _probe(d)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "probe backend idp (oauth): reached" in done.stdout, done.stdout
    assert issuer.token_count("token-exchange") == 1  # the dummy subject token, refused
    assert issuer.token_count("client_credentials") == 1
    issuer.clients[CLIENT_ID] = "rotated elsewhere"
    done = _probe(d)
    assert done.returncode != 0
    assert "token_endpoint_refused" in done.stdout + done.stderr, done.stdout + done.stderr


# --------------------------------------------------------------------------- config


def _load_with(tmp: Daemon, **changes: Any) -> None:
    cfg = yaml.safe_load(tmp.config_path.read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    tmp.config_path.write_text(yaml.safe_dump(cfg))
    load_config(tmp.config_path)


def test_config_refuses_what_cannot_work(make_daemon: Any, issuer: OAuthIssuer) -> None:
    d = _governed(make_daemon, issuer, start=False)
    load_config(d.config_path)  # the fixture's config is fine
    exchange = {"backend": "idp", "kind": "oauth_token_exchange", "audience": DOWNSTREAM}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"backends__idp__token_endpoint": "http://idp.example.test/token"},
         "$.backends.idp.token_endpoint: must use https"),
        ({"secrets__content-api__create_article__X": {**exchange, "name": "n"}},
         "$.secrets.content-api.create_article.X: name: not used by an oauth backend"),
        ({"secrets__content-api__create_article__X": {"backend": "local", "name": "n",
                                                      "audience": "a"}},
         "$.secrets.content-api.create_article.X: audience: only for a secret of an oauth backend"),
        ({"secrets__content-api__create_article__X": {"backend": "local", "name": "n",
                                                      "kind": "oauth_token_exchange"}},
         "kind: oauth_token_exchange needs a backend of type oauth"),
        ({"secrets__content-api__create_article__X": {"backend": "idp"}},
         "kind: an oauth backend's secret needs kind"),
        ({"secrets__content-api__create_article__X": {"backend": "idp",
                                                      "kind": "oauth_token_exchange"}},
         "X: audience: a token exchange names the audience"),
        ({"secrets__content-api__create_article__X": {**exchange, "scopes": ["a b"]}},
         "X: scopes.0: a scope is printable ASCII"),
        ({"secrets__content-api__list_articles__X": {"backend": "idp",
                                                     "kind": "oauth_client_credentials",
                                                     "subject_token_type": "urn:x"}},
         "X: subject_token_type: only for kind oauth_token_exchange"),
        ({"backends__idp__client_secret": {"backend": "idp", "kind": "oauth_client_credentials"}},
         "$.backends.idp.client_secret.backend: the client secret comes from a backend"),
        ({"backends__idp__timeout_s": 31}, "$.backends.idp.timeout_s"),
    ]
    original = d.config_path.read_text()
    for changes, expected in cases:
        d.config_path.write_text(original)
        with pytest.raises(ConfigError) as info:
            _load_with(d, **changes)
        assert expected in str(info.value), (changes, str(info.value))


def test_config_refuses_an_exchange_for_a_server_without_user_tokens(
        make_daemon: Any, issuer: OAuthIssuer) -> None:
    d = _governed(make_daemon, issuer, start=False)
    path = d.root / "mcp-server-registry.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["servers"]["content-api"]["oauth2"] = "none"
    doc["servers"]["content-api"]["tool_scopes"] = {
        t: {} for t in doc["servers"]["content-api"]["tool_scopes"]}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError) as info:
        load_config(d.config_path)
    assert ("$.secrets.content-api.create_article.DOWNSTREAM_TOKEN.kind: oauth_token_exchange "
            "exchanges the user's bearer token") in str(info.value)


# --------------------------------------------------------------------------- backend, clock injected


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Secret:
    name = "local"

    def __init__(self, value: str) -> None:
        self.value = value

    async def fetch(self, ref: SecretRef) -> SecretValue:
        return SecretValue(value=self.value, version="1")


def _backend(issuer: OAuthIssuer, clock: FakeClock, wall: FakeClock | None = None,
             **fields: Any) -> OAuthBackend:
    secret = _client_secret()
    issuer.clients[CLIENT_ID] = secret
    cfg = msgspec.convert({"token_endpoint": issuer.token_endpoint, "client_id": CLIENT_ID,
                           "client_secret": {"backend": "local", "name": "s"}, **fields},
                          OAuthBackendConfig)
    return OAuthBackend("idp", cfg, base_dir=Path("."), secret_backends={"local": _Secret(secret)},  # type: ignore[dict-item]
                        clock=clock, wall=wall or (lambda: time.time()))


EXCHANGE = SecretRef(backend="idp", kind="oauth_token_exchange", audience=DOWNSTREAM,
                     scopes=["a"])


def _subject(issuer: OAuthIssuer, user: str, ttl: int = 300) -> Subject:
    token = issuer.mint(issuer.claims(sub=user, ttl=ttl), alg="ES256")
    return Subject(token=token, issuer=issuer.issuer, subject=user, expires_at=time.time() + ttl)


async def test_cache_reuse_until_margin_then_refresh(issuer: OAuthIssuer) -> None:
    clock = FakeClock()
    issuer.token_expires_in = 100
    backend = _backend(issuer, clock, refresh_margin_s=30)
    subject = _subject(issuer, "alice")
    with trio.fail_after(LIMIT_S):
        first = await backend.exchange(EXCHANGE, subject)
        clock.now += 69.9  # 0.1 s before expires_in - margin
        assert (await backend.exchange(EXCHANGE, subject)).value == first.value
        assert issuer.token_count() == 1
        assert first.lease_ttl_s is not None and 99 <= first.lease_ttl_s <= 100
        clock.now += 0.2
        refreshed = await backend.exchange(EXCHANGE, subject)
        assert refreshed.value != first.value and issuer.token_count() == 2
        # Another token of the same user is another key (it may carry other scopes).
        await backend.exchange(EXCHANGE, _subject(issuer, "alice"))
        assert issuer.token_count() == 3
        await backend.aclose()


async def test_no_expires_in_is_not_cached_and_the_subject_exp_caps_the_cache(
        issuer: OAuthIssuer) -> None:
    clock, wall = FakeClock(), FakeClock()
    wall.now = time.time()
    backend = _backend(issuer, clock, wall, refresh_margin_s=10)
    issuer.token_expires_in = None
    subject = _subject(issuer, "alice")
    with trio.fail_after(LIMIT_S):
        await backend.exchange(EXCHANGE, subject)
        await backend.exchange(EXCHANGE, subject)
        assert issuer.token_count() == 2
        # The downstream token lives 300 s, the user's token 40 s more: cached 30 s only.
        issuer.token_expires_in = 300
        short = Subject(token=subject.token, issuer=subject.issuer, subject="alice",
                        expires_at=wall.now + 40)
        await backend.exchange(EXCHANGE, short)
        clock.now += 29
        await backend.exchange(EXCHANGE, short)
        assert issuer.token_count() == 3
        clock.now += 2
        await backend.exchange(EXCHANGE, short)
        assert issuer.token_count() == 4
        await backend.aclose()


async def test_concurrent_misses_share_one_request_and_the_cache_is_bounded(
        issuer: OAuthIssuer) -> None:
    clock = FakeClock()
    backend = _backend(issuer, clock, max_cached_tokens=2)
    subject = _subject(issuer, "alice")
    issuer.token_mode, issuer.token_delay = "slow", 0.5
    values: list[str] = []

    async def one() -> None:
        values.append((await backend.exchange(EXCHANGE, subject)).value)

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
        assert len(set(values)) == 1 and issuer.token_count() == 1
        issuer.token_mode = None
        for user in ("bob", "carol", "dave"):
            await backend.exchange(EXCHANGE, _subject(issuer, user))
        # Waiters on a request count as misses (as in backends.cache).
        assert (await backend.health())["cache"] == {"entries": 2, "hits": 0, "misses": 11}
        await backend.aclose()


@pytest.mark.parametrize(("override", "problem"), [
    ({"access_token": None}, "access_token is missing"),
    ({"issued_token_type": None}, "issued_token_type is missing"),
    ({"issued_token_type": "urn:ietf:params:oauth:token-type:id_token"}, "not the requested"),
    ({"token_type": "DPoP"}, "is not Bearer"),
    ({"expires_in": -5}, "expires_in"),
    ({"expires_in": "300"}, "expires_in"),
    ({"access_token": "has space"}, "not printable ASCII"),
])
async def test_a_malformed_answer_is_a_bad_response(issuer: OAuthIssuer, override: dict[str, Any],
                                                    problem: str) -> None:
    from sidekey.backends.oauth import TokenEndpointBadResponse

    backend = _backend(issuer, FakeClock())
    issuer.token_response_overrides = override
    with trio.fail_after(LIMIT_S), pytest.raises(TokenEndpointBadResponse) as info:
        await backend.exchange(EXCHANGE, _subject(issuer, "alice"))
    assert info.value.status == 502 and problem in info.value.message
    await backend.aclose()


async def test_an_echoing_error_description_is_not_passed_on(issuer: OAuthIssuer) -> None:
    from sidekey.backends.oauth import TokenExchangeDenied

    backend = _backend(issuer, FakeClock())
    subject = _subject(issuer, "alice")
    issuer.add_route(  # the token endpoint's answer, fixed: echoes the subject token
        "/token-echo", status=400,
        body=msgspec.json.encode({"error": "invalid_grant",
                                  "error_description": f"bad token {subject.token[:60]}"}))
    backend.cfg = msgspec.structs.replace(backend.cfg, token_endpoint=issuer.base_url + "/token-echo")
    with trio.fail_after(LIMIT_S), pytest.raises(TokenExchangeDenied) as info:
        await backend.exchange(EXCHANGE, subject)
    assert info.value.details == {"oauth_error": "invalid_grant"}
    await backend.aclose()



def test_held_subject_tokens_are_bounded_and_expire() -> None:
    from sidekey.backends.oauth import SubjectTokens

    def subject(n: int) -> Subject:
        return Subject(token="t" * 1000 + str(n), issuer="i", subject=f"u{n}", expires_at=0.0)

    held = SubjectTokens(max_entries=3, max_bytes=10_000)
    for n in range(5):
        held.put(f"j{n}", subject(n), expires_at=100.0 + n, now=0.0)
    assert len(held) == 3 and held.pop("j0", now=0.0) is None  # the oldest went first
    got = held.pop("j4", now=0.0)
    assert got is not None and got.subject == "u4" and "t" * 20 not in repr(got)
    assert held.pop("j4", now=0.0) is None  # consumed by the redeem
    assert held.pop("j3", now=103.0) is None  # the resolution token expired
    held.sweep(1000.0)
    assert len(held) == 0
    small = SubjectTokens(max_entries=100, max_bytes=2500)  # two ~1 KB tokens fit
    for n in range(4):
        small.put(f"j{n}", subject(n), expires_at=100.0, now=0.0)
    assert len(small) == 2


async def test_https_token_endpoint_verifies_its_certificate(tmp_path: Path) -> None:
    from sidekey.backends.oauth import TokenEndpointUnavailable
    from webhook_collector import make_ca

    ca, cert, key = make_ca(tmp_path / "tls", host="127.0.0.1")
    with OAuthIssuer(audience="mcp:content-api", tls=(cert, key)) as tls_issuer:
        assert tls_issuer.token_endpoint.startswith("https://")
        untrusted = _backend(tls_issuer, FakeClock())  # system CAs only
        trusted = _backend(tls_issuer, FakeClock(), ca_file=str(ca))  # (its client secret holds)
        subject = _subject(tls_issuer, "alice")
        with trio.fail_after(LIMIT_S):
            token = (await trusted.exchange(EXCHANGE, subject)).value
            assert tls_issuer.verify_issued(token, audience=DOWNSTREAM)["sub"] == "alice"
            with pytest.raises(TokenEndpointUnavailable):
                await untrusted.exchange(EXCHANGE, subject)
        assert tls_issuer.token_count() == 1  # the untrusted handshake sent nothing
        await trusted.aclose()
        await untrusted.aclose()
