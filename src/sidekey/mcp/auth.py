"""The MCP Python SDK's bearer-token verification, done by the sidekey daemon.

:class:`TokenVerifier` implements the SDK's ``TokenVerifier`` protocol
(``mcp.server.auth.provider``; SDK 1.10 and later, 2.x included): each bearer token the
SDK's auth middleware sees is sent to the daemon's ``POST /v1/introspect`` for the
server this process is attested as, and verified there with the issuer, audience,
algorithms and key cache the daemon already uses for ``/v1/authorize``. The server
keeps no JWKS, no JWT library and no second copy of its OAuth2 settings::

    from mcp.server.auth.settings import AuthSettings
    from mcp.server.mcpserver import MCPServer          # 1.x: mcp.server.fastmcp.FastMCP
    from sidekey.mcp.auth import TokenVerifier

    mcp = MCPServer(
        "content-api",
        token_verifier=TokenVerifier("content-api"),
        auth=AuthSettings(issuer_url="https://auth.example.com",
                          resource_server_url="https://content-api.example.com/mcp",
                          validate_token_resource=False),  # sidekey checks the audience
    )

A token that does not verify (expired, another audience or issuer, forged...) gives
``None``: the SDK answers 401. The daemon refusing the *request* (this process is not
attested as the server: ``peer_mismatch``; unknown server; the issuer's keys cannot be
had) raises the client's :class:`~sidekey.client.SidekeyClientError`: that is a fault of
the deployment, not of the user's token, and must not look like one.

The SDK is an optional dependency (``pip install 'sidekey[mcp]'``): importing this
module without it raises an ImportError that says so.
"""

from __future__ import annotations

import logging
import os
from typing import Any

try:
    from mcp.server.auth.provider import AccessToken
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "sidekey.mcp.auth needs the MCP Python SDK (mcp >= 1.10): "
        "pip install 'sidekey[mcp]'"
    ) from exc

from ..client import AsyncClient, Introspection

log = logging.getLogger(__name__)

# AccessToken fields that only newer SDKs have (2.x: subject, claims); set when present.
_SDK_FIELDS = frozenset(getattr(AccessToken, "model_fields", {}))


class TokenVerifier:
    """The SDK's ``TokenVerifier``, backed by the daemon's ``POST /v1/introspect``.

    ``server``: the MCP server's name in the daemon's config (this process must be
    attested as it). ``client``: an :class:`~sidekey.client.AsyncClient` to share with
    the rest of the server (one is made from ``socket_path`` and ``expected_uid``
    otherwise; see :class:`~sidekey.client.AsyncClient`).

    The SDK ``AccessToken`` returned carries ``token``, ``client_id`` (the token's
    ``client_id`` claim, else ``azp``; ``""`` when it has neither), ``scopes``,
    ``expires_at`` (``exp``), ``resource`` (the server's configured audience, which the
    daemon checked the token carries) and, on SDKs that have them, ``subject`` and
    ``claims`` (``iss``, ``sub``, ``aud``, ``exp``, ``client_id`` and the token's other
    short string claims).
    """

    def __init__(
        self,
        server: str,
        *,
        client: AsyncClient | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        expected_uid: int | str | None = None,
    ) -> None:
        self.server = server
        self._own_client = client is None
        self.client = client if client is not None else AsyncClient(
            socket_path, expected_uid=expected_uid)

    def __repr__(self) -> str:
        return f"TokenVerifier(server={self.server!r})"

    async def verify_token(self, token: str) -> AccessToken | None:
        """The SDK's hook: the verified token, or None when it does not verify."""
        result = await self.client.introspect(self.server, token)
        if not result.active:
            # Why, for the server's operator (never the token); the user gets the SDK's 401.
            log.debug("bearer token refused by sidekey: %s (request_id %s)",
                      result.code, result.request_id)
            return None
        return access_token(token, result)

    async def aclose(self) -> None:
        """Close the client this verifier made (a client passed in is its owner's)."""
        if self._own_client:
            await self.client.close()


def access_token(token: str, result: Introspection) -> AccessToken:
    """The SDK ``AccessToken`` for an active introspection of ``token``."""
    if not result.active:
        raise ValueError("an inactive introspection has no access token")
    claims: dict[str, Any] = {**result.claims, "iss": result.iss, "sub": result.sub,
                              "aud": list(result.aud), "exp": result.exp}
    if result.client_id is not None:
        claims["client_id"] = result.client_id
    fields: dict[str, Any] = {
        "token": token,
        "client_id": result.client_id or "",
        "scopes": sorted(result.scopes),
        "expires_at": result.exp,
        "resource": result.audience,
        "subject": result.sub,
        "claims": claims,
    }
    return AccessToken(**{k: v for k, v in fields.items() if k in _SDK_FIELDS})
