"""What the caller bounds of issue 9 items 5 and 6 cost, and what they bound.

In-process, no daemon:

- ``make_event``: an audit event of a governed call (``mcp.tool_call``-sized) built with
  the string/size caps, and the same with the caps switched off (the difference is the
  per-event cost of the caps; a call writes about three events);
- ``limiter``: one refusal counted by the per-uid rejection limiter (a suppressed one:
  the path an anonymous flood takes);

and prints the audit volume bound per attacking uid and the connection bounds that
follow from the defaults (``audit.rejections_per_uid``, ``listen.*``).

    python benchmarks/bench_audit_bounds.py [--n 50000]
"""

from __future__ import annotations

import argparse
import datetime
import time
from typing import Any

from sidekey.audit import events
from sidekey.audit.ratelimit import RejectionLimiter
from sidekey.config import AuditConfig, ListenConfig
from sidekey.daemon import REJECTION_EVENT_BYTES

NOW = datetime.datetime(2026, 4, 7, 14, 23, 11, tzinfo=datetime.UTC)
CALL_EVENT: dict[str, Any] = {
    "server": "content-api", "tool": "create_article", "user_id": "alice",
    "agent_id": "content-writer", "session_id": "s1",
    "arguments": {"title": "hello", "body": "x" * 400, "tags": ["a", "b"], "draft": True},
    "result": {"status": "success", "duration_ms": 3, "result_size_bytes": 512},
    "auth": {"method": "oauth2", "issuer": "https://auth.example.com", "subject": "alice",
             "scopes": ["content:read", "content:write"], "expires_at": "2026-04-07T15:00:00Z"},
    "policy": {"decision": "allow", "rules": ["registry:active", "peer:content-api",
                                              "scope:content:write", "grant:content-writer"]},
    "peer": {"pid": 4242, "uid": 998, "gid": 998, "unit": "mcp-content-api.service",
             "exe": "/usr/bin/python3.11", "attestation": "pidfd"},
    "lease_id": "lease_0123456789abcdef", "request_id": "req_0123456789abcdef0123",
}


def per_call_us(fn: Any, n: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50_000)
    n = parser.parse_args().n

    def build() -> dict[str, Any]:
        return events.make_event("mcp.tool_call", host="h", now=NOW, redact_keys=["password"],
                                 **CALL_EVENT)

    size = len(events._encoder.encode(build()))
    built = build()
    cap_only = per_call_us(lambda: events.cap_event(built), n)
    capped = per_call_us(build, n)
    original = events.cap_event
    events.cap_event = lambda event, **caps: event  # type: ignore[assignment]
    try:
        uncapped = per_call_us(build, n)
    finally:
        events.cap_event = original
    print(f"make_event ({size} B event)   with caps {capped:6.2f} us   without {uncapped:6.2f} us"
          f"   cap_event alone {cap_only:5.2f} us/event")

    limit = AuditConfig().rejections_per_uid
    lim = RejectionLimiter(burst=limit.burst, per_seconds=limit.per_seconds, max_keys=limit.max_uids)
    clock = [0.0]

    def refuse() -> None:
        clock[0] += 1e-6
        lim.admit(65534, "not_found", clock[0])

    print(f"limiter admit (suppressed)   {per_call_us(refuse, n):6.2f} us/refusal")

    line = REJECTION_EVENT_BYTES + 1
    per_window = (limit.burst + 1) * line
    print(f"audit bound per attacking uid: ({limit.burst} events + 1 summary) x {line} B "
          f"per {limit.per_seconds:g} s = {per_window} B per window = "
          f"{per_window / limit.per_seconds / 1024:.1f} KiB/s "
          f"({per_window * 86400 / limit.per_seconds / 2**30:.2f} GiB/day)")
    listen = ListenConfig()
    print(f"connections: {listen.max_connections} in all; an anonymous uid "
          f"{listen.max_connections_per_anonymous_uid}, all anonymous uids together "
          f"{listen.max_anonymous_connections} (so {listen.max_connections - listen.max_anonymous_connections}"
          f" slots only attested callers can take); a service uid "
          f"{listen.max_connections_per_service_uid}; silent connections closed after "
          f"{listen.first_request_timeout_s:g} s (keep-alive idle {listen.idle_timeout_s:g} s)")


if __name__ == "__main__":
    main()
