"""A per-caller bound on audit events for rejections. Pure: no I/O, the time is passed in.

A process that is not attested as anything above tier ``anonymous`` can send requests
that are refused as fast as it likes (bad paths, malformed HTTP, connections over its
cap). Writing one durable event per refusal would let it fill the disk that every MCP
server's audit trail needs. :class:`RejectionLimiter` decides, per key (the caller's
uid), which refusals get their full event: the first ``burst`` of each window of
``per_seconds`` seconds. The rest are only counted, by error code; when the window
closes (at the key's next refusal after it, at :meth:`RejectionLimiter.expire` or at
:meth:`RejectionLimiter.close_all`), the counts become one :class:`Suppressed` summary
that the caller writes as a ``request.rejected.suppressed`` event. No count is lost
while the process runs: a key pushed out of the table (it tracks at most ``max_keys``
callers, least recently refused first out) hands over its counts the same way.

So one key causes at most ``burst`` full events plus one summary per window. Sans-IO
like h11: the caller feeds refusals in and takes summaries out with :meth:`take`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

# Distinct error codes counted per window; more are counted under OTHER_CODE. The codes
# come from the daemon (a small fixed set), so this only keeps the summary bounded.
MAX_CODES_PER_WINDOW = 32
OTHER_CODE = "other"

CloseReason = Literal["interval", "evicted", "shutdown"]


@dataclass(frozen=True, slots=True)
class Suppressed:
    """What one key's window did not write in full."""

    key: int
    window_start: float
    window_end: float  # when the window closed (its nominal end, or earlier on eviction/shutdown)
    written: int  # refusals of this window that got their full event
    counts: dict[str, int]  # suppressed refusals by error code
    reason: CloseReason

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(slots=True)
class _Window:
    start: float
    written: int = 0
    suppressed: dict[str, int] = field(default_factory=dict)


class RejectionLimiter:
    """Full events for the first ``burst`` refusals per key per window, counts for the rest."""

    def __init__(self, *, burst: int, per_seconds: float, max_keys: int) -> None:
        if burst < 1 or per_seconds <= 0 or max_keys < 1:
            raise ValueError("burst, per_seconds and max_keys must be positive")
        self.burst = burst
        self.per_seconds = per_seconds
        self.max_keys = max_keys
        self._windows: OrderedDict[int, _Window] = OrderedDict()  # least recently refused first
        self._summaries: list[Suppressed] = []

    def configure(self, *, burst: int, per_seconds: float, max_keys: int) -> None:
        """Apply new limits (a config reload); open windows keep their start."""
        if burst < 1 or per_seconds <= 0 or max_keys < 1:
            raise ValueError("burst, per_seconds and max_keys must be positive")
        self.burst, self.per_seconds, self.max_keys = burst, per_seconds, max_keys

    @property
    def tracked(self) -> int:
        return len(self._windows)

    def admit(self, key: int, code: str, now: float) -> bool:
        """Record one refusal of ``key``; True when its full event should be written.

        A window of ``key`` that has ended is closed first (its summary, if anything was
        suppressed, is queued for :meth:`take` ahead of this refusal's event).
        """
        window = self._windows.get(key)
        if window is not None and not window.start <= now < window.start + self.per_seconds:
            # Ended (or the clock stepped back): close it, start a fresh one.
            del self._windows[key]
            self._close(key, window, window.start + self.per_seconds, "interval")
            window = None
        if window is None:
            window = self._windows[key] = _Window(start=now)
            while len(self._windows) > self.max_keys:
                old_key, old = self._windows.popitem(last=False)
                self._close(old_key, old, now, "evicted")
        else:
            self._windows.move_to_end(key)
        if window.written < self.burst:
            window.written += 1
            return True
        counts = window.suppressed
        if code not in counts and len(counts) >= MAX_CODES_PER_WINDOW:
            code = OTHER_CODE
        counts[code] = counts.get(code, 0) + 1
        return False

    def expire(self, now: float) -> None:
        """Close every window that has ended by ``now`` (a periodic sweep, so a summary
        is written soon after its window even if the caller never comes back)."""
        ended = [
            (key, w)
            for key, w in self._windows.items()
            if not w.start <= now < w.start + self.per_seconds
        ]
        for key, window in ended:
            del self._windows[key]
            self._close(key, window, min(now, window.start + self.per_seconds), "interval")

    def close_all(self, now: float) -> None:
        """Close every window (at shutdown): no suppressed count is left unreported."""
        while self._windows:
            key, window = self._windows.popitem(last=False)
            self._close(key, window, now, "shutdown")

    def take(self) -> list[Suppressed]:
        """The summaries queued since the last call (oldest first)."""
        out, self._summaries = self._summaries, []
        return out

    def _close(self, key: int, window: _Window, end: float, reason: CloseReason) -> None:
        if window.suppressed:
            self._summaries.append(
                Suppressed(
                    key=key,
                    window_start=window.start,
                    window_end=max(end, window.start),
                    written=window.written,
                    counts=dict(sorted(window.suppressed.items())),
                    reason=reason,
                )
            )


__all__ = ["MAX_CODES_PER_WINDOW", "OTHER_CODE", "RejectionLimiter", "Suppressed"]
