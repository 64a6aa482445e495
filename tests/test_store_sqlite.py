"""SQLite state store: atomic jti burn, lease compare-and-set, purge, durability, modes."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from sidekey.store import LeaseRecord, StateStore, StateUnavailable, open_store
from sidekey.store import sqlite as store_sqlite
from sidekey.store.sqlite import LEASE_RETENTION_S, PURGE_CHUNK, SCHEMA_VERSION, SqliteStore


def lease(
    lease_id: str = "lse_1", *, state: str = "active", ended_at: float | None = None
) -> LeaseRecord:
    return LeaseRecord(
        lease_id=lease_id,
        jti=f"jti-{lease_id}",
        server="content-api",
        tool="create_article",
        user_id="usr_1",
        agent_id="agent_content-writer",
        session_id=None,
        secrets=("CONTENT_API_KEY",),
        created_at=1000.0,
        expires_at=1300.0,
        state=state,
        ended_at=ended_at,
        peer_pid=4242,
        peer_uid=1001,
    )


async def test_burn_twice_is_a_replay(tmp_path: Path) -> None:
    store = open_store(tmp_path / "state")
    try:
        assert await store.burn_jti("jti-a", 2000.0) is True
        assert await store.burn_jti("jti-a", 2000.0) is False
        assert await store.burn_jti("jti-b", 2000.0) is True
    finally:
        await store.aclose()


async def test_concurrent_burns_have_one_winner(tmp_path: Path) -> None:
    store = open_store(tmp_path / "state")
    wins: list[bool] = []

    async def burn() -> None:
        wins.append(await store.burn_jti("jti-race", 2000.0))

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(burn)
    await store.aclose()
    assert wins.count(True) == 1 and len(wins) == 50


async def test_burned_jti_survives_close_and_reopen(tmp_path: Path) -> None:
    store = open_store(tmp_path / "state")
    assert await store.burn_jti("jti-persist", 2000.0)
    await store.put_lease(lease())
    await store.aclose()
    reopened = open_store(tmp_path / "state")
    try:
        assert await reopened.burn_jti("jti-persist", 2000.0) is False
        assert await reopened.get_lease("lse_1") == lease()
    finally:
        await reopened.aclose()


KILLED_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import trio
    from sidekey.store import open_store

    store = open_store(Path(sys.argv[1]))
    assert trio.run(store.burn_jti, "jti-killed", 9e9)
    print("ok", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_burned_jti_survives_kill_9(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.strip() == "ok"
    # Killed without closing: the commit is only in the WAL, not checkpointed.
    assert (state / "state.db-wal").stat().st_size > 0

    async def check() -> None:
        store = open_store(state)
        try:
            assert await store.burn_jti("jti-killed", 9e9) is False
        finally:
            await store.aclose()

    trio.run(check)


async def test_transition_is_compare_and_set(tmp_path: Path) -> None:
    store = open_store(tmp_path / "state")
    try:
        await store.put_lease(lease("lse_1"))
        await store.put_lease(lease("lse_2"))
        assert await store.transition_lease("lse_1", "active", "released", at=1100.0) is True
        assert await store.transition_lease("lse_1", "active", "released", at=1101.0) is False
        assert await store.transition_lease("lse_1", "active", "expired", at=1102.0) is False
        assert await store.transition_lease("lse_unknown", "active", "expired", at=1.0) is False
        rec = await store.get_lease("lse_1")
        assert rec is not None and rec.state == "released" and rec.ended_at == 1100.0
        assert rec.secrets == ("CONTENT_API_KEY",)
        assert [r.lease_id for r in await store.leases_in_state("active")] == ["lse_2"]
        assert [r.lease_id for r in await store.leases_in_state("released")] == ["lse_1"]
        assert await store.get_lease("lse_unknown") is None
        with pytest.raises(ValueError):
            await store.transition_lease("lse_2", "active", "bogus", at=1.0)
    finally:
        await store.aclose()


async def test_racing_transitions_have_one_winner(tmp_path: Path) -> None:
    store = open_store(tmp_path / "state")
    await store.put_lease(lease())
    results: list[bool] = []

    async def end(to_state: str) -> None:
        results.append(await store.transition_lease("lse_1", "active", to_state, at=1100.0))

    async with trio.open_nursery() as nursery:
        for to_state in ("released", "expired", "revoked") * 5:
            nursery.start_soon(end, to_state)
    await store.aclose()
    assert results.count(True) == 1


async def test_duplicate_lease_is_refused(tmp_path: Path) -> None:
    store = open_store(tmp_path / "state")
    try:
        await store.put_lease(lease())
        with pytest.raises(StateUnavailable) as info:
            await store.put_lease(lease())
        assert info.value.code == "state_unavailable" and info.value.status == 503
        assert store.health()["ok"] is False
        assert await store.burn_jti("jti-after", 2000.0)  # the next success heals health
        assert store.health()["ok"] is True
    finally:
        await store.aclose()


async def test_purge_removes_expired_jtis_and_old_ended_leases(tmp_path: Path) -> None:
    store = open_store(tmp_path / "state")
    now = 1_000_000.0
    try:
        for i in range(PURGE_CHUNK * 2 + 7):  # several chunks
            await store.burn_jti(f"old-{i}", now - 1)
        await store.burn_jti("live", now + 300)
        await store.put_lease(
            lease("lse_old_released", state="released", ended_at=now - LEASE_RETENTION_S - 1)
        )
        await store.put_lease(lease("lse_recent", state="expired", ended_at=now - 10))
        await store.put_lease(lease("lse_active"))  # active leases are never purged
        assert await store.purge(now) == PURGE_CHUNK * 2 + 7 + 1
        assert await store.burn_jti("live", now + 300) is False
        assert await store.burn_jti("old-0", now + 300) is True  # forgotten (its token expired)
        assert await store.get_lease("lse_old_released") is None
        assert await store.get_lease("lse_recent") is not None
        assert await store.get_lease("lse_active") is not None
        assert await store.purge(now) == 0
    finally:
        await store.aclose()


async def test_maintenance_checkpoints_and_purges(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "state", clock=lambda: 5000.0)
    await store.burn_jti("expired", 10.0)
    await store.burn_jti("live", 9e9)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: store.run_maintenance(interval=0.01, task_status=task_status)
            )
            while store.health()["purged"] < 1 or store.health()["last_checkpoint"] is None:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert store.health()["last_checkpoint"] == 5000.0
    assert await store.burn_jti("live", 9e9) is False
    await store.aclose()
    with pytest.raises(ValueError):
        await store.run_maintenance(interval=0)


async def test_autocheckpoint_is_off(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path / "state")
    try:
        with store._edge("test") as conn:
            assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        await store.aclose()


async def test_file_modes(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        state = tmp_path / "new" / "state"
        store = open_store(state)
        await store.burn_jti("jti-mode", 2000.0)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for name in ("state.db", "state.db-wal", "state.db-shm"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    finally:
        await store.aclose()


async def test_schema_version_and_too_new_database(tmp_path: Path) -> None:
    state = tmp_path / "state"
    await open_store(state).aclose()
    with sqlite3.connect(state / "state.db") as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.close()
    with pytest.raises(StateUnavailable) as info:
        open_store(state)
    assert info.value.code == "state_schema_too_new"


def test_migrate_is_idempotent(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        assert store_sqlite.migrate(conn) == 0
        assert store_sqlite.migrate(conn) == SCHEMA_VERSION
    finally:
        conn.close()


async def test_errors_become_state_unavailable(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "state.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateUnavailable, match="cannot"):
        open_store(state)
    store: StateStore = open_store(tmp_path / "other")
    await store.aclose()
    with pytest.raises(StateUnavailable, match="closed"):
        await store.burn_jti("jti", 1.0)
    assert store.health()["ok"] is False


async def test_backend_lease_journal(tmp_path: Path) -> None:
    store = SqliteStore.open(tmp_path)
    try:
        await store.journal_backend_lease("vault", "database/creds/ro/abc", expires_at=100.0, at=1.0)
        await store.journal_backend_lease("vault", "database/creds/ro/def", expires_at=100.0, at=2.0)
        assert await store.open_backend_leases() == [
            ("vault", "database/creds/ro/abc", None), ("vault", "database/creds/ro/def", None)]
        await store.attach_backend_leases("lse_1", [("vault", "database/creds/ro/abc")])
        assert await store.open_backend_leases("lse_1") == [("vault", "database/creds/ro/abc", "lse_1")]
        await store.backend_lease_revoked("vault", "database/creds/ro/abc", at=3.0)
        assert await store.open_backend_leases("lse_1") == []
        assert [r[1] for r in await store.open_backend_leases()] == ["database/creds/ro/def"]
        # revoked rows are purged after the retention, open ones never
        assert await store.purge(3.0 + 10 * 86_400) >= 1
        assert [r[1] for r in await store.open_backend_leases()] == ["database/creds/ro/def"]
    finally:
        await store.aclose()
    # survives a reopen (journal is durable state)
    store = SqliteStore.open(tmp_path)
    try:
        assert [r[1] for r in await store.open_backend_leases()] == ["database/creds/ro/def"]
    finally:
        await store.aclose()


async def test_a_counter_ends_exactly_at_its_expiry(tmp_path: Path) -> None:
    """A quota counter whose expires_at has come (store clock == expires_at) counts as
    absent: the next window starts at the amount, never carries the old count over."""
    now = [999.0]
    store = SqliteStore.open(tmp_path / "state", clock=lambda: now[0])
    try:
        assert await store.counter_incr("k", expires_at=1000.0) == 1
        assert await store.counter_incr("k", expires_at=1000.0) == 2
        now[0] = 1000.0
        assert await store.counter_incr("k", expires_at=2000.0) == 1
    finally:
        await store.aclose()
