"""The governance decision end to end: a real daemon, a real OAuth2 issuer on loopback
(OpenID discovery + JWKS, tokens minted with its private keys), and the attack matrix
of issue 3 — each attempt refused with its code, and audited."""

from __future__ import annotations

import datetime
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import yaml

from harness import BOTH_LOG_FORMATS, Daemon
from oauth_issuer import OAuthIssuer
from sidekey import daemon as daemon_mod
from sidekey.audit import AuditLog
from sidekey.audit.jsonl import open_jsonl_sink
from sidekey.backends import build_backends
from sidekey.config import load_config
from sidekey.peer import attest
from sidekey.server import ConnectionState, Request
from sidekey.store import open_store


def _point_servers_at(d: Daemon, issuer: OAuthIssuer, *, legacy: bool = False) -> None:
    """The test's copy of mcp-server-registry.yaml names the loopback issuer."""
    path = d.root / "mcp-server-registry.yaml"
    doc = yaml.safe_load(path.read_text())
    for spec in doc["servers"].values():
        spec["oauth2"]["issuer"] = issuer.issuer
    if legacy:
        doc["servers"]["legacy-crm"] = {
            "url": "https://mcp.internal.example.com/crm-v1",
            "oauth2": {"issuer": issuer.issuer, "audience": "mcp:legacy-crm", "scopes": ["crm:read"]},
            "tool_scopes": {"list_accounts": {"required": ["crm:read"]}},
        }
    path.write_text(yaml.safe_dump(doc))


@pytest.fixture
def issuer() -> Iterator[OAuthIssuer]:
    with OAuthIssuer(audience="mcp:content-api") as iss:
        yield iss


@pytest.fixture
def governed(make_daemon: Any, issuer: OAuthIssuer) -> Daemon:
    d: Daemon = make_daemon({"peers": {"legacy-crm": [{"uid": "self"}]}})
    _point_servers_at(d, issuer, legacy=True)
    agents = d.root / "agent-tool-mappings.yaml"
    doc = yaml.safe_load(agents.read_text())
    doc["agents"]["crm-bot"] = {"allowed_servers": [{"server": "legacy-crm", "tools": ["list_accounts"]}]}
    agents.write_text(yaml.safe_dump(doc))
    return d.start()


def _call(d: Daemon, token: str | None, *, server: str = "content-api", tool: str = "create_article",
          agent: str = "content-writer") -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"server": server, "tool": tool, "agent_id": agent, "arguments": {"t": 1}}
    if token is not None:
        body["user_token"] = token
    return d.request("POST", "/v1/authorize", body)


def _denied_and_audited(d: Daemon, result: tuple[int, dict[str, Any]], code: str, status: int) -> None:
    got_status, body = result
    assert (got_status, body.get("error", {}).get("code")) == (status, code), body
    events = [e for e in d.audit_events() if e.get("request_id") == body["error"]["request_id"]]
    assert events, f"no audit event for {code}"
    assert events[-1]["error"]["code"] == code
    assert events[-1]["policy"]["decision"] == "deny"


def test_valid_token_allows_and_audits_the_chain(governed: Daemon, issuer: OAuthIssuer) -> None:
    token = issuer.mint(issuer.claims(scope="content:read content:write"), alg="RS256")
    status, body = _call(governed, token)
    assert status == 200, body
    rules = body["policy"]["rules_matched"]
    assert rules[:3] == ["server.declared:content-api", "registry.active:content-api",
                         "peer.matches:content-api"]
    assert any(r.startswith("oauth2.verified:") for r in rules)
    assert any(r.startswith("agent.granted:content-writer") for r in rules)
    assert body["user_id"] == "alice@example.test"
    event = governed.wait_events("mcp.authorize")[-1]
    assert event["auth"]["verified"] is True and "content:write" in event["auth"]["scopes"]
    assert event["policy"]["rules_matched"] == rules
    for alg in ("ES256", "EdDSA"):
        assert _call(governed, issuer.mint(issuer.claims(scope="content:write"), alg=alg))[0] == 200


@BOTH_LOG_FORMATS
def test_attack_matrix(governed: Daemon, issuer: OAuthIssuer) -> None:
    good = issuer.claims(scope="content:read content:write")
    now = int(time.time())
    cases: list[tuple[str, str, int, dict[str, Any]]] = [
        ("alg none", "token_wrong_algorithm", 401,
         {"token": issuer.mint(good, alg="none", headers={"kid": issuer.kids["RS256"]})}),
        ("HS256 with the public key as secret", "token_wrong_algorithm", 401,
         {"token": issuer.mint(good, alg="HS256", key=issuer.public_pem("RS256"),
                               headers={"kid": issuer.kids["RS256"]})}),
        ("unknown kid", "token_unknown_key", 401, {"token": issuer.mint(good, kid="nobody-knows-me")}),
        ("expired", "token_expired", 401,
         {"token": issuer.mint(issuer.claims(scope="content:write", now=now - 3600, ttl=60))}),
        ("nbf in the future", "token_not_yet_valid", 401,
         {"token": issuer.mint(issuer.claims(scope="content:write", nbf=now + 3600))}),
        ("missing exp", "token_claims_invalid", 401,
         {"token": issuer.mint(issuer.claims(scope="content:write", exp=None))}),
        ("wrong issuer", "issuer_mismatch", 401,
         {"token": issuer.mint(issuer.claims(scope="content:write", iss="https://evil.example"))}),
        ("content-api token for analytics-db (lateral movement)", "audience_mismatch", 403,
         {"token": issuer.mint(good), "server": "analytics-db", "tool": "query_metrics"}),
        ("content:read calling create_article", "scope_missing", 403,
         {"token": issuer.mint(issuer.claims(scope="content:read"))}),
        ("sales-assistant calling content-api", "agent_denied_server", 403,
         {"token": issuer.mint(good), "agent": "sales-assistant", "tool": "list_articles"}),
        ("content-writer calling a tool it was not granted", "agent_not_granted", 403,
         {"token": issuer.mint(issuer.claims(aud="mcp:analytics-db", scope="analytics:read")),
          "server": "analytics-db", "tool": "export_report"}),
        ("no token at all", "token_missing", 401, {"token": None}),
        ("legacy-crm after its deprecation date (2026-06-01)", "server_deprecated", 403,
         {"token": issuer.mint(issuer.claims(aud="mcp:legacy-crm", scope="crm:read")),
          "server": "legacy-crm", "tool": "list_accounts", "agent": "crm-bot"}),
    ]
    for name, code, status, case in cases:
        result = _call(governed, case["token"], server=case.get("server", "content-api"),
                       tool=case.get("tool", "create_article"), agent=case.get("agent", "content-writer"))
        try:
            _denied_and_audited(governed, result, code, status)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    deprecated = [e for e in governed.audit_events()
                  if e.get("error", {}) and e["error"]["code"] == "server_deprecated"][-1]
    assert "2026-06-01" in deprecated["error"]["message"] and "crm-v2" in deprecated["error"]["message"]
    # No bearer token in any audit line or daemon log.
    written = governed.everything_written().decode(errors="replace")
    for _, _, _, case in cases:
        if case["token"]:
            assert case["token"] not in written


def test_verified_tokens_are_cached_and_jwks_fetched_once(governed: Daemon, issuer: OAuthIssuer) -> None:
    token = issuer.mint(issuer.claims(scope="content:write"))
    for _ in range(20):
        assert _call(governed, token)[0] == 200
    assert issuer.counts["jwks"] == 1, issuer.counts


def test_issuer_down_is_503_without_hanging(make_daemon: Any, issuer: OAuthIssuer) -> None:
    d = make_daemon()
    _point_servers_at(d, issuer)
    d.start()
    token = issuer.mint(issuer.claims(scope="content:write"))
    issuer.set_down(True, refuse=True)
    # No hang: the request has the harness's 10 s socket timeout (TimeoutError otherwise).
    status, body = _call(d, token)
    assert status == 503 and body["error"]["code"] == "jwks_unavailable", body
    # other servers' calls and health are unaffected
    assert d.request("GET", "/v1/health")[0] == 200


def test_legacy_crm_works_with_a_warning_before_its_deprecation_date(
    make_daemon: Any, issuer: OAuthIssuer
) -> None:
    """The date is injected: the app runs in-process with a clock set to 2026-05-01."""
    d: Daemon = make_daemon({"peers": {"legacy-crm": [{"uid": "self"}]}})
    _point_servers_at(d, issuer, legacy=True)
    agents = d.root / "agent-tool-mappings.yaml"
    doc = yaml.safe_load(agents.read_text())
    doc["agents"]["crm-bot"] = {"allowed_servers": [{"server": "legacy-crm", "tools": ["list_accounts"]}]}
    agents.write_text(yaml.safe_dump(doc))
    (d.root / "state").mkdir(exist_ok=True)
    before = datetime.datetime(2026, 5, 1, 12, tzinfo=datetime.UTC).timestamp()
    after = datetime.datetime(2026, 6, 1, 0, 0, 1, tzinfo=datetime.UTC).timestamp()
    clock = {"now": before}
    token = issuer.mint(issuer.claims(aud="mcp:legacy-crm", scope="crm:read", now=before, ttl=3600))
    token_after = issuer.mint(issuer.claims(aud="mcp:legacy-crm", scope="crm:read", now=after, ttl=3600))
    body = {"server": "legacy-crm", "tool": "list_accounts", "agent_id": "crm-bot", "arguments": {}}

    async def main() -> list[tuple[int, dict[str, Any]]]:
        loaded = load_config(d.config_path)
        store = open_store(loaded.state_dir)
        sink = open_jsonl_sink(loaded.audit_path, fsync=True)
        app = daemon_mod.Sidekey(loaded, store=store, audit=AuditLog([sink]),
                                 backends=build_backends(loaded),
                                 codec=daemon_mod.build_codec(loaded), clock=lambda: clock["now"])
        out = []
        a, b = socket.socketpair()
        peer = attest(a)
        conn = ConnectionState(peer=peer)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(sink.run)
                for tok, at in ((token, before), (token_after, after)):
                    clock["now"] = at
                    req = Request(method="POST", path="/v1/authorize", query="", headers={},
                                  body=json.dumps({**body, "user_token": tok}).encode(),
                                  peer=peer, request_id="req_t", conn=conn)
                    resp = await app.handle(req)
                    out.append((resp.status, json.loads(resp.body)))
                nursery.cancel_scope.cancel()
        finally:
            peer.close()
            a.close()
            b.close()
            await app.oauth.aclose()
            await sink.aclose()
            await store.aclose()
        return out

    (s1, b1), (s2, b2) = trio.run(main)
    assert s1 == 200, b1
    assert any("2026-06-01" in w for w in b1["policy"]["warnings"]), b1
    assert s2 == 403 and b2["error"]["code"] == "server_deprecated", b2
    assert "crm-v2" in b2["error"]["message"]
