"""What sidekey.mcp needs from the MCP Python SDK, for its current major (2.x,
``MCPServer``) and the previous one (1.x, ``FastMCP``), in one place."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Mapping
from typing import Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.types import CallToolResult as CallToolResult

# The class a tool parameter is annotated with for the SDK to inject its Context.
CONTEXT_CLASS: type[Any]
try:  # 2.x
    from mcp.server.mcpserver import Context as _Context2

    CONTEXT_CLASS = _Context2
    SDK_MAJOR = 2
except ImportError:  # 1.x: mcp.server.fastmcp (2.x makes that import fail on purpose)
    CONTEXT_CLASS = importlib.import_module("mcp.server.fastmcp").Context
    SDK_MAJOR = 1


def access_token() -> Any:
    """The SDK's verified bearer token for this request (``AccessToken``) or None."""
    return get_access_token()


def _request_context(ctx: Any) -> Any:
    if ctx is None:
        return None
    try:
        return ctx.request_context
    except (ValueError, AttributeError):  # outside a request
        return None


def request_headers(ctx: Any) -> Mapping[str, str] | None:
    """The HTTP request's headers (streamable HTTP / SSE); None on stdio and in-process."""
    request = getattr(_request_context(ctx), "request", None)
    headers = getattr(request, "headers", None)
    return headers if isinstance(headers, Mapping) else None


def session_end_hook(ctx: Any, mcp_session_id: str | None) -> tuple[contextlib.AsyncExitStack, dict[str, Any]] | None:
    """2.x: (exit stack, scratch state) of the SDK connection serving this request, when
    that connection's close is the end of the request's MCP session; else None.

    The SDK unwinds ``Connection.exit_stack`` (shielded, bounded to 5 s) whenever a
    connection closes: a streamable-HTTP session's when the client DELETEs its
    ``Mcp-Session-Id``, when it idles out or when the server shuts down; a stdio or
    in-process connection's when the client goes away. That is the end of the session
    when the connection *is* the session: its ``session_id`` is the request's
    ``Mcp-Session-Id``, or (``mcp_session_id`` None: the per-process session) it is a
    long-lived handshake-era connection of its own (stdio). Stateless HTTP and
    2026-07-28 single-exchange connections close after every request: None, as on 1.x
    (no such connection object). The connection is reached through the request's
    ``ServerSession`` (2.x keeps it there, unexported): if a later SDK moves it, this
    answers None and sessions end by idling out, as before.
    """
    session = getattr(_request_context(ctx), "session", None)
    conn = getattr(session, "_connection", None)
    stack = getattr(conn, "exit_stack", None)
    state = getattr(conn, "state", None)
    if not isinstance(stack, contextlib.AsyncExitStack) or not isinstance(state, dict):
        return None
    conn_sid = getattr(conn, "session_id", None)
    if mcp_session_id is not None:
        return (stack, state) if conn_sid == mcp_session_id else None
    try:
        from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
    except ImportError:
        return None
    long_lived = (conn_sid is None and getattr(conn, "has_standalone_channel", False) is True
                  and getattr(conn, "protocol_version", None) in HANDSHAKE_PROTOCOL_VERSIONS)
    return (stack, state) if long_lived else None


def raw_call_params(ctx: Any) -> tuple[str, dict[str, Any]] | None:
    """(tool name, arguments) of the ``tools/call`` request exactly as the client sent
    them, before the SDK validated them and filled in defaults; None where the SDK does
    not keep them (1.x)."""
    params = getattr(_request_context(ctx), "params", None)
    if not isinstance(params, Mapping):
        return None
    name = params.get("name")
    arguments = params.get("arguments")
    if arguments is None:
        arguments = {}
    if not isinstance(name, str) or not isinstance(arguments, Mapping):
        return None
    return name, dict(arguments)


def supports_elicitation(ctx: Any) -> bool:
    """Whether the client declared the elicitation capability (form mode)."""
    caps = None
    with contextlib.suppress(ValueError, AttributeError):
        caps = ctx.client_capabilities  # 2.x
    if caps is None:  # 1.x: the session's initialize params
        session = getattr(_request_context(ctx), "session", None)
        caps = getattr(getattr(session, "client_params", None), "capabilities", None)
    return getattr(caps, "elicitation", None) is not None


# The key of the wait-for-approval question in a 2026-07-28 InputRequiredResult.
WAIT_INPUT_KEY = "sidekey_wait_for_approval"
WAIT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"wait": {"type": "boolean", "default": True,
                            "description": "Wait here for an approver's decision"}},
}


def no_back_channel(exc: BaseException) -> bool:
    """The 2026-07-28 protocol has no server-to-client requests: ``ctx.elicit`` fails
    with this and the question goes into an ``InputRequiredResult`` instead."""
    return type(exc).__name__ == "NoBackChannelError"


def input_required(message: str, approval_id: str) -> Any:
    """An ``InputRequiredResult`` (2.x, protocol 2026-07-28) asking whether to wait for
    the approver; the approval id rides in ``request_state``, which the SDK seals and
    verifies (the client cannot change it)."""
    from mcp.types import InputRequiredResult  # 2.x only

    return InputRequiredResult.model_validate({
        "inputRequests": {WAIT_INPUT_KEY: {
            "method": "elicitation/create",
            "params": {"mode": "form", "message": message, "requestedSchema": WAIT_SCHEMA},
        }},
        "requestState": approval_id,
    })


def resumed_approval(ctx: Any) -> tuple[str, bool] | None:
    """On the retry after :func:`input_required`: (approval id, whether to wait)."""
    state = getattr(ctx, "request_state", None)
    responses = getattr(ctx, "input_responses", None)
    if not isinstance(state, str) or not state.startswith("apr_") or not responses:
        return None
    answer = responses.get(WAIT_INPUT_KEY)
    content = getattr(answer, "content", None) or {}
    wait = getattr(answer, "action", None) == "accept" and content.get("wait", True) is True
    return state, wait


def registered_tool(ctx: Any, fn: Any) -> tuple[str | None, bool]:
    """1.x: (the name ``fn`` is registered under, whether it has an output schema), by
    looking ``fn`` up in the server's tools (1.x keeps the request's tool name nowhere a
    tool can read it). (None, False) when not found."""
    try:
        tools = ctx.fastmcp._tool_manager.list_tools()
    except Exception:
        return None, False
    for tool in tools:
        if getattr(tool, "fn", None) is fn:
            return str(tool.name), getattr(tool, "output_schema", None) is not None
    return None, False


class RefusalError(Exception):
    """1.x, a tool with an output schema: the SDK validates even an error result's
    ``structuredContent`` against it, so the refusal is raised instead (the SDK turns it
    into ``isError`` with the text, without the structured fields)."""


def tool_error(text: str, structured: dict[str, Any] | None) -> CallToolResult:
    """A tool result with ``isError: true`` (built by alias: valid for both majors)."""
    return CallToolResult.model_validate({
        "content": [{"type": "text", "text": text}],
        "structuredContent": structured,
        "isError": True,
    })
