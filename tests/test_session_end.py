"""``POST /v1/sessions/end`` against a real daemon: an ended MCP session stops counting
against ``limits.per_user.concurrent_sessions`` at once; only the user the caller's token
proves can have a session ended; every answer is audited as ``session.ended``. Then the
same through ``sidekey.mcp``: a streamable-HTTP session the SDK's client closes (HTTP
DELETE of its ``Mcp-Session-Id``) frees its slot.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import Daemon, free_port, http_mcp_server, run_as

pytestmark = pytest.mark.integration

NOBODY_UID = NOBODY_GID = 65534
TIMEOUT_S = 60.0
END = "/v1/sessions/end"


def one_session_each(d: Daemon) -> None:
    """concurrent_sessions: 1 per user (every other limit is out of the way)."""
    path = d.root / "rate-limits.yaml"
    data = yaml.safe_load(path.read_text())
    data["limits"]["per_user"]["concurrent_sessions"] = 1
    path.write_text(yaml.safe_dump(data))


def call(d: Daemon, session: str, user: str = "alice") -> tuple[int, dict[str, Any]]:
    return d.authorize("content-api", "list_articles", session_id=session, arguments={},
                       user_token=d.user_token("content-api", user=user) if user != "alice"
                       else d.user_token("content-api"))


def end(d: Daemon, session: str, user: str | None = "alice", **kw: Any) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"session_id": session, "server": "content-api", **kw}
    if user is not None:
        body["user_token"] = (d.user_token("content-api") if user == "alice"
                              else d.user_token("content-api", user=user))
    return d.request("POST", END, body)


def refused_for_sessions(status: int, body: dict[str, Any]) -> bool:
    return (status == 429 and body["error"]["code"] == "rate_limited"
            and body["error"]["details"]["limit"] == "per_user.concurrent_sessions")


@pytest.fixture(params=["sqlite", "redis"])
def daemon_one_session(request: pytest.FixtureRequest, make_daemon: Any,
                       tmp_path: Path) -> Iterator[Daemon]:
    overrides: dict[str, Any] = {}
    server = None
    if request.param == "redis":
        from redis_server import RedisServer

        server = RedisServer(tmp_path / "redis").start()
        overrides = {"state": {"backend": "redis", "redis_url": server.url,
                               "redis_key_prefix": "sk-sessions:"}}
    try:
        d: Daemon = make_daemon(overrides)
        one_session_each(d)
        d.start()
        yield d
    finally:
        if server is not None:
            server.stop()


def test_ended_session_frees_its_slot_at_once(daemon_one_session: Daemon) -> None:
    d = daemon_one_session
    assert call(d, "A")[0] == 200
    assert refused_for_sessions(*call(d, "B"))
    status, body = end(d, "A")
    assert (status, body["ended"], body["user_id"], body["session_id"]) == (200, True, "alice", "A")
    assert call(d, "B")[0] == 200, "an ended session still counted"
    # idempotent: ending again, or a session never seen, is 200 ended: false
    assert end(d, "A")[1]["ended"] is False
    status, body = end(d, "never-opened")
    assert (status, body["ended"]) == (200, False)
    # A is new again: it counts as a second session of alice's (B is open)
    assert refused_for_sessions(*call(d, "A"))
    events = d.wait_events("session.ended", 3)
    assert [(e["session_id"], e["ended"]) for e in events] == \
        [("A", True), ("A", False), ("never-opened", False)]
    first = events[0]
    assert first["user_id"] == "alice" and first["server"] == "content-api"
    assert first["peer"]["uid"] == os.getuid() and first["request_id"]
    assert "user_token" not in str(first) and d.user_token("content-api") not in str(events)


def test_another_users_token_cannot_end_a_session(daemon_one_session: Daemon) -> None:
    """The session set is per user, and the user is the verified token's subject:
    bob's token names bob's sessions only, whatever session id it sends."""
    d = daemon_one_session
    assert call(d, "A")[0] == 200
    status, body = end(d, "A", user="bob")
    assert (status, body["ended"], body["user_id"]) == (200, False, "bob")
    assert refused_for_sessions(*call(d, "B")), "bob's token freed alice's session"
    # bob has his own slot, untouched by alice's
    assert call(d, "A", user="bob")[0] == 200
    assert end(d, "A", user="bob")[1]["ended"] is True
    assert refused_for_sessions(*call(d, "B"))


def test_refusals_name_the_user_step_that_failed(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    one_session_each(d)
    d.start()
    assert call(d, "A")[0] == 200
    # content-api has oauth2: without a token there is no user to end a session of
    status, body = end(d, "A", user=None)
    assert (status, body["error"]["code"]) == (401, "token_missing")
    # a verified token for another server's audience ends nothing
    status, body = d.request("POST", END, {"session_id": "A", "server": "content-api",
                                           "user_token": d.user_token("analytics-db")})
    assert status == 403 and body["error"]["code"] == "audience_mismatch", body
    # the caller is attested as both servers: which one must be said
    status, body = d.request("POST", END, {"session_id": "A",
                                           "user_token": d.user_token("content-api")})
    assert (status, body["error"]["code"]) == (400, "server_required")
    status, body = d.request("POST", END, {"session_id": "A", "server": "nope",
                                           "user_token": d.user_token("content-api")})
    assert (status, body["error"]["code"]) == (404, "server_unknown")
    assert refused_for_sessions(*call(d, "B")), "a refused end freed the session"
    codes = {e["error"]["code"]: e["event_type"] for e in d.audit_events() if e.get("error")}
    assert codes["token_missing"] == "token.rejected" and codes["audience_mismatch"] == "token.rejected"
    assert codes["server_required"] == "request.rejected"


def test_a_server_can_only_end_sessions_of_servers_it_is_attested_as(make_daemon: Any) -> None:
    """nobody's process is attested as analytics-db only: naming content-api is
    peer_mismatch (audited as peer.rejected); without a server it is analytics-db's.
    (Sessions are counted per user, not per server, as concurrent_sessions counts them:
    a server holding a verified token of alice's could end her session of a known id.)"""
    d: Daemon = make_daemon({"peers": {"content-api": [{"uid": "self"}],
                                       "analytics-db": [{"uid": NOBODY_UID}]}})
    one_session_each(d)
    d.start()
    assert call(d, "A")[0] == 200
    token = d.user_token("content-api")
    analytics = d.user_token("analytics-db")

    def child(dd: Daemon) -> Any:
        return [dd.request("POST", END, {"session_id": "A", "server": "content-api",
                                         "user_token": token}),
                dd.request("POST", END, {"session_id": "Z", "user_token": analytics})]

    (status, body), (own_status, own_body) = run_as(d, NOBODY_UID, NOBODY_GID, child)
    assert (status, body["error"]["code"]) == (403, "peer_mismatch"), body
    assert (own_status, own_body["server"], own_body["ended"]) == (200, "analytics-db", False)
    assert refused_for_sessions(*call(d, "B"))
    assert any(e["event_type"] == "peer.rejected" and e.get("session_id") == "A"
               for e in d.audit_events())


def test_client_end_session_sync_and_async(make_daemon: Any) -> None:
    import trio

    from sidekey.client import AsyncClient, Client

    d: Daemon = make_daemon()
    one_session_each(d)
    d.start()
    token = d.user_token("content-api")
    with Client(d.socket) as sk:
        with sk.tool_call("content-api", "list_articles", user_token=token,
                          agent_id="content-writer", session_id="A"):
            pass
        done = sk.end_session("A", token, server="content-api")
        assert (done.ended, done.user_id, done.server) == (True, "alice", "content-api")

    async def async_side() -> tuple[bool, bool]:
        with trio.fail_after(TIMEOUT_S):
            async with AsyncClient(d.socket) as ak:
                async with ak.tool_call("content-api", "list_articles", user_token=token,
                                        agent_id="content-writer", session_id="B"):
                    pass
                first = await ak.end_session("B", token, server="content-api")
                again = await ak.end_session("B", token, server="content-api")
                return first.ended, again.ended

    assert trio.run(async_side) == (True, False)


# ------------------------------------------------------------------ sidekey.mcp

SERVER_SCRIPT = Path(__file__).with_name("mcp_governed_server.py")


@contextlib.contextmanager
def http_server(d: Daemon) -> Iterator[str]:
    port = free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SIDEKEY_SOCKET": d.socket,
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
           "SIDEKEY_TEST_JWKS": str(d.issuer_jwks)}
    with http_mcp_server([sys.executable, str(SERVER_SCRIPT), "http", str(port)], port=port,
                         env=env, log_path=d.root / f"mcp-http-{port}.log") as url:
        yield url



def test_mcp_session_closed_by_the_sdk_client_frees_its_slot(make_daemon: Any) -> None:
    """Streamable HTTP with sessions, the SDK's own client: closing the client sends
    DELETE with the Mcp-Session-Id, the SDK ends the connection, and @governed ends the
    session at the daemon; a second session of the same user is then allowed."""
    import anyio
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    d: Daemon = make_daemon()
    one_session_each(d)
    d.start()
    token = d.user_token("content-api", extra={"azp": "content-writer"})

    async def one_session(url: str) -> Any:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                      timeout=30) as http:
            transport = streamable_http_client(url, http_client=http)
            async with Client(transport, mode="legacy") as client:  # type: ignore[arg-type]
                return await client.call_tool("list_articles", {"query": "ai"})

    async def main(url: str) -> list[Any]:
        with anyio.fail_after(TIMEOUT_S):
            first = await one_session(url)
            # The end is sent from the server's connection teardown: wait for its event.
            await anyio.to_thread.run_sync(lambda: d.wait_events("session.ended", 1))
            second = await one_session(url)
            return [first, second]

    with http_server(d) as url:
        first, second = anyio.run(main, url, backend="asyncio")
    assert not first.is_error, first
    assert not second.is_error, second  # refused (too_many_sessions) without the end
    [event] = d.events_of("session.ended")[:1]
    calls = d.events_of("mcp.tool_call")
    assert event["session_id"] == calls[0]["session_id"] and event["ended"] is True
    assert event["user_id"] == "alice" and event["server"] == "content-api"
    assert calls[1]["session_id"] != calls[0]["session_id"]


@pytest.mark.parametrize("mode", ["legacy", "auto"], ids=["handshake", "2026-07-28"])
def test_stdio_process_session_ends_when_the_client_disconnects(make_daemon: Any,
                                                                 mode: str) -> None:
    """stdio: the session is the server process's (proc-...); when the SDK's client
    closes the pipe, the connection's teardown (handshake era) or the process's exit
    (2026-07-28: no connection object) ends it, so the next server process of the same
    user is a session that fits."""
    import anyio
    from mcp import Client, StdioServerParameters

    d: Daemon = make_daemon()
    one_session_each(d)
    d.start()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SIDEKEY_SOCKET": d.socket,
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
           "SIDEKEY_TEST_USER_TOKEN": d.user_token("content-api")}
    params = StdioServerParameters(command=sys.executable, args=[str(SERVER_SCRIPT), "stdio"],
                                   env=env)

    async def one_process() -> Any:
        async with Client(params, mode=mode) as client:  # type: ignore[arg-type]
            return await client.call_tool("list_articles", {"query": "ai"})

    async def main() -> list[Any]:
        with anyio.fail_after(TIMEOUT_S):
            first = await one_process()
            await anyio.to_thread.run_sync(lambda: d.wait_events("session.ended", 1))
            return [first, await one_process()]

    first, second = anyio.run(main, backend="asyncio")
    assert not first.is_error and not second.is_error, (first, second)
    calls = d.events_of("mcp.tool_call")
    ended = d.events_of("session.ended")
    assert calls[0]["session_id"].startswith("proc-") and ended[0]["ended"] is True
    assert ended[0]["session_id"] == calls[0]["session_id"] != calls[1]["session_id"]
