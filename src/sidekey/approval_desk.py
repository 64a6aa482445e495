"""Human approval at run time: holding calls, the approvers' verbs, long-polls, expiry
and the webhook.

The rules and the state machine are pure (:mod:`sidekey.approvals`); this module is
their I/O around the state store. Every state change is a compare-and-set in the store
(:meth:`~sidekey.store.StateStore.transition_approval`), so two approvers, or an
approver and the expiry sweeper, on one host or on several sharing Redis, have
exactly one winner, and only the winner writes the audit event
(``approval.requested / approved / denied / expired``). An approver's verdict and a
request are durable in audit before the answer is sent.

Waiters (``GET /v1/approvals/{id}/wait``) wake at once for a change made on this host
and within :data:`POLL_S` for one made on another host.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import msgspec
import trio

from . import approvals
from .approvals import Approval, ApprovalConflict, ApprovalError
from .audit import AuditLog
from .audit.events import redact
from .config import Config
from .encoding import iso_utc
from .protocol import BadRequest, Denied, NotFound, SidekeyError, TooManyRequests
from .store import CounterOp, StateStore

log = logging.getLogger(__name__)

# A waiter re-reads the store at least this often (changes made on another host).
POLL_S = 1.0
# The sweeper looks for due approvals this often.
SWEEP_S = 5.0
# Argument values kept for approvers to read: above this (JSON bytes) only the digest.
MAX_SHOWN_ARGUMENTS_BYTES = 16 * 1024
# Webhook notices waiting to be sent; more are dropped (and logged).
WEBHOOK_QUEUE = 256

EventBuilder = Callable[..., dict[str, Any]]


class ApprovalUnknown(NotFound):
    code = "approval_not_found"


class HeldCall(msgspec.Struct, frozen=True, kw_only=True):
    """The facts of a call that may be held (authorize's view)."""

    server: str
    tool: str
    user: str
    agent: str | None
    session_id: str | None
    args_digest: str
    arguments: dict[str, Any]
    peer: dict[str, Any]
    request_id: str
    policy: dict[str, Any]
    peer_user: str | None = None


def _dt(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC)


def approver_name(peer: Mapping[str, Any], user: str | None) -> str:
    """How an approver (or a requesting MCP server) is named in the approval and in
    audit: the local user (else its systemd unit), uid and pid the kernel reported for
    the process (never a claim it made)."""
    who = user or peer.get("unit") or f"uid {peer.get('uid')}"
    return f"{who} (uid {peer.get('uid')}, pid {peer.get('pid')})"


def wire(approval: Approval, now: float) -> dict[str, Any]:
    """An approval as the HTTP API shows it: its effective state at ``now``."""
    shown = msgspec.structs.replace(approval, state=approvals.effective_state(approval, _dt(now)))
    out: dict[str, Any] = msgspec.to_builtins(shown)
    return out


class ApprovalDesk:
    """Holds calls, takes the approvers' verdicts, wakes waiters, expires what is due."""

    def __init__(
        self,
        *,
        store: StateStore,
        audit: AuditLog,
        event: EventBuilder,
        config: Callable[[], Config],
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.audit = audit
        self._event = event
        self._config = config
        self._clock = clock
        self._changed = trio.Event()
        self.waiting = 0  # long-polls in progress (not "calls in flight" for load shedding)
        self.stopping = False
        self._send, self._receive = trio.open_memory_channel[dict[str, Any]](WEBHOOK_QUEUE)

    # ------------------------------------------------------------------ authorize

    def window_op(self, user: str, tool: str, now: float) -> CounterOp | None:
        """The store op counting this call in the user's ``requires_approval_above``
        window, for the daemon to run with the call's quota checks (one round trip), or
        None when the tool has no such rule."""
        cfg = self._config()
        if not approvals.counts_calls(cfg.limits, tool):
            return None
        key, end = approvals.window_counter(user, tool, now=_dt(now),
                                            window_s=cfg.approvals.window_seconds)
        return CounterOp(key, end.timestamp())

    async def check(
        self, call: HeldCall, *, approval_id: str | None, now: float,
        calls_in_window: int | None = None,
    ) -> tuple[str | None, Approval | None]:
        """The approval step of authorize, after the policy chain and quotas.

        ``calls_in_window``: the result of :meth:`window_op` if the daemon ran it with
        the quota checks; else it is counted here.

        Returns ``(rule, held)``: the rule matched (None when the tool has no approval
        rule) and, if the call is held, its new pending approval (already stored and
        audited). With ``approval_id`` the call presents an approval: it must be
        approved, unexpired and bound to exactly this call; it is redeemed (once).
        Raises :class:`SidekeyError` (approval_mismatch, approval_pending, ...,
        rate_limited) for authorize to record as the call's denial.
        """
        cfg = self._config()
        if approval_id is not None:
            return await self._redeem(call, approval_id, now), None
        limits = cfg.limits
        window_s = cfg.approvals.window_seconds
        count = 0 if calls_in_window is None else calls_in_window
        op = self.window_op(call.user, call.tool, now) if calls_in_window is None else None
        if op is not None:
            count = await self.store.counter_incr(op.key, expires_at=op.expires_at)
        why = approvals.needs_approval(limits, call.tool, calls_in_window=count, window_s=window_s)
        tool_limits = limits.per_tool.get(call.tool)
        if why is None:
            if tool_limits is not None and tool_limits.requires_approval_above is not None:
                return f"approval.within:{count}/{tool_limits.requires_approval_above}", None
            return None, None
        await self._check_pending_cap(call.user, now)
        held = approvals.new_approval(
            server=call.server, tool=call.tool, user=call.user, agent=call.agent,
            args_digest=call.args_digest, now=_dt(now), held_for=why,
            ttl_s=cfg.approvals.ttl_seconds, arguments=self._shown(call.arguments, cfg, call.tool),
            requested_by=approver_name(call.peer, call.peer_user),
            requested_uid=call.peer.get("uid"),
        )
        await self.store.put_approval(held)
        await self.audit.emit(self._event(
            "approval.requested", server=call.server, tool=call.tool, user_id=call.user,
            agent_id=call.agent, session_id=call.session_id, arguments=call.arguments,
            policy={**call.policy, "decision": "pending_approval", "code": "pending_approval"},
            peer=call.peer, request_id=call.request_id,
            extra={"approval_id": held.id, "held_for": why, "args_digest": call.args_digest,
                   "approval_expires_at": _iso(held.expires_at)},
        ))
        self._notify(held)
        return "approval.required", held

    async def _redeem(self, call: HeldCall, approval_id: str, now: float) -> str:
        stored = await self.store.get_approval(approval_id)
        if stored is None:
            raise ApprovalUnknown(f"no approval {approval_id} (unknown, or purged long after it expired)")
        redeemed = approvals.redeem(
            stored, server=call.server, tool=call.tool, user=call.user, agent=call.agent,
            args_digest=call.args_digest, now=_dt(now), by=approver_name(call.peer, call.peer_user),
        )
        if not await self.store.transition_approval(redeemed, from_state=approvals.APPROVED):
            # Someone redeemed or expired it between our read and our write.
            again = await self.store.get_approval(approval_id)
            state = again.state if again is not None else approvals.EXPIRED
            approvals.next_state(state, "redeem", approval_id=approval_id)  # raises
            raise ApprovalConflict(f"approval {approval_id} changed meanwhile", code="approval_conflict")
        self._wake()
        return f"approval.granted:{approval_id}:{stored.decided_by}"

    async def _check_pending_cap(self, user: str, now: float) -> None:
        cap = self._config().approvals.max_pending_per_user
        pending = await self.store.list_approvals([approvals.PENDING])
        mine = sum(1 for a in pending if a.user == user and not approvals.is_due(a, _dt(now)))
        if mine >= cap:
            raise TooManyRequests(
                f"user {user} already has {mine} calls waiting for approval "
                f"(approvals.max_pending_per_user = {cap}); wait for a verdict",
                code="rate_limited", limit="approvals.max_pending_per_user", retry_after_s=60.0,
            )

    @staticmethod
    def _shown(arguments: dict[str, Any], cfg: Config, tool: str) -> dict[str, Any] | None:
        shown = redact(arguments, cfg.audit.redact_keys, cfg.audit.redact_tool_fields.get(tool, ()))
        if len(msgspec.json.encode(shown)) > MAX_SHOWN_ARGUMENTS_BYTES:
            return None
        return shown

    # ------------------------------------------------------------------ approvers

    async def list(self, states: list[str] | None, *, limit: int) -> list[Approval]:
        """Approvals by effective state (a due one counts as expired), oldest first."""
        now = _dt(self._clock())
        stored_states: list[str] | None = None
        if states is not None:
            stored_states = list(states)
            if approvals.EXPIRED in states:  # due but not yet swept ones are expired too
                stored_states += [approvals.PENDING, approvals.APPROVED]
        found = await self.store.list_approvals(stored_states, limit=limit)
        return [a for a in found if states is None or approvals.effective_state(a, now) in states]

    async def decide(
        self, approval_id: str, *, verdict: str, reason: str | None, peer: dict[str, Any],
        peer_user: str | None, request_id: str, owner: bool = False,
    ) -> Approval:
        """Approve or deny a pending approval (``verdict`` is ``approve`` or ``deny``).

        Four eyes (:func:`sidekey.approvals.self_approval`): neither a process running as
        the uid that requested the call (the owner excepted) nor an approver known as
        the user the call is made for (its own user name, or
        ``approvals.approver_identities``; no owner exception) may approve it; either
        may deny it. Raises ApprovalUnknown, ApprovalConflict (approval_<state>),
        Denied (approval_self_approval; the daemon audits it as request.rejected)."""
        stored = await self._get(approval_id)
        if verdict == "approve":
            uid = peer.get("uid")
            why = approvals.self_approval(
                stored, approver_uid=uid if isinstance(uid, int) else None,
                approver_user=peer_user,
                identities=self._config().approvals.approver_identities, owner=owner,
            )
            if why is not None:
                raise Denied(why, code="approval_self_approval")
        now = self._clock()
        if approvals.is_due(stored, _dt(now)):
            await self._expire(stored, now)
            stored = await self._get(approval_id)
        by = approver_name(peer, peer_user)
        if verdict == "approve":
            new = approvals.approve(stored, by=by, now=_dt(now), reason=reason)
        else:
            if not reason:
                raise BadRequest("a denial needs a reason (--reason)", code="reason_required")
            new = approvals.deny(stored, by=by, now=_dt(now), reason=reason)
        if not await self.store.transition_approval(new, from_state=stored.state):
            again = await self._get(approval_id)
            approvals.next_state(again.state, "approve" if verdict == "approve" else "deny",
                                 approval_id=approval_id)  # raises: it was decided meanwhile
            raise ApprovalConflict(f"approval {approval_id} changed meanwhile", code="approval_conflict")
        await self.audit.emit(self._event(
            f"approval.{new.state}", server=new.server, tool=new.tool, user_id=new.user,
            agent_id=new.agent, peer=peer, request_id=request_id,
            extra={"approval_id": new.id, "decided_by": by, "reason": new.reason,
                   "held_for": new.held_for, "args_digest": new.args_digest},
        ))
        self._wake()
        return new

    async def wait(self, approval_id: str, *, timeout_s: float) -> tuple[Approval, bool]:
        """Wait until the approval leaves ``pending`` or ``timeout_s`` passes (capped by
        ``approvals.max_wait_seconds``). Returns (approval as stored with its effective
        state, whether it is still pending)."""
        timeout_s = max(0.0, min(timeout_s, self._config().approvals.max_wait_seconds))
        deadline = trio.current_time() + timeout_s
        self.waiting += 1
        try:
            while True:
                changed = self._changed
                approval = await self._get(approval_id)
                now = self._clock()
                state = approvals.effective_state(approval, _dt(now))
                if state != approvals.PENDING or trio.current_time() >= deadline or self.stopping:
                    return approval, state == approvals.PENDING
                until = min(deadline, trio.current_time() + POLL_S,
                            trio.current_time() + max(0.0, approval.expires_at.timestamp() - now))
                with trio.move_on_at(until):
                    await changed.wait()
        finally:
            self.waiting -= 1

    async def _get(self, approval_id: str) -> Approval:
        found: Approval | None = await self.store.get_approval(approval_id)
        if found is None:
            raise ApprovalUnknown(f"no approval {approval_id}")
        return found

    # ------------------------------------------------------------------ expiry

    async def _expire(self, approval: Approval, now: float) -> bool:
        try:
            gone = approvals.expire(approval, now=_dt(now))
        except ApprovalError:
            return False
        if not await self.store.transition_approval(gone, from_state=approval.state):
            return False  # another host (or a verdict) got there first
        await self.audit.emit(self._event(
            "approval.expired", server=gone.server, tool=gone.tool, user_id=gone.user,
            agent_id=gone.agent,
            extra={"approval_id": gone.id, "was": approval.state, "held_for": gone.held_for,
                   "args_digest": gone.args_digest, "expired_at": _iso(gone.expires_at)},
        ))
        self._wake()
        return True

    async def sweep(self) -> int:
        """Expire every due approval (audited once, by whichever host wins). Returns how many."""
        now = self._clock()
        live = await self.store.list_approvals(sorted(approvals.LIVE_STATES))
        count = 0
        for approval in live:
            if approvals.is_due(approval, _dt(now)) and await self._expire(approval, now):
                count += 1
        return count

    async def run_sweeper(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.sweep()
            except SidekeyError as exc:  # store or audit down: try again next round
                log.warning("approval expiry sweep failed: %s", exc.code)
            await trio.sleep(SWEEP_S)

    # ------------------------------------------------------------------ waking, webhook

    def _wake(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def stop(self) -> None:
        """Answer every waiter now (the daemon is stopping)."""
        self.stopping = True
        self._wake()

    def _notify(self, approval: Approval) -> None:
        if self._config().approvals.webhook_url is None:
            return
        notice = {
            "type": "approval.requested",
            "approval_id": approval.id,
            "server": approval.server,
            "tool": approval.tool,
            "user": approval.user,
            "agent": approval.agent,
            "held_for": approval.held_for,
            "args_digest": approval.args_digest,
            "created_at": _iso(approval.created_at),
            "expires_at": _iso(approval.expires_at),
        }
        try:
            self._send.send_nowait(notice)
        except trio.WouldBlock:
            log.warning("approvals webhook: queue full, notice for %s dropped", approval.id)

    async def run_webhook(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """POST each new request's notice to ``approvals.webhook_url`` (no redirects,
        bounded by ``webhook_timeout_s``; a failure is logged and the notice dropped:
        the approval itself is still listed for approvers)."""
        task_status.started()
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as http:
            async for notice in self._receive:
                cfg = self._config().approvals
                if cfg.webhook_url is None:
                    continue
                try:
                    # Only the status matters: the answer's body is never read (no cap needed).
                    with trio.fail_after(cfg.webhook_timeout_s):
                        async with http.stream("POST", cfg.webhook_url, json=notice,
                                               timeout=cfg.webhook_timeout_s) as resp:
                            status = resp.status_code
                    if status >= 300:
                        log.warning("approvals webhook answered HTTP %d for %s",
                                    status, notice["approval_id"])
                except (httpx.HTTPError, trio.TooSlowError) as exc:
                    log.warning("approvals webhook failed for %s: %s",
                                notice["approval_id"], type(exc).__name__)


def _iso(when: datetime.datetime) -> str:
    return iso_utc(when, "auto")


def parse_timeout(query: str, default: float) -> float:
    """``timeout=S`` from a query string (seconds, finite, >= 0); BadRequest otherwise."""
    from urllib.parse import parse_qs

    values = parse_qs(query, keep_blank_values=True).get("timeout")
    if not values:
        return default
    try:
        value = float(values[-1])
    except ValueError:
        raise BadRequest("timeout must be a number of seconds", code="invalid_request") from None
    if not math.isfinite(value) or value < 0:
        raise BadRequest("timeout must be a number of seconds >= 0", code="invalid_request")
    return value
