"""sidekey.client against a scripted transport: error mapping, leases, tool_call outcomes.

The scripted daemon answers with ``httpx.Response`` objects (a convenient builder);
``_to_client`` hands them to the client's test ``transport`` hook.

Async tests run under trio (pytest-trio's trio_mode); the asyncio tests drive the same
client with ``asyncio.run`` from a sync test.
"""

from __future__ import annotations

import asyncio
import json
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trio

from sidekey import client as sk
from sidekey.client import (
    AccessDenied,
    ApprovalPending,
    AsyncClient,
    BadRequestError,
    Client,
    ConflictError,
    ConnectionFailed,
    Lease,
    NotFoundError,
    ProtocolError,
    RateLimited,
    RequestTooLarge,
    ServiceUnavailable,
    SidekeyClientError,
    TokenRejected,
)

SECRET = "s3cr3t-value-never-shown"
USER_TOKEN = "eyJ.user-bearer.token"
ARGS = {"query": "cats", "limit": 5}


def _json(status: int, body: Any, **headers: str) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(body).encode(), headers=headers)


def _error(status: int, code: str, rid: str = "req_err", **details: Any) -> httpx.Response:
    err: dict[str, Any] = {"code": code, "message": f"{code} happened", "request_id": rid}
    if details:
        err["details"] = details
    return _json(status, {"error": err})


ALLOW = {
    "decision": "allow",
    "request_id": "req_a",
    "resolution_token": "rt.jwt.token",
    "expires_at": "2030-01-01T00:00:00Z",
    "secrets": ["api_key"],
    "policy": {"decision": "allow", "rules_matched": ["grant:a1"], "warnings": []},
    "user_id": "u1",
}
LEASE = {
    "lease_id": "lease_1",
    "expires_at": "2030-01-01T00:00:00Z",
    "server": "content-api",
    "tool": "list_articles",
    "secrets": {"api_key": SECRET},
    "request_id": "req_r",
}


class Daemon:
    """A scripted daemon: records request bodies per path, answers from ``routes``."""

    def __init__(self, **overrides: Callable[[dict[str, Any]], httpx.Response]) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.routes: dict[str, Callable[[dict[str, Any]], httpx.Response]] = {
            "/v1/health": lambda b: _json(200, {"ok": True}),
            "/v1/status": lambda b: _json(200, {"leases": {"active": 0}}),
            "/v1/authorize": lambda b: _json(
                200, {**ALLOW, "resolution_token": None, "lease": LEASE} if b.get("redeem") else ALLOW),
            "/v1/redeem": lambda b: _json(200, LEASE),
            "/v1/release": lambda b: _json(
                200, {"lease_id": b["lease_id"], "state": "released", "request_id": "req_x"}
            ),
            "/v1/tokens": lambda b: _json(
                200, {"resolution_token": "t", "jti": "j", "expires_at": "e", "request_id": "r"}
            ),
        }
        self.routes.update({"/v1/" + k: v for k, v in overrides.items()})

    def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.headers["host"] == "sidekey"
        body = json.loads(request.content) if request.content else {}
        self.calls.append((request.url.path, body))
        return self.routes[request.url.path](body)

    async def handle_async(self, request: httpx.Request) -> httpx.Response:
        # A checkpoint: an unshielded release in a cancelled scope would die here.
        await anyio.sleep(0)
        return self.handle(request)

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [b for p, b in self.calls if p == path]

    def sync_client(self) -> Client:
        return Client("/nonexistent.sock",
                      transport=lambda req: _to_client(self.handle(_from_client(req))))

    def async_client(self) -> AsyncClient:
        async def transport(req: sk.TransportRequest) -> sk.TransportResponse:
            return _to_client(await self.handle_async(_from_client(req)))

        return AsyncClient("/nonexistent.sock", transport=transport)


def _from_client(req: sk.TransportRequest) -> httpx.Request:
    return httpx.Request(req.method, "http://sidekey" + req.target, headers=req.headers,
                         content=req.body)


def _to_client(resp: httpx.Response) -> sk.TransportResponse:
    return sk.TransportResponse(resp.status_code, resp.read(), dict(resp.headers))


def call_kw() -> dict[str, Any]:
    return dict(
        server="content-api", tool="list_articles", user_token=USER_TOKEN, agent_id="a1",
        session_id="s1", arguments=ARGS,
    )


# --------------------------------------------------------------------------- socket path


def test_socket_path_argument_env_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIDEKEY_SOCKET", raising=False)
    assert Client().socket_path == "/run/sidekey/sidekey.sock"
    monkeypatch.setenv("SIDEKEY_SOCKET", "/tmp/sk-test/sidekey.sock")
    assert Client().socket_path == "/tmp/sk-test/sidekey.sock"
    assert AsyncClient().socket_path == "/tmp/sk-test/sidekey.sock"
    assert Client(Path("/x/y.sock")).socket_path == "/x/y.sock"  # the argument wins


def test_construction_does_no_io_and_closed_client_refuses() -> None:
    c = Client("/definitely/not/here.sock")
    assert c._http is None
    c.close()
    with pytest.raises(RuntimeError):
        c.health()


def test_missing_socket_is_connection_failed(tmp_path: Path) -> None:
    with Client(tmp_path / "absent.sock", timeout=2) as c, pytest.raises(ConnectionFailed) as ei:
        c.health()
    assert ei.value.code == "connection_failed"
    assert ei.value.status is None


async def test_missing_socket_is_connection_failed_async(tmp_path: Path) -> None:
    with trio.fail_after(5):
        async with AsyncClient(tmp_path / "absent.sock", timeout=2) as c:
            with pytest.raises(ConnectionFailed):
                await c.health()


# --------------------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("status", "cls", "code"),
    [
        (400, BadRequestError, "invalid_request"),
        (401, TokenRejected, "token_expired"),
        (403, AccessDenied, "no_grant"),
        (404, NotFoundError, "tool_unknown"),
        (409, ConflictError, "token_replayed"),
        (413, RequestTooLarge, "body_too_large"),
        (429, RateLimited, "quota_exceeded"),
        (503, ServiceUnavailable, "audit_unavailable"),
        (500, SidekeyClientError, "internal"),
    ],
)
def test_error_mapping(status: int, cls: type[SidekeyClientError], code: str) -> None:
    d = Daemon(authorize=lambda b: _error(status, code, rid="req_42", rules=["r1"]))
    with d.sync_client() as c, pytest.raises(SidekeyClientError) as ei:
        c.authorize("content-api", "list_articles", user_token=USER_TOKEN, arguments=ARGS)
    exc = ei.value
    assert type(exc) is cls
    assert (exc.code, exc.status, exc.request_id) == (code, status, "req_42")
    assert exc.details == {"rules": ["r1"]}
    assert exc.message == f"{code} happened"
    assert "req_42" in str(exc) and code in str(exc)
    assert USER_TOKEN not in str(exc) and USER_TOKEN not in repr(exc)
    # The request carried the user token (it is the daemon's to check, not ours to print).
    assert d.bodies("/v1/authorize")[0]["user_token"] == USER_TOKEN


@pytest.mark.parametrize(
    ("details", "headers", "expected"),
    [
        ({"retry_after_s": 1.5}, {}, 1.5),
        ({"retry_after": 3}, {}, 3.0),
        ({}, {"retry-after": "7"}, 7.0),
        ({"retry_after_s": "soon"}, {}, None),
        ({}, {}, None),
    ],
)
def test_rate_limited_retry_after(
    details: dict[str, Any], headers: dict[str, str], expected: float | None
) -> None:
    def reply(b: dict[str, Any]) -> httpx.Response:
        resp = _error(429, "quota_exceeded", **details)
        resp.headers.update(headers)
        return resp

    with Daemon(authorize=reply).sync_client() as c, pytest.raises(RateLimited) as ei:
        c.authorize("content-api", "list_articles")
    assert ei.value.retry_after_s == expected


def test_request_id_from_header_when_body_lacks_it() -> None:
    reply = _json(403, {"error": {"code": "denied", "message": "no"}}, **{"x-request-id": "req_h"})
    with Daemon(authorize=lambda b: reply).sync_client() as c, pytest.raises(AccessDenied) as ei:
        c.authorize("content-api", "list_articles")
    assert ei.value.request_id == "req_h"


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, content=b"<html>not json</html>"),
        httpx.Response(200, content=b"[1, 2]"),
        httpx.Response(502, content=b"Bad Gateway"),
        _json(403, {"detail": "not the sidekey shape"}),
        _json(200, {"decision": "deny", "request_id": "r"}),  # fail closed
        _json(200, {**ALLOW, "resolution_token": None}),
        _json(202, {"decision": "pending_approval"}),  # no approval_id
    ],
)
def test_undocumented_responses_are_protocol_errors(response: httpx.Response) -> None:
    with Daemon(authorize=lambda b: response).sync_client() as c, pytest.raises(ProtocolError) as ei:
        c.authorize("content-api", "list_articles")
    assert ei.value.code == "protocol_error"
    assert ei.value.status == response.status_code


def test_bad_lease_shape_does_not_leak_values() -> None:
    bad = {**LEASE, "secrets": {"api_key": SECRET, "other": 12}}
    with Daemon(redeem=lambda b: _json(200, bad)).sync_client() as c, pytest.raises(ProtocolError) as ei:
        c.redeem("rt.jwt.token")
    assert SECRET not in str(ei.value)
    assert ei.value.__cause__ is None and ei.value.__context__ is not None
    assert SECRET not in str(ei.value.__context__)


def test_oversized_response_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sk, "MAX_RESPONSE_BYTES", 1000)
    big = _json(200, {"ok": True, "pad": "x" * 2000})
    with Daemon(health=lambda b: big).sync_client() as c, pytest.raises(ProtocolError):
        c.health()


def test_approval_pending() -> None:
    held = _json(
        202, {"decision": "pending_approval", "approval_id": "apr_9", "request_id": "req_p",
              "expires_at": "2030-01-01T00:05:00Z", "policy": {}, "user_id": "u1"},
    )
    with Daemon(authorize=lambda b: held).sync_client() as c:
        with pytest.raises(ApprovalPending) as ei:
            c.authorize("content-api", "delete_record")
        assert ei.value.approval_id == "apr_9"
        assert ei.value.status == 202 and ei.value.request_id == "req_p"
        result = c.authorize("content-api", "delete_record", raise_on_pending=False)
        assert (result.decision, result.approval_id) == ("pending_approval", "apr_9")
        with pytest.raises(ApprovalPending), c.tool_call("content-api", "delete_record"):
            pytest.fail("body must not run")


# --------------------------------------------------------------------------- leases


def test_lease_repr_hides_secret_values() -> None:
    d = Daemon()
    with d.sync_client() as c:
        lease = c.redeem("rt.jwt.token", ARGS)
    assert lease.secrets["api_key"] == SECRET
    for text in (repr(lease), str(lease), repr(lease.secrets), str(lease.secrets), f"{lease}"):
        assert SECRET not in text
    assert "api_key" in repr(lease)
    with pytest.raises(TypeError):
        pickle.dumps(lease)
    assert d.bodies("/v1/redeem") == [{"resolution_token": "rt.jwt.token", "arguments": ARGS}]


def test_authorize_result_repr_hides_token_and_sends_fields() -> None:
    d = Daemon()
    with d.sync_client() as c:
        result = c.authorize(**call_kw(), server_version="1.2.0")
    assert result.resolution_token == "rt.jwt.token" and "rt.jwt.token" not in repr(result)
    assert result.secrets == ("api_key",) and result.user_id == "u1"
    assert result.policy["rules_matched"] == ["grant:a1"]
    assert d.bodies("/v1/authorize") == [
        {**call_kw(), "server_version": "1.2.0"}
    ]


def test_health_status_issue_token_release() -> None:
    d = Daemon()
    with d.sync_client() as c:
        assert c.health() == {"ok": True}
        assert c.status()["leases"] == {"active": 0}
        tok = c.issue_token("content-api", "list_articles", "u1", arguments=ARGS, ttl_seconds=60)
        assert tok["jti"] == "j"
        assert c.release("lease_1", "error", 12, result_size_bytes=3, error="X")["state"] == "released"
        with pytest.raises(ValueError):
            c.release("lease_1", "bogus", 1)  # type: ignore[arg-type]
    assert d.bodies("/v1/tokens")[0] == {
        "server": "content-api", "tool": "list_articles", "user": "u1", "arguments": ARGS,
        "ttl_seconds": 60,
    }
    assert d.bodies("/v1/release")[0] == {
        "lease_id": "lease_1", "status": "error", "duration_ms": 12, "result_size_bytes": 3,
        "error": "X",
    }


# --------------------------------------------------------------------------- sync tool_call


def test_tool_call_success_releases_with_duration_and_withhold() -> None:
    d = Daemon(release=lambda b: _json(
        200, {"lease_id": b["lease_id"], "state": "released", "request_id": "r",
              "withhold_result": True, "future_field": 1},
    ))
    with d.sync_client() as c:
        with c.tool_call(**call_kw()) as lease:
            assert isinstance(lease, Lease) and lease.secrets["api_key"] == SECRET
            lease.result_size_bytes = 42
        assert lease.withhold_result is True
    # One request authorizes and redeems (this process runs the tool).
    assert [p for p, _ in d.calls] == ["/v1/authorize", "/v1/release"]
    (auth,) = d.bodies("/v1/authorize")
    assert auth["redeem"] is True and auth["arguments"] == ARGS
    (rel,) = d.bodies("/v1/release")
    assert rel["status"] == "success" and rel["lease_id"] == "lease_1"
    assert rel["result_size_bytes"] == 42
    assert isinstance(rel["duration_ms"], int) and rel["duration_ms"] >= 0
    assert "error" not in rel


def test_tool_call_body_error_releases_error_and_propagates() -> None:
    d = Daemon()
    with d.sync_client() as c, pytest.raises(KeyError, match="boom"), c.tool_call(**call_kw()):
        raise KeyError("boom")
    (rel,) = d.bodies("/v1/release")
    assert (rel["status"], rel["error"]) == ("error", "KeyError")


def test_tool_call_release_failure_after_success_raises() -> None:
    d = Daemon(release=lambda b: _error(409, "lease_released"))
    with d.sync_client() as c, pytest.raises(ConflictError), c.tool_call(**call_kw()):
        pass


def test_tool_call_release_failure_does_not_mask_body_error() -> None:
    d = Daemon(release=lambda b: _error(503, "audit_unavailable"))
    with d.sync_client() as c, pytest.raises(ZeroDivisionError), c.tool_call(**call_kw()):
        1 / 0  # noqa: B018


def test_tool_call_denied_runs_no_body_and_releases_nothing() -> None:
    d = Daemon(authorize=lambda b: _error(403, "no_grant"))
    with d.sync_client() as c, pytest.raises(AccessDenied), c.tool_call(**call_kw()):
        pytest.fail("body must not run")
    assert d.bodies("/v1/release") == []


# --------------------------------------------------------------------------- async (trio)


class _ClientClock:
    """Stands in for the ``time`` module the client reads its durations from:
    ``monotonic()`` moves only when the test says, so a duration is exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


async def test_async_tool_call_trio_success(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _ClientClock()
    monkeypatch.setattr(sk, "time", clock)
    d = Daemon()
    with trio.fail_after(5):
        async with d.async_client() as c:
            assert await c.health() == {"ok": True}
            async with c.tool_call(**call_kw()) as lease:
                assert lease.secrets["api_key"] == SECRET
                await trio.sleep(0)
                clock.now += 0.25  # the tool's work, on the client's clock
    (rel,) = d.bodies("/v1/release")
    assert rel["status"] == "success" and rel["duration_ms"] == 250


async def test_async_tool_call_trio_error() -> None:
    d = Daemon()
    async with d.async_client() as c:
        with pytest.raises(RuntimeError, match="tool failed"):
            async with c.tool_call(**call_kw()):
                raise RuntimeError("tool failed")
    (rel,) = d.bodies("/v1/release")
    assert (rel["status"], rel["error"]) == ("error", "RuntimeError")


async def test_async_tool_call_trio_cancelled_still_releases() -> None:
    d = Daemon()
    async with d.async_client() as c:
        with trio.move_on_after(5) as outer:
            with trio.CancelScope() as scope:
                async with c.tool_call(**call_kw()):
                    scope.cancel()
                    await trio.sleep(10)
        assert scope.cancelled_caught and not outer.cancelled_caught
    (rel,) = d.bodies("/v1/release")
    assert rel["status"] == "cancelled" and "error" not in rel


async def test_async_errors_and_approval_trio() -> None:
    held = _json(202, {"decision": "pending_approval", "approval_id": "apr_1"})
    d = Daemon(authorize=lambda b: held, redeem=lambda b: _error(401, "token_expired", "q"))
    async with d.async_client() as c:
        with pytest.raises(ApprovalPending) as ei:
            await c.authorize("content-api", "delete_record")
        assert ei.value.approval_id == "apr_1"
        with pytest.raises(TokenRejected) as ej:
            await c.redeem("rt")
        assert (ej.value.code, ej.value.request_id) == ("token_expired", "q")


# --------------------------------------------------------------------------- async (asyncio)


def test_async_tool_call_asyncio() -> None:
    d = Daemon()

    async def main() -> None:
        async with d.async_client() as c:
            async with c.tool_call(**call_kw()) as lease:
                assert lease.secrets["api_key"] == SECRET
                await asyncio.sleep(0)
            with pytest.raises(ValueError):
                async with c.tool_call(**call_kw()):
                    raise ValueError("x")

            # Native asyncio cancellation of the task running the tool call.
            entered = asyncio.Event()

            async def tool() -> None:
                async with c.tool_call(**call_kw()):
                    entered.set()
                    await asyncio.sleep(10)

            task = asyncio.create_task(tool())
            await entered.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    statuses = [(b["status"], b.get("error")) for b in d.bodies("/v1/release")]
    assert statuses == [("success", None), ("error", "ValueError"), ("cancelled", None)]
