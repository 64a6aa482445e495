"""examples/mcp-content-api: the example server, run as its author would run it (a
subprocess, stdio via its run.sh, or streamable HTTP with and without sessions), next
to a quickstart daemon, driven by the MCP Python SDK's own client.

The example's fake upstreams are given the SHA-256 of the daemon's secrets
($FAKE_UPSTREAM_KEYS): a tool result from them proves the call used the leased secret
of the right role. Every MCP exchange runs under asyncio with a bound.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx2
import pytest
import yaml
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from harness import ROOT, Daemon, free_port, http_mcp_server
from sidekey.mcp import APPROVAL_ARG
from test_mcp_governed import limits, run  # one bounded runner and limits editor for both

pytestmark = pytest.mark.integration

EXAMPLE = ROOT / "examples" / "mcp-content-api"
SERVER = EXAMPLE / "server.py"
RUN_SH = EXAMPLE / "run.sh"
TIMEOUT_S = 60.0


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def env(d: Daemon, **extra: str) -> dict[str, str]:
    """The server's environment: the daemon's socket, this interpreter and source tree
    (absolute paths), and the fingerprints of the secrets the upstreams accept."""
    keys = {"read": "content-api/read-key", "write": "content-api/write-key",
            "publish": "content-api/publish-key", "analytics": "analytics-db/readonly-dsn"}
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p),
        "SIDEKEY_SOCKET": d.socket,
        "FAKE_UPSTREAM_KEYS": ",".join(f"{role}={sha(d.secrets[name])}"
                                       for role, name in keys.items()),
        "FAKE_UPSTREAM_LOG": str(d.root / "upstream.log"),
        **extra,
    }


def stdio(d: Daemon, server: str = "content-api", **extra: str) -> StdioServerParameters:
    """The one command of the example's README: run.sh stdio SERVER."""
    token = d.user_token(server)
    return StdioServerParameters(command="sh", args=[str(RUN_SH), "stdio", server],
                                 env=env(d, SIDEKEY_USER_TOKEN=token, **extra))


@contextlib.contextmanager
def http_server(d: Daemon, *flags: str) -> Iterator[str]:
    port = free_port()
    with http_mcp_server([sys.executable, str(SERVER), "--transport", "http",
                          "--port", str(port), *flags], port=port, env=env(d),
                         log_path=d.root / f"mcp-example-{port}.log",
                         what="the example server") as url:
        yield url



@contextlib.asynccontextmanager
async def http_client(url: str, token: str, mode: str = "legacy") -> Any:
    """The SDK's client with a bearer token. legacy: the handshake-era protocol (with
    Mcp-Session-Id unless the server is stateless); auto (the SDK's default): the
    2026-07-28 revision, which has no sessions."""
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                  timeout=30) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode) as client:  # type: ignore[arg-type]
            yield client


def calls(target: Any, *steps: tuple[str, dict[str, Any]], token: str | None = None,
          mode: str = "legacy") -> list[Any]:
    """Call the tools in order in one MCP session (stdio params, or an HTTP URL)."""
    async def main() -> list[Any]:
        async with contextlib.AsyncExitStack() as stack:
            if isinstance(target, str):
                assert token is not None
                client = await stack.enter_async_context(http_client(target, token, mode))
            else:
                client = await stack.enter_async_context(Client(target))
            return [await client.call_tool(tool, arguments) for tool, arguments in steps]

    return list(run(main))


def ok(result: Any) -> Any:
    assert not result.is_error, result
    text = result.content[0].text
    return json.loads(text) if text.startswith(("{", "[")) else text


def refusal(result: Any) -> dict[str, Any]:
    assert result.is_error, result
    structured: dict[str, Any] = result.structured_content
    assert set(structured) >= {"code", "retry_after_s", "approval_id"}, structured
    return structured


def tool_calls(d: Daemon, count: int = 1) -> list[dict[str, Any]]:
    return d.wait_events("mcp.tool_call", count)


def upstream_log(d: Daemon) -> list[str]:
    """The requests the fake upstreams accepted (with the right key for their role)."""
    path = d.root / "upstream.log"
    return path.read_text().splitlines() if path.exists() else []


def wait_upstream(d: Daemon, line: str) -> None:
    """Until the upstream has accepted this request (a guard against a hang only)."""
    deadline = time.monotonic() + TIMEOUT_S
    while line not in upstream_log(d):
        assert time.monotonic() < deadline, upstream_log(d)
        time.sleep(0.02)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("transport", ["stdio", "http-sessions", "http-stateless", "http-2026"])
def test_allowed_call_uses_the_leased_secret(make_daemon: Any, transport: str) -> None:
    d: Daemon = make_daemon()
    d.start()
    step = ("list_articles", {"query": "hello"})
    if transport == "stdio":
        [result] = calls(stdio(d), step)
    else:
        token = d.user_token("content-api", extra={"azp": "content-writer"})
        flags = ["--stateless"] if transport == "http-stateless" else []
        with http_server(d, *flags) as url:
            [result] = calls(url, step, token=token,
                             mode="auto" if transport == "http-2026" else "legacy")
    # The fake CMS answered: it was handed the secret whose fingerprint it knows.
    assert [a["id"] for a in ok(result)["articles"]] == [1]
    assert upstream_log(d) == ["list accepted read key"]
    [event] = tool_calls(d)
    assert event["server"] == "content-api" and event["tool"] == "list_articles"
    assert event["agent_id"] == "content-writer" and event["user_id"] == "alice"
    assert event["arguments"] == {"query": "hello"}  # as sent: no SDK defaults
    assert event["result"]["status"] == "success"
    if transport == "stdio":
        assert event["session_id"].startswith("proc-")
    elif transport in ("http-stateless", "http-2026"):
        # No Mcp-Session-Id: one session per access token (a hash, not the token).
        assert event["session_id"].startswith("tok-")
    else:
        assert not event["session_id"].startswith(("tok-", "proc-"))
    assert d.secrets["content-api/read-key"].encode() not in (d.root / "daemon.log").read_bytes()


def test_the_upstream_refuses_any_other_key(make_daemon: Any) -> None:
    """The proof above is only a proof if the fake CMS checks: with other fingerprints
    it refuses the leased key, and the call is the tool's error, released as such."""
    d: Daemon = make_daemon()
    d.start()
    params = stdio(d, FAKE_UPSTREAM_KEYS=f"read={sha('some other key')}")
    [result] = calls(params, ("list_articles", {"query": "hello"}))
    assert result.is_error and "upstream refused" in result.content[0].text, result
    assert d.secrets["content-api/read-key"] not in result.content[0].text
    assert upstream_log(d) == []
    [event] = tool_calls(d)
    assert event["result"]["status"] == "error"


def test_denial_is_a_model_readable_tool_error(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    d.start()
    # stdio, launched for an agent the seed denies content-api.
    [denied] = calls(stdio(d, SIDEKEY_AGENT_ID="sales-assistant"),
                     ("list_articles", {"query": "hello"}))
    info = refusal(denied)
    assert info["code"] == "agent_denied_server", info
    assert info["retry_after_s"] is None and info["approval_id"] is None
    text = denied.content[0].text
    assert text.startswith("denied (agent_denied_server)") and "do not retry" in text, text
    assert d.socket not in text and "Traceback" not in text
    # http: the agent is the token's azp, whatever the arguments say.
    token = d.user_token("content-api", extra={"azp": "sales-assistant"})
    with http_server(d) as url:
        [other] = calls(url, ("list_articles", {"query": "hello", "agent_id": "content-writer"}),
                        token=token)
    assert refusal(other)["code"] == "agent_denied_server", other
    assert d.events_of("mcp.tool_call") == []
    assert [e["policy"]["decision"] for e in d.events_of("mcp.authorize")] == ["deny", "deny"]


def test_rate_limit_carries_retry_after(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    limits(d, "create_article", requests_per_minute=1)
    d.start()
    draft = {"draft": {"title": "Q3 plan"}}
    first, second = calls(stdio(d), ("create_article", draft), ("create_article", draft))
    assert ok(first)["status"] == "draft"
    info = refusal(second)
    assert info["code"] == "rate_limited", info
    assert isinstance(info["retry_after_s"], int) and 1 <= info["retry_after_s"] <= 60, info
    assert second.content[0].text == f"rate limited: retry in {info['retry_after_s']} s (rate_limited)"


def test_held_call_is_approved_with_the_cli_and_retried_with_its_approval_id(
    make_daemon: Any,
) -> None:
    d: Daemon = make_daemon()
    limits(d, "publish_article", requires_human_approval=True)
    d.start()
    args = {"article_id": 2}

    async def main() -> tuple[Any, Any, Any]:
        async with Client(stdio(d)) as client:
            held = await client.call_tool("publish_article", args)
            approval_id = refusal(held)["approval_id"]
            early = await client.call_tool("publish_article", {**args, APPROVAL_ARG: approval_id})
            # The approver, with the CLI (approver tier: root here).
            approve = [sys.executable, "-m", "sidekey", "approvals", "approve", approval_id,
                       "--socket", d.socket, "--reason", "the Q2 update is public"]
            done = await anyio.run_process(approve, check=False, env={
                **os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)})
            assert done.returncode == 0, done.stderr
            retried = await client.call_tool("publish_article", {**args, APPROVAL_ARG: approval_id})
            return held, early, retried

    held, early, retried = run(main)
    info = refusal(held)
    assert info["code"] == "approval_pending" and info["approval_id"].startswith("apr_"), info
    text = held.content[0].text
    assert info["approval_id"] in text and APPROVAL_ARG in text, text
    assert refusal(early)["code"] == "approval_pending"  # no verdict yet: nothing ran
    assert upstream_log(d) == ["publish accepted publish key"]  # only the approved retry
    assert ok(retried) == {"id": 2, "title": "Q2 product update", "section": "announcements",
                           "tags": ["product"], "status": "published"}
    [requested] = d.events_of("approval.requested")  # the retries opened no new hold
    assert requested["arguments"] == args
    [event] = tool_calls(d)
    assert event["tool"] == "publish_article" and event["arguments"] == args
    assert event["result"]["status"] == "success"


def test_cancelled_call_is_released_as_cancelled(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    d.start()

    async def main() -> list[dict[str, Any]]:
        async with Client(stdio(d, FAKE_UPSTREAM_DELAY_S="600")) as client:
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "list_articles", {"query": "hello"})
                # The tool is running: the upstream accepted its leased key.
                await anyio.to_thread.run_sync(wait_upstream, d, "list accepted read key")
                tg.cancel_scope.cancel()  # the client sends notifications/cancelled
            # Still connected: the server releases the lease as cancelled.
            return await anyio.to_thread.run_sync(tool_calls, d)

    [event] = run(main)
    assert event["tool"] == "list_articles" and event["result"]["status"] == "cancelled", event


def test_withheld_result_is_replaced_by_a_tool_error(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    limits(d, "query_metrics", max_result_size_kb=1)
    d.start()
    big, small = calls(stdio(d, "analytics-db"),
                       ("query_metrics", {"query": {"days": 90}}),
                       ("query_metrics", {"query": {"days": 1, "section": "news"}}))
    info = refusal(big)
    assert info["code"] == "result_withheld", info
    assert "withheld" in big.content[0].text and "page_views" not in big.content[0].text
    assert [r["section"] for r in ok(small)["rows"]] == ["news"]
    first, second = tool_calls(d, 2)
    assert first["result"]["withheld"] is True and first["result"]["result_size_bytes"] > 1024
    assert second["result"]["status"] == "success" and not second["result"].get("withheld")


def test_pydantic_arguments_are_digested_as_sent(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    d.start()
    draft = {"draft": {"title": "Q3 plan", "tags": ["ai"]}}
    [created] = calls(stdio(d), ("create_article", draft))
    # The model got the SDK's defaults (body, section) filled in...
    assert ok(created) == {"id": 3, "title": "Q3 plan", "body": "", "section": "news",
                           "tags": ["ai"], "status": "draft"}
    # ...the daemon authorized and logged exactly what the client sent.
    [authorized] = d.events_of("mcp.authorize")
    [event] = tool_calls(d)
    assert authorized["arguments"] == draft and event["arguments"] == draft
    # An invalid model is the SDK's validation error, before sidekey is asked.
    [bad] = calls(stdio(d), ("create_article", {"draft": {"title": ""}}))
    assert bad.is_error, bad
    assert len(d.events_of("mcp.authorize")) == 1


def test_analytics_db_over_http_with_its_own_audience(make_daemon: Any) -> None:
    """The second seed server: a token for content-api is refused there (lateral
    movement); one for analytics-db reads metrics with the read-only DSN; export_report
    is not granted to content-writer."""
    d: Daemon = make_daemon()
    d.start()
    wrong = d.user_token("content-api", extra={"azp": "content-writer"})
    right = d.user_token("analytics-db", extra={"azp": "content-writer"})
    query = {"query": {"days": 1}}
    with http_server(d, "--server", "analytics-db") as url:
        with pytest.raises(Exception):  # noqa: B017 - the SDK's 401, whatever its class
            calls(url, ("query_metrics", query), token=wrong)
        rows, export = calls(url, ("query_metrics", query), ("export_report", query),
                             token=right)
    assert len(ok(rows)["rows"]) == 4
    assert refusal(export)["code"] == "agent_not_granted", export
    [event] = tool_calls(d)
    assert event["server"] == "analytics-db" and event["arguments"] == query


# ------------------------------------------------------------ the previous SDK major (1.x)

from test_mcp_governed import mcp1_python  # noqa: E402, F401 - the fixture: a 1.x venv


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_the_same_server_on_the_previous_sdk_major(
    make_daemon: Any, mcp1_python: str, transport: str,  # noqa: F811
) -> None:
    """server.py unchanged on mcp 1.x (FastMCP): the leased secret reaches the fake CMS,
    a held call is approved with the CLI and retried with its approval id."""
    d: Daemon = make_daemon()
    limits(d, "publish_article", requires_human_approval=True)
    d.start()
    only_src = {"PYTHON": mcp1_python, "PYTHONPATH": str(ROOT / "src")}
    args = {"article_id": 2}

    async def session(client: Client) -> tuple[Any, Any, Any, Any]:
        version = client.server_info
        allowed = await client.call_tool("list_articles", {"query": "hello"})
        held = await client.call_tool("publish_article", args)
        # 1.x reports a refusal of a tool with an output schema as text only.
        approval_id = held.content[0].text.split("approval id ")[1].split(";")[0]
        approve = [sys.executable, "-m", "sidekey", "approvals", "approve", approval_id,
                   "--socket", d.socket]
        done = await anyio.run_process(approve, check=False, env={
            **os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in sys.path if p)})
        assert done.returncode == 0, done.stderr
        retried = await client.call_tool("publish_article", {**args, APPROVAL_ARG: approval_id})
        return version, allowed, held, retried

    if transport == "stdio":
        params = stdio(d)
        params.env = {**(params.env or {}), **only_src}

        async def main() -> Any:
            async with Client(params, mode="legacy") as client:
                return await session(client)
    else:
        port = free_port()
        log_path = d.root / "mcp1.log"
        log = log_path.open("wb")
        proc = subprocess.Popen([mcp1_python, str(SERVER), "--transport", "http", "--port",
                                 str(port)], env={**env(d), **only_src}, stdout=log, stderr=log)
        token = d.user_token("content-api", extra={"azp": "content-writer"})

        async def main() -> Any:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, log_path.read_text()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the 1.x server did not start"
                    await anyio.sleep(0.1)
            async with http_client(f"http://127.0.0.1:{port}/mcp", token) as client:
                return await session(client)

    try:
        version, allowed, held, retried = run(main)
    finally:
        if transport == "http":
            proc.terminate()
            proc.wait(10)
            log.close()
    assert version.version.startswith("1."), version
    assert [a["id"] for a in ok(allowed)["articles"]] == [1]
    assert held.is_error and "held for human approval" in held.content[0].text, held
    assert ok(retried)["status"] == "published"
    events = tool_calls(d, 2)
    assert [e["result"]["status"] for e in events] == ["success", "success"]
    assert {e["agent_id"] for e in events} == {"content-writer"}


@pytest.mark.parametrize("mode", ["sessions", "stateless"])
def test_concurrent_sessions_are_counted_with_and_without_mcp_session_id(
    make_daemon: Any, mode: str,
) -> None:
    """concurrent_sessions: 1. With sessions, a second open MCP session of the same user
    is refused while the first is open; without (stateless), the session is the access
    token: the same token again is the same session, another token is a second one."""
    d: Daemon = make_daemon()
    path = d.root / "rate-limits.yaml"
    data = yaml.safe_load(path.read_text())
    data["limits"]["per_user"]["concurrent_sessions"] = 1
    path.write_text(yaml.safe_dump(data))
    d.start()
    first = d.user_token("content-api", extra={"azp": "content-writer"})
    second = d.user_token("content-api", extra={"azp": "content-writer"})  # another jti
    step = ("list_articles", {"query": "hello"})

    async def main(url: str) -> list[Any]:
        async with http_client(url, first) as a:
            results = [await a.call_tool(*step)]
            if mode == "sessions":
                async with http_client(url, first) as b:  # same token, a new session
                    results.append(await b.call_tool(*step))
            else:
                async with http_client(url, first) as b:  # same token: same session
                    results.append(await b.call_tool(*step))
                async with http_client(url, second) as c:
                    results.append(await c.call_tool(*step))
            return results

    with http_server(d, *(["--stateless"] if mode == "stateless" else [])) as url:
        results = run(lambda: main(url))
    ok(results[0])
    if mode == "sessions":
        assert refusal(results[1])["code"] == "rate_limited", results[1]
    else:
        ok(results[1])
        assert refusal(results[2])["code"] == "rate_limited", results[2]
    # The only limit that can refuse here (the harness lifts every other one).
    [refused] = [e for e in d.events_of("mcp.authorize") if e["policy"]["decision"] != "allow"]
    assert refused["policy"]["code"] == "rate_limited"
