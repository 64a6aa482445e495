"""The pure decision chain (today's steps: registry, peer, tool, secrets)."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from sidekey.config import Config, load_config
from sidekey.policy import CallFacts, decide

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "sidekey.yaml"
NOW = datetime.datetime(2026, 5, 1, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(QUICKSTART).config


def facts(**kw: object) -> CallFacts:
    base: dict[str, object] = dict(
        server="content-api", tool="create_article", peer_uid=1000, peer_user="alice",
        peer_servers=frozenset({"content-api"}), agent_id="content-writer", session_id="s1",
        args_digest="0" * 64, now=NOW,
    )
    base.update(kw)
    return CallFacts(**base)  # type: ignore[arg-type]


def test_allow_lists_every_rule(cfg: Config) -> None:
    d = decide(cfg, facts())
    assert d.allowed and d.user_id == "local:alice"
    assert d.rules_matched == (
        "server.registered:content-api", "peer.matches:content-api",
        "tool.registered:content-api/create_article", "secrets.mapped:1",
    )
    assert set(d.secrets) == {"CONTENT_API_KEY"}
    assert d.policy_record()["decision"] == "allow"


@pytest.mark.parametrize(
    ("kw", "code", "status"),
    [
        ({"server": "nope"}, "server_unknown", 404),
        ({"peer_servers": frozenset({"analytics-db"})}, "peer_mismatch", 403),
        ({"peer_servers": frozenset()}, "peer_mismatch", 403),
        ({"tool": "drop_tables"}, "tool_unknown", 404),
    ],
)
def test_denials_have_stable_codes(cfg: Config, kw: dict[str, object], code: str, status: int) -> None:
    d = decide(cfg, facts(**kw))
    assert not d.allowed and d.code == code and d.status == status and d.message
    assert d.policy_record()["decision"] == "deny"


def test_user_from_uid_without_name(cfg: Config) -> None:
    assert decide(cfg, facts(peer_user=None, peer_uid=4242)).user_id == "uid:4242"
