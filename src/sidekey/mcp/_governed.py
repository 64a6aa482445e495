"""``@governed``: one decorator between ``@mcp.tool()`` and a tool function.

Each call of the tool becomes ``AsyncClient.tool_call`` against the sidekey daemon
(authorize + redeem in one request, run, release)::

    mcp = MCPServer("content-api")                     # mcp 2.x (or FastMCP in 1.x)

    @mcp.tool()
    @governed("content-api")
    async def list_articles(query: str) -> str:
        token = current_lease().secrets["cms_token"]
        ...

Who is calling (never asserted by the tool's caller):

- **user token**: the bearer token the SDK's auth verified
  (``mcp.server.auth.middleware.auth_context.get_access_token()``), else the
  ``user_token`` callable given to :class:`Governor` (e.g. a stdio server's token from
  its environment), else none (the daemon then decides: a server with ``oauth2`` refuses).
- **agent id**: the first of ``agent_claims`` (default ``azp``, then ``client_id``) in the
  verified token: the OAuth client the token was issued to, not a name the client picks.
  Else, when ``agent_header`` is set (e.g. a gateway in front of the server names the
  agent in ``X-Agent-Id``), that HTTP header; the daemon's ``policy.agent_claims`` then
  binds it to the token, so a header naming another agent than the token's is refused
  (``agent_mismatch``). Without a token, the operator's fixed ``agent_id``. Never a tool
  argument.
- **session id**: the ``Mcp-Session-Id`` header (streamable HTTP with sessions). Without
  one (stateless HTTP): ``tok-`` + a hash of the token's issuer, subject, client and
  ``jti`` (or of the token itself when it has no ``jti``): one session per access token,
  which ``concurrent_sessions`` counts until it has been idle ``session_idle_seconds``.
  Without a token either (stdio, in-process): ``proc-`` + a random id per server process,
  since one stdio process serves exactly one client connection.

When a session ends, it stops counting against ``concurrent_sessions`` at once
(``POST /v1/sessions/end``, with the user token of the session's last governed call),
not after ``session_idle_seconds``: on SDK 2.x the first governed call of a connection
pushes the end onto the SDK's per-connection exit stack, which the SDK unwinds when a
streamable-HTTP session is closed (the client's DELETE of its ``Mcp-Session-Id``, the
SDK's idle timeout, shutdown) and when a handshake-era stdio connection ends. The
``proc-`` session (stdio) is also ended when the process exits (``atexit``, with the
synchronous client, bounded to :data:`EXIT_TIMEOUT_S`): that covers the 2026-07-28
protocol (no per-connection object) and SDK 1.x. Where neither applies (a 1.x
streamable-HTTP session; a process killed by a signal) the session stops counting once
idle; :func:`end_session` ends one explicitly (e.g. from the server's lifespan).
``tok-`` sessions (stateless HTTP) are not ended: nothing marks their end; they stop
counting once idle for ``session_idle_seconds``.

The arguments sent to the daemon (and digested there, once, for authorize and redeem
alike) are the raw ``arguments`` of the ``tools/call`` request when the SDK exposes them
(2.x: before validation, so neither defaults filled in by the SDK nor pydantic coercion
change them), else (1.x) the validated arguments as JSON (``model_dump(mode="json")``
for pydantic models). The reserved argument ``sidekey_approval_id`` is never part of
them.

A refusal is a tool result with ``isError: true``: a sentence a model can act on and
``structuredContent`` ``{"sidekey": {"code", "retry_after_s", "approval_id", ...}}``
(see :mod:`sidekey.mcp.errors`). A call held for approval can be retried with the
approval id in the tool argument ``sidekey_approval_id`` (added, optional, to every
governed tool's input schema, so a model can send it).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import hashlib
import inspect
import logging
import math
import os
import secrets
import typing
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, TypeVar

import anyio
import pydantic
import pydantic_core

from ..client import ApprovalPending, AsyncClient, Client, Lease, SessionEnd, SidekeyClientError
from . import errors
from ._sdk import (
    CONTEXT_CLASS,
    SDK_MAJOR,
    CallToolResult,
    RefusalError,
    access_token,
    input_required,
    no_back_channel,
    raw_call_params,
    registered_tool,
    request_headers,
    resumed_approval,
    session_end_hook,
    supports_elicitation,
)

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("sidekey.mcp")

# Where a connection's governed sessions are kept (the SDK connection's scratch state):
# server -> the user token of the session's last governed call for it.
_SESSIONS_KEY = "sidekey.sessions"
# The most a process exit waits for the daemon to end its proc- session.
EXIT_TIMEOUT_S = 2.0

# The tool argument a held call is retried with. Not underscored: the 1.x SDK refuses
# parameter names that start with "_".
APPROVAL_ARG = errors.APPROVAL_ARG
# The parameter the SDK injects its Context into when the tool declares none itself.
CONTEXT_ARG = "sidekey_ctx"

_APPROVAL_DESCRIPTION = (
    "Only when retrying a call that was held for human approval: the approval id "
    "(apr_...) from that refusal, once an approver has approved it. Leave empty otherwise."
)

# The per-process substitute session of a server without Mcp-Session-Id and without a
# token: a stdio server process serves exactly one client connection.
_PROCESS_SESSION = "proc-" + secrets.token_hex(12)

# How long a held call waits for an approver when the user agreed to wait (elicitation):
# long enough for an approver on call, short of the usual client request timeouts.
DEFAULT_APPROVAL_WAIT_S = 60.0
MAX_APPROVAL_WAIT_S = 600.0


class WaitForApproval(pydantic.BaseModel):
    """What the user is asked (elicitation) when a call is held for approval."""

    wait: bool = pydantic.Field(
        default=True, description="Wait here for an approver's decision")


_lease: contextvars.ContextVar[Lease | None] = contextvars.ContextVar("sidekey_lease", default=None)


def current_lease() -> Lease:
    """The :class:`~sidekey.client.Lease` of the governed tool call running in this task.

    Its ``secrets`` are valid only while the tool runs. Raises ``RuntimeError`` outside
    a governed tool (there is no lease to use there, by design).
    """
    lease = _lease.get()
    if lease is None:
        raise RuntimeError("current_lease() is only available inside a @governed tool call")
    return lease


class Governor:
    """How governed tools reach the daemon and whom they say is calling.

    ``client``: the :class:`AsyncClient` (default: one for ``$SIDEKEY_SOCKET`` or the
    default socket, made on first use). ``agent_claims``: token claims that name the
    agent, first present wins (``client_id`` also matches the SDK's ``AccessToken.client_id``).
    ``agent_header``: an HTTP header naming the agent, used when the token has none of
    ``agent_claims`` (pass ``agent_claims=()`` to use the header only); have the daemon
    bind it to the token (``policy.agent_claims``) unless only a trusted gateway can set it.
    ``agent_id``: the agent for calls without a verified token (stdio), set by whoever
    deploys the server. ``user_token``: a callable giving the user token for calls without
    a verified one. ``server_version``: reported to the daemon for audit.
    ``approval_wait_s``: on a call held for approval, a client that supports elicitation
    is asked whether to wait, and then the call waits at most this long for an approver's
    verdict (0: never ask; the held call is returned as a refusal at once).
    """

    def __init__(
        self,
        client: AsyncClient | None = None,
        *,
        agent_claims: Sequence[str] = ("azp", "client_id"),
        agent_id: str | None = None,
        agent_header: str | None = None,
        user_token: Callable[[], str | None] | None = None,
        server_version: str | None = None,
        approval_wait_s: float = DEFAULT_APPROVAL_WAIT_S,
    ) -> None:
        if not 0 <= approval_wait_s <= MAX_APPROVAL_WAIT_S:
            raise ValueError(f"approval_wait_s must be between 0 and {MAX_APPROVAL_WAIT_S}")
        self.approval_wait_s = float(approval_wait_s)
        self._client = client
        self.agent_claims = tuple(agent_claims)
        self.agent_id = agent_id
        self.agent_header = agent_header.lower() if agent_header else None
        self.user_token = user_token
        self.server_version = server_version
        # The proc- session's servers (server -> user token of the latest call), ended
        # when the stdio connection closes or at exit; the pid that registered the exit.
        self._process_sessions: dict[str, str | None] = {}
        self._exit_pid: int | None = None

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            self._client = AsyncClient()
        return self._client

    def governed(self, server: str, *, tool: str | None = None) -> Callable[[F], F]:
        """Decorate a tool function; place it *under* ``@mcp.tool()``.

        ``tool`` names the tool for the daemon when the SDK does not say which name it
        was called by (1.x; 2.x reads it from the request); default: the function name.
        """
        return _decorator(lambda: self, server, tool)

    async def end_session(self, server: str, session_id: str | None = None, *,
                          user_token: str | None = None) -> SessionEnd:
        """End a session at the daemon now, so it stops counting against the user's
        ``concurrent_sessions`` (``POST /v1/sessions/end``). Default: this process's
        ``proc-`` session (a stdio server), with the ``user_token`` callable's token.

        Call it where the SDK gives no hook (1.x, or 2.x serving HTTP without
        ``Mcp-Session-Id`` and without a token), e.g. from the server's lifespan on
        the way out. Idempotent (``ended`` False when it was not counted).
        """
        if user_token is None and self.user_token is not None:
            user_token = self.user_token()
        return await self.client.end_session(session_id or _PROCESS_SESSION, user_token,
                                             server=server)

    def _end_with_connection(self, ctx: Any, server: str, session_id: str | None,
                             user_token: str | None) -> None:
        """Have the session ended when it ends: an ``Mcp-Session-Id`` session when the
        SDK closes its connection (see :func:`~sidekey.mcp._sdk.session_end_hook`); the
        ``proc-`` session when the stdio connection closes (handshake era) or, at the
        latest, when this process exits (any era, any SDK major). Remembers the user
        token of the session's latest governed call for ``server``: the end names the
        user with it."""
        if session_id is None:
            return
        headers = request_headers(ctx)
        mcp_sid = headers.get("mcp-session-id") if headers is not None else None
        if mcp_sid:
            hook = session_end_hook(ctx, mcp_sid)
            if hook is None:
                return
            stack, state = hook
            tracked = state.get(_SESSIONS_KEY)
            if not isinstance(tracked, dict):
                tracked = state[_SESSIONS_KEY] = {}
                stack.push_async_callback(self._end_tracked, session_id, tracked)
            tracked[server] = user_token
            return
        if session_id != _PROCESS_SESSION:
            return  # a tok- session: nothing marks its end; it idles out
        self._process_sessions[server] = user_token
        if self._exit_pid != os.getpid():
            self._exit_pid = os.getpid()
            atexit.register(self._end_process_sessions_at_exit)
        hook = session_end_hook(ctx, None)
        if hook is not None:
            stack, state = hook
            if state.get(_SESSIONS_KEY) is not self._process_sessions:
                state[_SESSIONS_KEY] = self._process_sessions
                stack.push_async_callback(self._end_tracked, session_id, self._process_sessions)

    async def _end_tracked(self, session_id: str, tracked: dict[str, str | None]) -> None:
        # Best effort, inside the SDK's bounded teardown: a session not ended here is
        # still ended by idling out (session_idle_seconds), so a failure only costs that.
        for server, token in list(tracked.items()):
            try:
                await self.client.end_session(session_id, token, server=server)
            except Exception as exc:
                log.warning("could not end MCP session at the sidekey daemon (%s): %s; "
                            "it stops counting once idle", server, exc)
            else:
                tracked.pop(server, None)

    def _end_process_sessions_at_exit(self) -> None:
        """atexit: end the ``proc-`` session of each server this process called for (a
        stdio server exits when its client goes away), with the synchronous client and a
        short bound: exiting must not hang on a daemon that is gone."""
        if self._exit_pid != os.getpid() or not self._process_sessions:
            return  # a forked child, or nothing left to end
        pending = dict(self._process_sessions)
        self._process_sessions.clear()
        try:
            with Client(self.client.socket_path,
                        timeout=min(self.client.timeout, EXIT_TIMEOUT_S)) as sync:
                sync.daemon_uids = self.client.daemon_uids  # the same daemon check
                for server, token in pending.items():
                    sync.end_session(_PROCESS_SESSION, token, server=server)
        except Exception as exc:
            log.debug("could not end the process session at exit: %s", exc)

    # ------------------------------------------------------------------ identity

    def identity(self, ctx: Any) -> tuple[str | None, str | None, str | None]:
        """(user token, agent id, session id) for the current request."""
        token = access_token()
        user_token: str | None = None
        agent_id: str | None = None
        if token is not None:
            user_token = token.token
            agent_id = self._agent_from(token)
        else:
            user_token = self.user_token() if self.user_token is not None else None
        if agent_id is None and self.agent_header is not None:
            headers = request_headers(ctx)
            named = headers.get(self.agent_header) if headers is not None else None
            agent_id = (named.strip() or None) if isinstance(named, str) else None
        if agent_id is None and token is None:
            agent_id = self.agent_id
        return user_token, agent_id, _session_id(ctx, token)

    def _agent_from(self, token: Any) -> str | None:
        claims = getattr(token, "claims", None) or {}
        for claim in self.agent_claims:
            value = claims.get(claim)
            if value is None and claim == "client_id":
                value = getattr(token, "client_id", None)
            if isinstance(value, str) and value:
                return value
        return None


def _session_id(ctx: Any, token: Any) -> str:
    headers = request_headers(ctx)
    if headers is not None:
        sid = headers.get("mcp-session-id")
        if sid:
            # The SDK mints it (a uuid); a longer one is hashed to the daemon's cap.
            return sid if len(sid) <= 128 else "sid-" + _digest(sid)
    if token is not None:
        claims = getattr(token, "claims", None) or {}
        jti = claims.get("jti")
        if isinstance(jti, str) and jti:
            parts = [str(claims.get("iss", "")), str(getattr(token, "subject", None) or
                                                     claims.get("sub", "")),
                     str(getattr(token, "client_id", "")), jti]
            return "tok-" + _digest("\0".join(parts))
        return "tok-" + _digest(str(token.token))
    return _PROCESS_SESSION


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:40]


_default = Governor()


def configure(governor: Governor | None = None, **kw: Any) -> Governor:
    """Set the :class:`Governor` that module-level ``@governed`` uses (at call time,
    so it may be called after the tools are decorated). Keyword arguments build one."""
    global _default
    if governor is not None and kw:
        raise TypeError("configure() takes a Governor or keyword arguments, not both")
    _default = governor if governor is not None else Governor(**kw)
    return _default


async def end_session(server: str, session_id: str | None = None, *,
                      user_token: str | None = None) -> SessionEnd:
    """End a session with the configured :class:`Governor` (see
    :meth:`Governor.end_session`); default: this process's ``proc-`` session."""
    return await _default.end_session(server, session_id, user_token=user_token)


def governed(server: str, *, tool: str | None = None) -> Callable[[F], F]:
    """``@governed("content-api")`` under ``@mcp.tool()``; see the module docstring."""
    return _decorator(lambda: _default, server, tool)


# ---------------------------------------------------------------------- the wrapper


def _decorator(governor: Callable[[], Governor], server: str,
               tool_name: str | None) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        hints = typing.get_type_hints(fn, include_extras=True)
        user_ctx = next((name for name, hint in hints.items()
                         if name != "return" and _is_context(hint)), None)
        if APPROVAL_ARG in sig.parameters or CONTEXT_ARG in sig.parameters:
            raise TypeError(f"{fn.__name__}: {APPROVAL_ARG!r} and {CONTEXT_ARG!r} are reserved "
                            "parameter names in a @governed tool")
        ctx_arg = user_ctx or CONTEXT_ARG
        params = list(sig.parameters.values())
        extra = [inspect.Parameter(APPROVAL_ARG, inspect.Parameter.KEYWORD_ONLY, default=None,
                                   annotation=Annotated[str | None, pydantic.Field(
                                       description=_APPROVAL_DESCRIPTION)])]
        if user_ctx is None:
            extra.append(inspect.Parameter(CONTEXT_ARG, inspect.Parameter.KEYWORD_ONLY,
                                           annotation=CONTEXT_CLASS))
        # Keyword-only parameters go after everything but **kwargs.
        tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
        params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
        new_sig = sig.replace(parameters=[*params, *extra, *tail])
        name = tool_name or fn.__name__
        is_async = inspect.iscoroutinefunction(fn)

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            approval_id = kwargs.pop(APPROVAL_ARG, None)
            ctx = kwargs[ctx_arg] if user_ctx is not None else kwargs.pop(CONTEXT_ARG, None)
            call_args = sig.bind(*args, **kwargs)

            async def run() -> Any:
                if is_async:
                    return await typing.cast(Callable[..., Awaitable[Any]], fn)(
                        *call_args.args, **call_args.kwargs)
                # A sync tool runs on a worker thread (as the SDK would run it), in a copy
                # of this context so that current_lease() works there.
                call = functools.partial(contextvars.copy_context().run, fn,
                                         *call_args.args, **call_args.kwargs)
                return await anyio.to_thread.run_sync(call)

            v1_name, v1_structured = (registered_tool(ctx, wrapper) if SDK_MAJOR == 1
                                      else (None, False))
            result = await _governed_call(governor(), server, v1_name or name, ctx, call_args,
                                          user_ctx, approval_id, run)
            if v1_structured and isinstance(result, CallToolResult) and \
                    getattr(result, "isError", False):
                # 1.x would validate the error's structuredContent against the tool's
                # output schema (and fail): raise it, the SDK reports the text.
                raise RefusalError(str(getattr(result.content[0], "text", "refused")))
            return result

        wrapper.__signature__ = new_sig  # type: ignore[attr-defined]
        annotations = {p.name: p.annotation for p in new_sig.parameters.values()
                       if p.annotation is not inspect.Parameter.empty}
        if sig.return_annotation is not inspect.Signature.empty:
            annotations["return"] = sig.return_annotation
        wrapper.__annotations__ = annotations
        return typing.cast(F, wrapper)

    return decorate


def _is_context(hint: Any) -> bool:
    candidates = [hint, *typing.get_args(hint)]
    return any(inspect.isclass(c) and issubclass(c, CONTEXT_CLASS) for c in candidates)


def _wire_arguments(ctx: Any, call_args: inspect.BoundArguments,
                    user_ctx: str | None) -> tuple[str | None, dict[str, Any]]:
    """(tool name from the request or None, the arguments to authorize with)."""
    raw = raw_call_params(ctx)
    if raw is not None:
        name, arguments = raw
        return name, {k: v for k, v in arguments.items() if k != APPROVAL_ARG}
    bound = {k: v for k, v in call_args.arguments.items() if k != user_ctx}
    dumped = pydantic_core.to_jsonable_python(bound, by_alias=True)
    return None, typing.cast(dict[str, Any], dumped)


async def _governed_call(gov: Governor, server: str, default_tool: str, ctx: Any,
                         call_args: inspect.BoundArguments, user_ctx: str | None,
                         approval_id: str | None, run: Callable[[], Awaitable[Any]]) -> Any:
    requested_name, arguments = _wire_arguments(ctx, call_args, user_ctx)
    tool = requested_name or default_tool
    resumed = resumed_approval(ctx) if approval_id is None else None
    if resumed is not None:
        # The retry of a held call after the user answered whether to wait (2026-07-28
        # multi-round flow): wait if asked to, then present the approval (the daemon
        # answers approved, still pending, denied or expired).
        approval_id, wait = resumed
        if wait and gov.approval_wait_s > 0:
            with contextlib.suppress(SidekeyClientError):
                await gov.client.wait_for_approval(approval_id, gov.approval_wait_s)
    user_token, agent_id, session_id = gov.identity(ctx)
    gov._end_with_connection(ctx, server, session_id, user_token)
    # Which step a SidekeyClientError comes from: the daemon refusing the call
    # (authorize) or failing to end it (release) is a refusal in MCP terms; one raised
    # by the tool's own body is the tool's error and propagates as the tool raised it.
    phase = "authorize"
    result: Any = None
    # The MCP request's W3C traceparent (HTTP transports): its trace-id goes into the
    # call's audit events, so the SIEM joins them to this server's trace.
    headers = request_headers(ctx)
    traceparent = headers.get("traceparent") if headers is not None else None
    try:
        async with gov.client.tool_call(
            server, tool, user_token=user_token, agent_id=agent_id, session_id=session_id,
            arguments=arguments, server_version=gov.server_version,
            approval_id=approval_id or None, traceparent=traceparent,
        ) as lease:
            phase = "run"
            reset = _lease.set(lease)
            try:
                result = await run()
            finally:
                _lease.reset(reset)
            if lease.result_size_bytes is None:
                lease.result_size_bytes = _result_size(result)
            phase = "release"
            if _is_error_result(result):
                # The tool returned its own isError result: released as an error.
                raise ToolReturnedError
    except ToolReturnedError:
        pass
    except SidekeyClientError as exc:
        if phase == "run":
            raise
        if isinstance(exc, ApprovalPending) and approval_id is None:
            asked = await _ask_to_wait(gov, ctx, exc, tool)
            if asked is True:
                # Decided while we waited: present the approval (the daemon lets the
                # call through once if approved, or answers why not: denied, expired).
                return await _governed_call(gov, server, default_tool, ctx, call_args,
                                            user_ctx, exc.approval_id, run)
            if asked is not False:
                return asked  # the question, for the client to answer and retry with
        # After a failed release the daemon has not said whether the result may be
        # returned: fail closed.
        return errors.refusal_result(exc, tool=tool)
    if lease.withhold_result:
        return errors.withheld_result(tool=tool, size=lease.result_size_bytes)
    return result


async def _ask_to_wait(gov: Governor, ctx: Any, pending: ApprovalPending, tool: str) -> Any:
    """Ask the user (elicitation, where the client supports it) whether to wait for the
    approver, and if so wait, bounded. True when the approval was decided meanwhile,
    False when nothing more is to be done, or (protocol 2026-07-28, which has no
    server-to-client requests) the ``InputRequiredResult`` carrying the question.

    The user's answer only chooses to wait: it never approves anything (an approval is
    an approver's decision, made with the daemon's approver tier)."""
    if gov.approval_wait_s <= 0 or not supports_elicitation(ctx):
        return False
    message = (f"{tool} needs an approver's decision before it runs (approval id "
               f"{pending.approval_id}). Wait up to {math.ceil(gov.approval_wait_s)} s for it?")
    try:
        answer = await ctx.elicit(message, WaitForApproval)
    except Exception as exc:  # the client refused or failed the elicitation: do not wait
        return input_required(message, pending.approval_id) if no_back_channel(exc) else False
    data = getattr(answer, "data", None)
    if getattr(answer, "action", None) != "accept" or not isinstance(data, WaitForApproval) \
            or not data.wait:
        return False
    try:
        approval = await gov.client.wait_for_approval(pending.approval_id, gov.approval_wait_s)
    except SidekeyClientError:
        return False
    return approval.get("state") != "pending"


class ToolReturnedError(Exception):
    """The release's error name for a tool that returned an ``isError`` result."""


def _is_error_result(result: Any) -> bool:
    return isinstance(result, CallToolResult) and bool(
        getattr(result, "is_error", None) or getattr(result, "isError", None))


def _result_size(result: Any) -> int:
    """The size of what the tool returns, as JSON (a str as its UTF-8 bytes): what the
    daemon's max_result_size_kb is checked against."""
    if isinstance(result, str):
        return len(result.encode())
    if isinstance(result, bytes):
        return len(result)
    with contextlib.suppress(Exception):
        return len(pydantic_core.to_json(result, by_alias=True, fallback=str))
    return len(str(result).encode())


__all__ = ["APPROVAL_ARG", "Governor", "configure", "current_lease", "end_session", "governed"]
