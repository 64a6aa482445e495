"""sidekey.mcp: a real MCP server built with the official SDK (``MCPServer``), its tools
governed with ``@governed``, driven by the SDK's own client, against a real quickstart
daemon. Each test runs its MCP side under asyncio (the SDK's home loop) with a bound.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import yaml
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.middleware.auth_context import auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, ElicitResult, TextContent
from pydantic import BaseModel

from harness import Daemon, free_port, http_mcp_server
from sidekey.client import ApprovalPending, AsyncClient
from sidekey.client import Client as SyncClient
from sidekey.mcp import APPROVAL_ARG, Governor, current_lease

pytestmark = pytest.mark.integration

TIMEOUT_S = 60.0


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    async def bounded() -> Any:
        with anyio.fail_after(TIMEOUT_S):
            return await main()

    return anyio.run(bounded, backend="asyncio")


def limits(d: Daemon, tool: str, **rule: Any) -> None:
    path = d.root / "rate-limits.yaml"
    data = yaml.safe_load(path.read_text())
    data["limits"]["per_tool"].setdefault(tool, {}).update(rule)
    path.write_text(yaml.safe_dump(data))


class Filter(BaseModel):
    section: str
    tags: list[str] = []
    limit: int = 10


def build(gov: Governor, seen: dict[str, Any]) -> MCPServer:
    """The content-api server as an author writes it: two lines per tool."""
    mcp = MCPServer("content-api")

    @mcp.tool()
    @gov.governed("content-api")
    async def list_articles(query: str, page: int = 1) -> Any:
        lease = current_lease()
        seen["key"] = lease.secrets["CONTENT_API_KEY"]
        seen["lease_id"] = lease.lease_id
        if query == "slow":
            seen["started"].set()
            await anyio.sleep(TIMEOUT_S)
        if query == "big":
            return "x" * 4096
        if query == "fail":
            raise ToolError("the CMS is down")
        if query == "error-result":
            return CallToolResult(content=[TextContent(type="text", text="no such page")],
                                  is_error=True)
        return f"articles for {query!r} page {page}"

    @mcp.tool()
    @gov.governed("content-api")
    async def create_article(title: str, ctx: Context, filter: Filter | None = None) -> str:
        seen["filter"] = filter
        seen["ctx"] = ctx
        return "created " + title

    @mcp.tool(name="publish_article")
    @gov.governed("content-api")
    def publish(article_id: int, channel: str = "web") -> str:  # a sync tool, another name
        seen["publish_key"] = current_lease().secrets["CONTENT_API_KEY"]
        return f"published {article_id} to {channel}"

    return mcp


def governor(d: Daemon, **kw: Any) -> Governor:
    token = d.user_token("content-api")
    return Governor(AsyncClient(d.socket), agent_id=kw.pop("agent_id", "content-writer"),
                    user_token=lambda: token, **kw)


def session(gov: Governor, seen: dict[str, Any],
            body: Callable[[Client], Awaitable[Any]]) -> Any:
    """Run ``body`` with the SDK's client connected in-process to the server."""
    async def main() -> Any:
        try:
            async with Client(build(gov, seen)) as client:
                return await body(client)
        finally:
            await gov.client.close()

    return run(main)


def call(gov: Governor, seen: dict[str, Any], tool: str, arguments: dict[str, Any]) -> Any:
    return session(gov, seen, lambda client: client.call_tool(tool, arguments))


def refusal(result: Any) -> dict[str, Any]:
    assert result.is_error, result
    structured: dict[str, Any] = result.structured_content
    assert set(structured) >= {"code", "retry_after_s", "approval_id"}, structured
    return structured


def tool_calls(d: Daemon, count: int = 1) -> list[dict[str, Any]]:
    return d.wait_events("mcp.tool_call", count)


def test_allowed_call_uses_the_secret_and_is_released_as_success(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    d.start()
    seen: dict[str, Any] = {}
    result = call(governor(d), seen, "list_articles", {"query": "ai"})
    assert not result.is_error, result
    assert result.content[0].text == "articles for 'ai' page 1"
    assert seen["key"] == d.secrets["content-api/read-key"]
    [event] = tool_calls(d)
    assert event["tool"] == "list_articles" and event["agent_id"] == "content-writer"
    assert event["result"]["status"] == "success"
    assert event["result"]["result_size_bytes"] == len("articles for 'ai' page 1")
    # The digest is of the arguments as sent: the SDK's default page=1 is not in them.
    assert event["arguments"] == {"query": "ai"}
    assert event["lease_id"] == seen["lease_id"]
    assert event["session_id"].startswith("proc-")  # no Mcp-Session-Id, no token
    # current_lease() outside a governed call: nothing.
    with pytest.raises(RuntimeError):
        current_lease()


def test_identity_comes_from_the_verified_bearer_token_not_from_the_caller(
    make_daemon: Any,
) -> None:
    d: Daemon = make_daemon()
    d.start()
    token = d.user_token("content-api", extra={"azp": "content-writer"})
    verified = AccessToken(token=token, client_id="some-dcr-client", scopes=["content:read"],
                           subject="alice", claims={"azp": "content-writer", "jti": "j1",
                                                    "iss": "https://auth.example.com"})
    # No fallbacks: identity only from the SDK's auth context (what its bearer auth
    # middleware sets for a request whose token the TokenVerifier accepted).
    gov = Governor(AsyncClient(d.socket))
    seen: dict[str, Any] = {}
    reset = auth_context_var.set(AuthenticatedUser(verified))
    try:
        result = call(gov, seen, "list_articles", {"query": "ai", "agent_id": "sales-assistant"})
    finally:
        auth_context_var.reset(reset)
    assert not result.is_error, result
    [event] = tool_calls(d)
    assert event["agent_id"] == "content-writer" and event["user_id"] == "alice"
    expected = hashlib.sha256("\0".join(["https://auth.example.com", "alice",
                                          "some-dcr-client", "j1"]).encode()).hexdigest()[:40]
    assert event["session_id"] == "tok-" + expected
    # Without a token and without fallbacks there is no user: refused, as a tool error.
    seen.clear()
    result = call(Governor(AsyncClient(d.socket)), seen, "list_articles", {"query": "ai"})
    assert refusal(result)["code"].startswith("token"), result
    assert "key" not in seen


def test_denial_is_a_model_readable_tool_error_without_internals(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    d.start()
    seen: dict[str, Any] = {}
    result = call(governor(d, agent_id="sales-assistant"), seen, "list_articles", {"query": "ai"})
    info = refusal(result)
    assert info["code"] and info["retry_after_s"] is None and info["approval_id"] is None
    text = result.content[0].text
    assert text.startswith(f"denied ({info['code']})"), text
    assert d.socket not in text and "Traceback" not in text and "key" not in seen
    assert d.events_of("mcp.tool_call") == []

    # The daemon down: the credential service, not the call; no socket path.
    d.stop()
    result = call(governor(d), seen, "list_articles", {"query": "ai"})
    info = refusal(result)
    assert info["code"] == "connection_failed"
    text = result.content[0].text
    assert "temporarily unavailable" in text and d.socket not in text and "/" not in text, text


def test_rate_limit_carries_retry_after(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    limits(d, "create_article", requests_per_minute=1)
    d.start()
    seen: dict[str, Any] = {}
    gov = governor(d)

    async def twice(client: Client) -> Any:
        first = await client.call_tool("create_article", {"title": "a"})
        assert not first.is_error, first
        return await client.call_tool("create_article", {"title": "b"})

    result = session(gov, seen, twice)
    info = refusal(result)
    assert info["code"] == "rate_limited", info
    assert isinstance(info["retry_after_s"], int) and 1 <= info["retry_after_s"] <= 60
    assert result.content[0].text == f"rate limited: retry in {info['retry_after_s']} s (rate_limited)"


def test_held_call_is_retried_with_its_approval_id_once_approved(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    limits(d, "publish_article", requires_human_approval=True)
    d.start()
    seen: dict[str, Any] = {}
    args = {"article_id": 7}
    held = call(governor(d), seen, "publish_article", args)
    info = refusal(held)
    approval_id = info["approval_id"]
    assert info["code"] == "approval_pending" and approval_id.startswith("apr_"), info
    assert approval_id in held.content[0].text and APPROVAL_ARG in held.content[0].text
    [requested] = d.events_of("approval.requested")
    assert requested["arguments"] == args  # as sent: no default channel, no approval arg

    # Retried before a verdict: still pending, no new hold, nothing ran.
    early = call(governor(d), seen, "publish_article", {**args, APPROVAL_ARG: approval_id})
    assert refusal(early)["code"] == "approval_pending", early
    assert "publish_key" not in seen

    with SyncClient(d.socket) as approver:
        approver.approve(approval_id, reason="ok")
    result = call(governor(d), seen, "publish_article", {**args, APPROVAL_ARG: approval_id})
    assert not result.is_error, result
    assert result.content[0].text == "published 7 to web"
    assert seen["publish_key"] == d.secrets["content-api/publish-key"]
    [event] = tool_calls(d)
    assert event["arguments"] == args and event["result"]["status"] == "success"
    assert len(d.events_of("approval.requested")) == 1

    # The approval is spent, and it is for exactly those arguments.
    seen.clear()
    again = call(governor(d), seen, "publish_article", {**args, APPROVAL_ARG: approval_id})
    assert refusal(again)["code"] != "approval_pending" and "publish_key" not in seen, again
    other = call(governor(d), seen, "publish_article", {"article_id": 8, APPROVAL_ARG: approval_id})
    assert refusal(other)["approval_id"] is None and "publish_key" not in seen, other


def test_cancelled_call_is_released_as_cancelled(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    d.start()
    seen: dict[str, Any] = {"started": anyio.Event()}

    async def cancel_midway(client: Client) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.call_tool, "list_articles", {"query": "slow"})
            await seen["started"].wait()
            tg.cancel_scope.cancel()

    session(governor(d), seen, cancel_midway)
    [event] = tool_calls(d)
    assert event["result"]["status"] == "cancelled", event
    assert event["lease_id"] == seen["lease_id"]


def test_pydantic_model_argument_is_digested_as_sent(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    d.start()
    seen: dict[str, Any] = {}
    args = {"title": "t", "filter": {"section": "news", "tags": ["ai"]}}
    result = call(governor(d), seen, "create_article", args)
    assert not result.is_error, result
    assert seen["filter"] == Filter(section="news", tags=["ai"], limit=10)
    assert isinstance(seen["ctx"], Context)  # the tool's own Context still arrives
    [event] = tool_calls(d)
    assert event["arguments"] == args  # not the model's defaults (limit=10)
    [authorized] = d.events_of("mcp.authorize")
    assert authorized["arguments"] == args


def test_withheld_result_is_replaced_by_a_tool_error(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    limits(d, "list_articles", max_result_size_kb=1)
    d.start()
    seen: dict[str, Any] = {}
    result = call(governor(d), seen, "list_articles", {"query": "big"})
    info = refusal(result)
    assert info["code"] == "result_withheld", info
    assert "x" * 100 not in json.dumps(result.model_dump(mode="json"))
    assert "withheld" in result.content[0].text
    [event] = tool_calls(d)
    assert event["result"]["withheld"] is True and event["result"]["result_size_bytes"] == 4096
    # A small result of the same tool is returned.
    ok = call(governor(d), seen, "list_articles", {"query": "ai"})
    assert not ok.is_error, ok


def test_tool_schema_offers_the_approval_argument_and_hides_the_context(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    seen: dict[str, Any] = {}

    async def listing(client: Client) -> Any:
        return {t.name: t.input_schema for t in (await client.list_tools()).tools}

    schemas = session(governor(d), seen, listing)
    assert set(schemas) == {"list_articles", "create_article", "publish_article"}
    for schema in schemas.values():
        assert APPROVAL_ARG in schema["properties"] and APPROVAL_ARG not in schema.get("required", [])
        assert "sidekey_ctx" not in schema["properties"] and "ctx" not in schema["properties"]
    assert schemas["list_articles"]["required"] == ["query"]


# ------------------------------------------------------------ stdio and streamable HTTP

SERVER_SCRIPT = Path(__file__).with_name("mcp_governed_server.py")


def server_env(d: Daemon, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SIDEKEY_SOCKET": d.socket,
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), **extra}


def test_stdio_server_subprocess(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    d.start()
    params = StdioServerParameters(
        command=sys.executable, args=[str(SERVER_SCRIPT), "stdio"],
        env=server_env(d, SIDEKEY_TEST_USER_TOKEN=d.user_token("content-api")))

    async def main() -> Any:
        async with Client(params) as client:
            return await client.call_tool("list_articles", {"query": "ai"})

    result = run(main)
    assert not result.is_error, result
    body = json.loads(result.content[0].text)
    assert body["key_tail"] == d.secrets["content-api/read-key"][-6:]
    [event] = tool_calls(d)
    assert event["arguments"] == {"query": "ai"} and event["session_id"].startswith("proc-")
    assert event["agent_id"] == "content-writer" and event["result"]["status"] == "success"


@contextlib.contextmanager
def http_server(d: Daemon, *flags: str) -> Iterator[str]:
    port = free_port()
    with http_mcp_server([sys.executable, str(SERVER_SCRIPT), "http", str(port), *flags],
                         port=port, env=server_env(d, SIDEKEY_TEST_JWKS=str(d.issuer_jwks)),
                         log_path=d.root / f"mcp-http-{port}.log") as url:
        yield url



def http_call(url: str, token: str, mode: str, arguments: dict[str, Any]) -> Any:
    async def main() -> Any:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                      timeout=30) as http:
            transport = streamable_http_client(url, http_client=http)
            async with Client(transport, mode=mode) as client:  # type: ignore[arg-type]
                return await client.call_tool("list_articles", arguments)

    return run(main)


@pytest.mark.parametrize("stateless", [False, True], ids=["sessions", "stateless"])
def test_streamable_http_with_bearer_auth(make_daemon: Any, stateless: bool) -> None:
    d: Daemon = make_daemon()
    d.start()
    token = d.user_token("content-api", extra={"azp": "content-writer", "client_id": "cw-1"})
    with http_server(d, *(["--stateless"] if stateless else [])) as url:
        result = http_call(url, token, "legacy", {"query": "ai"})
        assert not result.is_error, result
        assert json.loads(result.content[0].text)["key_tail"] == \
            d.secrets["content-api/read-key"][-6:]
        # A token for another agent (azp) is that agent, whatever the client says.
        other = d.user_token("content-api", extra={"azp": "sales-assistant"})
        denied = http_call(url, other, "legacy", {"query": "ai", "agent_id": "content-writer"})
        assert refusal(denied)["code"], denied
    [event] = tool_calls(d)
    assert event["agent_id"] == "content-writer" and event["user_id"] == "alice"
    assert event["arguments"] == {"query": "ai"}
    if stateless:
        # No Mcp-Session-Id: one session per access token (a hash, not the token).
        assert event["session_id"].startswith("tok-"), event
    else:
        assert not event["session_id"].startswith(("tok-", "proc-")), event


# ------------------------------------------------------------ elicitation on a held call


@pytest.mark.parametrize("verdict", ["approve", "deny", "decline"])
@pytest.mark.parametrize("mode", ["legacy", "auto"], ids=["elicitation-request", "input-required"])
def test_held_call_asks_through_elicitation_and_waits_for_the_approver(
    make_daemon: Any, verdict: str, mode: str,
) -> None:
    """legacy: the handshake-era protocol, where the server sends elicitation/create
    while the call is open; auto: 2026-07-28, where the tool answers with an
    InputRequiredResult and the client retries the call with the user's answer."""
    d: Daemon = make_daemon()
    limits(d, "publish_article", requires_human_approval=True)
    d.start()
    seen: dict[str, Any] = {}
    asked: list[str] = []

    def decide(approval_id: str) -> None:
        with SyncClient(d.socket) as approver:  # an approver, elsewhere, meanwhile
            if verdict == "approve":
                approver.approve(approval_id)
            else:
                approver.deny(approval_id, reason="not today")

    async def on_elicit(context: Any, params: Any) -> Any:
        asked.append(params.message)
        if verdict == "decline":
            return ElicitResult(action="decline")
        approval_id = params.message.split("approval id ")[1].split(")")[0]
        await anyio.to_thread.run_sync(decide, approval_id)
        return ElicitResult(action="accept", content={"wait": True})

    async def main() -> Any:
        gov = governor(d, approval_wait_s=30)
        try:
            async with Client(build(gov, seen), elicitation_callback=on_elicit,
                              mode=mode) as client:
                return await client.call_tool("publish_article", {"article_id": 7})
        finally:
            await gov.client.close()

    result = run(main)
    assert len(asked) == 1 and "apr_" in asked[0], asked
    assert len(d.events_of("approval.requested")) == 1  # the retry opened no new hold
    if verdict == "approve":
        assert not result.is_error, result
        assert seen["publish_key"] == d.secrets["content-api/publish-key"]
        [event] = tool_calls(d)
        assert event["result"]["status"] == "success"
    else:
        code = refusal(result)["code"]
        assert code == ("approval_denied" if verdict == "deny" else "approval_pending"), result
        assert "publish_key" not in seen


# ------------------------------------------------------------ the previous SDK major (1.x)

MCP1_VENV = Path(os.environ.get("SIDEKEY_TEST_MCP1_VENV", "/tmp/sidekey-test-mcp1-venv"))


@pytest.fixture(scope="session")
def mcp1_python() -> str:
    """A venv with mcp 1.x (FastMCP) and the client's own dependencies, made once (the
    test venv has 2.x). Without network access it cannot be made: skipped, except under
    CI, where that is a failure."""
    python = MCP1_VENV / "bin" / "python"
    probe = [str(python), "-c", "import mcp.server.fastmcp, msgspec, h11"]
    if not python.exists() or subprocess.run(probe, capture_output=True).returncode != 0:
        try:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(MCP1_VENV)],
                           check=True, capture_output=True, timeout=120)
            subprocess.run([str(python), "-m", "pip", "install", "-q", "mcp>=1.9,<2",
                            "msgspec>=0.18", "h11>=0.14", "anyio>=4"],
                           check=True, capture_output=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            if os.environ.get("CI") == "true":
                raise
            pytest.skip(f"cannot build an mcp 1.x venv here: {exc}")
    return str(python)


def test_previous_sdk_major_fastmcp_over_stdio(make_daemon: Any, mcp1_python: str) -> None:
    d: Daemon = make_daemon()
    limits(d, "publish_article", requires_human_approval=True)
    d.start()
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = server_env(d, SIDEKEY_TEST_USER_TOKEN=d.user_token("content-api"))
    env["PYTHONPATH"] = src
    params = StdioServerParameters(command=mcp1_python, args=[str(SERVER_SCRIPT), "stdio"],
                                   env=env)
    model = {"title": "t", "filter": {"section": "news"}}

    async def main() -> Any:
        async with Client(params, mode="legacy") as client:
            version = client.server_info
            allowed = await client.call_tool("list_articles", {"query": "ai"})
            created = await client.call_tool("create_article", model)
            held = await client.call_tool("publish_article", {"article_id": 7})
            approval_id = held.structured_content and held.structured_content.get("approval_id")
            if not approval_id:  # a structured-output tool under 1.x: the id is in the text
                approval_id = held.content[0].text.split("approval id ")[1].split(";")[0]
            with SyncClient(d.socket) as approver:
                await anyio.to_thread.run_sync(approver.approve, approval_id)
            retried = await client.call_tool("publish_article",
                                             {"article_id": 7, APPROVAL_ARG: approval_id})
            return version, allowed, created, held, retried

    version, allowed, created, held, retried = run(main)
    assert version is not None and version.version.startswith("1."), version
    assert not allowed.is_error, allowed
    assert json.loads(allowed.content[0].text)["key_tail"] == d.secrets["content-api/read-key"][-6:]
    assert not created.is_error, created
    assert held.is_error and "held for human approval" in held.content[0].text, held
    assert not retried.is_error, retried
    assert json.loads(retried.content[0].text)["key_tail"] == \
        d.secrets["content-api/publish-key"][-6:]
    events = {e["tool"]: e for e in tool_calls(d, 3)}
    assert set(events) == {"list_articles", "create_article", "publish_article"}
    assert events["list_articles"]["arguments"] == {"query": "ai", "page": 1}
    # 1.x keeps no raw arguments where a tool can read them: the validated ones, as
    # JSON (defaults included); the same at authorize and redeem (one request).
    assert events["create_article"]["arguments"] == {
        "title": "t", "filter": {"section": "news", "tags": [], "limit": 10}}
    assert events["publish_article"]["arguments"] == {"article_id": 7, "channel": "web"}


def test_tool_failures_are_the_tools_own_and_released_as_error(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    d.start()
    seen: dict[str, Any] = {}

    async def both(client: Client) -> Any:
        return (await client.call_tool("list_articles", {"query": "fail"}),
                await client.call_tool("list_articles", {"query": "error-result"}))

    raised, returned = session(governor(d), seen, both)
    assert raised.is_error and "the CMS is down" in raised.content[0].text, raised
    assert returned.is_error and returned.content[0].text == "no such page", returned
    statuses = [(e["result"]["status"], e["result"].get("error")) for e in tool_calls(d, 2)]
    assert statuses == [("error", "ToolError"), ("error", "ToolReturnedError")], statuses


def test_concurrent_sessions_counted_without_mcp_session_id(make_daemon: Any) -> None:
    """Stateless requests: one session per access token (its jti), so a user's second
    token is a second session, and the same token is the same session."""
    d: Daemon = make_daemon()
    path = d.root / "rate-limits.yaml"
    data = yaml.safe_load(path.read_text())
    data["limits"]["per_user"]["concurrent_sessions"] = 1
    path.write_text(yaml.safe_dump(data))
    d.start()
    results = []
    for jti in ["first", "first", "second"]:
        token = d.user_token("content-api", extra={"azp": "content-writer", "jti": jti})
        verified = AccessToken(token=token, client_id="c", scopes=[], subject="alice",
                               claims={"azp": "content-writer", "jti": jti,
                                       "iss": "https://auth.example.com"})
        reset = auth_context_var.set(AuthenticatedUser(verified))
        try:
            results.append(call(Governor(AsyncClient(d.socket)), {}, "list_articles",
                                {"query": "ai"}))
        finally:
            auth_context_var.reset(reset)
    assert not results[0].is_error and not results[1].is_error, results
    assert refusal(results[2])["code"] == "rate_limited", results[2]


def test_sync_and_async_tool_call_take_the_approval_id(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    limits(d, "publish_article", requires_human_approval=True)
    d.start()
    token = d.user_token("content-api")
    kw: dict[str, Any] = dict(user_token=token, agent_id="content-writer", session_id="s1",
                              arguments={"article_id": 7})
    with SyncClient(d.socket) as sk:
        with pytest.raises(ApprovalPending) as held, sk.tool_call("content-api", "publish_article", **kw):
            pass
        approval_id = held.value.approval_id
        sk.approve(approval_id)
        with sk.tool_call("content-api", "publish_article", approval_id=approval_id, **kw) as lease:
            assert lease.secrets["CONTENT_API_KEY"] == d.secrets["content-api/publish-key"]

    async def async_side() -> None:
        async with AsyncClient(d.socket) as ak:
            with pytest.raises(ApprovalPending) as again:
                async with ak.tool_call("content-api", "publish_article", **kw):
                    pass
            await ak.approve(again.value.approval_id)
            async with ak.tool_call("content-api", "publish_article",
                                    approval_id=again.value.approval_id, **kw) as lease:
                assert lease.secrets["CONTENT_API_KEY"] == d.secrets["content-api/publish-key"]

    run(async_side)
    assert [e["result"]["status"] for e in tool_calls(d, 2)] == ["success", "success"]
