"""Audit: events are written durably *before* the response that they describe leaves.

:class:`AuditLog` is what the daemon talks to; it fans an event out to its sinks
(today one JSON-lines file, :mod:`sidekey.audit.jsonl`). A sink's ``write`` returns
only once the event is durable and raises :class:`AuditUnavailable` otherwise, so a
call whose audit record cannot be written fails with 503 ``audit_unavailable``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import trio

from ..protocol import Unavailable

log = logging.getLogger(__name__)


class AuditUnavailable(Unavailable):
    """No audit sink could record the event; the call it describes must fail."""

    code = "audit_unavailable"


class AuditSink(Protocol):
    """One destination for audit events."""

    async def write(self, event: dict[str, Any], *, durable: bool = True) -> None:
        """Record ``event``; return only once it is durable. Raises :class:`AuditUnavailable`.

        ``durable=False``: queue it and return; it becomes durable with the next commit,
        which is always before any later durable event of the same sink.
        """
        ...

    async def aclose(self) -> None:
        """Stop accepting events and release the sink's resources."""
        ...

    def health(self) -> dict[str, Any]:
        """``{"ok": bool, ...}`` for ``/v1/health`` and ``/v1/status``."""
        ...


class AuditLog:
    """The daemon's audit log: writes every event to its sinks.

    An event counts as recorded when at least one sink recorded it (the contract:
    "if no audit sink can record, the call fails"); a sink that fails while another
    succeeds is logged and shows up in :meth:`health`.
    """

    def __init__(self, sinks: Sequence[AuditSink], forwarders: Sequence[Any] = ()) -> None:
        if not sinks:
            raise ValueError("AuditLog needs at least one sink")
        self.sinks: tuple[AuditSink, ...] = tuple(sinks)
        # Forwarding sinks (sidekey.audit.forward.Forwarder: syslog, ...): fed the lines
        # the first sink (the file, the source of truth) committed; the required ones are
        # waited for by every durable event (see sidekey.audit.forward for the rule).
        self.forwarders: tuple[Any, ...] = tuple(forwarders)
        self._required = tuple(f for f in self.forwarders if f.required)
        if self.forwarders:
            primary: Any = self.sinks[0]
            primary.on_commit = self._fan_out
            for f in self.forwarders:
                f.alert = primary.enqueue_own
                attach = getattr(f, "attach", None)
                if attach is not None:  # a sink that reads the file itself (webhook)
                    attach(primary)

    def _fan_out(self, lines: list[tuple[int, bytes]]) -> None:
        for f in self.forwarders:
            f.offer(lines)

    async def reopen(self) -> None:
        """Reopen sinks whose file was moved away (SIGHUP, logrotate). Errors are logged:
        the next commit opens the path again (or fails closed)."""
        for sink in self.sinks:
            reopen = getattr(sink, "reopen", None)
            if reopen is None:
                continue
            try:
                await trio.to_thread.run_sync(reopen)
            except OSError as exc:
                log.error("audit: reopening the audit file failed: %s", exc)
            sink.publish()  # type: ignore[attr-defined]

    async def emit(self, event: dict[str, Any], *, durable: bool = True) -> None:
        """Write ``event`` durably. Raises :class:`AuditUnavailable` if no sink recorded it.

        ``durable=False`` only queues the event (see :meth:`AuditSink.write`); the daemon
        uses it for events that grant nothing by themselves (an allowed authorize: its
        token yields a secret only through a redeem, whose durable event follows it).
        """
        if len(self.sinks) == 1:
            await self.sinks[0].write(event, durable=durable)
            if durable and self._required:
                seq: int = self.sinks[0].committed_seq  # type: ignore[attr-defined]
                for f in self._required:
                    await f.wait_delivered(seq)
            return
        failures: list[AuditUnavailable] = []

        async def one(sink: AuditSink) -> None:
            try:
                await sink.write(event, durable=durable)
            except AuditUnavailable as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            for sink in self.sinks:
                nursery.start_soon(one, sink)
        if len(failures) == len(self.sinks):
            raise AuditUnavailable("no audit sink could record the event") from failures[0]
        if failures:
            log.warning(
                "audit event %s recorded by %d of %d sinks",
                event.get("event_id"),
                len(self.sinks) - len(failures),
                len(self.sinks),
            )

    def health(self) -> dict[str, Any]:
        """``{"ok": ..., "sinks": [...]}``: ok while at least one sink is healthy."""
        sinks = [sink.health() for sink in self.sinks]
        ok = any(bool(h.get("ok")) for h in sinks)
        forwarded = [f.health() for f in self.forwarders]
        # A non-required forwarder's trouble (ok false, dropped > 0) shows in its own
        # entry; it degrades the daemon only when calls depend on it.
        ok = ok and all(bool(h.get("ok")) for h in forwarded if h.get("required"))
        return {"ok": ok, "sinks": sinks + forwarded}

    async def aclose(self) -> None:
        """Close every sink (errors are logged, not raised: this runs at shutdown)."""
        # The file first (its closing checkpoint is forwarded too), then the forwarders.
        for sink in (*self.sinks, *self.forwarders):
            try:
                await sink.aclose()
            except Exception:
                log.exception("closing audit sink failed")


__all__ = ["AuditLog", "AuditSink", "AuditUnavailable"]
