"""W3C Trace Context ``traceparent`` (https://www.w3.org/TR/trace-context/), read only.

An MCP server may send the ``traceparent`` of the request it is serving on
``/v1/authorize``, ``/v1/redeem`` and ``/v1/release``; the daemon copies its trace-id
into the audit events of that call (``trace_id``) and its log lines, so a SIEM can join
sidekey's record to the server's trace. sidekey starts no span and sends no
``traceparent`` of its own.

A malformed value is ignored, as the specification asks of a receiver ("If the
``traceparent`` header cannot be parsed, the vendor ... MUST ignore it"): the call goes
on without a ``trace_id``, never fails because of it. Pure: no I/O, no dependency, so the
client (``pip install sidekey`` without the daemon extra) uses the same check before it
sends one.
"""

from __future__ import annotations

import re

HEADER = "traceparent"

# version "-" trace-id "-" parent-id "-" trace-flags: lowercase hex only (the spec
# forbids uppercase), exact lengths. Version ff is invalid.
_VERSION_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_FUTURE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_PARENT = "0" * 16
# Longer than any header a version could need here; bounds the regex's work (the
# daemon's request head is capped anyway).
MAX_LEN = 512


def trace_id(value: str | None) -> str | None:
    """The trace-id (32 lowercase hex digits) of a valid ``traceparent``, else None.

    Rules (Trace Context Level 2, "traceparent Header"): version 00 is exactly
    ``00-<32 hex>-<16 hex>-<2 hex>`` (55 characters, nothing after); a later version
    (01..fe) is parsed by the same first four fields, and if longer, the 56th character
    must be ``-`` (fields a later version may add are skipped); version ``ff``, an
    all-zero trace-id or parent-id, uppercase hex or any other length: invalid (None).
    """
    if value is None or len(value) > MAX_LEN:
        return None
    m = _VERSION_00.fullmatch(value)
    if m is None:
        f = _FUTURE.fullmatch(value)
        if f is None or f[1] in ("00", "ff"):
            return None
        trace, parent = f[2], f[3]
    else:
        trace, parent = m[1], m[2]
    if trace == _ZERO_TRACE or parent == _ZERO_PARENT:
        return None
    return trace


_TRACE_ID = re.compile(r"[0-9a-f]{32}")


def is_trace_id(value: str) -> bool:
    """Whether ``value`` is a trace-id as :func:`trace_id` returns them."""
    return _TRACE_ID.fullmatch(value) is not None and value != _ZERO_TRACE


def valid(value: str | None) -> bool:
    """Whether ``value`` is a ``traceparent`` sidekey would use (see :func:`trace_id`)."""
    return trace_id(value) is not None
