"""The authorization decision for one tool call. Pure: no I/O, the clock is passed in.

The decision runs a fixed chain of steps (contract order: registry status -> peer
matches server -> OAuth2 token + audience -> tool scopes -> agent grant -> quotas ->
approval rules). Each step either adds the rule it matched to ``rules_matched`` and
continues, or stops the chain with a denial carrying a stable ``code``. This module
implements the steps that exist today (server registered, peer matches, tool
registered, secrets mapped); later steps plug into :func:`decide` in order.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .config import Config, SecretRef

Outcome = Literal["allow", "deny", "pending_approval"]


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What is known about a call before the decision (all attested or validated)."""

    server: str
    tool: str
    peer_uid: int
    peer_user: str | None
    peer_servers: frozenset[str]  # servers whose peer selectors this caller matches
    agent_id: str | None
    session_id: str | None
    args_digest: str
    now: datetime.datetime


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    rules_matched: tuple[str, ...]
    user_id: str
    code: str | None = None
    message: str | None = None
    status: int = 200
    warnings: tuple[str, ...] = ()
    secrets: Mapping[str, SecretRef] = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        return self.outcome == "allow"

    def policy_record(self) -> dict[str, object]:
        """The ``policy`` object of audit events and responses."""
        record: dict[str, object] = {
            "evaluated": True,
            "rules_matched": list(self.rules_matched),
            "decision": self.outcome,
        }
        if self.code:
            record["code"] = self.code
        if self.warnings:
            record["warnings"] = list(self.warnings)
        return record


class _Deny(Exception):
    def __init__(self, code: str, message: str, status: int = 403) -> None:
        self.code, self.message, self.status = code, message, status


def local_user(uid: int, user: str | None) -> str:
    """User id for calls without an OAuth2 token: taken from the peer's uid."""
    return f"local:{user}" if user else f"uid:{uid}"


def decide(cfg: Config, facts: CallFacts) -> Decision:
    """Run the decision chain for one call. Never raises for a policy outcome."""
    rules: list[str] = []
    user_id = local_user(facts.peer_uid, facts.peer_user)
    try:
        server = cfg.servers.get(facts.server)
        if server is None:
            raise _Deny("server_unknown", f'server "{facts.server}" is not registered', 404)
        rules.append(f"server.registered:{facts.server}")
        if facts.server not in facts.peer_servers:
            raise _Deny(
                "peer_mismatch",
                f'the calling process is not attested as server "{facts.server}"',
            )
        rules.append(f"peer.matches:{facts.server}")
        if facts.tool not in server.tool_scopes:
            raise _Deny(
                "tool_unknown", f'tool "{facts.tool}" is not declared for server "{facts.server}"', 404
            )
        rules.append(f"tool.registered:{facts.server}/{facts.tool}")
        secrets = cfg.secrets.get(facts.server, {}).get(facts.tool, {})
        rules.append(f"secrets.mapped:{len(secrets)}")
    except _Deny as deny:
        return Decision(
            outcome="deny",
            rules_matched=tuple(rules),
            user_id=user_id,
            code=deny.code,
            message=deny.message,
            status=deny.status,
        )
    return Decision(outcome="allow", rules_matched=tuple(rules), user_id=user_id, secrets=secrets)
