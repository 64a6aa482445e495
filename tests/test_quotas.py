"""quotas: plans from the seed rate-limits.yaml, interpretation, thresholds, shedding. Pure."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidekey import quotas
from sidekey.config import DepartmentLimits, Limits
from sidekey.policy import Denial
from sidekey.quotas import MonthlyCheck, QuotaPlan, RateCheck, SessionCheck
from sidekey.store import CounterOp, RateOp, SessionOp

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT.parent / "shared" / "seed-configs" / "rate-limits.yaml"
# test_config checks that the quickstart copy is the seed file, byte for byte.
QUICKSTART = ROOT / "examples" / "quickstart" / "rate-limits.yaml"

UTC = datetime.UTC
NOW = datetime.datetime(2026, 11, 15, 12, 0, 0, tzinfo=UTC)
SAFE_KEY = re.compile(r"^[A-Za-z0-9._@%#:-]+$")


class _RateFile(msgspec.Struct, forbid_unknown_fields=True):
    limits: Limits


def _seed_limits() -> Limits:
    path = SEED if SEED.is_file() else QUICKSTART
    return msgspec.yaml.decode(path.read_bytes(), type=_RateFile).limits


LIMITS = _seed_limits()


def _plan(**kw: object) -> QuotaPlan:
    args: dict[str, object] = {
        "user": "alice",
        "tool": "query_metrics",
        "department": "engineering",
        "session_id": "s1",
        "now": NOW,
    }
    args.update(kw)
    return quotas.plan(LIMITS, **args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- plan


def test_plan_from_seed_keys_limits_and_order() -> None:
    p = _plan()
    assert [type(c) for c in p.checks] == [
        SessionCheck, RateCheck, RateCheck, RateCheck, MonthlyCheck
    ]
    sess, tool_min, user_min, user_hour, month = p.checks
    assert isinstance(sess, SessionCheck)
    assert (sess.key, sess.user, sess.session_id, sess.max_sessions) == (
        "sessions:alice", "alice", "s1", 5
    )
    assert sess.label == "per-user concurrent_sessions (5)"
    assert sess.idle_s == quotas.DEFAULT_SESSION_IDLE_S
    assert isinstance(tool_min, RateCheck)
    assert (tool_min.key, tool_min.limit, tool_min.period_s) == (
        "rate:usertool:alice:query_metrics:minute", 30, 60.0
    )
    assert tool_min.label == "per-tool query_metrics requests_per_minute (30)"
    assert tool_min.name == "per_tool.query_metrics.requests_per_minute"
    assert isinstance(user_min, RateCheck)
    assert (user_min.key, user_min.limit, user_min.period_s) == ("rate:user:alice:minute", 60, 60.0)
    assert user_min.label == "per-user requests_per_minute (60)"
    assert isinstance(user_hour, RateCheck)
    assert (user_hour.key, user_hour.limit, user_hour.period_s) == (
        "rate:user:alice:hour", 500, 3600.0
    )
    assert isinstance(month, MonthlyCheck)
    assert (month.key, month.limit, month.month) == ("month:engineering:2026-11", 50000, "2026-11")
    assert month.expires_at == datetime.datetime(2026, 12, 1, tzinfo=UTC)
    assert month.expires_at_s == month.expires_at.timestamp()
    assert month.label == "department engineering monthly_tool_calls (50000)"
    assert p.now_s == NOW.timestamp()


def test_plan_skips_what_is_not_configured_or_known() -> None:
    # A tool without per-tool limits, no session, no department.
    p = _plan(tool="list_articles", session_id=None, department=None)
    assert [c.key for c in p.checks] == ["rate:user:alice:minute", "rate:user:alice:hour"]
    # An unknown department has no monthly quota.
    assert not any(isinstance(c, MonthlyCheck) for c in _plan(department="sales").checks)
    # No limits at all: nothing to check.
    assert quotas.plan(
        Limits(), user="u", tool="t", department="d", session_id="s", now=NOW
    ).checks == ()


def test_plan_marketing_and_delete_record() -> None:
    p = _plan(tool="delete_record", department="marketing", user="bob")
    by_key = {c.key: c for c in p.checks}
    tool_check = by_key["rate:usertool:bob:delete_record:minute"]
    assert isinstance(tool_check, RateCheck) and tool_check.limit == 2
    month = by_key["month:marketing:2026-11"]
    assert isinstance(month, MonthlyCheck) and month.limit == 20000


@pytest.mark.parametrize(
    ("now", "month", "end"),
    [
        (datetime.datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC), "2026-11",
         datetime.datetime(2026, 12, 1, tzinfo=UTC)),
        (datetime.datetime(2026, 12, 1, 0, 0, 0, tzinfo=UTC), "2026-12",
         datetime.datetime(2027, 1, 1, tzinfo=UTC)),
        (datetime.datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "2026-12",
         datetime.datetime(2027, 1, 1, tzinfo=UTC)),
        # 2026-12-01T00:30 in UTC+1 is still November in UTC.
        (datetime.datetime(2026, 12, 1, 0, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=1))),
         "2026-11", datetime.datetime(2026, 12, 1, tzinfo=UTC)),
        # Naive datetimes are UTC.
        (datetime.datetime(2026, 12, 1), "2026-12", datetime.datetime(2027, 1, 1, tzinfo=UTC)),
    ],
)
def test_month_rollover_at_the_boundary(
    now: datetime.datetime, month: str, end: datetime.datetime
) -> None:
    check = _plan(now=now).checks[-1]
    assert isinstance(check, MonthlyCheck)
    assert check.month == month
    assert check.key == f"month:engineering:{month}"
    assert check.expires_at == end


def test_keys_of_odd_and_long_ids_are_safe_bounded_and_distinct() -> None:
    assert quotas.key_part("alice@example.com") == "alice@example.com"
    assert quotas.key_part("local:alice") == "local%3Aalice"
    assert quotas.key_part("a~b") == "a%7Eb"
    long = "x" * 500
    hashed = quotas.key_part(long)
    assert hashed.startswith("#") and len(hashed) == 33
    assert quotas.key_part("") .startswith("#")
    # A user containing the separator cannot pose as a user/tool pair.
    a = _plan(user="a:b", tool="query_metrics").checks[1].key
    b = _plan(user="a", tool="query_metrics").checks[1].key
    assert a != b and a.count(":") == b.count(":") == 4
    for user in (long, "ünïcödé user", "\x00\n:*?[]{}", "uid:1000"):
        for c in _plan(user=user, session_id=long, department="engineering").checks:
            assert len(c.key) <= quotas.MAX_KEY_LEN and SAFE_KEY.match(c.key), c.key


def test_key_part_keeps_encodings_up_to_the_bound() -> None:
    """An encoding of exactly MAX_KEY_PART characters is kept readable (store keys stay
    stable and greppable); one character more is hashed."""
    n = quotas.MAX_KEY_PART
    assert quotas.key_part("a" * n) == "a" * n
    assert quotas.key_part("a" * (n - 3) + ":") == "a" * (n - 3) + "%3A"  # 64 once encoded
    assert quotas.key_part("a" * (n + 1)).startswith("#")
    assert quotas.key_part("a" * (n - 2) + ":").startswith("#")  # 65 once encoded


@given(st.text(), st.text())
def test_key_part_is_injective_safe_and_bounded(x: str, y: str) -> None:
    kx, ky = quotas.key_part(x), quotas.key_part(y)
    assert len(kx) <= quotas.MAX_KEY_PART
    assert re.fullmatch(r"[A-Za-z0-9._@%-]+|#[0-9a-f]{32}", kx)
    assert (kx == ky) == (x == y)


@given(st.text(min_size=1), st.text(min_size=1), st.text(min_size=1), st.text(min_size=1))
def test_every_plan_key_is_bounded(user: str, tool: str, dept: str, session: str) -> None:
    limits = Limits(
        per_user=LIMITS.per_user,
        per_tool={tool: LIMITS.per_tool["query_metrics"]},
        per_department={dept: LIMITS.per_department["engineering"]},
    )
    p = quotas.plan(limits, user=user, tool=tool, department=dept, session_id=session, now=NOW)
    assert len(p.checks) == 5
    for c in p.checks:
        assert len(c.key) <= quotas.MAX_KEY_LEN
        assert SAFE_KEY.match(c.key)


# --------------------------------------------------------------------------- interpret

ALL_OK: list[quotas.StoreAnswer] = [(True, 1), (True, 0.0), (True, 0.0), (True, 0.0), 10]


def test_interpret_all_pass() -> None:
    p = _plan()
    assert quotas.interpret(p, ALL_OK) is None
    assert quotas.interpret(p, []) is None


def test_interpret_picks_first_exhausted_rate_limit_with_retry_after() -> None:
    p = _plan()
    # Both the per-user minute and hour limits are exhausted: the first in plan order fires.
    results: list[quotas.StoreAnswer] = [(True, 2), (True, 0.0), (False, 1.25), (False, 300.0), 10]
    d = quotas.interpret(p, results)
    assert d is not None
    assert (d.code, d.status, d.limit, d.retry_after_s) == (
        "rate_limited", 429, "per_user.requests_per_minute", 1.25
    )
    assert "per-user requests_per_minute (60)" in d.message and "1.25 s" in d.message
    assert d.details == {
        "limit": "per_user.requests_per_minute",
        "label": "per-user requests_per_minute (60)",
        "max": 60,
        "period_s": 60.0,
        "retry_after_s": 1.25,
    }
    assert d.retry_after_header == "2"
    # The daemon stops at the first denial: a short answer list is fine.
    assert quotas.interpret(p, results[:3]) == d


def test_interpret_tool_limit_and_hour_limit() -> None:
    p = _plan()
    d = quotas.interpret(p, [(True, 1), (False, 0.5)])
    assert d is not None and d.limit == "per_tool.query_metrics.requests_per_minute"
    assert "per-tool query_metrics requests_per_minute (30)" in d.message
    d = quotas.interpret(p, [(True, 1), (True, 0.0), (True, 0.0), (False, 3599.0)])
    assert d is not None and d.limit == "per_user.requests_per_hour"
    assert d.retry_after_header == "3599"


def test_interpret_sessions() -> None:
    d = quotas.interpret(_plan(), [(False, 5)])
    assert d is not None
    assert (d.code, d.status, d.limit, d.retry_after_s) == (
        "rate_limited", 429, "per_user.concurrent_sessions", quotas.DEFAULT_SESSION_IDLE_S
    )
    assert d.details["reason"] == "too_many_sessions"
    assert d.details["active_sessions"] == 5 and d.details["max"] == 5
    assert "per-user concurrent_sessions (5)" in d.message


def test_interpret_monthly_exhausted_retry_until_month_end() -> None:
    now = datetime.datetime(2026, 11, 30, 23, 59, 0, tzinfo=UTC)
    p = _plan(now=now)
    ok = [(True, 1), (True, 0.0), (True, 0.0), (True, 0.0)]
    assert quotas.interpret(p, [*ok, 50000]) is None  # the 50000th call is allowed
    d = quotas.interpret(p, [*ok, 50001])
    assert d is not None
    assert (d.code, d.status, d.retry_after_s) == ("rate_limited", 429, 60.0)
    assert d.details["reason"] == "monthly_quota_exhausted"
    assert d.details["resets_at"] == "2026-12-01T00:00:00Z"
    assert d.details["department"] == "engineering" and d.details["month"] == "2026-11"
    assert "department engineering monthly_tool_calls (50000)" in d.message


def test_store_ops_are_the_plan_in_order() -> None:
    """What the daemon sends to the store in its one quota round trip: one op per check,
    in plan order, each with the check's key, limit and period (a dropped or mistyped op
    would leave a limit unenforced), the monthly counter stopping the batch above it."""
    p = _plan()
    month = p.checks[-1]
    assert isinstance(month, MonthlyCheck)
    assert quotas.store_ops(p) == [
        SessionOp("alice", "s1", quotas.DEFAULT_SESSION_IDLE_S, 5),
        RateOp("rate:usertool:alice:query_metrics:minute", 30, 60.0),
        RateOp("rate:user:alice:minute", 60, 60.0),
        RateOp("rate:user:alice:hour", 500, 3600.0),
        CounterOp("month:engineering:2026-11", month.expires_at_s, stop_above=50000),
    ]
    assert [type(op) for op in quotas.store_ops(_plan(session_id=None, department=None))] == [
        RateOp, RateOp, RateOp
    ]
    assert quotas.store_ops(QuotaPlan(user="u", tool="t", department=None, now=NOW)) == []


def test_interpret_rejects_wrong_answers() -> None:
    p = _plan()
    with pytest.raises(ValueError, match="6 store answers for 5 checks"):
        quotas.interpret(p, [*ALL_OK, 1])
    with pytest.raises(TypeError):
        quotas.interpret(p, [3])  # a count for the session check
    with pytest.raises(TypeError):
        quotas.interpret(p, [*ALL_OK[:4], (True, 1.0)])  # a pair for the monthly counter
    with pytest.raises(TypeError):
        quotas.interpret(p, [*ALL_OK[:4], True])  # bool is not a count
    # A pair must be a tuple (bool, number): anything else is a local bug, never an
    # answer to read as "allowed" (a truthy 1 or "false", a list, a longer tuple).
    for bad in [(1, 0.0), ("false", 0.0), (None, 0.0), [True, 0.0], [False, 0.5],
                (True, 0.0, 0.0), (False,), ()]:
        with pytest.raises(TypeError, match="the store answers"):
            quotas.interpret(p, [(True, 1), bad])  # type: ignore[list-item]


def test_denial_mappings() -> None:
    d = quotas.interpret(_plan(), [(True, 1), (False, 0.2)])
    assert d is not None
    pd = d.to_policy_denial()
    assert pd == Denial(code="rate_limited", message=d.message, status=429)
    err = d.to_error()
    assert (err.status, err.code, err.message) == (429, "rate_limited", d.message)
    assert err.details["retry_after_s"] == 0.2
    assert d.retry_after_header == "1"  # never 0


def test_as_hooks_replays_rules_then_stops() -> None:
    p = _plan()
    hooks = quotas.as_hooks(p, ALL_OK)
    out = [h(None, "alice") for h in hooks]  # type: ignore[arg-type]
    assert out == [c.rule for c in p.checks]
    assert out[0] == "quota.ok:per_user.concurrent_sessions"
    hooks = quotas.as_hooks(p, [(True, 1), (False, 2.0), (True, 0.0)])
    assert len(hooks) == 2
    last = hooks[-1](None, "alice")  # type: ignore[arg-type]
    assert isinstance(last, Denial) and last.code == "rate_limited"


# --------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(
    ("previous", "current", "limit", "expected"),
    [
        (79, 81, 100, [80]),
        (85, 100, 100, [90, 100]),
        (0, 100, 100, [80, 90, 100]),
        (80, 81, 100, []),  # 80 was reached by the previous increment
        (79, 80, 100, [80]),
        (100, 150, 100, []),
        (39999, 40000, 50000, [80]),
        (39998, 39999, 50000, []),
        (44999, 45000, 50000, [90]),
        (49999, 50000, 50000, [100]),
        (50000, 50001, 50000, []),
        (0, 1, 1, [80, 90, 100]),
    ],
)
def test_thresholds_crossed(previous: int, current: int, limit: int, expected: list[int]) -> None:
    assert quotas.thresholds_crossed(previous, current, limit) == expected


def test_thresholds_custom_marks_and_bad_limit() -> None:
    assert quotas.thresholds_crossed(0, 50, 100, marks=(50, 25, 50)) == [25, 50]
    with pytest.raises(ValueError):
        quotas.thresholds_crossed(0, 1, 0)


@given(st.integers(min_value=1, max_value=10_000), st.lists(st.integers(0, 50), max_size=60))
def test_each_mark_crossed_once(limit: int, steps: list[int]) -> None:
    count, seen = 0, []
    for step in steps:
        seen += quotas.thresholds_crossed(count, count + step, limit)
        count += step
    assert len(seen) == len(set(seen))
    assert sorted(seen) == [m for m in (80, 90, 100) if count * 100 >= m * limit]


def test_alerts_from_monthly_answer() -> None:
    p = _plan(department="marketing")  # 20000 a month
    ok = [(True, 1), (True, 0.0), (True, 0.0), (True, 0.0)]
    assert quotas.alerts(p, [*ok, 15999]) == []
    (alert,) = quotas.alerts(p, [*ok, 16000])
    assert alert.event_fields() == {
        "department": "marketing",
        "month": "2026-11",
        "threshold_percent": 80,
        "count": 16000,
        "limit": 20000,
        "quota": "per_department.marketing.monthly_tool_calls",
    }
    assert [a.percent for a in quotas.alerts(p, [*ok, 20000])] == [100]
    assert quotas.alerts(p, ok) == []  # stopped before the counter
    # Only a count (an int, not a bool) from the monthly counter raises alerts; the
    # daemon asks for alerts before it checks the answer's shape.
    tiny = Limits(per_department={"d": DepartmentLimits(monthly_tool_calls=1)})
    one = quotas.plan(tiny, user="u", tool="t", department="d", session_id=None, now=NOW)
    assert [a.percent for a in quotas.alerts(one, [1])] == [80, 90, 100]
    assert quotas.alerts(one, [True]) == []
    assert quotas.alerts(one, [(True, 1.0)]) == []


# --------------------------------------------------------------------------- results, load


def test_max_result_size() -> None:
    assert not quotas.max_result_size_exceeded(LIMITS, "query_metrics", 512 * 1024)
    assert quotas.max_result_size_exceeded(LIMITS, "query_metrics", 512 * 1024 + 1)
    assert not quotas.max_result_size_exceeded(LIMITS, "create_article", 10**9)
    assert not quotas.max_result_size_exceeded(LIMITS, "unknown_tool", 10**9)


def test_shedding_standard_before_high() -> None:
    cap = 100
    assert not quotas.shed("standard", 89, cap)
    assert quotas.shed("standard", 90, cap)
    assert not quotas.shed("high", 90, cap)
    assert not quotas.shed("high", 99, cap)
    assert quotas.shed("high", 100, cap)
    assert quotas.shed("whatever", 90, cap)  # unknown priorities are standard
    # Tiny caps: both shed at the cap.
    assert quotas.shed("standard", 1, 1) and quotas.shed("high", 1, 1)
    assert not quotas.shed("standard", 0, 1) and not quotas.shed("high", 0, 1)
    with pytest.raises(ValueError):
        quotas.shed("high", 0, 0)
    d = quotas.overloaded("standard", 90, cap)
    assert (d.code, d.status, d.retry_after_header) == ("overloaded", 503, "1")


@given(st.integers(0, 1000), st.integers(1, 1000))
def test_high_is_never_shed_before_standard(in_flight: int, cap: int) -> None:
    if quotas.shed("high", in_flight, cap):
        assert quotas.shed("standard", in_flight, cap)


def test_priority_of() -> None:
    assert quotas.priority_of(LIMITS, "engineering") == "high"
    assert quotas.priority_of(LIMITS, "marketing") == "standard"
    assert quotas.priority_of(LIMITS, "unknown") == "standard"
    assert quotas.priority_of(LIMITS, None) == "standard"


def test_department_of() -> None:
    m = {"alice": "engineering", "bob": "marketing"}
    claims = {"dept": "marketing", "n": 3}
    assert quotas.department_of(claims, "alice", claim="dept", user_map=m) == "marketing"
    # The claim is missing, not a string or empty: fall back to the map.
    assert quotas.department_of(claims, "alice", claim="missing", user_map=m) == "engineering"
    assert quotas.department_of(claims, "alice", claim="n", user_map=m) == "engineering"
    assert quotas.department_of({"dept": ""}, "alice", claim="dept", user_map=m) == "engineering"
    # No claim configured, or no token: the map only.
    assert quotas.department_of(claims, "bob", claim=None, user_map=m) == "marketing"
    assert quotas.department_of(None, "alice", claim="dept", user_map=m) == "engineering"
    assert quotas.department_of(None, "carol", claim="dept", user_map=m) is None
