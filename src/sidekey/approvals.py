"""Human approval: which calls are held, and the life of an approval. Pure.

No I/O and no clock: every function that depends on time takes ``now``. The daemon
persists :class:`Approval` records in the state store with a compare-and-set on
``state`` (as for leases), so two approvers racing have exactly one winner.

Rules (:func:`needs_approval`): ``requires_human_approval: true`` holds every call of
the tool; ``requires_approval_above: N`` holds a user's calls of the tool beyond the
N-th within the window (default one hour; counted with :func:`window_counter`).

Life of an approval, all in :data:`TRANSITIONS`::

    pending --approve--> approved --redeem--> redeemed
    pending --deny-----> denied
    pending --expire---> expired
    approved --expire--> expired

``pending`` and ``approved`` expire at ``expires_at`` (default 15 minutes after the
request): from then on approve/deny/redeem raise :class:`ApprovalConflict` with code
``approval_expired``, and the daemon's sweeper records the expiry with :func:`expire`.
Any other transition raises :class:`ApprovalConflict` with code ``approval_<state>``
(409). Redeeming presents the call again: server, tool, user, agent and arguments
digest must equal the approved ones, else :class:`ApprovalMismatch` (403
``approval_mismatch``; the approval stays approved for the genuine call).
"""

from __future__ import annotations

import datetime
import hmac
import re
import secrets
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import msgspec

from .config import Limits
from .encoding import iso_utc
from .policy import Denial
from .protocol import SidekeyError
from .quotas import as_utc, key_part

# The record, its states and its codec live with the stores that keep them (storage
# must not import policy); re-exported here, where callers have always found them.
from .store.records import APPROVED as APPROVED
from .store.records import DENIED as DENIED
from .store.records import EXPIRED as EXPIRED
from .store.records import MAX_APPROVAL_TTL_S as MAX_APPROVAL_TTL_S
from .store.records import PENDING as PENDING
from .store.records import REDEEMED as REDEEMED
from .store.records import STATES as STATES
from .store.records import Approval as Approval
from .store.records import ApprovalState as ApprovalState
from .store.records import decode_approval as decode_approval
from .store.records import encode_approval as encode_approval

Action = Literal["approve", "deny", "expire", "redeem"]

# The whole state machine: (state, action) -> next state. Anything else is illegal.
TRANSITIONS: Mapping[tuple[ApprovalState, Action], ApprovalState] = {
    (PENDING, "approve"): APPROVED,
    (PENDING, "deny"): DENIED,
    (PENDING, "expire"): EXPIRED,
    (APPROVED, "redeem"): REDEEMED,
    (APPROVED, "expire"): EXPIRED,
}
# States that still expire (every other state is terminal).
LIVE_STATES: frozenset[ApprovalState] = frozenset({PENDING, APPROVED})

DEFAULT_TTL_S = 15 * 60.0
DEFAULT_WINDOW_S = 3600.0
ID_PREFIX = "apr_"
APPROVAL_ID = re.compile(r"apr_[A-Za-z0-9_-]{1,64}")  # what the API accepts as an id
_ID_BYTES = 18  # 144 random bits -> 24 url-safe characters
STATUS_PENDING = 202
MAX_REASON_LEN = 512

# Why a verb fails in a given state, for the message (code: approval_<state>).
_WHY: Mapping[ApprovalState, str] = {
    PENDING: "it has not been approved yet",
    APPROVED: "it was already approved",
    DENIED: "it was denied",
    EXPIRED: "it has expired",
    REDEEMED: "it was already redeemed (an approval is good for one call)",
}


_PAST: Mapping[Action, str] = {
    "approve": "approved",
    "deny": "denied",
    "expire": "expired",
    "redeem": "redeemed",
}


class ApprovalError(SidekeyError):
    """An approval cannot be used as asked (the caller's or approver's error)."""

    status = 409
    code = "approval_conflict"


class ApprovalConflict(ApprovalError):
    """An illegal transition: ``code`` is ``approval_<current state>``."""

    status = 409


class ApprovalMismatch(ApprovalError):
    """The call presented for redemption is not the one that was approved."""

    status = 403
    code = "approval_mismatch"


def new_approval_id() -> str:
    """A fresh random approval id: ``apr_`` + 24 url-safe characters."""
    return ID_PREFIX + secrets.token_urlsafe(_ID_BYTES)


def new_approval(
    *,
    server: str,
    tool: str,
    user: str,
    agent: str | None,
    args_digest: str,
    now: datetime.datetime,
    held_for: str = "",
    ttl_s: float = DEFAULT_TTL_S,
    approval_id: str | None = None,
    arguments: dict[str, Any] | None = None,
    requested_by: str | None = None,
    requested_uid: int | None = None,
) -> Approval:
    """A pending approval for this exact call, expiring ``ttl_s`` after ``now``."""
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    now = as_utc(now)
    return Approval(
        id=approval_id if approval_id is not None else new_approval_id(),
        server=server,
        tool=tool,
        user=user,
        agent=agent,
        args_digest=args_digest,
        created_at=now,
        expires_at=now + datetime.timedelta(seconds=ttl_s),
        held_for=held_for,
        arguments=arguments,
        requested_by=requested_by,
        requested_uid=requested_uid,
    )


def is_due(approval: Approval, now: datetime.datetime) -> bool:
    """Whether ``approval`` is live and past its ``expires_at`` (the sweeper expires it)."""
    return approval.state in LIVE_STATES and as_utc(now) >= approval.expires_at


def effective_state(approval: Approval, now: datetime.datetime) -> ApprovalState:
    """The state as a reader should see it at ``now`` (``expired`` once due, even if the
    sweeper has not recorded it yet)."""
    return EXPIRED if is_due(approval, now) else approval.state


def next_state(state: ApprovalState, action: Action, *, approval_id: str = "") -> ApprovalState:
    """The state after ``action`` from ``state``; :class:`ApprovalConflict` if illegal."""
    to = TRANSITIONS.get((state, action))
    if to is None:
        what = f"approval {approval_id}" if approval_id else "the approval"
        raise ApprovalConflict(
            f"{what} cannot be {_PAST[action]}: {_WHY[state]}",
            code=f"approval_{state}",
            state=state,
        )
    return to



def _step(approval: Approval, action: Action, now: datetime.datetime) -> ApprovalState:
    # Time first: a due approval behaves as expired for every verb but "expire".
    if action != "expire" and is_due(approval, now):
        return next_state(EXPIRED, action, approval_id=approval.id)
    return next_state(approval.state, action, approval_id=approval.id)


def approve(
    approval: Approval, *, by: str, now: datetime.datetime, reason: str | None = None
) -> Approval:
    """``pending -> approved`` by approver ``by``. Raises :class:`ApprovalConflict`."""
    state = _step(approval, "approve", now)
    return msgspec.structs.replace(
        approval, state=state, decided_by=by, decided_at=as_utc(now), reason=_clip(reason)
    )


def deny(approval: Approval, *, by: str, now: datetime.datetime, reason: str) -> Approval:
    """``pending -> denied`` by approver ``by`` with ``reason``. Raises
    :class:`ApprovalConflict`."""
    state = _step(approval, "deny", now)
    return msgspec.structs.replace(
        approval, state=state, decided_by=by, decided_at=as_utc(now), reason=_clip(reason)
    )


def expire(approval: Approval, *, now: datetime.datetime) -> Approval:
    """``pending|approved -> expired`` once ``now >= expires_at``. Raises
    :class:`ApprovalConflict` for a terminal approval (code ``approval_<state>``) or
    one not yet due (code ``approval_not_due``)."""
    state = next_state(approval.state, "expire", approval_id=approval.id)
    if not is_due(approval, now):
        raise ApprovalConflict(
            f"approval {approval.id} does not expire before "
            f"{approval.expires_at.isoformat()}",
            code="approval_not_due",
        )
    return msgspec.structs.replace(approval, state=state)


def redeem(
    approval: Approval,
    *,
    server: str,
    tool: str,
    user: str,
    agent: str | None,
    args_digest: str,
    now: datetime.datetime,
    by: str | None = None,
) -> Approval:
    """``approved -> redeemed`` for exactly the approved call (``by``: the process that
    presented it, recorded as ``redeemed_by``).

    The binding is checked first, so a caller presenting someone else's id learns
    nothing about its state: any difference raises :class:`ApprovalMismatch` naming
    the fields that differ (never their values). Then state and expiry:
    :class:`ApprovalConflict` (``approval_pending``, ``approval_denied``,
    ``approval_expired``, ``approval_redeemed``).
    """
    differ = mismatched_fields(
        approval, server=server, tool=tool, user=user, agent=agent, args_digest=args_digest
    )
    if differ:
        raise ApprovalMismatch(
            f"approval {approval.id} was granted for another call "
            f"(different {', '.join(differ)}); request a new approval for this one",
            fields=list(differ),
        )
    state = _step(approval, "redeem", now)
    return msgspec.structs.replace(approval, state=state, redeemed_at=as_utc(now), redeemed_by=by)


def mismatched_fields(
    approval: Approval,
    *,
    server: str,
    tool: str,
    user: str,
    agent: str | None,
    args_digest: str,
) -> tuple[str, ...]:
    """Names of the bound fields whose presented value differs from the approval's."""
    differ: list[str] = []
    if server != approval.server:
        differ.append("server")
    if tool != approval.tool:
        differ.append("tool")
    if user != approval.user:
        differ.append("user")
    if agent != approval.agent:
        differ.append("agent")
    # Constant time: the digest is the secret-ish part of the binding.
    if not hmac.compare_digest(args_digest.encode(), approval.args_digest.encode()):
        differ.append("arguments")
    return tuple(differ)


def _clip(reason: str | None) -> str | None:
    return None if reason is None else reason[:MAX_REASON_LEN]


# --------------------------------------------------------------------------- four eyes


def user_id_key(user_id: str) -> str:
    """How user ids are compared for four eyes: NFKC, case-folded. Wider than the
    token's exact subject on purpose: a near miss (``Alice@Example.com``) refuses an
    approval another approver can give, never lets a person approve their own call."""
    return unicodedata.normalize("NFKC", user_id).casefold()


def approver_user_ids(
    *, approver_uid: int | None, approver_user: str | None,
    identities: Mapping[str, Sequence[str]],
) -> frozenset[str]:
    """The user ids (as :func:`user_id_key`) naming the *person* at an approver process:
    its unix user name, and what ``approvals.approver_identities`` lists under that
    name or under ``uid:<N>``."""
    ids: set[str] = set()
    if approver_user:
        ids.add(approver_user)
        ids.update(identities.get(approver_user, ()))
    if approver_uid is not None:
        ids.update(identities.get(f"uid:{approver_uid}", ()))
    return frozenset(user_id_key(i) for i in ids)


def self_approval(
    approval: Approval, *, approver_uid: int | None, approver_user: str | None,
    identities: Mapping[str, Sequence[str]], owner: bool,
) -> str | None:
    """Why this approver may not approve ``approval`` (four eyes), or None.

    Two rules. *Same account*: the approver's uid must not be the uid of the process
    that requested the call, nor the local user id sidekey gave the call
    (``local:<name>`` / ``uid:<N>``, :func:`sidekey.policy.local_user`: the requesting
    process's own account, for ``oauth2: none`` servers). The owner is excepted here:
    it could rewrite the policy anyway, and a one-account host (the quickstart) runs
    its servers as the owner. *Same person*: the user the call is made for must not be
    among :func:`approver_user_ids` (the approver's user name and mapped ids), with no
    owner exception: an owner mapped to that person must change the mapping first,
    which a reload records in audit, instead of approving quietly. Only approving is
    refused: a denial by the requester or the subject cannot make a call run.
    """
    user = user_id_key(approval.user)
    if not owner:
        if approval.requested_uid is not None and approver_uid == approval.requested_uid:
            return (f"approval {approval.id} was requested by a process of uid "
                    f"{approval.requested_uid}; another uid must approve it")
        own = {f"uid:{approver_uid}"} | ({f"local:{approver_user}"} if approver_user else set())
        if user in {user_id_key(i) for i in own}:
            return (f'approval {approval.id} is for "{approval.user}", this approver\'s own '
                    "account; another uid must approve it")
    if user in approver_user_ids(approver_uid=approver_uid, approver_user=approver_user,
                                 identities=identities):
        who = approver_user or f"uid:{approver_uid}"
        return (f'approval {approval.id} is for user "{approval.user}", and the approver '
                f"{who} (uid {approver_uid}) is known as that user; another person must "
                "approve it")
    return None


# --------------------------------------------------------------------------- rules


def needs_approval(
    limits: Limits, tool: str, *, calls_in_window: int, window_s: float = DEFAULT_WINDOW_S
) -> str | None:
    """Why this call must wait for a human, or None.

    ``calls_in_window`` is the user's number of calls of ``tool`` in the current
    window *including this one* (what ``counter_incr`` on :func:`window_counter`'s key
    returns). ``requires_human_approval: true`` holds every call;
    ``requires_approval_above: N`` holds call N+1 onwards (``0`` holds every call).
    """
    tool_limits = limits.per_tool.get(tool)
    if tool_limits is None:
        return None
    if tool_limits.requires_human_approval:
        return f'tool "{tool}" requires human approval for every call (requires_human_approval)'
    above = tool_limits.requires_approval_above
    if above is not None and calls_in_window > above:
        return (
            f'call {calls_in_window} of tool "{tool}" within {window_s:g} s is beyond '
            f"requires_approval_above ({above})"
        )
    return None


def has_rule(limits: Limits, tool: str) -> bool:
    """Whether ``tool`` has any approval rule (else the approval step has nothing to do)."""
    tool_limits = limits.per_tool.get(tool)
    return tool_limits is not None and (
        tool_limits.requires_human_approval or tool_limits.requires_approval_above is not None
    )


def counts_calls(limits: Limits, tool: str) -> bool:
    """Whether the daemon needs a window count for ``tool`` (only for
    ``requires_approval_above`` without ``requires_human_approval``)."""
    tool_limits = limits.per_tool.get(tool)
    return (
        tool_limits is not None
        and not tool_limits.requires_human_approval
        and tool_limits.requires_approval_above is not None
    )


def window_counter(
    user: str, tool: str, *, now: datetime.datetime, window_s: float = DEFAULT_WINDOW_S
) -> tuple[str, datetime.datetime]:
    """The store key and expiry of the user's per-tool call counter for the window
    holding ``now``: windows are aligned to the epoch (``floor(now / window_s)``), so
    every host agrees on them. Use ``counter_incr(key, expires_at=...)``."""
    if window_s <= 0:
        raise ValueError("window_s must be positive")
    t = as_utc(now).timestamp()
    index = int(t // window_s)
    end = datetime.datetime.fromtimestamp((index + 1) * window_s, tz=datetime.UTC)
    return f"approvals:{key_part(user)}:{key_part(tool)}:{index}", end


def pending_denial(approval: Approval) -> Denial:
    """The decision-chain verdict holding the call: 202 ``pending_approval``."""
    why = f" ({approval.held_for})" if approval.held_for else ""
    return Denial(
        code="pending_approval",
        message=(
            f"the call is held for human approval{why}: approval_id {approval.id}, "
            f"expires {iso_utc(approval.expires_at, 'auto')}"
        ),
        status=STATUS_PENDING,
        outcome="pending_approval",
    )
