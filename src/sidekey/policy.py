"""The authorization decision for one tool call. Pure: no I/O, the clock is passed in.

The decision runs a fixed chain of steps in the contract's order. Each step either
appends the rule it matched to ``rules_matched`` and continues, or stops the chain
with a denial carrying a stable ``code``, an actionable ``message`` and an HTTP status:

1. the server is declared under ``servers:`` (``server_unknown``, 404; but a server the
   central registry lists as deprecated or retired is answered ``server_deprecated`` /
   ``server_retired``, 403, naming the date and the replacement) and the central
   registry lets it run (:mod:`sidekey.registry`: ``server_not_registered``,
   ``server_deprecated``, ``server_retired``, ``version_mismatch``; 403);
2. the calling process is attested as that server (``peer_mismatch``, 403);
3. OAuth2: ``oauth2: none`` servers take the user from the peer's uid; otherwise the
   user's token, already verified by the daemon against this server's issuer and
   audience, names the user (``token_missing`` 401, or the verification error as is;
   a verified token for another issuer or audience is ``issuer_mismatch`` (401) /
   ``audience_mismatch`` (403), as a second line of defence);
4. the tool is declared for the server (``tool_unknown``, 404) and the token carries
   the tool's required scopes (``scope_missing``, 403);
5. the agent is the one the user's token was issued to, when ``policy.agent_claims``
   names the claims (``agent_unbound``, ``agent_mismatch``; 403), and it is granted the
   server and tool (``agent_missing``, ``agent_unknown``, ``agent_denied_server``,
   ``agent_not_granted``; 403): a denial wins over any grant, and no grant means deny;
6. the secrets mapped to the server+tool, then the hooks (quotas, approval rules).

The config is compiled once into a :class:`CompiledPolicy` (dict and set lookups only
per call); :func:`decide` caches the compiled form per ``Config`` object.
"""

from __future__ import annotations

import datetime
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from . import registry
from .config import Config, OAuth2Config, RegistryEntry, SecretRef
from .protocol import AccessToken, SidekeyError

Outcome = Literal["allow", "deny", "pending_approval"]

STATUS_NOT_FOUND = 404
STATUS_DENIED = 403
STATUS_UNAUTHENTICATED = 401
COMPILED_CACHE_SIZE = 8  # configs kept compiled (the live one, plus a reload's candidate)


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What is known about a call before the decision (all attested or validated).

    ``user_token`` is the user's OAuth2 access token *after* the daemon verified it
    against this server's ``oauth2`` settings; if that verification failed,
    ``token_error`` carries the failure and is reported as is at the OAuth2 step.
    ``token_presented`` says whether the request carried a ``user_token`` at all.
    ``now`` is the decision time (UTC); registry dates are compared in UTC.
    """

    server: str
    tool: str
    peer_uid: int
    peer_user: str | None
    peer_servers: frozenset[str]  # servers whose peer selectors this caller matches
    agent_id: str | None
    session_id: str | None
    args_digest: str
    now: datetime.datetime
    user_token: AccessToken | None = None
    token_error: SidekeyError | None = None
    token_presented: bool = False
    server_version: str | None = None
    require_version: bool = False


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
    # For a denial: machine-readable facts for the error body (e.g. retry_after_s).
    details: Mapping[str, Any] = field(default_factory=dict)

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


@dataclass(frozen=True, slots=True)
class Denial:
    """A hook's verdict that stops the chain.

    ``outcome="pending_approval"`` holds the call for a human instead of denying it
    (approval rules); ``code``/``message``/``status`` are reported either way.
    """

    code: str
    message: str
    status: int = STATUS_DENIED
    outcome: Literal["deny", "pending_approval"] = "deny"


# A later step of the chain (quotas, approval rules). Called with the facts and the
# decided user id once every built-in step passed, in order. Returns None to pass
# silently, a rule name (str) to pass and record that rule, or a Denial to stop.
# Hooks must be pure and cheap like the rest of the chain; an exception is a local bug.
Hook = Callable[[CallFacts, str], str | Denial | None]


def local_user(uid: int, user: str | None) -> str:
    """User id for calls without an OAuth2 token: taken from the peer's uid."""
    return f"local:{user}" if user else f"uid:{uid}"


# --------------------------------------------------------------------------- compiled form


@dataclass(frozen=True, slots=True)
class _Tool:
    required: frozenset[str]
    declared_rule: str
    scopes_rule: str
    secrets: Mapping[str, SecretRef]
    secrets_rule: str


@dataclass(frozen=True, slots=True)
class _Server:
    name: str
    oauth2: OAuth2Config | None
    tools: Mapping[str, _Tool]
    entry: RegistryEntry | None
    declared_rule: str
    peer_rule: str
    issuer_rule: str
    audience_rule: str


@dataclass(frozen=True, slots=True)
class _Agent:
    denied: frozenset[str]
    grants: Mapping[str, frozenset[str]]  # server -> tools (several entries are merged)


@dataclass(frozen=True, slots=True)
class _Who:
    """Steps 2-3's outcome: the user (the local user when they stop the chain), the
    rules matched, warnings, and the denial's code/message/status if they stop it."""

    user_id: str
    rules: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    code: str | None = None
    message: str | None = None
    status: int = 200


_NO_SECRETS: Mapping[str, SecretRef] = MappingProxyType({})


def _quoted(names: Sequence[str] | frozenset[str]) -> str:
    return ", ".join(sorted(names)) or "none"


class CompiledPolicy:
    """One config's policy as lookup tables; :meth:`decide` runs the chain.

    Build it once per config (``CompiledPolicy(cfg)``, or let :func:`decide` cache it).
    The config is treated as immutable: a reload brings a new ``Config`` object.
    """

    __slots__ = ("_agent_claims", "_agents", "_entries", "_registry_listed", "_servers",
                 "agents_configured")

    def __init__(self, cfg: Config) -> None:
        entries = cfg.registry.servers
        self._entries: Mapping[str, RegistryEntry] = MappingProxyType(dict(entries))
        self._registry_listed = bool(entries)
        servers: dict[str, _Server] = {}
        for name, sdef in cfg.servers.items():
            mapped = cfg.secrets.get(name, {})
            tools: dict[str, _Tool] = {}
            for tool, ts in sdef.tool_scopes.items():
                secrets = mapped.get(tool)
                tools[tool] = _Tool(
                    required=frozenset(ts.required),
                    declared_rule=f"tool.declared:{name}/{tool}",
                    scopes_rule=f"scopes:{tool}",
                    secrets=MappingProxyType(dict(secrets)) if secrets else _NO_SECRETS,
                    secrets_rule=f"secrets.mapped:{len(secrets or ())}",
                )
            oauth2 = sdef.oauth2 if isinstance(sdef.oauth2, OAuth2Config) else None
            servers[name] = _Server(
                name=name,
                oauth2=oauth2,
                tools=tools,
                entry=entries.get(name),
                declared_rule=f"server.declared:{name}",
                peer_rule=f"peer.matches:{name}",
                issuer_rule=f"oauth2.verified:{oauth2.issuer}" if oauth2 else "oauth2.none",
                audience_rule=f"audience:{oauth2.audience}" if oauth2 else "",
            )
        self._servers = servers
        agents: dict[str, _Agent] = {}
        for name, adef in cfg.agents.items():
            grants: dict[str, set[str]] = {}
            for grant in adef.allowed_servers:
                grants.setdefault(grant.server, set()).update(grant.tools)
            agents[name] = _Agent(
                denied=frozenset(adef.denied_servers),
                grants={s: frozenset(t) for s, t in grants.items()},
            )
        self._agents = agents
        self.agents_configured = bool(agents)
        self._agent_claims = tuple(cfg.policy.agent_claims)

    def _who(self, server: _Server, facts: CallFacts) -> _Who:
        """Steps 2 and 3 of the chain: the caller is attested as ``server``, and who the
        user is (the verified token's subject, or the peer's local user for an
        ``oauth2: none`` server). Used by :meth:`decide` and :meth:`session_user`."""
        name = server.name
        local = local_user(facts.peer_uid, facts.peer_user)
        if name not in facts.peer_servers:
            return _Who(local, (), (), "peer_mismatch",
                        f'the calling process is not attested as server "{name}" '
                        f"(check peers.{name} in the config)", STATUS_DENIED)
        rules = [server.peer_rule]
        oauth2 = server.oauth2
        token = facts.user_token
        if oauth2 is None:
            rules.append("oauth2.none")
            warnings: tuple[str, ...] = ()
            if facts.token_presented:
                warnings = (
                    f'user_token ignored: server "{name}" has oauth2: none, '
                    "so the user is the calling process's uid",
                )
            return _Who(local, tuple(rules), warnings)
        err = facts.token_error
        if err is not None:
            return _Who(local, tuple(rules), (), err.code, err.message, err.status)
        if token is None:
            if facts.token_presented:
                return _Who(local, tuple(rules), (), "token_invalid",
                            "the user token was presented but not verified",
                            STATUS_UNAUTHENTICATED)
            return _Who(local, tuple(rules), (), "token_missing",
                        f'server "{name}" requires the user\'s OAuth2 bearer token in user_token '
                        f"(issuer {oauth2.issuer}, audience {oauth2.audience})",
                        STATUS_UNAUTHENTICATED)
        # Defence in depth: the daemon verified the token, but against *this*
        # server's settings? A token for another audience must never pass here.
        if token.issuer != oauth2.issuer:
            return _Who(local, tuple(rules), (), "issuer_mismatch",
                        f"the user token was issued by {token.issuer}; server \"{name}\" accepts "
                        f"tokens from {oauth2.issuer}", STATUS_UNAUTHENTICATED)
        if oauth2.audience not in token.audience:
            # 403, as the verifier reports it: a valid token, for another server.
            return _Who(local, tuple(rules), (), "audience_mismatch",
                        f"the user token is for audience {_quoted(token.audience)}; server "
                        f"\"{name}\" requires audience {oauth2.audience}", 403)
        rules += [server.issuer_rule, server.audience_rule]
        return _Who(token.subject, tuple(rules))

    def session_user(self, facts: CallFacts) -> Decision:
        """Whose sessions the caller may end (``POST /v1/sessions/end``): the user a call
        to ``facts.server`` would be made for (steps 1 to 3 of :meth:`decide`, with
        the same code and messages): allow with ``user_id``, or deny. The registry's
        verdict is not asked: ending a session grants nothing, and a server the
        registry has retired must still be able to give its sessions back."""
        server = self._servers.get(facts.server)
        local = local_user(facts.peer_uid, facts.peer_user)
        if server is None:
            return Decision(
                outcome="deny", rules_matched=(), user_id=local, code="server_unknown",
                message=f'server "{facts.server}" is not declared under servers: in this '
                        "host's config", status=STATUS_NOT_FOUND)
        who = self._who(server, facts)
        rules = (server.declared_rule, *who.rules)
        if who.code is not None:
            return Decision(outcome="deny", rules_matched=rules, user_id=who.user_id,
                            code=who.code, message=who.message, status=who.status,
                            warnings=who.warnings)
        return Decision(outcome="allow", rules_matched=rules, user_id=who.user_id,
                        warnings=who.warnings)

    def decide(self, facts: CallFacts, *, hooks: Sequence[Hook] = ()) -> Decision:
        """Run the decision chain for one call.

        Returns an allow, deny or pending-approval :class:`Decision` listing every rule
        matched; never raises for a policy outcome (a hook's exception propagates).
        """
        rules: list[str] = []
        warnings: tuple[str, ...] = ()
        user_id = local_user(facts.peer_uid, facts.peer_user)

        def stop(
            code: str, message: str, status: int, outcome: Outcome = "deny",
            details: Mapping[str, Any] | None = None,
        ) -> Decision:
            return Decision(
                outcome=outcome,
                rules_matched=tuple(rules),
                user_id=user_id,
                code=code,
                message=message,
                status=status,
                warnings=warnings,
                details=details or {},
            )

        # 1. server declared, central registry
        name = facts.server
        server = self._servers.get(name)
        now = facts.now
        today = now.date() if now.tzinfo is None else now.astimezone(datetime.UTC).date()
        if server is None:
            # Not deployed here. A server the central registry has deprecated or retired
            # is answered with the registry's code, date and replacement (where to move),
            # not a bare server_unknown; the rule names the registry entry that applied.
            gone = registry.undeclared(self._entries.get(name), server=name, today=today)
            if gone.code == registry.SERVER_UNKNOWN:
                return stop(gone.code, gone.message or gone.code, STATUS_NOT_FOUND)
            rules.append(gone.rule)
            return stop(gone.code or "denied", gone.message or "denied", STATUS_DENIED,
                        details=registry.move_details(self._entries.get(name)))
        rules.append(server.declared_rule)
        verdict = registry.evaluate(
            server.entry,
            server=name,
            registry_listed=self._registry_listed,
            today=today,
            server_version=facts.server_version,
            require_version=facts.require_version,
        )
        warnings = verdict.warnings
        if not verdict.ok:
            return stop(verdict.code or "denied", verdict.message or "denied", STATUS_DENIED,
                        details=registry.move_details(server.entry))
        rules.append(verdict.rule)

        # 2. peer attested as this server, 3. OAuth2: who the user is (shared with
        # session_user, so ending a session names the user exactly as a call does)
        who = self._who(server, facts)
        rules.extend(who.rules)
        warnings = (*warnings, *who.warnings)
        if who.code is not None:
            return stop(who.code, who.message or who.code, who.status)
        user_id = who.user_id
        token = facts.user_token
        oauth2 = server.oauth2

        # 4. tool declared, tool scopes
        tool_name = facts.tool
        tool = server.tools.get(tool_name)
        if tool is None:
            return stop(
                "tool_unknown",
                f'tool "{tool_name}" is not declared for server "{name}" '
                f"(servers.{name}.tool_scopes lists: {_quoted(list(server.tools))})",
                STATUS_NOT_FOUND,
            )
        rules.append(tool.declared_rule)
        if token is None or oauth2 is None:
            rules.append("scopes.skipped")
        else:
            missing = tool.required - token.scopes
            if missing:
                return stop(
                    "scope_missing",
                    f'tool "{tool_name}" on server "{name}" requires scope '
                    f"{_quoted(missing)}, which the user's token lacks "
                    f"(token scopes: {_quoted(token.scopes)})",
                    STATUS_DENIED,
                )
            rules.append(tool.scopes_rule)

        # 5. agent grant: deny wins, no grant means deny
        agent_id = facts.agent_id
        if agent_id is None:
            return stop(
                "agent_missing",
                "send agent_id: tools are granted per agent (agents: in the policy)",
                STATUS_DENIED,
            )
        if self._agent_claims and facts.user_token is not None:
            # policy.agent_claims: the agent is the one the user's token was issued to
            # (its azp / client_id), not whatever the MCP server says.
            claims = dict(facts.user_token.string_claims)
            bound = next(((c, claims[c]) for c in self._agent_claims if claims.get(c)), None)
            if bound is None:
                return stop(
                    "agent_unbound",
                    f"the user's token names no agent: it carries none of the claims "
                    f"{_quoted(self._agent_claims)} (policy.agent_claims)",
                    STATUS_DENIED,
                )
            if bound[1] != agent_id:
                return stop(
                    "agent_mismatch",
                    f'agent_id "{agent_id}" is not the agent the user\'s token was issued to '
                    f'({bound[0]} "{bound[1][:64]}")',
                    STATUS_DENIED,
                )
            rules.append(f"agent.bound:{bound[0]}")
        agent = self._agents.get(agent_id)
        if agent is None:
            hint = "" if self.agents_configured else "; no agents are configured on this host"
            return stop(
                "agent_unknown", f'agent "{agent_id}" is not defined under agents:{hint}',
                STATUS_DENIED,
            )
        if name in agent.denied:
            return stop(
                "agent_denied_server",
                f'agent "{agent_id}" is denied server "{name}" '
                f"(agents.{agent_id}.denied_servers)",
                STATUS_DENIED,
            )
        granted = agent.grants.get(name)
        if granted is None:
            return stop(
                "agent_not_granted",
                f'agent "{agent_id}" has no grant for server "{name}" '
                f"(agents.{agent_id}.allowed_servers)",
                STATUS_DENIED,
            )
        if tool_name not in granted:
            return stop(
                "agent_not_granted",
                f'agent "{agent_id}" is not granted tool "{tool_name}" on server "{name}" '
                f"(granted: {_quoted(granted)})",
                STATUS_DENIED,
            )
        rules.append(f"agent.granted:{agent_id}:{name}/{tool_name}")

        # 6. secrets, then the later steps (quotas, approval rules)
        rules.append(tool.secrets_rule)
        for hook in hooks:
            result = hook(facts, user_id)
            if result is None:
                continue
            if isinstance(result, str):
                rules.append(result)
                continue
            return stop(result.code, result.message, result.status, result.outcome)
        return Decision(
            outcome="allow",
            rules_matched=tuple(rules),
            user_id=user_id,
            warnings=warnings,
            secrets=tool.secrets,
        )


# id(cfg) -> (cfg, compiled). The entry holds the Config itself, so its id cannot be
# reused by another object while cached. Config structs are not hashable (dict fields).
_compiled: OrderedDict[int, tuple[Config, CompiledPolicy]] = OrderedDict()


def compile_policy(cfg: Config) -> CompiledPolicy:
    """The compiled policy of ``cfg``, built on first use and cached per Config object."""
    hit = _compiled.get(id(cfg))
    if hit is not None and hit[0] is cfg:
        _compiled.move_to_end(id(cfg))
        return hit[1]
    compiled = CompiledPolicy(cfg)
    _compiled[id(cfg)] = (cfg, compiled)
    while len(_compiled) > COMPILED_CACHE_SIZE:
        _compiled.popitem(last=False)
    return compiled


def session_user(cfg: Config, facts: CallFacts) -> Decision:
    """Whose sessions the caller may end; see :meth:`CompiledPolicy.session_user`."""
    return compile_policy(cfg).session_user(facts)


def decide(cfg: Config, facts: CallFacts, *, hooks: Sequence[Hook] = ()) -> Decision:
    """Run the decision chain for one call against ``cfg``. Never raises for a policy outcome.

    See the module docstring for the steps, codes and statuses.
    """
    return compile_policy(cfg).decide(facts, hooks=hooks)
