"""Issue 14: the agent is bound to the user's token (``policy.agent_claims``), not
self-asserted by the MCP server. A server (or a prompt-injected one) that sends another
agent's id than the one the user's token was issued to is refused and audited."""

from __future__ import annotations

from typing import Any

import pytest

from harness import Daemon

pytestmark = pytest.mark.integration


@pytest.fixture
def bound(make_daemon: Any) -> Daemon:
    d: Daemon = make_daemon({"policy": {"agent_claims": ["azp", "client_id"]}})
    return d.start()


def _token(d: Daemon, **claims: str) -> str:
    return d.user_token("content-api", extra=claims)


def test_the_agent_the_token_names_is_allowed(bound: Daemon) -> None:
    status, body = bound.authorize(user_token=_token(bound, azp="content-writer"))
    assert status == 200, body
    assert "agent.bound:azp" in body["policy"]["rules_matched"]
    # the second claim is used when the first is absent
    status, body = bound.authorize(user_token=_token(bound, client_id="content-writer"))
    assert status == 200, body
    assert "agent.bound:client_id" in body["policy"]["rules_matched"]


def test_another_agent_than_the_tokens_is_refused_and_audited(bound: Daemon) -> None:
    # sales-assistant would be refused anyway for content-api; list_articles is granted
    # to content-writer only: the refusal must be the binding, before any grant lookup.
    status, body = bound.authorize(user_token=_token(bound, azp="sales-assistant"),
                                   agent_id="content-writer")
    assert status == 403 and body["error"]["code"] == "agent_mismatch", body
    assert '"sales-assistant"' in body["error"]["message"]
    denied = [e for e in bound.events_of("mcp.authorize")
              if (e.get("error") or {}).get("code") == "agent_mismatch"]
    assert len(denied) == 1 and denied[0]["agent_id"] == "content-writer", denied


def test_a_token_without_an_agent_claim_is_refused(bound: Daemon) -> None:
    status, body = bound.authorize(user_token=_token(bound))
    assert status == 403 and body["error"]["code"] == "agent_unbound", body


def test_without_agent_claims_the_agent_is_taken_as_sent(make_daemon: Any) -> None:
    d: Daemon = make_daemon().start()
    status, body = d.authorize(user_token=d.user_token("content-api",
                                                       extra={"azp": "sales-assistant"}))
    assert status == 200, body


def test_an_unknown_config_value_is_refused(make_daemon: Any) -> None:
    from sidekey.config import load_config  # noqa: F401 (the loader is what start uses)

    d: Daemon = make_daemon({"policy": {"agent_claims": "azp"}})
    with pytest.raises(Exception, match=r"agent_claims"):
        d.start()


def test_an_agent_named_by_its_mcp_client_is_accepted(make_daemon: Any) -> None:
    """Real client names have spaces and parentheses ("Claude Desktop"): accepted as
    agent ids, bound to the token like any other; anything else outside the pattern
    (control characters, leading, trailing or doubled spaces) is refused at the edge."""
    import yaml

    d: Daemon = make_daemon({"policy": {"agent_claims": ["azp"]}})
    path = d.root / "agent-tool-mappings.yaml"
    data = yaml.safe_load(path.read_text())
    data["agents"]["Claude Desktop (beta)"] = {
        "description": "a desktop client",
        "allowed_servers": [{"server": "content-api", "tools": ["create_article"]}]}
    path.write_text(yaml.safe_dump(data))
    d.start()
    name = "Claude Desktop (beta)"
    status, body = d.authorize(agent_id=name, user_token=_token(d, azp=name))
    assert status == 200, body
    [event] = d.wait_events("mcp.authorize", 1)
    assert event["agent_id"] == name, event
    assert event["policy"]["decision"] == "allow", event
    status, body = d.authorize(agent_id=name, user_token=_token(d, azp="Claude Desktop"))
    assert status == 403 and body["error"]["code"] == "agent_mismatch", body
    for bad in [" Claude", "Claude ", "Claude  Desktop", "Claude\tDesktop", "Claude\nDesktop",
                "Claude\u00a0Desktop", "x" * 129, ""]:
        status, body = d.authorize(agent_id=bad, user_token=_token(d, azp=name))
        assert status == 400 and body["error"]["code"] == "invalid_request", (bad, body)
        assert "$.agent_id" in body["error"]["message"], body
