"""``POST /v1/introspect``: verify a user's OAuth2 bearer token for the MCP server the
caller is attested as, with the daemon's issuer config and verified-token cache, so
the server's MCP SDK (``sidekey.mcp.TokenVerifier``) verifies tokens in one place.

The answer follows RFC 7662: a token that does not verify is not an HTTP error but
200 ``{"active": false, "code", "message"}`` (the codes of :mod:`sidekey.oauth`);
``active: true`` carries ``sub``, ``iss``, ``aud``, ``scopes``, ``client_id``, ``exp``
and the token's short string claims. HTTP errors are for the request itself: 400
(bad body, ``token_too_large``), 404 ``server_unknown``, 403 ``peer_mismatch`` (the
caller is not attested as that server), 422 ``oauth2_not_configured`` (an
``oauth2: none`` server has no issuer), 503 ``jwks_unavailable``.

It is a verification oracle, so every answer is audited: a refusal or an inactive
token durably (``request.rejected``, ``peer.rejected``, ``token.rejected``), an active
one as ``token.introspected`` (queued like an allowed authorize: it grants nothing by
itself). The token is never logged or audited, not even as a hash.
"""

from __future__ import annotations

from typing import Any

from .. import protocol
from ..oauth import MAX_TOKEN_CHARS
from ..protocol import (
    BadRequest,
    Denied,
    IntrospectRequest,
    IntrospectResponse,
    NotFound,
    TokenError,
    Unprocessable,
)
from ..server import Request, Response
from .context import Context, _iso, _json

INTROSPECT_PATH = "/v1/introspect"


class Introspection(Context):
    """``POST /v1/introspect`` (a mixin of :class:`~sidekey.daemon.app.Sidekey`)."""

    async def introspect(self, req: Request) -> Response:
        body: IntrospectRequest = protocol.decode_body(req.body, IntrospectRequest)
        base: dict[str, Any] = {
            "server": body.server,
            "peer": req.peer.identity.audit(),
            "request_id": req.request_id,
        }
        extra = {"path": INTROSPECT_PATH}
        if len(body.token) > MAX_TOKEN_CHARS:
            # Refused at the edge: no bearer token is this long (the verifier would
            # refuse it as malformed); say so precisely, before any parsing.
            raise await self._reject("request.rejected", base, BadRequest(
                f"token is longer than {MAX_TOKEN_CHARS} characters", code="token_too_large"))
        if body.server not in self.cfg.servers:
            raise await self._reject("request.rejected", base, NotFound(
                f'server "{body.server}" is not declared under servers: in this host\'s config',
                code="server_unknown"))
        servers, _ = self._peer_facts(req)
        if body.server not in servers:
            # Only the server's own process may learn what its users' tokens say: anyone
            # else (another server's uid) would have a verification oracle for tokens
            # it was never meant to hold, and could make us fetch JWKS.
            raise await self._reject("peer.rejected", base, Denied(
                f'the calling process is not attested as server "{body.server}" '
                f"(check peers.{body.server} in the config)", code="peer_mismatch"))
        oauth = self._oauth_specs.get(body.server)
        if oauth is None:
            raise await self._reject("request.rejected", base, Unprocessable(
                f'server "{body.server}" has oauth2: none (its user is the calling '
                "process's uid): there is no issuer to verify a bearer token against; "
                "declare oauth2: for it", code="oauth2_not_configured"))
        try:
            token = await self.oauth.verify(body.token, oauth)
        except TokenError as exc:
            # Not an HTTP error (RFC 7662): the request was fine, the token is not. The
            # verifier's messages never quote the token.
            await self.audit.emit(self.event(
                "token.rejected", **base,
                error={"code": exc.code, "message": exc.message, "status": exc.status},
                extra=extra))
            return _json(200, IntrospectResponse(
                active=False, request_id=req.request_id, server=body.server,
                code=exc.code, message=exc.message))
        # jwks_unavailable (503) propagates: no verdict on the token; audited by handle().
        auth = {
            "token_issuer": token.issuer,
            "scopes": sorted(token.scopes),
            "token_exp": _iso(token.expires_at),
            "verified": True,
            "client_id": token.client_id,
        }
        # Queued, not awaited: an introspection grants nothing by itself (no secret, no
        # token), and the MCP SDK asks once per HTTP request; the event is committed with
        # the next durable one or within the sink's group-commit interval.
        await self.audit.emit(self.event(
            "token.introspected", **base, user_id=token.subject, auth=auth, extra=extra),
            durable=False)
        return _json(200, IntrospectResponse(
            active=True,
            request_id=req.request_id,
            server=body.server,
            sub=token.subject,
            iss=token.issuer,
            aud=list(token.audience),
            audience=oauth.audience,
            scopes=sorted(token.scopes),
            client_id=token.client_id,
            exp=token.expires_at,
            expires_at=_iso(token.expires_at),
            # client_id / azp are answered as client_id above, not again here
            claims={k: v for k, v in token.string_claims if k not in ("client_id", "azp")},
        ))
