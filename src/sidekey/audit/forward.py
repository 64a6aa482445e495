"""Forwarding sinks: copies of the audit file's committed lines sent elsewhere (syslog, ...).

The file sink is the source of truth: a forwarder only ever receives lines the file
sink has already committed (its ``on_commit`` listener, :meth:`Forwarder.offer`), as
written (with ``seq`` / ``prev_hash`` / ``log_id``, so a SIEM can check the chain too),
checkpoints and ``audit.rotated`` / ``audit.repaired`` lines included.

Each forwarder has a bounded queue and its own task (:meth:`Forwarder.run`) that sends
batches from it. Delivery rule (``required``):

- ``required: false`` (the default): a call never waits for the forwarder. If its queue
  is full, new lines are dropped and counted (``dropped`` in its health), and the first
  drop of an episode writes an ``audit.sink_overflow`` event to the file (the episode
  ends when the queue has drained); a failed send is retried with backoff, the lines
  waiting in the queue meanwhile.
- ``required: true``: a durable event's call returns only once this forwarder has sent
  every line up to that event (within ``deliver_timeout_s``), else the call fails with
  503 ``audit_unavailable`` (the event is in the file all the same: the file is always
  written first).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

import trio

from . import AuditUnavailable

log = logging.getLogger(__name__)

OVERFLOW_TYPE = "audit.sink_overflow"
DEFAULT_QUEUE_MAX = 10_000
# Events are up to 1 MiB each (sidekey.audit.jsonl.MAX_EVENT_BYTES): the queue is capped
# in bytes too.
DEFAULT_QUEUE_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_DELIVER_TIMEOUT_S = 5.0
# Retry backoff after a failed send: doubles from the first to the last.
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 30.0
# Lines sent per batch (one connection round, not one fsync: nothing is waited on).
SEND_BATCH = 256
# At shutdown a forwarder gets this long to send what is queued (then the rest is dropped,
# counted and logged).
DRAIN_ON_CLOSE_S = 2.0

Line = tuple[int, bytes]
Alert = Callable[[str, dict[str, Any]], None]


class Forwarder:
    """Base class: the queue, the sender task, health. Subclasses implement
    :meth:`send` (raise ``OSError`` on failure) and :meth:`disconnect`."""

    kind = "forwarder"

    def __init__(self, name: str, *, required: bool = False, queue_max: int = DEFAULT_QUEUE_MAX,
                 queue_max_bytes: int = DEFAULT_QUEUE_MAX_BYTES,
                 deliver_timeout_s: float = DEFAULT_DELIVER_TIMEOUT_S) -> None:
        self.name = name
        self.required = required
        self.queue_max = queue_max
        self.queue_max_bytes = queue_max_bytes
        self._queued_bytes = 0
        self.deliver_timeout_s = deliver_timeout_s
        self.alert: Alert | None = None
        self._queue: collections.deque[Line] = collections.deque()
        self._nonempty = trio.Event()
        self._progress = trio.Event()  # set (and replaced) whenever delivered_seq moves
        self.delivered_seq = 0
        self.delivered = 0
        self.dropped = 0
        self.failures = 0
        self.overflows = 0
        self._overflowing = False
        self._ok = True
        self.last_error: str | None = None
        self._running = False
        self._closed = False

    # ------------------------------------------------------------------ to implement

    async def send(self, lines: list[Line]) -> None:
        raise NotImplementedError

    async def disconnect(self) -> None:
        """Drop the connection (after a failure, and at close)."""

    def describe(self) -> dict[str, Any]:
        """Where the forwarder sends (for health; never a secret)."""
        return {}

    # ------------------------------------------------------------------ queue

    def offer(self, lines: list[Line]) -> None:
        """Queue committed lines (never blocks, never raises): beyond ``queue_max`` they
        are dropped and counted, and the episode's first drop raises an alert event."""
        if self._closed:
            self.dropped += len(lines)
            return
        kept = 0
        for item in lines:
            if (len(self._queue) >= self.queue_max
                    or self._queued_bytes + len(item[1]) > self.queue_max_bytes):
                break
            self._queue.append(item)
            self._queued_bytes += len(item[1])
            kept += 1
        if kept < len(lines):
            self.dropped += len(lines) - kept
            if not self._overflowing:
                self._overflowing = True
                self.overflows += 1
                log.error("audit sink %s: queue full (%d lines): dropping events", self.name,
                          self.queue_max)
                if self.alert is not None:
                    self.alert(OVERFLOW_TYPE, {"sink_overflow": {
                        "sink": self.name, "type": self.kind, "queue_max": self.queue_max,
                        "dropped_total": self.dropped, "last_error": self.last_error}})
            self._progress.set()  # a required waiter may be waiting for a dropped line
            self._progress = trio.Event()
        if self._queue:
            self._nonempty.set()

    async def wait_delivered(self, seq: int) -> None:
        """Return once every line up to ``seq`` was sent. Raises :class:`AuditUnavailable`
        after ``deliver_timeout_s``, or at once if such a line was dropped."""
        # The caller's line was queued (or dropped) before this wait began: a drop seen
        # now, or during the wait, may have been it (fail closed).
        dropped = self.dropped
        with trio.move_on_after(self.deliver_timeout_s):
            while self.delivered_seq < seq:
                if self._closed or self._overflowing or self.dropped != dropped:
                    break
                await self._progress.wait()
            else:
                return
        raise AuditUnavailable(f"required audit sink {self.name} did not accept the event")

    # ------------------------------------------------------------------ sender task

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._running = True
        task_status.started()
        backoff = BACKOFF_FIRST_S
        try:
            while True:
                if not self._queue:
                    if self._overflowing:
                        self._overflowing = False
                        log.warning("audit sink %s: queue drained; %d events dropped in all",
                                    self.name, self.dropped)
                    if self._closed:
                        return
                    self._nonempty = trio.Event()
                    await self._nonempty.wait()
                    continue
                if await self._send_some():
                    backoff = BACKOFF_FIRST_S
                else:
                    await trio.sleep(backoff)
                    backoff = min(BACKOFF_MAX_S, backoff * 2)
        finally:
            self._running = False

    async def _send_some(self) -> bool:
        batch = [self._queue[i] for i in range(min(SEND_BATCH, len(self._queue)))]
        try:
            await self.send(batch)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.failures += 1
            self._ok = False
            self.last_error = _describe(exc)
            log.error("audit sink %s: send failed (%d lines queued): %s", self.name,
                      len(self._queue), self.last_error)
            with trio.CancelScope(shield=True):
                await self.disconnect()
            return False
        for _ in batch:
            self._queued_bytes -= len(self._queue.popleft()[1])
        if not self._ok:
            log.warning("audit sink %s: delivering again", self.name)
        self._ok = True
        self.last_error = None
        self.delivered += len(batch)
        self.delivered_seq = max(self.delivered_seq, batch[-1][0])
        self._progress.set()
        self._progress = trio.Event()
        return True

    async def aclose(self) -> None:
        """Send what is queued (at most DRAIN_ON_CLOSE_S), then disconnect."""
        self._closed = True
        self._nonempty.set()
        with trio.move_on_after(DRAIN_ON_CLOSE_S):
            while self._queue and await self._send_some():
                pass
        if self._queue:
            log.error("audit sink %s: %d events not sent at shutdown", self.name,
                      len(self._queue))
            self.dropped += len(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
        self._progress.set()
        with trio.CancelScope(shield=True):
            await self.disconnect()

    async def write(self, event: dict[str, Any], *, durable: bool = True) -> None:
        """Forwarders are fed committed lines by the file sink (:meth:`offer`), not events."""
        raise AuditUnavailable(f"audit sink {self.name} only forwards the file's lines")

    def health(self) -> dict[str, Any]:
        ok = self._ok and not self._overflowing and not self._closed
        return {
            "ok": ok, "sink": self.kind, "name": self.name, "required": self.required,
            **self.describe(),
            "running": self._running, "queued": len(self._queue), "queued_bytes": self._queued_bytes,
            "queue_max": self.queue_max, "queue_max_bytes": self.queue_max_bytes,
            "delivered": self.delivered, "delivered_seq": self.delivered_seq,
            "dropped": self.dropped, "overflows": self.overflows, "failures": self.failures,
            "last_error": self.last_error,
        }


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__


__all__ = ["OVERFLOW_TYPE", "Forwarder"]
