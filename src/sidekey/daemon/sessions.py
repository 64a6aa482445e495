"""``POST /v1/sessions/end``: an MCP session has ended, so it stops counting against
the user's ``limits.per_user.concurrent_sessions`` at once instead of after
``policy.session_idle_seconds`` of idleness.

Whose session: the user is decided exactly as ``POST /v1/authorize`` decides it, by the
same code (:meth:`~sidekey.daemon.calls.Calls._verify_token_for` and
:func:`sidekey.policy.session_user`, which shares the decision chain's steps 2 and 3):
for a server with ``oauth2``, the subject of the user token the daemon verifies; for an
``oauth2: none`` server, the calling process's local user. The store's session set is
per user, so a caller can only name sessions of the user its token proves (or of its
own uid): ending ``alice``'s session with ``bob``'s token ends ``bob``'s session of that
id, which does not exist. ``server`` is optional when the caller is attested as exactly
one declared server; it must be one the caller is attested as (``peer_mismatch``).

Idempotent: an unknown, already ended or idle-expired session is 200 ``ended: false``.
Every answer is audited as ``session.ended`` (its ``ended`` field says whether a counted
session was ended); a refusal as ``peer.rejected`` / ``token.rejected`` /
``request.rejected``, with the same codes and statuses as ``authorize``.
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable
from typing import Any

from .. import protocol, quotas
from ..policy import CallFacts, session_user
from ..protocol import (
    AccessToken,
    BadRequest,
    SessionEndRequest,
    SessionEndResponse,
    SidekeyError,
    error_for_status,
)
from ..server import Request, Response
from .context import Context, _json

SESSIONS_END_PATH = "/v1/sessions/end"

# Refusals of the user step that are about the token (as the decision chain's codes).
_TOKEN_CODES = frozenset({"token_missing", "token_invalid", "issuer_mismatch", "audience_mismatch"})


class Sessions(Context):
    """``POST /v1/sessions/end`` (a mixin of :class:`~sidekey.daemon.app.Sidekey`)."""

    # Defined in ``calls`` (the same verification as authorize's).
    _verify_token_for: Callable[
        [str, str | None, frozenset[str]],
        Awaitable[tuple[AccessToken | None, SidekeyError | None]],
    ]

    async def end_session(self, req: Request) -> Response:
        body: SessionEndRequest = protocol.decode_body(req.body, SessionEndRequest)
        servers, _ = self._peer_facts(req)
        ident = req.peer.identity
        base: dict[str, Any] = {
            "server": body.server,
            "session_id": body.session_id,
            "peer": ident.audit(),
            "request_id": req.request_id,
        }
        server = body.server
        if server is None:
            attested = sorted(s for s in servers if s in self.cfg.servers)
            if len(attested) != 1:
                raise await self._reject("request.rejected", base, BadRequest(
                    "name the server the session belongs to (server): the calling process "
                    f"is attested as {len(attested)} servers", code="server_required"))
            server = attested[0]
            base["server"] = server
        user_token, token_error = await self._verify_token_for(server, body.user_token, servers)
        now = self.clock()
        decision = session_user(self.cfg, CallFacts(
            server=server,
            tool="",
            peer_uid=ident.uid,
            peer_user=ident.user,
            peer_servers=servers,
            agent_id=None,
            session_id=body.session_id,
            args_digest="",
            now=datetime.datetime.fromtimestamp(now, datetime.UTC),
            user_token=user_token,
            token_error=token_error,
            token_presented=body.user_token is not None,
        ))
        if not decision.allowed:
            code = decision.code or "denied"
            event_type = ("peer.rejected" if code == "peer_mismatch" else
                          "token.rejected" if token_error is not None or code in _TOKEN_CODES
                          else "request.rejected")
            raise await self._reject(event_type, base, error_for_status(
                decision.status, decision.message or code, code=code))
        user, session = quotas.session_member(decision.user_id, body.session_id)
        ended = await self.store.session_end(user, session, now=now)
        await self.audit.emit(self.event(
            "session.ended", **base, user_id=decision.user_id, extra={"ended": ended}))
        return _json(200, SessionEndResponse(
            ended=ended, session_id=body.session_id, user_id=decision.user_id, server=server,
            request_id=req.request_id))
