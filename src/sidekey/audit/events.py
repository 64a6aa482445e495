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
    "lease.recovered",
    "token.issued",
    "token.rejected",
    "token.replayed",
    "peer.rejected",
    "request.rejected",
    "config.reloaded",
    "secret.rotated",
    "daemon.started",
    "daemon.stopped",
    "request.rejected.suppressed",
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
    return cap_event(event)


# --------------------------------------------------------------------------- size caps

# What one event can hold, JSON-encoded. A caller controls some strings (a request path,
# an error detail, argument values); these caps are what make the audit volume a caller
# can cause computable (README, "Security": burst x MAX_EVENT_BYTES per window).
MAX_STRING_BYTES = 1024  # one string value, marker included
MAX_EVENT_BYTES = 16 * 1024  # the whole event (arguments alone may take 8 KiB)
# A JSON-encoded character takes at most 6 bytes (control characters become \uXXXX), so
# a string this short cannot be over the cap: the common case costs one len().
_SHORT_CHARS = MAX_STRING_BYTES // 6
_MARKER_ROOM = 48  # bytes kept free for "…(truncated N bytes)"
# Keys that identify the event; never replaced when a too-large event is shrunk.
_FIXED_KEYS = frozenset(("event_id", "timestamp", "event_type", "schema_version", "host",
                         "request_id", "lease_id"))
_MAX_WALK_DEPTH = MAX_DEPTH + 8  # arguments are already cut at MAX_DEPTH below their key


def _json_size(value: Any) -> int:
    return len(_encoder.encode(value))


def cap_string(text: str, max_bytes: int = MAX_STRING_BYTES) -> str:
    """``text`` if it JSON-encodes to at most ``max_bytes``; else its longest prefix that
    fits with the marker ``…(truncated N bytes)`` (N: UTF-8 bytes cut off) appended."""
    if len(text) <= max_bytes // 6:
        return text
    size = _json_size(text) - 2  # without the quotes
    if size <= max_bytes:
        return text
    budget = max(0, max_bytes - _MARKER_ROOM)
    keep = min(len(text), budget)
    while keep > 0:
        used = _json_size(text[:keep]) - 2
        if used <= budget:
            break
        keep = max(0, min(keep - 1, keep * budget // used))
    dropped = len(text[keep:].encode("utf-8", "surrogatepass"))
    return f"{text[:keep]}…(truncated {dropped} bytes)"


def _capped(value: Any, depth: int) -> Any:
    """``value`` with every string capped; containers are copied only if something changed
    (callers' dicts, e.g. a call's auth facts reused by later events, are never modified)."""
    if isinstance(value, str):
        return value if len(value) <= _SHORT_CHARS else cap_string(value)
    if isinstance(value, dict):
        if depth >= _MAX_WALK_DEPTH:
            return TOO_DEEP
        out: dict[Any, Any] | None = None
        for key, item in value.items():
            new = _capped(item, depth + 1)
            if new is not item:
                if out is None:
                    out = dict(value)
                out[key] = new
        return value if out is None else out
    if isinstance(value, list | tuple):
        if depth >= _MAX_WALK_DEPTH:
            return TOO_DEEP
        items = [_capped(item, depth + 1) for item in value]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return items
    return value


def _digest_marker(value: Any) -> dict[str, Any]:
    encoded = _encoder.encode(value)
    return {"_truncated": True, "size": len(encoded),
            "sha256": hashlib.sha256(encoded).hexdigest()}


def cap_event(event: dict[str, Any]) -> dict[str, Any]:
    """Cap every string value at :data:`MAX_STRING_BYTES` and the whole event at
    :data:`MAX_EVENT_BYTES` (JSON-encoded).

    An event still too large has its largest object/list fields replaced, largest first,
    by ``{"_truncated": true, "size": n, "sha256": hex}``; if even that is not enough
    (only possible with a great many fields), every field but the identifying ones is
    dropped (seed keys become null) and ``_truncated`` describes the whole event.
    """
    event = _capped(event, 0)
    size = _json_size(event)
    if size <= MAX_EVENT_BYTES:
        return event
    event = dict(event)  # shrunk below: never the caller's dict
    whole = _digest_marker(event)
    big = sorted(
        ((_json_size(v), k) for k, v in event.items()
         if k not in _FIXED_KEYS and isinstance(v, dict | list)),
        reverse=True,
    )
    for field_size, key in big:
        marker = _digest_marker(event[key])
        event[key] = marker
        size -= field_size - _json_size(marker)
        if size <= MAX_EVENT_BYTES:
            return event
    slim: dict[str, Any] = {k: (v if k in _FIXED_KEYS else None) for k, v in event.items()
                            if k in _FIXED_KEYS or k in SEED_KEYS}
    slim["_truncated"] = whole
    return slim
