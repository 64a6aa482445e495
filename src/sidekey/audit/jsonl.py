"""JSON-lines audit file with group commit.

One event per line (msgspec JSON, which escapes newlines inside strings, so a line
is always one event). The file is opened ``O_APPEND`` and created ``0600`` (its
directory ``0700`` if sidekey creates it).

Group commit: :meth:`JsonlSink.write` appends the encoded event to the *pending*
batch and waits for that batch. The long-lived writer task (:meth:`JsonlSink.run`,
started in the daemon's nursery) takes the whole pending batch, writes it with one
``os.write`` and makes it durable with one ``os.fsync``, then wakes every waiter of
that batch. The commit runs on the event loop while fsyncs are fast (under
``INLINE_COMMIT_MAX_S``: a thread hop would cost as much as the fsync); after
``SLOW_STREAK`` slow ones in a row (or one over ``INLINE_COMMIT_STALL_S``) it moves to a
worker thread for ``THREADED_BACKOFF_S`` so a sick disk cannot
freeze the loop. Events written with ``durable=False`` do not start a commit of their
own: they join the next durable event's commit (or go out after ``DEFERRED_FLUSH_S``). Events that arrive while an fsync runs form the
next batch, so one fsync covers everything queued meanwhile: throughput grows with
concurrency while each caller still only returns once its event is on disk.

Failure is closed: if the write or fsync fails, every waiter of that batch gets
:class:`~sidekey.audit.AuditUnavailable` and the sink reports unhealthy; the file is
truncated back to its size before the batch (so a disk-full episode leaves no torn
line and no event whose caller was told it failed) and reopened for the next batch,
so a transient problem (disk full, a removed directory) heals by itself. (A torn last
line left by a crash or a failed truncation is terminated at the next open.) A full queue also fails
immediately rather than letting memory grow.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import trio

from ..fsutil import fsync_dir, write_all
from . import AuditUnavailable
from .chain import (
    CHAIN_KEYS,
    CHECKPOINT_TYPE,
    GENESIS,
    REPAIRED_TYPE,
    ChainState,
    Signer,
    chained_line,
    checkpoint_fields,
    line_hash,
    recover_tail,
)

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700
# Beyond these the writer is not keeping up (or the disk is stuck): fail closed.
MAX_PENDING_EVENTS = 10_000
MAX_PENDING_BYTES = 64 * 1024 * 1024
MAX_EVENT_BYTES = 1024 * 1024
# A commit (write + fsync) runs on the event loop while it stays this fast; one that
# takes longer sends commits to a worker thread for THREADED_BACKOFF_S.
INLINE_COMMIT_MAX_S = 0.010
SLOW_STREAK = 3  # this many slow commits in a row...
INLINE_COMMIT_STALL_S = 0.1  # ...or one this slow
THREADED_BACKOFF_S = 30
# Events written with durable=False are committed with the next durable event, or
# after this long if none comes.
DEFERRED_FLUSH_S = 0.05
# Defaults of audit.checkpoint_every_events / checkpoint_every_s: a crash leaves at most
# one second of events after the last signed checkpoint.
CHECKPOINT_EVERY_EVENTS = 1000
CHECKPOINT_EVERY_S = 1.0
# At most this many skipped lines are listed (each with its hash) in an audit.repaired event.
MAX_REPAIR_LINES = 100
# O_RDWR rather than O_WRONLY: reopening reads the last byte to repair a torn line.
# O_NOFOLLOW: a root daemon must not be redirected through a planted symlink.
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW

ROTATED_TYPE = "audit.rotated"
# Rotated files are named <name>.<UTC time>.<last seq, 12 digits>, so a glob lists them
# oldest first (the order `sidekey audit verify` wants) and retention only ever deletes
# files of exactly this shape.
_ROTATED_RE = r"\.\d{8}T\d{6}Z\.\d{12}"
# A rotation that failed (rename refused, ...) is retried after this long, not at every commit.
ROTATE_RETRY_S = 60.0

_encoder = msgspec.json.Encoder()

# Called with the lines a commit made durable, (seq, bytes as written without newline),
# in file order: what other sinks forward (sidekey.audit.forward).
CommitListener = Callable[[list[tuple[int, bytes]]], None]


def _describe_oserror(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "OSError")
    return f"{name}: {exc.strerror}" if exc.strerror else name


class _Batch:
    """Events committed together by one write + one fsync. ``lines`` holds each event's
    JSON without the chain fields and newline: the commit appends them (see
    :mod:`sidekey.audit.chain`), so a failed commit leaves the chain where it was."""

    __slots__ = ("done", "failed", "lines", "nbytes", "urgent")

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.nbytes = 0
        self.done = trio.Event()
        self.failed = False
        self.urgent = False  # someone waits for this batch: commit it now


class JsonlSink:
    """Durable JSON-lines audit sink (see the module docstring for group commit).

    Use from trio: start :meth:`run` in a nursery, then ``await write(event)``.
    Outside trio (CLI, startup, shutdown): :meth:`write_sync`.
    """

    def __init__(self, path: Path, *, fsync: bool, inline: bool = True, host: str = "",
                 signer: Signer | None = None,
                 checkpoint_every_events: int = CHECKPOINT_EVERY_EVENTS,
                 checkpoint_every_s: float = CHECKPOINT_EVERY_S,
                 rotate_bytes: int | None = None, rotate_every_s: float | None = None,
                 keep: int | None = None) -> None:
        self.path = path
        # Rotation (see _rotate_locked): by size, by age of the current file, or when the
        # path was moved away (reopen, on SIGHUP). keep: rotated files kept (None: all).
        self.rotate_bytes = rotate_bytes
        self.rotate_every_s = rotate_every_s
        self.keep = keep
        self._opened_at = time.monotonic()
        self._rotate_retry_at = 0.0
        self.rotations = 0
        self.rotation_error: str | None = None
        self.on_commit: CommitListener | None = None
        # Told how long each successful batch commit (write + fsync) took, in seconds
        # (the daemon's metrics; called on the trio thread).
        self.commit_observer: Callable[[float], None] | None = None
        # Lines committed but not yet handed to on_commit (filled under _lock, possibly
        # in a worker thread; drained on the trio side by _publish).
        self._outbox: list[tuple[int, bytes]] = []
        self.fsync = fsync
        self.host = host
        # None: the chain is written but no checkpoint is signed (no audit key configured).
        self.signer = signer
        self.checkpoint_every_events = checkpoint_every_events
        self.checkpoint_every_s = checkpoint_every_s
        # Recovered from the file's tail at every open (see _open); guarded by _lock.
        self._chain: ChainState | None = None
        self._checkpoint_at = 0.0  # time.monotonic() by which the unsigned tail is signed
        self.checkpoints_written = 0
        # inline=False: always fsync from a worker thread (never block the event loop).
        self.inline = inline
        # Serialises every use of the fd: the writer's worker thread, write_sync and close.
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pending = _Batch()
        self._nonempty = trio.Event()
        self._stopped = trio.Event()
        self._running = False
        self._inline_after = 0.0  # trio time before which commits go to a worker thread
        self._slow_streak = 0
        self._closed = False
        self._healthy = True
        self._last_error: str | None = None
        self.events_written = 0
        self.batches_written = 0
        self.rejected = 0

    # ------------------------------------------------------------------ file I/O (any thread)

    def _open(self) -> int:
        parent = self.path.parent
        if not parent.exists():
            parent.mkdir(parents=True, mode=DIR_MODE, exist_ok=True)
            os.chmod(parent, DIR_MODE)  # mkdir's mode is filtered by the umask
        created = not os.path.lexists(self.path)
        fd = os.open(self.path, _OPEN_FLAGS, FILE_MODE)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "audit path is not a regular file")
            if created:
                os.fchmod(fd, FILE_MODE)
                if self.fsync:
                    fsync_dir(parent)
            self._resume_chain(fd, st.st_size)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _resume_chain(self, fd: int, size: int) -> None:
        """Continue the chain from the file's last chained line (every open: at start,
        and after a failed commit, whose rollback may itself have failed).

        A torn last line (a crash or a failed short write) is terminated so the next
        event starts on its own line; it and any other line after the last chained
        event stay visible and are named (length and SHA-256) by an ``audit.repaired``
        event chained to that last event, so ``sidekey audit verify`` can tell an
        acknowledged torn write from a deletion. An empty file continues the chain
        this process already has (a new file after rotation names the previous file's
        last hash); a file without any chained line starts a new log whose first
        ``prev_hash`` is the hash of its last line (or :data:`GENESIS`).
        """
        recovered = recover_tail(fd, size) if size > 0 else None
        if recovered is not None and recovered.state is not None:
            state = recovered.state
        elif size == 0 and self._chain is not None:
            state = self._chain
        else:
            state = ChainState(head=(recovered.last_line_hash if recovered else None) or GENESIS)
        repair = b""
        repaired: list[tuple[int, bytes]] = []
        if recovered is not None and recovered.torn:
            log.warning("audit file %s ended with a partial line; terminating it", self.path)
            repair = b"\n"
        if recovered is not None and recovered.state is not None and recovered.skipped:
            skipped = recovered.skipped
            body = self._encode(self._own_event(REPAIRED_TYPE, {
                "repaired": {
                    "skipped_lines": len(skipped),
                    "lines": [{"bytes": n, "sha256": h} for n, h in skipped[:MAX_REPAIR_LINES]],
                    "torn": recovered.torn,
                },
            }))
            state.seq += 1
            line = chained_line(body, state.seq, state.head, state.log_id)
            state.head = line_hash(line)
            state.unsigned += 1
            repair += line + b"\n"
            repaired.append((state.seq, line))
            log.warning("audit file %s: %d line(s) after seq %d are not chained events; "
                        "recorded in an %s event", self.path, len(skipped), state.seq - 1,
                        REPAIRED_TYPE)
        if repair:
            write_all(fd, repair)
            self._note(repaired)
        if state.unsigned:
            self._checkpoint_at = time.monotonic() + self.checkpoint_every_s
        self._chain = state

    def _own_event(self, event_type: str, extra: dict[str, Any]) -> dict[str, Any]:
        from .events import make_event

        return make_event(event_type, host=self.host, now=datetime.datetime.now(datetime.UTC),
                          redact_keys=(), extra=extra)

    def _chain_lines(self, bodies: Sequence[bytes], *, final: bool, sign_now: bool = False,
                     ) -> tuple[bytes, ChainState, bool, list[tuple[int, bytes]]]:
        """The bytes to append for ``bodies`` (chained), plus a signed checkpoint when
        one is due, ``final`` or ``sign_now`` (and anything is unsigned); the chain state
        after them; and the lines, (seq, bytes). Called under _lock."""
        chain = self._chain
        if chain is None:  # set by _open, which runs before any commit
            raise OSError(errno.EBADF, "audit chain state missing")
        seq, head = chain.seq, chain.head
        parts: list[bytes] = []
        lines: list[tuple[int, bytes]] = []
        for body in bodies:
            seq += 1
            line = chained_line(body, seq, head, chain.log_id)
            head = line_hash(line)
            parts += (line, b"\n")
            lines.append((seq, line))
        unsigned = chain.unsigned + len(bodies)
        signed = False
        # Due: checkpoint_every_s after the oldest unsigned event (none before: these are
        # the first, so not yet), or after checkpoint_every_events of them.
        if self.signer is not None and (final or (unsigned and (
                sign_now or unsigned >= self.checkpoint_every_events
                or (chain.unsigned and time.monotonic() >= self._checkpoint_at)))):
            now = datetime.datetime.now(datetime.UTC)
            from .events import format_timestamp

            fields = checkpoint_fields(self.signer, log_id=chain.log_id, host=self.host, seq=seq,
                                       hash_=head, signed_at=format_timestamp(now), final=final)
            body = self._encode(self._own_event(CHECKPOINT_TYPE, {"checkpoint": fields}))
            seq += 1
            line = chained_line(body, seq, head, chain.log_id)
            head = line_hash(line)
            parts += (line, b"\n")
            lines.append((seq, line))
            signed = True
        after = ChainState(seq=seq, head=head, log_id=chain.log_id,
                           unsigned=0 if signed else unsigned)
        return b"".join(parts), after, signed, lines

    def _commit(self, bodies: Sequence[bytes], *, final: bool = False) -> None:
        """Append ``bodies`` (chained; with a checkpoint if one is due) and (if
        configured) fsync. Raises OSError; drops the fd on error.

        All or nothing: if the write (ENOSPC, EFBIG, EIO, a short write) or the fsync
        fails, the file is truncated back to its size before this batch, so it never
        keeps a torn line or events whose callers were told they failed.
        """
        with self._lock:
            if self._fd is None:
                self._fd = self._open()
            fd = self._fd
            reason = self._rotation_due_locked(fd) if bodies else None
            if reason is not None:
                fd = self._rotate_locked(fd, reason)
            data, after, signed, lines = self._chain_lines(bodies, final=final)
            if not data:
                return
            # The daemon is the file's only writer (O_APPEND), so its size is where this
            # batch starts.
            start = os.fstat(fd).st_size
            try:
                write_all(fd, data)
                if self.fsync:
                    os.fsync(fd)
            except OSError:
                self._roll_back_locked(fd, start)
                self._close_fd_locked()
                raise
            if after.unsigned and not self._chain_unsigned():
                # The first unsigned event: it is signed within checkpoint_every_s.
                self._checkpoint_at = time.monotonic() + self.checkpoint_every_s
            self._chain = after
            self._note(lines)
            if signed:
                self.checkpoints_written += 1

    # ------------------------------------------------------------------ rotation

    def _rotation_due_locked(self, fd: int) -> str | None:
        """``"size"`` / ``"age"`` when the current file is due for rotation, else None."""
        if self.rotate_bytes is None and self.rotate_every_s is None:
            return None
        now = time.monotonic()
        if now < self._rotate_retry_at:
            return None
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        if self.rotate_bytes is not None and size >= self.rotate_bytes:
            return "size"
        if self.rotate_every_s is not None and now - self._opened_at >= self.rotate_every_s:
            return "age"
        return None

    def _rotated_name(self) -> Path:
        chain = self._chain
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        seq = chain.seq if chain is not None else 0
        return self.path.with_name(f"{self.path.name}.{stamp}.{seq:012d}")

    def _seal_locked(self, fd: int) -> None:
        """Sign the current file's unsigned tail before it is left (rotation, reopen), so
        a rotated file ends at a checkpoint. Best effort: a failure leaves an unsigned
        tail, which the next checkpoint in the new file still covers."""
        if self.signer is None or not self._chain_unsigned():
            return
        data, after, _signed, lines = self._chain_lines([], final=False, sign_now=True)
        try:
            write_all(fd, data)
            if self.fsync:
                os.fsync(fd)
        except OSError as exc:
            log.error("audit file %s: checkpoint before rotation not written: %s",
                      self.path, _describe_oserror(exc))
            return
        self._chain = after
        self._note(lines)
        self.checkpoints_written += 1

    def _rotate_locked(self, fd: int, reason: str) -> int:
        """Rename the current file to ``<name>.<time>.<seq>``, start a new one at the path
        and return its fd. The old file ends with a checkpoint (when there is a key); the
        new one starts with an ``audit.rotated`` event chained to the old file's last line
        (so the chain runs on across files, and a restart before any other event still
        finds the chain in the new file). A failed rename keeps the current file (retried
        after ROTATE_RETRY_S): rotation is housekeeping, it never fails a call."""
        self._seal_locked(fd)
        target = self._rotated_name()
        try:
            if os.path.lexists(target):
                raise OSError(errno.EEXIST, "rotated file name already taken")
            os.rename(self.path, target)
        except OSError as exc:
            self.rotation_error = _describe_oserror(exc)
            self._rotate_retry_at = time.monotonic() + ROTATE_RETRY_S
            log.error("audit file %s: rotation failed, writing on: %s", self.path,
                      self.rotation_error)
            return fd
        self.rotation_error = None
        self._close_fd_locked()
        self._fd = fd = self._open()
        if self.fsync:
            fsync_dir(self.path.parent)
        self._after_switch_locked(fd, reason, previous=target.name)
        self._prune_locked()
        return fd

    def _after_switch_locked(self, fd: int, reason: str, previous: str | None) -> None:
        """The first line of a new file: ``audit.rotated`` (reason, previous file name)."""
        self.rotations += 1
        self._opened_at = time.monotonic()
        chain = self._chain
        if chain is None:
            return
        body = self._encode(self._own_event(ROTATED_TYPE, {"rotated": {
            "reason": reason, "previous_file": previous, "previous_seq": chain.seq,
            "previous_hash": chain.head}}))
        data, after, signed, lines = self._chain_lines([body], final=False)
        write_all(fd, data)
        if self.fsync:
            os.fsync(fd)
        self._chain = after
        self._note(lines)
        if signed:
            self.checkpoints_written += 1
        log.info("audit file %s: new file (%s), chain continues at seq %d", self.path, reason,
                 after.seq)

    def _prune_locked(self) -> None:
        """Delete rotated files beyond ``keep`` (oldest first; only names this sink made)."""
        if self.keep is None:
            return
        try:
            rotated = [p.name for p in rotated_files(self.path)]
        except OSError as exc:
            log.error("audit retention: cannot list %s: %s", self.path.parent,
                      _describe_oserror(exc))
            return
        for name in rotated[:max(0, len(rotated) - self.keep)]:
            try:
                os.unlink(self.path.parent / name)
                log.info("audit retention: deleted %s (keep %d)", name, self.keep)
            except OSError as exc:
                log.error("audit retention: cannot delete %s: %s", name, _describe_oserror(exc))

    def reopen(self) -> bool:
        """Reopen the path if the file was moved or replaced (logrotate without
        copytruncate; called on SIGHUP). The old file gets a checkpoint; the new one starts
        with ``audit.rotated`` (reason ``reopen``) chained to the old file's last line.
        Returns whether a new file was opened. Raises OSError if it cannot be opened (the
        next commit retries)."""
        with self._lock:
            fd = self._fd
            if fd is None or self._closed:
                return False
            try:
                st = os.stat(self.path, follow_symlinks=False)
                same = (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            except FileNotFoundError:
                same = False
            if same:
                return False
            self._seal_locked(fd)
            self._close_fd_locked()
            self._fd = fd = self._open()
            if os.fstat(fd).st_size == 0:
                self._after_switch_locked(fd, "reopen", previous=None)
            return True

    def _note(self, lines: list[tuple[int, bytes]]) -> None:
        """Keep committed lines for :meth:`publish`, which runs after every commit (kept
        even before a listener is set: an ``audit.repaired`` line written when the file is
        opened at start is forwarded with the first commit)."""
        self._outbox.extend(lines)

    def publish(self) -> None:
        """Hand committed lines to the listener (trio side, after a commit)."""
        with self._lock:
            lines, self._outbox = self._outbox, []
        if lines and self.on_commit is not None:
            try:
                self.on_commit(lines)
            except Exception:  # a forwarding bug must not fail the file sink
                log.exception("audit: forwarding committed lines failed")

    def _chain_unsigned(self) -> int:
        return self._chain.unsigned if self._chain is not None else 0

    def checkpoint_due_in(self) -> float | None:
        """Seconds until the unsigned tail must be signed (None: nothing to sign)."""
        if self.signer is None or not self._chain_unsigned():
            return None
        return max(0.0, self._checkpoint_at - time.monotonic())

    def _roll_back_locked(self, fd: int, start: int) -> None:
        """Cut a failed batch off the file (best effort: truncating needs no free space)."""
        try:
            os.ftruncate(fd, start)
            if self.fsync:
                os.fsync(fd)
        except OSError as exc:
            # Left as it is: the next open terminates a torn last line, as after a crash.
            log.error(
                "audit file %s: cannot truncate a failed batch back to %d bytes: %s",
                self.path, start, _describe_oserror(exc),
            )

    def _close_fd_locked(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:
                log.warning("closing audit file %s: %s", self.path, _describe_oserror(exc))

    def _failed(self, exc: OSError) -> None:
        self._healthy = False
        self._last_error = _describe_oserror(exc)
        log.error("audit write to %s failed: %s", self.path, self._last_error)

    def _succeeded(self, events: int) -> None:
        if not self._healthy:
            log.warning("audit writes to %s succeed again", self.path)
        self._healthy = True
        self._last_error = None
        self.events_written += events
        self.batches_written += 1

    @staticmethod
    def _encode(event: dict[str, Any]) -> bytes:
        """The event's JSON, without the chain fields (the commit appends them)."""
        if "seq" in event or "prev_hash" in event or "log_id" in event:
            log.error("audit event %s carries a chain field %s", event.get("event_id"), CHAIN_KEYS)
            raise AuditUnavailable("audit event carries a chain field")
        try:
            line = _encoder.encode(event)
        except (msgspec.MsgspecError, TypeError, ValueError, OverflowError) as exc:
            # A local bug (an unencodable value); the event is not recorded, so fail.
            log.error(
                "audit event %s cannot be encoded: %s", event.get("event_id"), type(exc).__name__
            )
            raise AuditUnavailable("audit event could not be encoded") from exc
        if len(line) >= MAX_EVENT_BYTES:
            log.error(
                "audit event %s is %d bytes (limit %d)",
                event.get("event_id"),
                len(line),
                MAX_EVENT_BYTES,
            )
            raise AuditUnavailable("audit event too large")
        if len(line) < 3 or line[-1:] != b"}":  # chained_line appends inside the object
            raise AuditUnavailable("audit event is not a JSON object")
        return line

    def open(self) -> None:
        """Open (create) the file now, so a bad path fails at startup. Raises AuditUnavailable."""
        try:
            with self._lock:
                if self._fd is None:
                    self._fd = self._open()
        except OSError as exc:
            self._failed(exc)
            raise AuditUnavailable(
                f"cannot open audit log {self.path}: {self._last_error}"
            ) from exc

    # ------------------------------------------------------------------ trio side

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task: commit pending batches until cancelled or :meth:`aclose`."""
        if self._running:
            raise RuntimeError("the audit writer is already running")
        if self._closed:
            raise AuditUnavailable("audit log is closed")
        # Its own limiter: the fsync must not queue behind slow backend threads.
        limiter = trio.CapacityLimiter(1)
        self._running = True
        self._stopped = trio.Event()
        inflight: _Batch | None = None
        clock = trio.CancelScope()
        try:
            if self.signer is not None:
                # A system task, not a child of a nursery here: run() keeps raising its
                # own exceptions (not wrapped in an ExceptionGroup); stopped in finally.
                trio.lowlevel.spawn_system_task(self._checkpoint_clock, clock)
            task_status.started()
            while True:
                flush_at: float | None = None
                while not (self._pending.urgent or (self._closed and self._pending.lines)):
                    if self._closed:
                        return
                    self._nonempty = trio.Event()
                    if self._pending.lines:
                        # Only queued (durable=False) events: they ride along with the
                        # next durable one, or go out DEFERRED_FLUSH_S after the first of
                        # them at most (a deadline that each new event does not push back:
                        # a steady stream of them must not grow the queue until it is full).
                        if flush_at is None:
                            flush_at = trio.current_time() + DEFERRED_FLUSH_S
                        with trio.move_on_at(flush_at) as deferred:
                            await self._nonempty.wait()
                        if deferred.cancelled_caught:
                            break
                    else:
                        # Idle. An unsigned tail that is due is signed now (an empty
                        # batch commits only the checkpoint); one that is not yet due
                        # is woken for by the checkpoint clock (_checkpoint_clock), not
                        # by a timeout here: a cancel scope per idle wait, i.e. per
                        # commit at low concurrency, cost ~20 us a commit.
                        due = self.checkpoint_due_in()
                        if due is not None and due <= 0:
                            break
                        await self._nonempty.wait()
                batch, self._pending = self._pending, _Batch()
                inflight = batch
                data = batch.lines
                commit_started = time.perf_counter()
                try:
                    if self.fsync and self.inline and trio.current_time() >= self._inline_after:
                        # Fast disk: commit on the event loop. A thread hop costs about
                        # as much as the fsync itself (~100 us each on small VMs), and
                        # every caller waits for this commit anyway.
                        started = trio.current_time()
                        try:
                            self._commit(data)
                        finally:
                            took = trio.current_time() - started
                            # One slow fsync happens (the first after open, a journal
                            # commit); a streak, or a very slow one, means a sick disk.
                            self._slow_streak = self._slow_streak + 1 if took > INLINE_COMMIT_MAX_S else 0
                            if self._slow_streak >= SLOW_STREAK or took > INLINE_COMMIT_STALL_S:
                                self._slow_streak = 0
                                # A slow disk must not stall the loop (health, status,
                                # timeouts): use a worker thread for a while.
                                self._inline_after = trio.current_time() + THREADED_BACKOFF_S
                                log.warning(
                                    "audit fsync took %.1f ms; committing from a worker "
                                    "thread for %d s", took * 1000, THREADED_BACKOFF_S,
                                )
                        await trio.lowlevel.checkpoint()
                    elif self.fsync:
                        # Not abandoned on cancel: a started commit always completes
                        # and its waiters always learn the outcome.
                        await trio.to_thread.run_sync(self._commit, data, limiter=limiter)
                    else:
                        # No fsync: an append to the page cache, cheaper than a thread hop.
                        self._commit(data)
                except OSError as exc:
                    batch.failed = True
                    self._failed(exc)
                    if not batch.lines:
                        # A checkpoint alone failed: do not retry it in a tight loop.
                        await trio.sleep(self.checkpoint_every_s)
                else:
                    if self.commit_observer is not None:
                        try:
                            self.commit_observer(time.perf_counter() - commit_started)
                        except Exception:  # metrics must never stop the audit writer
                            log.exception("audit: commit observer failed; not called again")
                            self.commit_observer = None
                    self._succeeded(len(batch.lines))
                    self.publish()
                batch.done.set()
                inflight = None
        finally:
            clock.cancel()
            self._running = False
            # Nobody will commit what is still queued (or a batch whose commit was
            # cancelled before its thread started): its waiters must not hang.
            leftover, self._pending = self._pending, _Batch()
            for unwritten in (inflight, leftover):
                if unwritten is not None and not unwritten.done.is_set():
                    if unwritten.lines:
                        log.error(
                            "audit writer stopped with %d events unwritten", len(unwritten.lines)
                        )
                    unwritten.failed = True
                    unwritten.done.set()
            self._stopped.set()

    async def _checkpoint_clock(self, scope: trio.CancelScope) -> None:
        """Wake the idle writer when the unsigned tail falls due (``checkpoint_every_s``
        after its oldest event), so an idle daemon signs it without further traffic. A
        busy writer signs a due tail in its next commit anyway. Looks again every
        ``checkpoint_every_s`` while nothing is unsigned (the oldest unsigned event is
        then at most that old when seen, so the bound holds); runs until ``scope`` is
        cancelled (the writer stopped)."""
        with scope:
            while True:
                due = self.checkpoint_due_in()
                if due is not None and due <= 0:
                    self._nonempty.set()
                    # Signed by the writer now (or in its commit under way); if that
                    # failed, the writer itself waits checkpoint_every_s before retrying.
                    due = None
                await trio.sleep(self.checkpoint_every_s if due is None else due)

    async def write(self, event: dict[str, Any], *, durable: bool = True) -> None:
        """Append ``event``; return once it is written (and fsynced, if configured).

        With ``durable=False`` return as soon as it is queued: the writer commits it in
        its next batch, before any event queued after it.

        Raises :class:`AuditUnavailable` if the sink is closed, its writer is not
        running, the queue is full, or the batch's write or fsync failed. If the caller
        is cancelled while waiting, the event stays queued and is still written.
        """
        line = self._encode(event)
        if self._closed:
            raise AuditUnavailable("audit log is closed")
        if not self._running:
            raise AuditUnavailable("audit writer is not running")
        if not durable and not self._healthy:
            # Nobody would learn that a queued event failed: while the last commit
            # failed, every event waits for its own commit (and fails if it fails).
            durable = True
        batch = self._pending
        if len(batch.lines) >= MAX_PENDING_EVENTS or batch.nbytes + len(line) > MAX_PENDING_BYTES:
            self.rejected += 1
            log.error("audit queue full (%d events pending); failing the call", len(batch.lines))
            raise AuditUnavailable("audit queue is full")
        batch.lines.append(line)
        batch.nbytes += len(line)
        if durable:
            batch.urgent = True
        self._nonempty.set()
        if not durable:
            return
        await batch.done.wait()
        if batch.failed:
            raise AuditUnavailable("audit log cannot be written")

    def enqueue_own(self, event_type: str, extra: dict[str, Any]) -> None:
        """Queue one of the sink's own events (``durable=False``; from the trio thread):
        the alert a forwarding sink raises when it overflows. Never raises: an alert
        that cannot be queued is logged (the sink's health still counts the loss)."""
        try:
            line = self._encode(self._own_event(event_type, extra))
        except AuditUnavailable:
            return
        batch = self._pending
        if (self._closed or not self._running or len(batch.lines) >= MAX_PENDING_EVENTS
                or batch.nbytes + len(line) > MAX_PENDING_BYTES):
            log.error("audit: %s event not queued (writer stopped or queue full)", event_type)
            return
        batch.lines.append(line)
        batch.nbytes += len(line)
        self._nonempty.set()

    @property
    def committed_seq(self) -> int:
        """The seq of the last line committed to the file."""
        return self._chain.seq if self._chain is not None else 0

    def write_sync(self, event: dict[str, Any]) -> None:
        """Blocking write + fsync of one event, for use outside trio. Raises AuditUnavailable."""
        line = self._encode(event)
        if self._closed:
            raise AuditUnavailable("audit log is closed")
        try:
            self._commit([line])
        except OSError as exc:
            self._failed(exc)
            raise AuditUnavailable("audit log cannot be written") from exc
        self._succeeded(1)
        self.publish()

    async def aclose(self) -> None:
        """Stop accepting events, let a running writer drain the queue, close the file."""
        self._closed = True
        if self._running:
            self._nonempty.set()
            await self._stopped.wait()
        else:
            leftover, self._pending = self._pending, _Batch()
            leftover.failed = True
            leftover.done.set()
        if self.signer is not None and self._fd is not None and self._healthy:
            # The closing checkpoint (final: true): a log that ends without one was cut,
            # or its daemon is running or died (`sidekey audit verify` says so).
            try:
                self._commit([], final=True)
            except OSError as exc:
                log.error("audit file %s: closing checkpoint not written: %s",
                          self.path, _describe_oserror(exc))
            self.publish()
        with self._lock:
            self._close_fd_locked()

    @property
    def committing_inline(self) -> bool:
        return self.inline and (not self._running or trio.current_time() >= self._inline_after)

    def health(self) -> dict[str, Any]:
        return {
            "ok": self._healthy and not self._closed,
            "sink": "jsonl",
            "path": str(self.path),
            "fsync": self.fsync,
            "commit_mode": "inline" if self.committing_inline else "thread",
            "running": self._running,
            "pending": len(self._pending.lines),
            "events_written": self.events_written,
            "batches_written": self.batches_written,
            "rejected": self.rejected,
            "last_error": self._last_error,
            "rotation": {
                "rotate_bytes": self.rotate_bytes, "rotate_every_s": self.rotate_every_s,
                "keep": self.keep, "rotations": self.rotations, "last_error": self.rotation_error,
            },
            "chain": {
                "log_id": self._chain.log_id if self._chain else None,
                "seq": self._chain.seq if self._chain else 0,
                "unsigned": self._chain_unsigned(),
                "checkpoints": self.signer is not None,
                "key_id": self.signer.key_id if self.signer else None,
                "checkpoints_written": self.checkpoints_written,
            },
        }


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of the audit file ``path`` (names this sink gives them), oldest
    first. Raises OSError if the directory cannot be listed."""
    import re

    pattern = re.compile(re.escape(path.name) + _ROTATED_RE)
    return [path.parent / n for n in sorted(os.listdir(path.parent)) if pattern.fullmatch(n)]


def rotated_last_seq(path: Path) -> int | None:
    """The seq of the last line of a rotated file, from its name
    (``<name>.<UTC time>.<seq, 12 digits>``, see ``_rotated_name``); None for another name."""
    stem, _, seq = path.name.rpartition(".")
    return int(seq) if stem and len(seq) == 12 and seq.isdigit() else None


def open_jsonl_sink(path: Path, *, fsync: bool, inline: bool = True, host: str = "",
                    signer: Signer | None = None,
                    checkpoint_every_events: int = CHECKPOINT_EVERY_EVENTS,
                    checkpoint_every_s: float = CHECKPOINT_EVERY_S,
                    rotate_bytes: int | None = None, rotate_every_s: float | None = None,
                    keep: int | None = None) -> JsonlSink:
    """Create a :class:`JsonlSink` and open its file now (creating it ``0600``).

    Raises :class:`AuditUnavailable` if the file cannot be opened, so a bad audit
    path stops the daemon at startup instead of failing every call later.
    """
    sink = JsonlSink(path, fsync=fsync, inline=inline, host=host, signer=signer,
                     checkpoint_every_events=checkpoint_every_events,
                     checkpoint_every_s=checkpoint_every_s, rotate_bytes=rotate_bytes,
                     rotate_every_s=rotate_every_s, keep=keep)
    sink.open()
    return sink


__all__ = ["JsonlSink", "open_jsonl_sink", "rotated_files", "rotated_last_seq"]
