"""Pure tests (no trio, no daemon): the per-uid rejection audit limiter and the audit
event size caps that together bound what a refused caller can make sidekey write."""

from __future__ import annotations

import datetime
import json

import msgspec
import pytest

from sidekey.audit.events import (
    MAX_EVENT_BYTES,
    MAX_STRING_BYTES,
    cap_event,
    cap_string,
    make_event,
)
from sidekey.audit.ratelimit import MAX_CODES_PER_WINDOW, OTHER_CODE, RejectionLimiter

NOW = datetime.datetime(2026, 4, 7, 14, 23, 11, tzinfo=datetime.UTC)


def _size(value: object) -> int:
    return len(msgspec.json.encode(value))


# --------------------------------------------------------------------------- limiter


def test_burst_then_counts_then_one_summary_at_the_next_refusal() -> None:
    lim = RejectionLimiter(burst=3, per_seconds=10, max_keys=100)
    t = 1000.0
    assert [lim.admit(7, "not_found", t + i * 0.1) for i in range(5)] == [True] * 3 + [False] * 2
    assert not lim.admit(7, "bad_http", t + 1)
    assert lim.take() == []  # the window is still open
    # the next refusal after the window: the summary comes first, then a fresh burst
    assert lim.admit(7, "not_found", t + 10)
    [s] = lim.take()
    assert (s.key, s.window_start, s.window_end, s.reason) == (7, t, t + 10, "interval")
    assert s.counts == {"bad_http": 1, "not_found": 2} and s.total == 3 and s.written == 3


def test_keys_are_independent() -> None:
    lim = RejectionLimiter(burst=1, per_seconds=10, max_keys=100)
    assert lim.admit(1, "x", 0.0)
    assert not lim.admit(1, "x", 0.5)
    assert lim.admit(2, "x", 0.5)  # another uid has its own burst


def test_window_without_suppression_leaves_no_summary() -> None:
    lim = RejectionLimiter(burst=5, per_seconds=10, max_keys=100)
    for i in range(5):
        assert lim.admit(1, "x", float(i))
    lim.expire(100.0)
    assert lim.take() == [] and lim.tracked == 0


def test_expire_closes_only_ended_windows() -> None:
    lim = RejectionLimiter(burst=1, per_seconds=10, max_keys=100)
    lim.admit(1, "a", 0.0)
    lim.admit(1, "a", 1.0)
    lim.admit(2, "b", 5.0)
    lim.admit(2, "b", 6.0)
    lim.expire(12.0)
    [s] = lim.take()
    assert s.key == 1 and s.counts == {"a": 1} and s.window_end == 10.0
    assert lim.tracked == 1
    lim.expire(15.0)
    [s2] = lim.take()
    assert s2.key == 2 and s2.counts == {"b": 1}


def test_lru_eviction_hands_over_counts() -> None:
    lim = RejectionLimiter(burst=1, per_seconds=100, max_keys=2)
    for key in (1, 2):
        lim.admit(key, "x", 0.0)
        lim.admit(key, "x", 0.0)
    lim.admit(1, "x", 1.0)  # 1 is now the most recently refused
    lim.admit(3, "x", 2.0)  # evicts 2, the least recently refused
    [s] = lim.take()
    assert s.key == 2 and s.reason == "evicted" and s.total == 1 and s.window_end == 2.0
    assert lim.tracked == 2


def test_close_all_reports_every_open_window() -> None:
    lim = RejectionLimiter(burst=1, per_seconds=100, max_keys=10)
    for key in (1, 2, 3):
        lim.admit(key, "x", 0.0)
    lim.admit(1, "x", 0.0)
    lim.admit(3, "y", 0.0)
    lim.close_all(5.0)
    summaries = lim.take()
    assert [(s.key, s.counts, s.reason) for s in summaries] == [
        (1, {"x": 1}, "shutdown"), (3, {"y": 1}, "shutdown")]
    assert lim.tracked == 0


def test_clock_stepping_back_starts_a_new_window() -> None:
    lim = RejectionLimiter(burst=1, per_seconds=10, max_keys=10)
    lim.admit(1, "x", 100.0)
    lim.admit(1, "x", 101.0)
    assert lim.admit(1, "x", 50.0)  # wall clock stepped back: old window closed
    [s] = lim.take()
    assert s.total == 1 and s.window_end >= s.window_start


def test_codes_per_window_are_bounded() -> None:
    lim = RejectionLimiter(burst=1, per_seconds=10, max_keys=10)
    lim.admit(1, "first", 0.0)
    for i in range(MAX_CODES_PER_WINDOW + 10):
        lim.admit(1, f"code_{i}", 0.0)
    lim.close_all(1.0)
    [s] = lim.take()
    assert len(s.counts) == MAX_CODES_PER_WINDOW + 1
    assert s.counts[OTHER_CODE] == 10 and s.total == MAX_CODES_PER_WINDOW + 10


def test_events_per_window_bound_under_sustained_flood() -> None:
    """The stated bound: per uid, at most burst full events + 1 summary per window."""
    burst, per = 20, 10.0
    lim = RejectionLimiter(burst=burst, per_seconds=per, max_keys=10)
    full = 0
    summaries = 0
    t = 0.0
    while t < 60.0:  # 1,000 refusals a second for a minute
        full += lim.admit(65534, "not_found", t)
        summaries += len(lim.take())
        t += 0.001
    lim.close_all(t)
    summaries += len(lim.take())
    windows = 6 + 1
    assert full <= windows * burst and summaries <= windows


def test_reconfigure_applies_to_open_windows() -> None:
    lim = RejectionLimiter(burst=1, per_seconds=10, max_keys=10)
    lim.admit(1, "x", 0.0)
    assert not lim.admit(1, "x", 0.1)
    lim.configure(burst=5, per_seconds=10, max_keys=10)
    assert lim.admit(1, "x", 0.2)
    with pytest.raises(ValueError):
        lim.configure(burst=0, per_seconds=10, max_keys=10)


# --------------------------------------------------------------------------- event caps


def test_cap_string_keeps_short_strings_and_marks_cuts() -> None:
    assert cap_string("short") == "short"
    exact = "a" * MAX_STRING_BYTES
    assert cap_string(exact) == exact
    cut = cap_string("a" * 20_000)
    assert cut == "a" * (MAX_STRING_BYTES - 48) + "…(truncated 19024 bytes)"
    assert _size(cut) - 2 <= MAX_STRING_BYTES
    dropped = int(cut.rsplit("truncated ", 1)[1].split()[0])
    assert len(cut.split("…(truncated")[0]) + dropped == 20_000


@pytest.mark.parametrize("char", ["\x01", "é", "€", "😀", '"'])
def test_cap_string_counts_encoded_bytes(char: str) -> None:
    """Escaped control characters (6 bytes) and multi-byte UTF-8 are measured as written."""
    cut = cap_string(char * 5000)
    assert _size(cut) - 2 <= MAX_STRING_BYTES
    assert "truncated" in cut


def test_make_event_caps_every_string_including_nested() -> None:
    long = "x" * 50_000
    event = make_event(
        "request.rejected", host="h", now=NOW, redact_keys=[],
        error={"code": "not_found", "message": long, "status": 404},
        peer={"pid": 1, "uid": 2, "exe": long}, extra={"path": long, "list": [long, 1]},
        arguments={"a": "y" * 3000},
    )
    for value in (event["error"]["message"], event["peer"]["exe"], event["path"],
                  event["list"][0], event["arguments"]["a"]):
        assert _size(value) - 2 <= MAX_STRING_BYTES
        assert "truncated" in value
    assert event["list"][1] == 1 and event["error"]["code"] == "not_found"
    assert _size(event) <= MAX_EVENT_BYTES


def test_cap_event_does_not_modify_the_callers_values() -> None:
    auth = {"sub": "alice", "note": "n" * 5000}
    event = make_event("mcp.authorize", host="h", now=NOW, redact_keys=[], auth=auth)
    assert auth["note"] == "n" * 5000 and "truncated" in event["auth"]["note"]
    small = {"sub": "alice"}
    event2 = make_event("mcp.authorize", host="h", now=NOW, redact_keys=[], auth=small)
    assert event2["auth"] is small  # nothing to cap: no copy on the hot path


def test_whole_event_over_the_cap_is_shrunk_largest_field_first() -> None:
    policy = {"rules": [f"rule-{i}-" + "r" * 900 for i in range(40)]}  # ~37 KB of short strings
    event = make_event("mcp.authorize", host="h", now=NOW, redact_keys=[], server="content-api",
                       policy=policy, result={"status": "allow"})
    assert _size(event) <= MAX_EVENT_BYTES
    assert event["policy"]["_truncated"] is True and event["policy"]["size"] > MAX_EVENT_BYTES
    assert event["result"] == {"status": "allow"} and event["server"] == "content-api"
    assert event["event_type"] == "mcp.authorize"


def test_event_with_very_many_fields_still_fits() -> None:
    extra = {f"k{i}": "v" * 1000 for i in range(100)}
    event = make_event("request.rejected", host="h", now=NOW, redact_keys=[], extra=extra)
    assert _size(event) <= MAX_EVENT_BYTES
    assert event["_truncated"]["size"] > MAX_EVENT_BYTES
    assert event["event_type"] == "request.rejected" and "event_id" in event
    json.dumps(event)


def test_cap_event_idempotent_on_small_events() -> None:
    event = make_event("daemon.started", host="h", now=NOW, redact_keys=[], extra={"pid": 1})
    assert cap_event(dict(event)) == event


def test_tighter_caps_for_refusal_events() -> None:
    """The daemon builds refused callers' events with smaller caps (its bound)."""
    long = "p" * 10_000
    event = make_event(
        "request.rejected", host="h", now=NOW, redact_keys=[], max_string_bytes=512,
        max_event_bytes=4096, error={"code": "not_found", "message": long, "status": 404},
        peer={"pid": 1, "uid": 2, "exe": long, "unit": long}, extra={"path": long},
    )
    assert _size(event) <= 4096
    assert all(_size(v) - 2 <= 512 for v in (event["path"], event["peer"]["exe"],
                                               event["peer"]["unit"], event["error"]["message"]))
    assert event["peer"]["uid"] == 2
