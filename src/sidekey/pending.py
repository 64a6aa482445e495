"""Call records kept in memory between authorize and the end of the call's lease.

``authorize`` remembers what it knew about a call (its arguments, the user token's
facts, the policy record) so that the ``mcp.tool_call`` event written at release can
carry them. A token that is never redeemed, or a lease that is never released, must not
keep that memory: every record has an expiry (the token's ``exp`` plus leeway, then the
lease's end) and a size, and :class:`CallRecords` bounds the bytes per owner (the MCP
server the call is for) and in total.

Why evict rather than refuse when a server's budget is full: the records are a
convenience for the release event (the ``mcp.authorize`` event already holds the
arguments, durably), so losing the oldest ones costs a server's own audit detail, not
its availability, and the oldest records are the ones least likely to be redeemed.
The budget is per server, so a compromised server that floods authorize only evicts its
own records; when the total is full, the server holding the most bytes loses its
oldest record first, which again is the flooder. Refusing new authorizes instead would
turn a burst of abandoned tokens into an outage for that server.

Pure: no I/O, no trio; the caller passes ``now``.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

V = TypeVar("V")

# Memory a record costs beyond its measured payload: the entry object, two dict slots,
# an order slot and a heap tuple (measured with tracemalloc on CPython 3.11: ~420 bytes;
# rounded up). Counting it keeps a flood of empty-argument calls bounded too.
ENTRY_OVERHEAD_BYTES = 512


@dataclass(slots=True)
class _Entry(Generic[V]):
    owner: str
    size: int
    expires_at: float
    seq: int
    value: V


class CallRecords(Generic[V]):
    """A map ``key -> value`` with an expiry and a byte size per entry, bounded per owner
    and in total. Expired entries are dropped on every :meth:`put` and :meth:`sweep`
    (a heap in expiry order, so any TTL mix expires exactly); over a budget, the
    owner's oldest entries go (see the module docstring for why)."""

    def __init__(self, *, per_owner_bytes: int, total_bytes: int) -> None:
        self.per_owner_bytes = per_owner_bytes
        self.total_bytes = total_bytes
        self._entries: dict[str, _Entry[V]] = {}
        self._by_owner: dict[str, OrderedDict[str, None]] = {}
        self._owner_bytes: dict[str, int] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        self.bytes = 0
        self.evicted = 0  # dropped for a budget before their expiry
        self.expired = 0  # dropped at their expiry

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def set_limits(self, *, per_owner_bytes: int, total_bytes: int) -> None:
        """New budgets (a config reload); applied from the next :meth:`put` on."""
        self.per_owner_bytes = per_owner_bytes
        self.total_bytes = total_bytes

    def put(self, key: str, value: V, *, owner: str, size: int, expires_at: float,
            now: float) -> int:
        """Store ``value`` under ``key`` (replacing an entry with that key). Returns how
        many older entries were evicted to make room (0 normally)."""
        self.sweep(now)
        self.pop(key)
        size = max(0, size) + ENTRY_OVERHEAD_BYTES
        evicted = 0
        order = self._by_owner.get(owner)
        while order and self._owner_bytes[owner] + size > self.per_owner_bytes:
            self._drop(next(iter(order)))
            evicted += 1
        while self._entries and self.bytes + size > self.total_bytes:
            biggest = max(self._owner_bytes, key=self._owner_bytes.__getitem__)
            self._drop(next(iter(self._by_owner[biggest])))
            evicted += 1
        self.evicted += evicted
        self._seq += 1
        self._entries[key] = _Entry(owner, size, expires_at, self._seq, value)
        self._by_owner.setdefault(owner, OrderedDict())[key] = None
        self._owner_bytes[owner] = self._owner_bytes.get(owner, 0) + size
        self.bytes += size
        heapq.heappush(self._heap, (expires_at, self._seq, key))
        return evicted

    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        return entry.value if entry is not None else None

    def pop(self, key: str, default: V | None = None) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return default
        self._drop(key)
        return entry.value

    def move(self, old: str, new: str, *, expires_at: float, now: float) -> V | None:
        """Re-file ``old``'s value under ``new`` with a new expiry (a redeemed token's
        record becomes its lease's). Returns the value, or None if ``old`` was gone."""
        entry = self._entries.get(old)
        if entry is None:
            return None
        self._drop(old)
        self.put(new, entry.value, owner=entry.owner, size=entry.size - ENTRY_OVERHEAD_BYTES,
                 expires_at=expires_at, now=now)
        return entry.value

    def sweep(self, now: float) -> int:
        """Drop every entry whose expiry is at or before ``now``; return how many.
        Heap items of entries already gone are discarded on the way; the heap is
        rebuilt when such leftovers outnumber the live entries, so it stays O(live)."""
        dropped = 0
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and entry.seq == seq:
                self._drop(key)
                dropped += 1
        if len(heap) > 2 * len(self._entries) + 1024:
            self._heap = [(e.expires_at, e.seq, k) for k, e in self._entries.items()]
            heapq.heapify(self._heap)
        self.expired += dropped
        return dropped

    def stats(self) -> dict[str, Any]:
        return {
            "count": len(self._entries),
            "bytes": self.bytes,
            "bytes_by_server": dict(sorted(self._owner_bytes.items())),
            "budget_per_server": self.per_owner_bytes,
            "budget_total": self.total_bytes,
            "evicted": self.evicted,
            "expired": self.expired,
        }

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        order = self._by_owner[entry.owner]
        del order[key]
        left = self._owner_bytes[entry.owner] - entry.size
        if order:
            self._owner_bytes[entry.owner] = left
        else:  # forget owners with nothing held (owner names come from requests)
            del self._by_owner[entry.owner]
            del self._owner_bytes[entry.owner]
        self.bytes -= entry.size
