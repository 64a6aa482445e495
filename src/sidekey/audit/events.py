"""Audit event construction and argument redaction. Pure: no I/O, clock passed in.

An event has the shape of ``shared/seed-configs/audit-event-example.json`` (the seed
keys are always present, ``null`` when unknown) plus ``schema_version``, ``host`` and,
when known, ``lease_id``, ``peer``, ``request_id``, ``error`` and ``trace_id``. ``extra`` adds
event-specific top-level keys; it may not shadow a standard key.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from ..encoding import iso_utc, random_uuid4
from .hmackey import ValueHasher

# 2: every line written by the file sink carries seq, prev_hash and log_id (the hash
# chain); audit.checkpoint and audit.repaired events (README, "Audit event schema").
# 3: redacted argument values are "hmac-sha256:<hex>" under the per-host audit HMAC key
# (sidekey.audit.hmackey), no longer "[REDACTED]".
SCHEMA_VERSION = 3

EVENT_TYPES: tuple[str, ...] = (
    "mcp.authorize",
    "mcp.redeem",
    "mcp.tool_call",
    "lease.expired",
    "lease.revoked",
    "lease.recovered",
    "token.issued",
    "token.rejected",
    # POST /v1/introspect answered active (an inactive token is token.rejected).
    "token.introspected",
    "token.replayed",
    "peer.rejected",
    "request.rejected",
    "request.failed",
    "config.reloaded",
    "secret.rotated",
    "daemon.started",
    "daemon.stopped",
    "request.rejected.suppressed",
    "audit.checkpoint",
    "audit.repaired",
    "audit.rotated",
    "audit.sink_overflow",
    "audit.sink_rejected",
    "approval.requested",
    "approval.approved",
    "approval.denied",
    "approval.expired",
    "quota.threshold",
    # POST /v1/sessions/end: a session stopped counting against concurrent_sessions.
    "session.ended",
)

# Any dotted lowercase name is accepted; EVENT_TYPES lists the ones this version emits.
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
# trace_id: the W3C trace-id of the traceparent the MCP server sent with the request
# (sidekey.tracecontext), so a SIEM can join the event to the server's trace.
OPTIONAL_KEYS: tuple[str, ...] = ("lease_id", "peer", "request_id", "error", "trace_id")
# seq / prev_hash / log_id: the hash chain, appended by the file sink (sidekey.audit.chain).
RESERVED_KEYS = frozenset((*SEED_KEYS, "schema_version", "host", *OPTIONAL_KEYS,
                           "seq", "prev_hash", "log_id"))

# What replaces a sensitive value when no HMAC key is given (the approvals list shown
# to approvers, library callers); the daemon's audit events carry
# "hmac-sha256:<hex>" instead (ValueHasher).
REDACTED = "[REDACTED]"
# Serialized size above which redacted arguments are replaced by a digest.
MAX_ARGUMENTS_BYTES = 8 * 1024
# Nesting deeper than this is cut: audit records are for people, and deep recursion
# on attacker-shaped input must not crash the writer.
MAX_DEPTH = 32
TOO_DEEP = "[TOO_DEEP]"

_encoder = msgspec.json.Encoder()


# Argument keys whose values are always redacted, whatever ``audit.redact_keys`` adds
# (a config cannot switch these off). A key is compared in its normalised form: NFKC,
# lower case, letters and digits only ("x-api-key", "X_API_KEY" and "xApiKey" are all
# "xapikey"). Long, unambiguous needles match as substrings of that form...
BUILTIN_REDACT_SUBSTRINGS: tuple[str, ...] = (
    "password", "passwd", "passphrase", "passcode", "secret", "token", "key",
    "credential", "authorization", "cookie", "connectionstring", "connstr",
)
# ... short ones only as a whole word of the key (split at separators and camelCase),
# so "auth" hides "basic_auth" and "authHeader" but not "author", "dsn" hides
# "sentry_dsn" but not "ads_network".
BUILTIN_REDACT_WORDS: frozenset[str] = frozenset((
    "auth", "oauth", "pwd", "pw", "pass", "creds", "cred", "dsn", "jwt", "bearer",
    "pin", "otp", "cvv", "cvc",
))
# A dict {name|key|header|...: "<sensitive name>", value: ...} is one header or
# parameter: its value fields are redacted (the name stays readable).
_PAIR_NAME_FIELDS = frozenset(("name", "key", "header", "headername", "field", "param",
                               "parameter"))
_PAIR_VALUE_FIELDS = frozenset(("value", "values", "val", "headervalue"))
_MAX_PAIR_FIELDS = 4  # a header object has few fields; bigger dicts are not one
_MAX_PAIR_FIELD_LEN = 16
_WORDS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")
# "scheme://user:password@host": the password part of a URL (a DSN under any key).
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s/@:]*:)([^\s@]+)@")
# "Name: value" / "--name=value" strings in a list (curl -H style, argv): the name part
# is at most this long.
_MAX_INLINE_NAME = 64
# Key names remembered per redactor (argument keys repeat from call to call); names
# longer than _MAX_CACHED_KEY are classified every time instead of filling the memo.
_MAX_CACHED = 4096
_MAX_CACHED_KEY = 128


def _normalised(name: str) -> tuple[str, frozenset[str]]:
    if name.isascii():
        words = [w.lower() for w in _WORDS.findall(name)]
        return "".join(words), frozenset(words)
    name = unicodedata.normalize("NFKC", name)  # full-width letters become ASCII
    words = [w.lower() for w in _WORDS.findall(name)]
    return "".join(c for c in name.casefold() if c.isalnum()), frozenset(words)


class Redactor:
    """The redaction rule for one set of needles, precomputed (one per config and tool:
    see :func:`redactor`). :meth:`sensitive` is a memoised set/substring test. With a
    ``hasher`` a sensitive value becomes its HMAC (:meth:`ValueHasher.digest`), else
    :data:`REDACTED`."""

    __slots__ = ("_hasher", "_memo", "substrings", "words")

    def __init__(self, extra: Sequence[str] = (), hasher: ValueHasher | None = None) -> None:
        self._hasher = hasher
        # A configured needle matches as a substring of the normalised key, like the
        # built-in substrings; one that normalises to nothing (config forbids it) is
        # ignored rather than matching every key.
        added = {n for n in (_normalised(k)[0] for k in extra) if n}
        self.substrings = tuple(sorted(set(BUILTIN_REDACT_SUBSTRINGS) | added))
        self.words = BUILTIN_REDACT_WORDS
        self._memo: dict[str, bool] = {}

    def mask(self, value: Any) -> str:
        """What a sensitive ``value`` is replaced by."""
        return REDACTED if self._hasher is None else self._hasher.digest(value)

    def sensitive(self, name: str) -> bool:
        """Whether values under key ``name`` are redacted."""
        hit = self._memo.get(name)
        if hit is not None:
            return hit
        flat, words = _normalised(name)
        hit = not words.isdisjoint(self.words) or any(s in flat for s in self.substrings)
        if len(name) <= _MAX_CACHED_KEY:
            if len(self._memo) >= _MAX_CACHED:
                self._memo.clear()
            self._memo[name] = hit
        return hit

    def _inline(self, text: str) -> str:
        # "Authorization: Bearer x" or "--password=x" inside a list.
        colon = text.find(":", 0, _MAX_INLINE_NAME + 1)
        equals = text.find("=", 0, _MAX_INLINE_NAME + 1)
        cut = min(colon, equals) if colon >= 0 and equals >= 0 else max(colon, equals)
        if cut > 0 and self.sensitive(text[:cut]):
            sep = text[cut]
            # The value MACed: what follows "=", or ":" and its blanks (a header value).
            secret = text[cut + 1:].lstrip(" \t") if sep == ":" else text[cut + 1:]
            return f"{text[:cut]}{sep}{' ' if sep == ':' else ''}{self.mask(secret)}"
        return self._string(text)

    def _string(self, text: str) -> str:
        if "://" in text and "@" in text:
            return _URL_PASSWORD.sub(lambda m: f"{m[1]}{self.mask(m[2])}@", text)
        return text

    def _pair_fields(self, value: Mapping[Any, Any]) -> tuple[set[Any], set[Any]] | None:
        # {name: "Authorization", value: ...}: (its name keys, its value keys), or None.
        names: set[Any] = set()
        values: set[Any] = set()
        for key, item in value.items():
            if not isinstance(key, str) or len(key) > _MAX_PAIR_FIELD_LEN:
                continue
            flat = key.lower().replace("_", "").replace("-", "")
            if flat in _PAIR_NAME_FIELDS and isinstance(item, str) and self.sensitive(item):
                names.add(key)
            elif flat in _PAIR_VALUE_FIELDS:
                values.add(key)
        return (names, values) if names and values else None

    def value(self, value: Any, depth: int = 0) -> Any:
        """A redacted copy of a JSON-like ``value`` (see :func:`redact`)."""
        if isinstance(value, str):
            return self._string(value)
        if isinstance(value, Mapping):
            if depth >= MAX_DEPTH:
                return TOO_DEEP
            pair = self._pair_fields(value) if len(value) <= _MAX_PAIR_FIELDS else None
            out: dict[str, Any] = {}
            for key, item in value.items():
                name = str(key)
                if pair is not None and key in pair[1]:
                    out[name] = self.mask(item)
                elif pair is not None and key in pair[0]:
                    out[name] = item  # the header's name, e.g. "Authorization"
                elif self.sensitive(name):
                    out[name] = self.mask(item)
                else:
                    out[name] = self.value(item, depth + 1)
            return out
        if isinstance(value, list | tuple):
            if depth >= MAX_DEPTH:
                return TOO_DEEP
            return self._list(value, depth)
        if value is None or isinstance(value, int | float | bool):
            return value
        # Not a JSON value: never put its repr (which could hold anything) in the log.
        return f"[{type(value).__name__}]"

    def _list(self, items: Sequence[Any], depth: int) -> list[Any]:
        # ["Authorization", "Bearer x"] (a header pair) and argv ["--password", "x"]:
        # a string naming a secret hides the element after it.
        pair = len(items) == 2 and isinstance(items[0], str)
        out: list[Any] = []
        hide_next = False
        for i, item in enumerate(items):
            if hide_next:
                out.append(self.mask(item))
                hide_next = False
                continue
            if isinstance(item, str):
                out.append(self._inline(item))
                if ((pair and i == 0) or item.startswith("-")) and _bare_name(item) \
                        and self.sensitive(item):
                    hide_next = True
            else:
                out.append(self.value(item, depth + 1))
        return out


def _bare_name(text: str) -> bool:
    # A header or flag name alone ("Authorization", "--password"), not a sentence or an
    # inline "name: value" (handled by _inline).
    return len(text) <= _MAX_INLINE_NAME and not any(c in text for c in " :=")


@functools.lru_cache(maxsize=64)
def _redactor(extra: tuple[str, ...], hasher: ValueHasher | None) -> Redactor:
    return Redactor(extra, hasher)


def redactor(redact_keys: Sequence[str], extra_keys: Sequence[str] = (),
             hasher: ValueHasher | None = None) -> Redactor:
    """The (cached) :class:`Redactor` for the configured ``audit.redact_keys`` plus a
    tool's ``audit.redact_tool_fields`` (and the daemon's ``hasher``, by identity);
    built once per distinct list, not per event."""
    return _redactor((*redact_keys, *extra_keys), hasher)


def sensitive_key(name: str, redact_keys: Sequence[str]) -> bool:
    """Whether argument values under key ``name`` are redacted (built-in needles plus
    ``redact_keys``)."""
    return redactor(redact_keys).sensitive(name)


def redact(
    arguments: Mapping[str, Any], redact_keys: Sequence[str], extra_keys: Sequence[str] = (),
    hasher: ValueHasher | None = None,
) -> dict[str, Any]:
    """Return a copy of ``arguments`` safe to write to the audit log.

    Values under a sensitive key become ``"hmac-sha256:<hex>"`` (the HMAC of the value's
    canonical JSON under ``hasher``'s key: the same value gives the same string, so
    events can be correlated without revealing it), or ``"[REDACTED]"`` without a
    ``hasher``; at any depth (in nested objects and lists). Sensitive: the built-in needles (:data:`BUILTIN_REDACT_SUBSTRINGS`
    as substrings, :data:`BUILTIN_REDACT_WORDS` as whole words of the key) and
    ``redact_keys`` / ``extra_keys`` (substrings), all compared case-insensitively
    with separators ignored. Header shapes are covered too: ``["Authorization",
    "Bearer x"]``, ``{"name": "Authorization", "value": "x"}``, ``"Cookie: x"`` and
    ``--password x`` / ``--password=x`` in a list; and the password of any
    ``scheme://user:password@host`` URL (a substring is MACed alone: the header value
    after ``Name:`` and its blanks, the flag value after ``=``, the URL's password).
    If the redacted arguments serialize to more than :data:`MAX_ARGUMENTS_BYTES`, they
    are replaced by ``{"_truncated": true, "size": n, "sha256": hex}`` (the digest is
    of the *redacted* JSON, so it cannot be used to guess a redacted value).
    """
    redacted: dict[str, Any] = redactor(redact_keys, extra_keys, hasher).value(arguments)
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
    return iso_utc(now, "milliseconds")


def new_event_id() -> str:
    return f"evt_{random_uuid4()}"


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
    trace_id: str | None = None,
    extra: dict[str, Any] | None = None,
    redact_keys: Sequence[str],
    redact_tool_fields: Mapping[str, Sequence[str]] | None = None,
    max_string_bytes: int | None = None,
    max_event_bytes: int | None = None,
    hasher: ValueHasher | None = None,
) -> dict[str, Any]:
    """Build one audit event (a plain dict, ready to encode as one JSON line).

    Every string value is capped at ``max_string_bytes`` and the event at
    ``max_event_bytes`` (:func:`cap_event`; defaults :data:`MAX_STRING_BYTES`,
    :data:`MAX_EVENT_BYTES`).

    ``arguments`` are redacted with :func:`redact` (``redact_keys`` plus the
    ``redact_tool_fields`` of ``tool``; sensitive values MACed with ``hasher``). Raises :class:`ValueError` (a
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
        "arguments": None if arguments is None else redact(
            arguments, redact_keys,
            redact_tool_fields.get(tool, ()) if redact_tool_fields and tool else (), hasher,
        ),
        "result": result,
        "auth": auth,
        "policy": policy,
        "schema_version": SCHEMA_VERSION,
        "host": host,
    }
    optional = {"lease_id": lease_id, "peer": peer, "request_id": request_id, "error": error,
                "trace_id": trace_id}
    event.update((k, v) for k, v in optional.items() if v is not None)
    if extra:
        clash = RESERVED_KEYS.intersection(extra)
        if clash:
            raise ValueError(f"audit extra keys shadow standard keys: {sorted(clash)}")
        event.update((k, v) for k, v in extra.items() if v is not None)
    return cap_event(event, max_string_bytes=max_string_bytes or MAX_STRING_BYTES,
                     max_event_bytes=max_event_bytes or MAX_EVENT_BYTES)


# --------------------------------------------------------------------------- size caps

# What one event can hold, JSON-encoded. A caller controls some strings (a request path,
# an error detail, argument values); these caps are what make the audit volume a caller
# can cause computable (README, "Security": burst x MAX_EVENT_BYTES per window).
MAX_STRING_BYTES = 1024  # one string value, marker included
MAX_EVENT_BYTES = 16 * 1024  # the whole event (arguments alone may take 8 KiB)
# A JSON-encoded character takes at most 6 bytes (control characters become \uXXXX), so
# a string of at most cap // 6 characters cannot be over the cap: one len() in the common case.
_MARKER_ROOM = 48  # bytes kept free for "…(truncated N bytes)"
# Keys that identify the event; never replaced when a too-large event is shrunk.
_FIXED_KEYS = frozenset(("event_id", "timestamp", "event_type", "schema_version", "host",
                         "request_id", "lease_id", "trace_id"))
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


def _capped(value: Any, depth: int, limit: int) -> Any:
    """``value`` with every string capped at ``limit`` bytes; containers are copied only
    if something changed (callers' dicts, e.g. a call's auth facts reused by later
    events, are never modified).

    On the hot path (every event): scalars are skipped without a call, by exact type first.
    """
    short = limit // 6  # a string this short cannot encode to more than the cap
    kind = type(value)
    if kind is dict or kind is list or kind is tuple:
        if depth >= _MAX_WALK_DEPTH:
            return TOO_DEEP
        out: dict[Any, Any] | list[Any] | None = None
        for key, item in value.items() if kind is dict else enumerate(value):
            item_kind = type(item)
            if item_kind is str:
                if len(item) <= short:
                    continue
                new = cap_string(item, limit)
            elif item_kind is int or item_kind is bool or item_kind is float or item is None:
                continue
            else:
                new = _capped(item, depth + 1, limit)
            if new is not item:
                if out is None:
                    out = dict(value) if kind is dict else list(value)
                out[key] = new
        return value if out is None else out
    if isinstance(value, str):
        return value if len(value) <= short else cap_string(value, limit)
    if isinstance(value, Mapping):
        return _capped(dict(value), depth, limit)
    if isinstance(value, list | tuple):
        return _capped(list(value), depth, limit)
    return value


def _digest_marker(value: Any) -> dict[str, Any]:
    encoded = _encoder.encode(value)
    return {"_truncated": True, "size": len(encoded),
            "sha256": hashlib.sha256(encoded).hexdigest()}


def cap_event(
    event: dict[str, Any],
    *,
    max_string_bytes: int = MAX_STRING_BYTES,
    max_event_bytes: int = MAX_EVENT_BYTES,
) -> dict[str, Any]:
    """Cap every string value at ``max_string_bytes`` and the whole event at
    ``max_event_bytes`` (JSON-encoded; defaults :data:`MAX_STRING_BYTES`,
    :data:`MAX_EVENT_BYTES`).

    An event still too large has its largest object/list fields replaced, largest first,
    by ``{"_truncated": true, "size": n, "sha256": hex}``; if even that is not enough
    (only possible with a great many fields), every field but the identifying ones is
    dropped (seed keys become null) and ``_truncated`` describes the whole event.
    """
    event = _capped(event, 0, max_string_bytes)
    size = _json_size(event)
    if size <= max_event_bytes:
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
        if size <= max_event_bytes:
            return event
    slim: dict[str, Any] = {k: (v if k in _FIXED_KEYS else None) for k, v in event.items()
                            if k in _FIXED_KEYS or k in SEED_KEYS}
    slim["_truncated"] = whole
    return slim
