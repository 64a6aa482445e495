"""Sidekey refusals as MCP tool errors.

Every refusal is a tool result with ``isError: true`` (not a JSON-RPC error, which a
host does not show the model): one sentence the model can act on, and
``structuredContent`` with the stable fields a program acts on::

    {"code": "rate_limited", "retry_after_s": 12, "approval_id": null,
     "request_id": "req_..."}

The text carries no internals: no socket path, no stack, no peer attestation detail,
never a token; the daemon's own message only for refusals about the call itself
(policy, bad arguments, an approval's state), which the daemon writes for callers.
"""

from __future__ import annotations

import math
from typing import Any

from ..client import (
    AccessDenied,
    ApprovalPending,
    BadRequestError,
    ConflictError,
    RateLimited,
    RequestTooLarge,
    SidekeyClientError,
    TokenRejected,
)
from ._sdk import tool_error

# The tool argument a held call is retried with (kept in step with governed.APPROVAL_ARG).
APPROVAL_ARG = "sidekey_approval_id"
MAX_MESSAGE_CHARS = 300
WITHHELD_CODE = "result_withheld"


def _daemon_message(exc: SidekeyClientError) -> str:
    text = " ".join(str(exc.message).split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


def refusal_text(exc: SidekeyClientError, tool: str) -> str:
    """The sentence for the model: what happened and what it can do about it."""
    code = exc.code
    if isinstance(exc, ApprovalPending):
        return (f"held for human approval: approval id {exc.approval_id}; retry this call "
                f"with the same arguments and {APPROVAL_ARG}=\"{exc.approval_id}\" once an "
                "approver has approved it")
    if isinstance(exc, RateLimited):
        if exc.retry_after_s is not None:
            return f"rate limited: retry in {_seconds(exc.retry_after_s)} s ({code})"
        return f"rate limited: retry later ({code})"
    if isinstance(exc, TokenRejected):
        return (f"not authorized: the user's credentials were refused ({code}); the user "
                "may need to sign in again")
    if isinstance(exc, AccessDenied):
        if code.startswith("peer_"):
            # About how the server is deployed, not about the call: nothing to show.
            return f"{tool} is not available: this server may not use its credentials ({code})"
        return f"denied ({code}): {_daemon_message(exc)}; do not retry this call unchanged"
    if isinstance(exc, RequestTooLarge):
        return f"refused: the arguments are too large ({code})"
    if isinstance(exc, BadRequestError | ConflictError):
        return f"refused ({code}): {_daemon_message(exc)}"
    # 503, connection, timeout, protocol, daemon identity, anything else: the
    # credential service, not the call. Its message may name local paths: not shown.
    return f"{tool} is temporarily unavailable: credential service error ({code}); retry later"


def refusal_result(exc: SidekeyClientError, *, tool: str) -> Any:
    """The ``isError`` tool result for a sidekey refusal."""
    retry_after: float | None = None
    if isinstance(exc, RateLimited):
        retry_after = exc.retry_after_s
    else:
        hinted = exc.details.get("retry_after_s")
        if isinstance(hinted, int | float) and not isinstance(hinted, bool) and hinted >= 0:
            retry_after = float(hinted)
    structured: dict[str, Any] = {
        "code": exc.code,
        "retry_after_s": _seconds(retry_after) if retry_after is not None else None,
        "approval_id": exc.approval_id if isinstance(exc, ApprovalPending) else None,
        "request_id": exc.request_id,
    }
    if isinstance(exc, ApprovalPending) and exc.expires_at:
        structured["approval_expires_at"] = exc.expires_at
    return tool_error(refusal_text(exc, tool), structured)


def withheld_result(*, tool: str, size: int | None) -> Any:
    """The tool ran, but the daemon says its result must not reach the agent
    (``max_result_size_kb``): the result is replaced by this error."""
    text = (f"the result of {tool} was withheld by policy: it is larger than this tool may "
            "return; narrow the request (fewer items, a filter) and call again")
    return tool_error(text, {"code": WITHHELD_CODE, "retry_after_s": None, "approval_id": None,
                             "request_id": None, "result_size_bytes": size})
