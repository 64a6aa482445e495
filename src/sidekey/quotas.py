"""Quotas: which counters a call touches, and what the store's answers mean. Pure.

This module never talks to the state store and never reads the clock. The daemon

1. calls :func:`plan` with the decided user, the tool, the department and ``now``;
2. runs each check of the plan against the store, **in plan order, stopping at the
   first denial** (:func:`check_denial` per answer), with the store primitive named by
   the check's type:

   - :class:`SessionCheck` -> ``session_touch(check.user, check.session_id, now=...,
     idle_s=check.idle_s, max_sessions=check.max_sessions) -> (allowed, active_count)``
   - :class:`RateCheck` -> ``rate_check(check.key, limit=check.limit,
     period_s=check.period_s, now=...) -> (allowed, retry_after_s)`` (GCRA: exact,
     no 2x burst at a window boundary)
   - :class:`MonthlyCheck` -> ``counter_incr(check.key, amount=1,
     expires_at=check.expires_at_s) -> count`` (the count *including* this call)

3. turns a denial into a 429 (:meth:`QuotaDenial.to_error` for the HTTP body,
   :meth:`QuotaDenial.to_policy_denial` for the decision chain) and the monthly answer
   into ``quota.threshold`` events (:func:`alerts`).

Plan order, and why: the session first (a refused sixth session must not spend rate
budget), then the rate limits from the narrowest to the broadest (a call refused by a
broad limit has already spent the narrow buckets, which refill within a minute; the
other way round, a 2/min tool hammered by a client would drain the user's hourly
budget), and the monthly counter last (an increment cannot be undone, so it only
counts calls that passed every other limit).

Store keys are built from :func:`key_part`: printable, bounded (:data:`MAX_KEY_LEN`)
and injective (ids that are long or contain anything but ``[A-Za-z0-9._@-]`` are
percent-encoded, or replaced by a SHA-256 prefix when still too long). A plan touches
at most five keys whatever the number of users, tools and departments.
"""

from __future__ import annotations

import datetime
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

from .config import Limits
from .encoding import iso_utc
from .policy import CallFacts, Denial, Hook
from .protocol import SidekeyError, error_for_status
from .store import CounterOp, QuotaOp, RateOp, SessionOp

UTC = datetime.UTC

STATUS_TOO_MANY = 429
STATUS_OVERLOADED = 503

MINUTE_S = 60.0
HOUR_S = 3600.0
# An MCP session counts as active until it has been idle this long (configurable).
DEFAULT_SESSION_IDLE_S = 30 * 60.0

MAX_KEY_PART = 64  # longest user/tool/department/session component kept readable
_HASH_HEX = 32  # 128 bits of SHA-256 for components that are too long
# "rate:usertool:" + part + ":" + part + ":minute"; every key is shorter than this.
MAX_KEY_LEN = 160

THRESHOLD_MARKS: tuple[int, ...] = (80, 90, 100)

Priority = Literal["high", "standard"]
# Load shedding: "standard" calls are shed once this share of the in-flight cap is
# used, so the last slots stay free for "high" departments; "high" is shed at the cap.
STANDARD_SHED_PERCENT = 90


# --------------------------------------------------------------------------- keys


def key_part(value: str) -> str:
    """A store-key component for ``value``: safe characters, bounded, injective.

    ``[A-Za-z0-9._@-]`` pass through (after percent-encoding of everything else, so
    ``local:alice`` becomes ``local%3Aalice`` and no ``:`` separator can be forged);
    an empty value or an encoding longer than :data:`MAX_KEY_PART` becomes ``#`` +
    the first 128 bits of its SHA-256 (``#`` never appears in an encoding).
    """
    # "~" is left alone by quote(); encode it too so the safe set is exactly the above.
    encoded = quote(value, safe="@", errors="surrogatepass").replace("~", "%7E")
    if encoded and len(encoded) <= MAX_KEY_PART:
        return encoded
    return "#" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX]


def session_member(user: str, session_id: str) -> tuple[str, str]:
    """The store's (user, session) pair for ``user``'s session ``session_id``: what
    :func:`plan` touches and ``POST /v1/sessions/end`` ends, encoded once, here."""
    return key_part(user), key_part(session_id)


def as_utc(now: datetime.datetime) -> datetime.datetime:
    """``now`` in UTC; a naive datetime is taken as UTC (as in policy.py)."""
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def month_bounds(now: datetime.datetime) -> tuple[str, datetime.datetime]:
    """The calendar month (UTC) holding ``now``: its ``YYYY-MM`` label and its end
    (the first instant of the next month, exclusive)."""
    t = as_utc(now)
    end = (
        datetime.datetime(t.year + 1, 1, 1, tzinfo=UTC)
        if t.month == 12
        else datetime.datetime(t.year, t.month + 1, 1, tzinfo=UTC)
    )
    return f"{t.year:04d}-{t.month:02d}", end


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True, slots=True)
class RateCheck:
    """A GCRA limit: ``limit`` calls per ``period_s`` on ``key`` (``rate_check``)."""

    key: str
    limit: int
    period_s: float
    name: str  # config path below limits:, e.g. "per_user.requests_per_minute"
    label: str  # for humans, e.g. "per-user requests_per_minute (60)"

    @property
    def rule(self) -> str:
        return f"quota.ok:{self.name}"


@dataclass(frozen=True, slots=True)
class SessionCheck:
    """At most ``max_sessions`` sessions of ``user`` active at once (``session_touch``).

    ``user`` and ``session_id`` are already :func:`key_part`-encoded; pass them to the
    store as they are. ``key`` is ``sessions:<user>``, the store's set for that user.
    """

    key: str
    user: str
    session_id: str
    max_sessions: int
    idle_s: float
    name: str
    label: str

    @property
    def rule(self) -> str:
        return f"quota.ok:{self.name}"


@dataclass(frozen=True, slots=True)
class MonthlyCheck:
    """A department's calendar-month call counter (``counter_incr``)."""

    key: str
    limit: int
    department: str
    month: str  # "YYYY-MM", UTC
    expires_at: datetime.datetime  # end of the month: the counter's expiry
    name: str
    label: str

    @property
    def expires_at_s(self) -> float:
        """``expires_at`` as epoch seconds, as the store takes it."""
        return self.expires_at.timestamp()

    @property
    def rule(self) -> str:
        return f"quota.ok:{self.name}"


Check = RateCheck | SessionCheck | MonthlyCheck
# What the store answers, per check type: rate_check -> (allowed, retry_after_s);
# session_touch -> (allowed, active_count); counter_incr -> the new count.
StoreAnswer = tuple[bool, float] | int


@dataclass(frozen=True, slots=True)
class QuotaPlan:
    """The checks for one call, in the order the daemon must run them."""

    user: str
    tool: str
    department: str | None
    now: datetime.datetime
    checks: tuple[Check, ...] = ()

    @property
    def now_s(self) -> float:
        """``now`` as epoch seconds, for the store's ``now=`` arguments."""
        return self.now.timestamp()


def plan(
    limits: Limits,
    *,
    user: str,
    tool: str,
    department: str | None,
    session_id: str | None,
    now: datetime.datetime,
    session_idle_s: float = DEFAULT_SESSION_IDLE_S,
) -> QuotaPlan:
    """The quota checks for one call of ``tool`` by ``user``, in execution order.

    Only configured limits produce checks; a call without ``session_id`` is not part
    of a session and is not counted against ``concurrent_sessions``; a department
    that is ``None`` or has no ``monthly_tool_calls`` gets no monthly check. Per-tool
    limits are keyed by tool name alone, so they count across every server.
    O(1): a few dict lookups and at most five checks.
    """
    now = as_utc(now)
    u = key_part(user)
    checks: list[Check] = []
    per_user = limits.per_user

    if per_user.concurrent_sessions is not None and session_id is not None:
        n = per_user.concurrent_sessions
        su, ss = session_member(user, session_id)
        checks.append(
            SessionCheck(
                key=f"sessions:{su}",
                user=su,
                session_id=ss,
                max_sessions=n,
                idle_s=session_idle_s,
                name="per_user.concurrent_sessions",
                label=f"per-user concurrent_sessions ({n})",
            )
        )

    tool_limits = limits.per_tool.get(tool)
    if tool_limits is not None and tool_limits.requests_per_minute is not None:
        n = tool_limits.requests_per_minute
        checks.append(
            RateCheck(
                key=f"rate:usertool:{u}:{key_part(tool)}:minute",
                limit=n,
                period_s=MINUTE_S,
                name=f"per_tool.{tool}.requests_per_minute",
                label=f"per-tool {tool} requests_per_minute ({n})",
            )
        )
    if per_user.requests_per_minute is not None:
        n = per_user.requests_per_minute
        checks.append(
            RateCheck(
                key=f"rate:user:{u}:minute",
                limit=n,
                period_s=MINUTE_S,
                name="per_user.requests_per_minute",
                label=f"per-user requests_per_minute ({n})",
            )
        )
    if per_user.requests_per_hour is not None:
        n = per_user.requests_per_hour
        checks.append(
            RateCheck(
                key=f"rate:user:{u}:hour",
                limit=n,
                period_s=HOUR_S,
                name="per_user.requests_per_hour",
                label=f"per-user requests_per_hour ({n})",
            )
        )

    dept_limits = limits.per_department.get(department) if department is not None else None
    if department is not None and dept_limits is not None:
        n_month = dept_limits.monthly_tool_calls
        if n_month is not None:
            month, end = month_bounds(now)
            checks.append(
                MonthlyCheck(
                    key=f"month:{key_part(department)}:{month}",
                    limit=n_month,
                    department=department,
                    month=month,
                    expires_at=end,
                    name=f"per_department.{department}.monthly_tool_calls",
                    label=f"department {department} monthly_tool_calls ({n_month})",
                )
            )
    return QuotaPlan(user=user, tool=tool, department=department, now=now, checks=tuple(checks))


# --------------------------------------------------------------------------- interpretation


@dataclass(frozen=True, slots=True)
class QuotaDenial:
    """A quota verdict that stops the call.

    ``code`` is ``rate_limited`` (429; ``limit`` names the limit that fired and, for a
    session or monthly limit, ``details["reason"]`` is ``too_many_sessions`` or
    ``monthly_quota_exhausted``) or ``overloaded`` (503). ``retry_after_s`` is when a
    retry can succeed (for sessions: at the latest, when the least recently used one
    has gone idle); send it as ``Retry-After``: :attr:`retry_after_header`.
    ``details`` is ready for the error body's ``details`` (no secrets, no keys).
    """

    code: str
    message: str
    status: int
    limit: str  # the config name of the limit that fired
    retry_after_s: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def retry_after_header(self) -> str | None:
        """``Retry-After`` value: whole seconds, rounded up, at least 1."""
        if self.retry_after_s is None:
            return None
        return str(max(1, math.ceil(self.retry_after_s)))

    def to_policy_denial(self) -> Denial:
        """As a decision-chain :class:`~sidekey.policy.Denial` (a hook's return value)."""
        return Denial(code=self.code, message=self.message, status=self.status)

    def to_error(self) -> SidekeyError:
        """As a wire error: status, code, message and ``details``."""
        return error_for_status(self.status, self.message, code=self.code, **dict(self.details))


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + " s"


def store_ops(plan: QuotaPlan) -> list[QuotaOp]:
    """The plan's checks as state-store ops, in order, for one
    :meth:`~sidekey.store.StateStore.quota_apply` (a monthly counter stops the batch
    once it is over its limit)."""
    ops: list[QuotaOp] = []
    for check in plan.checks:
        if isinstance(check, SessionCheck):
            ops.append(SessionOp(check.user, check.session_id, check.idle_s, check.max_sessions))
        elif isinstance(check, RateCheck):
            ops.append(RateOp(check.key, check.limit, check.period_s))
        else:
            ops.append(CounterOp(check.key, check.expires_at_s, stop_above=check.limit))
    return ops


def check_denial(check: Check, answer: StoreAnswer, *, now: datetime.datetime) -> QuotaDenial | None:
    """What the store's ``answer`` to ``check`` means: a denial, or None to go on.

    Raises ``TypeError`` if the answer's shape does not fit the check (a local bug).
    """
    if isinstance(check, MonthlyCheck):
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise TypeError(f"{check.name}: counter_incr answers an int, got {answer!r}")
        if answer <= check.limit:
            return None
        retry = max(0.0, (check.expires_at - as_utc(now)).total_seconds())
        resets = iso_utc(check.expires_at, "auto")
        return QuotaDenial(
            code="rate_limited",
            status=STATUS_TOO_MANY,
            limit=check.name,
            retry_after_s=retry,
            message=(
                f"{check.label} exhausted for {check.month}; the quota resets at {resets}"
            ),
            details={
                "limit": check.name,
                "reason": "monthly_quota_exhausted",
                "label": check.label,
                "max": check.limit,
                "department": check.department,
                "month": check.month,
                "resets_at": resets,
                "retry_after_s": retry,
            },
        )
    if not (isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], bool)):
        raise TypeError(f"{check.name}: the store answers (allowed, number), got {answer!r}")
    allowed, number = answer
    if allowed:
        return None
    if isinstance(check, SessionCheck):
        return QuotaDenial(
            code="rate_limited",
            status=STATUS_TOO_MANY,
            limit=check.name,
            # At the latest: the least recently used session is idle by then.
            retry_after_s=check.idle_s,
            message=(
                f"{check.label} reached: {int(number)} sessions active; end one, or "
                f"wait until one has been idle for {_fmt_s(check.idle_s)}"
            ),
            details={
                "limit": check.name,
                "reason": "too_many_sessions",
                "label": check.label,
                "max": check.max_sessions,
                "active_sessions": int(number),
                "idle_s": check.idle_s,
            },
        )
    retry = max(0.0, float(number))
    return QuotaDenial(
        code="rate_limited",
        status=STATUS_TOO_MANY,
        limit=check.name,
        retry_after_s=retry,
        message=f"rate limit {check.label} exceeded; retry after {_fmt_s(retry)}",
        details={
            "limit": check.name,
            "label": check.label,
            "max": check.limit,
            "period_s": check.period_s,
            "retry_after_s": retry,
        },
    )


def _pairs(plan: QuotaPlan, results: Sequence[StoreAnswer]) -> list[tuple[Check, StoreAnswer]]:
    if len(results) > len(plan.checks):
        raise ValueError(f"{len(results)} store answers for {len(plan.checks)} checks")
    return list(zip(plan.checks, results, strict=False))


def interpret(plan: QuotaPlan, results: Sequence[StoreAnswer]) -> QuotaDenial | None:
    """The first denial among the store's answers, in plan order, or None.

    ``results[i]`` answers ``plan.checks[i]``; it may be shorter than the plan when the
    daemon stopped at a denial (the rest were never run). More answers than checks
    raise ``ValueError``; an answer of the wrong shape raises ``TypeError``.
    """
    for check, answer in _pairs(plan, results):
        denial = check_denial(check, answer, now=plan.now)
        if denial is not None:
            return denial
    return None


def as_hooks(plan: QuotaPlan, results: Sequence[StoreAnswer]) -> list[Hook]:
    """Decision-chain hooks replaying the answers: each passes with its check's rule
    (``quota.ok:<limit>``) or stops with the denial, so ``rules_matched`` lists every
    limit that passed. Usable as ``policy.decide(cfg, facts, hooks=...)``."""

    def make(verdict: str | Denial) -> Hook:
        def hook(_facts: CallFacts, _user: str) -> str | Denial:
            return verdict

        return hook

    hooks: list[Hook] = []
    for check, answer in _pairs(plan, results):
        denial = check_denial(check, answer, now=plan.now)
        hooks.append(make(check.rule if denial is None else denial.to_policy_denial()))
        if denial is not None:
            break
    return hooks


# --------------------------------------------------------------------------- thresholds


def thresholds_crossed(
    previous: int, current: int, limit: int, marks: Sequence[int] = THRESHOLD_MARKS
) -> list[int]:
    """The percentage ``marks`` of ``limit`` that the counter passed going from
    ``previous`` to ``current``: reached now (``current >= mark% of limit``) and not
    before. Ascending. Each mark is reported by exactly one increment, because an
    increment's ``previous`` is the value the last one returned (atomic counters).
    """
    if limit <= 0:
        raise ValueError("limit must be positive")
    # Integer arithmetic: count * 100 >= mark * limit is "count reached mark%".
    return sorted(
        m for m in set(marks) if previous * 100 < m * limit <= current * 100
    )


@dataclass(frozen=True, slots=True)
class ThresholdAlert:
    """One ``quota.threshold`` event: ``department`` used ``percent`` % of its month."""

    department: str
    month: str
    percent: int
    count: int
    limit: int
    name: str

    def event_fields(self) -> dict[str, Any]:
        return {
            "department": self.department,
            "month": self.month,
            "threshold_percent": self.percent,
            "count": self.count,
            "limit": self.limit,
            "quota": self.name,
        }


def alerts(
    plan: QuotaPlan, results: Sequence[StoreAnswer], marks: Sequence[int] = THRESHOLD_MARKS
) -> list[ThresholdAlert]:
    """``quota.threshold`` events due after this call's monthly increment (by 1)."""
    out: list[ThresholdAlert] = []
    for check, answer in _pairs(plan, results):
        if isinstance(check, MonthlyCheck) and isinstance(answer, int) and not isinstance(answer, bool):
            for mark in thresholds_crossed(answer - 1, answer, check.limit, marks):
                out.append(
                    ThresholdAlert(
                        department=check.department,
                        month=check.month,
                        percent=mark,
                        count=answer,
                        limit=check.limit,
                        name=check.name,
                    )
                )
    return out


# --------------------------------------------------------------------------- results, load


def max_result_size_exceeded(limits: Limits, tool: str, result_size_bytes: int) -> bool:
    """Whether a result of ``result_size_bytes`` is over the tool's ``max_result_size_kb``
    (KiB: 1 kb = 1024 bytes; a result of exactly the limit is allowed). False when the
    tool has no such limit."""
    tool_limits = limits.per_tool.get(tool)
    if tool_limits is None or tool_limits.max_result_size_kb is None:
        return False
    return result_size_bytes > tool_limits.max_result_size_kb * 1024


def priority_of(limits: Limits, department: str | None) -> Priority:
    """The department's ``priority``; ``"standard"`` for unknown or no department."""
    dept = limits.per_department.get(department) if department is not None else None
    return dept.priority if dept is not None else "standard"


def shed(priority: str, in_flight: int, cap: int) -> bool:
    """Whether to shed a new call (503 ``overloaded``) with ``in_flight`` calls already
    running on the host under a cap of ``cap``.

    Rule: ``"high"`` is shed only when the cap is reached (``in_flight >= cap``);
    every other priority (``"standard"``, or anything unknown) is shed once
    ``in_flight`` reaches :data:`STANDARD_SHED_PERCENT` % of the cap, so the last
    slots are kept for high-priority departments. With a cap of 1 both shed at 1.
    """
    if cap <= 0:
        raise ValueError("cap must be positive")
    if priority == "high":
        return in_flight >= cap
    return in_flight * 100 >= cap * STANDARD_SHED_PERCENT


def overloaded(priority: str, in_flight: int, cap: int) -> QuotaDenial:
    """The 503 ``overloaded`` denial for a call :func:`shed` refused."""
    return QuotaDenial(
        code="overloaded",
        status=STATUS_OVERLOADED,
        limit="in_flight_cap",
        retry_after_s=1.0,
        message=(
            f"the host is overloaded ({in_flight} calls in flight, cap {cap}); "
            f'calls of priority "{priority}" are shed first, retry shortly'
        ),
        details={"priority": priority, "in_flight": in_flight, "cap": cap},
    )


# --------------------------------------------------------------------------- departments


def department_of(
    claims: Mapping[str, Any] | None,
    user: str,
    *,
    claim: str | None,
    user_map: Mapping[str, str],
) -> str | None:
    """The user's department: the verified token's ``claim`` when configured and a
    non-empty string (the identity provider is authoritative), else ``user_map[user]``,
    else None (no monthly quota; priority ``"standard"``)."""
    if claim is not None and claims is not None:
        value = claims.get(claim)
        if isinstance(value, str) and value:
            return value
    return user_map.get(user)
