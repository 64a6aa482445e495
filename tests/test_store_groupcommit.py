"""Group commit in the SQLite store (issue 13, directions 1 and 2).

Under concurrency the store's operations are queued for one writer, which runs a batch
of them in one transaction in a worker thread (a SAVEPOINT per writing operation), then
COMMITs and wakes each caller with its own result or exception. These tests hold the
writer with a slow operation where they need a batch of a known shape; the store runs in
``commit_mode="never"`` (every operation through the writer) unless said otherwise.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from harness import Daemon
from sidekey.store import CounterOp, LeaseRecord, RateOp, StateUnavailable
from sidekey.store.sqlite import SqliteStore

KB, MB = 1024, 1024 * 1024
TASKS = 50


def _lease(lease_id: str, *, now: float = 1000.0) -> LeaseRecord:
    return LeaseRecord(
        lease_id=lease_id, jti=f"jti-{lease_id}", server="content-api", tool="create_article",
        user_id="alice", agent_id="content-writer", session_id="s1", secrets=("K",),
        created_at=now, expires_at=now + 120, state="active", ended_at=None,
        peer_pid=1, peer_uid=0,
    )


async def _hold_writer(store: SqliteStore, nursery: trio.Nursery) -> threading.Event:
    """Start an operation that holds the writer's thread until the returned event is set
    (or 30 s pass); return once the thread runs it. What is queued meanwhile forms one
    batch, in the order queued."""
    release = threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        release.wait(30)

    nursery.start_soon(store._run, "hold", hold)
    while not store._busy:
        await trio.sleep(0.001)
    return release


# ---------------------------------------------------------------------- exactness


@pytest.mark.parametrize("mode", ["never", "auto"])
async def test_fifty_burns_of_one_jti_exactly_one_wins(tmp_path: Path, mode: Any) -> None:
    store = SqliteStore.open(tmp_path / "state", commit_mode=mode)
    wins: list[bool] = []

    async def burn() -> None:
        wins.append(await store.burn_jti("the-jti", 9e9))

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(TASKS):
                    nursery.start_soon(burn)
        assert sorted(wins) == [False] * (TASKS - 1) + [True]
        if mode == "never":
            assert store.health()["largest_batch"] > 1  # they did share transactions
    finally:
        await store.aclose()


@pytest.mark.parametrize("mode", ["never", "auto"])
async def test_fifty_quota_increments_count_exactly(tmp_path: Path, mode: Any) -> None:
    """50 tasks each apply [rate 10/h, monthly counter]: the counter answers 1..50 (no
    lost or doubled increment), and exactly 10 pass the rate limit (a refused rate check
    stops the batch before the counter, as one transaction)."""
    store = SqliteStore.open(tmp_path / "state", clock=lambda: 1000.0, commit_mode=mode)
    counts: list[int] = []
    allowed: list[bool] = []

    async def incr() -> None:
        counts.append(await store.counter_incr("dept", expires_at=9e9))
        answers = await store.quota_apply(
            [RateOp("user", 10, 3600.0), CounterOp("month", 9e9)], now=1000.0)
        allowed.append(len(answers) == 2)

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(TASKS):
                    nursery.start_soon(incr)
        assert sorted(counts) == list(range(1, TASKS + 1))
        assert allowed.count(True) == 10
        assert await store.counter_incr("month", expires_at=9e9) == 11
    finally:
        await store.aclose()


async def test_a_failing_operation_does_not_fail_its_neighbours(tmp_path: Path) -> None:
    """One batch: 20 burns, a duplicate lease (a constraint), an operation that writes a
    row and then raises, and a lease. The failing two report their own errors; the rest
    commit; the raising one's row is rolled back (its own SAVEPOINT), nobody else's."""
    store = SqliteStore.open(tmp_path / "state", commit_mode="never")
    await store.put_lease(_lease("dup"))
    results: dict[str, Any] = {}

    async def record(name: str, fn: Any, *args: Any) -> None:
        try:
            results[name] = await fn(*args)
        except Exception as exc:  # the outcome under test
            results[name] = exc

    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO burned_jti (jti, expires_at) VALUES ('partial', 9e9)")
        raise ValueError("refused after a write")

    async def partial() -> None:
        await store._run("partial", half_then_fail, txn=True)

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                release = await _hold_writer(store, nursery)
                for i in range(10):
                    nursery.start_soon(record, f"burn-{i}", store.burn_jti, f"j{i}", 9e9)
                nursery.start_soon(record, "dup", store.put_lease, _lease("dup"))
                nursery.start_soon(record, "partial", partial)
                for i in range(10, 20):
                    nursery.start_soon(record, f"burn-{i}", store.burn_jti, f"j{i}", 9e9)
                nursery.start_soon(record, "lease", store.put_lease, _lease("new"))
                await trio.testing.wait_all_tasks_blocked()
                assert len(store._queue) == 23  # all queued behind the held one: one batch
                release.set()
        assert store.health()["largest_batch"] == 23
        assert isinstance(results.pop("dup"), StateUnavailable)
        assert isinstance(results.pop("partial"), ValueError)
        assert results == {**{f"burn-{i}": True for i in range(20)}, "lease": None}
        assert await store.burn_jti("partial", 9e9) is True  # its row was rolled back
        assert all([await store.burn_jti(f"j{i}", 9e9) is False for i in range(20)])
        assert (await store.get_lease("new")) is not None
        assert (await store.get_lease("dup")) == _lease("dup")
        # Reported (logged) as that operation's failure; the batch's later successes
        # show the store itself works.
        assert store.health()["ok"] is True
    finally:
        await store.aclose()


async def test_an_error_that_rolls_back_the_whole_transaction_fails_the_ops_before_it(
    tmp_path: Path,
) -> None:
    """Some SQLite errors (I/O error, disk full) roll back the whole transaction, not just
    the statement: the burns before it in the batch are then gone, and their callers must
    hear so (a burn reported but not committed is a replay after restart); the burns after
    it run in a new transaction and commit."""
    store = SqliteStore.open(tmp_path / "state", commit_mode="never")
    results: dict[str, Any] = {}

    async def record(name: str, fn: Any, *args: Any) -> None:
        try:
            results[name] = await fn(*args)
        except Exception as exc:  # the outcome under test
            results[name] = exc

    def io_error(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")  # what SQLite does on SQLITE_IOERR / SQLITE_FULL
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                release = await _hold_writer(store, nursery)
                # Queued one at a time, in this order (trio starts tasks in any order).
                for i in range(5):
                    nursery.start_soon(record, f"j{i}", store.burn_jti, f"j{i}", 9e9)
                    await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(record, "io", store._run, "io", io_error)
                await trio.testing.wait_all_tasks_blocked()
                for i in range(5, 10):
                    nursery.start_soon(record, f"j{i}", store.burn_jti, f"j{i}", 9e9)
                    await trio.testing.wait_all_tasks_blocked()
                assert [op.what for op in store._queue] == ["burn_jti"] * 5 + ["io"] + ["burn_jti"] * 5
                release.set()
        assert all(isinstance(results[f"j{i}"], StateUnavailable) for i in range(5)), results
        assert isinstance(results["io"], StateUnavailable)
        assert [results[f"j{i}"] for i in range(5, 10)] == [True] * 5
        assert [await store.burn_jti(f"j{i}", 9e9) for i in range(10)] == [True] * 5 + [False] * 5
    finally:
        await store.aclose()


async def test_a_read_after_an_awaited_write_sees_it(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "state", commit_mode="never")

    async def write_then_read(i: int) -> None:
        await store.put_lease(_lease(f"l{i}"))
        assert (await store.get_lease(f"l{i}")) is not None
        assert await store.transition_lease(f"l{i}", "active", "released", at=2000.0)
        rec = await store.get_lease(f"l{i}")
        assert rec is not None and rec.state == "released"

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(TASKS):
                    nursery.start_soon(write_then_read, i)
        assert store.health()["ops_batched"] >= 4 * TASKS
    finally:
        await store.aclose()


async def test_a_caller_cancelled_in_the_queue_leaves_its_operation_unrun(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "state", commit_mode="never")
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                release = await _hold_writer(store, nursery)
                with trio.move_on_after(0.05) as scope:
                    await store.burn_jti("cancelled", 9e9)
                assert scope.cancelled_caught
                release.set()
        assert await store.burn_jti("cancelled", 9e9) is True  # it never ran
    finally:
        await store.aclose()


async def test_aclose_runs_every_queued_operation(tmp_path: Path) -> None:
    """Operations queued behind a running batch when the store closes are all run and
    their callers answered; operations after the close are refused."""
    state = tmp_path / "state"
    store = SqliteStore.open(state, commit_mode="never")
    answers: list[bool] = []

    async def burn(i: int) -> None:
        answers.append(await store.burn_jti(f"q{i}", 9e9))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            release = await _hold_writer(store, nursery)
            for i in range(20):
                nursery.start_soon(burn, i)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(store.aclose)
            await trio.testing.wait_all_tasks_blocked()
            assert len(store._queue) == 20  # aclose waits for them
            release.set()
    assert answers == [True] * 20
    with pytest.raises(StateUnavailable, match="closed"):
        await store.burn_jti("late", 9e9)
    db = sqlite3.connect(state / "state.db")
    try:
        assert db.execute("SELECT COUNT(*) FROM burned_jti").fetchone()[0] == 20
    finally:
        db.close()


async def test_wal_stays_bounded_under_concurrent_load(tmp_path: Path) -> None:
    """32 tasks x 240 lease lifecycles (burn, put, get, transition, mark) through the
    writer while maintenance polls the WAL every 10 ms: without truncation the WAL
    reaches ~70 MB; with it, it stays within the limit plus what the load writes between
    a poll and the gate (bounded here generously, for a loaded machine, at 16 MB)."""
    limit = 512 * KB
    store = SqliteStore.open(tmp_path / "state", commit_mode="never", wal_limit_bytes=limit)
    largest = 0

    async def worker(w: int) -> None:
        nonlocal largest
        for i in range(240):
            lid = f"l{w}-{i}"
            assert await store.burn_jti(f"j{w}-{i}", 9e9)
            await store.put_lease(_lease(lid))
            assert await store.get_lease(lid) is not None
            assert await store.transition_lease(lid, "active", "released", at=2000.0)
            await store.mark_lease_audited(lid)
            largest = max(largest, store.wal_bytes())

    try:
        with trio.fail_after(240):
            async with trio.open_nursery() as nursery:
                await nursery.start(lambda task_status: store.run_maintenance(
                    interval=3600, wal_poll=0.01, task_status=task_status))
                async with trio.open_nursery() as workers:
                    for w in range(32):
                        workers.start_soon(worker, w)
                nursery.cancel_scope.cancel()
        health = store.health()
        assert health["wal_truncations"] >= 3, health
        assert largest < 16 * MB, f"WAL reached {largest / MB:.1f} MB"
        assert health["largest_batch"] > 1
    finally:
        await store.aclose()


# ---------------------------------------------------------------------- kill -9 under load


def _post(path: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nhost: sidekey\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n").encode() + data


async def _call(stream: trio.SocketStream, buf: bytearray, req: bytes) -> tuple[int, dict[str, Any]]:
    await stream.send_all(req)
    while True:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            head = bytes(buf[:head_end]).decode("latin-1").split("\r\n")
            length = next(int(v) for k, _, v in (h.partition(":") for h in head[1:])
                          if k.lower() == "content-length")
            end = head_end + 4 + length
            if len(buf) >= end:
                body = bytes(buf[head_end + 4:end])
                del buf[:end]
                return int(head[0].split(" ", 2)[1]), json.loads(body)
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("daemon closed the connection")
        buf += chunk


def _counters(d: Daemon) -> dict[str, int]:
    db = sqlite3.connect(f"file:{d.root / 'state' / 'state.db'}?mode=ro", uri=True, timeout=10)
    try:
        return {str(k): int(v) for k, v in db.execute("SELECT key, value FROM counters")}
    finally:
        db.close()


@pytest.mark.integration
def test_kill_9_under_concurrent_load_loses_no_burn_lease_or_count(make_daemon: Any) -> None:
    """32 connections doing authorize + redeem + release until the daemon is kill -9ed
    mid-load (batches in flight), then a restart: every redeemed token is refused as a
    replay, a token whose redeem got no answer redeems at most once, every lease
    answered 200 is in the store, and the monthly counter holds at least every
    authorization answered 200 and at most every one asked for."""
    d = make_daemon().start()
    token = d.user_token("content-api")
    auth = _post("/v1/authorize", {
        "server": "content-api", "tool": "create_article", "agent_id": "content-writer",
        "session_id": "s1", "user_token": token, "arguments": {"title": "hello"}})
    sent = acked = 0
    redeemed: list[tuple[str, str]] = []  # (resolution token, lease id), answered 200
    unanswered: list[str] = []  # redeem sent, the daemon died before answering
    lock = threading.Lock()

    def redeem_req(rt: str) -> bytes:
        return _post("/v1/redeem", {"resolution_token": rt, "arguments": {"title": "hello"}})

    async def worker() -> None:
        nonlocal sent, acked
        try:
            stream = await trio.open_unix_socket(d.socket)
        except OSError:
            return
        buf = bytearray()
        async with stream:
            while True:
                rt: str | None = None
                try:
                    sent += 1
                    st, a = await _call(stream, buf, auth)
                    assert st == 200, a
                    acked += 1
                    rt = a["resolution_token"]
                    st, lease = await _call(stream, buf, redeem_req(a["resolution_token"]))
                    assert st == 200, lease
                    with lock:
                        redeemed.append((a["resolution_token"], lease["lease_id"]))
                    rt = None
                    st, r = await _call(stream, buf, _post("/v1/release", {
                        "lease_id": lease["lease_id"], "status": "success", "duration_ms": 1}))
                    assert st == 200, r
                except (ConnectionError, trio.BrokenResourceError, OSError):
                    if rt is not None:
                        unanswered.append(rt)
                    return

    async def load_then_kill() -> None:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for _ in range(32):
                    nursery.start_soon(worker)
                while len(redeemed) < 600:
                    await trio.sleep(0.01)
                st, status = await trio.to_thread.run_sync(d.request, "GET", "/v1/status")
                assert st == 200, status
                store_status.update(status["store"])
                d.kill()  # SIGKILL, mid-load

    store_status: dict[str, Any] = {}
    trio.run(load_then_kill)
    # The load did go through the writer, in batches.
    assert store_status["largest_batch"] > 1 and store_status["ops_batched"] > 0, store_status
    assert d.proc is not None and d.proc.returncode == -9
    before = _counters(d)
    d.start()
    try:
        for rt, _ in redeemed[:: max(1, len(redeemed) // 200)] + redeemed[-50:]:
            st, body = d.request("POST", "/v1/redeem", {"resolution_token": rt,
                                                         "arguments": {"title": "hello"}})
            assert st == 409 and body["error"]["code"] == "token_replayed", (st, body)
        for rt in unanswered:
            first = d.request("POST", "/v1/redeem", {"resolution_token": rt,
                                                      "arguments": {"title": "hello"}})
            second = d.request("POST", "/v1/redeem", {"resolution_token": rt,
                                                       "arguments": {"title": "hello"}})
            assert second[0] == 409 and second[1]["error"]["code"] == "token_replayed", second
            assert first[0] in (200, 409), first
        db = sqlite3.connect(f"file:{d.root / 'state' / 'state.db'}?mode=ro", uri=True, timeout=10)
        try:
            stored = {r[0] for r in db.execute("SELECT lease_id FROM leases")}
        finally:
            db.close()
        assert not {lid for _, lid in redeemed} - stored
        assert len(before) == 1, before  # the department's monthly counter
        (count,) = before.values()
        assert acked <= count <= sent, (acked, count, sent)
        # and it counts on from exactly there
        for _ in range(5):
            assert d.authorize("content-api", "create_article")[0] == 200
        (after,) = _counters(d).values()
        assert after == count + 5
    finally:
        assert d.stop() == 0
