"""A content-api MCP server (official SDK) governed with sidekey.mcp, for
tests/test_mcp_governed.py to run as a subprocess and drive with the SDK's client.

    python mcp_governed_server.py stdio
    python mcp_governed_server.py http PORT [--stateless] [--introspect] [--agent-header]

The same script runs on the SDK's current major (2.x ``MCPServer``) and the previous
one (1.x ``FastMCP``), over both transports.

stdio: the user token is $SIDEKEY_TEST_USER_TOKEN and the agent $SIDEKEY_TEST_AGENT
(default content-writer): what whoever launches a stdio server configures. http: bearer
auth with the SDK's TokenVerifier protocol, verifying the local test issuer's tokens
($SIDEKEY_TEST_JWKS), or with ``--introspect`` sidekey's own TokenVerifier (the daemon
verifies them); the agent is the token's azp claim, or with ``--agent-header`` the
X-Agent-Id header only.

``list_articles`` returns plain text (no output schema on either major); the other tools
have the SDK's default structured output. ``query="slow"`` writes
$SIDEKEY_TEST_MARKER_DIR/started and sleeps (for cancellation); ``query="big"`` returns
4 KiB (for max_result_size_kb).
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
from sidekey.mcp.auth import TokenVerifier

try:
    from mcp.server.mcpserver import MCPServer

    SDK_MAJOR = 2
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as MCPServer  # type: ignore[no-redef]

    SDK_MAJOR = 1


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


def build(auth_port: int | None, *, stateless: bool = False, introspect: bool = False) -> MCPServer:
    kw: dict[str, Any] = {}
    if SDK_MAJOR == 1:
        kw["stateless_http"] = stateless  # 2.x: an argument of streamable_http_app()
    if auth_port is None:
        return _tools(MCPServer("content-api", **kw))
    verifier = (TokenVerifier("content-api") if introspect
                else JwksVerifier(os.environ["SIDEKEY_TEST_JWKS"]))
    return _tools(MCPServer(
        "content-api", token_verifier=verifier,
        auth=AuthSettings(issuer_url="https://auth.example.com",
                          resource_server_url=f"http://127.0.0.1:{auth_port}/mcp",
                          validate_token_resource=False), **kw))


def _tools(mcp: MCPServer) -> MCPServer:
    @mcp.tool(structured_output=False)
    @governed("content-api")
    async def list_articles(query: str, page: int = 1) -> str:
        key = current_lease().secrets["CONTENT_API_KEY"]
        if query == "slow":
            (Path(os.environ["SIDEKEY_TEST_MARKER_DIR"]) / "started").write_text("1")
            import anyio

            await anyio.sleep(120)
        if query == "big":
            return "x" * 4096
        # Proof the secret reached the tool, without returning it.
        return json.dumps({"query": query, "page": page, "key_tail": key[-6:], "sdk": SDK_MAJOR})

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
        configure(agent_id=os.environ.get("SIDEKEY_TEST_AGENT", "content-writer"),
                  user_token=lambda: token)
        build(None).run("stdio")
        return
    port = int(sys.argv[2])
    stateless = "--stateless" in sys.argv
    if "--agent-header" in sys.argv:
        configure(agent_claims=(), agent_header="X-Agent-Id")
    else:
        configure()  # identity from the verified bearer token only
    import anyio
    import uvicorn

    mcp = build(port, stateless=stateless, introspect="--introspect" in sys.argv)
    app = (mcp.streamable_http_app(stateless_http=stateless) if SDK_MAJOR == 2
           else mcp.streamable_http_app())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    anyio.run(server.serve)


if __name__ == "__main__":
    main()
