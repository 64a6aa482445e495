"""The seed's rate limits enforced by a real daemon, counted in the state store."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import yaml

from harness import Daemon


def test_per_tool_limit_lets_exactly_the_limit_through_under_concurrency(make_daemon: Any) -> None:
    """create_article: requests_per_minute 10 per user (seed rate-limits.yaml). 60
    concurrent authorize calls by one user: exactly 10 pass the limit (5 allowed, and
    5 held for approval: the seed's requires_approval_above is 5), the rest 429 with
    the limit named and a retry time; every refusal audited."""
    d: Daemon = make_daemon(seed_limits=True).start()
    d.user_token("content-api")  # mint once, before the threads
    results: list[tuple[int, dict[str, Any]]] = []
    lock = threading.Lock()

    def one() -> None:
        r = d.authorize("content-api", "create_article")
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one) for _ in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    allowed = [b for s, b in results if s == 200]
    held = [b for s, b in results if s == 202]
    refused = [b for s, b in results if s not in (200, 202)]
    assert (len(allowed), len(held)) == (5, 5), [b.get("error") for b in refused][:3]
    assert all(b["error"]["code"] == "rate_limited" for b in refused)
    details = refused[0]["error"]["details"]
    assert details["limit"] == "per_tool.create_article.requests_per_minute"
    assert 0 < details["retry_after_s"] <= 60
    assert any(r.startswith("quota.ok:") for r in allowed[0]["policy"]["rules_matched"])
    denied_events = [e for e in d.audit_events() if e.get("error", {}).get("code") == "rate_limited"]
    assert len(denied_events) == 50
    # another tool of the same user is not throttled by create_article's limit
    assert d.authorize("content-api", "list_articles")[0] == 200
    # the same wait as a Retry-After header (whole seconds, rounded up)
    from harness import UnixHTTPConnection

    conn = UnixHTTPConnection(d.socket)
    try:
        body = {"server": "content-api", "tool": "create_article", "agent_id": "content-writer",
                "arguments": {}, "user_token": d.user_token("content-api")}
        conn.request("POST", "/v1/authorize", body=json.dumps(body).encode(),
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 429 and 1 <= int(resp.headers["retry-after"]) <= 60
    finally:
        conn.close()


def test_limits_survive_a_restart(make_daemon: Any) -> None:
    d: Daemon = make_daemon(seed_limits=True).start()
    for i in range(10):  # beyond the 5th: held for approval, but counted
        assert d.authorize("content-api", "create_article")[0] == (200 if i < 5 else 202)
    full_at = time.monotonic()
    d.kill()
    d.start()
    # 10 a minute: one call comes back every 6 s. A restart that forgot the count would
    # let 10 more through; one that kept it lets through only what refilled meanwhile
    # (a loaded machine can take more than 6 s to restart).
    passed = 0
    for _ in range(10):
        status, body = d.authorize("content-api", "create_article")
        if status == 429:
            break
        passed += 1
    refilled = int((time.monotonic() - full_at) / 6) + 1
    assert status == 429 and body["error"]["code"] == "rate_limited", body
    assert passed <= refilled, (passed, refilled)


def test_two_daemons_sharing_redis_enforce_one_aggregate_limit(make_daemon: Any, tmp_path: Any) -> None:
    """Two "hosts" (daemons with their own sockets and SQLite dirs) on one Redis: the
    per-user create_article limit (10/min) holds across both; a token burned on one
    host is refused on the other."""
    from redis_server import RedisServer

    server = RedisServer(tmp_path).start()
    try:
        state = {"state": {"backend": "redis", "redis_url": server.url,
                           "redis_key_prefix": "sk-test:"}}
        a: Daemon = make_daemon(state, seed_limits=True)
        b: Daemon = make_daemon(state, seed_limits=True)
        # one issuer and one token key set for both hosts (as a fleet would share them)
        import shutil
        shutil.copy(a.issuer_jwks, b.issuer_jwks)
        a.start()
        shutil.copy(a.root / "keys" / "token-keys.json", b.root / "keys" / "token-keys.json")
        b.start()
        token = a.user_token("content-api")
        statuses = []
        for d in (a, b) * 6:
            statuses.append(d.authorize("content-api", "create_article", user_token=token)[0])
        # 5 allowed, then held for approval (requires_approval_above 5, also shared)
        assert (statuses.count(200), statuses.count(202), statuses.count(429)) == (5, 5, 2), statuses
        _, tok = a.request("POST", "/v1/tokens", {"server": "content-api", "tool": "list_articles",
                                                 "user": "u1"})
        assert a.request("POST", "/v1/redeem", {"resolution_token": tok["resolution_token"]})[0] == 200
        status, body = b.request("POST", "/v1/redeem", {"resolution_token": tok["resolution_token"]})
        assert status == 409 and body["error"]["code"] == "token_replayed", body
    finally:
        server.stop()


def test_department_monthly_quota_thresholds_and_exhaustion(make_daemon: Any) -> None:
    """marketing: 10 calls a month; alerts at 8, 9, 10; the 11th refused, across a kill -9."""
    d: Daemon = make_daemon({"policy": {"user_departments": {"alice": "marketing"}}})
    limits = yaml.safe_load((d.root / "rate-limits.yaml").read_text())
    limits["limits"]["per_department"]["marketing"]["monthly_tool_calls"] = 10
    (d.root / "rate-limits.yaml").write_text(yaml.safe_dump(limits))
    d.start()
    for _ in range(7):
        assert d.authorize("content-api", "list_articles")[0] == 200
    # The monthly counter survives kill -9: the count goes on from 7, not from 0.
    d.kill()
    d.start()
    for _ in range(3):
        assert d.authorize("content-api", "list_articles")[0] == 200
    status, body = d.authorize("content-api", "list_articles")
    assert status == 429 and body["error"]["code"] == "rate_limited", body
    assert body["error"]["details"]["reason"] == "monthly_quota_exhausted"
    marks = [e["threshold_percent"] for e in d.events_of("quota.threshold")]
    assert marks == [80, 90, 100]


def test_result_over_max_size_is_withheld_and_audited(daemon: Daemon) -> None:
    status, auth = daemon.authorize("analytics-db", "query_metrics")
    assert status == 200, auth
    _, lease = daemon.request("POST", "/v1/redeem", {"resolution_token": auth["resolution_token"]})
    status, body = daemon.request("POST", "/v1/release", {
        "lease_id": lease["lease_id"], "status": "success", "result_size_bytes": 600 * 1024})
    assert status == 200 and body["withhold_result"] is True, body  # seed: 512 kb
    assert daemon.events_of("mcp.tool_call")[-1]["result"]["withheld"] is True


def test_department_from_a_token_claim(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"policy": {"department_claim": "department",
                                        "user_departments": {"alice": "engineering"}}})
    limits = yaml.safe_load((d.root / "rate-limits.yaml").read_text())
    limits["limits"]["per_department"]["marketing"]["monthly_tool_calls"] = 2
    (d.root / "rate-limits.yaml").write_text(yaml.safe_dump(limits))
    d.start()
    token = d.user_token("content-api", extra={"department": "marketing"})
    for _ in range(2):
        assert d.authorize("content-api", "list_articles", user_token=token)[0] == 200
    status, body = d.authorize("content-api", "list_articles", user_token=token)
    assert status == 429 and body["error"]["code"] == "rate_limited", body
    assert body["error"]["details"]["reason"] == "monthly_quota_exhausted"
    # the claim wins over the map; without the claim the map applies (engineering: 50000)
    assert d.authorize("content-api", "list_articles")[0] == 200


def test_sixth_concurrent_session_refused_until_one_goes_idle(make_daemon: Any) -> None:
    """Seed: concurrent_sessions 5 per user. With an 8 s idle time the sixth MCP session
    is refused while five are active, and accepted once one of them has gone idle."""
    import time

    # The idle time is also how long the test may take to use an active session again
    # (a round of up to five calls): 8 s leaves a loaded machine room; the wait for the
    # idle ones to go is a poll, so it costs this long and no more.
    d: Daemon = make_daemon({"policy": {"session_idle_seconds": 8}})
    limits = yaml.safe_load((d.root / "rate-limits.yaml").read_text())
    limits["limits"]["per_user"]["concurrent_sessions"] = 5
    (d.root / "rate-limits.yaml").write_text(yaml.safe_dump(limits))
    d.start()
    for i in range(5):
        assert d.authorize("content-api", "list_articles", session_id=f"s{i}")[0] == 200
    status, body = d.authorize("content-api", "list_articles", session_id="s5")
    assert status == 429 and body["error"]["code"] == "rate_limited", body
    assert body["error"]["details"]["reason"] == "too_many_sessions"
    assert body["error"]["details"]["limit"] == "per_user.concurrent_sessions"
    # an active session keeps working; another user has sessions of their own
    assert d.authorize("content-api", "list_articles", session_id="s0")[0] == 200
    bob = d.user_token("content-api", user="bob")
    assert d.authorize("content-api", "list_articles", session_id="s5", user_token=bob)[0] == 200
    # No fixed sleeps: poll (bounded) until the idle sessions s1..s4 are gone, using s0 (and
    # each newly admitted session) on every round so that they stay active.
    deadline = time.monotonic() + 30
    kept = ["s0"]
    for sid in ("s5", "s6", "s7", "s8"):
        while True:
            for k in kept:  # an active session keeps working
                assert d.authorize("content-api", "list_articles", session_id=k)[0] == 200
            status, body = d.authorize("content-api", "list_articles", session_id=sid)
            if status == 200:
                break
            assert status == 429 and body["error"]["details"]["reason"] == "too_many_sessions"
            assert time.monotonic() < deadline, f"{sid} still refused: idle sessions never expired"
            time.sleep(0.1)
        kept.append(sid)
    # s8 got in, so s1..s4 are all gone; s0 is still counted (used throughout): a sixth is refused
    status, body = d.authorize("content-api", "list_articles", session_id="s9")
    assert status == 429 and body["error"]["details"]["reason"] == "too_many_sessions", body
