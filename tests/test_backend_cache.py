from __future__ import annotations

import itertools
import logging

import pytest
import trio
import trio.testing

from sidekey.backends import Backend, BackendError, SecretNotFound, SecretValue
from sidekey.backends.cache import CachedBackend, cache_key
from sidekey.config import SecretRef
from sidekey.expiry import PURGE_INTERVAL_S

VALUE = "s3cr3t-Value-xyzzy"
NEW_VALUE = "r0tated-Value-plugh"


class FakeBackend:
    """Counts calls; can be slow (``delay``), failing (``fail``) or gated (``gate``)."""

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        # label -> list of values; version n is values[n - 1]
        self.secrets: dict[str, list[str]] = {}
        self.fetches = 0
        self.delay = 0.0
        self.fail: Exception | None = None
        self.gate: trio.Event | None = None
        self.started = trio.Event()
        self.released: list[str] = []
        self.closed = False
        self.leased_static = False
        self._leases = itertools.count(1)

    def put(self, label: str, value: str) -> str:
        self.secrets.setdefault(label, []).append(value)
        return str(len(self.secrets[label]))

    async def fetch(self, ref: SecretRef) -> SecretValue:
        self.fetches += 1
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await trio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        if ref.kind == "dynamic":
            return SecretValue(
                value=f"dyn-{self.fetches}", version="", lease_id=f"lease-{next(self._leases)}",
                lease_ttl_s=60,
            )
        versions = self.secrets.get(ref.label)
        if not versions:
            raise SecretNotFound(f"no secret {ref.label!r}")
        n = ref.version if ref.version is not None else len(versions)
        if n > len(versions):
            raise SecretNotFound(f"no version {n} of {ref.label!r}")
        lease = f"lease-{next(self._leases)}" if self.leased_static else None
        return SecretValue(value=versions[n - 1], version=str(n), lease_id=lease)

    async def release(self, lease_id: str) -> None:
        self.released.append(lease_id)

    async def rotate(self, ref: SecretRef, value: str) -> str:
        if self.fail is not None:
            raise self.fail
        if ref.label not in self.secrets:
            raise SecretNotFound(f"no secret {ref.label!r}")
        return self.put(ref.label, value)

    async def health(self) -> dict[str, object]:
        return {"type": "fake", "ok": True, "secrets": len(self.secrets)}

    async def aclose(self) -> None:
        self.closed = True


def ref(name: str = "db", **kw: object) -> SecretRef:
    return SecretRef(backend="fake", name=name, **kw)  # type: ignore[arg-type]


@pytest.fixture
def inner() -> FakeBackend:
    b = FakeBackend()
    b.put("db", VALUE)
    b.put("other", "other-value")
    return b


def make(inner: FakeBackend, **kw: object) -> CachedBackend:
    kw.setdefault("ttl_s", 60.0)
    return CachedBackend(inner, **kw)  # type: ignore[arg-type]


async def cache_stats(cache: CachedBackend) -> dict[str, int]:
    stats = (await cache.health())["cache"]
    assert isinstance(stats, dict)
    return stats


# ---------------------------------------------------------------------------- basics


def test_implements_backend_protocol(inner: FakeBackend) -> None:
    backend: Backend = make(inner)
    assert backend.name == "fake"


def test_rejects_bad_settings(inner: FakeBackend) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        CachedBackend(inner, ttl_s=-1)
    with pytest.raises(ValueError, match="stale_if_error_s"):
        CachedBackend(inner, ttl_s=1, stale_if_error_s=-1)
    with pytest.raises(ValueError, match="max_entries"):
        CachedBackend(inner, ttl_s=1, max_entries=0)


def test_cache_key_is_value_free_and_selective() -> None:
    base = cache_key(ref())
    assert VALUE not in repr(base)
    assert cache_key(ref(cache_ttl_s=5)) == base  # lifetime does not select a value
    assert cache_key(ref(version=1)) != base
    assert cache_key(SecretRef(backend="other", name="db")) != base
    vault = SecretRef(backend="v", mount="kv", path="app", key="a")
    assert cache_key(vault) != cache_key(SecretRef(backend="v", mount="kv", path="app", key="b"))
    aws = SecretRef(backend="a", secret_id="s", version_stage="AWSCURRENT")
    assert cache_key(aws) != cache_key(SecretRef(backend="a", secret_id="s", version_stage="AWSPREVIOUS"))
    assert cache_key(aws) != cache_key(SecretRef(backend="a", secret_id="s", version_id="v1"))
    assert cache_key(aws) != cache_key(
        SecretRef(backend="a", secret_id="s", version_stage="AWSCURRENT", json_key="k")
    )


async def test_hit_within_ttl_miss_after(inner: FakeBackend, autojump_clock: trio.abc.Clock) -> None:
    cache = make(inner, ttl_s=10)
    first = await cache.fetch(ref())
    assert (first.value, first.version) == (VALUE, "1")
    await trio.sleep(9.5)
    assert (await cache.fetch(ref())).value == VALUE
    assert inner.fetches == 1
    await trio.sleep(1)
    assert (await cache.fetch(ref())).value == VALUE
    assert inner.fetches == 2
    assert await cache_stats(cache) == {"entries": 1, "hits": 1, "misses": 2, "stale_served": 0}


async def test_entries_are_per_selected_value(inner: FakeBackend) -> None:
    inner.put("db", NEW_VALUE)
    cache = make(inner)
    assert (await cache.fetch(ref())).value == NEW_VALUE
    assert (await cache.fetch(ref(version=1))).value == VALUE
    assert (await cache.fetch(ref("other"))).value == "other-value"
    assert inner.fetches == 3
    assert (await cache.fetch(ref(version=1))).value == VALUE
    assert inner.fetches == 3


async def test_per_ref_ttl_overrides_backend_ttl(
    inner: FakeBackend, autojump_clock: trio.abc.Clock
) -> None:
    cache = make(inner, ttl_s=60)
    short, long = ref(cache_ttl_s=5), ref("other", cache_ttl_s=600)
    await cache.fetch(short)
    await cache.fetch(long)
    await trio.sleep(100)
    await cache.fetch(short)
    await cache.fetch(long)
    assert inner.fetches == 3  # short refetched, long still cached


async def test_ttl_zero_disables_caching(inner: FakeBackend) -> None:
    cache = make(inner, ttl_s=60)
    for _ in range(3):
        await cache.fetch(ref(cache_ttl_s=0))
    assert inner.fetches == 3
    off = make(inner, ttl_s=0)
    for _ in range(3):
        await off.fetch(ref())
    assert inner.fetches == 6
    # ...unless a ref asks for a lifetime of its own
    await off.fetch(ref(cache_ttl_s=30))
    await off.fetch(ref(cache_ttl_s=30))
    assert inner.fetches == 7
    assert (await cache_stats(cache))["entries"] == 0


async def test_dynamic_is_never_cached(inner: FakeBackend, autojump_clock: trio.abc.Clock) -> None:
    cache = make(inner, ttl_s=60)
    dyn = SecretRef(backend="fake", mount="database", path="creds/app", kind="dynamic", cache_ttl_s=60)
    a = await cache.fetch(dyn)
    b = await cache.fetch(dyn)
    assert a.lease_id != b.lease_id and a.value != b.value
    inner.delay = 1.0
    got: list[SecretValue] = []

    async def one() -> None:
        got.append(await cache.fetch(dyn))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)
    assert inner.fetches == 12
    assert len({v.lease_id for v in got}) == 10  # each call its own credential
    assert await cache_stats(cache) == {"entries": 0, "hits": 0, "misses": 0, "stale_served": 0}
    await cache.release("lease-1")
    assert inner.released == ["lease-1"]


async def test_leased_value_for_static_ref_is_neither_cached_nor_shared(
    inner: FakeBackend, autojump_clock: trio.abc.Clock
) -> None:
    inner.leased_static = True
    inner.delay = 1.0
    cache = make(inner)
    got: list[SecretValue] = []

    async def one() -> None:
        got.append(await cache.fetch(ref()))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
    assert len({v.lease_id for v in got}) == 5
    assert inner.fetches == 5
    assert (await cache_stats(cache))["entries"] == 0


# ---------------------------------------------------------------------------- single flight


async def test_concurrent_misses_share_one_fetch(
    inner: FakeBackend, autojump_clock: trio.abc.Clock
) -> None:
    inner.delay = 2.0
    cache = make(inner)
    got: list[SecretValue] = []

    async def one() -> None:
        got.append(await cache.fetch(ref()))

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(one)
    assert inner.fetches == 1
    assert len(got) == 100 and all(v.value == VALUE and v.version == "1" for v in got)
    assert await cache_stats(cache) == {"entries": 1, "hits": 0, "misses": 100, "stale_served": 0}
    await cache.fetch(ref())
    assert inner.fetches == 1


async def test_concurrent_misses_share_the_failure_and_it_is_not_cached(
    inner: FakeBackend, autojump_clock: trio.abc.Clock
) -> None:
    inner.delay = 2.0
    inner.fail = BackendError("vault unreachable")
    cache = make(inner)
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await cache.fetch(ref())
        except BackendError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(one)
    assert inner.fetches == 1
    assert len(errors) == 50
    assert all(isinstance(e, BackendError) and e.code == "backend_unavailable" for e in errors)
    assert all(getattr(e, "message", None) == "vault unreachable" for e in errors)
    # each waiter raises its own copy, so tracebacks do not pile up on one object
    assert len({id(e) for e in errors}) == 50
    inner.fail = None
    assert (await cache.fetch(ref())).value == VALUE
    assert inner.fetches == 2


async def test_cancelled_fetcher_hands_over_to_a_waiter(inner: FakeBackend) -> None:
    inner.gate = trio.Event()
    cache = make(inner)
    got: list[SecretValue] = []

    async def leader(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await cache.fetch(ref())
        assert scope.cancelled_caught

    async def waiter() -> None:
        got.append(await cache.fetch(ref()))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            scope = await nursery.start(leader)
            await inner.started.wait()
            for _ in range(5):
                nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert inner.fetches == 1
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert inner.fetches == 2  # exactly one waiter took over
            inner.gate.set()
    assert len(got) == 5 and all(v.value == VALUE for v in got)
    assert (await cache_stats(cache))["misses"] == 6


async def test_cancelled_waiter_does_not_disturb_the_fetch(inner: FakeBackend) -> None:
    inner.gate = trio.Event()
    cache = make(inner)
    got: list[SecretValue] = []

    async def one() -> None:
        got.append(await cache.fetch(ref()))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            await inner.started.wait()
            with trio.move_on_after(0.01):
                await cache.fetch(ref())
            inner.gate.set()
    assert [v.value for v in got] == [VALUE]
    assert inner.fetches == 1


# ---------------------------------------------------------------------------- stale if error


async def test_fail_closed_by_default(inner: FakeBackend, autojump_clock: trio.abc.Clock) -> None:
    cache = make(inner, ttl_s=10)
    await cache.fetch(ref())
    await trio.sleep(11)
    inner.fail = BackendError("down")
    with pytest.raises(BackendError):
        await cache.fetch(ref())


async def test_stale_if_error_serves_within_the_window_only(
    inner: FakeBackend, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    cache = make(inner, ttl_s=10, stale_if_error_s=30)
    await cache.fetch(ref())
    await trio.sleep(15)  # expired 5 s ago
    inner.fail = BackendError("down")
    with caplog.at_level(logging.WARNING, logger="sidekey.backends.cache"):
        stale = await cache.fetch(ref())
        await trio.sleep(10)
        again = await cache.fetch(ref())
    assert (stale.value, stale.version) == (VALUE, "1")
    assert again.value == VALUE
    assert inner.fetches == 3  # every miss still tries the backend first
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per entry, not per call
    assert "db" in warnings[0].getMessage()
    assert VALUE not in caplog.text
    assert (await cache_stats(cache))["stale_served"] == 2
    await trio.sleep(20)  # expired 35 s ago
    with pytest.raises(BackendError):
        await cache.fetch(ref())
    assert (await cache_stats(cache))["entries"] == 0


async def test_stale_value_is_shared_by_concurrent_misses(
    inner: FakeBackend, autojump_clock: trio.abc.Clock
) -> None:
    cache = make(inner, ttl_s=10, stale_if_error_s=30)
    await cache.fetch(ref())
    await trio.sleep(11)
    inner.fail = BackendError("down")
    inner.delay = 1.0
    got: list[SecretValue] = []

    async def one() -> None:
        got.append(await cache.fetch(ref()))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)
    assert inner.fetches == 2
    assert len(got) == 10 and all(v.value == VALUE for v in got)
    assert (await cache_stats(cache))["stale_served"] == 10


async def test_recovery_after_stale_refreshes_the_entry(
    inner: FakeBackend, autojump_clock: trio.abc.Clock
) -> None:
    cache = make(inner, ttl_s=10, stale_if_error_s=30)
    await cache.fetch(ref())
    await trio.sleep(11)
    inner.fail = BackendError("down")
    await cache.fetch(ref())
    inner.fail = None
    inner.put("db", NEW_VALUE)
    assert (await cache.fetch(ref())).value == NEW_VALUE
    assert (await cache.fetch(ref())).value == NEW_VALUE
    assert inner.fetches == 3


async def test_secret_not_found_is_never_masked(
    inner: FakeBackend, autojump_clock: trio.abc.Clock
) -> None:
    cache = make(inner, ttl_s=10, stale_if_error_s=300)
    await cache.fetch(ref())
    await trio.sleep(11)
    inner.fail = SecretNotFound("deleted")
    with pytest.raises(SecretNotFound):
        await cache.fetch(ref())
    # and the deleted secret's old value is not served by a later outage either
    inner.fail = BackendError("down")
    with pytest.raises(BackendError):
        await cache.fetch(ref())
    assert (await cache_stats(cache))["stale_served"] == 0


async def test_other_errors_are_shared_not_masked(
    inner: FakeBackend, autojump_clock: trio.abc.Clock
) -> None:
    cache = make(inner, ttl_s=10, stale_if_error_s=300)
    await cache.fetch(ref())
    await trio.sleep(11)
    inner.fail = RuntimeError("bug in backend")
    with pytest.raises(RuntimeError):
        await cache.fetch(ref())


# ---------------------------------------------------------------------------- bound, invalidation


async def test_lru_eviction(inner: FakeBackend) -> None:
    for name in "abc":
        inner.put(name, f"value-{name}")
    cache = make(inner, max_entries=2)
    await cache.fetch(ref("a"))
    await cache.fetch(ref("b"))
    await cache.fetch(ref("a"))  # b is now the least recently used
    await cache.fetch(ref("c"))
    assert (await cache_stats(cache))["entries"] == 2
    assert inner.fetches == 3
    await cache.fetch(ref("a"))
    await cache.fetch(ref("c"))
    assert inner.fetches == 3
    await cache.fetch(ref("b"))  # evicted
    assert inner.fetches == 4


async def test_rotate_invalidates(inner: FakeBackend) -> None:
    cache = make(inner)
    assert (await cache.fetch(ref())).version == "1"
    assert (await cache.fetch(ref(version=1))).version == "1"
    assert (await cache.fetch(ref("other"))).version == "1"
    assert await cache.rotate(ref(), NEW_VALUE) == "2"
    assert (await cache_stats(cache))["entries"] == 1  # only "other" is left
    fresh = await cache.fetch(ref())
    assert (fresh.value, fresh.version) == (NEW_VALUE, "2")
    assert inner.fetches == 4
    await cache.fetch(ref("other"))
    assert inner.fetches == 4


async def test_failed_rotate_still_invalidates(inner: FakeBackend) -> None:
    cache = make(inner)
    await cache.fetch(ref())
    inner.fail = BackendError("timed out")
    with pytest.raises(BackendError):
        await cache.rotate(ref(), NEW_VALUE)
    inner.fail = None
    await cache.fetch(ref())
    assert inner.fetches == 2


async def test_invalidate_drops_every_version_and_key_of_the_secret() -> None:
    inner = FakeBackend("v")
    cache = CachedBackend(inner, ttl_s=60)
    for label in ("kv/app#a", "kv/app#b", "kv/other#a"):
        inner.put(label, "x")
    app_a = SecretRef(backend="v", mount="kv", path="app", key="a")
    app_b = SecretRef(backend="v", mount="kv", path="app", key="b")
    other = SecretRef(backend="v", mount="kv", path="other", key="a")
    for r in (app_a, app_b, other):
        await cache.fetch(r)
    assert cache.invalidate(app_a) == 2
    assert cache.invalidate(app_a) == 0
    assert (await cache_stats(cache))["entries"] == 1
    assert cache.invalidate(None) == 1
    assert (await cache_stats(cache))["entries"] == 0


async def test_fetch_in_flight_during_rotation_is_not_cached(inner: FakeBackend) -> None:
    inner.gate = trio.Event()
    cache = make(inner)
    got: list[SecretValue] = []

    async def one() -> None:
        got.append(await cache.fetch(ref()))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            await inner.started.wait()
            # the rotation lands while the old value is on its way back
            inner.put("db", NEW_VALUE)
            cache.invalidate(ref())
            nursery.start_soon(one)  # arrives after the rotation: must not join the old fetch
            await trio.testing.wait_all_tasks_blocked()
            assert inner.fetches == 2
            inner.gate.set()
    assert sorted(v.version for v in got) == ["2", "2"]
    # nothing stale was left behind by the first fetch
    inner.gate = None
    assert (await cache.fetch(ref())).version == "2"


# ---------------------------------------------------------------------------- health, repr, close


async def test_health_counts_and_no_values(inner: FakeBackend) -> None:
    cache = make(inner)
    await cache.fetch(ref())
    await cache.fetch(ref())
    await cache.fetch(ref("other"))
    health = await cache.health()
    assert health["type"] == "fake" and health["ok"] is True
    assert health["cache"] == {"entries": 2, "hits": 1, "misses": 2, "stale_served": 0}
    for text in (repr(health), repr(cache), str(cache), repr(cache._entries), repr(cache._inflight)):
        assert VALUE not in text and "other-value" not in text


async def test_repr_during_a_fetch_shows_no_value(inner: FakeBackend) -> None:
    cache = make(inner)
    await cache.fetch(ref("other"))
    inner.gate, inner.started = trio.Event(), trio.Event()
    got: list[SecretValue] = []

    async def one() -> None:
        got.append(await cache.fetch(ref()))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
            await inner.started.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert "other-value" not in repr(cache._inflight) + repr(cache._entries) + repr(cache)
            inner.gate.set()
    assert [v.value for v in got] == [VALUE] * 3
    assert VALUE not in repr(cache._inflight) + repr(cache._entries) + repr(cache)


async def test_aclose_clears_and_closes_inner(inner: FakeBackend) -> None:
    cache = make(inner)
    await cache.fetch(ref())
    await cache.aclose()
    await cache.aclose()
    assert inner.closed
    assert (await cache_stats(cache))["entries"] == 0
    with pytest.raises(BackendError, match="closed"):
        await cache.fetch(ref())


# ---------------------------------------------------------------------------- timed purge


def held_values(cache: CachedBackend) -> list[str]:
    """The secret values the cache's table still references."""
    return [e.value.value for e in cache._entries.values()]


async def test_expired_entry_is_purged_without_any_lookup(
    inner: FakeBackend, autojump_clock: trio.abc.Clock
) -> None:
    """A value nobody asks for again leaves memory within ttl + stale + one interval
    (before: it stayed until the same key was looked up, or evicted)."""
    cache = make(inner, ttl_s=10, stale_if_error_s=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run_purger)
        await cache.fetch(ref())
        await cache.fetch(ref("other", cache_ttl_s=100))
        fetched_at = trio.current_time()
        assert sorted(held_values(cache)) == sorted([VALUE, "other-value"])
        await trio.sleep(10 + 5 + PURGE_INTERVAL_S)
        assert held_values(cache) == ["other-value"]  # its own TTL is longer
        await trio.sleep(100 + 5 + PURGE_INTERVAL_S - (trio.current_time() - fetched_at))
        assert cache._entries == {}
        nursery.cancel_scope.cancel()
    assert inner.fetches == 2  # nothing was looked up after the first fetches


async def test_entry_inside_its_stale_window_survives_the_purge(
    inner: FakeBackend, autojump_clock: trio.abc.Clock
) -> None:
    cache = make(inner, ttl_s=10, stale_if_error_s=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run_purger)
        await cache.fetch(ref())
        await trio.sleep(10 + 30 - 1)  # expired, still servable on error for 1 s
        assert held_values(cache) == [VALUE]
        inner.fail = BackendError("down")
        stale = await cache.fetch(ref())
        assert stale.value == VALUE
        await trio.sleep(1 + PURGE_INTERVAL_S)  # the stale window is over
        assert held_values(cache) == []
        with pytest.raises(BackendError):
            await cache.fetch(ref())
        nursery.cancel_scope.cancel()


async def test_purge_exactly_at_the_deadlines(inner: FakeBackend, autojump_clock: trio.abc.Clock) -> None:
    """purge_expired() keeps a value while fetch() could still return it and drops it at
    the instant fetch() would not (fresh until ttl, stale-servable until ttl + stale)."""
    cache = make(inner, ttl_s=10, stale_if_error_s=5)
    await cache.fetch(ref())
    await trio.sleep(10 + 5 - 0.001)
    assert cache.purge_expired() == 0
    assert held_values(cache) == [VALUE]
    await trio.sleep(0.001)
    assert cache.purge_expired() == 1
    assert held_values(cache) == []
    # Without a stale window the value goes at its TTL.
    cache = make(inner, ttl_s=10)
    await cache.fetch(ref())
    await trio.sleep(9.999)
    assert cache.purge_expired() == 0
    await trio.sleep(0.001)
    assert cache.purge_expired() == 1


async def test_purge_spares_a_refetched_entry_and_keeps_behaviour(
    inner: FakeBackend, autojump_clock: trio.abc.Clock
) -> None:
    """The index item of a replaced entry must not drop its successor; rotation and
    single flight are unchanged by purging."""
    cache = make(inner, ttl_s=10)
    await cache.fetch(ref())
    await trio.sleep(10)  # expired: the next fetch stores a new entry (deadline 20 s on)
    inner.put("db", NEW_VALUE)
    assert (await cache.fetch(ref())).value == NEW_VALUE
    assert cache.purge_expired() == 0  # the first entry's item fell due; its key is fresh
    assert held_values(cache) == [NEW_VALUE]
    await cache.rotate(ref(), "third")
    assert held_values(cache) == []
    assert cache.purge_expired() == 0
    # Concurrent misses still share one fetch.
    before = inner.fetches
    inner.delay = 1.0
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(cache.fetch, ref())
    assert inner.fetches == before + 1
    assert held_values(cache) == ["third"]


async def test_expiry_index_is_bounded_under_churn(inner: FakeBackend) -> None:
    """Evicted and invalidated entries leave key-only index items; the index is rebuilt
    from the live entries before it exceeds twice the cache's bound."""
    cache = make(inner, max_entries=4)
    for i in range(50):
        inner.put(f"s{i}", f"v{i}")
        await cache.fetch(ref(f"s{i}"))
        assert len(cache._expiry) <= 2 * cache.max_entries
    for _ in range(20):
        await cache.rotate(ref("s49"), "again")
        await cache.fetch(ref("s49"))
        assert len(cache._expiry) <= 2 * cache.max_entries
    assert len(cache._entries) == 4
    assert VALUE not in repr(cache._expiry._heap)
