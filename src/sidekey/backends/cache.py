"""An in-memory cache in front of any :class:`~sidekey.backends.Backend`.

Only ``kind: static`` secrets are cached: a dynamic secret is a fresh credential for
one tool call, and sharing it would hand one caller's credential to another. For
static secrets:

* **TTL.** An entry lives ``ref.cache_ttl_s`` seconds if the reference sets it, else
  the backend's ``ttl_s``. A TTL of 0 turns caching off for that reference.
* **Single flight.** Any number of concurrent misses for one key cause exactly one
  inner fetch; the other callers wait for it and share its value or its exception. A
  failed fetch is not cached. If the task doing the fetch is cancelled, one of the
  waiters starts a new fetch, so no waiter waits on a fetch that will never end.
* **Bounded.** At most ``max_entries`` entries; the least recently used one goes first.
* **Purged on time.** An entry is dropped once it can no longer be served — ``ttl``
  after it was fetched, plus ``stale_if_error_s`` — by :meth:`CachedBackend.purge_expired`,
  which the daemon runs every :data:`~sidekey.expiry.PURGE_INTERVAL_S`
  (:meth:`CachedBackend.run_purger`), not only when the same key is looked up again.
  So a cached value stays in memory at most ``ttl + stale_if_error_s +
  PURGE_INTERVAL_S`` (invalidation, rotation, eviction and :meth:`CachedBackend.aclose`
  drop it sooner).
* **Stale if error** (off by default: fail closed). When the inner fetch fails with
  :class:`BackendError` and the entry expired less than ``stale_if_error_s`` ago, the
  expired value is served and a warning names the secret. :class:`SecretNotFound` is
  never masked: a deleted secret must stop being served.
* **Invalidation.** :meth:`CachedBackend.rotate` (and :meth:`CachedBackend.invalidate`)
  drop every entry of the secret — all its versions, stages and keys — and detach any
  fetch in flight for it, so a fetch that started before the rotation can neither
  put the old value back into the cache nor hand it to a caller that arrives after.

Keys are built from the reference's selecting fields, never from a value. Values live
only in this process's memory: nothing is written to disk or logged, and neither the
cache's ``repr`` nor :meth:`CachedBackend.health` show one.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ..expiry import PURGE_INTERVAL_S, ExpiryIndex, run_purger
from . import Backend, BackendError, SecretNotFound, SecretValue

if TYPE_CHECKING:
    from ..config import SecretRef

log = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 10_000

# Which secret a reference names: every version, stage and key of it is dropped on
# rotation (a Vault KV v2 write or an AWS put creates a new version of the whole secret,
# so a different `key` / `json_key` of the same secret changes too).
_SecretId = tuple[str, str | None, str | None, str | None, str | None]
# Which value of that secret: (key, version, version_stage, version_id, json_key).
_Selector = tuple[str | None, int | None, str | None, str | None, str | None]
_Key = tuple[_SecretId, _Selector]


def _secret_id(ref: SecretRef) -> _SecretId:
    return (ref.backend, ref.name, ref.mount, ref.path, ref.secret_id)


def cache_key(ref: SecretRef) -> _Key:
    """The value-free identity of what ``ref`` selects: backend name plus every field
    that picks the value (name, mount, path, key, version, secret_id, version_stage,
    version_id, json_key). ``kind``, ``pool_size`` and ``cache_ttl_s`` do not select a
    value and are left out."""
    return (
        _secret_id(ref),
        (ref.key, ref.version, ref.version_stage, ref.version_id, ref.json_key),
    )


class _Entry:
    __slots__ = ("expires_at", "stale_warned", "value")

    def __init__(self, value: SecretValue, expires_at: float) -> None:
        self.value = value
        self.expires_at = expires_at
        self.stale_warned = False

    def __repr__(self) -> str:
        return f"_Entry(version={self.value.version!r}, expires_at={self.expires_at!r})"


class _Flight:
    """One inner fetch that concurrent misses for the same key wait on.

    When ``done`` is set exactly one of these holds: ``value`` (share it), ``error``
    (share it), or neither — the fetching task was cancelled, or got a value that must
    not be shared — and each waiter has to try again.
    """

    __slots__ = ("done", "error", "stale", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: SecretValue | None = None
        self.error: Exception | None = None
        self.stale = False

    def __repr__(self) -> str:
        return f"_Flight(done={self.done.is_set()}, failed={self.error is not None})"


def _shared_error(exc: Exception) -> Exception:
    """A copy of ``exc`` for one more waiter to raise.

    Raising the very same exception object from many tasks would keep growing its
    ``__traceback__`` (every raise appends frames) and tie the tasks' tracebacks
    together; a copy gets its own. Exceptions that cannot be copied are shared as is.
    """
    try:
        clone = copy.copy(exc)
    except Exception:
        return exc
    if type(clone) is not type(exc):  # pragma: no cover - a __reduce__ that lies
        return exc
    return clone


class CachedBackend:
    """A :class:`~sidekey.backends.Backend` that caches another backend's static secrets.

    ``ttl_s`` is the default entry lifetime (``ref.cache_ttl_s`` overrides it; 0 means
    no caching); ``stale_if_error_s`` how long after expiry a value may still be served
    when the inner backend is unavailable (0: never); ``clock`` returns monotonic
    seconds (trio's clock by default, so tests can use ``autojump_clock``).

    Raises :class:`ValueError` for a negative duration or ``max_entries < 1``.
    """

    def __init__(
        self,
        inner: Backend,
        *,
        ttl_s: float,
        stale_if_error_s: float = 0.0,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if ttl_s < 0:
            raise ValueError("ttl_s must be >= 0")
        if stale_if_error_s < 0:
            raise ValueError("stale_if_error_s must be >= 0")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.inner = inner
        self.name = inner.name
        self.ttl_s = ttl_s
        self.stale_if_error_s = stale_if_error_s
        self.max_entries = max_entries
        self._clock = clock
        # Least recently used first.
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        # When each entry stops being servable (expires_at + stale_if_error_s), soonest
        # first, for purge_expired().
        self._expiry: ExpiryIndex[_Key] = ExpiryIndex()
        self._inflight: dict[_Key, _Flight] = {}
        self._hits = 0
        self._misses = 0
        self._stale_served = 0
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"CachedBackend(name={self.name!r}, entries={len(self._entries)}, "
            f"ttl_s={self.ttl_s!r}, stale_if_error_s={self.stale_if_error_s!r})"
        )

    def ttl_for(self, ref: SecretRef) -> float:
        """How long a value of ``ref`` is cached; 0 for dynamic secrets and disabled caching."""
        if ref.kind != "static":
            return 0.0
        return ref.cache_ttl_s if ref.cache_ttl_s is not None else self.ttl_s

    # ------------------------------------------------------------------ Backend protocol

    async def fetch(self, ref: SecretRef) -> SecretValue:
        """Return ``ref``'s value from the cache, or from the inner backend on a miss.

        Raises what the inner backend raises (:class:`SecretNotFound`,
        :class:`BackendError`), unless a stale value may be served instead; raises
        :class:`BackendError` after :meth:`aclose`.
        """
        if self._closed:
            raise BackendError(f"backend {self.name!r} is closed")
        ttl = self.ttl_for(ref)
        if ttl <= 0:
            return await self.inner.fetch(ref)
        key = cache_key(ref)
        counted = False
        while True:
            entry = self._fresh(key)
            if entry is not None:
                if not counted:
                    self._hits += 1
                return entry.value
            if not counted:
                self._misses += 1
                counted = True
            flight = self._inflight.get(key)
            if flight is None:
                flight = self._inflight[key] = _Flight()
                return await self._lead(key, ref, ttl, flight)
            await flight.done.wait()
            if flight.error is not None:
                shared = _shared_error(flight.error)
                if shared is flight.error:
                    raise shared
                raise shared from flight.error
            if flight.value is not None:
                if flight.stale:
                    self._stale_served += 1
                return flight.value
            # The fetching task was cancelled (or its value may not be shared): loop,
            # and the first waiter to get here starts the next fetch.

    async def release(self, lease_id: str) -> None:
        """End a dynamic secret's lease in the inner backend (never cached)."""
        await self.inner.release(lease_id)

    async def rotate(self, ref: SecretRef, value: str) -> str:
        """Rotate in the inner backend, then drop the secret's cache entries; return the
        new version. Raises what the inner backend raises.

        The entries are dropped even when the rotation fails: a write that timed out may
        still have landed, and one extra fetch costs less than serving the old value.
        """
        try:
            return await self.inner.rotate(ref, value)
        finally:
            self.invalidate(ref)

    async def health(self) -> dict[str, object]:
        """The inner backend's health plus ``cache``: counts only, never values.

        ``hits`` + ``misses`` is the number of fetches of cacheable references; a miss
        waited for the inner backend (alone or sharing another caller's fetch);
        ``stale_served`` counts misses answered with an expired value.
        """
        info = dict(await self.inner.health())
        info["cache"] = {
            "entries": len(self._entries),
            "hits": self._hits,
            "misses": self._misses,
            "stale_served": self._stale_served,
        }
        return info

    def counts(self) -> tuple[int, int, int]:
        """(hits, misses, entries) as :meth:`health` counts them, without asking the inner
        backend anything (for metrics, read at scrape time)."""
        return self._hits, self._misses, len(self._entries)

    async def aclose(self) -> None:
        """Drop every cached value and close the inner backend. Idempotent."""
        self._closed = True
        self.invalidate(None)
        await self.inner.aclose()

    # ------------------------------------------------------------------ cache control

    def invalidate(self, ref: SecretRef | None = None) -> int:
        """Drop every entry of the secret ``ref`` names (all its versions, stages and
        keys), or all entries when ``ref`` is None; return how many were dropped.

        Fetches in flight for those entries are detached: their callers still get the
        result, but it is not cached and later callers start a new fetch.
        """
        if ref is None:
            dropped = len(self._entries)
            self._entries.clear()
            self._expiry.clear()
            self._inflight.clear()
            return dropped
        sid = _secret_id(ref)
        keys = [k for k in self._entries if k[0] == sid]
        for k in keys:
            del self._entries[k]
        for k in [k for k in self._inflight if k[0] == sid]:
            del self._inflight[k]
        return len(keys)

    def purge_expired(self) -> int:
        """Drop every entry that can no longer be served — past its TTL and past the
        stale-if-error window after it — and return how many were dropped.

        An entry inside its stale window is kept: an outage may still need it. Cost: the
        number of index items that fell due, not the cache's size.
        """
        now = self._clock()
        dropped = 0
        for key in self._expiry.due(now):
            entry = self._entries.get(key)
            # The key may have been refetched since this item was queued (a newer entry
            # with a later deadline and its own item), or already dropped.
            if entry is not None and now - entry.expires_at >= self.stale_if_error_s:
                # Dropping the reference is all Python allows: the str itself cannot be
                # overwritten, and its memory is freed (not zeroed) once nothing else
                # refers to it. The bound is on how long *the cache* keeps it alive.
                del self._entries[key]
                dropped += 1
        return dropped

    async def run_purger(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run :meth:`purge_expired` every :data:`~sidekey.expiry.PURGE_INTERVAL_S`
        until cancelled (the daemon starts this for each cached backend)."""
        await run_purger(self.purge_expired, interval_s=PURGE_INTERVAL_S,
                         task_status=task_status)

    # ------------------------------------------------------------------ internals

    def _fresh(self, key: _Key) -> _Entry | None:
        """The unexpired entry for ``key`` (marked recently used), or None. An entry past
        its stale-if-error window is dropped here; one inside it is kept for a failure."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now < entry.expires_at:
            self._entries.move_to_end(key)
            return entry
        if now - entry.expires_at >= self.stale_if_error_s:
            del self._entries[key]
        return None

    async def _lead(self, key: _Key, ref: SecretRef, ttl: float, flight: _Flight) -> SecretValue:
        """Do the one inner fetch for ``key`` and publish its outcome to the waiters."""
        try:
            value = await self.inner.fetch(ref)
        except SecretNotFound as exc:
            # The secret (or version) is gone: its expired entry must not be served
            # stale by a later outage either.
            self._entries.pop(key, None)
            flight.error = exc
            raise
        except BackendError as exc:
            stale = self._stale(key, ref, exc)
            if stale is None:
                flight.error = exc
                raise
            flight.value, flight.stale = stale, True
            self._stale_served += 1
            return stale
        except Exception as exc:
            flight.error = exc
            raise
        else:
            if value.lease_id is not None:
                # A static reference that came back with a backend lease: that credential
                # belongs to this one caller. Neither cache nor share it.
                log.warning(
                    "secret %s of backend %s returned a lease for a static reference; "
                    "not caching it",
                    ref.label,
                    self.name,
                )
                return value
            flight.value = value
            # Not cached if invalidate() detached this flight meanwhile (a rotation),
            # or if the cache was closed.
            if not self._closed and self._inflight.get(key) is flight:
                self._store(key, value, self._clock() + ttl)
            return value
        finally:
            # On cancellation nothing is set and every waiter retries.
            if self._inflight.get(key) is flight:
                del self._inflight[key]
            flight.done.set()

    def _stale(self, key: _Key, ref: SecretRef, exc: BackendError) -> SecretValue | None:
        """An expired value still inside the stale-if-error window, or None."""
        if self.stale_if_error_s <= 0:
            return None
        entry = self._entries.get(key)
        if entry is None:
            return None
        age = self._clock() - entry.expires_at
        if not 0 <= age < self.stale_if_error_s:
            return None
        if not entry.stale_warned:
            # Once per entry, not per call: an outage at high request rates would
            # otherwise flood the log. health()["cache"]["stale_served"] keeps counting.
            entry.stale_warned = True
            log.warning(
                "backend %s unavailable (%s); serving secret %s version %s, expired %.1fs ago "
                "(stale_if_error_s=%s)",
                self.name,
                exc.code,
                ref.label,
                entry.value.version,
                age,
                self.stale_if_error_s,
            )
        return entry.value

    def _store(self, key: _Key, value: SecretValue, expires_at: float) -> None:
        self._entries[key] = _Entry(value, expires_at)
        self._entries.move_to_end(key)
        self._expiry.add(expires_at + self.stale_if_error_s, key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        if len(self._expiry) > 2 * self.max_entries:
            # Items of evicted, invalidated or replaced entries (keys only) pile up under
            # churn until their deadline: rebuild from the live entries, O(n) once per
            # max_entries stores.
            self._expiry.rebuild(
                (e.expires_at + self.stale_if_error_s, k) for k, e in self._entries.items()
            )
