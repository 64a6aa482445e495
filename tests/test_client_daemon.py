"""The shipped Python client (sync and async) against a real daemon on a real socket.

Async tests run under trio (pytest-trio's trio_mode); the asyncio tests drive the same
client with ``asyncio.run`` from a sync test.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import trio

from harness import Daemon
from sidekey.client import (
    AccessDenied,
    AsyncClient,
    Client,
    ConflictError,
    ConnectionFailed,
    Lease,
    NotFoundError,
    SidekeyClientError,
    TokenRejected,
)

pytestmark = pytest.mark.integration

SERVER, TOOL, AGENT = "content-api", "create_article", "content-writer"
ARGS = {"title": "hello"}
ASYNC_TIMEOUT_S = 20.0


class BodyFailed(Exception):
    """Raised inside a tool_call body by the tests."""


def _write_key(d: Daemon) -> str:
    return d.secrets["content-api/write-key"]


def _tool_calls(d: Daemon, lease_id: str) -> list[dict[str, Any]]:
    return [e for e in d.events_of("mcp.tool_call") if e.get("lease_id") == lease_id]


def _one_tool_call(d: Daemon, lease_id: str) -> dict[str, Any]:
    events = _tool_calls(d, lease_id)
    assert len(events) == 1, events
    return events[0]


def _second_release_status(d: Daemon, lease_id: str) -> int:
    """Status code of a second release: 409 lease_released proves the first one landed."""
    status, body = d.request("POST", "/v1/release", {"lease_id": lease_id, "status": "success"})
    assert body["error"]["code"] == "lease_released", body
    return status


# --------------------------------------------------------------------------- sync client


def test_sync_health(daemon: Daemon) -> None:
    with Client(socket_path=daemon.socket) as client:
        health = client.health()
    assert health["status"] == "ok"
    assert health["store"]["ok"] and health["audit"]["ok"]


def test_sync_authorize_redeem_release_round_trip(daemon: Daemon) -> None:
    token = daemon.user_token(SERVER)
    value = _write_key(daemon)
    with Client(socket_path=daemon.socket) as client:
        auth = client.authorize(
            SERVER, TOOL, user_token=token, agent_id=AGENT, session_id="s1", arguments=ARGS
        )
        assert auth.decision == "allow"
        assert auth.user_id == "alice"  # the user named by the token
        assert auth.resolution_token
        assert auth.secrets == ("CONTENT_API_KEY",)
        assert auth.resolution_token not in repr(auth)
        assert token not in repr(auth)

        lease = client.redeem(auth.resolution_token, arguments=ARGS)
        assert isinstance(lease, Lease)
        assert lease.server == SERVER and lease.tool == TOOL
        assert dict(lease.secrets) == {"CONTENT_API_KEY": value}
        for text in (repr(lease), str(lease), repr(lease.secrets), str(lease.secrets)):
            assert value not in text
            assert "CONTENT_API_KEY" in text

        released = client.release(lease, "success", 7, result_size_bytes=42)
    assert released["state"] == "released"
    assert released["lease_id"] == lease.lease_id

    event = _one_tool_call(daemon, lease.lease_id)
    assert event["result"]["status"] == "success"
    assert event["result"]["duration_ms"] == 7
    assert event["result"]["result_size_bytes"] == 42
    assert event["agent_id"] == AGENT and event["session_id"] == "s1"
    assert event["user_id"] == "alice"
    assert value.encode() not in daemon.everything_written()
    assert token.encode() not in daemon.everything_written()


def test_sync_tool_call_success(daemon: Daemon) -> None:
    token = daemon.user_token(SERVER)
    value = _write_key(daemon)
    with Client(socket_path=daemon.socket) as client:
        with client.tool_call(
            SERVER, TOOL, user_token=token, agent_id=AGENT, arguments=ARGS
        ) as lease:
            assert lease.secrets["CONTENT_API_KEY"] == value
            assert value not in repr(lease)
            lease.result_size_bytes = 11
        lease_id = lease.lease_id
    event = _one_tool_call(daemon, lease_id)
    assert event["result"]["status"] == "success"
    assert isinstance(event["result"]["duration_ms"], int)
    assert event["result"]["duration_ms"] >= 0
    assert event["result"]["result_size_bytes"] == 11
    assert "error" not in event["result"]
    assert _second_release_status(daemon, lease_id) == 409


def test_sync_tool_call_error_in_body_releases_and_propagates(daemon: Daemon) -> None:
    token = daemon.user_token(SERVER)
    seen: list[Lease] = []
    with Client(socket_path=daemon.socket) as client:
        with pytest.raises(BodyFailed, match="boom"), client.tool_call(
            SERVER, TOOL, user_token=token, agent_id=AGENT, arguments=ARGS
        ) as lease:
            seen.append(lease)
            raise BodyFailed("boom")
        # the client still works after a failed body
        assert client.health()["status"] == "ok"
    (lease,) = seen
    event = _one_tool_call(daemon, lease.lease_id)
    assert event["result"]["status"] == "error"
    assert event["result"]["error"] == "BodyFailed"
    assert "duration_ms" in event["result"]
    assert _second_release_status(daemon, lease.lease_id) == 409


# --------------------------------------------------------------------------- typed errors


def test_redeem_twice_is_token_replayed(daemon: Daemon) -> None:
    token = daemon.user_token(SERVER)
    with Client(socket_path=daemon.socket) as client:
        auth = client.authorize(SERVER, TOOL, user_token=token, agent_id=AGENT, arguments=ARGS)
        assert auth.resolution_token
        lease = client.redeem(auth.resolution_token)
        with pytest.raises(ConflictError) as info:
            client.redeem(auth.resolution_token)
        client.release(lease, "success", 1)
    err = info.value
    assert err.code == "token_replayed"
    assert err.status == 409
    assert err.request_id and err.request_id.startswith("req_")
    assert auth.resolution_token not in str(err)
    assert _write_key(daemon) not in str(err)
    assert daemon.events_of("token.replayed")


@pytest.mark.parametrize(
    ("server", "tool", "code"),
    [("content-api", "no_such_tool", "tool_unknown"), ("no-such-server", "x", "server_unknown")],
)
def test_unknown_tool_or_server_is_not_found(
    daemon: Daemon, server: str, tool: str, code: str
) -> None:
    token = daemon.user_token(SERVER)
    with Client(socket_path=daemon.socket) as client, pytest.raises(NotFoundError) as info:
        client.authorize(server, tool, user_token=token, agent_id=AGENT, arguments={})
    assert info.value.code == code
    assert info.value.status == 404
    assert isinstance(info.value, SidekeyClientError)


def test_call_without_user_token_is_token_missing(daemon: Daemon) -> None:
    entered = False
    with Client(socket_path=daemon.socket) as client:
        with pytest.raises(TokenRejected) as info, client.tool_call(
            SERVER, TOOL, agent_id=AGENT, arguments=ARGS
        ):
            entered = True
        assert client.health()["status"] == "ok"
    assert not entered  # no lease, the body never ran
    err = info.value
    assert err.code == "token_missing"
    assert err.status == 401
    assert err.request_id and err.request_id.startswith("req_")
    assert "user_token" in err.message  # says what to send
    assert _write_key(daemon) not in str(err)
    assert not daemon.events_of("mcp.redeem")
    assert not daemon.events_of("mcp.tool_call")


def test_token_without_tool_scope_is_scope_missing(daemon: Daemon) -> None:
    read_only = daemon.user_token(SERVER, scopes=["content:read"])
    entered = False
    with Client(socket_path=daemon.socket) as client:
        with pytest.raises(AccessDenied) as info, client.tool_call(
            SERVER, TOOL, user_token=read_only, agent_id=AGENT, arguments=ARGS
        ):
            entered = True
        # the same token is enough for a tool that needs only content:read
        with client.tool_call(
            SERVER, "list_articles", user_token=read_only, agent_id=AGENT, arguments={}
        ) as lease:
            assert set(lease.secrets) == {"CONTENT_API_KEY"}
    assert not entered
    err = info.value
    assert err.code == "scope_missing"
    assert err.status == 403
    assert "content:write" in err.message  # names the missing scope
    assert read_only not in str(err) and read_only not in repr(err)
    assert _write_key(daemon) not in str(err)
    assert [e["tool"] for e in daemon.events_of("mcp.redeem")] == ["list_articles"]


def test_release_twice_is_lease_released(daemon: Daemon) -> None:
    token = daemon.user_token(SERVER)
    with Client(socket_path=daemon.socket) as client:
        auth = client.authorize(SERVER, TOOL, user_token=token, agent_id=AGENT, arguments=ARGS)
        assert auth.resolution_token
        lease = client.redeem(auth.resolution_token)
        assert client.release(lease.lease_id, "success", 1)["state"] == "released"
        with pytest.raises(ConflictError) as info:
            client.release(lease.lease_id, "success", 1)
        assert info.value.code == "lease_released"
        with pytest.raises(NotFoundError) as missing:
            client.release("lse_does_not_exist", "success", 1)
        assert missing.value.code == "lease_not_found"
    assert len(_tool_calls(daemon, lease.lease_id)) == 1


# --------------------------------------------------------------------------- socket choice


def test_socket_from_environment(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDEKEY_SOCKET", daemon.socket)
    with Client() as client:
        assert client.socket_path == daemon.socket
        assert client.health()["status"] == "ok"
    assert AsyncClient().socket_path == daemon.socket


def test_explicit_socket_wins_over_environment(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SIDEKEY_SOCKET", str(tmp_path / "wrong.sock"))
    with Client(socket_path=daemon.socket) as client:
        assert client.health()["status"] == "ok"


def test_missing_socket_is_connection_failed(tmp_path: Path) -> None:
    path = str(tmp_path / "no-daemon-here.sock")
    with Client(socket_path=path, timeout=2.0) as client, pytest.raises(ConnectionFailed) as info:
        client.health()
    assert info.value.code == "connection_failed"
    assert info.value.status is None


async def test_async_missing_socket_is_connection_failed(tmp_path: Path) -> None:
    path = str(tmp_path / "no-daemon-here.sock")
    with trio.fail_after(ASYNC_TIMEOUT_S):
        async with AsyncClient(socket_path=path, timeout=2.0) as client:
            with pytest.raises(ConnectionFailed) as info:
                await client.health()
    assert info.value.code == "connection_failed"


# --------------------------------------------------------------------------- async: trio


async def test_trio_tool_call_success(daemon: Daemon) -> None:
    token = daemon.user_token(SERVER)
    value = _write_key(daemon)
    with trio.fail_after(ASYNC_TIMEOUT_S):
        async with AsyncClient(socket_path=daemon.socket) as client:
            assert (await client.health())["status"] == "ok"
            async with client.tool_call(
                SERVER, TOOL, user_token=token, agent_id=AGENT, arguments=ARGS
            ) as lease:
                assert lease.secrets["CONTENT_API_KEY"] == value
                assert value not in repr(lease)
                await trio.sleep(0.01)
    event = _one_tool_call(daemon, lease.lease_id)
    assert event["result"]["status"] == "success"
    assert isinstance(event["result"]["duration_ms"], int)


async def test_trio_typed_errors(daemon: Daemon) -> None:
    token = daemon.user_token(SERVER)
    with trio.fail_after(ASYNC_TIMEOUT_S):
        async with AsyncClient(socket_path=daemon.socket) as client:
            auth = await client.authorize(
                SERVER, TOOL, user_token=token, agent_id=AGENT, arguments=ARGS
            )
            assert auth.resolution_token
            lease = await client.redeem(auth.resolution_token)
            with pytest.raises(ConflictError) as replay:
                await client.redeem(auth.resolution_token)
            await client.release(lease, "success", 1)
            with pytest.raises(ConflictError) as again:
                await client.release(lease, "success", 1)
            with pytest.raises(NotFoundError) as unknown:
                await client.authorize(SERVER, "no_such_tool", user_token=token)
    assert replay.value.code == "token_replayed"
    assert again.value.code == "lease_released"
    assert unknown.value.code == "tool_unknown"


async def test_trio_tool_call_error_in_body(daemon: Daemon) -> None:
    token = daemon.user_token(SERVER)
    seen: list[Lease] = []
    with trio.fail_after(ASYNC_TIMEOUT_S):
        async with AsyncClient(socket_path=daemon.socket) as client:
            with pytest.raises(BodyFailed, match="trio boom"):
                async with client.tool_call(
                    SERVER, TOOL, user_token=token, agent_id=AGENT, arguments=ARGS
                ) as lease:
                    seen.append(lease)
                    raise BodyFailed("trio boom")
    (lease,) = seen
    event = _one_tool_call(daemon, lease.lease_id)
    assert event["result"]["status"] == "error"
    assert event["result"]["error"] == "BodyFailed"
    assert _second_release_status(daemon, lease.lease_id) == 409


async def test_trio_cancelled_body_still_releases(daemon: Daemon) -> None:
    token = daemon.user_token(SERVER)
    seen: list[Lease] = []
    with trio.fail_after(ASYNC_TIMEOUT_S):
        async with AsyncClient(socket_path=daemon.socket) as client:
            with trio.CancelScope() as scope:
                async with client.tool_call(
                    SERVER, TOOL, user_token=token, agent_id=AGENT, arguments=ARGS
                ) as lease:
                    seen.append(lease)
                    scope.cancel()
                    await trio.sleep(60)  # cancelled at once
                pytest.fail("the body was not cancelled")
            assert scope.cancelled_caught
            # the client is still usable after a cancelled call
            assert (await client.health())["status"] == "ok"
    (lease,) = seen
    event = _one_tool_call(daemon, lease.lease_id)
    # client.py reports a cancelled body as "cancelled" with no error name
    assert event["result"]["status"] == "cancelled"
    assert "error" not in event["result"]
    assert _second_release_status(daemon, lease.lease_id) == 409


async def test_trio_deadline_in_body_still_releases(daemon: Daemon) -> None:
    """A caller's deadline expiring mid-body: the shielded release still lands."""
    token = daemon.user_token(SERVER)
    seen: list[Lease] = []
    with trio.fail_after(ASYNC_TIMEOUT_S):
        async with AsyncClient(socket_path=daemon.socket) as client:
            auth_done = trio.Event()
            with trio.move_on_after(5) as scope:
                async with client.tool_call(
                    SERVER, TOOL, user_token=token, agent_id=AGENT, arguments=ARGS
                ) as lease:
                    seen.append(lease)
                    auth_done.set()
                    scope.deadline = trio.current_time() + 0.05
                    await trio.sleep(60)
            assert scope.cancelled_caught and auth_done.is_set()
    (lease,) = seen
    assert _one_tool_call(daemon, lease.lease_id)["result"]["status"] == "cancelled"


# --------------------------------------------------------------------------- async: asyncio


def test_asyncio_tool_call_success_and_error(daemon: Daemon) -> None:
    token = daemon.user_token(SERVER)
    value = _write_key(daemon)

    async def main() -> tuple[str, str]:
        async with AsyncClient(socket_path=daemon.socket) as client:
            assert (await client.health())["status"] == "ok"
            async with client.tool_call(
                SERVER, TOOL, user_token=token, agent_id=AGENT, arguments=ARGS
            ) as ok:
                assert ok.secrets["CONTENT_API_KEY"] == value
                await asyncio.sleep(0.01)
            failed: list[Lease] = []
            with pytest.raises(BodyFailed, match="asyncio boom"):
                async with client.tool_call(
                    SERVER, TOOL, user_token=token, agent_id=AGENT, arguments=ARGS
                ) as bad:
                    failed.append(bad)
                    raise BodyFailed("asyncio boom")
            return ok.lease_id, failed[0].lease_id

    ok_id, bad_id = asyncio.run(asyncio.wait_for(main(), ASYNC_TIMEOUT_S))
    assert _one_tool_call(daemon, ok_id)["result"]["status"] == "success"
    bad = _one_tool_call(daemon, bad_id)["result"]
    assert bad["status"] == "error" and bad["error"] == "BodyFailed"
    assert _second_release_status(daemon, bad_id) == 409


def test_asyncio_typed_errors(daemon: Daemon) -> None:
    token = daemon.user_token(SERVER)

    async def main() -> list[str]:
        codes: list[str] = []
        async with AsyncClient(socket_path=daemon.socket) as client:
            auth = await client.authorize(
                SERVER, TOOL, user_token=token, agent_id=AGENT, arguments=ARGS
            )
            assert auth.resolution_token
            lease = await client.redeem(auth.resolution_token)
            try:
                await client.redeem(auth.resolution_token)
            except ConflictError as exc:
                codes.append(exc.code)
            await client.release(lease, "success", 1)
            try:
                await client.release(lease, "success", 1)
            except ConflictError as exc:
                codes.append(exc.code)
        return codes

    assert asyncio.run(asyncio.wait_for(main(), ASYNC_TIMEOUT_S)) == [
        "token_replayed",
        "lease_released",
    ]


def test_asyncio_cancelled_body_still_releases(daemon: Daemon) -> None:
    token = daemon.user_token(SERVER)

    async def main() -> str:
        async with AsyncClient(socket_path=daemon.socket) as client:
            entered = asyncio.Event()
            seen: list[Lease] = []

            async def call() -> None:
                async with client.tool_call(
                    SERVER, TOOL, user_token=token, agent_id=AGENT, arguments=ARGS
                ) as lease:
                    seen.append(lease)
                    entered.set()
                    await asyncio.sleep(60)

            task = asyncio.create_task(call())
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return seen[0].lease_id

    lease_id = asyncio.run(asyncio.wait_for(main(), ASYNC_TIMEOUT_S))
    assert _one_tool_call(daemon, lease_id)["result"]["status"] == "cancelled"
    assert _second_release_status(daemon, lease_id) == 409


def test_asyncio_missing_socket_is_connection_failed(tmp_path: Path) -> None:
    async def main() -> str:
        async with AsyncClient(socket_path=str(tmp_path / "none.sock"), timeout=2.0) as client:
            try:
                await client.health()
            except ConnectionFailed as exc:
                return exc.code
        return "no error"

    assert asyncio.run(asyncio.wait_for(main(), ASYNC_TIMEOUT_S)) == "connection_failed"
