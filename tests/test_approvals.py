"""approvals: hold rules from the seed rate-limits.yaml and the approval state machine. Pure."""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidekey import approvals
from sidekey.approvals import (
    APPROVED,
    DENIED,
    EXPIRED,
    PENDING,
    REDEEMED,
    Approval,
    ApprovalConflict,
    ApprovalError,
    ApprovalMismatch,
)
from sidekey.config import Limits, PerToolLimits
from sidekey.protocol import SidekeyError

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT.parent / "shared" / "seed-configs" / "rate-limits.yaml"
QUICKSTART = ROOT / "examples" / "quickstart" / "rate-limits.yaml"

UTC = datetime.UTC
T0 = datetime.datetime(2026, 11, 15, 12, 0, 0, tzinfo=UTC)
DIGEST = "sha256:" + "ab" * 32


class _RateFile(msgspec.Struct, forbid_unknown_fields=True):
    limits: Limits


def _rate_limits_file() -> Path:
    """The shared seed; a dev checkout without ../shared falls back to the quickstart copy,
    but CI (which has the seed beside the checkout) must not pass on that missing ground."""
    if SEED.is_file():
        return SEED
    if os.environ.get("CI"):
        pytest.fail(f"{SEED} not beside the checkout (CI is set: not falling back)", pytrace=False)
    return QUICKSTART


LIMITS = msgspec.yaml.decode(_rate_limits_file().read_bytes(), type=_RateFile).limits


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def fresh(**kw: object) -> Approval:
    args: dict[str, object] = {
        "server": "content-api",
        "tool": "delete_record",
        "user": "alice",
        "agent": "content-writer",
        "args_digest": DIGEST,
        "now": T0,
    }
    args.update(kw)
    return approvals.new_approval(**args)  # type: ignore[arg-type]


BINDING: dict[str, str] = {
    "server": "content-api",
    "tool": "delete_record",
    "user": "alice",
    "agent": "content-writer",
    "args_digest": DIGEST,
}


# --------------------------------------------------------------------------- rules


def test_human_approval_holds_every_call() -> None:
    for n in (1, 2, 1000):
        reason = approvals.needs_approval(LIMITS, "delete_record", calls_in_window=n)
        assert reason is not None and "requires_human_approval" in reason


def test_approval_above_n_in_window() -> None:
    # create_article: requires_approval_above: 5 -> calls 1..5 pass, the 6th is held.
    for n in range(1, 6):
        assert approvals.needs_approval(LIMITS, "create_article", calls_in_window=n) is None
    reason = approvals.needs_approval(LIMITS, "create_article", calls_in_window=6)
    assert reason == (
        'call 6 of tool "create_article" within 3600 s is beyond requires_approval_above (5)'
    )
    assert approvals.needs_approval(LIMITS, "create_article", calls_in_window=60) is not None


def test_tools_without_approval_rules() -> None:
    assert approvals.needs_approval(LIMITS, "query_metrics", calls_in_window=10**6) is None
    assert approvals.needs_approval(LIMITS, "not_configured", calls_in_window=10**6) is None
    assert not approvals.counts_calls(LIMITS, "query_metrics")
    assert not approvals.counts_calls(LIMITS, "delete_record")  # held anyway: no count needed
    assert approvals.counts_calls(LIMITS, "create_article")


def test_approval_above_zero_holds_every_call() -> None:
    limits = Limits(per_tool={"t": PerToolLimits(requires_approval_above=0)})
    assert approvals.needs_approval(limits, "t", calls_in_window=1) is not None


def test_has_rule_sends_every_rule_to_the_approval_step() -> None:
    """The daemon skips the approval step for a call that presents no approval when
    ``has_rule`` is False: a tool with either rule must answer True (else its calls run
    unheld), and only a tool with no rule (no per-tool entry, or one without approval
    keys) may answer False."""
    assert approvals.has_rule(LIMITS, "delete_record")  # requires_human_approval
    assert approvals.has_rule(LIMITS, "create_article")  # requires_approval_above: 5
    zero = Limits(per_tool={"t": PerToolLimits(requires_approval_above=0)})
    assert approvals.has_rule(zero, "t")
    assert not approvals.has_rule(LIMITS, "query_metrics")  # per-tool limits, no approval rule
    assert not approvals.has_rule(LIMITS, "not_configured")


def test_window_counter_is_aligned_and_expires_at_window_end() -> None:
    key, end = approvals.window_counter("local:alice", "create_article", now=T0)
    index = int(T0.timestamp() // 3600)
    assert key == f"approvals:local%3Aalice:create_article:{index}"
    assert end == datetime.datetime(2026, 11, 15, 13, 0, 0, tzinfo=UTC)
    # Same window until its end, a new one from then on.
    assert approvals.window_counter("local:alice", "create_article", now=at(3599))[0] == key
    key2, end2 = approvals.window_counter("local:alice", "create_article", now=at(3600))
    assert key2 != key and end2 == at(7200)
    with pytest.raises(ValueError):
        approvals.window_counter("u", "t", now=T0, window_s=0)


# --------------------------------------------------------------------------- records


def test_new_approval_id_is_random_url_safe_prefixed() -> None:
    ids = {approvals.new_approval_id() for _ in range(200)}
    assert len(ids) == 200
    for i in ids:
        assert re.fullmatch(r"apr_[A-Za-z0-9_-]{24}", i)


def test_new_approval_defaults() -> None:
    a = fresh(held_for="requires_human_approval")
    assert a.state == PENDING
    assert a.id.startswith("apr_")
    assert a.created_at == T0 and a.expires_at == at(15 * 60)
    assert a.decided_by is None and a.reason is None
    assert fresh(ttl_s=60).expires_at == at(60)
    assert fresh(approval_id="apr_fixed").id == "apr_fixed"
    with pytest.raises(ValueError):
        fresh(ttl_s=0)


def test_record_round_trips_through_json() -> None:
    a = approvals.approve(fresh(), by="uid:1001", now=at(10))
    encoded = msgspec.json.encode(a)
    assert msgspec.json.decode(encoded, type=Approval) == a


# --------------------------------------------------------------------------- transitions

Step = Callable[[Approval], Approval]
ACTIONS: dict[str, Step] = {
    "approve": lambda a: approvals.approve(a, by="uid:1001", now=at(60)),
    "deny": lambda a: approvals.deny(a, by="uid:1001", now=at(60), reason="no"),
    "expire": lambda a: approvals.expire(a, now=at(15 * 60)),
    "redeem": lambda a: approvals.redeem(a, now=at(60), **BINDING),
}
STATES = (PENDING, APPROVED, DENIED, EXPIRED, REDEEMED)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("action", list(ACTIONS))
def test_every_transition_legal_or_illegal(state: str, action: str) -> None:
    a = msgspec.structs.replace(fresh(), state=state)
    expected = approvals.TRANSITIONS.get((state, action))  # type: ignore[arg-type]
    if expected is None:
        with pytest.raises(ApprovalConflict) as ei:
            ACTIONS[action](a)
        assert ei.value.code == f"approval_{state}"
        assert ei.value.status == 409
        assert a.id in ei.value.message
    else:
        assert ACTIONS[action](a).state == expected


def test_transition_table_is_the_documented_machine() -> None:
    assert dict(approvals.TRANSITIONS) == {
        (PENDING, "approve"): APPROVED,
        (PENDING, "deny"): DENIED,
        (PENDING, "expire"): EXPIRED,
        (APPROVED, "redeem"): REDEEMED,
        (APPROVED, "expire"): EXPIRED,
    }


def test_approve_and_deny_record_who_and_why() -> None:
    a = approvals.approve(fresh(), by="uid:1001", now=at(30), reason="ok for ticket 42")
    assert (a.state, a.decided_by, a.decided_at, a.reason) == (
        APPROVED, "uid:1001", at(30), "ok for ticket 42"
    )
    d = approvals.deny(fresh(), by="uid:1002", now=at(30), reason="x" * 5000)
    assert (d.state, d.decided_by) == (DENIED, "uid:1002")
    assert d.reason is not None and len(d.reason) == approvals.MAX_REASON_LEN
    with pytest.raises(ApprovalConflict, match="already approved") as ei:
        approvals.approve(a, by="uid:1001", now=at(31))
    assert ei.value.code == "approval_approved"
    with pytest.raises(ApprovalConflict) as ei:
        approvals.approve(d, by="uid:1001", now=at(31))
    assert ei.value.code == "approval_denied"


def test_redeem_once() -> None:
    a = approvals.approve(fresh(), by="uid:1001", now=at(30))
    r = approvals.redeem(a, now=at(40), **BINDING)
    assert (r.state, r.redeemed_at) == (REDEEMED, at(40))
    with pytest.raises(ApprovalConflict, match="good for one call") as ei:
        approvals.redeem(r, now=at(41), **BINDING)
    assert ei.value.code == "approval_redeemed"


def test_redeem_pending_or_denied_refused() -> None:
    with pytest.raises(ApprovalConflict) as ei:
        approvals.redeem(fresh(), now=at(1), **BINDING)
    assert ei.value.code == "approval_pending"
    denied = approvals.deny(fresh(), by="uid:1001", now=at(1), reason="no")
    with pytest.raises(ApprovalConflict) as ei:
        approvals.redeem(denied, now=at(2), **BINDING)
    assert ei.value.code == "approval_denied"


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("args_digest", "sha256:" + "cd" * 32, "arguments"),
        ("server", "analytics-db", "server"),
        ("tool", "create_article", "tool"),
        ("user", "mallory", "user"),
        ("agent", "sales-assistant", "agent"),
    ],
)
def test_redeem_with_different_call_is_refused(field: str, value: str, named: str) -> None:
    a = approvals.approve(fresh(), by="uid:1001", now=at(30))
    with pytest.raises(ApprovalMismatch) as ei:
        approvals.redeem(a, now=at(40), **{**BINDING, field: value})
    err = ei.value
    assert (err.code, err.status) == ("approval_mismatch", 403)
    assert err.details["fields"] == [named]
    assert value not in err.message and DIGEST not in err.message  # names, never values
    # The genuine call can still redeem it.
    assert approvals.redeem(a, now=at(41), **BINDING).state == REDEEMED


def test_redeem_with_no_agent_is_a_mismatch() -> None:
    a = approvals.approve(fresh(), by="uid:1001", now=at(30))
    with pytest.raises(ApprovalMismatch):
        approvals.redeem(a, now=at(40), **{**BINDING, "agent": None})  # type: ignore[arg-type]


def test_mismatch_is_checked_before_state() -> None:
    # Someone else's id tells them nothing about its state.
    for a in (fresh(), approvals.deny(fresh(), by="x", now=at(1), reason="no")):
        with pytest.raises(ApprovalMismatch):
            approvals.redeem(a, now=at(2), **{**BINDING, "user": "mallory"})


def test_expiry() -> None:
    a = fresh()
    assert not approvals.is_due(a, at(15 * 60 - 1))
    assert approvals.effective_state(a, at(15 * 60 - 1)) == PENDING
    assert approvals.is_due(a, at(15 * 60))
    assert approvals.effective_state(a, at(15 * 60)) == EXPIRED
    # Before the sweeper runs, a due approval already acts expired.
    with pytest.raises(ApprovalConflict, match="expired") as ei:
        approvals.approve(a, by="uid:1001", now=at(15 * 60))
    assert ei.value.code == "approval_expired"
    approved = approvals.approve(a, by="uid:1001", now=at(60))
    with pytest.raises(ApprovalConflict) as ei:
        approvals.redeem(approved, now=at(15 * 60 + 1), **BINDING)
    assert ei.value.code == "approval_expired"
    # The sweeper records the expiry for pending and approved ones...
    assert approvals.expire(a, now=at(15 * 60)).state == EXPIRED
    assert approvals.expire(approved, now=at(15 * 60)).state == EXPIRED
    # ...not before their time...
    with pytest.raises(ApprovalConflict) as ei:
        approvals.expire(a, now=at(15 * 60 - 1))
    assert ei.value.code == "approval_not_due"
    # ...and terminal ones never expire (a redeemed approval stays redeemed).
    redeemed = approvals.redeem(approved, now=at(61), **BINDING)
    assert not approvals.is_due(redeemed, at(10**6))
    assert approvals.effective_state(redeemed, at(10**6)) == REDEEMED
    with pytest.raises(ApprovalConflict) as ei:
        approvals.expire(redeemed, now=at(10**6))
    assert ei.value.code == "approval_redeemed"


def test_errors_form_a_tree() -> None:
    assert issubclass(ApprovalConflict, ApprovalError)
    assert issubclass(ApprovalMismatch, ApprovalError)
    assert issubclass(ApprovalError, SidekeyError)


def test_self_approval_message_names_the_approver() -> None:
    """The four-eyes refusal names the approver as a person can find them: their user
    name when known, else ``uid:<N>``, plus the uid."""
    a = fresh(user="alice")
    why = approvals.self_approval(a, approver_uid=1001, approver_user="bob",
                                  identities={"bob": ["alice"]}, owner=False)
    assert why is not None and "the approver bob (uid 1001) is known as that user" in why, why
    why = approvals.self_approval(a, approver_uid=1001, approver_user=None,
                                  identities={"uid:1001": ["alice"]}, owner=False)
    assert why is not None and "the approver uid:1001 (uid 1001) is known as that user" in why, why


def test_pending_denial() -> None:
    a = fresh(approval_id="apr_x", held_for="requires_human_approval")
    d = approvals.pending_denial(a)
    assert (d.code, d.status, d.outcome) == ("pending_approval", 202, "pending_approval")
    assert "apr_x" in d.message and "2026-11-15T12:15:00Z" in d.message


@given(st.lists(st.sampled_from(list(ACTIONS)), max_size=8))
def test_any_sequence_follows_the_table(actions: list[str]) -> None:
    a = fresh()
    for action in actions:
        expected = approvals.TRANSITIONS.get((a.state, action))  # type: ignore[arg-type]
        if expected is None:
            with pytest.raises(ApprovalConflict):
                ACTIONS[action](a)
        else:
            a = ACTIONS[action](a)
            assert a.state == expected
    # Terminal states are final.
    if a.state not in approvals.LIVE_STATES:
        for step in ACTIONS.values():
            with pytest.raises(ApprovalError):
                step(a)
