"""Approval records as the state stores keep them: the :class:`Approval` record, its
states and its JSON codec. Shapes only, no policy: which transitions are legal, how a
call is bound to its approval and when it expires are :mod:`sidekey.approvals`' (which
re-exports these names).
"""

from __future__ import annotations

import datetime
from typing import Any, Literal

import msgspec

ApprovalState = Literal["pending", "approved", "denied", "expired", "redeemed"]

PENDING: ApprovalState = "pending"
APPROVED: ApprovalState = "approved"
DENIED: ApprovalState = "denied"
EXPIRED: ApprovalState = "expired"
REDEEMED: ApprovalState = "redeemed"

STATES: frozenset[ApprovalState] = frozenset({PENDING, APPROVED, DENIED, EXPIRED, REDEEMED})

MAX_APPROVAL_TTL_S = 24 * 3600.0  # the longest approvals.ttl_seconds a config may set


class Approval(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One held call and its fate. Times are UTC; ``args_digest`` binds the arguments."""

    id: str
    server: str
    tool: str
    user: str
    agent: str | None
    args_digest: str
    state: ApprovalState = PENDING
    created_at: datetime.datetime
    expires_at: datetime.datetime
    held_for: str = ""  # the rule that held the call (needs_approval's reason)
    decided_by: str | None = None  # approver identity (approve/deny)
    decided_at: datetime.datetime | None = None
    reason: str | None = None  # the approver's reason (required to deny)
    redeemed_at: datetime.datetime | None = None
    # The MCP server process that presented the approved call (approvals list shows it
    # apart from the approver in decided_by). None on records written before it existed.
    redeemed_by: str | None = None
    # The call's arguments for the approvers to read, with values under sensitive keys
    # redacted (as in audit); None if they were too large to keep.
    arguments: dict[str, Any] | None = None
    requested_by: str | None = None  # the MCP server process that asked (for approvers)
    requested_uid: int | None = None  # its uid: that uid cannot approve the call itself


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Approval)


def encode_approval(approval: Approval) -> str:
    """The approval as JSON text (what the state stores keep)."""
    return _encoder.encode(approval).decode()


def decode_approval(data: str | bytes) -> Approval:
    """The inverse of :func:`encode_approval`."""
    return _decoder.decode(data)
