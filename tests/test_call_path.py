"""The call path's decisions and records (authorize, redeem, release), in-process on a
real store, backend and audit file (issue 10 item 1: the mutants of
``sidekey/daemon/calls.py`` that no other test killed).

Each test says which guarantee it guards; the audit file is read back because what a
refusal leaves there (its type, its ``jti``, its code) is part of the contract.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
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


@pytest.fixture
def d() -> Iterator[Daemon]:
    daemon = Daemon()
    (daemon.root / "state").mkdir(exist_ok=True)
    try:
        yield daemon
    finally:
        daemon.cleanup()


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
            status, auth = await call(app, conn, "/v1/authorize", authorize_body(d))
            assert status == 200, auth
            status, lease = await call(app, conn, "/v1/redeem",
                                       {"resolution_token": auth["resolution_token"]})
            assert status == 200, lease
            assert sorted(lease["secrets"]) == ["CONTENT_API_KEY", "SECOND_KEY"]
            assert released == []
            status, body = await call(app, conn, "/v1/release",
                                      {"lease_id": lease["lease_id"], "status": "success"})
            assert status == 200, body
            assert released == ["bl-w"]


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
    reports = [
        {"status": "success", "duration_ms": 7, "result_size_bytes": 1024},
        {"status": "error", "error": "upstream 502", "result_size_bytes": 1025},
        {"status": "success"},
    ]
    answers = []
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(d) as app:
            for report in reports:
                status, auth = await call(app, conn, "/v1/authorize", authorize_body(d))
                assert status == 200, auth
                status, lease = await call(app, conn, "/v1/redeem",
                                           {"resolution_token": auth["resolution_token"]})
                assert status == 200, lease
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
            status, auth = await call(app, conn, "/v1/authorize", authorize_body(d))
            assert status == 200, auth
            status, lease = await call(app, conn, "/v1/redeem",
                                       {"resolution_token": auth["resolution_token"]})
            assert status == 200, lease
        async with app_on(d) as app:
            status, body = await call(app, conn, "/v1/release",
                                      {"lease_id": lease["lease_id"], "status": "success"})
            assert status == 200, body
    jti = events(d, "mcp.authorize")[-1]["jti"]
    event = events(d, "mcp.tool_call")[-1]
    assert event["call_record"] == "dropped" and event["jti"] == jti
    assert event["arguments"] is None
