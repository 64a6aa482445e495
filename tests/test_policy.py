"""The pure decision chain: registry -> peer -> OAuth2 -> tool scopes -> agent grant ->
secrets -> hooks, against the seed policy files (via the quickstart, which includes them)."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sidekey.config import Config, load_config
from sidekey.policy import CallFacts, CompiledPolicy, Decision, Denial, compile_policy, decide
from sidekey.protocol import AccessToken, SidekeyError, TokenError, Unavailable

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "sidekey.yaml"
NOW = datetime.datetime(2026, 5, 1, tzinfo=datetime.UTC)
AFTER_DEPRECATION = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
ISSUER = "https://auth.example.com"


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(QUICKSTART).config


def _raw_policy() -> dict[str, Any]:
    data: dict[str, Any] = {}
    for f in QUICKSTART.parent.glob("*.yaml"):
        if f.name != "sidekey.yaml":
            data.update(yaml.safe_load(f.read_text()))
    return data


@pytest.fixture(scope="module")
def wide() -> Config:
    """The seed policy plus a local stdio server (oauth2: none) and the deprecated
    legacy-crm declared on this host, with an agent granted both."""
    data = _raw_policy()
    data["servers"]["legacy-crm"] = {"tool_scopes": {"find_contact": {}}}
    data["servers"]["notes"] = {"oauth2": "none", "tool_scopes": {"read_note": {"required": ["x"]}}}
    data["servers"]["unlisted"] = {"tool_scopes": {"t": {}}}
    data["registry"]["servers"]["notes"] = {"status": "active"}
    data["agents"]["crm-agent"] = {
        "allowed_servers": [{"server": "legacy-crm", "tools": ["find_contact"]},
                            {"server": "notes", "tools": ["read_note"]}],
    }
    data["secrets"] = {"notes": {"read_note": {"NOTES_KEY": {"backend": "local", "name": "n"}}}}
    return msgspec.convert(data, Config, strict=False)


def token(*scopes: str, aud: str = "mcp:content-api", iss: str = ISSUER, sub: str = "alice@example.com") -> AccessToken:
    return AccessToken(issuer=iss, subject=sub, audience=(aud,), scopes=frozenset(scopes),
                       expires_at=int(NOW.timestamp()) + 300)


WRITER = token("content:read", "content:write")


def facts(**kw: Any) -> CallFacts:
    base: dict[str, Any] = dict(
        server="content-api", tool="create_article", peer_uid=1000, peer_user="alice",
        agent_id="content-writer", session_id="s1", args_digest="0" * 64, now=NOW,
        user_token=WRITER, token_presented=True,
    )
    base.update(kw)
    base.setdefault("peer_servers", frozenset({base["server"]}))
    return CallFacts(**base)


def denied(d: Decision, code: str, status: int) -> None:
    assert not d.allowed and d.outcome == "deny"
    assert (d.code, d.status) == (code, status), (d.code, d.status, d.message)
    assert d.message and d.policy_record()["code"] == code
    assert d.policy_record()["decision"] == "deny"
    assert not d.secrets


# --------------------------------------------------------------------------- allow


def test_allow_lists_every_rule_in_chain_order(cfg: Config) -> None:
    d = decide(cfg, facts())
    assert d.allowed and d.status == 200 and d.code is None
    assert d.user_id == "alice@example.com"  # the token's subject, not the peer's uid
    assert d.rules_matched == (
        "server.declared:content-api",
        "registry.active:content-api",
        "peer.matches:content-api",
        f"oauth2.verified:{ISSUER}",
        "audience:mcp:content-api",
        "tool.declared:content-api/create_article",
        "scopes:create_article",
        "agent.granted:content-writer:content-api/create_article",
        "secrets.mapped:1",
    )
    assert set(d.secrets) == {"CONTENT_API_KEY"}
    assert d.secrets["CONTENT_API_KEY"].name == "content-api/write-key"
    record = d.policy_record()
    assert record == {"evaluated": True, "rules_matched": list(d.rules_matched), "decision": "allow"}


def test_secrets_mapping_is_read_only(cfg: Config) -> None:
    d = decide(cfg, facts())
    with pytest.raises(TypeError):
        d.secrets["X"] = d.secrets["CONTENT_API_KEY"]  # type: ignore[index]


def test_analytics_query_for_sales_assistant(cfg: Config) -> None:
    d = decide(cfg, facts(server="analytics-db", tool="query_metrics", agent_id="sales-assistant",
                          user_token=token("analytics:read", aud="mcp:analytics-db")))
    assert d.allowed and d.rules_matched[-2:] == (
        "agent.granted:sales-assistant:analytics-db/query_metrics", "secrets.mapped:1")


# --------------------------------------------------------------------------- step 1


def test_server_unknown(cfg: Config) -> None:
    d = decide(cfg, facts(server="nope"))
    denied(d, "server_unknown", 404)
    assert d.rules_matched == ()


def test_server_not_in_central_registry(wide: Config) -> None:
    d = decide(wide, facts(server="unlisted", tool="t"))
    denied(d, "server_not_registered", 403)
    assert d.rules_matched == ("server.declared:unlisted",)


def test_deprecated_server_warns_before_the_date(wide: Config) -> None:
    d = decide(wide, facts(server="legacy-crm", tool="find_contact", agent_id="crm-agent",
                           user_token=token(aud="mcp:legacy-crm"), token_presented=True))
    # legacy-crm is declared without oauth2 (default none) in this variant.
    assert d.allowed and "registry.deprecated:legacy-crm" in d.rules_matched
    assert any("2026-06-01" in w and '"crm-v2"' in w for w in d.warnings)
    assert d.policy_record()["warnings"] == list(d.warnings)


def test_deprecation_warning_survives_a_later_denial(wide: Config) -> None:
    # content-writer lists legacy-crm under denied_servers: the warning still travels.
    d = decide(wide, facts(server="legacy-crm", tool="find_contact", user_token=None,
                           token_presented=False))
    denied(d, "agent_denied_server", 403)
    assert len(d.warnings) == 1 and "2026-06-01" in d.warnings[0]


def test_deprecated_server_denied_from_the_date(wide: Config) -> None:
    d = decide(wide, facts(server="legacy-crm", tool="find_contact", agent_id="crm-agent",
                           user_token=None, token_presented=False, now=AFTER_DEPRECATION))
    denied(d, "server_deprecated", 403)
    assert d.message == 'server "legacy-crm" was deprecated on 2026-06-01; use "crm-v2"'
    # The date is compared in UTC: 2026-05-31 22:00 in UTC-3 is already June 1st UTC.
    late_may = datetime.datetime(2026, 5, 31, 22, tzinfo=datetime.timezone(datetime.timedelta(hours=-3)))
    assert decide(wide, facts(server="legacy-crm", tool="find_contact", agent_id="crm-agent",
                              now=late_may)).code == "server_deprecated"


def test_version_pin(cfg: Config) -> None:
    assert decide(cfg, facts(server_version="3.1.0")).allowed
    d = decide(cfg, facts(server_version="3.0.0"))
    denied(d, "version_mismatch", 403)
    assert d.message and "3.0.0" in d.message and "3.1.0" in d.message
    assert decide(cfg, facts(server_version=None)).allowed
    d = decide(cfg, facts(server_version=None, require_version=True))
    denied(d, "version_mismatch", 403)
    assert d.message and "server_version" in d.message


# --------------------------------------------------------------------------- step 2


@pytest.mark.parametrize("peers", [frozenset({"analytics-db"}), frozenset()])
def test_peer_mismatch(cfg: Config, peers: frozenset[str]) -> None:
    d = decide(cfg, facts(peer_servers=peers))
    denied(d, "peer_mismatch", 403)
    assert d.rules_matched == ("server.declared:content-api", "registry.active:content-api")
    assert d.user_id == "local:alice"  # before OAuth2, the user is the attested peer


# --------------------------------------------------------------------------- step 3


def test_token_missing(cfg: Config) -> None:
    d = decide(cfg, facts(user_token=None, token_presented=False))
    denied(d, "token_missing", 401)
    assert d.message and "user_token" in d.message and "OAuth2" in d.message
    assert d.rules_matched[-1] == "peer.matches:content-api"


@pytest.mark.parametrize(
    "err",
    [
        TokenError("the user token has expired", code="token_expired"),
        TokenError("token audience is mcp:analytics-db, expected mcp:content-api",
                   code="audience_mismatch"),
        Unavailable("cannot fetch the issuer's JWKS", code="jwks_unavailable"),
    ],
)
def test_token_errors_pass_through(cfg: Config, err: SidekeyError) -> None:
    d = decide(cfg, facts(user_token=None, token_error=err, token_presented=True))
    denied(d, err.code, err.status)
    assert d.message == err.message


def test_presented_but_unverified_token_is_invalid(cfg: Config) -> None:
    denied(decide(cfg, facts(user_token=None, token_presented=True)), "token_invalid", 401)


def test_token_for_another_server_never_passes(cfg: Config) -> None:
    other = token("content:write", aud="mcp:analytics-db")
    denied(decide(cfg, facts(user_token=other)), "audience_mismatch", 403)
    foreign = token("content:write", iss="https://evil.example.com")
    denied(decide(cfg, facts(user_token=foreign)), "issuer_mismatch", 401)


def test_oauth2_none_takes_the_user_from_the_peer(wide: Config) -> None:
    d = decide(wide, facts(server="notes", tool="read_note", agent_id="crm-agent",
                           user_token=None, token_presented=False))
    assert d.allowed and d.user_id == "local:alice" and d.warnings == ()
    assert d.rules_matched == (
        "server.declared:notes", "registry.active:notes", "peer.matches:notes",
        "oauth2.none", "tool.declared:notes/read_note", "scopes.skipped",
        "agent.granted:crm-agent:notes/read_note", "secrets.mapped:1",
    )
    nameless = decide(wide, facts(server="notes", tool="read_note", agent_id="crm-agent",
                                  peer_user=None, peer_uid=4242, user_token=None))
    assert nameless.user_id == "uid:4242"


def test_oauth2_none_ignores_a_presented_token_with_a_warning(wide: Config) -> None:
    d = decide(wide, facts(server="notes", tool="read_note", agent_id="crm-agent",
                           user_token=None, token_presented=True,
                           token_error=TokenError("bad", code="token_malformed")))
    assert d.allowed and d.user_id == "local:alice"
    assert len(d.warnings) == 1 and "oauth2: none" in d.warnings[0]


def test_oauth2_none_never_checks_scopes_of_a_stray_token(wide: Config) -> None:
    """A verified token that reaches an oauth2: none server (it requires scope "x") is not
    scope-checked: the user is the peer's uid, so the token's scopes mean nothing here."""
    d = decide(wide, facts(server="notes", tool="read_note", agent_id="crm-agent",
                           user_token=token("unrelated"), token_presented=True))
    assert d.allowed and d.user_id == "local:alice"
    assert "scopes.skipped" in d.rules_matched


def test_facts_default_to_no_token_presented(cfg: Config) -> None:
    """A caller that builds CallFacts without saying whether a token came gets
    token_missing (send one), not token_invalid: nothing was presented."""
    bare = CallFacts(server="content-api", tool="create_article", peer_uid=1000, peer_user="alice",
                     peer_servers=frozenset({"content-api"}), agent_id="content-writer",
                     session_id="s1", args_digest="0" * 64, now=NOW)
    denied(decide(cfg, bare), "token_missing", 401)


# --------------------------------------------------------------------------- step 4


def test_tool_unknown(cfg: Config) -> None:
    d = decide(cfg, facts(tool="drop_tables"))
    denied(d, "tool_unknown", 404)
    assert d.message and "create_article" in d.message  # lists what is declared


def test_read_scope_cannot_create(cfg: Config) -> None:
    d = decide(cfg, facts(user_token=token("content:read")))
    denied(d, "scope_missing", 403)
    assert d.message and "content:write" in d.message and "create_article" in d.message
    assert d.rules_matched[-1] == "tool.declared:content-api/create_article"
    assert d.user_id == "alice@example.com"
    assert decide(cfg, facts(tool="list_articles", user_token=token("content:read"))).allowed


# --------------------------------------------------------------------------- step 5


def test_agent_missing_and_unknown(cfg: Config) -> None:
    denied(decide(cfg, facts(agent_id=None)), "agent_missing", 403)
    d = decide(cfg, facts(agent_id="intruder"))
    denied(d, "agent_unknown", 403)
    assert d.message and '"intruder"' in d.message


def test_sales_assistant_is_denied_content_api(cfg: Config) -> None:
    d = decide(cfg, facts(agent_id="sales-assistant"))
    denied(d, "agent_denied_server", 403)
    assert d.message and "sales-assistant" in d.message and "content-api" in d.message
    assert d.rules_matched[-1] == "scopes:create_article"


def test_content_writer_not_granted_export_report(cfg: Config) -> None:
    d = decide(cfg, facts(server="analytics-db", tool="export_report",
                          user_token=token("analytics:read", aud="mcp:analytics-db")))
    denied(d, "agent_not_granted", 403)
    assert d.message and "export_report" in d.message and "query_metrics" in d.message


def test_no_grant_for_the_server(wide: Config) -> None:
    d = decide(wide, facts(server="notes", tool="read_note", agent_id="sales-assistant", user_token=None))
    denied(d, "agent_not_granted", 403)
    assert d.message and "no grant" in d.message


# Deny wins: whatever the allow list says, a server in denied_servers is refused.

SERVERS = ("s1", "s2", "s3")
TOOLS = ("t1", "t2", "t3")


@settings(max_examples=200, deadline=None)
@given(
    grants=st.lists(st.tuples(st.sampled_from(SERVERS), st.sets(st.sampled_from(TOOLS))), max_size=4),
    denied_servers=st.sets(st.sampled_from(SERVERS)),
    server=st.sampled_from(SERVERS),
    tool=st.sampled_from(TOOLS),
)
def test_deny_wins_and_no_grant_means_deny(
    grants: list[tuple[str, set[str]]], denied_servers: set[str], server: str, tool: str
) -> None:
    policy = msgspec.convert({
        "servers": {s: {"oauth2": "none", "tool_scopes": {t: {} for t in TOOLS}} for s in SERVERS},
        "agents": {"a": {"allowed_servers": [{"server": s, "tools": sorted(t)} for s, t in grants],
                         "denied_servers": sorted(denied_servers)}},
    }, Config)
    d = CompiledPolicy(policy).decide(facts(server=server, tool=tool, agent_id="a", user_token=None))
    granted = any(s == server and tool in t for s, t in grants)
    if server in denied_servers:
        assert d.code == "agent_denied_server"
    elif granted:
        assert d.allowed and d.rules_matched[-2] == f"agent.granted:a:{server}/{tool}"
    else:
        assert d.code == "agent_not_granted"


# --------------------------------------------------------------------------- step 6: hooks


def test_hooks_run_last_in_order(cfg: Config) -> None:
    seen: list[str] = []

    def quota(f: CallFacts, user: str) -> str:
        seen.append(f"quota:{user}")
        return "quota.ok:per_user"

    def silent(f: CallFacts, user: str) -> None:
        seen.append("silent")

    d = decide(cfg, facts(), hooks=(quota, silent))
    assert d.allowed and seen == ["quota:alice@example.com", "silent"]
    assert d.rules_matched[-2:] == ("secrets.mapped:1", "quota.ok:per_user")


def test_hook_denial_and_approval(cfg: Config) -> None:
    def over(f: CallFacts, user: str) -> Denial:
        return Denial("quota_exceeded", "60 requests per minute for alice", 429)

    def never(f: CallFacts, user: str) -> None:
        raise AssertionError("hooks after a denial must not run")

    d = decide(cfg, facts(), hooks=(over, never))
    denied(d, "quota_exceeded", 429)
    assert d.rules_matched[-1] == "secrets.mapped:1"

    def hold(f: CallFacts, user: str) -> Denial:
        return Denial("approval_required", "create_article needs approval", 202, outcome="pending_approval")

    held = decide(cfg, facts(), hooks=(hold,))
    assert held.outcome == "pending_approval" and not held.allowed and held.code == "approval_required"


def test_hooks_not_run_for_an_earlier_denial(cfg: Config) -> None:
    def boom(f: CallFacts, user: str) -> None:
        raise AssertionError("must not run")

    assert decide(cfg, facts(agent_id=None), hooks=(boom,)).code == "agent_missing"


# --------------------------------------------------------------------------- compiled once
# (the cost per decision is a figure, not a test: benchmarks/bench_policy.py prints it)


def test_compiled_once_per_config(cfg: Config) -> None:
    assert compile_policy(cfg) is compile_policy(cfg)
    other = copy.deepcopy(cfg)
    assert compile_policy(other) is not compile_policy(cfg)
    assert decide(other, facts()) == decide(cfg, facts())
