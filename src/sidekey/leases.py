"""Lease lifecycle: one lease per redeemed token, released once, expired by a task.

States and their legal transitions live in :data:`TRANSITIONS`; every transition is a
compare-and-set in the state store, so a release racing an expiry has exactly one
winner and the loser gets a 409.

Every end has an audit event, even across ``kill -9``: the transition to an ended state
also marks the lease *unaudited* (one atomic store step), and :meth:`LeaseManager.audited`
clears the mark once the end's event (``mcp.tool_call``, ``lease.expired``,
``lease.revoked``) is durable. A crash in between leaves the lease in
:meth:`LeaseManager.unaudited`, for which the daemon writes ``lease.recovered`` at its
next start. Why not write the event first and end the lease after: a crash between the
two would leave an active lease with a release event, which then expires (a second,
contradicting event) -- and a release that loses the race to an expiry would have
written a release that never happened. The price is one more store write per end
(SQLite: a few microseconds, no fsync; Redis: one round trip).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

import trio

from .encoding import random_hex
from .protocol import Conflict, Denied, NotFound
from .store import MAX_UNAUDITED_LISTED, LeaseRecord, StateStore, StateUnavailable

log = logging.getLogger(__name__)

ACTIVE, RELEASED, EXPIRED, REVOKED = "active", "released", "expired", "revoked"
TRANSITIONS: dict[str, frozenset[str]] = {
    ACTIVE: frozenset({RELEASED, EXPIRED, REVOKED}),
    RELEASED: frozenset(),
    EXPIRED: frozenset(),
    REVOKED: frozenset(),
}

ExpiredCallback = Callable[[LeaseRecord], Awaitable[None]]


def check_transition(from_state: str, to_state: str) -> None:
    """Raise :class:`Conflict` if ``from_state -> to_state`` is not a legal transition."""
    if to_state not in TRANSITIONS.get(from_state, frozenset()):
        raise Conflict(
            f"lease is {from_state}, it cannot become {to_state}", code=f"lease_{from_state}"
        )


def new_lease_id() -> str:
    return f"lse_{random_hex()}"


@runtime_checkable
class HeldLeaseEnder(Protocol):
    """A store that reads a lease, checks its holder and ends it in one atomic step (one
    round trip): :meth:`sidekey.store.redis.RedisStore.end_lease_held`. Other stores get
    the same checks as a read followed by a compare-and-set."""

    async def end_lease_held(
        self, lease_id: str, to_state: str, *, at: float, holder: tuple[int, int] | None
    ) -> tuple[str, LeaseRecord | None]: ...


def _not_holder() -> Denied:
    return Denied("only the process holding the lease may release it", code="peer_mismatch")


class LeaseManager:
    """Creates, ends and expires leases. Expiry events go to ``on_expired``."""

    def __init__(
        self,
        store: StateStore,
        *,
        on_expired: ExpiredCallback,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._on_expired = on_expired
        self._clock = clock
        self._heap: list[tuple[float, str]] = []
        self._wakeup = trio.Event()
        self._unreported: set[str] = set()
        self.active_count = 0
        self._end_held = store.end_lease_held if isinstance(store, HeldLeaseEnder) else None

    async def create(self, rec: LeaseRecord) -> None:
        await self._store.put_lease(rec)
        self.active_count += 1
        heapq.heappush(self._heap, (rec.expires_at, rec.lease_id))
        if self._heap[0][1] == rec.lease_id:
            self._wakeup.set()

    async def get(self, lease_id: str) -> LeaseRecord:
        rec = await self._store.get_lease(lease_id)
        if rec is None:
            raise NotFound("no such lease", code="lease_not_found")
        return rec

    async def end(self, rec: LeaseRecord, to_state: str) -> LeaseRecord:
        """Move an active lease to ``to_state`` (released/revoked). 409 if it is not active."""
        check_transition(rec.state, to_state)
        now = self._clock()
        if not await self._store.transition_lease(rec.lease_id, ACTIVE, to_state, at=now):
            current = await self.get(rec.lease_id)
            check_transition(current.state, to_state)  # raises: someone else won the race
            raise Conflict("lease changed state concurrently", code="lease_conflict")
        self.active_count = max(0, self.active_count - 1)
        return dataclasses.replace(rec, state=to_state, ended_at=now)

    async def end_held(
        self, lease_id: str, to_state: str, *, holder: tuple[int, int] | None
    ) -> tuple[LeaseRecord, LeaseRecord]:
        """End the active lease ``lease_id`` as ``to_state`` if ``holder`` (peer uid, pid;
        None: anyone, e.g. an admin) holds it. Returns (the lease as it was, as it is
        now). 404 ``lease_not_found``, 403 ``peer_mismatch`` (checked before the state,
        nothing changes), 409 as :meth:`end`."""
        if self._end_held is None:
            rec = await self.get(lease_id)
            if holder is not None and (rec.peer_uid, rec.peer_pid) != holder:
                raise _not_holder()
            return rec, await self.end(rec, to_state)
        check_transition(ACTIVE, to_state)
        now = self._clock()
        outcome, found = await self._end_held(lease_id, to_state, at=now, holder=holder)
        if found is None:
            raise NotFound("no such lease", code="lease_not_found")
        if outcome == "not_holder":
            raise _not_holder()
        if outcome != "ended":
            check_transition(found.state, to_state)  # raises: it is no longer active
            raise Conflict("lease changed state concurrently", code="lease_conflict")
        self.active_count = max(0, self.active_count - 1)
        return found, dataclasses.replace(found, state=to_state, ended_at=now)

    async def audited(self, lease_id: str) -> None:
        """Record that the lease's end event is durable. Never raises for a store outage:
        the event is written; the worst outcome is a redundant ``lease.recovered`` at
        the next start."""
        try:
            await self._store.mark_lease_audited(lease_id)
        except StateUnavailable as exc:
            log.warning("lease %s: its end event is written but could not be marked so (%s); "
                        "the next start writes lease.recovered for it", lease_id, exc.message)

    async def unaudited(self, *, limit: int = MAX_UNAUDITED_LISTED) -> list[LeaseRecord]:
        """Ended leases whose end event is not known to be written (a crash came between
        the end and its event), oldest first."""
        return await self._store.leases_unaudited(limit=limit)

    async def recover(self) -> int:
        """Load active leases from the store after a restart; return how many."""
        active = await self._store.leases_in_state(ACTIVE)
        for rec in active:
            heapq.heappush(self._heap, (rec.expires_at, rec.lease_id))
        self.active_count = len(active)
        self._wakeup.set()
        return len(active)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire leases at their ``expires_at``, forever. Writes via ``on_expired``."""
        task_status.started()
        while True:
            self._wakeup = trio.Event()
            delay = math.inf
            if self._heap:
                delay = max(0.0, self._heap[0][0] - self._clock())
            with trio.move_on_after(delay):
                await self._wakeup.wait()
            now = self._clock()
            while self._heap and self._heap[0][0] <= now:
                _, lease_id = heapq.heappop(self._heap)
                await self._expire(lease_id, now)

    async def _expire(self, lease_id: str, now: float) -> None:
        transitioned = lease_id in self._unreported
        try:
            if not transitioned:
                if not await self._store.transition_lease(lease_id, ACTIVE, EXPIRED, at=now):
                    return  # already released or revoked
                self.active_count = max(0, self.active_count - 1)
                self._unreported.add(lease_id)
            rec = await self._store.get_lease(lease_id)
            if rec is not None:
                await self._on_expired(rec)
                await self.audited(lease_id)
            self._unreported.discard(lease_id)
        except Exception:
            # A failing store or audit write must not kill the expiry task, and the
            # lease.expired event must not be lost: retry soon.
            log.exception("lease expiry handling failed for %s; retrying", lease_id)
            heapq.heappush(self._heap, (now + 1.0, lease_id))
