"""Issue 9, item 8: bad input is never a 500.

Against a real daemon: JSON nested ~1,000 deep in ``arguments`` used to raise
RecursionError (500, unaudited); a user token with ``exp = 10**20`` passed verification,
was charged against the user's quotas and then raised OverflowError (500) where the call
was audited. Now: nesting is capped at the edge (400 ``json_too_deep``), time claims are
range-checked (401 ``token_claims_invalid``) before any quota is counted, and the
catch-all 500 path writes a ``request.failed`` event.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import jwt
import msgspec
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import Daemon
from sidekey.protocol import TokenError, json_too_deep
from sidekey.server import ConnectionState, Request
from sidekey.tokens import TOKEN_TYPE, PeerClaim, TokenCodec, load_keyset, rotate_keyset
from test_daemon_app import AUTHORIZE, app_on, self_peer

pytestmark = pytest.mark.integration
MAX_DEPTH = 32  # protocol.MAX_JSON_DEPTH, the contract (a literal: the test also runs on old code)


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def raw_json(depth: int) -> bytes:
    return b"[" * depth + b'"leaf"' + b"]" * depth


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def authorize_raw(d: Daemon, arguments_json: bytes, **extra: Any) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"server": "content-api", "tool": "create_article",
                       "agent_id": "content-writer", "user_token": d.user_token(), **extra})
    body_bytes = body[:-1].encode() + b', "arguments": {"a": ' + arguments_json + b"}}"
    return d.request("POST", "/v1/authorize", body_bytes)


def test_deep_arguments_are_a_400_and_audited(daemon: Daemon) -> None:
    # At the limit: arguments {"a": [...]} nest MAX_JSON_DEPTH levels in all.
    status, body = authorize_raw(daemon, raw_json(MAX_DEPTH - 1))
    assert status == 200, body
    for depth in (MAX_DEPTH, 1_000, 100_000):
        status, body = authorize_raw(daemon, raw_json(depth))
        assert status == 400 and body["error"]["code"] == "json_too_deep", (depth, status, body)
    # Brackets inside strings are text, not nesting.
    status, body = daemon.authorize(arguments={"re": "[" * 5_000, "q": '\\"[[[' * 100})
    assert status == 200, body
    # The same cap on redeem's arguments (and the token stays unburned).
    ok_status, ok = daemon.authorize()
    assert ok_status == 200
    token = ok["resolution_token"]
    data = (b'{"resolution_token": "' + token.encode() + b'", "arguments": {"a": '
            + raw_json(1_000) + b"}}")
    status, body = daemon.request("POST", "/v1/redeem", data)
    assert status == 400 and body["error"]["code"] == "json_too_deep", body
    status, body = daemon.request("POST", "/v1/redeem", {"resolution_token": token})
    assert status == 200, body
    rejected = [e for e in daemon.wait_events("request.rejected", 4)
                if (e.get("error") or {}).get("code") == "json_too_deep"]
    assert len(rejected) == 4
    assert "Traceback" not in daemon.log() and "RecursionError" not in daemon.log()


def test_deep_resolution_token_is_malformed_not_500(daemon: Daemon) -> None:
    header = b64(json.dumps({"alg": "HS256", "kid": "x", "typ": TOKEN_TYPE}).encode())
    for payload in (raw_json(3_000), b'{"iss": ' + raw_json(2_000) + b"}"):
        token = f"{header}.{b64(payload)}.{b64(b'sig')}"
        assert len(token) <= 8 * 1024
        status, body = daemon.request("POST", "/v1/redeem", {"resolution_token": token})
        assert status == 401 and body["error"]["code"] == "token_malformed", body
    deep_header = b64(raw_json(3_000))
    status, body = daemon.request(
        "POST", "/v1/redeem", {"resolution_token": f"{deep_header}.{b64(b'{}')}.{b64(b'x')}"})
    assert status == 401 and body["error"]["code"] == "token_malformed", body
    assert "Traceback" not in daemon.log()


def test_deep_user_token_is_malformed_not_500(daemon: Daemon) -> None:
    header = b64(json.dumps({"alg": "EdDSA", "kid": daemon.issuer_kid, "typ": "at+jwt"}).encode())
    token = f"{header}.{b64(raw_json(5_000))}.{b64(b'sig')}"
    status, body = daemon.authorize(user_token=token)
    assert status == 401 and body["error"]["code"] == "token_malformed", body
    assert "Traceback" not in daemon.log()


def quota_daemon(make_daemon: Any, per_minute: int) -> Daemon:
    d: Daemon = make_daemon()
    path = d.root / "rate-limits.yaml"
    limits = yaml.safe_load(path.read_text())
    limits["limits"]["per_user"]["requests_per_minute"] = per_minute
    path.write_text(yaml.safe_dump(limits))
    return d.start()


@pytest.mark.parametrize("claims", [
    {"exp": 10**20},
    {"exp": 1e300},
    {"exp": -1},
    {"iat": 10**20},
    {"nbf": 10**30},
    {"auth_time": 10**20},
], ids=["exp_1e20", "exp_float_1e300", "exp_negative", "iat_1e20", "nbf_1e30", "auth_time_1e20"])
def test_time_claims_out_of_range_are_401_and_charge_no_quota(
    make_daemon: Any, claims: dict[str, Any]
) -> None:
    d = quota_daemon(make_daemon, per_minute=3)
    bad = d.user_token(user="alice", extra=claims)
    for _ in range(5):
        status, body = d.authorize(tool="list_articles", user_token=bad)
        assert status == 401 and body["error"]["code"] == "token_claims_invalid", body
    # alice's 3 calls a minute are all still there: the refused calls counted for nothing.
    for i in range(3):
        status, body = d.authorize(tool="list_articles")
        assert status == 200, (i, body)
    status, body = d.authorize(tool="list_articles")
    assert status == 429, body
    assert "Traceback" not in d.log() and "OverflowError" not in d.log()
    refused = [e for e in d.wait_events("mcp.authorize", 6)
               if (e.get("error") or {}).get("code") == "token_claims_invalid"]
    assert len(refused) == 5


def test_resolution_token_time_claims_are_range_checked(tmp_path: Any) -> None:
    path = tmp_path / "keys.json"
    rotate_keyset(path)
    codec = TokenCodec(issuer="sidekey:test", keyset=load_keyset(path))
    token, claims = codec.issue(server="s", tool="t", user="u", agent=None, session=None,
                                args_digest="0" * 64, peer=PeerClaim(), now=1000.0, ttl_s=60)
    key = codec.keyset.active
    for bad in ({"exp": 10**20, "iat": 10**20 - 10, "nbf": 10**20 - 10},
                {"exp": 2**70, "iat": 2**70 - 10, "nbf": 0}):
        payload = {**msgspec.to_builtins(claims), **bad}
        forged = jwt.encode(payload, key.secret, algorithm="HS256",
                            headers={"kid": key.kid, "typ": TOKEN_TYPE})
        with pytest.raises(TokenError) as info:
            codec.verify(forged, now=1000.0)
        assert info.value.code == "token_claims_invalid"
    assert codec.verify(token, now=1000.0).claims.exp == 1060


def test_request_parameters_never_500(daemon: Daemon) -> None:
    cases: list[tuple[str, str, Any]] = [
        ("GET", "/v1/approvals?limit=" + "9" * 5000, None),
        ("GET", "/v1/approvals?limit=%ff%fe&state=%zz", None),
        ("GET", "/v1/approvals?state=%ff%00", None),
        ("GET", "/v1/approvals/apr_x/wait?timeout=1e999", None),
        ("GET", "/v1/approvals/apr_x/wait?timeout=nan", None),
        ("POST", "/v1/admin/secrets/%zz%ff%fe/rotate", {"generate": 32}),
        ("POST", "/v1/admin/secrets/" + "%" * 300 + "/rotate", {"generate": 32}),
        ("POST", "/v1/release", {"lease_id": "x", "status": "success",
                                 "result_size_bytes": 10**30}),
        ("POST", "/v1/release", {"lease_id": "x", "status": "success", "duration_ms": -1}),
        ("POST", "/v1/tokens", {"server": "content-api", "tool": "create_article", "user": "a",
                                "ttl_seconds": 10**40}),
        ("POST", "/v1/authorize", b'{"server": "content-api", "tool": "create_article", '
                                  b'"arguments": {"n": 1e400}}'),
        ("POST", "/v1/authorize", b'{"server": "content-api", "tool": "create_article", '
                                  b'"arguments": {"n": 1' + b"0" * 5000 + b"}}"),
        ("POST", "/v1/authorize", b'{"server": "content-api", "tool": "x\xff\xfe"}'),
        ("POST", "/v1/authorize", b'{"server": "content-api", "tool": "create_article", '
                                  b'"arguments": {"s": "\\ud800"}}'),
        ("POST", "/v1/redeem", {"resolution_token": "a.b.c", "arguments": [1]}),
    ]
    for method, path, body in cases:
        status, answer = daemon.request(method, path, body)
        assert status < 500, (method, path[:80], status, answer)
        assert status in (400, 401, 404, 409, 422), (path[:80], status, answer)
    # Big integers inside arguments are data, not errors.
    status, answer = daemon.authorize(arguments={"id": 10**30})
    assert status == 200, answer
    status, answer = daemon.request("GET", "/v1/health")
    assert status == 200
    assert "Traceback" not in daemon.log()


async def test_an_unexpected_error_is_a_500_and_audited(monkeypatch: pytest.MonkeyPatch) -> None:
    d = Daemon()
    (d.root / "state").mkdir(exist_ok=True)
    try:
        with self_peer() as peer:
            conn = ConnectionState(peer=peer)
            async with app_on(d) as app:

                async def broken(req: Request) -> Any:
                    raise RuntimeError("a bug with request data: " + os.urandom(4).hex())

                route = app.routes[("POST", "/v1/authorize")]
                monkeypatch.setitem(app.routes, ("POST", "/v1/authorize"),
                                    type(route)(route.tier, broken))
                req = Request(method="POST", path="/v1/authorize", query="", headers={},
                              body=json.dumps(AUTHORIZE).encode(), peer=conn.peer,
                              request_id="req_bug", conn=conn)
                resp = await app.handle(req)
                assert resp.status == 500
                assert json.loads(resp.body)["error"]["code"] == "internal"
        events = [json.loads(line) for line in d.audit_path.read_text().splitlines()]
        failed = [e for e in events if e["event_type"] == "request.failed"]
        assert len(failed) == 1, events
        assert failed[0]["request_id"] == "req_bug"
        assert failed[0]["error"]["code"] == "internal"
        assert failed[0]["exception"] == "RuntimeError"
        assert "a bug with request data" not in d.audit_path.read_text()
    finally:
        d.cleanup()


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab,:'),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(alphabet='[]{}"\\k', max_size=4), inner, max_size=3),
    max_leaves=60,
)


@settings(max_examples=400, deadline=None)
@given(value=_json_values, limit=st.integers(min_value=0, max_value=12))
def test_json_too_deep_agrees_with_the_real_depth(value: Any, limit: int) -> None:
    data = json.dumps(value, ensure_ascii=bool(limit % 2)).encode()
    assert json_too_deep(data, limit) == (_depth(value) > limit)
