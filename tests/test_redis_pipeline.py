"""The Redis store's request path: one I/O thread per store sends what is queued as one
pipeline (issue 13 direction 7), and release reads, checks and ends a lease in one
script. On a real ``redis-server`` (tests/redis_server.py).

What must hold however operations are grouped: a jti burned by 50 concurrent callers has
exactly one winner; concurrent counter increments are exact; an operation that fails in
Redis (a Lua error) fails alone, not its batch; a Redis killed with a batch in flight
answers every waiter with StateUnavailable (none hangs, none is told it succeeded), and
the store works again once Redis is back; scripts flushed by a restart are loaded again;
what is queued when the store closes is still sent. And a daemon on Redis state still
refuses a release by anyone but the lease's holder (or an admin).
"""

from __future__ import annotations

import json
import os
import select
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
import trio

from harness import Daemon, run_as
from redis_server import RedisServer
from sidekey.leases import LeaseManager
from sidekey.protocol import Conflict, Denied, NotFound
from sidekey.store import CounterOp, LeaseRecord, StateStore, StateUnavailable
from sidekey.store.redis import RedisStore
from sidekey.store.sqlite import SqliteStore

IO_LIMIT_S = 60.0  # every test's own bound
TIMEOUT_S = 10.0  # the store's per-operation bound: generous on a loaded machine
NOBODY = 65534


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def store(server: RedisServer) -> AsyncIterator[RedisStore]:
    s = RedisStore.open(server.url, prefix=f"pipe:{uuid.uuid4().hex}:", timeout_s=TIMEOUT_S)
    try:
        yield s
    finally:
        await s.aclose()


def lease(lease_id: str, *, uid: int = 1001, pid: int = 4242) -> LeaseRecord:
    now = time.time()
    return LeaseRecord(
        lease_id=lease_id, jti=f"jti-{lease_id}", server="content-api", tool="create_article",
        user_id="usr_1", agent_id=None, session_id=None, secrets=("KEY",), created_at=now,
        expires_at=now + 600, state="active", ended_at=None, peer_pid=pid, peer_uid=uid,
    )


class Gate:
    """Holds the store's I/O thread inside one operation (its command is added to a
    pipeline only once the gate opens), so that whatever the test queues meanwhile is
    sent together, as the next batch: a deterministic batch without timing."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def add(self, pipe: Any) -> Any:
        self.entered.set()
        self.opened.wait(IO_LIMIT_S)
        return pipe.ping()

    async def hold(self, store: RedisStore, nursery: trio.Nursery) -> None:
        nursery.start_soon(store._pipelined, "gate", self.add)
        while not self.entered.is_set():
            await trio.sleep(0.001)


async def test_the_queue_to_a_stuck_redis_is_bounded(store: RedisStore,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """While the I/O thread is held (a Redis that does not answer), at most
    MAX_QUEUED_OPS operations wait; the next one fails closed at once."""
    import sidekey.store.redis as redis_store

    monkeypatch.setattr(redis_store, "MAX_QUEUED_OPS", 5)
    far = time.time() + 600
    with trio.fail_after(IO_LIMIT_S):
        gate = Gate()
        async with trio.open_nursery() as nursery:
            await gate.hold(store, nursery)
            queued: list[bool] = []

            async def burn(i: int) -> None:
                queued.append(await store.burn_jti(f"jti-q{i}", far))

            for i in range(5):
                nursery.start_soon(burn, i)
            await trio.sleep(0.05)  # five queued behind the gate
            with pytest.raises(StateUnavailable, match="queue is full"):
                await store.burn_jti("jti-q-over", far)
            gate.opened.set()
        assert queued == [True] * 5  # the queued ones still ran
        assert await store.burn_jti("jti-q-over", far) is True  # never sent while refused


async def outcomes(fns: list[Callable[[], Any]]) -> list[Any]:
    """Run every ``fn()`` concurrently; each one's result or exception, in order."""
    out: list[Any] = [None] * len(fns)

    async def one(i: int) -> None:
        try:
            out[i] = await fns[i]()
        except Exception as exc:
            out[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(len(fns)):
            nursery.start_soon(one, i)
    return out


async def test_fifty_concurrent_burns_of_one_jti_have_exactly_one_winner(store: RedisStore) -> None:
    with trio.fail_after(IO_LIMIT_S):
        far = time.time() + 600
        got = await outcomes([lambda: store.burn_jti("jti-x", far)] * 50)
        assert got.count(True) == 1 and got.count(False) == 49, got
        # ... also when they are all one pipeline.
        gate = Gate()
        async with trio.open_nursery() as nursery:
            await gate.hold(store, nursery)
            before = store.batches
            burns = nursery.start_soon
            results: list[bool] = []

            async def burn() -> None:
                results.append(await store.burn_jti("jti-y", far))

            for _ in range(50):
                burns(burn)
            await trio.sleep(0.05)  # all 50 queued behind the gate
            gate.opened.set()
        assert results.count(True) == 1 and results.count(False) == 49, results
        assert store.batches - before == 2  # the gate's batch, then all 50 in one


async def test_concurrent_counter_increments_are_exact(store: RedisStore) -> None:
    with trio.fail_after(IO_LIMIT_S):
        exp = time.time() + 600
        incr: list[Callable[[], Any]] = [
            lambda: store.counter_incr("n", expires_at=exp) for _ in range(40)
        ]
        batch: list[Callable[[], Any]] = [
            lambda: store.quota_apply([CounterOp("n", exp)], now=time.time()) for _ in range(40)
        ]
        got = await outcomes(incr + batch)
        values = [v if isinstance(v, int) else v[0] for v in got]
        assert sorted(values) == list(range(1, 81)), got
        assert await store.counter_incr("n", expires_at=exp) == 81


async def test_a_failing_operation_does_not_fail_its_neighbours(
    store: RedisStore, server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A Lua error (the counter script's INCRBY on a key of the wrong type) fails only
    the operation that ran it, though it shares a pipeline with others."""
    with redis_py.Redis.from_url(server.url) as raw:
        raw.hset(f"{store.prefix}ctr:broken", "x", "1")
    with trio.fail_after(IO_LIMIT_S):
        exp = time.time() + 600
        await store.put_lease(lease("lse_n"))
        gate = Gate()
        got: list[Any] = []
        async with trio.open_nursery() as nursery:
            await gate.hold(store, nursery)
            before = store.batches

            async def queued() -> None:
                got.extend(await outcomes([
                    lambda: store.burn_jti("j1", exp),
                    lambda: store.counter_incr("broken", expires_at=exp),
                    lambda: store.counter_incr("fine", expires_at=exp),
                    lambda: store.get_lease("lse_n"),
                    lambda: store.burn_jti("j2", exp),
                ]))

            nursery.start_soon(queued)
            await trio.sleep(0.05)
            gate.opened.set()
        assert store.batches - before == 2, "the five operations were not one pipeline"
        assert isinstance(got[1], StateUnavailable), got
        assert got[0] is True and got[2] == 1 and got[4] is True, got
        assert isinstance(got[3], LeaseRecord) and got[3].lease_id == "lse_n", got
        assert "WRONGTYPE" in caplog.text  # its own error, logged (the others then succeeded)
        assert await store.burn_jti("j3", exp) is True
        assert store.health()["ok"] is True


async def test_redis_killed_mid_batch_fails_every_waiter_and_the_store_recovers(
    tmp_path: Path,
) -> None:
    """A batch in flight (Redis stopped: sent, no answer yet) and more queued behind it;
    then Redis is killed. Every waiter gets StateUnavailable from the dead connection
    (well before the store's timeout): none hangs, none is told it succeeded. After a
    restart the same store answers again."""
    srv = RedisServer(tmp_path / "redis").start()
    store = RedisStore.open(srv.url, prefix="kill:", timeout_s=TIMEOUT_S)
    try:
        with trio.fail_after(IO_LIMIT_S):
            exp = time.time() + 600
            assert await store.burn_jti("before", exp) is True
            assert srv.proc is not None
            os.kill(srv.proc.pid, signal.SIGSTOP)
            got: list[Any] = []

            async def waiters() -> None:
                fns: list[Callable[[], Any]] = []
                for i in range(30):
                    fns.append(lambda i=i: store.burn_jti(f"j{i}", exp))
                    fns.append(lambda: store.counter_incr("c", expires_at=exp))
                    fns.append(lambda i=i: store.get_lease(f"lse_{i}"))
                got.extend(await outcomes(fns))

            started = time.monotonic()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiters)
                await trio.sleep(0.3)  # the first batch is on the wire, the rest queued
                srv.kill()
            assert len(got) == 90
            assert all(isinstance(g, StateUnavailable) for g in got), [
                g for g in got if not isinstance(g, StateUnavailable)]
            assert time.monotonic() - started < TIMEOUT_S  # the dead socket, not the timeout
            assert store.health()["ok"] is False
            srv.start()
            assert await store.burn_jti("j0", exp) is True  # nothing ran on the dead Redis
            assert await store.counter_incr("c", expires_at=exp) == 1
            assert store.health()["ok"] is True
    finally:
        await store.aclose()
        srv.stop()


async def test_scripts_flushed_by_a_restart_are_loaded_again(
    store: RedisStore, server: RedisServer
) -> None:
    with trio.fail_after(IO_LIMIT_S):
        exp = time.time() + 600
        assert await store.counter_incr("s", expires_at=exp) == 1
        with redis_py.Redis.from_url(server.url) as raw:
            raw.script_flush()
        got = await outcomes([lambda: store.counter_incr("s", expires_at=exp)] * 20
                             + [lambda: store.put_lease(lease("lse_f"))])
        assert sorted(got[:20]) == list(range(2, 22)) and got[20] is None, got
        assert store.health()["ok"] is True


async def test_what_is_queued_when_the_store_closes_is_still_sent(store: RedisStore) -> None:
    with trio.fail_after(IO_LIMIT_S):
        exp = time.time() + 600
        gate = Gate()
        results: list[Any] = []
        async with trio.open_nursery() as nursery:
            await gate.hold(store, nursery)

            async def queued() -> None:
                results.extend(await outcomes(
                    [lambda i=i: store.burn_jti(f"q{i}", exp) for i in range(20)]))

            nursery.start_soon(queued)
            await trio.sleep(0.05)
            nursery.start_soon(store.aclose)
            await trio.sleep(0.05)
            gate.opened.set()
        assert results == [True] * 20
        with pytest.raises(StateUnavailable):
            await store.burn_jti("after", exp)


# ------------------------------------------------------------- release in one step


@pytest.fixture(params=["sqlite", "redis"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    s: StateStore
    if request.param == "sqlite":
        s = SqliteStore.open(tmp_path / "state")
    else:
        srv: RedisServer = request.getfixturevalue("server")
        s = RedisStore.open(srv.url, prefix=f"end:{uuid.uuid4().hex}:", timeout_s=TIMEOUT_S)
    try:
        yield s
    finally:
        await s.aclose()


async def _nothing(rec: LeaseRecord) -> None:
    pass


async def test_end_held_checks_the_holder_before_the_state(any_store: StateStore) -> None:
    """Both stores: unknown -> 404; another process -> 403 and the lease stays active;
    the holder (or anyone, for an admin) ends it once; 50 concurrent ends, one winner;
    an ended lease is unaudited until marked."""
    leases = LeaseManager(any_store, on_expired=_nothing, clock=time.time)
    with trio.fail_after(IO_LIMIT_S):
        with pytest.raises(NotFound):
            await leases.end_held("lse_none", "released", holder=(1001, 4242))
        await leases.create(lease("lse_a"))
        with pytest.raises(Denied) as denied:
            await leases.end_held("lse_a", "released", holder=(1001, 4243))
        assert denied.value.code == "peer_mismatch"
        with pytest.raises(Denied):
            await leases.end_held("lse_a", "released", holder=(1002, 4242))
        rec = await any_store.get_lease("lse_a")
        assert rec is not None and rec.state == "active"
        was, now = await leases.end_held("lse_a", "released", holder=(1001, 4242))
        assert was.state == "active" and now.state == "released" and now.ended_at is not None
        assert was.peer_uid == 1001 and was.jti == "jti-lse_a"
        stored = await any_store.get_lease("lse_a")
        assert stored is not None and stored.state == "released"
        assert [r.lease_id for r in await any_store.leases_unaudited()] == ["lse_a"]
        with pytest.raises(Conflict) as again:
            await leases.end_held("lse_a", "released", holder=(1001, 4242))
        assert again.value.code == "lease_released"
        with pytest.raises(Denied):  # the holder check comes first, whatever the state
            await leases.end_held("lse_a", "released", holder=(1001, 1))
        await leases.create(lease("lse_b"))
        got = await outcomes(
            [lambda: leases.end_held("lse_b", "released", holder=None)] * 50)
        assert sum(1 for g in got if isinstance(g, tuple)) == 1, got
        assert all(isinstance(g, Conflict) for g in got if not isinstance(g, tuple)), got


# ------------------------------------------------------------- a daemon on Redis


def _lease_as_nobody(d: Daemon) -> dict[str, Any]:
    status, auth = d.authorize("content-api", "create_article")
    assert status == 200, auth
    status, lease = d.request("POST", "/v1/redeem", {"resolution_token": auth["resolution_token"]})
    assert status == 200, lease
    return {"lease_id": lease["lease_id"]}


def _forked(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a forked child of this process (same uid): its JSON result, bounded."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.write(w, json.dumps(fn()).encode())
        except BaseException as exc:
            os.write(w, json.dumps({"child_error": repr(exc)}).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    deadline = time.monotonic() + IO_LIMIT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([r], [], [], deadline - time.monotonic())
        if not ready:
            break
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    if not data:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return json.loads(data or b'{"child_error": "no answer"}')


def _release(lease_id: str) -> Callable[[Daemon], Any]:
    def go(d: Daemon) -> Any:
        return list(d.request("POST", "/v1/release", {"lease_id": lease_id, "status": "success"}))
    return go


def test_a_daemon_on_redis_releases_only_for_the_holder(make_daemon: Any, tmp_path: Path) -> None:
    """Real daemon, Redis state, processes of uid nobody attested as content-api: another
    process (same uid) may not release the lease (403 peer_mismatch, it stays active);
    the holder may, once (then 409 lease_released); an unknown lease is 404."""
    srv = RedisServer(tmp_path / "redis").start()
    try:
        d: Daemon = make_daemon({
            "state": {"backend": "redis", "redis_url": srv.url, "redis_key_prefix": "dr:"},
            "peers": {"content-api": [{"uid": "self"}, {"uid": NOBODY}]},
        }).start()
        def holder(dd: Daemon) -> Any:
            got = _lease_as_nobody(dd)
            # The holder keeps its lease while a sibling tries: fork the sibling from here.
            sibling = _forked(lambda: _release(got["lease_id"])(dd))
            mine = _release(got["lease_id"])(dd)
            twice = _release(got["lease_id"])(dd)
            return {"sibling": sibling, "mine": mine, "twice": twice, "lease_id": got["lease_id"]}

        out = run_as(d, NOBODY, NOBODY, holder)
        assert "child_error" not in out, out
        status, body = out["sibling"]
        assert status == 403 and body["error"]["code"] == "peer_mismatch", body
        status, body = out["mine"]
        assert status == 200 and body["state"] == "released", body
        status, body = out["twice"]
        assert status == 409 and body["error"]["code"] == "lease_released", body
        status, body = d.request("POST", "/v1/release", {"lease_id": "lse_" + "0" * 32,
                                                         "status": "success"})
        assert status == 404 and body["error"]["code"] == "lease_not_found", body
        calls = d.events_of("mcp.tool_call")
        assert [e["lease_id"] for e in calls] == [out["lease_id"]], calls
    finally:
        srv.stop()
