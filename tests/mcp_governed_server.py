"""A content-api MCP server (official SDK 2.x) governed with sidekey.mcp, for
tests/test_mcp_governed.py to run as a subprocess and drive with the SDK's client.

    python mcp_governed_server.py stdio
    python mcp_governed_server.py http PORT [--stateless]

The same script runs on the SDK's previous major (1.x ``FastMCP``), stdio only.

stdio: the user token is $SIDEKEY_TEST_USER_TOKEN and the agent content-writer (what
whoever launches a stdio server configures). http: bearer auth with the SDK's
TokenVerifier protocol, verifying the local test issuer's tokens ($SIDEKEY_TEST_JWKS);
the agent is the token's azp claim.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import jwt
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from pydantic import BaseModel

from sidekey.mcp import configure, current_lease, governed

try:
    from mcp.server.mcpserver import MCPServer
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as MCPServer  # type: ignore[no-redef]


class Filter(BaseModel):
    section: str
    tags: list[str] = []
    limit: int = 10


class JwksVerifier:
    """Verifies the test issuer's EdDSA tokens (what sidekey's own introspection or any
    JWT library does for a real server)."""

    def __init__(self, jwks_file: str) -> None:
        self.keys = jwt.PyJWKSet.from_json(Path(jwks_file).read_text())

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            kid = jwt.get_unverified_header(token)["kid"]
            key = next(k for k in self.keys.keys if k.key_id == kid)
            claims: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=["EdDSA"], audience="mcp:content-api",
                issuer="https://auth.example.com")
        except Exception:
            return None
        return AccessToken(token=token, client_id=str(claims.get("client_id", "dcr-client")),
                           scopes=str(claims.get("scope", "")).split(),
                           expires_at=int(claims["exp"]), subject=str(claims["sub"]),
                           claims=claims)


def build(auth_port: int | None) -> MCPServer:
    if auth_port is None:
        mcp = MCPServer("content-api")
    else:
        mcp = MCPServer(
            "content-api", token_verifier=JwksVerifier(os.environ["SIDEKEY_TEST_JWKS"]),
            auth=AuthSettings(issuer_url="https://auth.example.com",
                              resource_server_url=f"http://127.0.0.1:{auth_port}/mcp",
                              validate_token_resource=False))

    @mcp.tool()
    @governed("content-api")
    async def list_articles(query: str, page: int = 1) -> str:
        key = current_lease().secrets["CONTENT_API_KEY"]
        # Proof the secret reached the tool, without returning it.
        return json.dumps({"query": query, "page": page, "key_tail": key[-6:]})

    @mcp.tool()
    @governed("content-api")
    async def create_article(title: str, filter: Filter | None = None) -> str:
        return json.dumps({"title": title, "filter": filter.model_dump() if filter else None})

    @mcp.tool(name="publish_article")
    @governed("content-api")
    def publish(article_id: int, channel: str = "web") -> str:  # sync, registered by name
        key = current_lease().secrets["CONTENT_API_KEY"]
        return json.dumps({"published": article_id, "channel": channel, "key_tail": key[-6:]})

    return mcp


def main() -> None:
    mode = sys.argv[1]
    if mode == "stdio":
        token = os.environ["SIDEKEY_TEST_USER_TOKEN"]
        configure(agent_id="content-writer", user_token=lambda: token)
        build(None).run("stdio")
        return
    port = int(sys.argv[2])
    configure()  # identity from the verified bearer token only
    import anyio
    import uvicorn

    app = build(port).streamable_http_app(stateless_http="--stateless" in sys.argv)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    anyio.run(server.serve)


if __name__ == "__main__":
    main()
