"""Timed purging of in-memory caches: an expiry index, and the loop that uses it.

The secret cache (:mod:`sidekey.backends.cache`) and the verified-token cache
(:mod:`sidekey.oauth`) used to drop an expired entry only at the next lookup of the
same key (or by LRU eviction), so a value nobody asked for again stayed in the
daemon's memory indefinitely. Each now keeps an :class:`ExpiryIndex` of its entries
and a daemon task (:func:`run_purger`) drops what has expired every
:data:`PURGE_INTERVAL_S`: an entry is gone at most that long after it stopped being
servable, whether or not anyone looks it up again.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

import trio

# How often the daemon purges expired cache entries. This is the slack in the README's
# bound ("at most cache_ttl_s + stale_if_error_s + PURGE_INTERVAL_S"); a purge with
# nothing due costs one comparison, so a short interval is free.
PURGE_INTERVAL_S = 1.0

K = TypeVar("K", bound=Hashable)


class ExpiryIndex(Generic[K]):
    """The keys of a cache ordered by when their entries stop being servable.

    A min-heap of ``(deadline, seq, key)``: :meth:`due` yields the keys whose deadline
    has passed, in deadline order, in O(log n) each, so a purge costs what it drops
    rather than the cache's size. Keys only, never values: an item left behind by an
    entry that was replaced, evicted or invalidated holds nothing secret, and the owner
    checks that the key's *current* entry is due before dropping it. Such left-behind
    items go at their deadline, or all at once when the owner calls :meth:`rebuild`
    (it does so when the index grows past twice its cache's bound).
    """

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()  # ties: keys need not be comparable

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, deadline: float, key: K) -> None:
        heapq.heappush(self._heap, (deadline, next(self._seq), key))

    def due(self, now: float) -> Iterator[K]:
        """Remove and yield every key whose deadline is ``<= now``."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            yield heapq.heappop(heap)[2]

    def rebuild(self, items: Iterable[tuple[float, K]]) -> None:
        """Replace the index with ``(deadline, key)`` of the live entries."""
        self._heap = [(deadline, next(self._seq), key) for deadline, key in items]
        heapq.heapify(self._heap)

    def clear(self) -> None:
        self._heap.clear()


async def run_purger(
    purge: Callable[[], int],
    *,
    interval_s: float = PURGE_INTERVAL_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``purge`` every ``interval_s`` seconds (trio time) until cancelled."""
    task_status.started()
    while True:
        await trio.sleep(interval_s)
        purge()
