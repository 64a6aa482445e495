"""Issue 14, item 2: ``POST /v1/introspect`` and ``sidekey.mcp.TokenVerifier``, against a
real daemon with its local OAuth2 issuer (tests/harness.py) and a second, real issuer
(tests/oauth_issuer.py).

* a valid token is active, with subject, scopes, client id, expiry and string claims;
  an expired one, one for another audience or issuer, a forged signature or garbage is
  inactive with the verifier's code (HTTP 200, RFC 7662 style), audited token.rejected;
* a process of another uid attested as another server (nobody, forked) is refused 403
  ``peer_mismatch`` and audited peer.rejected; a process attested as nothing is refused
  ``peer_rejected`` before the handler; an oversized token is refused at the edge
  (400 ``token_too_large``), an unknown server 404 ``server_unknown``;
* the token is never written anywhere (audit file, debug log);
* the client's ``introspect`` and the SDK ``TokenVerifier`` (also behind the SDK's own
  ``BearerAuthBackend``) give the SDK ``AccessToken`` / None.

Every child process is forked and drops to another uid itself; every wait is bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from harness import Daemon, run_as
from oauth_issuer import OAuthIssuer
from sidekey.client import (
    AccessDenied,
    AsyncClient,
    BadRequestError,
    Client,
    Introspection,
    NotFoundError,
    ProtocolError,
    TransportRequest,
    TransportResponse,
)
from sidekey.devissuer import mint_user_token

pytestmark = pytest.mark.integration

NOBODY_UID = 65534
NOBODY_GID = 65534
STRANGER_UID = 4321  # named nowhere in the config: anonymous tier
CHILD_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def d() -> Iterator[Daemon]:
    # nobody is attested as analytics-db (service tier), never as content-api.
    daemon = Daemon({"peers": {"content-api": [{"uid": "self"}],
                               "analytics-db": [{"uid": "self"}, {"uid": NOBODY_UID}]}}).start()
    try:
        yield daemon
    finally:
        daemon.cleanup()


def introspect(d: Daemon, token: str, server: str = "content-api") -> tuple[int, dict]:
    return d.request("POST", "/v1/introspect", {"server": server, "token": token})


def _token(d: Daemon, **kw: object) -> str:
    return mint_user_token(d.issuer_key, kid=d.issuer_kid, issuer="https://auth.example.com",
                           audience=str(kw.pop("audience", "mcp:content-api")),
                           subject=str(kw.pop("subject", "alice")),
                           scopes=kw.pop("scopes", ["content:read", "content:write"]),  # type: ignore[arg-type]
                           **kw)  # type: ignore[arg-type]


def _assert_never_written(d: Daemon, *tokens: str) -> None:
    written = d.everything_written()
    for token in tokens:
        assert token.encode() not in written
        # Not even one part of it (the signature is the secret-ish part; the payload
        # would be a copy of the claims).
        assert token.rsplit(".", 1)[-1].encode() not in written


# --------------------------------------------------------------------------- the endpoint


def test_valid_token_is_active_with_its_claims(d: Daemon) -> None:
    token = _token(d, subject="carol", extra={"azp": "claude-desktop", "department": "news"})
    status, body = introspect(d, token)
    assert status == 200, body
    assert body["active"] is True
    assert body["server"] == "content-api"
    assert body["sub"] == "carol"
    assert body["iss"] == "https://auth.example.com"
    assert body["aud"] == ["mcp:content-api"]
    assert body["audience"] == "mcp:content-api"
    assert body["scopes"] == ["content:read", "content:write"]
    assert body["client_id"] == "claude-desktop"
    assert isinstance(body["exp"], int) and body["exp"] > time.time()
    assert body["expires_at"].endswith("Z")
    assert body["claims"] == {"department": "news"}  # string claims only; no jti, no scope
    assert "code" not in body
    [event] = [e for e in d.wait_events("token.introspected", 1)
               if e.get("request_id") == body["request_id"]]
    assert event["user_id"] == "carol"
    assert event["server"] == "content-api"
    assert event["peer"]["uid"] == os.getuid()
    assert event["auth"]["token_issuer"] == "https://auth.example.com"
    assert event["auth"]["client_id"] == "claude-desktop"
    assert event["auth"]["scopes"] == ["content:read", "content:write"]
    _assert_never_written(d, token)


@pytest.mark.parametrize(("kind", "code"), [
    ("expired", "token_expired"),
    ("audience", "audience_mismatch"),
    ("signature", "token_bad_signature"),
    ("issuer", "issuer_mismatch"),
    ("garbage", "token_malformed"),
])
def test_bad_token_is_inactive_with_its_code(d: Daemon, kind: str, code: str) -> None:
    if kind == "expired":
        token = _token(d, now=time.time() - 7200, ttl_s=3600)
    elif kind == "audience":
        token = _token(d, audience="mcp:analytics-db")
    elif kind == "signature":
        good = _token(d)
        head, payload, sig = good.split(".")
        token = f"{head}.{payload}.{'A' if sig[0] != 'A' else 'B'}{sig[1:]}"
    elif kind == "issuer":
        # A real second issuer, same audience: its iss is not the server's issuer.
        with OAuthIssuer(audience="mcp:content-api") as other:
            token = other.mint(other.claims(scope="content:read"), alg="ES256")
    else:
        token = "not-a-jwt"
    status, body = introspect(d, token)
    assert status == 200, body
    assert body["active"] is False
    assert body["code"] == code
    assert "sub" not in body and "scopes" not in body
    [event] = [e for e in d.events_of("token.rejected") if e.get("request_id") == body["request_id"]]
    assert event["server"] == "content-api"
    assert event["error"]["code"] == code
    assert event["path"] == "/v1/introspect"
    _assert_never_written(d, token)


def test_another_servers_process_is_refused_peer_mismatch_and_audited(d: Daemon) -> None:
    token = d.user_token("content-api")

    def child(dd: Daemon) -> list[object]:
        return [introspect(dd, token),
                # its own server: allowed (the check is per server, not per uid)
                introspect(dd, dd.user_token("analytics-db"), server="analytics-db")]

    (status, body), (own_status, own_body) = run_as(d, NOBODY_UID, NOBODY_GID, child)
    assert status == 403, body
    assert body["error"]["code"] == "peer_mismatch"
    assert own_status == 200 and own_body["active"] is True, own_body
    rid = body["error"]["request_id"]
    [event] = [e for e in d.events_of("peer.rejected") if e.get("request_id") == rid]
    assert event["server"] == "content-api"
    assert event["peer"]["uid"] == NOBODY_UID
    assert event["error"]["code"] == "peer_mismatch"
    # Refused before verification: no verdict on the token was written for it.
    assert not [e for e in d.audit_events()
                if e.get("request_id") == rid and e["event_type"] != "peer.rejected"]
    _assert_never_written(d, token)


def test_anonymous_caller_is_refused(d: Daemon) -> None:
    token = d.user_token("content-api")
    status, body = run_as(d, STRANGER_UID, STRANGER_UID, lambda dd: introspect(dd, token))
    assert status == 403, body
    assert body["error"]["code"] == "peer_rejected"
    rid = body["error"]["request_id"]
    [event] = [e for e in d.events_of("peer.rejected") if e.get("request_id") == rid]
    assert event["peer"]["uid"] == STRANGER_UID


def test_bad_requests_are_refused_at_the_edge(d: Daemon) -> None:
    token = d.user_token("content-api")
    status, body = introspect(d, "e" * 16_385)
    assert (status, body["error"]["code"]) == (400, "token_too_large")
    status, body = introspect(d, token, server="no-such-server")
    assert (status, body["error"]["code"]) == (404, "server_unknown")
    status, body = d.request("POST", "/v1/introspect", {"server": "content-api"})
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    status, body = d.request("POST", "/v1/introspect", {"server": "content-api", "token": ""})
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    status, body = d.request("POST", "/v1/introspect",
                             {"server": "content-api", "token": token, "user": "x"})
    assert (status, body["error"]["code"]) == (400, "invalid_request")
    for code in ("token_too_large", "server_unknown"):
        assert [e for e in d.events_of("request.rejected") if e["error"]["code"] == code]
    _assert_never_written(d, token)


def test_oauth2_none_server_is_unprocessable(make_daemon: object) -> None:
    daemon: Daemon = make_daemon()  # type: ignore[operator]
    token = daemon.user_token("content-api")
    registry = daemon.root / "mcp-server-registry.yaml"
    spec = yaml.safe_load(registry.read_text())
    spec["servers"]["content-api"]["oauth2"] = "none"
    registry.write_text(yaml.safe_dump(spec))
    daemon.start()
    status, body = introspect(daemon, token)
    assert (status, body["error"]["code"]) == (422, "oauth2_not_configured"), body


# --------------------------------------------------------------------------- the client


def test_client_introspect(d: Daemon) -> None:
    with Client(d.socket) as client:
        result = client.introspect("content-api", _token(d, extra={"client_id": "agent-7"}))
        assert isinstance(result, Introspection)
        assert result.active and result.sub == "alice" and result.client_id == "agent-7"
        assert result.scopes == frozenset({"content:read", "content:write"})
        inactive = client.introspect("content-api", _token(d, audience="mcp:analytics-db"))
        assert not inactive.active and inactive.code == "audience_mismatch"
        assert inactive.sub is None and not inactive.scopes
        with pytest.raises(NotFoundError) as nf:
            client.introspect("no-such-server", "x")
        assert nf.value.code == "server_unknown"
        with pytest.raises(BadRequestError) as bad:
            client.introspect("content-api", "e" * 20_000)
        assert bad.value.code == "token_too_large"


def test_client_fails_closed_on_an_active_answer_without_facts() -> None:
    def transport(req: TransportRequest) -> TransportResponse:
        return TransportResponse(200, b'{"active": true, "server": "content-api"}')

    with pytest.raises(ProtocolError):
        Client("/nonexistent", transport=transport).introspect("content-api", "t")

    def other_server(req: TransportRequest) -> TransportResponse:
        return TransportResponse(200, b'{"active": true, "server": "analytics-db", "sub": "a",'
                                      b' "iss": "i", "exp": 1}')

    with pytest.raises(ProtocolError):
        Client("/nonexistent", transport=other_server).introspect("content-api", "t")


# --------------------------------------------------------------------------- sidekey.mcp


async def test_token_verifier_gives_the_sdk_access_token(d: Daemon) -> None:
    from mcp.server.auth.provider import AccessToken

    from sidekey.mcp import TokenVerifier

    token = _token(d, extra={"azp": "claude-desktop", "department": "news"})
    verifier = TokenVerifier("content-api", socket_path=d.socket)
    try:
        got = await verifier.verify_token(token)
        assert isinstance(got, AccessToken)
        assert got.token == token
        assert got.client_id == "claude-desktop"
        assert got.scopes == ["content:read", "content:write"]
        assert got.expires_at is not None and got.expires_at > time.time()
        assert got.resource == "mcp:content-api"
        if "subject" in AccessToken.model_fields:  # SDK 2.x
            assert got.subject == "alice"
            assert got.claims is not None
            assert got.claims["iss"] == "https://auth.example.com"
            assert got.claims["department"] == "news"
        assert await verifier.verify_token(_token(d, now=time.time() - 7200, ttl_s=3600)) is None
        assert await verifier.verify_token(_token(d, audience="mcp:analytics-db")) is None
        no_client = await verifier.verify_token(_token(d))
        assert no_client is not None and no_client.client_id == ""
    finally:
        await verifier.aclose()
    _assert_never_written(d, token)


async def test_token_verifier_behind_the_sdks_bearer_backend(d: Daemon) -> None:
    from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, BearerAuthBackend
    from mcp.server.auth.settings import AuthSettings
    from starlette.requests import HTTPConnection

    from sidekey.mcp.auth import TokenVerifier

    async with AsyncClient(d.socket) as client:
        verifier = TokenVerifier("content-api", client=client)

        def conn(token: str) -> HTTPConnection:
            return HTTPConnection({"type": "http", "headers": [
                (b"authorization", f"Bearer {token}".encode())]})

        backend = BearerAuthBackend(verifier)
        result = await backend.authenticate(conn(_token(d, extra={"azp": "claude-desktop"})))
        assert result is not None
        creds, user = result
        assert isinstance(user, AuthenticatedUser)
        assert user.username == "claude-desktop"
        assert set(creds.scopes) == {"content:read", "content:write"}
        assert await backend.authenticate(conn(_token(d, audience="mcp:analytics-db"))) is None
        await verifier.aclose()  # not its client: stays usable
        assert (await client.health())["status"] in ("ok", "degraded")
    # The server class takes it as its token_verifier.
    try:
        from mcp.server.mcpserver import MCPServer as Server
    except ImportError:  # SDK 1.x
        from mcp.server.fastmcp import FastMCP as Server
    Server("content-api", token_verifier=verifier,
           auth=AuthSettings(issuer_url="https://auth.example.com",
                             resource_server_url="https://content-api.example.test/mcp",
                             validate_token_resource=False))


async def test_token_verifier_raises_when_not_attested(d: Daemon) -> None:
    """A deployment fault is not a user's bad token: it raises, it does not answer None."""
    from sidekey.mcp.auth import TokenVerifier

    verifier = TokenVerifier("no-such-server", socket_path=d.socket)
    try:
        with pytest.raises(NotFoundError):
            await verifier.verify_token(_token(d))
    finally:
        await verifier.aclose()


def test_token_verifier_raises_for_another_servers_process(d: Daemon) -> None:
    from sidekey.mcp.auth import TokenVerifier

    def child(dd: Daemon) -> object:
        import trio

        async def go() -> object:
            v = TokenVerifier("content-api", socket_path=dd.socket)
            try:
                await v.verify_token(dd.user_token("content-api"))
            except AccessDenied as exc:
                return exc.code
            finally:
                await v.aclose()
            return "no error"

        return trio.run(go)

    assert run_as(d, NOBODY_UID, NOBODY_GID, child) == "peer_mismatch"


def test_sidekey_mcp_auth_without_the_sdk_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['mcp'] = None\n"
        "import sidekey.mcp\n"  # the package itself imports without the SDK
        "try:\n"
        "    import sidekey.mcp.auth\n"
        "except ImportError as exc:\n"
        "    print('IMPORT-ERROR', exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env, check=True)
    assert "IMPORT-ERROR" in out.stdout, out.stderr
    assert "sidekey[mcp]" in out.stdout
