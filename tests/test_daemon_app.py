"""The daemon's application layer in-process (real store, backend, audit file), for the
cases a subprocess cannot stage: the audit disk failing under a running daemon."""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
import trio

from harness import Daemon
from sidekey import daemon as daemon_mod
from sidekey.audit import AuditLog
from sidekey.audit import jsonl as jsonl_mod
from sidekey.audit.jsonl import open_jsonl_sink
from sidekey.backends import build_backends
from sidekey.config import load_config
from sidekey.peer import PeerHandle, attest
from sidekey.server import ConnectionState, Request
from sidekey.store import open_store

AUTHORIZE = {"server": "content-api", "tool": "create_article", "agent_id": "content-writer",
             "arguments": {"title": "t"}}


@contextmanager
def self_peer() -> Iterator[PeerHandle]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    handle = attest(a)
    try:
        yield handle
    finally:
        handle.close()
        a.close()
        b.close()


@asynccontextmanager
async def app_on(d: Daemon, clock: Any = None) -> AsyncIterator[daemon_mod.Sidekey]:
    loaded = load_config(d.config_path)
    if clock is None:
        store = open_store(loaded.state_dir)
    else:
        # One clock for the daemon and its store, as in production (both time.time):
        # a store on the real clock would expire the injected month's counters once the
        # real date has passed it (this test failed from 2026-12-01 on).
        from sidekey.store.sqlite import SqliteStore

        store = SqliteStore.open(loaded.state_dir, clock=clock)
    sink = open_jsonl_sink(loaded.audit_path, fsync=True)
    app = daemon_mod.Sidekey(
        loaded,
        store=store,
        audit=AuditLog([sink]),
        backends=build_backends(loaded),
        codec=daemon_mod.build_codec(loaded),
        **({"clock": clock} if clock is not None else {}),
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            yield app
            nursery.cancel_scope.cancel()
    finally:
        await sink.aclose()
        await store.aclose()


async def call(app: daemon_mod.Sidekey, conn: ConnectionState, path: str, body: Any) -> tuple[int, Any]:
    req = Request(
        method="POST", path=path, query="", headers={}, body=json.dumps(body).encode(),
        peer=conn.peer, request_id="req_test", conn=conn,
    )
    resp = await app.handle(req)
    return resp.status, json.loads(resp.body)


async def test_no_secret_leaves_when_audit_cannot_record(
    staged: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = staged.secrets["content-api/write-key"]
    authorize = {**AUTHORIZE, "user_token": staged.user_token("content-api")}
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(staged) as app:
            status, body = await call(app, conn, "/v1/authorize", authorize)
            assert status == 200, body
            token = body["resolution_token"]

            def broken_fsync(fd: int) -> None:
                raise OSError(errno.EIO, "Input/output error")

            monkeypatch.setattr(jsonl_mod.os, "fsync", broken_fsync)
            status, body = await call(app, conn, "/v1/redeem", {"resolution_token": token})
            assert status == 503 and body["error"]["code"] == "audit_unavailable", body
            assert secret not in json.dumps(body)
            # the lease the redeem created did not stay active
            leases = await app.store.leases_in_state("active")
            assert leases == []
            # while audit is down, even an allowed authorize fails closed
            status, body = await call(app, conn, "/v1/authorize", authorize)
            assert status == 503 and body["error"]["code"] == "audit_unavailable", body
            assert app.audit.health()["ok"] is False

            # the disk heals: calls work again, and the token that was burned stays burned
            monkeypatch.undo()
            status, body = await call(app, conn, "/v1/redeem", {"resolution_token": token})
            assert status == 409 and body["error"]["code"] == "token_replayed", body
            status, body = await call(app, conn, "/v1/authorize", authorize)
            assert status == 200, body
            status, lease = await call(app, conn, "/v1/redeem",
                                       {"resolution_token": body["resolution_token"]})
            assert status == 200 and lease["secrets"]["CONTENT_API_KEY"] == secret
    assert secret not in staged.audit_path.read_text()


async def test_load_shedding_sheds_standard_before_high(staged: Daemon) -> None:
    import types

    import yaml

    cfg = yaml.safe_load(staged.config_path.read_text())
    cfg["policy"] = {**cfg.get("policy", {}), "max_in_flight": 100,
                     "user_departments": {"alice": "marketing", "bob": "engineering"}}
    staged.config_path.write_text(yaml.safe_dump(cfg))
    bodies = {user: {**AUTHORIZE, "user_token": staged.user_token("content-api", user=user)}
              for user in ("alice", "bob")}
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(staged) as app:
            fake = types.SimpleNamespace(in_flight=95)
            app.server = fake  # type: ignore[assignment]
            status, body = await call(app, conn, "/v1/authorize", bodies["alice"])  # standard
            assert status == 503 and body["error"]["code"] == "overloaded", body
            status, body = await call(app, conn, "/v1/authorize", bodies["bob"])  # high
            assert status == 200, body
            fake.in_flight = 100
            status, body = await call(app, conn, "/v1/authorize", bodies["bob"])
            assert status == 503 and body["error"]["code"] == "overloaded", body
            fake.in_flight = 10
            assert (await call(app, conn, "/v1/authorize", bodies["alice"]))[0] == 200


async def test_store_failure_fails_closed_unless_local_rate_counting(
    staged: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    from sidekey.store import StateUnavailable

    limits = yaml.safe_load((staged.root / "rate-limits.yaml").read_text())
    limits["limits"]["per_tool"]["create_article"]["requests_per_minute"] = 2
    (staged.root / "rate-limits.yaml").write_text(yaml.safe_dump(limits))
    authorize = {**AUTHORIZE, "user_token": staged.user_token("content-api")}

    async def broken(*args: object, **kw: object) -> tuple[bool, float]:
        raise StateUnavailable("state store unavailable")

    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(staged) as app:
            monkeypatch.setattr(app.store, "rate_check", broken)
            monkeypatch.setattr(app.store, "quota_apply", broken)
            status, body = await call(app, conn, "/v1/authorize", authorize)
            assert status == 503 and body["error"]["code"] == "state_unavailable", body
        cfg = yaml.safe_load(staged.config_path.read_text())
        cfg["state"] = {**cfg["state"], "on_store_failure": "local"}
        staged.config_path.write_text(yaml.safe_dump(cfg))
        async with app_on(staged) as app:
            monkeypatch.setattr(app.store, "rate_check", broken)
            monkeypatch.setattr(app.store, "quota_apply", broken)
            codes = [(await call(app, conn, "/v1/authorize", authorize))[0] for _ in range(3)]
            assert codes == [200, 200, 429], codes  # counted on this host meanwhile


async def test_monthly_quota_rolls_over_at_the_month_boundary(staged: Daemon) -> None:
    """The daemon's clock injected: marketing's 2 calls a month are spent on
    2026-11-30 23:59:59 UTC, refused a moment later, allowed again at 2026-12-01 00:00 UTC."""
    import datetime

    import yaml

    limits = yaml.safe_load((staged.root / "rate-limits.yaml").read_text())
    limits["limits"]["per_department"]["marketing"]["monthly_tool_calls"] = 2
    (staged.root / "rate-limits.yaml").write_text(yaml.safe_dump(limits))
    cfg = yaml.safe_load(staged.config_path.read_text())
    cfg["policy"] = {**cfg.get("policy", {}), "user_departments": {"alice": "marketing"}}
    staged.config_path.write_text(yaml.safe_dump(cfg))
    now = [datetime.datetime(2026, 11, 30, 23, 59, 58, tzinfo=datetime.UTC).timestamp()]
    token = staged.user_token("content-api", ttl_s=3600, now=now[0] - 60)
    body = {**AUTHORIZE, "tool": "list_articles", "user_token": token}
    with self_peer() as peer:
        conn = ConnectionState(peer=peer)
        async with app_on(staged, clock=lambda: now[0]) as app:
            assert (await call(app, conn, "/v1/authorize", body))[0] == 200
            assert (await call(app, conn, "/v1/authorize", body))[0] == 200
            now[0] += 1.5  # 23:59:59.5
            status, out = await call(app, conn, "/v1/authorize", body)
            assert status == 429 and out["error"]["code"] == "rate_limited", out
            assert out["error"]["details"]["reason"] == "monthly_quota_exhausted"
            now[0] += 0.5  # 2026-12-01T00:00:00Z
            status, out = await call(app, conn, "/v1/authorize", body)
            assert status == 200, out
            assert any("monthly" in r for r in out["policy"]["rules_matched"])
