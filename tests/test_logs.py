"""Issue 15 item 3: the daemon's own log (``log.format: json|text``, request fields on
every line, journald priority prefixes) and the W3C ``traceparent`` an MCP server sends,
carried into the call's audit events as ``trace_id`` (and into CEF/ECS), against real
daemons."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from harness import Daemon, UnixHTTPConnection
from sidekey import cli, logs, tracecontext
from sidekey.client import AsyncClient, Client, TransportRequest, TransportResponse

pytestmark = pytest.mark.timeout(120)

SIDEKEY = [sys.executable, "-m", "sidekey"]
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"
# Each is ignored by the daemon (no trace_id) and the call goes on.
MALFORMED = [
    f"00-{TRACE.upper()}-00f067aa0ba902b7-01",  # uppercase hex
    f"00-{'0' * 32}-00f067aa0ba902b7-01",  # all-zero trace-id
    f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent-id
    f"00-{TRACE[:-1]}-00f067aa0ba902b7-01",  # short trace-id
    f"00-{TRACE}-00f067aa0ba902b7-01-extra",  # version 00 has nothing after the flags
    f"ff-{TRACE}-00f067aa0ba902b7-01",  # version ff is invalid
    f"00-{TRACE}-00f067aa0ba902b7",  # no flags
    "garbage",
    "",
]
TEXT_LINE = re.compile(r"sidekey\[\d+\] (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
LEVEL_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


def request(d: Daemon, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """``Daemon.request`` with extra headers."""
    conn = UnixHTTPConnection(d.socket, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data,
                     headers={"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else {}
    finally:
        conn.close()


def authorize_body(d: Daemon, tool: str = "create_article", **kw: Any) -> dict[str, Any]:
    return {"server": "content-api", "tool": tool, "agent_id": "content-writer",
            "session_id": "s1", "arguments": {"title": "hello"},
            "user_token": d.user_token("content-api"), **kw}


def json_lines(d: Daemon) -> list[dict[str, Any]]:
    """Every line of the daemon's log, each parsed as one JSON object (fails otherwise)."""
    out = []
    for line in d.log().splitlines():
        obj = json.loads(line)
        assert isinstance(obj, dict), line
        for key in ("ts", "level", "logger", "message", "pid"):
            assert key in obj, (key, line)
        out.append(obj)
    return out


# --------------------------------------------------------------------------- JSON log


@pytest.mark.integration
def test_json_log_every_line_parses_and_carries_its_request(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"log": {"format": "json"}})
    d.start()
    status, auth = d.authorize()
    assert status == 200, auth
    status, lease = d.request("POST", "/v1/redeem", {"resolution_token": auth["resolution_token"]})
    assert status == 200, lease
    status, rel = d.request("POST", "/v1/release", {"lease_id": lease["lease_id"],
                                                    "status": "success", "duration_ms": 3})
    assert status == 200, rel
    status, refused = d.request("POST", "/v1/redeem", {"resolution_token": "a.b.c"})
    assert status == 401, refused
    status, denied = d.authorize(tool="no_such_tool")
    assert status >= 400, denied
    assert d.stop() == 0
    lines = json_lines(d)
    by_request: dict[str, list[dict[str, Any]]] = {}
    for obj in lines:
        if "request_id" in obj:
            by_request.setdefault(obj["request_id"], []).append(obj)
    # One sidekey.request line per request, with the request's facts.
    expected = [
        (auth["request_id"], "/v1/authorize", 200, "ok", "create_article"),
        (lease["request_id"], "/v1/redeem", 200, "ok", "create_article"),
        (rel["request_id"], "/v1/release", 200, "ok", "create_article"),
        (refused["error"]["request_id"], "/v1/redeem", 401, refused["error"]["code"], None),
        (denied["error"]["request_id"], "/v1/authorize", status, denied["error"]["code"],
         "no_such_tool"),
    ]
    for rid, path, code_status, code, tool in expected:
        [line] = [o for o in by_request[rid] if o["logger"] == logs.REQUEST_LOGGER]
        assert (line["path"], line["status"], line["code"], line.get("tool")) == \
            (path, code_status, code, tool), line
        assert line["level"] == "info" and line["method"] == "POST"
        assert line.get("server") == ("content-api" if tool else None), line
        assert isinstance(line["duration_ms"], float | int)
        assert "trace_id" not in line  # none was sent
    # A line another module wrote while handling the authorize (the issuer's key set,
    # loaded at the first call) carries that request too: the context reaches it.
    oauth = [o for o in lines if o["logger"] == "sidekey.oauth"]
    assert oauth and all(o.get("request_id") == auth["request_id"] for o in oauth), oauth
    assert oauth[0]["server"] == "content-api" and oauth[0]["tool"] == "create_article"
    # Lines outside a request carry none of its fields.
    started = [o for o in lines if "listening on" in o["message"]]
    assert started and "request_id" not in started[0] and started[0]["level"] == "info"


@pytest.mark.integration
def test_text_log_is_unchanged_by_default(daemon: Daemon) -> None:
    status, auth = daemon.authorize()
    assert status == 200, auth
    assert daemon.request("POST", "/v1/redeem", {"resolution_token": "a.b.c"})[0] == 401
    assert daemon.stop() == 0
    text = daemon.log()
    assert "listening on" in text
    for line in text.splitlines():
        # Every line as before: no JSON, no journal prefix, no per-request lines.
        assert TEXT_LINE.match(line) or line.startswith((" ", "Traceback")), line
    assert logs.REQUEST_LOGGER + ":" not in text


@pytest.mark.integration
def test_request_lines_can_be_switched(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"log": {"format": "text", "requests": True}})
    d.start()
    assert d.authorize()[0] == 200
    assert d.stop() == 0
    assert f"INFO {logs.REQUEST_LOGGER}: POST /v1/authorize 200 ok" in d.log()
    d2: Daemon = make_daemon({"log": {"format": "json", "requests": False}})
    d2.start()
    assert d2.authorize()[0] == 200
    assert d2.stop() == 0
    assert not [o for o in json_lines(d2) if o["logger"] == logs.REQUEST_LOGGER]


# --------------------------------------------------------------------------- journald


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_journal_stream_gets_syslog_priority_prefixes(make_daemon: Any, fmt: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # systemd sets JOURNAL_STREAM to the device:inode of the stream it connected to
    # stderr (systemd.exec(5)); here stderr is the harness's log file, so that file
    # stands for the journal's stream.
    d: Daemon = make_daemon({"log": {"format": fmt}})
    d.log_path.touch()
    st = os.stat(d.log_path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    d.start()
    assert d.authorize()[0] == 200
    assert d.request("POST", "/v1/redeem", {"resolution_token": "a.b.c"})[0] == 401
    assert d.stop() == 0
    seen = set()
    for line in d.log().splitlines():
        m = re.match(r"<(\d)>(.*)", line)
        assert m, line
        priority, rest = int(m[1]), m[2]
        if fmt == "json":
            obj = json.loads(rest)
            assert obj["PRIORITY"] == str(priority) and obj["SYSLOG_IDENTIFIER"] == "sidekey"
            level = obj["level"].upper()
        else:
            tm = TEXT_LINE.match(rest)
            if tm is None:  # a traceback's continuation line: prefixed all the same
                continue
            level = tm[1]
        assert priority == LEVEL_PRIORITY[level], line
        seen.add(level)
    assert {"DEBUG", "INFO", "WARNING"} <= seen, seen


@pytest.mark.integration
def test_inherited_journal_stream_of_another_fd_gets_no_prefix(
        make_daemon: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The variable was inherited but stderr points elsewhere (redirected by a wrapper):
    # the lines are not the journal's, so no prefix.
    d: Daemon = make_daemon()
    other = d.root / "not-the-log"
    other.touch()
    st = os.stat(other)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    d.start()
    assert d.stop() == 0
    assert all(not line.startswith("<") for line in d.log().splitlines())


# --------------------------------------------------------------------------- traceparent


def test_traceparent_parsing() -> None:
    assert tracecontext.trace_id(TRACEPARENT) == TRACE
    # A later version is read by its first four fields; what it adds is skipped.
    assert tracecontext.trace_id(f"01-{TRACE}-00f067aa0ba902b7-01") == TRACE
    assert tracecontext.trace_id(f"cc-{TRACE}-00f067aa0ba902b7-01-what-the-future-adds") == TRACE
    assert tracecontext.trace_id(f"cc-{TRACE}-00f067aa0ba902b7-01x") is None
    for value in [*MALFORMED, None, "00-" + "a" * 600]:
        assert tracecontext.trace_id(value) is None, value


@pytest.mark.integration
def test_traceparent_reaches_the_audit_events_the_log_and_cef_ecs(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"log": {"format": "json"}})
    d.start()
    token = d.user_token("content-api")
    # The one-request path (authorize + redeem), then the release: sync client.
    with Client(d.socket) as client, client.tool_call(
            "content-api", "create_article", user_token=token, agent_id="content-writer",
            session_id="s1", arguments={"title": "traced"}, traceparent=TRACEPARENT) as lease:
        assert lease.secrets
    # The async client's authorize, and the plain redeem of its token.
    other = "0af7651916cd43dd8448eb211c80319c"

    async def async_side() -> str:
        async with AsyncClient(d.socket) as ac:
            result = await ac.authorize(
                "content-api", "create_article", user_token=token, agent_id="content-writer",
                session_id="s1", arguments={"title": "async"},
                traceparent=f"00-{other}-b7ad6b7169203331-01")
            assert result.resolution_token is not None
            lease = await ac.redeem(result.resolution_token, {"title": "async"},
                                    traceparent=f"00-{other}-b7ad6b7169203331-01")
            await ac.release(lease, "success", 1, traceparent=f"00-{other}-b7ad6b7169203331-01")
            return result.request_id

    anyio.run(async_side)
    # A refusal carries it too.
    status, body = request(d, "POST", "/v1/redeem", {"resolution_token": "a.b.c"},
                           {"traceparent": TRACEPARENT})
    assert status == 401, body
    assert d.stop() == 0
    events = d.audit_events()
    traced = [e for e in events if e.get("trace_id") == TRACE]
    assert [e["event_type"] for e in traced] == [
        "mcp.authorize", "mcp.redeem", "mcp.tool_call", "token.rejected"], traced
    assert [e["event_type"] for e in events if e.get("trace_id") == other] == [
        "mcp.authorize", "mcp.redeem", "mcp.tool_call"]
    assert all("trace_id" not in e for e in events if e["event_type"].startswith("daemon."))
    # The JSON log lines of those requests carry it.
    lines = [o for o in json_lines(d) if o.get("trace_id") == TRACE]
    assert {o["path"] for o in lines if o["logger"] == logs.REQUEST_LOGGER} == {
        "/v1/authorize", "/v1/release", "/v1/redeem"}
    # CEF (sidekeyFields) and ECS (trace.id) carry it.
    cef = subprocess.run([*SIDEKEY, "audit", "export", "--format", "cef", str(d.audit_path)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    ecs = subprocess.run([*SIDEKEY, "audit", "export", "--format", "ecs", str(d.audit_path)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    cef_traced = [line for line in cef.splitlines() if TRACE in line]
    assert len(cef_traced) == 4 and all('"trace_id":"' + TRACE in line for line in cef_traced)
    docs = [json.loads(line) for line in ecs.splitlines()]
    ecs_traced = [doc for doc in docs if doc.get("trace", {}).get("id") == TRACE]
    assert [doc["event"]["action"] for doc in ecs_traced] == [e["event_type"] for e in traced]
    assert all("trace_id" not in doc["sidekey"] for doc in docs)


@pytest.mark.integration
@pytest.mark.parametrize("value", MALFORMED)
def test_a_malformed_traceparent_is_ignored_and_the_call_works(daemon: Daemon, value: str) -> None:
    status, auth = request(daemon, "POST", "/v1/authorize", authorize_body(daemon),
                           {"traceparent": value})
    assert status == 200, auth
    [event] = daemon.wait_events("mcp.authorize", 1)
    assert "trace_id" not in event


def test_the_client_sends_a_valid_traceparent_only() -> None:
    sent: list[TransportRequest] = []

    def transport(req: TransportRequest) -> TransportResponse:
        sent.append(req)
        return TransportResponse(200, json.dumps({
            "decision": "allow", "request_id": "req_1", "resolution_token": "t",
            "expires_at": "2026-12-01T00:00:00Z"}).encode())

    client = Client("/nonexistent", transport=transport)
    client.authorize("s", "t", traceparent=TRACEPARENT)
    client.authorize("s", "t", traceparent=MALFORMED[0])
    client.authorize("s", "t")
    assert [r.headers.get("traceparent") for r in sent] == [TRACEPARENT, None, None]
    with pytest.raises(TypeError):
        client.authorize("s", "t", traceparent=b"00-...")  # type: ignore[arg-type]


@pytest.mark.integration
def test_sidekey_mcp_forwards_the_mcp_requests_traceparent(make_daemon: Any) -> None:
    import httpx2
    from mcp import Client as McpClient
    from mcp.client.streamable_http import streamable_http_client

    from test_mcp_governed import http_server, run, tool_calls

    d: Daemon = make_daemon()
    d.start()
    token = d.user_token("content-api", extra={"azp": "content-writer", "client_id": "cw-1"})

    async def main(url: str) -> Any:
        headers = {"Authorization": f"Bearer {token}", "traceparent": TRACEPARENT}
        async with httpx2.AsyncClient(headers=headers, timeout=30) as http, McpClient(
                streamable_http_client(url, http_client=http), mode="legacy",  # type: ignore[arg-type]
        ) as client:
            return await client.call_tool("list_articles", {"query": "ai"})

    with http_server(d) as url:
        result = run(lambda: main(url))
    assert not result.is_error, result
    [event] = tool_calls(d)
    assert event["trace_id"] == TRACE
    [authorized] = d.events_of("mcp.authorize")
    assert authorized["trace_id"] == TRACE


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("log", "where"), [
    ({"format": "xml"}, "$.log.format"),
    ({"level": "loud"}, "$.log.level"),
    ({"colour": True}, "$.log"),
])
def test_config_errors_name_the_log_key(tmp_path: Path, log: dict[str, Any], where: str) -> None:
    d = Daemon({"log": log}, root=tmp_path)
    out = subprocess.run([*SIDEKEY, "check-config", "--config", str(d.config_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert where in out.stderr, out.stderr


def test_log_level_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    args = cli.build_parser().parse_args(["serve"])
    monkeypatch.delenv("SIDEKEY_LOG_LEVEL", raising=False)
    assert cli._log_level(args, None) == "info"
    assert cli._log_level(args, "warning") == "warning"
    monkeypatch.setenv("SIDEKEY_LOG_LEVEL", "DEBUG")
    assert cli._log_level(args, "warning") == "debug"
    monkeypatch.setenv("SIDEKEY_LOG_LEVEL", "loud")  # not a level: ignored (with a warning)
    assert cli._log_level(args, "warning") == "warning"
    flagged = cli.build_parser().parse_args(["--log-level", "error", "serve"])
    assert cli._log_level(flagged, "warning") == "error"


def test_a_reload_that_changes_log_is_refused(tmp_path: Path) -> None:
    from sidekey.config import load_config
    from sidekey.daemon.lifecycle import _check_restart_only
    from sidekey.protocol import ConfigError

    d = Daemon(root=tmp_path)
    old = load_config(d.config_path)
    cfg = yaml.safe_load(d.config_path.read_text())
    cfg["log"] = {"format": "json"}
    d.config_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="changes log"):
        _check_restart_only(old, load_config(d.config_path))


# --------------------------------------------------------------------------- formatter


def _record(msg: str, *args: Any, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("sidekey.test", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_json_formatter_encodes_anything_as_one_line() -> None:
    fmt = logs.JsonFormatter()
    line = fmt.format(_record('quote " backslash \\ newline \n tab \t %s', "\udcff lone surrogate",
                              exc=True))
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["message"].startswith('quote " backslash \\ newline \n tab \t')
    assert "ValueError: boom" in obj["exc"] and obj["level"] == "error"
    token = logs.REQUEST.set(logs.RequestLog("req_1", "POST", "/v1/authorize", trace_id=TRACE))
    try:
        logs.note(server="s" * 500, tool="t")
        obj = json.loads(fmt.format(_record("x")))
    finally:
        logs.REQUEST.reset(token)
    assert obj["request_id"] == "req_1" and obj["trace_id"] == TRACE and obj["tool"] == "t"
    assert len(obj["server"]) <= logs.MAX_FIELD_CHARS + 1
    assert "request_id" not in json.loads(fmt.format(_record("outside")))
    journal = json.loads(logs.JsonFormatter(journal=True).format(_record("x"))[3:])
    assert journal["PRIORITY"] == "3" and journal["SYSLOG_IDENTIFIER"] == "sidekey"
    text = logs.TextFormatter(journal=True).format(_record("two\nlines", exc=True))
    assert all(line.startswith("<3>") for line in text.splitlines())


def test_journal_detection_needs_the_streams_own_device_and_inode(tmp_path: Path) -> None:
    path = tmp_path / "f"
    with path.open("w") as f:
        st = os.fstat(f.fileno())
        assert logs.stream_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.stream_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logs.stream_is_journal(f, {"JOURNAL_STREAM": "junk"})
        assert not logs.stream_is_journal(f, {})
    assert not logs.stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_otlp_records_carry_the_trace_id() -> None:
    from sidekey.audit.webhook import format_body

    lines = [(1, json.dumps({"event_type": "mcp.redeem", "timestamp": "2026-11-30T10:00:00Z",
                             "event_id": "e1", "trace_id": TRACE}).encode()),
             (2, b'{"event_type":"mcp.redeem","event_id":"e2","trace_id":"not hex"}'),
             (3, b'{"event_type":"daemon.started","event_id":"e3"}')]
    body = json.loads(format_body(lines, "otlp_json"))
    records = body["resourceLogs"][0]["scopeLogs"][0]["logRecords"]
    assert [r.get("traceId") for r in records] == [TRACE, None, None]
