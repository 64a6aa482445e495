"""The call path's decisions and records (authorize, redeem, release), in-process on a
real store, backend and audit file (issue 10 item 1: the mutants of
``sidekey/daemon/calls.py`` that no other test killed).

Each test says which guarantee it guards; the audit file is read back because what a
refusal leaves there (its type, its ``jti``, its code) is part of the contract.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

import pytest
import trio
import yaml

from harness import Daemon
from sidekey import protocol
from sidekey.backends import SecretValue
from sidekey.daemon import calls as calls_mod
from sidekey.server import ConnectionState
from test_daemon_app import AUTHORIZE, app_on, call, self_peer

NOW = datetime.datetime(2026, 11, 30, 12, 0, 0, tzinfo=datetime.UTC).timestamp()
NOBODY = 65534


class Posing:
    """A connection peer with a chosen identity (pid, uid, start time), for decisions
    about WHICH process asks: in-process every real peer is this test process (root,
    owner tier). Its recheck passes; the identity is what the daemon sees."""

    def __init__(self, real: Any, **changes: Any) -> None:
        self.identity = dataclasses.replace(real.identity, **changes)

    def recheck(self) -> None:
        pass


def posing(peer: Any, **changes: Any) -> ConnectionState:
    return ConnectionState(peer=Posing(peer, **changes))  # type: ignore[arg-type]


def nobody(peer: Any, pid: int, **changes: Any) -> ConnectionState:
    """Another MCP server process: uid nobody (attested as content-api, service tier)."""
    return posing(peer, uid=NOBODY, gid=NOBODY, user="nobody", group=None, supplementary_gids=(),
                  supplementary_groups=(), pid=pid, **changes)


def nobody_serves_content_api(d: Daemon) -> None:
    cfg = yaml.safe_load(d.config_path.read_text())
    cfg["peers"]["content-api"] = [{"uid": "self"}, {"uid": NOBODY}]
    d.config_path.write_text(yaml.safe_dump(cfg))


@pytest.fixture
def d(staged: Daemon) -> Daemon:
    return staged


def edit_config(d: Daemon, **sections: Any) -> None:
    cfg = yaml.safe_load(d.config_path.read_text())
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    d.config_path.write_text(yaml.safe_dump(cfg))


def events(d: Daemon, event_type: str) -> list[dict[str, Any]]:
    if not d.audit_path.exists():
        return []
    out = [json.loads(line) for line in d.audit_path.read_text().splitlines() if line]
    return [e for e in out if e["event_type"] == event_type]


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat().replace("+00:00", "Z")


def authorize_body(d: Daemon, **kw: Any) -> dict[str, Any]:
    return {**AUTHORIZE, "session_id": "s1", "user_token": d.user_token("content-api"), **kw}


async def leased(app: Any, conn: ConnectionState, d: Daemon, **kw: Any) -> Any:
    """Authorize (with ``kw`` over the defaults), then redeem; both must be allowed.
    Returns the lease."""
    status, auth = await call(app, conn, "/v1/authorize", authorize_body(d, **kw))
    assert status == 200, auth
    status, lease = await call(app, conn, "/v1/redeem", {"resolution_token": auth["resolution_token"]})
    assert status == 200, lease
    return lease


# ---------------------------------------------------------------------------- redeem


async def test_backend_error_at_redeem_is_refused_with_its_code_and_audited_with_the_jti(
    d: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret backend failing during redeem: the client gets the backend's precise
    code, and a request.rejected event names the token (jti) it burned, so the refusal
    can be joined to its mcp.authorize; no lease stays active, the token stays burned."""
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            status, auth = await call(app, conn, "/v1/authorize", authorize_body(d))
            assert status == 200, auth

            async def broken(ref: Any) -> SecretValue:
                raise protocol.Unavailable("vault sealed", code="backend_unavailable")

            monkeypatch.setattr(app.backends["local"], "fetch", broken)
            status, body = await call(app, conn, "/v1/redeem",
                                      {"resolution_token": auth["resolution_token"]})
            assert status == 503 and body["error"]["code"] == "backend_unavailable", body
            assert await app.store.leases_in_state("active") == []
            monkeypatch.undo()
            status, body = await call(app, conn, "/v1/redeem",
                                      {"resolution_token": auth["resolution_token"]})
            assert status == 409 and body["error"]["code"] == "token_replayed", body
    jti = events(d, "mcp.authorize")[-1]["jti"]
    rejected = events(d, "request.rejected")
    assert len(rejected) == 1, rejected
    assert rejected[0]["jti"] == jti
    assert rejected[0]["error"]["code"] == "backend_unavailable"
    assert rejected[0]["tool"] == "create_article" and rejected[0]["user_id"] == "alice"


async def test_backend_timeout_at_redeem_is_503_backend_unavailable_and_audited(
    d: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend that hangs is cut at BACKEND_TIMEOUT_S: 503 backend_unavailable, and a
    request.rejected event with the jti (not a 500, not a hung request)."""
    monkeypatch.setattr(calls_mod, "BACKEND_TIMEOUT_S", 0.2)
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            status, auth = await call(app, conn, "/v1/authorize", authorize_body(d))
            assert status == 200, auth

            async def hangs(ref: Any) -> SecretValue:
                await trio.sleep_forever()
                raise AssertionError

            monkeypatch.setattr(app.backends["local"], "fetch", hangs)
            with trio.fail_after(10):
                status, body = await call(app, conn, "/v1/redeem",
                                          {"resolution_token": auth["resolution_token"]})
            assert status == 503 and body["error"]["code"] == "backend_unavailable", body
            assert body["error"]["message"] == "secret backend timed out"
    jti = events(d, "mcp.authorize")[-1]["jti"]
    rejected = events(d, "request.rejected")
    assert [e["jti"] for e in rejected] == [jti], rejected


def two_secrets(d: Daemon) -> None:
    """create_article gets a second secret, so a redeem can fail half-way."""
    cfg = yaml.safe_load(d.config_path.read_text())
    cfg["secrets"]["content-api"]["create_article"]["SECOND_KEY"] = {
        "backend": "local", "name": "content-api/read-key"}
    d.config_path.write_text(yaml.safe_dump(cfg))


async def test_dynamic_credentials_are_revoked_when_redeem_fails_half_way(
    d: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dynamic credential created for a call whose redeem then fails (the next secret's
    backend errs) is revoked at once: it must not outlive the call it was made for."""
    two_secrets(d)
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            backend = app.backends["local"]
            released: list[str] = []
            fetched: list[str] = []

            async def fetch(ref: Any) -> SecretValue:
                fetched.append(ref.name)
                if len(fetched) == 2:
                    raise protocol.Unavailable("backend down", code="backend_unavailable")
                return SecretValue(value="dyn", version="1", lease_id=f"bl-{len(fetched)}")

            async def release(lease_id: str) -> None:
                released.append(lease_id)

            monkeypatch.setattr(backend, "fetch", fetch)
            monkeypatch.setattr(backend, "release", release)
            status, auth = await call(app, conn, "/v1/authorize", authorize_body(d))
            assert status == 200, auth
            status, body = await call(app, conn, "/v1/redeem",
                                      {"resolution_token": auth["resolution_token"]})
            assert status == 503 and body["error"]["code"] == "backend_unavailable", body
            assert len(fetched) == 2
            assert released == ["bl-1"]


async def test_dynamic_credentials_of_a_lease_are_revoked_at_release_static_ones_not(
    d: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dynamic credentials a lease carried are revoked when it is released (and
    only those: a static secret has no backend lease to end)."""
    two_secrets(d)
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            backend = app.backends["local"]
            released: list[str] = []
            real_fetch = backend.fetch

            async def fetch(ref: Any) -> SecretValue:
                value: SecretValue = await real_fetch(ref)
                if ref.name == "content-api/write-key":  # CONTENT_API_KEY: dynamic
                    # journaled as a dynamic backend does before handing a credential out
                    await app.store.journal_backend_lease("local", "bl-w", expires_at=NOW + 1e6,
                                                          at=NOW)
                    return SecretValue(value=value.value, version=value.version, lease_id="bl-w")
                return value

            async def release(lease_id: str) -> None:
                released.append(lease_id)

            monkeypatch.setattr(backend, "fetch", fetch)
            monkeypatch.setattr(backend, "release", release)
            lease = await leased(app, conn, d)
            assert sorted(lease["secrets"]) == ["CONTENT_API_KEY", "SECOND_KEY"]
            assert released == []
            status, body = await call(app, conn, "/v1/release",
                                      {"lease_id": lease["lease_id"], "status": "success"})
            assert status == 200, body
            assert released == ["bl-w"]


async def test_lease_lives_no_longer_than_its_shortest_lived_credential(
    d: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of two dynamic credentials, one dies in 45 s (its Vault token expires then), one
    in 90 s: the lease ends at 45 s, not at leases.max_ttl_seconds (120 s); the lease,
    the answer and the mcp.redeem event all say so."""
    two_secrets(d)
    now = [NOW]
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d, clock=lambda: now[0]) as app:
            backend = app.backends["local"]
            real_fetch = backend.fetch

            async def fetch(ref: Any) -> SecretValue:
                value: SecretValue = await real_fetch(ref)
                if ref.name == "content-api/write-key":
                    await app.store.journal_backend_lease("local", "bl-short", expires_at=NOW + 45,
                                                          at=NOW)
                    return SecretValue(value=value.value, version="dynamic", lease_id="bl-short",
                                       lease_ttl_s=45)
                await app.store.journal_backend_lease("local", "bl-long", expires_at=NOW + 90, at=NOW)
                return SecretValue(value=value.value, version="dynamic", lease_id="bl-long",
                                   lease_ttl_s=90)

            async def release(lease_id: str) -> None:
                pass

            monkeypatch.setattr(backend, "fetch", fetch)
            monkeypatch.setattr(backend, "release", release)
            token = d.user_token("content-api", ttl_s=3600, now=NOW - 60)
            lease = await leased(app, conn, d, user_token=token)
            assert lease["expires_at"] == iso(NOW + 45), lease
            [active] = await app.store.leases_in_state("active")
            assert active.expires_at == NOW + 45
    assert events(d, "mcp.redeem")[-1]["expires_at"] == iso(NOW + 45)


async def test_lease_lives_no_longer_than_max_ttl_nor_the_token(d: Daemon) -> None:
    """A lease expires at min(token exp, now + leases.max_ttl_seconds): 120 s under a
    300 s token; under a 60 s token, at the token's exp. mcp.redeem
    records the same instant."""
    now = [NOW]
    token = d.user_token("content-api", ttl_s=3600, now=NOW - 60)
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d, clock=lambda: now[0]) as app:
            status, auth = await call(app, conn, "/v1/authorize", authorize_body(d, user_token=token))
            assert status == 200, auth
            now[0] += 10
            status, lease = await call(app, conn, "/v1/redeem",
                                       {"resolution_token": auth["resolution_token"]})
            assert status == 200, lease
            assert lease["expires_at"] == iso(NOW + 10 + 120), lease
        assert events(d, "mcp.redeem")[-1]["expires_at"] == iso(NOW + 10 + 120)
        edit_config(d, tokens={"ttl_seconds": 60})
        async with app_on(d, clock=lambda: now[0]) as app:
            status, auth = await call(app, conn, "/v1/authorize", authorize_body(d, user_token=token))
            assert status == 200, auth
            assert auth["expires_at"] == iso(now[0] + 60)
            status, lease = await call(app, conn, "/v1/redeem",
                                       {"resolution_token": auth["resolution_token"]})
            assert status == 200, lease
            assert lease["expires_at"] == auth["expires_at"], lease


# ---------------------------------------------------------------------------- release


async def test_tool_call_event_records_the_result_as_reported(d: Daemon) -> None:
    """mcp.tool_call carries what the server reported about the call: status, duration,
    size, and the tool's error exactly when there was one (no "error" key otherwise); a
    result over the tool's max_result_size_kb is withheld (the client drops it) and the
    record says so; the call's arguments and auth come from the authorize."""
    limits = yaml.safe_load((d.root / "rate-limits.yaml").read_text())
    limits["limits"]["per_tool"]["create_article"]["max_result_size_kb"] = 1
    (d.root / "rate-limits.yaml").write_text(yaml.safe_dump(limits))
    reports: list[dict[str, Any]] = [
        {"status": "success", "duration_ms": 7, "result_size_bytes": 1024},
        {"status": "error", "error": "upstream 502", "result_size_bytes": 1025},
        {"status": "success"},
    ]
    answers = []
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            for report in reports:
                lease = await leased(app, conn, d)
                status, body = await call(app, conn, "/v1/release",
                                          {"lease_id": lease["lease_id"], **report})
                assert status == 200 and body["state"] == "released", body
                answers.append(body["withhold_result"])
    assert answers == [False, True, False]
    calls = events(d, "mcp.tool_call")
    assert [e["result"] for e in calls] == [
        {"status": "success", "duration_ms": 7, "result_size_bytes": 1024},
        {"status": "error", "result_size_bytes": 1025, "withheld": True, "error": "upstream 502"},
        {"status": "success"},
    ]
    for e in calls:
        assert e["arguments"] == AUTHORIZE["arguments"]
        assert e["auth"]["verified"] is True and e["auth"]["token_issuer"] == "https://auth.example.com"
        assert e["policy"] is not None
        assert "call_record" not in e and "jti" not in e


async def test_tool_call_event_after_a_restart_refers_to_the_authorize(d: Daemon) -> None:
    """The call record is in memory: released after a restart, mcp.tool_call says the
    record was dropped and names the jti whose mcp.authorize has the arguments."""
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            lease = await leased(app, conn, d)
        async with app_on(d) as app:
            status, body = await call(app, conn, "/v1/release",
                                      {"lease_id": lease["lease_id"], "status": "success"})
            assert status == 200, body
    jti = events(d, "mcp.authorize")[-1]["jti"]
    event = events(d, "mcp.tool_call")[-1]
    assert event["call_record"] == "dropped" and event["jti"] == jti
    assert event["arguments"] is None


# ---------------------------------------------------------------------------- authorize


def set_limits(d: Daemon, **per: Any) -> None:
    limits = yaml.safe_load((d.root / "rate-limits.yaml").read_text())
    for section, values in per.items():
        target = limits["limits"]
        for part in section.split("."):
            target = target[part]
        target.update(values)
    (d.root / "rate-limits.yaml").write_text(yaml.safe_dump(limits))


async def test_allowed_authorize_event_records_the_verified_user_token(d: Daemon) -> None:
    """mcp.authorize of an allowed call names the token it was decided on: issuer, the
    token's scopes (sorted), its expiry, verified; and the resolution token's jti/exp."""
    token = d.user_token("content-api", scopes=["content:write", "content:read"], ttl_s=600, now=NOW - 60)
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d, clock=lambda: NOW) as app:
            status, auth = await call(app, conn, "/v1/authorize", authorize_body(d, user_token=token))
            assert status == 200, auth
            # the allowed authorize's event is queued; the redeem's is durable after it
            status, lease = await call(app, conn, "/v1/redeem",
                                       {"resolution_token": auth["resolution_token"]})
            assert status == 200, lease
    event = events(d, "mcp.authorize")[-1]
    assert event["auth"] == {"token_issuer": "https://auth.example.com",
                             "scopes": ["content:read", "content:write"],
                             "token_exp": iso(NOW + 540), "verified": True}
    assert event["token_exp"] == auth["expires_at"] == iso(NOW + 300)
    assert event["jti"] and "approval_id" not in event and event.get("error") is None


async def test_a_bad_user_token_is_a_policy_denial_audited_as_mcp_authorize(d: Daemon) -> None:
    """A user token that fails verification (wrong audience) is an input to the policy
    decision, not an error that escapes it: refused with the policy's code, audited as
    mcp.authorize with the rules that matched (auth says: not verified)."""
    bad = d.user_token("content-api", audience="mcp:analytics-db")
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            status, body = await call(app, conn, "/v1/authorize", authorize_body(d, user_token=bad))
    assert status in (401, 403), body
    assert "rules_matched" in body["error"]["details"], body
    denied = [e for e in events(d, "mcp.authorize") if e.get("error")]
    assert len(denied) == 1 and denied[0]["error"]["code"] == body["error"]["code"], denied
    assert denied[0]["auth"]["verified"] is False and denied[0]["auth"]["scopes"] == []
    assert events(d, "token.rejected") == []


async def test_no_user_token_is_token_missing(d: Daemon) -> None:
    """A call to a server with oauth2 that carries no user token at all: 401
    token_missing (not token_invalid: nothing was presented to verify)."""
    body = authorize_body(d)
    del body["user_token"]
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            status, out = await call(app, conn, "/v1/authorize", body)
    assert status == 401 and out["error"]["code"] == "token_missing", out


async def test_a_process_not_attested_as_the_server_gets_no_token_verification(d: Daemon) -> None:
    """Only a process attested as the server makes the daemon verify a user token for it
    (others must not make it fetch an issuer's keys): refused peer_mismatch, audited as
    peer.rejected, with the token not verified."""
    edit_config(d, peers={"analytics-db": [{"uid": 4242}]})
    body = {**AUTHORIZE, "server": "analytics-db", "tool": "query_metrics", "agent_id": "content-writer",
            "user_token": d.user_token("analytics-db")}
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            status, out = await call(app, conn, "/v1/authorize", body)
    assert status == 403 and out["error"]["code"] == "peer_mismatch", out
    rejected = events(d, "peer.rejected")
    assert len(rejected) == 1 and rejected[0]["auth"]["verified"] is False, rejected
    assert [e for e in events(d, "mcp.authorize")] == []


async def test_quota_denial_carries_limit_and_retry_after_and_allowed_calls_name_their_rules(
    d: Daemon
) -> None:
    """A call over a rate limit: 429 rate_limited whose details say the limit and when to
    retry; an allowed call's rules_matched lists the quota rules it passed."""
    set_limits(d, **{"per_tool.create_article": {"requests_per_minute": 1}})
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            status, ok = await call(app, conn, "/v1/authorize", authorize_body(d))
            assert status == 200, ok
            assert "per_tool.create_article.requests_per_minute" in " ".join(ok["policy"]["rules_matched"])
            status, body = await call(app, conn, "/v1/authorize", authorize_body(d))
    assert status == 429 and body["error"]["code"] == "rate_limited", body
    details = body["error"]["details"]
    assert details["limit"] and details["retry_after_s"] > 0, details
    denied = [e for e in events(d, "mcp.authorize") if e.get("error")]
    assert len(denied) == 1 and denied[0]["error"]["code"] == "rate_limited"


async def test_session_limit_denial_says_when_to_retry(d: Daemon) -> None:
    """Over concurrent_sessions: 429 rate_limited whose details carry retry_after_s (the
    idle time after which the least recent session no longer counts)."""
    set_limits(d, per_user={"concurrent_sessions": 1})
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            status, ok = await call(app, conn, "/v1/authorize", authorize_body(d, session_id="s1"))
            assert status == 200, ok
            status, body = await call(app, conn, "/v1/authorize", authorize_body(d, session_id="s2"))
    assert status == 429 and body["error"]["details"]["reason"] == "too_many_sessions", body
    assert body["error"]["details"]["retry_after_s"] == body["error"]["details"]["idle_s"] > 0


async def test_local_rate_counting_stops_at_the_first_refusal(
    d: Daemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With the store down and state.on_store_failure: local, a call refused by one rate
    limit is not counted against the later ones (a refused call spends no quota); the
    operator is warned once that rate limits are now counted on this host only."""
    from sidekey.store import StateUnavailable

    set_limits(d, per_user={"requests_per_minute": 2},
               **{"per_tool.create_article": {"requests_per_minute": 1}})
    edit_config(d, state={"on_store_failure": "local"})

    async def broken(*args: object, **kw: object) -> Any:
        raise StateUnavailable("state store unavailable")

    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            monkeypatch.setattr(app.store, "rate_check", broken)
            monkeypatch.setattr(app.store, "quota_apply", broken)
            codes = [(await call(app, conn, "/v1/authorize", authorize_body(d, tool=tool)))[0]
                     for tool in ("create_article", "create_article", "list_articles", "list_articles")]
    assert codes == [200, 429, 200, 429], codes
    warned = [r for r in caplog.records if "counting rate limits on this host only" in r.getMessage()]
    assert len(warned) == 1, warned


async def test_approval_long_polls_are_not_load(d: Daemon) -> None:
    """Load shedding counts calls in flight minus long-polls waiting for a human: with
    95 of 100 requests in flight, 10 of them waiting for approvals, a standard caller
    is still served; with none waiting it is shed (503 overloaded)."""
    import types

    edit_config(d, policy={"max_in_flight": 100})
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            app.server = types.SimpleNamespace(in_flight=95)  # type: ignore[assignment]
            app.approvals.waiting = 10
            status, body = await call(app, conn, "/v1/authorize", authorize_body(d))
            assert status == 200, body
            app.approvals.waiting = 0
            status, body = await call(app, conn, "/v1/authorize", authorize_body(d))
            assert status == 503 and body["error"]["code"] == "overloaded", body
            assert body["error"]["details"]["retry_after_s"] > 0


async def test_approval_step_refusals_are_audited_and_store_failures_are_not_verdicts(
    d: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An approval id that does not exist is a denial of the call (404
    approval_not_found, audited as mcp.authorize with the rules matched); the store or
    audit failing inside the approval step is 503, not a verdict: no denial recorded."""
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            status, body = await call(app, conn, "/v1/authorize",
                                      authorize_body(d, approval_id="apr_nope"))
            assert status == 404 and body["error"]["code"] == "approval_not_found", body
            assert "rules_matched" in body["error"]["details"], body

            async def down(*args: object, **kw: object) -> Any:
                raise protocol.Unavailable("state store unavailable", code="state_unavailable")

            monkeypatch.setattr(app.approvals, "check", down)
            status, body = await call(app, conn, "/v1/authorize",
                                      authorize_body(d, approval_id="apr_nope2"))
            assert status == 503 and body["error"]["code"] == "state_unavailable", body
            assert "rules_matched" not in (body["error"].get("details") or {}), body
    denied = [e for e in events(d, "mcp.authorize") if e.get("error")]
    assert [e["error"]["code"] for e in denied] == ["approval_not_found"], denied


async def test_a_held_call_approved_then_presented_is_allowed_and_the_record_names_the_approval(
    d: Daemon
) -> None:
    """A call under requires_human_approval is held (202 pending_approval with the
    approval id and its expiry); once approved, the call presenting the id is allowed,
    its rules_matched include the approval rule and its mcp.authorize names the approval."""
    set_limits(d, **{"per_tool.create_article": {"requires_human_approval": True}})
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d, clock=lambda: NOW) as app:
            token = d.user_token("content-api", ttl_s=3600, now=NOW - 60)
            status, held = await call(app, conn, "/v1/authorize", authorize_body(d, user_token=token))
            assert status == 202 and held["decision"] == "pending_approval", held
            approval_id = held["approval_id"]
            assert approval_id.startswith("apr_") and held["expires_at"] > iso(NOW)
            assert held["user_id"] == "alice" and held.get("resolution_token") is None
            # presented before a verdict: refused, and the refusal says the approval's state
            status, body = await call(app, conn, "/v1/authorize",
                                      authorize_body(d, user_token=token, approval_id=approval_id))
            assert status == 409 and body["error"]["code"] == "approval_pending", body
            assert body["error"]["details"]["state"] == "pending", body
            status, out = await call(app, conn, f"/v1/approvals/{approval_id}/approve", {"reason": "ok"})
            assert status == 200, out
            status, auth = await call(app, conn, "/v1/authorize",
                                      authorize_body(d, user_token=token, approval_id=approval_id))
            assert status == 200 and auth["decision"] == "allow", auth
            assert any("approval" in r for r in auth["policy"]["rules_matched"]), auth
            status, lease = await call(app, conn, "/v1/redeem",
                                       {"resolution_token": auth["resolution_token"]})
            assert status == 200, lease
    allowed = [e for e in events(d, "mcp.authorize") if not e.get("error")]
    assert [e.get("approval_id") for e in allowed] == [approval_id], allowed



# ---------------------------------------------------------------------------- who may


async def test_token_is_redeemable_only_by_the_process_it_was_issued_to(d: Daemon) -> None:
    """The resolution token is bound to uid, pid and process start time: a process of
    the same server differing in ANY one of them is refused (403 peer_mismatch, audited
    peer.rejected with the jti) and burns nothing; the holder then redeems it."""
    nobody_serves_content_api(d)
    with self_peer() as peer:
        holder = nobody(peer, pid=40001)
        start = holder.peer.identity.start_time
        others = {
            "uid": posing(peer, pid=40001),  # root, same pid and start
            "pid": nobody(peer, pid=40002),
            "start": nobody(peer, pid=40001, start_time=start + 1),
        }
        async with app_on(d) as app:
            status, auth = await call(app, holder, "/v1/authorize", authorize_body(d))
            assert status == 200, auth
            redeem = {"resolution_token": auth["resolution_token"]}
            for what, conn in others.items():
                status, body = await call(app, conn, "/v1/redeem", redeem)
                assert status == 403 and body["error"]["code"] == "peer_mismatch", (what, body)
            status, lease = await call(app, holder, "/v1/redeem", redeem)
            assert status == 200, lease
    jti = events(d, "mcp.authorize")[-1]["jti"]
    rejected = events(d, "peer.rejected")
    assert [e["jti"] for e in rejected] == [jti] * 3, rejected


async def test_only_the_lease_holder_or_an_admin_may_release_it(d: Daemon) -> None:
    """/v1/release: another process of the same uid and server is refused (403
    peer_mismatch, the lease stays active); the holder may release; an admin-tier
    process (the daemon's uid) may release anyone's lease."""
    nobody_serves_content_api(d)
    with self_peer() as peer:
        holder = nobody(peer, pid=40001)
        sibling = nobody(peer, pid=40002)
        admin = posing(peer, pid=40003)
        async with app_on(d) as app:
            leases = []
            for _ in range(2):
                status, auth = await call(app, holder, "/v1/authorize", authorize_body(d))
                assert status == 200, auth
                status, lease = await call(app, holder, "/v1/redeem",
                                           {"resolution_token": auth["resolution_token"]})
                assert status == 200, lease
                leases.append(lease["lease_id"])
            status, body = await call(app, sibling, "/v1/release",
                                      {"lease_id": leases[0], "status": "success"})
            assert status == 403 and body["error"]["code"] == "peer_mismatch", body
            assert len(await app.store.leases_in_state("active")) == 2
            status, body = await call(app, holder, "/v1/release",
                                      {"lease_id": leases[0], "status": "success"})
            assert status == 200 and body["state"] == "released", body
            status, body = await call(app, admin, "/v1/release",
                                      {"lease_id": leases[1], "status": "success"})
            assert status == 200 and body["state"] == "released", body


async def test_redeem_checks_the_arguments_when_presented_and_says_so(d: Daemon) -> None:
    """Arguments presented at redeem must be the ones authorized (403
    arguments_mismatch, audited token.rejected with the jti); mcp.redeem's
    arguments_checked says whether they were presented (and so checked)."""
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            tokens = []
            for _ in range(2):
                status, auth = await call(app, conn, "/v1/authorize", authorize_body(d))
                assert status == 200, auth
                tokens.append(auth["resolution_token"])
            status, body = await call(app, conn, "/v1/redeem",
                                      {"resolution_token": tokens[0], "arguments": {"title": "other"}})
            assert status == 403 and body["error"]["code"] == "arguments_mismatch", body
            status, lease = await call(app, conn, "/v1/redeem",
                                       {"resolution_token": tokens[0], "arguments": AUTHORIZE["arguments"]})
            assert status == 200, lease
            status, lease = await call(app, conn, "/v1/redeem", {"resolution_token": tokens[1]})
            assert status == 200, lease
    assert [e["arguments_checked"] for e in events(d, "mcp.redeem")] == [True, False]
    assert [e["error"]["code"] for e in events(d, "token.rejected")] == ["arguments_mismatch"]


async def test_a_burned_token_stays_burned_while_it_is_still_accepted(d: Daemon) -> None:
    """The record of a redeemed jti outlives the token's acceptance (exp + clock leeway):
    a purge of expired records run at the token's exp does not make it redeemable twice."""
    now = [NOW]
    token = d.user_token("content-api", ttl_s=3600, now=NOW - 60)
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d, clock=lambda: now[0]) as app:
            status, auth = await call(app, conn, "/v1/authorize", authorize_body(d, user_token=token))
            assert status == 200, auth
            redeem = {"resolution_token": auth["resolution_token"]}
            status, lease = await call(app, conn, "/v1/redeem", redeem)
            assert status == 200, lease
            now[0] = NOW + 300  # the token's exp: still accepted (leeway)
            await app.store.purge(now[0])
            status, body = await call(app, conn, "/v1/redeem", redeem)
            assert status == 409 and body["error"]["code"] == "token_replayed", body


async def test_a_redeem_that_cannot_be_audited_ends_its_lease_even_when_cancelled(
    d: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mcp.redeem cannot be written: no secret leaves and the lease just created is
    revoked, also when the request is being cancelled at that moment (the clean-up is
    shielded: a client hanging up must not leave an active lease behind)."""
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            status, auth = await call(app, conn, "/v1/authorize", authorize_body(d))
            assert status == 200, auth
            real_emit = app.audit.emit
            with trio.CancelScope() as scope:

                async def emit(event: dict[str, Any], *args: Any, **kw: Any) -> None:
                    if event["event_type"] == "mcp.redeem":
                        scope.cancel()  # the client went away meanwhile
                        raise protocol.Unavailable("audit down", code="audit_unavailable")
                    await real_emit(event, *args, **kw)

                monkeypatch.setattr(app.audit, "emit", emit)
                await call(app, conn, "/v1/redeem", {"resolution_token": auth["resolution_token"]})
            assert scope.cancelled_caught
            assert await app.store.leases_in_state("active") == []
            assert [r.state for r in await app.store.leases_in_state("revoked")] == ["revoked"]


async def test_a_peer_that_changed_before_the_secrets_leave_gets_none_and_its_lease_ends(
    d: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last gate of redeem: the process re-verified after the lease exists and
    before any secret leaves. One that changed meanwhile (setuid, exec, exit) gets its
    refusal (403 peer_changed), no secret, the lease is revoked at once and the
    peer.rejected event names it."""
    with self_peer() as peer:
        conn = posing(peer)
        fake = conn.peer
        assert isinstance(fake, Posing)
        changed = [False]

        def recheck() -> None:
            if changed[0]:
                raise protocol.Denied("the peer changed", code="peer_changed")

        monkeypatch.setattr(fake, "recheck", recheck, raising=False)
        async with app_on(d) as app:
            status, auth = await call(app, conn, "/v1/authorize", authorize_body(d))
            assert status == 200, auth
            create = app.leases.create

            async def create_then_change(rec: Any) -> None:
                await create(rec)
                changed[0] = True  # e.g. the process exec'd something else meanwhile

            monkeypatch.setattr(app.leases, "create", create_then_change)
            status, body = await call(app, conn, "/v1/redeem",
                                      {"resolution_token": auth["resolution_token"]})
            assert status == 403 and body["error"]["code"] == "peer_changed", body
            assert d.secrets["content-api/write-key"] not in json.dumps(body)
            assert await app.store.leases_in_state("active") == []
            [revoked] = await app.store.leases_in_state("revoked")
    rejected = [e for e in events(d, "peer.rejected") if e.get("lease_id")]
    assert [e["lease_id"] for e in rejected] == [revoked.lease_id], rejected


async def test_the_call_record_lasts_as_long_as_its_lease(d: Daemon) -> None:
    """A lease released just before it expires still has its call record: mcp.tool_call
    carries the arguments (the record is kept until the lease's expiry plus leeway,
    whatever other calls sweep the records meanwhile)."""
    now = [NOW]
    token = d.user_token("content-api", ttl_s=3600, now=NOW - 60)
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d, clock=lambda: now[0]) as app:
            status, auth = await call(app, conn, "/v1/authorize", authorize_body(d, user_token=token))
            assert status == 200, auth
            status, lease = await call(app, conn, "/v1/redeem",
                                       {"resolution_token": auth["resolution_token"]})
            assert status == 200 and lease["expires_at"] == iso(NOW + 120), lease
            now[0] = NOW + 118  # 2 s before the lease expires: another call sweeps the records
            status, other = await call(app, conn, "/v1/authorize", authorize_body(d, user_token=token))
            assert status == 200, other
            status, body = await call(app, conn, "/v1/release",
                                      {"lease_id": lease["lease_id"], "status": "success"})
            assert status == 200, body
    event = events(d, "mcp.tool_call")[-1]
    assert event["arguments"] == AUTHORIZE["arguments"] and "call_record" not in event, event


async def test_an_approval_id_is_checked_even_for_a_tool_without_approval_rules(d: Daemon) -> None:
    """A call presenting an approval id always has it checked (one that does not exist:
    404 approval_not_found), also for a tool that needs no approval."""
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            status, body = await call(app, conn, "/v1/authorize",
                                      authorize_body(d, tool="list_articles", approval_id="apr_nope"))
    assert status == 404 and body["error"]["code"] == "approval_not_found", body


async def test_an_approved_call_does_not_spend_the_next_windows_allowance(d: Daemon) -> None:
    """requires_approval_above counts the calls made WITHOUT an approval in each window:
    an approved call presented in a new window does not count there, so the next
    ordinary call is still within the allowance."""
    set_limits(d, **{"per_tool.create_article": {"requires_approval_above": 1}})
    edit_config(d, approvals={"window_seconds": 60, "ttl_seconds": 3600})
    # The store expires its counters on the real clock: windows in the future.
    start = datetime.datetime(2099, 1, 1, tzinfo=datetime.UTC).timestamp()
    now = [start]
    token = d.user_token("content-api", ttl_s=3600, now=start - 60)
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d, clock=lambda: now[0]) as app:
            status, body = await call(app, conn, "/v1/authorize", authorize_body(d, user_token=token))
            assert status == 200, body
            status, held = await call(app, conn, "/v1/authorize", authorize_body(d, user_token=token))
            assert status == 202, held
            status, out = await call(app, conn, f"/v1/approvals/{held['approval_id']}/approve",
                                     {"reason": "ok"})
            assert status == 200, out
            now[0] = start + 60  # the next window
            status, body = await call(app, conn, "/v1/authorize",
                                      authorize_body(d, user_token=token, approval_id=held["approval_id"]))
            assert status == 200, body
            status, body = await call(app, conn, "/v1/authorize", authorize_body(d, user_token=token))
            assert status == 200, body
            assert "approval.within:1/1" in body["policy"]["rules_matched"], body


async def test_local_rate_counters_are_capped_oldest_first(
    d: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local fallback's rate counters are capped in memory (MAX_PENDING_CALLS keys):
    at the cap the OLDEST key is dropped, never the one just counted, and the cap is
    the number of keys kept."""
    from sidekey.store import StateUnavailable

    limits = yaml.safe_load((d.root / "rate-limits.yaml").read_text())
    for key in ("requests_per_minute", "requests_per_hour"):
        limits["limits"]["per_user"].pop(key, None)
    for tool in ("create_article", "list_articles", "publish_article"):
        limits["limits"]["per_tool"].setdefault(tool, {})["requests_per_minute"] = 1
    (d.root / "rate-limits.yaml").write_text(yaml.safe_dump(limits))
    edit_config(d, state={"on_store_failure": "local"})
    monkeypatch.setattr(calls_mod, "MAX_PENDING_CALLS", 2)

    async def broken(*args: object, **kw: object) -> Any:
        raise StateUnavailable("state store unavailable")

    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            monkeypatch.setattr(app.store, "rate_check", broken)
            monkeypatch.setattr(app.store, "quota_apply", broken)
            codes = [(await call(app, conn, "/v1/authorize", authorize_body(d, tool=tool)))[0]
                     for tool in ("create_article", "list_articles", "publish_article",
                                  "publish_article", "list_articles")]
    # create_article's key was dropped for publish_article's; the other two still count
    assert codes == [200, 200, 200, 429, 429], codes


async def test_the_call_record_lasts_as_long_as_its_token(d: Daemon) -> None:
    """A token redeemed just before it expires still finds its call record (kept until
    the token's exp plus leeway, whatever other calls sweep the records meanwhile):
    the call's mcp.tool_call carries its arguments."""
    now = [NOW]
    token = d.user_token("content-api", ttl_s=3600, now=NOW - 60)
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d, clock=lambda: now[0]) as app:
            status, auth = await call(app, conn, "/v1/authorize", authorize_body(d, user_token=token))
            assert status == 200 and auth["expires_at"] == iso(NOW + 300), auth
            now[0] = NOW + 297  # 3 s before the token expires: another call sweeps the records
            status, other = await call(app, conn, "/v1/authorize", authorize_body(d, user_token=token))
            assert status == 200, other
            status, lease = await call(app, conn, "/v1/redeem",
                                       {"resolution_token": auth["resolution_token"]})
            assert status == 200, lease
            status, body = await call(app, conn, "/v1/release",
                                      {"lease_id": lease["lease_id"], "status": "success"})
            assert status == 200, body
    event = events(d, "mcp.tool_call")[-1]
    assert event["arguments"] == AUTHORIZE["arguments"] and "call_record" not in event, event


async def test_monthly_quota_of_the_department_named_by_the_token(d: Daemon) -> None:
    """policy.department_claim: the user's department comes from the verified token;
    its monthly_tool_calls are counted (quota.threshold events at 80/90/100 %) and
    enforced (429 monthly_quota_exhausted)."""
    set_limits(d, **{"per_department.marketing": {"monthly_tool_calls": 2}})
    edit_config(d, policy={"department_claim": "department"})
    token = d.user_token("content-api", extra={"department": "marketing"})
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            codes = []
            for _ in range(3):
                status, body = await call(app, conn, "/v1/authorize", authorize_body(d, user_token=token))
                codes.append(status)
    assert codes == [200, 200, 429], codes
    assert body["error"]["details"]["reason"] == "monthly_quota_exhausted", body
    alerts = events(d, "quota.threshold")
    assert sorted(e["threshold_percent"] for e in alerts) == [80, 90, 100], alerts
    assert {e["department"] for e in alerts} == {"marketing"}
