"""Authorize and redeem in one request (``"redeem": true``, issue 13 direction 5): the
same checks and the same two audit records as the two-step flow, the token never leaves
the daemon, and a hold or a refusal answers exactly as without the flag. Real daemons."""

from __future__ import annotations

import json
from typing import Any

import pytest

from harness import Daemon, run_as
from sidekey.client import Client
from test_approvals_daemon import ARGS, hold_every_call

pytestmark = pytest.mark.integration

NOBODY = 65534


def test_one_request_gives_the_lease_and_writes_both_records(daemon: Daemon) -> None:
    st, body = daemon.authorize(arguments={"title": "hello"}, redeem=True)
    assert st == 200 and body["decision"] == "allow", body
    assert body["resolution_token"] is None  # burned inside the daemon, never sent
    lease = body["lease"]
    assert lease["lease_id"].startswith("lse_") and lease["expires_at"] == body["expires_at"]
    assert lease["secrets"] == {"CONTENT_API_KEY": daemon.secrets["content-api/write-key"]}
    st, r = daemon.request("POST", "/v1/release", {"lease_id": lease["lease_id"],
                                                   "status": "success", "duration_ms": 3})
    assert st == 200, r
    (auth,) = daemon.wait_events("mcp.authorize")
    (redeem,) = daemon.wait_events("mcp.redeem")
    (done,) = daemon.wait_events("mcp.tool_call")
    assert auth["jti"] == redeem["jti"] and redeem["lease_id"] == lease["lease_id"]
    assert redeem["arguments_checked"] is True and done["lease_id"] == lease["lease_id"]
    assert auth["request_id"] == redeem["request_id"] == body["request_id"]


def test_a_refusal_and_a_hold_answer_as_without_the_flag(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    hold_every_call(d)
    d.start()
    st, denied = d.authorize(agent_id="sales-assistant", redeem=True)
    assert st == 403 and denied["error"]["code"] == "agent_denied_server", denied
    st, held = d.authorize("content-api", "publish_article", arguments=ARGS, redeem=True)
    assert st == 202 and held["decision"] == "pending_approval" and held["lease"] is None, held
    assert not d.events_of("mcp.redeem")


def test_another_uid_gets_nothing_by_asking_for_both_at_once(daemon: Daemon) -> None:
    """A process that is not attested as the server is refused at the authorize step:
    asking for the redeem in the same request changes nothing."""
    token = daemon.user_token("content-api")

    def child(d: Daemon) -> tuple[int, dict[str, Any]]:
        return d.request("POST", "/v1/authorize", {
            "server": "content-api", "tool": "create_article", "agent_id": "content-writer",
            "user_token": token, "arguments": {"title": "x"}, "redeem": True})

    st, body = run_as(daemon, NOBODY, NOBODY, child)
    assert st in (401, 403) and "lease" not in json.dumps(body.get("error", {})), body
    assert not daemon.events_of("mcp.redeem")


def test_the_client_tool_call_uses_one_request(daemon: Daemon) -> None:
    with Client(socket_path=daemon.socket) as client, client.tool_call(
            "content-api", "create_article", user_token=daemon.user_token("content-api"),
            agent_id="content-writer", session_id="s1", arguments={"title": "x"}) as lease:
        assert lease.secrets["CONTENT_API_KEY"] == daemon.secrets["content-api/write-key"]
    events = [e["event_type"] for e in daemon.audit_events()]
    assert events.count("mcp.authorize") == events.count("mcp.redeem") == 1
    assert daemon.wait_events("mcp.tool_call")
    (redeem,) = daemon.events_of("mcp.redeem")
    (auth,) = daemon.events_of("mcp.authorize")
    assert redeem["request_id"] == auth["request_id"]  # one request did both
