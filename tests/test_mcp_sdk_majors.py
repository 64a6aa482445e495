"""sidekey.mcp on both SDK majors (2.x ``MCPServer`` and 1.x ``FastMCP``), over the
SDK's real transports: stdio (one server process per client) and streamable HTTP with
and without sessions, driven by the SDK's own client against a real daemon.

The same scenario runs for every (major, transport): an allowed call using the secret,
pydantic arguments, a rate limit with ``retry_after_s``, a withheld result, a held call
approved with the CLI and retried with its ``approval_id``, a cancelled call released as
``cancelled``, and a denial a model can read; then ``concurrent_sessions`` counted with
and without ``Mcp-Session-Id``.

One difference between the majors is asserted rather than hidden: 1.x validates even an
error result's ``structuredContent`` against the tool's output schema, so on a tool with
structured output (1.x gives one to every annotated return type) a refusal reaches the
client as text only (the code, retry time and approval id are in the text).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import yaml
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from harness import Daemon, free_port, http_mcp_server
from sidekey.mcp import APPROVAL_ARG
from test_approvals_daemon import cli
from test_mcp_governed import SERVER_SCRIPT, limits, mcp1_python, server_env  # noqa: F401

pytestmark = pytest.mark.integration

TIMEOUT_S = 150.0
SRC = str(Path(__file__).resolve().parents[1] / "src")
TRANSPORTS = ["stdio", "http-sessions", "http-stateless"]

Connect = Callable[..., contextlib.AbstractAsyncContextManager[Client]]


@pytest.fixture(params=["2.x", "1.x"])
def sdk(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(major, the python that runs the server with it)."""
    if request.param == "2.x":
        return "2.x", sys.executable
    return "1.x", str(request.getfixturevalue("mcp1_python"))


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        with anyio.fail_after(TIMEOUT_S):
            return await main()

    return anyio.run(bounded, backend="asyncio")


def env_for(d: Daemon, python: str, **extra: str) -> dict[str, str]:
    env = server_env(d, **extra)
    if python != sys.executable:
        env["PYTHONPATH"] = SRC  # the 1.x venv has the client's own dependencies only
    return env


@contextlib.contextmanager
def serving(d: Daemon, python: str, transport: str, work: Path,
            *flags: str) -> Iterator[Connect]:
    """Yield ``connect(token=None, agent=None, headers=None)``: an async context manager
    giving a connected SDK client; stdio starts a server process per client."""
    marker = work / "marker"
    marker.mkdir(exist_ok=True)
    if transport == "stdio":
        @contextlib.asynccontextmanager
        async def connect_stdio(token: str | None = None, agent: str | None = None,
                                headers: dict[str, str] | None = None) -> AsyncIterator[Client]:
            extra = {"SIDEKEY_TEST_USER_TOKEN": d.user_token("content-api"),
                     "SIDEKEY_TEST_MARKER_DIR": str(marker)}
            if agent is not None:
                extra["SIDEKEY_TEST_AGENT"] = agent
            params = StdioServerParameters(command=python, args=[str(SERVER_SCRIPT), "stdio"],
                                           env=env_for(d, python, **extra))
            async with Client(params, mode="legacy") as client:
                yield client

        yield connect_stdio
        return

    port = free_port()
    argv = [python, str(SERVER_SCRIPT), "http", str(port), "--introspect", *flags]
    if transport == "http-stateless":
        argv.append("--stateless")
    env = env_for(d, python, SIDEKEY_TEST_MARKER_DIR=str(marker))
    with http_mcp_server(argv, port=port, env=env, log_path=work / f"mcp-{port}.log") as url:
        @contextlib.asynccontextmanager
        async def connect_http(token: str | None = None, agent: str | None = None,
                               headers: dict[str, str] | None = None) -> AsyncIterator[Client]:
            if token is None:
                token = d.user_token("content-api",
                                     extra={"azp": agent or "content-writer", "jti": "t1"})
            async with httpx2.AsyncClient(
                    headers={"Authorization": f"Bearer {token}", **(headers or {})},
                    timeout=60) as http:
                transport_ = streamable_http_client(url, http_client=http)
                async with Client(transport_, mode="legacy") as client:  # type: ignore[arg-type]
                    yield client

        yield connect_http


def structured(result: Any) -> dict[str, Any]:
    assert result.is_error, result
    info: dict[str, Any] = result.structured_content
    assert set(info) >= {"code", "retry_after_s", "approval_id"}, result
    return info


def text(result: Any) -> str:
    return str(result.content[0].text)


def cli_approve(d: Daemon, approval_id: str) -> None:
    out = cli(d, "approvals", "approve", approval_id, "--reason", "checked")
    assert out.returncode == 0, out.stderr


async def wait_for(path: Path) -> None:
    while not path.exists():
        await anyio.sleep(0.05)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_governed_tools_on_each_sdk_major_and_transport(
    make_daemon: Any, sdk: tuple[str, str], transport: str, tmp_path: Path,
) -> None:
    major, python = sdk
    d: Daemon = make_daemon()
    limits(d, "create_article", requests_per_minute=1)
    limits(d, "publish_article", requires_human_approval=True)
    limits(d, "list_articles", max_result_size_kb=1)
    d.start()
    out: dict[str, Any] = {}

    with serving(d, python, transport, tmp_path) as connect:
        async def main() -> None:
            async with connect() as client:
                out["allowed"] = await client.call_tool("list_articles", {"query": "ai"})
                out["pydantic"] = await client.call_tool(
                    "create_article", {"title": "t", "filter": {"section": "news"}})
                out["limited"] = await client.call_tool("create_article", {"title": "u"})
                out["withheld"] = await client.call_tool("list_articles", {"query": "big"})
                out["held"] = held = await client.call_tool("publish_article", {"article_id": 7})
                found = re.search(r"approval id (apr_[A-Za-z0-9_-]+)", text(held))
                assert found, held
                out["approval_id"] = approval_id = found.group(1)
                await anyio.to_thread.run_sync(cli_approve, d, approval_id)
                out["retried"] = await client.call_tool(
                    "publish_article", {"article_id": 7, APPROVAL_ARG: approval_id})
                if transport != "http-stateless":
                    # (Stateless HTTP cannot cancel: the client's notifications/cancelled
                    # is a request of its own, served by a fresh transport that does not
                    # know the call; the SDK does not cancel on a dropped response stream.)
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(client.call_tool, "list_articles", {"query": "slow"})
                        await wait_for(tmp_path / "marker" / "started")
                        tg.cancel_scope.cancel()
                    # The cancelled call is released before the connection goes away.
                    with anyio.fail_after(30):
                        while len(d.events_of("mcp.tool_call")) < 5:
                            await anyio.sleep(0.05)
            async with connect(agent="sales-assistant") as other:
                out["denied"] = await other.call_tool("list_articles", {"query": "ai"})

        run(main)

    allowed = out["allowed"]
    assert not allowed.is_error, allowed
    assert json.loads(text(allowed))["sdk"] == int(major[0]), allowed  # the major under test
    assert json.loads(text(allowed))["key_tail"] == d.secrets["content-api/read-key"][-6:]
    assert not out["pydantic"].is_error, out["pydantic"]

    # Rate limit, on a structured-output tool (create_article -> str).
    limited = out["limited"]
    assert limited.is_error, limited
    # (1.x prefixes a raised error with "Error executing tool create_article: ".)
    seconds = re.fullmatch(r"(Error executing tool create_article: )?"
                           r"rate limited: retry in (\d+) s \(rate_limited\)", text(limited))
    assert seconds and bool(seconds.group(1)) == (major == "1.x"), text(limited)
    seconds = re.search(r"retry in (\d+) s", text(limited))
    assert seconds and 1 <= int(seconds.group(1)) <= 60, text(limited)
    if major == "2.x":
        info = structured(limited)
        assert info["code"] == "rate_limited" and info["retry_after_s"] == int(seconds.group(1))
    else:
        assert limited.structured_content is None, limited  # 1.x: text only (see above)

    # Withheld, on a plain-text tool: structured on both majors.
    withheld = out["withheld"]
    assert structured(withheld)["code"] == "result_withheld", withheld
    assert "x" * 100 not in json.dumps(withheld.model_dump(mode="json"))

    held = out["held"]
    assert held.is_error and APPROVAL_ARG in text(held), held
    if major == "2.x":
        assert structured(held)["approval_id"] == out["approval_id"]
    retried = out["retried"]
    assert not retried.is_error, retried
    assert json.loads(text(retried))["key_tail"] == d.secrets["content-api/publish-key"][-6:]
    assert len(d.events_of("approval.requested")) == 1  # the retry opened no new hold

    denied = out["denied"]
    info = structured(denied)
    assert text(denied).startswith(f"denied ({info['code']})"), denied
    assert info["retry_after_s"] is None and d.socket not in text(denied)

    cancelled = [] if transport == "http-stateless" else [("list_articles", "cancelled")]
    events = d.wait_events("mcp.tool_call", 4 + len(cancelled))
    by_status = sorted((e["tool"], e["result"]["status"]) for e in events)
    assert by_status == sorted([("list_articles", "success"), ("create_article", "success"),
                                ("list_articles", "success"), ("publish_article", "success"),
                                *cancelled]), by_status
    first = events[0]
    assert first["agent_id"] == "content-writer" and first["tool"] == "list_articles"
    # 2.x: the arguments as sent; 1.x keeps none where a tool can read them: the
    # validated ones, defaults included (the same at authorize and redeem).
    assert first["arguments"] == ({"query": "ai"} if major == "2.x" else
                                  {"query": "ai", "page": 1}), first
    sessions = {e["session_id"] for e in events}
    assert len(sessions) == 1, sessions  # one client connection, one session
    [sid] = sessions
    prefix = {"stdio": "proc-", "http-stateless": "tok-"}.get(transport)
    if prefix:
        assert sid.startswith(prefix), sid
    else:
        assert not sid.startswith(("proc-", "tok-")), sid  # the Mcp-Session-Id
    [withheld_event] = [e for e in events if e["result"].get("withheld")]
    assert withheld_event["result"]["result_size_bytes"] == 4096


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_concurrent_sessions_on_each_sdk_major_and_transport(
    make_daemon: Any, sdk: tuple[str, str], transport: str, tmp_path: Path,
) -> None:
    """``concurrent_sessions: 1``: a second open session of the same user is refused;
    what ends the first one depends on the transport (and, for HTTP sessions, on the
    SDK major: 1.x has no per-connection hook, so its sessions idle out)."""
    major, python = sdk
    ends_with_connection = transport == "stdio" or major == "2.x"
    d: Daemon = make_daemon()
    path = d.root / "rate-limits.yaml"
    data = yaml.safe_load(path.read_text())
    data["limits"]["per_user"]["concurrent_sessions"] = 1
    path.write_text(yaml.safe_dump(data))
    d.start()
    codes: dict[str, Any] = {}

    def code(result: Any) -> str | None:
        if not result.is_error:
            return None
        found = re.search(r"\((\w+)\)", text(result))
        return found.group(1) if found else text(result)

    with serving(d, python, transport, tmp_path) as connect:
        async def main() -> None:
            if transport == "http-stateless":
                # No Mcp-Session-Id: one session per access token.
                first = d.user_token("content-api", extra={"azp": "content-writer", "jti": "a"})
                second = d.user_token("content-api", extra={"azp": "content-writer", "jti": "b"})
                for label, token in [("a1", first), ("a2", first), ("b", second)]:
                    async with connect(token=token) as client:
                        codes[label] = code(await client.call_tool("list_articles",
                                                                   {"query": "ai"}))
                return
            async with connect() as a:
                codes["a"] = code(await a.call_tool("list_articles", {"query": "ai"}))
                async with connect() as b:
                    codes["b_while_a"] = code(await b.call_tool("list_articles", {"query": "ai"}))
            # a is closed now: its session ends (stdio: at its process's exit; HTTP with
            # sessions on 2.x: when the SDK closes the connection on the client's DELETE),
            # which may take a moment; elsewhere one call shows it still counts.
            deadline = time.monotonic() + (10 if ends_with_connection else 0)
            async with connect() as c:
                while True:
                    codes["after_a"] = code(await c.call_tool("list_articles", {"query": "ai"}))
                    if codes["after_a"] is None or time.monotonic() > deadline:
                        break
                    await anyio.sleep(0.2)

        run(main)

    # Every refusal is the session limit's (not, say, requests_per_minute's).
    refused = [e["error"]["message"] for e in d.audit_events()
               if (e.get("error") or {}).get("code") == "rate_limited"]
    assert refused and all("concurrent_sessions" in m for m in refused), refused
    if transport == "http-stateless":
        assert codes == {"a1": None, "a2": None, "b": "rate_limited"}, codes
        return
    assert codes["a"] is None and codes["b_while_a"] == "rate_limited", codes
    assert codes["after_a"] == (None if ends_with_connection else "rate_limited"), codes
    if ends_with_connection:
        ended = d.wait_events("session.ended", 1)
        assert ended[0]["server"] == "content-api", ended


@pytest.mark.parametrize("major", ["2.x", "1.x"])
def test_agent_from_a_header_is_bound_to_the_token(
    make_daemon: Any, major: str, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    """``Governor(agent_claims=(), agent_header="X-Agent-Id")``: the agent comes from a
    header (a gateway names it), and the daemon's ``policy.agent_claims`` binds it to the
    user's token: a header naming another agent is refused."""
    python = sys.executable if major == "2.x" else str(request.getfixturevalue("mcp1_python"))
    d: Daemon = make_daemon({"policy": {"agent_claims": ["azp"]}})
    d.start()
    token = d.user_token("content-api", extra={"azp": "content-writer"})
    results: dict[str, Any] = {}
    with serving(d, python, "http-sessions", tmp_path, "--agent-header") as connect:
        async def main() -> None:
            for label, headers in [("same", {"X-Agent-Id": "content-writer"}),
                                   ("other", {"X-Agent-Id": "sales-assistant"}),
                                   ("none", {})]:
                async with connect(token=token, headers=headers) as client:
                    results[label] = await client.call_tool("list_articles", {"query": "ai"})

        run(main)
    assert not results["same"].is_error, results["same"]
    assert structured(results["other"])["code"] == "agent_mismatch", results["other"]
    assert structured(results["none"])["code"] == "agent_missing", results["none"]
    [event] = d.wait_events("mcp.tool_call", 1)
    assert event["agent_id"] == "content-writer"
