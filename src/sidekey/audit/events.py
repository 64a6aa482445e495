"""Audit event construction and argument redaction. Pure: no I/O, clock passed in.

An event has the shape of ``shared/seed-configs/audit-event-example.json`` (the seed
keys are always present, ``null`` when unknown) plus ``schema_version``, ``host`` and,
when known, ``lease_id``, ``peer``, ``request_id`` and ``error``. ``extra`` adds
event-specific top-level keys; it may not shadow a standard key.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

SCHEMA_VERSION = 1

EVENT_TYPES: tuple[str, ...] = (
    "mcp.authorize",
    "mcp.redeem",
    "mcp.tool_call",
    "lease.expired",
    "lease.revoked",
    "token.issued",
    "token.rejected",
    "token.replayed",
    "peer.rejected",
    "request.rejected",
    "config.reloaded",
    "secret.rotated",
    "daemon.started",
    "daemon.stopped",
)

# Later features add types (approval.*, quota.threshold); any dotted lowercase name is
# accepted, EVENT_TYPES lists the ones this version emits.
_EVENT_TYPE_RE = re.compile(r"^[a-z][a-z_]*(\.[a-z][a-z_]*)+$")

# Keys of the seed example, in its order; always present in an event.
SEED_KEYS: tuple[str, ...] = (
    "event_id",
    "timestamp",
    "event_type",
    "server",
    "tool",
    "user_id",
    "agent_id",
    "session_id",
    "arguments",
    "result",
    "auth",
    "policy",
)
# Keys sidekey adds; omitted when their value is None.
OPTIONAL_KEYS: tuple[str, ...] = ("lease_id", "peer", "request_id", "error")
RESERVED_KEYS = frozenset((*SEED_KEYS, "schema_version", "host", *OPTIONAL_KEYS))

REDACTED = "[REDACTED]"
# Serialized size above which redacted arguments are replaced by a digest.
MAX_ARGUMENTS_BYTES = 8 * 1024
# Nesting deeper than this is cut: audit records are for people, and deep recursion
# on attacker-shaped input must not crash the writer.
MAX_DEPTH = 32
TOO_DEEP = "[TOO_DEEP]"

_encoder = msgspec.json.Encoder()


def _redact_value(value: Any, needles: tuple[str, ...], depth: int) -> Any:
    if isinstance(value, Mapping):
        if depth >= MAX_DEPTH:
            return TOO_DEEP
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = str(key)
            lowered = name.lower()
            if any(needle in lowered for needle in needles):
                out[name] = REDACTED
            else:
                out[name] = _redact_value(item, needles, depth + 1)
        return out
    if isinstance(value, list | tuple):
        if depth >= MAX_DEPTH:
            return TOO_DEEP
        return [_redact_value(item, needles, depth + 1) for item in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    # Not a JSON value: never put its repr (which could hold anything) in the log.
    return f"[{type(value).__name__}]"


def redact(arguments: Mapping[str, Any], redact_keys: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``arguments`` safe to write to the audit log.

    Values under any key containing one of ``redact_keys`` (case-insensitive
    substring) become ``"[REDACTED]"``, at any depth (in nested objects and lists).
    If the redacted arguments serialize to more than :data:`MAX_ARGUMENTS_BYTES`, they
    are replaced by ``{"_truncated": true, "size": n, "sha256": hex}`` (the digest is
    of the *redacted* JSON, so it cannot be used to guess a redacted value).
    """
    needles = tuple(k.lower() for k in redact_keys)
    redacted: dict[str, Any] = _redact_value(arguments, needles, 0)
    encoded = _encoder.encode(redacted)
    if len(encoded) > MAX_ARGUMENTS_BYTES:
        return {
            "_truncated": True,
            "size": len(encoded),
            "sha256": hashlib.sha256(encoded).hexdigest(),
        }
    return redacted


def format_timestamp(now: datetime.datetime) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``: ``2026-04-07T14:23:11.847Z``.

    A naive datetime is taken to be UTC.
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=datetime.UTC)
    utc = now.astimezone(datetime.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def new_event_id() -> str:
    return f"evt_{uuid.uuid4()}"


def make_event(
    event_type: str,
    *,
    host: str,
    now: datetime.datetime,
    server: str | None = None,
    tool: str | None = None,
    user_id: str | None = None,
    agent_id: str | None = None,
    session_id: str | None = None,
    arguments: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    auth: dict[str, Any] | None = None,
    policy: dict[str, Any] | None = None,
    peer: dict[str, Any] | None = None,
    lease_id: str | None = None,
    request_id: str | None = None,
    error: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    redact_keys: Sequence[str],
) -> dict[str, Any]:
    """Build one audit event (a plain dict, ready to encode as one JSON line).

    ``arguments`` are redacted with :func:`redact`. Raises :class:`ValueError` (a
    local bug) for a malformed ``event_type`` (not ``noun.verb``) or an ``extra`` key
    that shadows a standard key.
    """
    if not _EVENT_TYPE_RE.match(event_type):
        raise ValueError(f"unknown audit event type {event_type!r}")
    event: dict[str, Any] = {
        "event_id": new_event_id(),
        "timestamp": format_timestamp(now),
        "event_type": event_type,
        "server": server,
        "tool": tool,
        "user_id": user_id,
        "agent_id": agent_id,
        "session_id": session_id,
        "arguments": redact(arguments, redact_keys) if arguments is not None else None,
        "result": result,
        "auth": auth,
        "policy": policy,
        "schema_version": SCHEMA_VERSION,
        "host": host,
    }
    optional = {"lease_id": lease_id, "peer": peer, "request_id": request_id, "error": error}
    event.update((k, v) for k, v in optional.items() if v is not None)
    if extra:
        clash = RESERVED_KEYS.intersection(extra)
        if clash:
            raise ValueError(f"audit extra keys shadow standard keys: {sorted(clash)}")
        event.update((k, v) for k, v in extra.items() if v is not None)
    return event
