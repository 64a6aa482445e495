"""The StateStore contract, run against both stores: SQLite on tmp_path, and Redis on a
real ``redis-server`` (one per test session, a unique key prefix per test).

Plus Redis-only behaviour: two stores ("hosts") on one server share burned jtis and
limits; an outage is a StateUnavailable within the timeout, never a hang; data survives
a Redis restart with AOF; the password never leaks.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import signal
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis as redis_py
import trio

from redis_server import RedisServer
from sidekey import approvals
from sidekey.store import (
    APPROVAL_RETENTION_S,
    BackendIntent,
    CounterOp,
    LeaseRecord,
    RateOp,
    SessionOp,
    StateStore,
    StateUnavailable,
    gcra,
)
from sidekey.store.redis import RedisStore, redact_url
from sidekey.store.sqlite import LEASE_RETENTION_S, SqliteStore

# Every real-I/O test finishes well within this (the suite's own bound, below pytest-timeout).
IO_LIMIT_S = 60.0
# The stores' own per-call bound. Generous: 200 concurrent calls queue for a connection
# inside it, and a loaded machine must not turn that queue into StateUnavailable. The
# outage test opens its store with OUTAGE_TIMEOUT_S, so that its error names that bound.
REDIS_TIMEOUT_S = 10.0
OUTAGE_TIMEOUT_S = 0.5

Opener = Callable[[], StateStore]


def lease(
    lease_id: str = "lse_1",
    *,
    state: str = "active",
    expires_at: float = 1300.0,
    ended_at: float | None = None,
) -> LeaseRecord:
    return LeaseRecord(
        lease_id=lease_id,
        jti=f"jti-{lease_id}",
        server="content-api",
        tool="create_article",
        user_id="usr_1",
        agent_id="agent_content-writer",
        session_id=None,
        secrets=("CONTENT_API_KEY", "OTHER"),
        created_at=1000.0,
        expires_at=expires_at,
        state=state,
        ended_at=ended_at,
        peer_pid=4242,
        peer_uid=1001,
    )


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


def open_redis(url: str, prefix: str, **kw: object) -> RedisStore:
    kw.setdefault("timeout_s", REDIS_TIMEOUT_S)
    return RedisStore.open(url, prefix=prefix, **kw)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "redis"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens the store under test; every call opens another handle on the same state."""
    if request.param == "sqlite":
        return lambda: SqliteStore.open(tmp_path / "state")
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test:{uuid.uuid4().hex}:"
    return lambda: open_redis(server.url, prefix)


@pytest.fixture
async def store(opener: Opener) -> AsyncIterator[StateStore]:
    s = opener()
    try:
        yield s
    finally:
        await s.aclose()


# ---------------------------------------------------------------------- jti


async def test_burn_once(store: StateStore) -> None:
    with trio.fail_after(IO_LIMIT_S):
        far = time.time() + 600
        assert await store.burn_jti("jti-a", far) is True
        assert await store.burn_jti("jti-a", far) is False
        assert await store.burn_jti("jti-b", far) is True


async def test_a_jti_burned_after_its_expiry_still_refuses_a_replay(store: StateStore) -> None:
    """A token that expired a moment ago on this host may still look valid on a host whose
    clock is behind: its jti must stay burned for a while (Redis keeps it at least
    JTI_MIN_KEEP_S, SQLite until a purge passes it), never vanish at once."""
    with trio.fail_after(IO_LIMIT_S):
        just_expired = time.time() - 10
        assert await store.burn_jti("jti-late", just_expired) is True
        assert await store.burn_jti("jti-late", just_expired) is False


async def test_concurrent_burns_have_one_winner(store: StateStore) -> None:
    wins: list[bool] = []

    async def burn() -> None:
        wins.append(await store.burn_jti("jti-race", time.time() + 600))

    with trio.fail_after(IO_LIMIT_S):
        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(burn)
    assert len(wins) == 100 and wins.count(True) == 1


async def test_burn_survives_reopen(opener: Opener) -> None:
    with trio.fail_after(IO_LIMIT_S):
        first = opener()
        try:
            assert await first.burn_jti("jti-p", time.time() + 600)
        finally:
            await first.aclose()
        second = opener()
        try:
            assert await second.burn_jti("jti-p", time.time() + 600) is False
        finally:
            await second.aclose()


# ---------------------------------------------------------------------- leases


async def test_lease_put_get_and_duplicate(store: StateStore) -> None:
    with trio.fail_after(IO_LIMIT_S):
        assert await store.get_lease("lse_1") is None
        await store.put_lease(lease())
        assert await store.get_lease("lse_1") == lease()
        with pytest.raises(StateUnavailable):
            await store.put_lease(lease())
        with pytest.raises(ValueError):
            await store.put_lease(lease("lse_x", state="bogus"))


async def test_transition_is_compare_and_set(store: StateStore) -> None:
    with trio.fail_after(IO_LIMIT_S):
        await store.put_lease(lease())
        assert await store.transition_lease("lse_1", "released", "expired", at=1100.0) is False
        assert await store.transition_lease("lse_1", "active", "released", at=1100.0) is True
        assert await store.transition_lease("lse_1", "active", "expired", at=1200.0) is False
        assert await store.transition_lease("nope", "active", "released", at=1.0) is False
        got = await store.get_lease("lse_1")
        assert got is not None and got.state == "released" and got.ended_at == 1100.0


async def test_transition_to_or_from_an_unknown_state_is_refused(store: StateStore) -> None:
    """Either end of a lease transition must be a known state: a typo never writes a state
    that no sweep, status or recovery knows."""
    with trio.fail_after(IO_LIMIT_S):
        await store.put_lease(lease())
        with pytest.raises(ValueError, match="unknown lease state"):
            await store.transition_lease("lse_1", "active", "bogus", at=1100.0)
        with pytest.raises(ValueError, match="unknown lease state"):
            await store.transition_lease("lse_1", "bogus", "released", at=1100.0)
        got = await store.get_lease("lse_1")
        assert got is not None and got.state == "active"


async def test_racing_transitions_have_one_winner(store: StateStore) -> None:
    await store.put_lease(lease())
    results: list[bool] = []

    async def move(to: str) -> None:
        results.append(await store.transition_lease("lse_1", "active", to, at=1100.0))

    with trio.fail_after(IO_LIMIT_S):
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(move, ("released", "expired", "revoked")[i % 3])
    assert results.count(True) == 1


async def test_leases_in_state(store: StateStore) -> None:
    with trio.fail_after(IO_LIMIT_S):
        await store.put_lease(lease("lse_b", expires_at=1500.0))
        await store.put_lease(lease("lse_a", expires_at=1400.0))
        await store.put_lease(lease("lse_c", expires_at=1300.0))
        await store.put_lease(lease("lse_d", state="released", ended_at=1010.0))
        assert [r.lease_id for r in await store.leases_in_state("active")] == [
            "lse_c", "lse_a", "lse_b"]
        assert await store.transition_lease("lse_a", "active", "revoked", at=1050.0)
        assert [r.lease_id for r in await store.leases_in_state("active")] == ["lse_c", "lse_b"]
        revoked = await store.leases_in_state("revoked")
        assert [(r.lease_id, r.ended_at) for r in revoked] == [("lse_a", 1050.0)]
        assert [r.lease_id for r in await store.leases_in_state("released")] == ["lse_d"]
        assert await store.leases_in_state("expired") == []


async def test_backend_lease_journal(store: StateStore) -> None:
    with trio.fail_after(IO_LIMIT_S):
        await store.journal_backend_lease("vault", "database/creds/ro/abc", expires_at=100.0, at=1.0)
        await store.journal_backend_lease("vault", "database/creds/ro/def", expires_at=100.0, at=2.0)
        # journaling twice changes nothing
        await store.journal_backend_lease("vault", "database/creds/ro/abc", expires_at=100.0, at=5.0)
        assert await store.open_backend_leases() == [
            ("vault", "database/creds/ro/abc", None), ("vault", "database/creds/ro/def", None)]
        await store.attach_backend_leases(
            "lse_1", [("vault", "database/creds/ro/abc"), ("vault", "never-journaled")])
        assert await store.open_backend_leases("lse_1") == [
            ("vault", "database/creds/ro/abc", "lse_1")]
        await store.backend_lease_revoked("vault", "database/creds/ro/abc", at=3.0)
        assert await store.open_backend_leases("lse_1") == []
        assert [r[1] for r in await store.open_backend_leases()] == ["database/creds/ro/def"]
        assert await store.open_backend_leases() == [("vault", "database/creds/ro/def", None)]


async def test_backend_intents(store: StateStore) -> None:
    """Issue 9 item 9: an intent is journaled before the backend is asked; journaling the
    credential with its intent id resolves the intent in the same step."""
    with trio.fail_after(IO_LIMIT_S):
        prefix = "database/creds/ro/"
        await store.journal_backend_intent("vault", "int_1", prefix, at=10.0, deadline=12.5)
        await store.journal_backend_intent("vault", "int_2", prefix, at=11.0, deadline=13.5)
        await store.journal_backend_intent("other", "int_1", "db/creds/x/", at=12.0, deadline=14.0)
        # journaling twice changes nothing
        await store.journal_backend_intent("vault", "int_1", prefix, at=99.0, deadline=99.0)
        assert await store.open_backend_intents() == [
            BackendIntent("vault", "int_1", prefix, 10.0, 12.5),
            BackendIntent("vault", "int_2", prefix, 11.0, 13.5),
            BackendIntent("other", "int_1", "db/creds/x/", 12.0, 14.0),
        ]
        await store.journal_backend_lease("vault", prefix + "abc", expires_at=100.0, at=11.5,
                                          intent_id="int_1")
        assert [(i.backend, i.intent_id) for i in await store.open_backend_intents()] == [
            ("vault", "int_2"), ("other", "int_1")]
        assert await store.open_backend_leases() == [("vault", prefix + "abc", None)]
        await store.backend_intent_done("vault", "int_2")
        await store.backend_intent_done("vault", "never-there")
        assert [(i.backend, i.intent_id) for i in await store.open_backend_intents()] == [
            ("other", "int_1")]
        # which listed lease ids are journaled (open or revoked), per backend
        await store.journal_backend_lease("vault", prefix + "def", expires_at=100.0, at=12.0)
        await store.backend_lease_revoked("vault", prefix + "def", at=13.0)
        assert await store.backend_leases_known(
            "vault", [prefix + "abc", prefix + "def", prefix + "zzz"]) == {
            prefix + "abc", prefix + "def"}
        assert await store.backend_leases_known("other", [prefix + "abc"]) == set()
        assert await store.backend_leases_known("vault", []) == set()


async def test_backend_intents_survive_reopen(opener: Opener) -> None:
    with trio.fail_after(IO_LIMIT_S):
        first = opener()
        try:
            await first.journal_backend_intent("vault", "int_9", "d/creds/r/", at=1.0, deadline=2.0)
        finally:
            await first.aclose()
        second = opener()
        try:
            assert await second.open_backend_intents() == [
                BackendIntent("vault", "int_9", "d/creds/r/", 1.0, 2.0)]
        finally:
            await second.aclose()


async def test_lease_end_is_unaudited_until_marked(store: StateStore) -> None:
    """Issue 9 item 10: a lease's end and "its event is not written yet" are one step;
    mark_lease_audited clears it. Active leases and leases stored ended are not listed."""
    with trio.fail_after(IO_LIMIT_S):
        for lid in ("lse_a", "lse_b", "lse_c", "lse_d"):
            await store.put_lease(lease(lid))
        await store.put_lease(lease("lse_old", state="released", ended_at=1001.0))
        assert await store.leases_unaudited() == []
        assert await store.transition_lease("lse_b", "active", "expired", at=1200.0)
        assert await store.transition_lease("lse_a", "active", "released", at=1100.0)
        assert await store.transition_lease("lse_c", "active", "revoked", at=1150.0)
        got = await store.leases_unaudited()
        assert [(r.lease_id, r.state, r.ended_at) for r in got] == [
            ("lse_a", "released", 1100.0), ("lse_c", "revoked", 1150.0),
            ("lse_b", "expired", 1200.0)]
        assert [r.lease_id for r in await store.leases_unaudited(limit=1)] == ["lse_a"]
        await store.mark_lease_audited("lse_a")
        await store.mark_lease_audited("lse_d")  # still active: nothing to mark
        await store.mark_lease_audited("nope")
        assert [r.lease_id for r in await store.leases_unaudited()] == ["lse_c", "lse_b"]
        assert await store.transition_lease("lse_d", "active", "released", at=1300.0)
        assert [r.lease_id for r in await store.leases_unaudited()] == ["lse_c", "lse_b", "lse_d"]


async def test_unaudited_mark_survives_reopen_and_purge(opener: Opener) -> None:
    now = 10_000_000.0
    with trio.fail_after(IO_LIMIT_S):
        first = opener()
        try:
            await first.put_lease(lease("lse_u"))
            await first.put_lease(lease("lse_gone"))
            assert await first.transition_lease("lse_u", "active", "released", at=now - 5)
            assert await first.transition_lease(
                "lse_gone", "active", "released", at=now - LEASE_RETENTION_S - 1)
        finally:
            await first.aclose()
        second = opener()
        try:
            assert [r.lease_id for r in await second.leases_unaudited()] == ["lse_gone", "lse_u"]
            await second.purge(now)
            assert [r.lease_id for r in await second.leases_unaudited()] == ["lse_u"]
        finally:
            await second.aclose()


async def test_purge(store: StateStore) -> None:
    now = 10_000_000.0
    with trio.fail_after(IO_LIMIT_S):
        await store.put_lease(lease("lse_old", state="released", ended_at=now - LEASE_RETENTION_S - 1))
        await store.put_lease(lease("lse_recent", state="released", ended_at=now - 10))
        await store.put_lease(lease("lse_active"))
        await store.journal_backend_lease("vault", "old", expires_at=now, at=1.0)
        await store.backend_lease_revoked("vault", "old", at=now - LEASE_RETENTION_S - 1)
        await store.journal_backend_lease("vault", "open", expires_at=now, at=2.0)
        assert await store.purge(now) >= 2
        assert await store.get_lease("lse_old") is None
        assert await store.get_lease("lse_recent") is not None
        assert await store.get_lease("lse_active") is not None
        assert [r.lease_id for r in await store.leases_in_state("released")] == ["lse_recent"]
        assert await store.open_backend_leases() == [("vault", "open", None)]
        assert await store.purge(now) == 0
        # quota state purged (or expired) is as if it never was: a full burst again
        assert await store.rate_check("k", limit=3, period_s=60, now=now) == (True, 0.0)
        await store.purge(now + 3600)
        for _ in range(3):
            assert (await store.rate_check("k", limit=3, period_s=60, now=now + 3600))[0]


# ---------------------------------------------------------------------- approvals


def held(n: int, *, at: float | None = None, ttl_s: float = 900.0) -> approvals.Approval:
    created = datetime.datetime.fromtimestamp(
        (time.time() if at is None else at) + n * 0.001, datetime.UTC)
    return approvals.new_approval(
        server="analytics-db", tool="delete_record", user="alice", agent="data-analyst",
        args_digest=f"{n:064x}", now=created, held_for="requires_human_approval",
        ttl_s=ttl_s, approval_id=f"apr_{n:04d}",
    )


async def test_approval_put_get_and_duplicate(store: StateStore) -> None:
    with trio.fail_after(IO_LIMIT_S):
        a = held(1)
        await store.put_approval(a)
        assert await store.get_approval(a.id) == a
        assert await store.get_approval("apr_unknown") is None
        with pytest.raises(StateUnavailable):
            await store.put_approval(a)


async def test_approval_transition_is_compare_and_set(store: StateStore) -> None:
    with trio.fail_after(IO_LIMIT_S):
        a = held(1)
        await store.put_approval(a)
        now = a.created_at + datetime.timedelta(seconds=5)
        ok = approvals.approve(a, by="uid:0 root", now=now, reason="fine")
        assert await store.transition_approval(ok, from_state="approved") is False
        assert await store.transition_approval(ok, from_state="pending") is True
        assert await store.get_approval(a.id) == ok
        # a deny computed from the stale pending copy loses
        no = approvals.deny(a, by="uid:1 bob", now=now, reason="no")
        assert await store.transition_approval(no, from_state="pending") is False
        assert (await store.get_approval(a.id)) == ok
        unknown = approvals.approve(held(2), by="x", now=now)
        assert await store.transition_approval(unknown, from_state="pending") is False


async def test_racing_approvers_have_one_winner(store: StateStore) -> None:
    a = held(1)
    await store.put_approval(a)
    now = a.created_at
    won: list[str] = []

    async def decide(i: int) -> None:
        new = (approvals.approve(a, by=f"approver{i}", now=now) if i % 2
               else approvals.deny(a, by=f"approver{i}", now=now, reason="no"))
        if await store.transition_approval(new, from_state="pending"):
            won.append(new.state)

    with trio.fail_after(IO_LIMIT_S):
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(decide, i)
    assert len(won) == 1
    stored = await store.get_approval(a.id)
    assert stored is not None and stored.state == won[0]


async def test_list_approvals_by_state_oldest_first(store: StateStore) -> None:
    with trio.fail_after(IO_LIMIT_S):
        items = [held(n) for n in (3, 1, 2, 4)]
        for a in items:
            await store.put_approval(a)
        by_id = {a.id: a for a in items}
        await store.transition_approval(
            approvals.deny(by_id["apr_0002"], by="x", now=by_id["apr_0002"].created_at, reason="r"),
            from_state="pending")
        assert [a.id for a in await store.list_approvals()] == [
            "apr_0001", "apr_0002", "apr_0003", "apr_0004"]
        assert [a.id for a in await store.list_approvals(["pending"])] == [
            "apr_0001", "apr_0003", "apr_0004"]
        assert [a.id for a in await store.list_approvals(["denied", "expired"])] == ["apr_0002"]
        assert [a.id for a in await store.list_approvals(["pending"], limit=2)] == [
            "apr_0001", "apr_0003"]
        assert await store.list_approvals(["redeemed"]) == []


async def test_approval_survives_reopen(opener: Opener) -> None:
    first = opener()
    a = held(7)
    try:
        await first.put_approval(a)
    finally:
        await first.aclose()
    second = opener()
    try:
        assert await second.get_approval(a.id) == a
    finally:
        await second.aclose()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_purge_keeps_ended_leases_for_the_configured_retention(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """state.lease_retention_s, in both stores: an ended lease past it is purged, one
    within it and an active one are kept. (A real clock: Redis expires keys by its own.)"""
    now = time.time()
    s: StateStore
    if kind == "sqlite":
        s = SqliteStore.open(tmp_path / "state", clock=lambda: now, lease_retention_s=60)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        s = open_redis(server.url, f"test:{uuid.uuid4().hex}:", clock=lambda: now,
                       lease_retention_s=60)
    try:
        with trio.fail_after(IO_LIMIT_S):
            for lease_id, ended_at in (("old", now - 61), ("recent", now - 59), ("active", None)):
                await s.put_lease(LeaseRecord(
                    lease_id=lease_id, jti="j-" + lease_id, server="s", tool="t",
                    user_id="u", agent_id=None, session_id=None, secrets=("K",),
                    created_at=now - 200, expires_at=now + 300, state="active",
                    ended_at=None, peer_pid=1, peer_uid=1))
                if ended_at is not None:
                    assert await s.transition_lease(lease_id, "active", "released", at=ended_at)
            assert await s.purge(now) >= 1
            assert await s.get_lease("old") is None
            assert await s.get_lease("recent") is not None
            assert await s.get_lease("active") is not None
    finally:
        await s.aclose()


async def test_purge_drops_approvals_long_expired(store: StateStore) -> None:
    now = time.time()
    with trio.fail_after(IO_LIMIT_S):
        old = held(1, at=now - APPROVAL_RETENTION_S - 3600, ttl_s=60)
        recent = held(2, at=now - 1000, ttl_s=60)  # expired, still within retention
        await store.put_approval(old)
        await store.put_approval(recent)
        await store.purge(now)
        assert await store.get_approval(old.id) is None
        assert await store.get_approval(recent.id) == recent
        assert [a.id for a in await store.list_approvals()] == [recent.id]


# ---------------------------------------------------------------------- rate_check


async def test_200_concurrent_checks_let_exactly_30_through(store: StateStore) -> None:
    now = 1_000_000.0
    results: list[tuple[bool, float]] = []

    async def check() -> None:
        results.append(await store.rate_check("usr_1:delete_record", limit=30, period_s=60, now=now))

    with trio.fail_after(IO_LIMIT_S):
        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(check)
    allowed = [r for r in results if r[0]]
    denied = [r for r in results if not r[0]]
    assert len(allowed) == 30 and len(denied) == 170
    assert all(retry == 0.0 for _, retry in allowed)
    # one request every 60/30 = 2 s: the next one fits in 2 s, and denials did not count
    assert all(math.isclose(retry, 2.0) for _, retry in denied)


# ---------------------------------------------------------------------- quota_apply


async def test_quota_batch_200_concurrent_calls_let_exactly_30_through(store: StateStore) -> None:
    """A whole call's checks as one batch: per-user 60/min, per-tool 30/min, a session
    and a monthly counter. 200 concurrent calls: exactly 30 through; the refused ones
    stopped at the per-tool limit, so they counted neither the month nor the session."""
    now = time.time()
    month_end = now + 86400
    ops = [
        SessionOp("usr_1", "sess-a", 1800.0, 5),
        RateOp("usertool:usr_1:query_metrics:minute", 30, 60.0),
        RateOp("user:usr_1:minute", 60, 60.0),
        CounterOp("monthly:eng:2026-11", month_end, stop_above=50_000),
    ]
    results: list[list[object]] = []

    async def call() -> None:
        results.append(list(await store.quota_apply(ops, now=now)))

    with trio.fail_after(IO_LIMIT_S):
        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(call)
    through = [r for r in results if len(r) == 4]
    stopped = [r for r in results if len(r) != 4]
    assert len(through) == 30 and len(stopped) == 170
    assert sorted(r[3] for r in through) == list(range(1, 31))  # type: ignore[type-var]
    assert all(r[0] == (True, 1) and r[1] == (True, 0.0) and r[2] == (True, 0.0) for r in through)
    assert all(len(r) == 2 and r[1][0] is False and math.isclose(r[1][1], 2.0)  # type: ignore[index]
               for r in stopped)
    # the same state as the single primitives see it
    assert await store.counter_incr("monthly:eng:2026-11", expires_at=month_end) == 31
    assert (await store.rate_check("user:usr_1:minute", limit=60, period_s=60, now=now))[0]
    assert await store.session_touch("usr_1", "sess-b", now=now, idle_s=1800, max_sessions=5) == (True, 2)


async def test_quota_batch_stops_at_a_counter_over_its_limit(store: StateStore) -> None:
    now = time.time()
    ops = [CounterOp("m", now + 3600, stop_above=2), RateOp("r", 5, 60.0)]
    assert len(await store.quota_apply(ops, now=now)) == 2
    assert len(await store.quota_apply(ops, now=now)) == 2
    assert await store.quota_apply(ops, now=now) == [3]  # counted, stopped before the rate
    # the rate saw 2 calls: 3 more fit
    for _ in range(3):
        assert (await store.rate_check("r", limit=5, period_s=60, now=now))[0]
    assert not (await store.rate_check("r", limit=5, period_s=60, now=now))[0]
    assert await store.quota_apply([], now=now) == []
    sixth = [SessionOp("u", f"s{i}", 60.0, 5) for i in range(6)]
    answers = await store.quota_apply(sixth, now=now)
    assert answers == [(True, 1), (True, 2), (True, 3), (True, 4), (True, 5), (False, 5)]
    with pytest.raises(ValueError):
        await store.quota_apply([RateOp("r", 0, 60.0)], now=now)


async def test_retry_after_is_when_it_is_allowed(store: StateStore) -> None:
    now = 2_000_000.0
    with trio.fail_after(IO_LIMIT_S):
        for _ in range(10):
            assert (await store.rate_check("k", limit=10, period_s=60, now=now))[0]
        allowed, retry = await store.rate_check("k", limit=10, period_s=60, now=now + 1)
        assert not allowed and math.isclose(retry, 5.0)
        # many refusals later, the same wait still holds: a refusal does not consume
        for _ in range(20):
            assert not (await store.rate_check("k", limit=10, period_s=60, now=now + 5))[0]
        assert await store.rate_check("k", limit=10, period_s=60, now=now + 6) == (True, 0.0)
        allowed, retry = await store.rate_check("k", limit=10, period_s=60, now=now + 6)
        assert not allowed and math.isclose(retry, 6.0)
        # another key is independent
        assert (await store.rate_check("other", limit=10, period_s=60, now=now + 6))[0]


async def test_no_double_burst_at_a_window_boundary(store: StateStore) -> None:
    """A fixed per-minute window would let 30 through at 59.9 s and 30 more at 60.0 s."""
    minute = 60.0 * 50_000
    with trio.fail_after(IO_LIMIT_S):
        burst_at = minute + 59.9
        for _ in range(30):
            assert (await store.rate_check("b", limit=30, period_s=60, now=burst_at))[0]
        for t in (minute + 60.0, minute + 60.5, minute + 61.0, minute + 61.8):
            allowed, retry = await store.rate_check("b", limit=30, period_s=60, now=t)
            assert not allowed and math.isclose(retry, burst_at + 2.0 - t, abs_tol=1e-6)
        assert (await store.rate_check("b", limit=30, period_s=60, now=burst_at + 2.0))[0]
        assert not (await store.rate_check("b", limit=30, period_s=60, now=burst_at + 2.0))[0]


async def test_sustained_rate_and_cost(store: StateStore) -> None:
    with trio.fail_after(IO_LIMIT_S):
        # limit 7 per 10 s: 1/7 of the period is not exact in binary; the 7th still fits
        start = 3_000_000.0
        assert all([(await store.rate_check("odd", limit=7, period_s=10, now=start))[0]
                    for _ in range(7)])
        assert not (await store.rate_check("odd", limit=7, period_s=10, now=start))[0]
        # one request per second for 100 s against 7/10 s: 7 + 100 * 0.7 (+1 at the edge)
        count = 0
        for i in range(1, 101):
            count += (await store.rate_check("odd", limit=7, period_s=10, now=start + i))[0]
        assert count == 70
        assert await store.rate_check("cost", limit=10, period_s=60, now=start, cost=5) == (True, 0.0)
        assert (await store.rate_check("cost", limit=10, period_s=60, now=start, cost=5))[0]
        allowed, retry = await store.rate_check("cost", limit=10, period_s=60, now=start, cost=5)
        assert not allowed and math.isclose(retry, 30.0)
        with pytest.raises(ValueError):
            await store.rate_check("cost", limit=10, period_s=60, now=start, cost=11)
        with pytest.raises(ValueError):
            await store.rate_check("cost", limit=0, period_s=60, now=start)


def test_gcra_pure() -> None:
    r = gcra(None, limit=2, period_s=10, now=100.0, cost=1)
    assert r.allowed and r.new_tat == 105.0 and r.retry_after_s == 0.0
    r = gcra(110.0, limit=2, period_s=10, now=100.0, cost=1)
    assert not r.allowed and r.retry_after_s == 5.0
    assert gcra(50.0, limit=2, period_s=10, now=100.0, cost=2).new_tat == 110.0


# ---------------------------------------------------------------------- counters


async def test_counter_incr(store: StateStore) -> None:
    far = time.time() + 3600
    with trio.fail_after(IO_LIMIT_S):
        assert await store.counter_incr("dept:eng:2025-01", expires_at=far) == 1
        assert await store.counter_incr("dept:eng:2025-01", expires_at=far) == 2
        assert await store.counter_incr("dept:eng:2025-01", amount=5, expires_at=far) == 7
        assert await store.counter_incr("dept:ops:2025-01", expires_at=far) == 1

        async def bump() -> None:
            await store.counter_incr("dept:conc", expires_at=far)

        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(bump)
        assert await store.counter_incr("dept:conc", amount=0, expires_at=far) == 100


async def test_counter_expires(store: StateStore) -> None:
    with trio.fail_after(IO_LIMIT_S):
        # No race against a fixed window: a round whose two increments did not both finish
        # before the expiry proves nothing about it and is retried with a fresh key.
        for attempt in range(5):
            key = f"short{attempt}"
            soon = time.time() + 1.0
            counts = [await store.counter_incr(key, expires_at=soon) for _ in range(2)]
            if time.time() < soon:
                break
        else:
            pytest.fail("never two round trips within 1 s: the machine is too slow to tell")
        assert counts == [1, 2]
        # Wait until the expiry has passed on the stores' clock (the wall clock), not a guess.
        while time.time() <= soon + 0.01:
            await trio.sleep(soon + 0.01 - time.time() + 0.001)
        assert await store.counter_incr(key, expires_at=time.time() + 60) == 1


async def test_counter_survives_reopen(opener: Opener) -> None:
    with trio.fail_after(IO_LIMIT_S):
        first = opener()
        try:
            assert await first.counter_incr("m", amount=3, expires_at=time.time() + 600) == 3
        finally:
            await first.aclose()
        second = opener()
        try:
            assert await second.counter_incr("m", expires_at=time.time() + 600) == 4
        finally:
            await second.aclose()


# ---------------------------------------------------------------------- sessions


async def test_sixth_session_refused_until_one_goes_idle(store: StateStore) -> None:
    now, idle = 5_000_000.0, 600.0
    touch = store.session_touch
    with trio.fail_after(IO_LIMIT_S):
        for i in range(1, 6):
            assert await touch("usr_1", f"s{i}", now=now, idle_s=idle, max_sessions=5) == (True, i)
        assert await touch("usr_1", "s6", now=now + 1, idle_s=idle, max_sessions=5) == (False, 5)
        # an active session is always accepted; another user is independent
        assert await touch("usr_1", "s3", now=now + 1, idle_s=idle, max_sessions=5) == (True, 5)
        assert await touch("usr_2", "s6", now=now + 1, idle_s=idle, max_sessions=5) == (True, 1)
        # keep s2..s5 busy, let s1 go idle
        for i in range(2, 6):
            assert (await touch("usr_1", f"s{i}", now=now + 300, idle_s=idle, max_sessions=5))[0]
        assert await touch("usr_1", "s6", now=now + 599, idle_s=idle, max_sessions=5) == (False, 5)
        assert await touch("usr_1", "s6", now=now + 600, idle_s=idle, max_sessions=5) == (True, 5)
        # s1 is new again, and refused
        assert await touch("usr_1", "s1", now=now + 601, idle_s=idle, max_sessions=5) == (False, 5)
        # everything idle: the count starts over
        assert await touch("usr_1", "s9", now=now + 5000, idle_s=idle, max_sessions=5) == (True, 1)
        with pytest.raises(ValueError):
            await touch("usr_1", "s9", now=now, idle_s=0, max_sessions=5)


async def test_concurrent_new_sessions(store: StateStore) -> None:
    results: list[tuple[bool, int]] = []

    async def touch(i: int) -> None:
        results.append(await store.session_touch(
            "usr_c", f"s{i}", now=6_000_000.0, idle_s=60, max_sessions=5))

    with trio.fail_after(IO_LIMIT_S):
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(touch, i)
    assert sum(ok for ok, _ in results) == 5
    assert sorted(n for ok, n in results if ok) == [1, 2, 3, 4, 5]


async def test_ended_session_frees_its_slot_and_only_its_users(store: StateStore) -> None:
    """session_end takes one session of one user out of the count: the slot is free at
    once (no idle wait), ending again or ending an unknown id says False, the same id
    under another user is untouched, and an idle-expired session is not "ended"."""
    now, idle = 7_000_000.0, 600.0
    touch = store.session_touch
    with trio.fail_after(IO_LIMIT_S):
        assert await touch("usr_1", "a", now=now, idle_s=idle, max_sessions=1) == (True, 1)
        assert await touch("usr_2", "a", now=now, idle_s=idle, max_sessions=1) == (True, 1)
        assert await touch("usr_1", "b", now=now + 1, idle_s=idle, max_sessions=1) == (False, 1)
        # another user's session of the same id is another session
        assert await store.session_end("usr_3", "a", now=now + 1) is False
        assert await store.session_end("usr_1", "a", now=now + 2) is True
        assert await store.session_end("usr_1", "a", now=now + 2) is False
        assert await store.session_end("usr_1", "never", now=now + 2) is False
        assert await touch("usr_1", "b", now=now + 3, idle_s=idle, max_sessions=1) == (True, 1)
        # usr_2's "a" still counts
        assert await touch("usr_2", "c", now=now + 3, idle_s=idle, max_sessions=1) == (False, 1)
        # an ended id touched again is a new session (counted again)
        assert await touch("usr_1", "a", now=now + 4, idle_s=idle, max_sessions=1) == (False, 1)
        # gone idle before its end: nothing was counted any more
        assert await store.session_end("usr_2", "a", now=now + idle + 1) is False
        assert await touch("usr_2", "c", now=now + idle + 2, idle_s=idle, max_sessions=1) == (True, 1)


# ---------------------------------------------------------------------- SQLite only


async def test_sqlite_purge_drops_expired_quota_rows(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "state")
    try:
        await store.rate_check("r", limit=5, period_s=60, now=100.0)
        await store.counter_incr("c", expires_at=200.0)
        await store.counter_incr("c2", expires_at=9e9)
        await store.session_touch("u", "s", now=100.0, idle_s=50, max_sessions=2)
        assert await store.purge(1000.0) == 3
    finally:
        await store.aclose()
    conn = sqlite3.connect(tmp_path / "state" / "state.db")
    try:
        assert conn.execute("SELECT count(*) FROM rate_gcra").fetchone() == (0,)
        assert conn.execute("SELECT key FROM counters").fetchall() == [("c2",)]
        assert conn.execute("SELECT count(*) FROM sessions").fetchone() == (0,)
    finally:
        conn.close()


# ---------------------------------------------------------------------- Redis only


async def test_redis_keys_have_ttls(redis_server: RedisServer) -> None:
    prefix = f"ttl:{uuid.uuid4().hex}:"
    store = open_redis(redis_server.url, prefix)
    now = time.time()
    try:
        with trio.fail_after(IO_LIMIT_S):
            await store.burn_jti("j", now + 300)
            await store.rate_check("r", limit=30, period_s=60, now=now)
            await store.counter_incr("c", expires_at=now + 3600)
            await store.session_touch("u", "s", now=now, idle_s=600, max_sessions=5)
            await store.put_lease(lease("l", expires_at=now + 300))
    finally:
        await store.aclose()
    with redis_py.Redis.from_url(redis_server.url) as client:
        ttls = {k.decode()[len(prefix):]: client.pttl(k) for k in client.scan_iter(f"{prefix}*")}
    assert 0 < ttls["jti:j"] <= 300_000
    assert 0 < ttls["rl:r"] <= 2_100
    assert 3_590_000 < ttls["ctr:c"] <= 3_600_000
    assert 0 < ttls["sess:u"] <= 600_000
    assert ttls["lease:l"] > 0
    # only the lease index is without a TTL (purge keeps it in step with the hashes)
    assert [k for k, v in ttls.items() if v < 0] == ["leases:active"]


async def test_two_hosts_share_jtis_and_limits(redis_server: RedisServer) -> None:
    prefix = f"hosts:{uuid.uuid4().hex}:"
    host_a = open_redis(redis_server.url, prefix)
    host_b = open_redis(redis_server.url, prefix)
    try:
        with trio.fail_after(IO_LIMIT_S):
            assert await host_a.burn_jti("jti-shared", time.time() + 300)
            assert await host_b.burn_jti("jti-shared", time.time() + 300) is False
            results: list[bool] = []

            async def check(host: RedisStore) -> None:
                results.append((await host.rate_check(
                    "usr_1", limit=30, period_s=60, now=7_000_000.0))[0])

            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(check, (host_a, host_b)[i % 2])
            assert results.count(True) == 30
            assert await host_a.session_touch("u", "a", now=1.0, idle_s=60, max_sessions=1) == (True, 1)
            assert await host_b.session_touch("u", "b", now=2.0, idle_s=60, max_sessions=1) == (False, 1)
    finally:
        await host_a.aclose()
        await host_b.aclose()


async def test_redis_outage_is_state_unavailable_without_a_hang(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    store = open_redis(server.url, "outage:", timeout_s=OUTAGE_TIMEOUT_S)
    try:
        with trio.fail_after(IO_LIMIT_S):
            await store.ping()
            assert await store.burn_jti("before", time.time() + 60)
            assert server.proc is not None
            # A Redis that stops answering (SIGSTOP): each call ends by the store's own
            # timeout (its error says so), not by this test's outer bound.
            os.kill(server.proc.pid, signal.SIGSTOP)
            no_answer = f"no answer within {OUTAGE_TIMEOUT_S:g} s"
            try:
                with pytest.raises(StateUnavailable):
                    await store.burn_jti("during", time.time() + 60)
                assert no_answer in store.health()["last_error"]
                with pytest.raises(StateUnavailable):
                    await store.rate_check("r", limit=1, period_s=1, now=1.0)
                health = store.health()
                assert health["ok"] is False and no_answer in health["last_error"]
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            # A Redis that is gone (connection refused): an error at once, not a timeout.
            server.kill()
            with pytest.raises(StateUnavailable):
                await store.counter_incr("c", expires_at=time.time() + 60)
            assert "no answer" not in store.health()["last_error"]
            # ... and back: the store recovers by itself.
            server.start()
            assert await store.counter_incr("c", expires_at=time.time() + 60) == 1
            assert store.health()["ok"] is True
    finally:
        await store.aclose()
        server.stop()


async def test_redis_restart_keeps_state_with_aof(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    store = open_redis(server.url, "aof:")
    try:
        with trio.fail_after(IO_LIMIT_S):
            assert await store.burn_jti("jti-kept", time.time() + 600)
            assert await store.counter_incr("month", amount=41, expires_at=time.time() + 600) == 41
            server.kill()  # kill -9: appendfsync always keeps every acknowledged write
            server.start()
            assert await store.burn_jti("jti-kept", time.time() + 600) is False
            assert await store.counter_incr("month", expires_at=time.time() + 600) == 42
    finally:
        await store.aclose()
        server.stop()


async def test_redis_password_is_used_and_never_shown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cret-" + uuid.uuid4().hex
    server = RedisServer(tmp_path / "redis", password=secret).start()
    good = RedisStore.open(server.url, password=secret, prefix="pw:", timeout_s=REDIS_TIMEOUT_S)
    bad = RedisStore.open(server.url, password="wrong-" + secret, prefix="pw:",
                          timeout_s=REDIS_TIMEOUT_S)
    with_url = RedisStore.open(f"redis://:{secret}@127.0.0.1:{server.port}/0", prefix="pw:",
                               timeout_s=REDIS_TIMEOUT_S)
    caplog.set_level(logging.DEBUG)
    try:
        with trio.fail_after(IO_LIMIT_S):
            assert await good.burn_jti("j", time.time() + 60)
            assert await with_url.burn_jti("j", time.time() + 60) is False
            with pytest.raises(StateUnavailable) as info:
                await bad.burn_jti("j2", time.time() + 60)
    finally:
        for s in (good, bad, with_url):
            await s.aclose()
        server.stop()
    shown = " ".join([caplog.text, str(info.value), repr(bad.health()), repr(with_url.health())])
    assert secret not in shown
    assert with_url.health()["url"] == f"redis://:***@127.0.0.1:{server.port}/0"
    assert redact_url("redis://127.0.0.1:1/0") == "redis://127.0.0.1:1/0"
    with pytest.raises(StateUnavailable, match="rediss://"):
        RedisStore.open("redis://127.0.0.1:1/0", ssl_ca_file="/etc/ssl/ca.pem")


# ---------------------------------------------------------------------- rotation notices


async def test_rotation_notices_are_read_once_by_every_reader(opener: Opener) -> None:
    a, b = opener(), opener()  # two handles: two hosts on one state
    try:
        with trio.fail_after(IO_LIMIT_S):
            start_a = await a.rotation_cursor()
            start_b = await b.rotation_cursor()
            assert await a.rotations_after(start_a) == ([], start_a)
            await a.note_rotation('{"backend":"aws","secret_id":"s1"}', at=time.time())
            await a.note_rotation('{"backend":"aws","secret_id":"s2"}', at=time.time())
            got_b, cur_b = await b.rotations_after(start_b)
            assert got_b == ['{"backend":"aws","secret_id":"s1"}', '{"backend":"aws","secret_id":"s2"}']
            assert await b.rotations_after(cur_b) == ([], cur_b)
            got_a, cur_a = await a.rotations_after(start_a)
            assert len(got_a) == 2
            # a reader starting now sees only what comes next
            assert await b.rotation_cursor() == cur_b
            await b.note_rotation("third", at=time.time())
            assert (await a.rotations_after(cur_a))[0] == ["third"]
            with pytest.raises(ValueError):
                await a.rotations_after("nonsense")
    finally:
        await a.aclose()
        await b.aclose()
