"""Issue 9, item 7: call records cannot exhaust the daemon's memory.

``authorize`` keeps each call's arguments (for the ``mcp.tool_call`` event at release)
until the call's lease ends. They used to stay until redeem, for up to 100,000 tokens,
whatever their size and whether or not the token expired (600 MB after 4,000 authorizes
with 32 KB arguments). Now records are dropped at token expiry and at lease end, held
as the canonical JSON already made for the digest (so the bytes counted are the bytes
held), and bounded per server (``leases.pending_bytes_per_server``) and in total
(``leases.pending_bytes_total``): over budget, the server's own oldest records go.
"""

from __future__ import annotations

import datetime
import json
import time
from typing import Any

import psutil
import pytest

from harness import Daemon
from sidekey.pending import ENTRY_OVERHEAD_BYTES, CallRecords

MIB = 1 << 20

# --------------------------------------------------------------------------- the helper, pure


def records(per_owner: int = 10_000, total: int = 100_000) -> CallRecords[str]:
    return CallRecords(per_owner_bytes=per_owner, total_bytes=total)


def test_records_expire_in_expiry_order_whatever_the_insertion_order() -> None:
    r = records()
    r.put("long", "v", owner="a", size=10, expires_at=100.0, now=0.0)
    r.put("short", "v", owner="a", size=10, expires_at=5.0, now=0.0)
    assert r.sweep(4.9) == 0 and len(r) == 2
    assert r.sweep(5.0) == 1 and "short" not in r and "long" in r
    assert r.bytes == 10 + ENTRY_OVERHEAD_BYTES
    # an insert sweeps too
    r.put("x", "v", owner="b", size=1, expires_at=200.0, now=150.0)
    assert "long" not in r and len(r) == 1 and r.expired == 2


def test_an_owner_over_budget_evicts_its_own_oldest_only() -> None:
    unit = 1000 + ENTRY_OVERHEAD_BYTES
    r = records(per_owner=3 * unit, total=100 * unit)
    r.put("b1", "v", owner="b", size=1000, expires_at=1e9, now=0.0)
    for i in range(10):
        r.put(f"a{i}", "v", owner="a", size=1000, expires_at=1e9, now=0.0)
    assert [k for k in ("a7", "a8", "a9") if k in r] == ["a7", "a8", "a9"]
    assert len(r) == 4 and "b1" in r and r.evicted == 7
    assert r.stats()["bytes_by_server"] == {"a": 3 * unit, "b": unit}


def test_a_full_total_evicts_from_the_biggest_owner() -> None:
    unit = 1000 + ENTRY_OVERHEAD_BYTES
    r = records(per_owner=10 * unit, total=6 * unit)
    r.put("b1", "v", owner="b", size=1000, expires_at=1e9, now=0.0)
    r.put("b2", "v", owner="b", size=1000, expires_at=1e9, now=0.0)
    for i in range(8):
        r.put(f"a{i}", "v", owner="a", size=1000, expires_at=1e9, now=0.0)
    assert "b1" in r and "b2" in r and r.bytes <= 6 * unit
    assert r.stats()["bytes_by_server"] == {"a": 4 * unit, "b": 2 * unit}


def test_move_refiles_a_record_with_its_new_expiry_and_pop_forgets_owners() -> None:
    r = records()
    r.put("jti", "call", owner="a", size=100, expires_at=10.0, now=0.0)
    assert r.move("jti", "lease", expires_at=50.0, now=1.0) == "call"
    assert "jti" not in r and r.sweep(20.0) == 0 and r.get("lease") == "call"
    assert r.move("gone", "x", expires_at=1.0, now=1.0) is None
    assert r.pop("lease") == "call" and r.bytes == 0 and r.stats()["bytes_by_server"] == {}


def test_the_heap_stays_proportional_to_live_records() -> None:
    r = records(per_owner=1 << 40, total=1 << 40)
    for i in range(20_000):
        r.put(f"k{i}", "v", owner="a", size=1, expires_at=1e9, now=0.0)
        r.pop(f"k{i}")
    assert len(r) == 0 and len(r._heap) <= 1024 + 2


# --------------------------------------------------------------------------- a real daemon

pytestmark = pytest.mark.timeout(240)


def status(d: Daemon) -> dict[str, Any]:
    code, body = d.request("GET", "/v1/status")
    assert code == 200, body
    return body


def rss(d: Daemon) -> int:
    assert d.proc is not None
    return int(psutil.Process(d.proc.pid).memory_info().rss)


def wide_arguments(size: int) -> dict[str, Any]:
    """Arguments of ``size`` bytes of JSON that are ~20 times bigger as Python objects
    (empty lists): the shape a compromised server would pick."""
    return {"rows": [[] for _ in range((size - 20) // 3)]}


def wait_for(pred: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


@pytest.mark.integration
def test_unredeemed_calls_are_held_compactly_and_dropped_at_expiry(make_daemon: Any) -> None:
    # Default budgets (64 MiB per server): only the token expiry and the encoding bound it.
    d: Daemon = make_daemon({"tokens": {"ttl_seconds": 20, "leeway_seconds": 0}}).start()
    args = wide_arguments(30_000)
    code, body = d.authorize(arguments=args)  # warm up
    assert code == 200, body
    exps = [datetime.datetime.fromisoformat(body["expires_at"]).timestamp()]
    before = rss(d)
    for i in range(150):  # ~4.5 MB of JSON, ~90 MB as Python objects
        code, body = d.authorize(arguments=args)
        assert code == 200, (i, body)
        exps.append(datetime.datetime.fromisoformat(body["expires_at"]).timestamp())
    grown = rss(d) - before
    # Before: every record kept as decoded objects, ~600 KB each (grew ~90 MB).
    assert grown < 40 * MIB, grown
    # Held: every record whose token has not expired on the daemon's (wall) clock. On a
    # loaded machine the first ones may have expired already: count them from their exp
    # rather than assume the 151 calls took less than the 20 s TTL.
    t0 = time.time()
    pending = status(d)["pending_calls"]
    t1 = time.time()
    live = sum(exp > t1 for exp in exps)  # surely held (dropped when exp <= now)
    unsure = sum(t0 < exp <= t1 for exp in exps)  # expired during the status call, or not
    assert live <= pending["count"] <= live + unsure, (pending, live, unsure)
    count = pending["count"]
    assert count * 30_000 <= pending["bytes"] <= count * 32_000, pending
    # Never redeemed: gone once the tokens expire (20 s; the daemon sweeps every second).
    drained = wait_for(lambda: status(d)["pending_calls"]["count"] == 0, timeout=40.0)
    assert drained, status(d)["pending_calls"]
    assert status(d)["pending_calls"]["bytes"] == 0


@pytest.mark.integration
def test_a_flooding_server_evicts_only_its_own_records(make_daemon: Any) -> None:
    d: Daemon = make_daemon({
        "tokens": {"ttl_seconds": 300},  # no record expires during the flood, however slow
        "leases": {"pending_bytes_per_server": 1 * MIB, "pending_bytes_total": 2 * MIB},
    }).start()
    # An honest server's calls first, then a flood from another server.
    for _ in range(5):
        code, body = d.authorize("analytics-db", "query_metrics", arguments={"q": "x" * 20_000})
        assert code == 200, body
    honest = status(d)["pending_calls"]["bytes_by_server"]["analytics-db"]
    for i in range(150):
        code, body = d.authorize(arguments={"blob": "y" * 30_000})
        assert code == 200, (i, body)
    pending = status(d)["pending_calls"]
    assert pending["bytes_by_server"]["content-api"] <= 1 * MIB
    assert pending["bytes_by_server"]["analytics-db"] == honest  # untouched by the flood
    assert pending["bytes"] <= 2 * MIB and pending["evicted"] >= 100
    assert pending["budget_per_server"] == 1 * MIB and pending["budget_total"] == 2 * MIB


@pytest.mark.integration
def test_lease_records_end_with_the_lease_and_an_evicted_one_is_marked(make_daemon: Any) -> None:
    short: Daemon = make_daemon({
        "tokens": {"ttl_seconds": 60},
        "leases": {"max_ttl_seconds": 2, "pending_bytes_per_server": 1 * MIB},
    }).start()
    # Redeemed, never released: the record lives as long as the lease, then goes (at
    # the lease's expiry, or the token leeway of 5 s later at the latest). Counted
    # against each lease's own expiry (bracketing the status call), not assumed alive
    # because three calls took less than 2 s.
    ends: list[float] = []
    for _ in range(3):
        code, body = short.authorize(arguments={"title": "kept until the lease ends"})
        assert code == 200
        code, lease = short.request("POST", "/v1/redeem",
                                    {"resolution_token": body["resolution_token"]})
        assert code == 200, lease
        # expires_at is shown to the second (truncated): the lease ends within [shown, +1).
        ends.append(datetime.datetime.fromisoformat(lease["expires_at"]).timestamp())
    t0 = time.time()
    count = status(short)["pending_calls"]["count"]
    t1 = time.time()
    assert sum(end > t1 for end in ends) <= count <= sum(end + 1 + 5 > t0 for end in ends)
    assert count <= 3
    assert wait_for(lambda: status(short)["pending_calls"]["count"] == 0, timeout=60), \
        status(short)["pending_calls"]

    # Leases that outlive any slowness of the test from here on.
    d: Daemon = make_daemon({
        "tokens": {"ttl_seconds": 300},
        "leases": {"pending_bytes_per_server": 1 * MIB},
    }).start()
    # A lease whose record was pushed out by its own server's later calls: the release
    # still works, and its event points at the mcp.authorize event (same jti).
    code, body = d.authorize(arguments={"title": "first"})
    code, lease = d.request("POST", "/v1/redeem", {"resolution_token": body["resolution_token"]})
    assert code == 200
    for _ in range(60):
        assert d.authorize(arguments={"blob": "y" * 30_000})[0] == 200
    code, released = d.request("POST", "/v1/release",
                               {"lease_id": lease["lease_id"], "status": "success"})
    assert code == 200, released
    event = next(e for e in d.wait_events("mcp.tool_call") if e["lease_id"] == lease["lease_id"])
    assert event["call_record"] == "dropped" and event["arguments"] is None and event["jti"]
    authorized = [e for e in d.events_of("mcp.authorize") if e.get("jti") == event["jti"]]
    assert authorized and authorized[0]["arguments"] == {"title": "first"}
    # A record that stayed is in the event as before.
    code, body = d.authorize(arguments={"title": "second"})
    code, lease = d.request("POST", "/v1/redeem", {"resolution_token": body["resolution_token"]})
    code, _ = d.request("POST", "/v1/release", {"lease_id": lease["lease_id"], "status": "success"})
    event = next(e for e in d.wait_events("mcp.tool_call", 2) if e["lease_id"] == lease["lease_id"])
    assert event["arguments"] == {"title": "second"} and "call_record" not in event
    assert event["auth"]["verified"] is True and event["policy"]["decision"] == "allow"
    assert json.dumps(event)  # plain JSON all the way


# --------------------------------------------------------------------------- the audit queue


async def test_a_steady_stream_of_queued_audit_events_is_flushed_on_time(
    tmp_path: Any, autojump_clock: Any
) -> None:
    """Found by benchmarks/bench_memory.py: each queued (durable=False) event pushed the
    deferred flush back by DEFERRED_FLUSH_S, so under a steady stream of allowed
    authorizes nothing was written until the queue was full (10,000 events, up to
    64 MiB held, then 503 audit_unavailable for the calls).

    On trio's virtual clock (fsync=False commits on the event loop, no thread), so the
    stream's 10 ms steps and the flush deadline are exact however loaded the machine is."""
    import trio

    from sidekey.audit import jsonl

    path = tmp_path / "audit.jsonl"
    sink = jsonl.open_jsonl_sink(path, fsync=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        written_during_stream = 0
        for i in range(100):  # one event every 10 ms for 1 s
            await sink.write({"event_type": "mcp.authorize", "n": i}, durable=False)
            await trio.sleep(0.01)
            if i == 60:
                written_during_stream = len(path.read_bytes().splitlines())
        await sink.aclose()
        nursery.cancel_scope.cancel()
    assert written_during_stream >= 40, written_during_stream
    assert len(path.read_bytes().splitlines()) == 100
