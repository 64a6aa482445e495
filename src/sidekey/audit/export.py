"""Reading audit files for people and SIEMs (``sidekey audit tail`` / ``export``). Pure.

:func:`read_events` yields (raw line, event) per JSON event of the files (other lines
are skipped: ``audit verify`` reports them); :class:`Filter` selects; :func:`readable`,
:func:`to_cef` and :func:`to_ecs` format. The CEF and ECS field mappings are documented
field by field in the README ("Audit export formats") and below in the code.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__

ECS_VERSION = "8.11.0"
MAX_LINE_BYTES = 2 * 1024 * 1024  # longer lines are skipped (the daemon writes <= 1 MiB)


def parse_time(text: str) -> datetime.datetime:
    """An ISO-8601 time (``2026-04-07T14:23:11Z``, a date, or with an offset), or a
    relative one: ``90s``, ``15m``, ``2h``, ``7d`` ago. Raises ValueError."""
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].isdigit():
        return datetime.datetime.now(datetime.UTC) - datetime.timedelta(
            seconds=int(text[:-1]) * units[text[-1]])
    value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)


def event_time(event: dict[str, Any]) -> datetime.datetime | None:
    ts = event.get("timestamp")
    if not isinstance(ts, str):
        return None
    try:
        return parse_time(ts)
    except ValueError:
        return None


@dataclass(frozen=True)
class Filter:
    types: Sequence[str] = ()  # exact type, or a prefix ending in "." ("mcp.")
    server: str | None = None
    user: str | None = None
    since: datetime.datetime | None = None

    def __call__(self, event: dict[str, Any]) -> bool:
        kind = event.get("event_type")
        if self.types and not any(
                kind == t or (t.endswith(".") and isinstance(kind, str) and kind.startswith(t))
                for t in self.types):
            return False
        if self.server is not None and event.get("server") != self.server:
            return False
        if self.user is not None and event.get("user_id") != self.user:
            return False
        if self.since is not None:
            at = event_time(event)
            if at is None or at < self.since:
                return False
        return True


def event_of(line: bytes) -> dict[str, Any]:
    """The event of one audit line; ``{}`` for a line that is not a JSON object."""
    try:
        event = json.loads(line)
    except ValueError:
        return {}
    return event if isinstance(event, dict) else {}


def parse_lines(data: bytes) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """(line, event) per complete JSON-object line of ``data``."""
    for raw in data.split(b"\n"):
        if not raw or len(raw) > MAX_LINE_BYTES:
            continue
        try:
            event = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(event, dict):
            yield raw, event


def read_events(paths: Sequence[Path]) -> Iterator[tuple[bytes, dict[str, Any]]]:
    for path in paths:
        with path.open("rb") as f:
            pending = b""
            while chunk := f.read(1024 * 1024):
                pending += chunk
                cut = pending.rfind(b"\n")
                if cut < 0:
                    continue
                yield from parse_lines(pending[:cut])
                pending = pending[cut + 1:]
            if pending:
                yield from parse_lines(pending)


# --------------------------------------------------------------------------- readable


def _obj(event: dict[str, Any], key: str) -> dict[str, Any]:
    value = event.get(key)
    return value if isinstance(value, dict) else {}


def _outcome(event: dict[str, Any]) -> str | None:
    """success / failure / None, from the result status, the policy decision or an error."""
    if isinstance(event.get("error"), dict):
        return "failure"
    result, policy = event.get("result"), event.get("policy")
    status = result.get("status") if isinstance(result, dict) else None
    decision = policy.get("decision") if isinstance(policy, dict) else None
    if status in ("success",) or decision == "allow":
        return "success"
    if status in ("error", "cancelled", "denied") or decision in ("deny", "denied"):
        return "failure"
    return None


def readable(event: dict[str, Any]) -> str:
    """One line for a person: time, seq, type, who, what, outcome."""
    parts = [str(event.get("timestamp", "?")), f"#{event.get('seq', '-')}",
             str(event.get("event_type", "?"))]
    for key, label in (("user_id", "user"), ("agent_id", "agent"), ("server", "server"),
                       ("tool", "tool"), ("lease_id", "lease")):
        if event.get(key) is not None:
            parts.append(f"{label}={event[key]}")
    policy = event.get("policy")
    if isinstance(policy, dict) and policy.get("decision"):
        parts.append(f"decision={policy['decision']}")
    result = event.get("result")
    if isinstance(result, dict) and result.get("status"):
        parts.append(f"status={result['status']}")
    error = event.get("error")
    if isinstance(error, dict):
        parts.append(f"error={error.get('code')}")
    cp = event.get("checkpoint")
    if isinstance(cp, dict):
        parts.append(f"covers_seq={cp.get('covers_seq')} key={cp.get('key_id')}"
                     + (" final" if cp.get("final") else ""))
    return " ".join(parts)


# --------------------------------------------------------------------------- CEF


def _cef_header(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _cef_ext(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return (text.replace("\\", "\\\\").replace("=", "\\=").replace("\r", "\\r")
            .replace("\n", "\\n"))


def cef_severity(event: dict[str, Any]) -> int:
    """3 for routine events, 5 for a refusal or denial, 7 for a failure, an audit repair
    or audit events a sink lost or its collector refused."""
    kind = str(event.get("event_type", ""))
    if kind in ("request.failed", "audit.repaired", "audit.sink_overflow",
                "audit.sink_rejected") or kind.endswith(".replayed"):
        return 7
    if _outcome(event) == "failure" or kind.endswith(".rejected"):
        return 5
    return 3


# Top-level event fields that to_cef maps in full to their own CEF fields; every other
# field (schema_version; policy, peer and error whole, though parts of them also have
# CEF fields; an event type's own fields: checkpoint, repaired, rotated, sink_overflow,
# approval_id, decided_by, jti, ...) goes into the sidekeyFields extension, so a CEF
# consumer (a syslog sink with format: cef) loses nothing, including event types added
# later.
_CEF_MAPPED = frozenset((
    "timestamp", "event_id", "event_type", "host", "user_id", "server", "tool", "agent_id",
    "session_id", "lease_id", "request_id", "seq", "prev_hash", "log_id", "arguments",
    "auth", "result"))


def to_cef(event: dict[str, Any]) -> str:
    """ArcSight CEF:0 (one line). Mapping (README "Audit export formats"):
    header: vendor ``sidekey``, product ``sidekey``, version, signature id = event_type,
    name = event_type (+ policy decision), severity :func:`cef_severity`; extensions:
    rt = timestamp (ms since the epoch), externalId = event_id, cat = event_type,
    dvchost = host, suser = user_id, outcome = success|failure, act = policy.decision,
    cs1 server, cs2 tool, cs3 agent_id, cs4 session_id, cs5 lease_id, cs6 error.code,
    msg = error.message, spid / suid = peer.pid / peer.uid, sproc = peer.exe,
    cn1 = seq, flexString1 = prev_hash, flexString2 = log_id, reason = policy.rules_matched,
    request = request_id; arguments, auth, result go to cs-less ``sidekeyArguments``,
    ``sidekeyAuth``, ``sidekeyResult`` (compact JSON); every other field of the event
    (see ``_CEF_MAPPED``) to ``sidekeyFields``, a compact JSON object."""
    kind = event.get("event_type", "unknown")
    policy, error, peer = _obj(event, "policy"), _obj(event, "error"), _obj(event, "peer")
    name = f"{kind} {policy['decision']}" if policy.get("decision") else kind
    ext: list[tuple[str, Any]] = []
    at = event_time(event)
    if at is not None:
        ext.append(("rt", int(at.timestamp() * 1000)))
    ext += [("externalId", event.get("event_id")), ("cat", kind), ("dvchost", event.get("host")),
            ("suser", event.get("user_id")), ("outcome", _outcome(event)),
            ("act", policy.get("decision"))]
    for i, key in enumerate(("server", "tool", "agent_id", "session_id", "lease_id"), start=1):
        ext += [(f"cs{i}Label", key), (f"cs{i}", event.get(key))] if event.get(key) is not None else []
    if error.get("code") is not None:
        ext += [("cs6Label", "error_code"), ("cs6", error.get("code")), ("msg", error.get("message"))]
    ext += [("spid", peer.get("pid")), ("suid", peer.get("uid")), ("sproc", peer.get("exe")),
            ("request", event.get("request_id"))]
    if policy.get("rules_matched"):
        ext.append(("reason", ",".join(map(str, policy["rules_matched"]))))
    if event.get("seq") is not None:
        ext += [("cn1Label", "seq"), ("cn1", event["seq"]),
                ("flexString1Label", "prev_hash"), ("flexString1", event.get("prev_hash")),
                ("flexString2Label", "log_id"), ("flexString2", event.get("log_id"))]
    for key, label in (("arguments", "sidekeyArguments"), ("auth", "sidekeyAuth"),
                       ("result", "sidekeyResult")):
        if event.get(key) is not None:
            ext.append((label, event[key]))
    rest = {k: v for k, v in event.items() if k not in _CEF_MAPPED and v is not None}
    if rest:
        ext.append(("sidekeyFields", rest))
    header = "|".join(_cef_header(v) for v in (
        "CEF:0", "sidekey", "sidekey", __version__, kind, name, cef_severity(event)))
    return header + "|" + " ".join(f"{k}={_cef_ext(v)}" for k, v in ext if v is not None)


# --------------------------------------------------------------------------- ECS


# Top-level event fields that to_ecs maps in full to ECS fields (the chain fields go to
# sidekey.chain); every other field goes under sidekey.<name> unchanged.
_ECS_MAPPED = frozenset(("timestamp", "event_id", "event_type", "host", "user_id", "seq",
                         "prev_hash", "log_id", "trace_id"))


def to_ecs(event: dict[str, Any], raw: bytes | None = None) -> dict[str, Any]:
    """An Elastic Common Schema document. Mapping (README "Audit export formats"):
    @timestamp = timestamp, event.id = event_id, event.action = event_type,
    event.kind = "event", event.category = ["iam"], event.outcome, event.sequence = seq,
    event.dataset = "sidekey.audit", event.original = the line as written (so the chain
    can be re-checked downstream), host.name = host, user.id = user_id,
    service.name = "sidekey", process.pid / process.executable / process.user.id /
    process.group.id = peer pid / exe / uid / gid, error.code / error.message,
    http.response.status_code = error.status, rule.name = policy.rules_matched,
    trace.id = trace_id, and every
    other field under ``sidekey.<name>`` unchanged (server, tool, agent_id, session_id,
    lease_id, request_id, arguments, result, auth, policy, peer, error, schema_version, an
    event type's own fields: checkpoint, repaired, rotated, sink_overflow, approval_id,
    ...), plus sidekey.chain {seq, prev_hash, log_id}."""
    policy, error, peer = _obj(event, "policy"), _obj(event, "error"), _obj(event, "peer")
    doc: dict[str, Any] = {
        "@timestamp": event.get("timestamp"),
        "ecs": {"version": ECS_VERSION},
        "event": {
            "id": event.get("event_id"), "action": event.get("event_type"), "kind": "event",
            "category": ["iam"], "dataset": "sidekey.audit", "module": "sidekey",
        },
        "service": {"name": "sidekey", "version": __version__},
        "host": {"name": event.get("host")},
    }
    outcome = _outcome(event)
    if outcome is not None:
        doc["event"]["outcome"] = outcome
    if event.get("seq") is not None:
        doc["event"]["sequence"] = event["seq"]
    if raw is not None:
        doc["event"]["original"] = raw.decode("utf-8", "replace")
    if event.get("user_id") is not None:
        doc["user"] = {"id": event["user_id"]}
    if event.get("trace_id") is not None:
        # ECS's own field for a W3C trace-id: APM and the MCP server's traces join on it.
        doc["trace"] = {"id": event["trace_id"]}
    if peer:
        process = {"pid": peer.get("pid"), "executable": peer.get("exe"),
                   "user": {"id": None if peer.get("uid") is None else str(peer["uid"])},
                   "group": {"id": None if peer.get("gid") is None else str(peer["gid"])}}
        doc["process"] = process
    if error:
        doc["error"] = {"code": error.get("code"), "message": error.get("message")}
        if isinstance(error.get("status"), int):
            doc["http"] = {"response": {"status_code": error["status"]}}
    if policy.get("rules_matched"):
        doc["rule"] = {"name": list(policy["rules_matched"])}
    sk: dict[str, Any] = {
        k: v for k, v in event.items() if k not in _ECS_MAPPED and v is not None
    }
    if event.get("seq") is not None:
        sk["chain"] = {"seq": event["seq"], "prev_hash": event.get("prev_hash"),
                       "log_id": event.get("log_id")}
    doc["sidekey"] = sk
    return doc
