"""SQLite state store: ``<state_dir>/state.db``.

Durability and latency: the database runs in WAL mode with ``synchronous=NORMAL``.
A commit is then an append to the WAL in the OS page cache, without an fsync, so it
survives the daemon crashing or being ``kill -9``-ed (the kernel still has the
pages), but the last commits before a *power loss or kernel crash* may be lost. That
is the trade: a burned jti or a lease transition costs microseconds instead of an
fsync each. (The audit log, which must survive power loss, fsyncs; a jti lost that
way belonged to a token whose redemption was already audited.)

Group commit, and what runs on the trio thread: every operation is a function of the
write connection (:meth:`SqliteStore._run`). When nothing is queued, no batch is in flight
and the daemon serves no other request (concurrency 1: the loop has nothing else to do),
it runs inline, in its own transaction, as before: a few microseconds of statements, less
than a hop to a worker thread and back. Otherwise it is queued for the *writer* (a trio
system task, started by the first queued operation of a trio run), which takes every
queued operation (at most :data:`MAX_BATCH_OPS`) as one batch and runs it in a worker
thread in ONE transaction: ``BEGIN IMMEDIATE``, per writing operation a ``SAVEPOINT``
(released if it succeeds, rolled back to if it raises, so a constraint, a refusal or a
bug in one operation undoes only its own changes and is reported to its caller only; an
operation of one statement needs none, as SQLite undoes a failed statement), ``COMMIT``;
then it wakes each caller with its own result or exception. So under load the event
loop runs no SQLite at all, the thread hops are per batch, and a batch's pages are
written and locked once instead of once per operation. Reads go the same way (a read
queued after a write a caller has seen committed sees it; a read in a batch is answered
only after the batch's COMMIT, so it never reports what was then rolled back). An error
that makes SQLite roll the whole transaction back (I/O error, disk full) fails the
operations before it too; a corruption error or a failed COMMIT fails the whole batch.

Durability and crashes: a caller's await returns only after the COMMIT of the transaction
that ran its operation, so a kill -9 at any instant either keeps the operation (and
maybe its caller never heard) or drops it with its whole batch (and its caller never
heard): a burned jti, a lease or a quota count that a caller acted on is never lost. A
caller cancelled while its operation waits in the queue leaves it unrun (as before, when
cancellation could land only before the statement); once a batch has taken it, it runs
and commits (or not) whatever its caller does meanwhile. :meth:`SqliteStore.aclose`
refuses new operations and lets the writer run every queued one first.

What *does* touch the disk synchronously is the checkpoint (copying the WAL into the
database and fsyncing it), so automatic checkpoints are disabled and
:meth:`SqliteStore.run_maintenance` checkpoints on a second connection in a worker
thread, and purges expired rows in small chunks (each chunk one operation).

Why the WAL needs more than a PASSIVE checkpoint: SQLite starts writing the WAL from its
beginning again only when a write transaction begins while *every* frame in it has been
copied back (``nBackfill == mxFrame``). A PASSIVE checkpoint copies the frames that were
there when it started; under sustained load the store has committed more by the
time it ends, so that condition never holds and the file grows for as long as the load
lasts (4.2 GB after 62,500 calls at c=32, issue 13), and every page read that misses the
WAL walks all of its index blocks. So once the WAL is over :data:`WAL_LIMIT_BYTES`, the
maintenance task first copies most of it with a PASSIVE checkpoint (writers go on), then
*holds this store's own statements at an async gate* (:meth:`SqliteStore._ready`: trio
tasks wait there, the event loop does not; the writer finishes its batch in flight and
starts no other) and runs ``wal_checkpoint(TRUNCATE)`` in the
worker thread: it copies the few frames committed meanwhile, syncs the database and
truncates the WAL to zero bytes. With no statement of ours in flight it needs no lock
from this process; another process's reader or writer (an operator's tool) is waited
for at most :data:`TRUNCATE_BUSY_TIMEOUT_MS`, after which the gate opens anyway and the
next try comes an ``interval`` later. Durability is unchanged: the checkpoint copies
committed frames only, and a kill -9 at any point leaves either the frames in the WAL or
the pages synced in the database file.

sqlite3 errors are translated once, here, into :class:`StateUnavailable`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
import trio

from . import (
    APPROVAL_RETENTION_S,
    LEASE_STATES,
    MAX_APPROVALS_LISTED,
    MAX_NOTICES_READ,
    MAX_UNAUDITED_LISTED,
    NOTICE_RETENTION_S,
    BackendIntent,
    CounterOp,
    LeaseRecord,
    QuotaAnswer,
    QuotaOp,
    RateOp,
    StateUnavailable,
    check_quota_ops,
    check_rate_args,
    check_session_args,
    gcra,
    refused,
)
from .records import Approval, decode_approval, encode_approval

log = logging.getLogger(__name__)

DB_NAME = "state.db"
DIR_MODE = 0o700
FILE_MODE = 0o600
# Ended leases are kept this long by default (for `sidekey status` and investigations);
# `state.lease_retention_s` sets it. At full load this is what bounds the database size.
LEASE_RETENTION_S = 86_400.0
# Rows deleted per statement when purging, so no purge stalls the event loop.
PURGE_CHUNK = 500
# How long the write connection waits for a lock held by another connection (only an
# operator's tool or the maintenance connection can hold one, briefly): in the writer's
# thread under load, on the trio thread for an inline operation.
BUSY_TIMEOUT_MS = 2_000
MAINTENANCE_BUSY_TIMEOUT_MS = 10_000
# After a checkpoint lets the WAL restart, truncate the file back to this size.
JOURNAL_SIZE_LIMIT = 16 * 1024 * 1024
# Once the WAL file is this large, the maintenance task checkpoints it and truncates it
# (see the module docstring); it looks at the file's size every WAL_POLL_S seconds. The
# WAL then stays under about this plus what the load writes in WAL_POLL_S and one
# PASSIVE pass (tens of MB at ~100 KB per call and ~600 calls/s).
WAL_LIMIT_BYTES = 16 * 1024 * 1024
WAL_POLL_S = 0.25
# How long the truncating checkpoint waits for another process's reader or writer while
# this store's own statements are held at the gate: the most the gate stays shut on a
# lock, beyond the checkpoint's own copy and fsync.
TRUNCATE_BUSY_TIMEOUT_MS = 500
# Group commit (see the module docstring): at most this many operations share one
# transaction, and at most MAX_QUEUED_OPS wait for the writer (each is a caller awaiting
# it, so the daemon's connection cap bounds this first; beyond it, fail closed).
MAX_BATCH_OPS = 256
MAX_QUEUED_OPS = 10_000
# "auto": an operation that finds the writer idle while the daemon serves only its own
# request (SqliteStore.load) runs inline on the trio thread (a thread hop would cost more
# than the statement); "never": every operation goes through the writer thread.
CommitMode = Literal["auto", "never"]
# PRAGMA quick_check (b-tree structure, record format, NOT NULL; O(database size)) at
# open and then this often from the maintenance task: a damaged page that no point
# query happens to touch still turns the health check red.
QUICK_CHECK_INTERVAL_S = 600.0
QUICK_CHECK_MAX_ERRORS = 5
# Primary result codes that mean the file itself is damaged (not a lock or I/O error).
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26

# Migration i brings the schema from version i to version i + 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE burned_jti (
        jti TEXT PRIMARY KEY NOT NULL,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX burned_jti_expires ON burned_jti (expires_at);
    CREATE TABLE leases (
        lease_id TEXT PRIMARY KEY NOT NULL,
        jti TEXT NOT NULL,
        server TEXT NOT NULL,
        tool TEXT NOT NULL,
        user_id TEXT NOT NULL,
        agent_id TEXT,
        session_id TEXT,
        secrets TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('active', 'released', 'expired', 'revoked')),
        ended_at REAL,
        peer_pid INTEGER NOT NULL,
        peer_uid INTEGER NOT NULL
    );
    CREATE INDEX leases_state ON leases (state, expires_at);
    CREATE INDEX leases_ended ON leases (ended_at) WHERE state != 'active';
    """,
    # v2: dynamic credentials a backend created (e.g. Vault leases), journaled before they
    # are handed out so that a crashed daemon revokes them at its next start.
    """
    CREATE TABLE backend_leases (
        backend TEXT NOT NULL,
        backend_lease_id TEXT NOT NULL,
        lease_id TEXT,
        issued_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        revoked_at REAL,
        PRIMARY KEY (backend, backend_lease_id)
    ) WITHOUT ROWID;
    CREATE INDEX backend_leases_open ON backend_leases (lease_id) WHERE revoked_at IS NULL;
    """,
    # v3: quotas. GCRA state (a row is stale once its tat has passed: equal to no row),
    # durable counters (monthly per department), active sessions per user.
    """
    CREATE TABLE rate_gcra (
        key TEXT PRIMARY KEY NOT NULL,
        tat REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX rate_gcra_tat ON rate_gcra (tat);
    CREATE TABLE counters (
        key TEXT PRIMARY KEY NOT NULL,
        value INTEGER NOT NULL,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX counters_expires ON counters (expires_at);
    CREATE TABLE sessions (
        user_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (user_id, session_id)
    ) WITHOUT ROWID;
    CREATE INDEX sessions_expires ON sessions (expires_at);
    """,
    # v4: human approvals. ``data`` is the whole Approval as JSON; ``state`` mirrors
    # its state for the compare-and-set and the listing.
    """
    CREATE TABLE approvals (
        id TEXT PRIMARY KEY NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        data TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX approvals_state ON approvals (state, created_at);
    CREATE INDEX approvals_created ON approvals (created_at);
    CREATE INDEX approvals_expires ON approvals (expires_at);
    """,
    # v5: rotation notices (read by every daemon on this state; see note_rotation).
    """
    CREATE TABLE rotation_notices (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        payload TEXT NOT NULL
    );
    CREATE INDEX rotation_notices_at ON rotation_notices (at);
    """,
    # v6: crash windows. Intents: a dynamic credential asked for and not journaled yet
    # (resolved by journal_backend_lease in the same transaction). end_audited: 0 from a
    # lease's end until its end event is durable (rows from before v6 count as audited).
    """
    CREATE TABLE backend_intents (
        backend TEXT NOT NULL,
        intent_id TEXT NOT NULL,
        prefix TEXT NOT NULL,
        at REAL NOT NULL,
        deadline REAL NOT NULL,
        PRIMARY KEY (backend, intent_id)
    ) WITHOUT ROWID;
    CREATE INDEX backend_intents_at ON backend_intents (at);
    ALTER TABLE leases ADD COLUMN end_audited INTEGER NOT NULL DEFAULT 1;
    CREATE INDEX leases_unaudited ON leases (ended_at) WHERE end_audited = 0;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

# Written out in full (no string building in SQL): the column order of _row_to_lease.
_INSERT_LEASE = (
    "INSERT INTO leases (lease_id, jti, server, tool, user_id, agent_id, session_id, secrets, "
    "created_at, expires_at, state, ended_at, peer_pid, peer_uid) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT_LEASE_BY_ID = (
    "SELECT lease_id, jti, server, tool, user_id, agent_id, session_id, secrets, "
    "created_at, expires_at, state, ended_at, peer_pid, peer_uid FROM leases WHERE lease_id = ?"
)
_SELECT_LEASES_BY_STATE = (
    "SELECT lease_id, jti, server, tool, user_id, agent_id, session_id, secrets, "
    "created_at, expires_at, state, ended_at, peer_pid, peer_uid FROM leases "
    "WHERE state = ? ORDER BY expires_at"
)
_SELECT_LEASES_UNAUDITED = (
    "SELECT lease_id, jti, server, tool, user_id, agent_id, session_id, secrets, "
    "created_at, expires_at, state, ended_at, peer_pid, peer_uid FROM leases "
    "WHERE end_audited = 0 ORDER BY ended_at LIMIT ?"
)
_secrets_decoder = msgspec.json.Decoder(list[str])
_T = TypeVar("_T")


class _Op:
    """One store operation waiting for (or run by) the writer: ``fn`` runs on the write
    connection inside the batch's transaction, under its own SAVEPOINT if it runs several
    writing statements (``txn``)."""

    __slots__ = ("done", "error", "fn", "result", "skip", "taken", "txn", "what", "write")

    def __init__(self, what: str, fn: Callable[[sqlite3.Connection], Any], *, write: bool,
                 txn: bool) -> None:
        self.what = what
        self.fn = fn
        self.write = write
        self.txn = txn
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = trio.Event()
        self.taken = False  # in a batch: it runs (or ran) whatever its caller does now
        self.skip = False  # its caller was cancelled before a batch took it: never run


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`, in one transaction. Returns the old version.

    Raises :class:`StateUnavailable` if the database is newer than this sidekey.
    Raises sqlite3.Error on I/O problems.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise StateUnavailable(
                f"state database schema version {version} is newer than this sidekey "
                f"supports ({SCHEMA_VERSION})",
                code="state_schema_too_new",
            )
        for step in MIGRATIONS[version:]:
            for statement in step.split(";"):
                if statement.strip():
                    conn.execute(statement)
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif version != SCHEMA_VERSION:
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if version != SCHEMA_VERSION:
        log.info("state database schema migrated from version %d to %d", version, SCHEMA_VERSION)
    return version


def _connect(path: Path, *, busy_timeout_ms: int) -> sqlite3.Connection:
    # isolation_level=None: autocommit, each statement is its own transaction unless
    # we say BEGIN. check_same_thread=False: close() may run from a worker thread and
    # the maintenance connection moves between worker threads (used by one at a time).
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise sqlite3.OperationalError("cannot enable WAL journal mode")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    except BaseException:
        conn.close()
        raise
    return conn


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return True
    return isinstance(exc, sqlite3.DatabaseError) and "malformed" in str(exc)


def _quick_check(conn: sqlite3.Connection) -> str | None:
    """None if ``PRAGMA quick_check`` finds the database sound, else its first finding."""
    try:
        rows = conn.execute(f"PRAGMA quick_check({QUICK_CHECK_MAX_ERRORS})").fetchall()
    except sqlite3.DatabaseError as exc:
        if _is_corruption(exc):
            return str(exc)
        raise
    if [tuple(r) for r in rows] == [("ok",)]:
        return None
    return "; ".join(str(r[0]) for r in rows)[:500]


def reinitialize_if_empty(state_dir: Path) -> bool:
    """``sidekey serve --init``: remove a zero-length ``state.db`` (and its ``-wal`` and
    ``-shm``, whose frames must not be replayed into a new file) so that :meth:`SqliteStore.open`
    creates a new database. Returns True if it did. Raises OSError."""
    path = state_dir / DB_NAME
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if st.st_size != 0:
        return False
    for suffix in ("-wal", "-shm", ""):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.with_name(path.name + suffix))
    log.warning("state database %s was empty: starting a new one (--init); burned token ids "
                "and lease records from before are gone", path)
    return True


def _row_to_lease(row: tuple[Any, ...]) -> LeaseRecord:
    return LeaseRecord(
        lease_id=row[0],
        jti=row[1],
        server=row[2],
        tool=row[3],
        user_id=row[4],
        agent_id=row[5],
        session_id=row[6],
        secrets=tuple(_secrets_decoder.decode(row[7])),
        created_at=float(row[8]),
        expires_at=float(row[9]),
        state=row[10],
        ended_at=None if row[11] is None else float(row[11]),
        peer_pid=int(row[12]),
        peer_uid=int(row[13]),
    )


def _rate(
    conn: sqlite3.Connection, key: str, *, limit: int, period_s: float, now: float, cost: int
) -> tuple[bool, float]:
    """One GCRA step inside the caller's transaction."""
    row = conn.execute("SELECT tat FROM rate_gcra WHERE key = ?", (key,)).fetchone()
    result = gcra(
        None if row is None else float(row[0]),
        limit=limit,
        period_s=float(period_s),
        now=float(now),
        cost=cost,
    )
    if result.allowed:
        conn.execute(
            "INSERT INTO rate_gcra (key, tat) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET tat = excluded.tat",
            (key, result.new_tat),
        )
    return result.allowed, result.retry_after_s


def _counter(
    conn: sqlite3.Connection, key: str, *, amount: int, expires_at: float, now: float
) -> int:
    """One counter increment inside the caller's transaction (expired rows count as absent)."""
    row = conn.execute("SELECT value, expires_at FROM counters WHERE key = ?", (key,)).fetchone()
    if row is None or float(row[1]) <= now:
        value, until = int(amount), float(expires_at)
    else:
        value, until = int(row[0]) + int(amount), max(float(row[1]), float(expires_at))
    conn.execute(
        "INSERT INTO counters (key, value, expires_at) VALUES (?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
        "expires_at = excluded.expires_at",
        (key, value, until),
    )
    return value


def _session(
    conn: sqlite3.Connection, user: str, session_id: str, *, now: float, idle_s: float,
    max_sessions: int,
) -> tuple[bool, int]:
    """One session touch inside the caller's transaction."""
    until = float(now) + float(idle_s)
    conn.execute("DELETE FROM sessions WHERE user_id = ? AND expires_at <= ?", (user, float(now)))
    known = conn.execute(
        "SELECT 1 FROM sessions WHERE user_id = ? AND session_id = ?", (user, session_id)
    ).fetchone()
    (count,) = conn.execute("SELECT COUNT(*) FROM sessions WHERE user_id = ?", (user,)).fetchone()
    count = int(count)
    if known is None:
        if count >= max_sessions:
            return False, count
        conn.execute(
            "INSERT INTO sessions (user_id, session_id, expires_at) VALUES (?, ?, ?)",
            (user, session_id, until),
        )
        return True, count + 1
    conn.execute(
        "UPDATE sessions SET expires_at = max(expires_at, ?) WHERE user_id = ? AND session_id = ?",
        (until, user, session_id),
    )
    return True, count


def _session_end(conn: sqlite3.Connection, user: str, session_id: str, *, now: float) -> bool:
    """Delete one session row (one statement: no savepoint needed); True if it was
    still active at ``now``."""
    # fetchall: the statement runs to its end (the primary key makes it one row at most).
    rows = conn.execute(
        "DELETE FROM sessions WHERE user_id = ? AND session_id = ? RETURNING expires_at",
        (user, session_id),
    ).fetchall()
    return any(float(expires_at) > float(now) for (expires_at,) in rows)


class SqliteStore:
    """:class:`~sidekey.store.StateStore` on one SQLite file. Create with :meth:`open`."""

    def __init__(
        self, path: Path, conn: sqlite3.Connection, *, clock: Callable[[], float],
        lease_retention_s: float = LEASE_RETENTION_S, wal_limit_bytes: int = WAL_LIMIT_BYTES,
        commit_mode: CommitMode = "auto",
    ) -> None:
        if not (lease_retention_s >= 0 and math.isfinite(lease_retention_s)):
            raise ValueError("lease_retention_s must be a finite number of seconds >= 0")
        if wal_limit_bytes < 0:
            raise ValueError("wal_limit_bytes must be >= 0")
        self.path = path
        self.wal_path = path.with_name(path.name + "-wal")
        self._conn: sqlite3.Connection | None = conn
        self._maint: sqlite3.Connection | None = None
        self._clock = clock
        self.lease_retention_s = float(lease_retention_s)
        self.wal_limit_bytes = int(wal_limit_bytes)
        # Set while a truncating checkpoint runs: this store's operations wait on it
        # (asynchronously) instead of spinning in SQLite's busy handler on the trio thread.
        self._gate: trio.Event | None = None
        self._wal_truncations = 0
        self._wal_truncate_busy = 0
        self._last_wal_truncate: float | None = None
        # No gated truncation before this trio time (after one that met a foreign lock).
        self._truncate_after = 0.0
        self._retry_s = 5.0
        # How long store operations waited at the gate: the last time and the longest.
        self._gate_last_ms = 0.0
        self._gate_max_ms = 0.0
        self._healthy = True
        self._last_error: str | None = None
        # Operations that failed, by kind (failed, corrupt, queue_full): metrics.
        self.error_counts: dict[str, int] = {"failed": 0, "corrupt": 0, "queue_full": 0}
        # Set once the file is found damaged; never cleared while open (fail closed).
        self._corrupt: str | None = None
        self._last_checkpoint: float | None = None
        self._last_quick_check: float | None = None
        self._purged = 0
        # Group commit: operations queued for the writer task (a trio system task, one
        # per trio run, started by the first queued operation), which runs them in
        # batches in a worker thread. _busy: a batch is in that thread now.
        if commit_mode not in ("auto", "never"):
            raise ValueError("commit_mode must be 'auto' or 'never'")
        self.commit_mode: CommitMode = commit_mode
        # How many requests the daemon is serving now (set by the daemon): in "auto"
        # mode an operation runs inline only while that is at most 1, its own. None
        # (no daemon: tools, tests): inline whenever the writer is idle.
        self.load: Callable[[], int] | None = None
        self._queue: collections.deque[_Op] = collections.deque()
        self._wake = trio.Event()
        self._busy = False
        self._batch_done = trio.Event()
        self._writer_token: trio.lowlevel.TrioToken | None = None
        self._writer_stopped = trio.Event()
        self._closing = False
        self._ops_inline = 0
        self._ops_batched = 0
        self._batches = 0
        self._largest_batch = 0

    @classmethod
    def open(
        cls, state_dir: Path, *, clock: Callable[[], float] = time.time,
        lease_retention_s: float = LEASE_RETENTION_S, wal_limit_bytes: int = WAL_LIMIT_BYTES,
        commit_mode: CommitMode = "auto",
    ) -> SqliteStore:
        """Open (creating dir 0700 and file 0600) and migrate. Raises StateUnavailable.

        ``lease_retention_s``: how long ended leases are kept (then purged);
        ``wal_limit_bytes``: the WAL size above which maintenance truncates it;
        ``commit_mode``: see :data:`CommitMode`."""
        path = state_dir / DB_NAME
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None  # the first start: created below
        except OSError as exc:
            raise StateUnavailable(f"cannot stat state database {path}: {exc.strerror}") from exc
        if st is not None and st.st_size == 0:
            # An existing file with no pages (truncated, or a restore gone wrong): SQLite
            # would quietly start a new database, forgetting every burned token id.
            raise StateUnavailable(
                f"state database {path} is empty (0 bytes): the burned token ids and leases "
                "it held are gone, so replay protection would silently restart from nothing. "
                "Restore it from a backup, or start once with `sidekey serve --init` to "
                "begin a new one (tokens issued before remain redeemable until they expire)",
                code="state_db_empty",
            )
        try:
            if not state_dir.exists():
                state_dir.mkdir(parents=True, mode=DIR_MODE, exist_ok=True)
                os.chmod(state_dir, DIR_MODE)  # mkdir's mode is filtered by the umask
            # Create the file ourselves so its mode is 0600 from the first byte;
            # SQLite gives the -wal and -shm files the database file's mode.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
            os.close(fd)
        except OSError as exc:
            raise StateUnavailable(
                f"cannot create state database {path}: {exc.strerror or exc}"
            ) from exc
        try:
            conn = _connect(path, busy_timeout_ms=BUSY_TIMEOUT_MS)
        except sqlite3.Error as exc:
            raise StateUnavailable(f"cannot open state database {path}: {exc}") from exc
        try:
            migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise StateUnavailable(f"cannot migrate state database {path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        try:
            store = cls(path, conn, clock=clock, lease_retention_s=lease_retention_s,
                        wal_limit_bytes=wal_limit_bytes, commit_mode=commit_mode)
        except BaseException:
            conn.close()
            raise
        # Start degraded rather than refuse: /v1/health and /v1/status then say why
        # (state_corrupt) while every store operation fails closed.
        try:
            finding = _quick_check(conn)
        except sqlite3.Error as exc:
            finding = f"quick_check failed: {exc}"
        store._last_quick_check = clock()
        if finding is not None:
            store._mark_corrupt("open", finding)
        return store

    def _mark_corrupt(self, what: str, finding: str) -> None:
        if self._corrupt is None:
            log.critical(
                "state database %s is corrupt (%s: %s); every state operation fails until it "
                "is repaired or restored (stop sidekey first)", self.path, what, finding,
            )
        self._corrupt = f"{what}: {finding}"
        self._healthy = False
        self._last_error = self._corrupt

    # ------------------------------------------------------------------ the edge

    async def _ready(self) -> None:
        """Every operation's first await: wait (asynchronously) while a truncating
        checkpoint holds the gate, else only honour a pending cancellation (no
        schedule point, as before the gate)."""
        while (gate := self._gate) is not None:
            await gate.wait()
        await trio.lowlevel.checkpoint_if_cancelled()

    def _refusal(self) -> StateUnavailable | None:
        """Why no operation may run now, or None."""
        if self._conn is None or self._closing:
            return StateUnavailable("state store is closed")
        if self._corrupt is not None:
            # A damaged table may hide a burned jti: no answer from it is trusted.
            self.error_counts["corrupt"] += 1
            return StateUnavailable("state database is corrupt", code="state_corrupt")
        return None

    def _translate(self, what: str, exc: sqlite3.Error, *, quiet: bool = False) -> StateUnavailable:
        """The StateUnavailable for a failed operation; records it in :meth:`health` (and
        the log, unless ``quiet``: the same error of a whole batch is logged once)."""
        if _is_corruption(exc):
            self.error_counts["corrupt"] += 1
            self._mark_corrupt(what, str(exc))
            out = StateUnavailable("state database is corrupt", code="state_corrupt")
        else:
            self.error_counts["failed"] += 1
            self._healthy = False
            self._last_error = f"{what}: {type(exc).__name__}: {exc}"
            if not quiet:
                log.error("state store %s failed: %s: %s", what, type(exc).__name__, exc)
            out = StateUnavailable("state store unavailable")
        out.__cause__ = exc
        return out

    def _worked(self) -> None:
        if not self._healthy and self._corrupt is None:
            log.warning("state store works again")
            self._healthy = True
            self._last_error = None

    @contextlib.contextmanager
    def _edge(self, what: str) -> Iterator[sqlite3.Connection]:
        """Yield the connection; translate sqlite3 errors into StateUnavailable. Only
        while no batch runs (the writer's thread has the connection then)."""
        conn = self._conn
        if (refusal := self._refusal()) is not None or conn is None:
            raise refusal or StateUnavailable("state store is closed")
        try:
            yield conn
        except sqlite3.Error as exc:
            raise self._translate(what, exc) from exc
        self._worked()

    async def _run(self, what: str, fn: Callable[[sqlite3.Connection], _T], *,
                   write: bool = True, txn: bool = False) -> _T:
        """Run ``fn(conn)`` as one store operation and return its result: inline on this
        thread if that is cheapest now, else queued for the writer (group commit). ``write``:
        it changes rows. ``txn``: it runs several statements that must be atomic (inline: in
        its own BEGIN IMMEDIATE ... COMMIT; in a batch: under a SAVEPOINT of its own, rolled
        back to if it raises). Without ``txn``, ``fn`` must run at most one writing
        statement and raise only from it: SQLite undoes a failed statement by itself
        (statement atomicity), so it needs no savepoint.

        Returns only once the transaction that ran it has committed. A caller cancelled
        while its operation waits in the queue leaves it unrun (as before group commit,
        when cancellation could only land before a statement); once a batch has taken
        it, it runs and commits (or not) whatever its caller does.
        """
        await self._ready()
        if (refusal := self._refusal()) is not None:
            raise refusal
        if not self._busy and not self._queue and self._inline_now():
            # Nothing queued, nothing in flight, nobody else wants the loop: a hop to the
            # writer's thread would cost more than the statement (see the module docstring).
            self._ops_inline += 1
            with self._edge(what) as conn:
                if txn:
                    with self._transaction(conn):
                        return fn(conn)
                return fn(conn)
        if len(self._queue) >= MAX_QUEUED_OPS:
            self._last_error = f"{what}: write queue full ({MAX_QUEUED_OPS} operations)"
            self.error_counts["queue_full"] += 1
            log.error("state store queue full (%d operations); failing the call", MAX_QUEUED_OPS)
            raise StateUnavailable("state store queue is full")
        self._ensure_writer()
        op = _Op(what, fn, write=write, txn=txn)
        self._queue.append(op)
        self._wake.set()
        try:
            await op.done.wait()
        except trio.Cancelled:
            if not op.taken:
                op.skip = True
            raise
        if op.error is not None:
            raise op.error
        result: _T = op.result
        return result

    def _inline_now(self) -> bool:
        if self.commit_mode == "never":
            return False
        # At concurrency 1 the operation's own request is the only one in flight; under
        # load the loop's thread is the bottleneck: queue for the writer. (O(1): trio's
        # current_statistics() walks every registered fd.)
        load = self.load
        return load is None or load() <= 1

    def _ensure_writer(self) -> None:
        token = trio.lowlevel.current_trio_token()
        if self._writer_token is token:
            return
        self._writer_token = token
        self._writer_stopped = trio.Event()
        # A system task: the store has no nursery of its own, and a store outlives any
        # one request. Cancelled only when the trio run ends (aclose stops it before).
        trio.lowlevel.spawn_system_task(self._writer, token, name="sidekey.store.sqlite.writer")

    async def _writer(self, token: trio.lowlevel.TrioToken) -> None:
        """Run queued operations in batches, one transaction and one thread hop each, until
        the store closes (queue drained) or the trio run ends. Never raises (a system task's
        exception would crash the run): an operation's failure goes to its caller."""
        limiter = trio.CapacityLimiter(1)  # its own: never behind backends' threads
        batch: list[_Op] = []
        try:
            while True:
                while not self._queue:
                    if self._closing:
                        return
                    self._wake = trio.Event()
                    await self._wake.wait()
                # A truncating checkpoint holds the connection-free gate: wait for it.
                while (gate := self._gate) is not None:
                    await gate.wait()
                batch = self._take_batch()
                if not batch:
                    continue
                self._busy = True
                self._batch_done = trio.Event()
                try:
                    await trio.to_thread.run_sync(self._run_batch, batch, limiter=limiter)
                finally:
                    self._busy = False
                    self._batch_done.set()
                    self._deliver(batch)
                    batch = []
        except trio.Cancelled:
            pass  # the run ends
        except BaseException as exc:  # a bug: fail the waiters rather than the whole run
            log.critical("state store writer failed: %s: %s", type(exc).__name__, exc)
            for op in batch:
                op.error = StateUnavailable("state store writer failed")
                op.done.set()
        finally:
            if self._writer_token is token:
                self._writer_token = None
            # Nobody will run what is still queued (the run ends): no waiter may hang.
            while self._queue:
                op = self._queue.popleft()
                op.error = StateUnavailable("state store writer stopped")
                op.done.set()
            self._writer_stopped.set()

    def _take_batch(self) -> list[_Op]:
        batch: list[_Op] = []
        while self._queue and len(batch) < MAX_BATCH_OPS:
            op = self._queue.popleft()
            if op.skip:
                continue
            op.taken = True
            # Overwritten by the batch; stays if the batch never ran (writer stopped).
            op.error = StateUnavailable("state store writer stopped before this operation ran")
            batch.append(op)
        return batch

    def _deliver(self, batch: list[_Op]) -> None:
        """On the trio thread after a batch: record outcomes, wake every waiter."""
        self._batches += 1
        self._ops_batched += len(batch)
        self._largest_batch = max(self._largest_batch, len(batch))
        seen: set[int] = set()
        for op in batch:
            if isinstance(op.error, sqlite3.Error):
                # Each caller gets its own exception object (raised in its own task).
                first = id(op.error) not in seen
                seen.add(id(op.error))
                op.error = self._translate(op.what, op.error, quiet=not first)
            elif op.error is None:
                self._worked()
            op.done.set()

    def _run_batch(self, batch: list[_Op]) -> None:
        """In the writer's thread: ``batch`` in one transaction. Never raises: every
        operation's outcome (result or exception) is left on it."""
        conn = self._conn
        if conn is None:
            return  # each op keeps its "did not run" error
        if self._corrupt is not None:
            for op in batch:
                op.error = StateUnavailable("state database is corrupt", code="state_corrupt")
            return
        try:
            self._run_batch_on(conn, batch)
        except BaseException as exc:  # BEGIN, SAVEPOINT, COMMIT...: the batch is lost
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            for op in batch:
                op.result = None
                op.error = exc
            if not isinstance(exc, Exception):
                raise

    @staticmethod
    def _run_batch_on(conn: sqlite3.Connection, batch: list[_Op]) -> None:
        # IMMEDIATE: the write lock up front, so every read-then-write inside is atomic
        # even against another process (an operator's tool) on the same file.
        conn.execute("BEGIN IMMEDIATE")
        # One operation alone needs no savepoint: its failure rolls the transaction back.
        # Nor does one of a single statement: a failed statement undoes its own changes.
        alone = len(batch) == 1
        ran: list[_Op] = []
        for op in batch:
            own = op.txn and op.write and not alone
            if own:
                conn.execute("SAVEPOINT op")
            try:
                result = op.fn(conn)
            except Exception as exc:
                if isinstance(exc, sqlite3.Error) and _is_corruption(exc):
                    raise  # no answer from this batch is trusted: all of it fails
                op.error = exc
                if not conn.in_transaction:
                    # SQLite rolled back the whole transaction (I/O error, disk full...):
                    # the operations before this one are undone too.
                    for earlier in ran:
                        earlier.result, earlier.error = None, exc
                    ran.clear()
                    conn.execute("BEGIN IMMEDIATE")
                elif own:
                    # Only this operation's changes go (a constraint, a refusal).
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                elif alone:
                    conn.execute("ROLLBACK")
                    return
                continue
            if own:
                conn.execute("RELEASE op")
            op.result, op.error = result, None
            ran.append(op)
        conn.execute("COMMIT")

    @staticmethod
    @contextlib.contextmanager
    def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error. IMMEDIATE takes the write
        lock up front, so the read-then-write inside is atomic even against another
        process (an operator's tool) on the same file."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # ------------------------------------------------------------------ StateStore

    async def burn_jti(self, jti: str, expires_at: float) -> bool:
        """Atomically burn ``jti``: True if newly burned, False if already burned (a replay)."""
        args = (jti, float(expires_at))

        def burn(conn: sqlite3.Connection) -> bool:
            # One statement: the PRIMARY KEY decides; no read-then-write race (also
            # between two burns of one jti in the same batch: the second sees the first).
            cur = conn.execute("INSERT OR IGNORE INTO burned_jti (jti, expires_at) VALUES (?, ?)",
                               args)
            return cur.rowcount == 1

        return await self._run("burn_jti", burn)

    async def put_lease(self, rec: LeaseRecord) -> None:
        """Insert a new lease. A duplicate ``lease_id`` raises StateUnavailable (a local bug)."""
        if rec.state not in LEASE_STATES:
            raise ValueError(f"unknown lease state {rec.state!r}")
        row = (
            rec.lease_id,
            rec.jti,
            rec.server,
            rec.tool,
            rec.user_id,
            rec.agent_id,
            rec.session_id,
            msgspec.json.encode(list(rec.secrets)).decode(),
            rec.created_at,
            rec.expires_at,
            rec.state,
            rec.ended_at,
            rec.peer_pid,
            rec.peer_uid,
        )

        def put(conn: sqlite3.Connection) -> None:
            conn.execute(_INSERT_LEASE, row)

        await self._run("put_lease", put)

    async def transition_lease(
        self, lease_id: str, from_state: str, to_state: str, *, at: float
    ) -> bool:
        """Compare-and-set: move the lease to ``to_state`` (``ended_at = at``) if it is in ``from_state``."""
        if from_state not in LEASE_STATES or to_state not in LEASE_STATES:
            raise ValueError(f"unknown lease state {from_state!r} -> {to_state!r}")
        args = (to_state, float(at), 1 if to_state == "active" else 0, lease_id, from_state)

        def transition(conn: sqlite3.Connection) -> bool:
            # The end and "its event is not written yet" in one statement: a crash
            # after it leaves the lease in leases_unaudited (see mark_lease_audited).
            cur = conn.execute("UPDATE leases SET state = ?, ended_at = ?, end_audited = ? "
                               "WHERE lease_id = ? AND state = ?", args)
            return cur.rowcount == 1

        return await self._run("transition_lease", transition)

    async def mark_lease_audited(self, lease_id: str) -> None:
        def mark(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE leases SET end_audited = 1 WHERE lease_id = ? AND end_audited = 0",
                         (lease_id,))

        await self._run("mark_lease_audited", mark)

    async def leases_unaudited(self, *, limit: int = MAX_UNAUDITED_LISTED) -> list[LeaseRecord]:
        args = (max(0, int(limit)),)
        rows = await self._run("leases_unaudited",
                               lambda conn: conn.execute(_SELECT_LEASES_UNAUDITED, args).fetchall(),
                               write=False)
        return [_row_to_lease(row) for row in rows]

    async def get_lease(self, lease_id: str) -> LeaseRecord | None:
        row = await self._run("get_lease",
                              lambda conn: conn.execute(_SELECT_LEASE_BY_ID, (lease_id,)).fetchone(),
                              write=False)
        return None if row is None else _row_to_lease(row)

    async def journal_backend_lease(
        self, backend: str, backend_lease_id: str, *, expires_at: float, at: float,
        intent_id: str | None = None,
    ) -> None:
        def journal(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO backend_leases (backend, backend_lease_id, issued_at, "
                "expires_at) VALUES (?, ?, ?, ?)",
                (backend, backend_lease_id, float(at), float(expires_at)),
            )
            if intent_id is not None:
                conn.execute("DELETE FROM backend_intents WHERE backend = ? AND intent_id = ?",
                             (backend, intent_id))

        await self._run("journal_backend_lease", journal, txn=True)

    async def journal_backend_intent(
        self, backend: str, intent_id: str, prefix: str, *, at: float, deadline: float
    ) -> None:
        args = (backend, intent_id, prefix, float(at), float(deadline))

        def journal(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR IGNORE INTO backend_intents (backend, intent_id, prefix, at, "
                         "deadline) VALUES (?, ?, ?, ?, ?)", args)

        await self._run("journal_backend_intent", journal)

    async def backend_intent_done(self, backend: str, intent_id: str) -> None:
        def done(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM backend_intents WHERE backend = ? AND intent_id = ?",
                         (backend, intent_id))

        await self._run("backend_intent_done", done)

    async def open_backend_intents(self) -> list[BackendIntent]:
        rows = await self._run("open_backend_intents", lambda conn: conn.execute(
            "SELECT backend, intent_id, prefix, at, deadline FROM backend_intents ORDER BY at"
        ).fetchall(), write=False)
        return [BackendIntent(str(r[0]), str(r[1]), str(r[2]), float(r[3]), float(r[4]))
                for r in rows]

    async def backend_leases_known(self, backend: str, backend_lease_ids: Sequence[str]) -> set[str]:
        ids = list(backend_lease_ids)

        def lookup(conn: sqlite3.Connection) -> set[str]:
            known: set[str] = set()
            for start in range(0, len(ids), PURGE_CHUNK):
                chunk = ids[start:start + PURGE_CHUNK]
                marks = ", ".join("?" * len(chunk))  # placeholders only, never values
                rows = conn.execute(
                    "SELECT backend_lease_id FROM backend_leases "  # noqa: S608
                    f"WHERE backend = ? AND backend_lease_id IN ({marks})",
                    (backend, *chunk),
                ).fetchall()
                known.update(str(r[0]) for r in rows)
            return known

        return await self._run("backend_leases_known", lookup, write=False)

    async def attach_backend_leases(self, lease_id: str, items: Sequence[tuple[str, str]]) -> None:
        rows = [(lease_id, b, bl) for b, bl in items]

        def attach(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE backend_leases SET lease_id = ? WHERE backend = ? AND backend_lease_id = ?",
                rows,
            )

        await self._run("attach_backend_leases", attach, txn=True)

    async def backend_lease_revoked(self, backend: str, backend_lease_id: str, *, at: float) -> None:
        args = (float(at), backend, backend_lease_id)

        def revoked(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE backend_leases SET revoked_at = ? WHERE backend = ? "
                         "AND backend_lease_id = ?", args)

        await self._run("backend_lease_revoked", revoked)

    async def open_backend_leases(self, lease_id: str | None = None) -> list[tuple[str, str, str | None]]:
        def lookup(conn: sqlite3.Connection) -> list[Any]:
            if lease_id is None:
                return conn.execute(
                    "SELECT backend, backend_lease_id, lease_id FROM backend_leases "
                    "WHERE revoked_at IS NULL ORDER BY issued_at"
                ).fetchall()
            return conn.execute(
                "SELECT backend, backend_lease_id, lease_id FROM backend_leases "
                "WHERE revoked_at IS NULL AND lease_id = ?",
                (lease_id,),
            ).fetchall()

        rows = await self._run("open_backend_leases", lookup, write=False)
        return [(str(r[0]), str(r[1]), None if r[2] is None else str(r[2])) for r in rows]

    async def leases_in_state(self, state: str) -> list[LeaseRecord]:
        rows = await self._run("leases_in_state",
                               lambda conn: conn.execute(_SELECT_LEASES_BY_STATE, (state,)).fetchall(),
                               write=False)
        return [_row_to_lease(row) for row in rows]

    async def rate_check(
        self, key: str, *, limit: int, period_s: float, now: float, cost: int = 1
    ) -> tuple[bool, float]:
        """GCRA under ``key`` (see :func:`sidekey.store.gcra`): ``(allowed, retry_after_s)``."""
        check_rate_args(limit, period_s, cost)
        return await self._run(
            "rate_check",
            lambda conn: _rate(conn, key, limit=limit, period_s=period_s, now=now, cost=cost),
            txn=True,
        )

    async def counter_incr(self, key: str, *, amount: int = 1, expires_at: float) -> int:
        """Add ``amount`` to counter ``key``; return the new value. A row whose
        ``expires_at`` has passed (by the store's clock) counts as absent."""
        now = self._clock()
        return await self._run(
            "counter_incr",
            lambda conn: _counter(conn, key, amount=amount, expires_at=expires_at, now=now),
            txn=True,
        )

    async def session_touch(
        self, user: str, session_id: str, *, now: float, idle_s: float, max_sessions: int
    ) -> tuple[bool, int]:
        """Touch ``user``'s session: ``(allowed, active_count)``; see the protocol."""
        check_session_args(idle_s, max_sessions)
        return await self._run(
            "session_touch",
            lambda conn: _session(conn, user, session_id, now=now, idle_s=idle_s,
                                  max_sessions=max_sessions),
            txn=True,
        )

    async def session_end(self, user: str, session_id: str, *, now: float) -> bool:
        """End ``user``'s session: True if it was active; see the protocol."""
        return await self._run(
            "session_end", lambda conn: _session_end(conn, user, session_id, now=now))

    async def quota_apply(self, ops: Sequence[QuotaOp], *, now: float) -> list[QuotaAnswer]:
        """All of a call's quota ops in one transaction (see the protocol)."""
        check_quota_ops(ops)
        clock_now = self._clock()
        ops = list(ops)

        def apply(conn: sqlite3.Connection) -> list[QuotaAnswer]:
            answers: list[QuotaAnswer] = []
            for op in ops:
                answer: QuotaAnswer
                if isinstance(op, RateOp):
                    answer = _rate(conn, op.key, limit=op.limit, period_s=op.period_s, now=now, cost=1)
                elif isinstance(op, CounterOp):
                    answer = _counter(conn, op.key, amount=1, expires_at=op.expires_at, now=clock_now)
                else:
                    answer = _session(conn, op.user, op.session_id, now=now, idle_s=op.idle_s,
                                      max_sessions=op.max_sessions)
                answers.append(answer)
                if refused(op, answer):
                    break
            return answers

        return await self._run("quota_apply", apply, txn=True)

    async def note_rotation(self, payload: str, *, at: float) -> None:
        args = (float(at), payload)

        def note(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO rotation_notices (at, payload) VALUES (?, ?)", args)

        await self._run("note_rotation", note)

    async def rotation_cursor(self) -> str:
        (seq,) = await self._run("rotation_cursor", lambda conn: conn.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM rotation_notices").fetchone(), write=False)
        return str(int(seq))

    async def rotations_after(self, cursor: str) -> tuple[list[str], str]:
        try:
            after = int(cursor)
        except ValueError:
            raise ValueError(f"not a rotation cursor: {cursor[:40]!r}") from None
        rows = await self._run("rotations_after", lambda conn: conn.execute(
            "SELECT seq, payload FROM rotation_notices WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, MAX_NOTICES_READ),
        ).fetchall(), write=False)
        if not rows:
            return [], cursor
        return [str(r[1]) for r in rows], str(int(rows[-1][0]))

    async def put_approval(self, approval: Approval) -> None:
        """Insert a new approval. A duplicate id raises StateUnavailable (a local bug)."""
        args = (approval.id, approval.state, approval.created_at.timestamp(),
                approval.expires_at.timestamp(), encode_approval(approval))

        def put(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO approvals (id, state, created_at, expires_at, data) "
                         "VALUES (?, ?, ?, ?, ?)", args)

        await self._run("put_approval", put)

    async def get_approval(self, approval_id: str) -> Approval | None:
        row = await self._run("get_approval", lambda conn: conn.execute(
            "SELECT data FROM approvals WHERE id = ?", (approval_id,)).fetchone(), write=False)
        return None if row is None else decode_approval(row[0])

    async def transition_approval(self, approval: Approval, *, from_state: str) -> bool:
        """Compare-and-set on ``state``: store ``approval`` if the stored one is in ``from_state``."""
        args = (approval.state, encode_approval(approval), approval.id, from_state)

        def transition(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("UPDATE approvals SET state = ?, data = ? WHERE id = ? AND state = ?",
                               args)
            return cur.rowcount == 1

        return await self._run("transition_approval", transition)

    async def list_approvals(
        self, states: Collection[str] | None = None, *, limit: int = MAX_APPROVALS_LISTED
    ) -> list[Approval]:
        """Approvals in ``states`` (all if None), oldest request first, at most ``limit``."""
        limit = max(0, min(int(limit), MAX_APPROVALS_LISTED))
        wanted = None if states is None else sorted(set(states))

        def listing(conn: sqlite3.Connection) -> list[Any]:
            if wanted is None:
                return conn.execute(
                    "SELECT data FROM approvals ORDER BY created_at LIMIT ?", (limit,)
                ).fetchall()
            marks = ", ".join("?" * len(wanted))  # placeholders only, never values
            return conn.execute(
                f"SELECT data FROM approvals WHERE state IN ({marks}) "  # noqa: S608
                "ORDER BY created_at LIMIT ?",
                (*wanted, limit),
            ).fetchall()

        rows = await self._run("list_approvals", listing, write=False)
        return [decode_approval(row[0]) for row in rows]

    async def purge(self, now: float) -> int:
        """Delete burned jtis with ``expires_at < now``, leases that ended more than
        ``lease_retention_s`` before ``now``, and rate, counter and session rows that
        expired before ``now``. Returns the number of rows deleted.

        Works in chunks of :data:`PURGE_CHUNK` rows, yielding to other tasks between them.
        """
        statements = (
            (
                "DELETE FROM burned_jti WHERE jti IN "
                "(SELECT jti FROM burned_jti WHERE expires_at < ? LIMIT ?)",
                float(now),
            ),
            (
                "DELETE FROM leases WHERE lease_id IN (SELECT lease_id FROM leases "
                "WHERE state != 'active' AND ended_at < ? LIMIT ?)",
                float(now) - self.lease_retention_s,
            ),
            (
                "DELETE FROM backend_leases WHERE (backend, backend_lease_id) IN "
                "(SELECT backend, backend_lease_id FROM backend_leases WHERE revoked_at < ? LIMIT ?)",
                float(now) - LEASE_RETENTION_S,
            ),
            (
                "DELETE FROM backend_intents WHERE (backend, intent_id) IN "
                "(SELECT backend, intent_id FROM backend_intents WHERE at < ? LIMIT ?)",
                float(now) - LEASE_RETENTION_S,
            ),
            (
                "DELETE FROM rate_gcra WHERE key IN "
                "(SELECT key FROM rate_gcra WHERE tat < ? LIMIT ?)",
                float(now),
            ),
            (
                "DELETE FROM counters WHERE key IN "
                "(SELECT key FROM counters WHERE expires_at < ? LIMIT ?)",
                float(now),
            ),
            (
                "DELETE FROM sessions WHERE (user_id, session_id) IN "
                "(SELECT user_id, session_id FROM sessions WHERE expires_at <= ? LIMIT ?)",
                float(now),
            ),
            (
                "DELETE FROM approvals WHERE id IN "
                "(SELECT id FROM approvals WHERE expires_at < ? LIMIT ?)",
                float(now) - APPROVAL_RETENTION_S,
            ),
            (
                "DELETE FROM rotation_notices WHERE seq IN "
                "(SELECT seq FROM rotation_notices WHERE at < ? LIMIT ?)",
                float(now) - NOTICE_RETENTION_S,
            ),
        )
        total = 0
        for sql, cutoff in statements:
            while True:
                await trio.lowlevel.checkpoint()
                def chunk(conn: sqlite3.Connection, sql: str = sql, cutoff: float = cutoff) -> int:
                    return int(conn.execute(sql, (cutoff, PURGE_CHUNK)).rowcount)

                deleted = await self._run("purge", chunk)
                total += max(deleted, 0)
                if deleted < PURGE_CHUNK:
                    break
        self._purged += total
        return total

    def health(self) -> dict[str, Any]:
        return {
            "ok": self._healthy and self._conn is not None and self._corrupt is None,
            # Why it is not ok: state_corrupt (damaged file, see last_error), state_closed,
            # state_unavailable (the last operation failed).
            "reason": "state_corrupt" if self._corrupt is not None
            else "state_closed" if self._conn is None
            else None if self._healthy else "state_unavailable",
            "backend": "sqlite",
            "path": str(self.path),
            "last_checkpoint": self._last_checkpoint,
            # Truncating checkpoints done, and those that met another process's lock.
            "wal_truncations": self._wal_truncations,
            "wal_truncate_busy": self._wal_truncate_busy,
            "last_wal_truncate": self._last_wal_truncate,
            "wal_gate_last_ms": round(self._gate_last_ms, 3),
            "wal_gate_max_ms": round(self._gate_max_ms, 3),
            "last_quick_check": self._last_quick_check,
            "purged": self._purged,
            # Group commit: operations run inline on the event loop (nothing queued, loop
            # otherwise idle) and through the writer; its batches, the largest one, and
            # how many operations wait for it now.
            "commit_mode": self.commit_mode,
            "ops_inline": self._ops_inline,
            "ops_batched": self._ops_batched,
            "batches": self._batches,
            "largest_batch": self._largest_batch,
            "queued": len(self._queue),
            "last_error": self._last_error,
        }

    async def aclose(self) -> None:
        """Refuse new operations, let the writer run every queued one (each waiter learns
        its outcome), then close both connections. The last close checkpoints the WAL
        (disk I/O), so it runs in a worker thread."""
        self._closing = True
        if self._writer_token is not None:
            if self._writer_token is trio.lowlevel.current_trio_token():
                self._wake.set()
                await self._writer_stopped.wait()
            else:  # a writer of an earlier trio run (it ended): nothing runs in it now
                self._writer_token = None
        while self._queue:
            op = self._queue.popleft()
            op.error = StateUnavailable("state store is closed")
            op.done.set()
        conns = [c for c in (self._maint, self._conn) if c is not None]
        self._maint = self._conn = None

        def close_all() -> None:
            for conn in conns:
                try:
                    conn.close()
                except sqlite3.Error as exc:
                    log.warning("closing state database: %s", exc)

        await trio.to_thread.run_sync(close_all)

    # ------------------------------------------------------------------ maintenance

    def _maint_conn(self) -> sqlite3.Connection:
        if self._maint is None:
            self._maint = _connect(self.path, busy_timeout_ms=MAINTENANCE_BUSY_TIMEOUT_MS)
        return self._maint

    def _checkpoint(self, mode: str) -> tuple[int, int, int]:
        """Runs in a worker thread, on the maintenance connection: ``wal_checkpoint(mode)``
        -> (busy, WAL frames, frames checkpointed)."""
        conn = self._maint_conn()
        if mode == "TRUNCATE":
            # Waits (busy handler) for other processes' locks; bounded, as the gate is shut.
            conn.execute(f"PRAGMA busy_timeout = {TRUNCATE_BUSY_TIMEOUT_MS}")
            try:
                row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.execute(f"PRAGMA busy_timeout = {MAINTENANCE_BUSY_TIMEOUT_MS}")
        else:
            row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        busy, log_frames, done = (int(x) for x in row) if row is not None else (1, -1, -1)
        return busy, log_frames, done

    def wal_bytes(self) -> int:
        """The WAL file's size now (0 if there is none). A stat: microseconds."""
        try:
            return os.stat(self.wal_path).st_size
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("cannot stat %s: %s", self.wal_path, exc.strerror)
            return 0

    async def _run_checkpoint(self, mode: str) -> tuple[int, int, int]:
        try:
            return await trio.to_thread.run_sync(self._checkpoint, mode)
        except sqlite3.Error as exc:
            self._healthy = False
            self._last_error = f"checkpoint: {type(exc).__name__}: {exc}"
            log.error("state store checkpoint failed: %s: %s", type(exc).__name__, exc)
            if _is_corruption(exc):
                self._mark_corrupt("checkpoint", str(exc))
            if self._maint is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._maint.close()
                self._maint = None
            raise StateUnavailable("state store unavailable") from exc

    async def checkpoint(self, *, truncate: bool | None = None) -> None:
        """A PASSIVE WAL checkpoint in a worker thread (writers go on); then, if the WAL
        file is over ``wal_limit_bytes`` (``truncate=None``) or if ``truncate`` is True, a
        TRUNCATE checkpoint with this store's operations held at the gate (see the module
        docstring). Raises StateUnavailable."""
        if self._conn is None:
            raise StateUnavailable("state store is closed")
        busy, log_frames, done = await self._run_checkpoint("PASSIVE")
        self._last_checkpoint = self._clock()
        if busy or (log_frames > 0 and done < log_frames):
            log.debug("WAL checkpoint incomplete: %d of %d frames", done, log_frames)
        if truncate is None:
            truncate = (self.wal_bytes() > self.wal_limit_bytes
                        and trio.current_time() >= self._truncate_after)
        if not truncate or self._conn is None:
            return
        gate = self._gate = trio.Event()
        shut_at = trio.current_time()
        try:
            # Every new operation now waits at _ready() and the writer starts no batch;
            # once the one in flight (if any) has committed, no statement of this store
            # runs (inline ones run synchronously on this thread).
            while self._busy:
                await self._batch_done.wait()
            if self._conn is None:
                return
            busy, log_frames, done = await self._run_checkpoint("TRUNCATE")
        finally:
            self._gate = None
            gate.set()
            held_ms = (trio.current_time() - shut_at) * 1000
            self._gate_last_ms, self._gate_max_ms = held_ms, max(self._gate_max_ms, held_ms)
        if busy:
            # Another process holds a read snapshot or the write lock: try again an
            # interval later rather than shut the gate every poll.
            self._wal_truncate_busy += 1
            self._truncate_after = trio.current_time() + self._retry_s
            log.info("WAL truncation waited %d ms for another process's lock and gave up "
                     "(%d of %d frames copied); retrying later", TRUNCATE_BUSY_TIMEOUT_MS,
                     done, log_frames)
        else:
            self._wal_truncations += 1
            self._last_wal_truncate = self._clock()

    def _run_quick_check(self) -> str | None:
        """Runs in a worker thread, on the maintenance connection."""
        return _quick_check(self._maint_conn())

    async def quick_check(self) -> None:
        """``PRAGMA quick_check`` in a worker thread; a finding marks the store corrupt
        (health ``reason: state_corrupt``). Raises StateUnavailable."""
        if self._conn is None:
            raise StateUnavailable("state store is closed")
        try:
            finding = await trio.to_thread.run_sync(self._run_quick_check)
        except sqlite3.Error as exc:
            self._healthy = False
            self._last_error = f"quick_check: {type(exc).__name__}: {exc}"
            log.error("state store quick_check failed: %s: %s", type(exc).__name__, exc)
            raise StateUnavailable("state store unavailable") from exc
        self._last_quick_check = self._clock()
        if finding is not None:
            self._mark_corrupt("quick_check", finding)

    async def run_maintenance(
        self,
        *,
        interval: float = 5.0,
        quick_check_interval: float = QUICK_CHECK_INTERVAL_S,
        wal_poll: float = WAL_POLL_S,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Forever: every ``interval`` seconds checkpoint the WAL and purge expired rows;
        every ``quick_check_interval`` seconds run ``PRAGMA quick_check``; and every
        ``wal_poll`` seconds look at the WAL's size, checkpointing and truncating it as
        soon as it is over ``wal_limit_bytes`` (so that it stays bounded under full load).

        Errors are logged and reflected in :meth:`health`; the loop keeps going.
        """
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError("interval must be a positive number of seconds")
        if not (wal_poll > 0 and math.isfinite(wal_poll)):
            raise ValueError("wal_poll must be a positive number of seconds")
        self._retry_s = interval
        task_status.started()
        next_pass = trio.current_time() + interval
        while True:
            await trio.sleep(max(0.0, min(wal_poll, next_pass - trio.current_time())))
            if self._conn is None:
                return
            try:
                if trio.current_time() < next_pass:
                    if (self.wal_bytes() > self.wal_limit_bytes
                            and trio.current_time() >= self._truncate_after):
                        await self.checkpoint(truncate=True)
                    continue
                next_pass = trio.current_time() + interval
                last = self._last_quick_check
                if self._corrupt is None and (last is None
                                              or self._clock() - last >= quick_check_interval):
                    await self.quick_check()
                await self.checkpoint()
                purged = await self.purge(self._clock())
            except StateUnavailable:
                continue  # already logged; health() shows it
            if purged:
                log.debug("purged %d expired state rows", purged)


__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SqliteStore", "migrate", "reinitialize_if_empty"]
