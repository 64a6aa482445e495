"""LeaseManager in process: ends, expiry at the deadline, retries, restart recovery.

A real SQLite state store on a temporary directory and trio's virtual clock
(``autojump_clock``): the expiry task sleeps until a lease's ``expires_at`` and the
clock jumps there, so the tests wait for no wall-clock time. The manager's clock counts
its reads and refuses to go on past a bound, so an expiry task that spins (wakes,
expires nothing, wakes again at once) fails the test instead of hanging it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from sidekey.leases import EXPIRED, RELEASED, REVOKED, LeaseManager
from sidekey.protocol import Conflict
from sidekey.store import LeaseRecord, StateStore, StateUnavailable, open_store
from test_store_contract import lease

MAX_CLOCK_READS = 500


def bounded_clock() -> Callable[[], float]:
    """trio's (virtual) clock, read at most MAX_CLOCK_READS times."""
    reads = 0

    def clock() -> float:
        nonlocal reads
        reads += 1
        if reads > MAX_CLOCK_READS:
            raise RuntimeError("the expiry task spins: it keeps reading the clock without sleeping")
        return trio.current_time()

    return clock


class Expiries:
    """The ``on_expired`` callback: records (virtual time, lease) per call; can fail."""

    def __init__(self, *, failures: int = 0) -> None:
        self.calls: list[tuple[float, LeaseRecord]] = []
        self.failures = failures
        self.delivered = trio.Event()

    async def __call__(self, rec: LeaseRecord) -> None:
        self.calls.append((trio.current_time(), rec))
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("audit sink down")
        self.delivered.set()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    store = open_store(tmp_path / "state")
    try:
        yield store
    finally:
        await store.aclose()


async def test_each_end_counts_one_lease_down(store: StateStore) -> None:
    manager = LeaseManager(store, on_expired=Expiries(), clock=bounded_clock())
    first, second = lease("lse_a", expires_at=300.0), lease("lse_b", expires_at=300.0)
    await manager.create(first)
    await manager.create(second)
    assert manager.active_count == 2

    ended = await manager.end(first, RELEASED)
    assert (ended.state, manager.active_count) == (RELEASED, 1)
    await manager.end(second, REVOKED)
    assert manager.active_count == 0

    with pytest.raises(Conflict) as refused:
        await manager.end(second, RELEASED)  # the record passed in is stale: the store decides
    assert refused.value.code == "lease_revoked"
    assert manager.active_count == 0
    assert (await manager.get("lse_b")).state == REVOKED


async def test_a_lease_expires_exactly_at_its_deadline(
    store: StateStore, autojump_clock: trio.testing.MockClock
) -> None:
    expiries = Expiries()
    manager = LeaseManager(store, on_expired=expiries, clock=bounded_clock())
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        start = trio.current_time()
        await manager.create(lease("lse_due", expires_at=start + 4.0))
        assert manager.active_count == 1
        with trio.fail_after(60):
            await expiries.delivered.wait()
        nursery.cancel_scope.cancel()

    [(at, rec)] = expiries.calls
    assert at == start + 4.0  # woke at the deadline itself, and expired the lease then
    assert (rec.lease_id, rec.state, rec.ended_at) == ("lse_due", EXPIRED, start + 4.0)
    assert manager.active_count == 0
    assert await manager.unaudited() == []  # its event is written and marked so


async def test_a_failed_expiry_event_is_retried_a_second_later(
    store: StateStore, autojump_clock: trio.testing.MockClock
) -> None:
    expiries = Expiries(failures=2)
    manager = LeaseManager(store, on_expired=expiries, clock=bounded_clock())
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        start = trio.current_time()
        await manager.create(lease("lse_retry", expires_at=start + 2.0))
        with trio.fail_after(60):
            await expiries.delivered.wait()
        await trio.sleep(10)  # nothing more happens: delivered once, not again
        nursery.cancel_scope.cancel()

    assert [at - start for at, _ in expiries.calls] == [2.0, 3.0, 4.0]
    assert {rec.state for _, rec in expiries.calls} == {EXPIRED}
    assert manager.active_count == 0  # counted down once, not once per try
    assert await manager.unaudited() == []


async def test_a_store_outage_at_the_audited_mark_neither_raises_nor_repeats_the_event(
    store: StateStore, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def mark_fails(lease_id: str) -> None:
        raise StateUnavailable("database is locked")

    monkeypatch.setattr(store, "mark_lease_audited", mark_fails)
    expiries = Expiries()
    manager = LeaseManager(store, on_expired=expiries, clock=bounded_clock())

    await manager.audited("lse_any")  # logged, not raised: the event is already durable

    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await manager.create(lease("lse_mark", expires_at=trio.current_time() + 1.0))
        with trio.fail_after(60):
            await expiries.delivered.wait()
        await trio.sleep(10)
        nursery.cancel_scope.cancel()

    assert len(expiries.calls) == 1  # one lease.expired, not one per second
    # Not marked: the next start writes lease.recovered for it (redundant, never lost).
    assert [rec.lease_id for rec in await manager.unaudited()] == ["lse_mark"]


async def test_after_a_restart_the_stored_active_leases_expire(
    store: StateStore, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    await store.put_lease(lease("lse_old_1", expires_at=start + 3.0))
    await store.put_lease(lease("lse_old_2", expires_at=start + 5.0))
    await store.put_lease(lease("lse_done", expires_at=start + 1.0, state=RELEASED))

    expiries = Expiries()
    manager = LeaseManager(store, on_expired=expiries, clock=bounded_clock())
    assert await manager.recover() == 2
    assert manager.active_count == 2
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        with trio.fail_after(60):
            while len(expiries.calls) < 2:
                await trio.sleep(0.5)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()

    assert [(at - start, rec.lease_id) for at, rec in expiries.calls] == [
        (3.0, "lse_old_1"),
        (5.0, "lse_old_2"),
    ]
    assert manager.active_count == 0
    assert (await manager.get("lse_done")).state == RELEASED
