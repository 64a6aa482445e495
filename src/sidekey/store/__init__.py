"""The state store: burned token ids, leases, rate limits, counters and sessions,
shared by every request on the host (and, with Redis, by every host).

One contract (:class:`StateStore`), implemented by :mod:`sidekey.store.sqlite` (one
file under ``state.dir``) and :mod:`sidekey.store.redis` (one Redis shared by hosts).
Every method either does what it says or raises :class:`StateUnavailable`
(503 ``state_unavailable``); the caller fails closed.

Quota primitives (each one atomic, in one transaction or one Lua script):

* :meth:`StateStore.rate_check` is GCRA (generic cell rate algorithm), see
  :func:`gcra`: ``limit`` requests per ``period_s`` on average, at most ``limit`` at
  once, then one more every ``period_s / limit``. A fixed window lets ``2 * limit``
  through within a moment around its boundary; GCRA never lets more than ``limit``
  through in any interval shorter than ``period_s / limit``, nor more than
  ``limit + n`` within ``n * period_s / limit`` after a full burst. (Over a sliding
  window of a whole ``period_s`` it admits up to ``2 * limit - 1`` requests if the
  bucket was full at its start: that is the price of allowing a burst of ``limit``.)
* :meth:`StateStore.counter_incr`: a durable counter that lives until ``expires_at``.
* :meth:`StateStore.session_touch`: concurrent sessions per user, idle timeout;
  :meth:`StateStore.session_end` takes one out of the count when its client ends it.
* :meth:`StateStore.quota_apply`: a call's whole list of the three above, in order, in
  one transaction (SQLite) or one Lua script (Redis): one round trip per authorize.

Rotation notices: a rotation through one host is posted (:meth:`StateStore.note_rotation`)
and every host reads the notices after its cursor (:meth:`StateStore.rotations_after`) to
drop its cached copies of that secret.

Approvals (:class:`sidekey.store.records.Approval`, stored whole as JSON) change state only
by :meth:`StateStore.transition_approval`, a compare-and-set on ``state``: of two
approvers (or an approver and the expiry sweeper, on any host) exactly one wins.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ..protocol import Unavailable

if TYPE_CHECKING:
    from ..config import LoadedConfig
    from .records import Approval

LEASE_STATES = frozenset({"active", "released", "expired", "revoked"})
# An approval is kept this long after its expiry (for `sidekey approvals list --all`
# and the wait endpoint), then purged. Its history is in the audit trail.
APPROVAL_RETENTION_S = 24 * 3600.0
# list_approvals returns at most this many.
MAX_APPROVALS_LISTED = 1000
# Rotation notices are kept this long (hosts read them within seconds), and
# rotations_after returns at most MAX_NOTICES_READ at a time.
NOTICE_RETENTION_S = 24 * 3600.0
MAX_NOTICES_READ = 1000
# leases_unaudited returns at most this many per call (the start-up reconciliation
# loops until none is left).
MAX_UNAUDITED_LISTED = 1000


class StateUnavailable(Unavailable):
    """The state store cannot serve the call (I/O error, corrupt or locked database)."""

    code = "state_unavailable"


@dataclass(frozen=True, slots=True)
class BackendIntent:
    """A dynamic credential that may exist in ``backend`` under lease-id ``prefix`` (e.g.
    ``database/creds/readonly/``), asked for at ``at`` by a call that gives up by
    ``deadline`` (the journaling host's wall clock), whose lease id was never journaled."""

    backend: str
    intent_id: str
    prefix: str
    at: float
    deadline: float


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


# Float slack for comparing GCRA times: period_s / limit is rarely exact in binary,
# and the limit-th request of a burst must not be refused for a rounding error.
GCRA_EPSILON_S = 1e-6


class GcraResult(NamedTuple):
    """One GCRA decision: whether it is allowed, the new theoretical arrival time to store
    (only if allowed), and how long a refused caller should wait (0.0 if allowed)."""

    allowed: bool
    new_tat: float
    retry_after_s: float


def check_rate_args(limit: int, period_s: float, cost: int) -> None:
    """Raise ValueError unless ``1 <= cost <= limit`` and ``period_s`` is positive and finite."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if not (period_s > 0 and math.isfinite(period_s)):
        raise ValueError("period_s must be a positive number of seconds")
    if not 1 <= cost <= limit:
        raise ValueError(f"cost must be between 1 and limit ({limit})")


def check_session_args(idle_s: float, max_sessions: int) -> None:
    """Raise ValueError unless ``idle_s`` is positive and finite and ``max_sessions >= 1``."""
    if not (idle_s > 0 and math.isfinite(idle_s)):
        raise ValueError("idle_s must be a positive number of seconds")
    if max_sessions < 1:
        raise ValueError("max_sessions must be at least 1")


def gcra(tat: float | None, *, limit: int, period_s: float, now: float, cost: int) -> GcraResult:
    """GCRA with burst ``limit``: the pure decision both stores implement.

    ``tat`` is the stored theoretical arrival time (None when there is none). The
    Redis store runs the same arithmetic in Lua (``_GCRA_LUA`` in ``redis.py``).
    """
    interval = period_s / limit
    base = now if tat is None or tat < now else tat
    new_tat = base + cost * interval
    allow_at = new_tat - period_s  # the request conforms if now >= allow_at
    if allow_at - now > GCRA_EPSILON_S:
        return GcraResult(False, base, allow_at - now)
    return GcraResult(True, new_tat, 0.0)


class RateOp(NamedTuple):
    """``rate_check(key, limit=, period_s=)`` with cost 1, in a :meth:`StateStore.quota_apply` batch."""

    key: str
    limit: int
    period_s: float


class CounterOp(NamedTuple):
    """``counter_incr(key, amount=1, expires_at=)``; the batch stops after it if the new
    value exceeds ``stop_above`` (the call is refused; it has been counted)."""

    key: str
    expires_at: float
    stop_above: int | None = None


class SessionOp(NamedTuple):
    """``session_touch(user, session_id, idle_s=, max_sessions=)``."""

    user: str
    session_id: str
    idle_s: float
    max_sessions: int


QuotaOp = RateOp | CounterOp | SessionOp
# RateOp -> (allowed, retry_after_s); CounterOp -> new value; SessionOp -> (allowed, count)
QuotaAnswer = tuple[bool, float] | int | tuple[bool, int]


def check_quota_ops(ops: Sequence[QuotaOp]) -> None:
    """Raise ValueError for an op either store would refuse."""
    for op in ops:
        if isinstance(op, RateOp):
            check_rate_args(op.limit, op.period_s, 1)
        elif isinstance(op, SessionOp):
            check_session_args(op.idle_s, op.max_sessions)


def refused(op: QuotaOp, answer: QuotaAnswer) -> bool:
    """Whether ``answer`` to ``op`` stops the batch."""
    # A store that answers an op with the wrong shape has a bug: refuse (fail closed,
    # 503 state_unavailable) rather than read a count as a verdict or the reverse.
    if isinstance(op, CounterOp):
        if not isinstance(answer, int):
            raise StateUnavailable(f"state store answered a counter op with {type(answer).__name__}")
        return op.stop_above is not None and answer > op.stop_above
    if not isinstance(answer, tuple):
        raise StateUnavailable(f"state store answered a {type(op).__name__} with {type(answer).__name__}")
    return not answer[0]


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
        self, backend: str, backend_lease_id: str, *, expires_at: float, at: float,
        intent_id: str | None = None,
    ) -> None:
        """Record a dynamic credential a backend created, before it is handed out. With
        ``intent_id``, the intent (see :meth:`journal_backend_intent`) is resolved in the
        same atomic step: the credential is journaled and its intent gone, or neither."""
        ...

    async def journal_backend_intent(
        self, backend: str, intent_id: str, prefix: str, *, at: float, deadline: float
    ) -> None:
        """Record, *before* a backend is asked for a dynamic credential, that one may be
        created under lease-id ``prefix`` between ``at`` and ``deadline``: a crash after
        the backend created it but before :meth:`journal_backend_lease` leaves this
        intent open, and the start-up sweep looks the prefix up. Idempotent per id."""
        ...

    async def backend_intent_done(self, backend: str, intent_id: str) -> None:
        """Resolve an intent that produced no credential (the call failed) or that the
        sweep has dealt with. Unknown ids are ignored."""
        ...

    async def open_backend_intents(self) -> list[BackendIntent]:
        """Unresolved intents, oldest first (every host's, with a shared store)."""
        ...

    async def backend_leases_known(self, backend: str, backend_lease_ids: Sequence[str]) -> set[str]:
        """Which of ``backend_lease_ids`` are journaled (open or revoked, any host's)."""
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

    async def mark_lease_audited(self, lease_id: str) -> None:
        """Record that the event of the lease's end (``mcp.tool_call``, ``lease.expired``,
        ``lease.revoked``, ``lease.recovered``) is durable. :meth:`transition_lease` to an
        ended state clears this mark in the same atomic step, so a crash between the end
        and its event leaves the lease in :meth:`leases_unaudited`."""
        ...

    async def leases_unaudited(self, *, limit: int = MAX_UNAUDITED_LISTED) -> list[LeaseRecord]:
        """Ended leases whose end event is not known to be written, oldest end first."""
        ...

    async def purge(self, now: float) -> int:
        """Delete jtis expired before ``now``, ended leases past retention, approvals
        expired more than :data:`APPROVAL_RETENTION_S` ago and expired rate, counter and
        session rows; return how many."""
        ...

    async def rate_check(
        self, key: str, *, limit: int, period_s: float, now: float, cost: int = 1
    ) -> tuple[bool, float]:
        """GCRA: ``limit`` requests per ``period_s`` under ``key`` (see :func:`gcra`).

        Returns ``(allowed, retry_after_s)``; ``retry_after_s`` is 0.0 when allowed, else
        the wait after which the same request would be allowed. A refused request does
        not count. Raises ValueError for a ``cost`` outside ``1..limit``.
        """
        ...

    async def counter_incr(self, key: str, *, amount: int = 1, expires_at: float) -> int:
        """Add ``amount`` to the counter ``key`` and return the new value. The counter lives
        until ``expires_at`` (the latest one given wins); after that it starts again at 0."""
        ...

    async def session_touch(
        self, user: str, session_id: str, *, now: float, idle_s: float, max_sessions: int
    ) -> tuple[bool, int]:
        """Mark ``user``'s session active at ``now``. A session is active until it has been
        idle for ``idle_s``. Touching an active session always succeeds; a new one only if
        fewer than ``max_sessions`` are active. Returns ``(allowed, active_count)``, the
        count including this session when allowed."""
        ...

    async def session_end(self, user: str, session_id: str, *, now: float) -> bool:
        """End ``user``'s session ``session_id``: it no longer counts against
        ``max_sessions`` (a later :meth:`session_touch` of the same id opens it again).
        Atomic and idempotent. True if it was active at ``now`` (counted), False if it
        was unknown, already ended or idle past its expiry. Only that user's set is
        touched: the same id under another user is another session."""
        ...

    async def quota_apply(self, ops: Sequence[QuotaOp], *, now: float) -> list[QuotaAnswer]:
        """Run ``ops`` in order as one atomic step and return their answers, stopping
        after the first one that refuses (see :func:`refused`): the answers list is then
        shorter than ``ops``, and the ops after it did not run. Same semantics as the
        single primitives (a refused rate check or session does not count)."""
        ...

    async def note_rotation(self, payload: str, *, at: float) -> None:
        """Post a rotation notice (``payload``: which secret, never its value)."""
        ...

    async def rotation_cursor(self) -> str:
        """The cursor after the newest notice (a host starts reading from here)."""
        ...

    async def rotations_after(self, cursor: str) -> tuple[list[str], str]:
        """Payloads of the notices after ``cursor`` (oldest first, at most
        :data:`MAX_NOTICES_READ`) and the cursor after the last one returned."""
        ...

    async def put_approval(self, approval: Approval) -> None:
        """Store a new approval. A duplicate id raises StateUnavailable (a local bug)."""
        ...

    async def get_approval(self, approval_id: str) -> Approval | None:
        """The approval, or None if unknown (or purged)."""
        ...

    async def transition_approval(self, approval: Approval, *, from_state: str) -> bool:
        """Compare-and-set: replace the stored approval with ``approval`` (same id, its new
        state) if the stored one is in ``from_state``. False if it is not (or is gone)."""
        ...

    async def list_approvals(
        self, states: Collection[str] | None = None, *, limit: int = MAX_APPROVALS_LISTED
    ) -> list[Approval]:
        """Approvals in ``states`` (all if None), oldest request first, at most ``limit``."""
        ...

    def health(self) -> dict[str, Any]:
        """``{"ok": bool, ...}`` for ``/v1/health`` and ``/v1/status``."""
        ...

    async def aclose(self) -> None:
        """Release the store's resources."""
        ...


async def open_configured_store(loaded: LoadedConfig) -> StateStore:
    """The store ``state:`` asks for: SQLite under ``state.dir`` (the default), or Redis
    (password from a 0600 file or a systemd credential, never inline), checked with
    one round trip. Raises StateUnavailable / ConfigError."""
    state = loaded.config.state
    if state.backend == "sqlite":
        return open_store(loaded.state_dir, lease_retention_s=state.lease_retention_s)
    from ..protocol import ConfigError
    from ..secretfiles import read_secret
    from .redis import RedisStore

    if state.redis_url is None:
        raise ConfigError(f"{loaded.path.name}: $.state.redis_url: required for backend redis")
    password = None
    if state.redis_password_file or state.redis_password_credential:
        password = read_secret(
            loaded.resolve(state.redis_password_file) if state.redis_password_file else None,
            state.redis_password_credential, what="Redis password",
        )
    store = RedisStore.open(
        state.redis_url, password=password,
        ssl_ca_file=str(loaded.resolve(state.redis_tls_ca_file)) if state.redis_tls_ca_file else None,
        prefix=state.redis_key_prefix, timeout_s=state.redis_timeout_s,
        lease_retention_s=state.lease_retention_s,
    )
    try:
        await store.ping()
    except BaseException:
        await store.aclose()
        raise
    return store


def open_store(state_dir: Path, *, lease_retention_s: float | None = None) -> StateStore:
    """Open the state store under ``state_dir`` (created 0700). Raises StateUnavailable.
    ``lease_retention_s``: how long ended leases are kept (default: 24 h)."""
    from .sqlite import LEASE_RETENTION_S, SqliteStore

    return SqliteStore.open(
        state_dir,
        lease_retention_s=LEASE_RETENTION_S if lease_retention_s is None else lease_retention_s,
    )


__all__ = [
    "APPROVAL_RETENTION_S",
    "GCRA_EPSILON_S",
    "LEASE_STATES",
    "MAX_APPROVALS_LISTED",
    "MAX_NOTICES_READ",
    "MAX_UNAUDITED_LISTED",
    "NOTICE_RETENTION_S",
    "BackendIntent",
    "CounterOp",
    "GcraResult",
    "LeaseRecord",
    "QuotaAnswer",
    "QuotaOp",
    "RateOp",
    "SessionOp",
    "StateStore",
    "StateUnavailable",
    "check_quota_ops",
    "check_rate_args",
    "check_session_args",
    "gcra",
    "open_store",
    "refused",
]
