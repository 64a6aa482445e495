"""The state store: burned token ids and leases, shared by every request on the host.

One contract (:class:`StateStore`), implemented by :mod:`sidekey.store.sqlite` (one
file under ``state.dir``). Every method either does what it says or raises
:class:`StateUnavailable` (503 ``state_unavailable``); the caller fails closed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..protocol import Unavailable

LEASE_STATES = frozenset({"active", "released", "expired", "revoked"})


class StateUnavailable(Unavailable):
    """The state store cannot serve the call (I/O error, corrupt or locked database)."""

    code = "state_unavailable"


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """A lease as stored. ``secrets`` holds secret *names* only, never values."""

    lease_id: str
    jti: str
    server: str
    tool: str
    user_id: str
    agent_id: str | None
    session_id: str | None
    secrets: tuple[str, ...]
    created_at: float
    expires_at: float
    state: str  # one of LEASE_STATES
    ended_at: float | None
    peer_pid: int
    peer_uid: int


class StateStore(Protocol):
    """Durable state shared by all requests. Every method may raise :class:`StateUnavailable`."""

    async def burn_jti(self, jti: str, expires_at: float) -> bool:
        """Atomically mark ``jti`` used. True if newly burned, False if it already was (a replay)."""
        ...

    async def put_lease(self, rec: LeaseRecord) -> None:
        """Store a new lease."""
        ...

    async def transition_lease(
        self, lease_id: str, from_state: str, to_state: str, *, at: float
    ) -> bool:
        """Compare-and-set the lease's state; ``at`` becomes ``ended_at``. False if not in ``from_state``."""
        ...

    async def get_lease(self, lease_id: str) -> LeaseRecord | None:
        """The lease, or None if unknown (or already purged)."""
        ...

    async def journal_backend_lease(
        self, backend: str, backend_lease_id: str, *, expires_at: float, at: float
    ) -> None:
        """Record a dynamic credential a backend created, before it is handed out."""
        ...

    async def attach_backend_leases(self, lease_id: str, items: Sequence[tuple[str, str]]) -> None:
        """Tie journaled (backend, backend lease id) pairs to the tool call's lease."""
        ...

    async def backend_lease_revoked(self, backend: str, backend_lease_id: str, *, at: float) -> None:
        """Mark a journaled backend lease revoked."""
        ...

    async def open_backend_leases(self, lease_id: str | None = None) -> list[tuple[str, str, str | None]]:
        """Unrevoked (backend, backend lease id, tool-call lease id); all, or one lease's."""
        ...

    async def leases_in_state(self, state: str) -> list[LeaseRecord]:
        """All leases in ``state``, soonest expiry first."""
        ...

    async def purge(self, now: float) -> int:
        """Delete jtis expired before ``now`` and ended leases past retention; return how many."""
        ...

    def health(self) -> dict[str, Any]:
        """``{"ok": bool, ...}`` for ``/v1/health`` and ``/v1/status``."""
        ...

    async def aclose(self) -> None:
        """Release the store's resources."""
        ...


def open_store(state_dir: Path) -> StateStore:
    """Open the state store under ``state_dir`` (created 0700). Raises StateUnavailable."""
    from .sqlite import SqliteStore

    return SqliteStore.open(state_dir)


__all__ = ["LEASE_STATES", "LeaseRecord", "StateStore", "StateUnavailable", "open_store"]
