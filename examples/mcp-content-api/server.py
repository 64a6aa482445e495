"""The seed's content-api and analytics-db MCP servers, governed by sidekey.

Built with the official MCP Python SDK (2.x ``MCPServer``; 1.x ``FastMCP`` works the
same); every tool is ``@mcp.tool()`` + ``@governed("<server>")`` and reads its secret
with ``current_lease()``. The upstreams are in-process fakes (upstream.py) that check
the credential they are handed. Run it next to the quickstart daemon::

    examples/quickstart/run.sh                          # terminal 1: the daemon
    examples/mcp-content-api/run.sh http                # terminal 2: this server, :8765/mcp
    examples/mcp-content-api/run.sh stdio               # or: stdio, for a local host

or directly: ``python server.py [--server content-api|analytics-db] [--transport
stdio|http] [--port 8765] [--stateless]``.

Who is calling:

- **http**: the bearer token of each request, verified by the sidekey daemon
  (``TokenVerifier``: ``POST /v1/introspect``); the agent is the token's ``azp`` (else
  ``client_id``) claim.
- **stdio**: one client per process, so whoever launches it says who: the user's token
  in ``$SIDEKEY_USER_TOKEN``, the agent in ``$SIDEKEY_AGENT_ID`` (default
  ``content-writer``).

The daemon socket is ``$SIDEKEY_SOCKET`` (run.sh points it at the quickstart's).

Two tools also work when the daemon hands out no credential at all (the example's own
config, ``sidekey.yaml`` here, with ``run.sh daemon`` and ``run.sh upstreams``):

- ``list_articles``, when its key is egress-only (``"CONTENT_API_KEY" in lease.egress``),
  calls the HTTPS content API through the daemon (``lease.http_client()``), which
  injects the key on the way out: this process never sees it.
- ``query_metrics``, when its lease holds ``METRICS_TOKEN``, calls the metrics API with
  that per-user token (exchanged by the daemon from the user's own token, for the
  metrics audience only) instead of a shared database password.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import ssl
from pathlib import Path
from typing import Any, Literal

from mcp.server.auth.settings import AuthSettings
from pydantic import BaseModel, Field
from upstream import FakeCMS, FakeMetricsDB, UpstreamError

from sidekey.mcp import configure, current_lease, governed
from sidekey.mcp.auth import TokenVerifier

try:
    from mcp.server.mcpserver import MCPServer

    SDK_MAJOR = 2
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as MCPServer  # type: ignore[no-redef]

    SDK_MAJOR = 1

# The seed's OAuth2 issuer (the quickstart serves it from a local demo key).
ISSUER = os.environ.get("SIDEKEY_EXAMPLE_ISSUER", "https://auth.example.com")

cms = FakeCMS()
metrics = FakeMetricsDB()

# The HTTPS APIs of upstreams.py and the demo CA that signed their certificate.
API_URL = os.environ.get("SIDEKEY_EXAMPLE_API", "https://localhost:8767")
DEMO_CA = Path(os.environ.get("SIDEKEY_EXAMPLE_CA", Path(__file__).resolve().parent.parent
                              / "quickstart" / "keys" / "demo-ca.pem"))


def _http() -> Any:
    """httpx (the MCP SDK 1.x and the daemon bring it), else httpx2 (SDK 2.x; same API)."""
    try:
        import httpx
    except ImportError:
        import httpx2 as httpx  # type: ignore[no-redef]
    return httpx


def _checked(response: Any) -> dict[str, Any]:
    if response.status_code != 200:
        raise UpstreamError(f"upstream answered {response.status_code}")
    body: dict[str, Any] = response.json()
    return body


class ArticleDraft(BaseModel):
    """A new article, as the model writes it."""

    title: str = Field(min_length=1, max_length=200)
    body: str = Field(default="", max_length=20_000)
    section: str = "news"
    tags: list[str] = Field(default_factory=list, max_length=10)


class MetricsQuery(BaseModel):
    """A read-only query over the analytics database."""

    metric: Literal["page_views"] = "page_views"
    section: str | None = None
    days: int = Field(default=7, ge=1, le=365)


def content_api(mcp: MCPServer) -> None:
    """The content-api tools (seed: list_articles, create_article, publish_article)."""

    @mcp.tool()
    @governed("content-api")
    async def list_articles(query: str = "", section: str | None = None, limit: int = 10) -> str:
        """Search articles by title (and section)."""
        lease = current_lease()
        if "CONTENT_API_KEY" in lease.egress:
            # The daemon adds the key to this request (and only to requests its egress
            # rule allows): this process never holds it.
            params: dict[str, Any] = {"q": query, "limit": limit}
            if section is not None:
                params["section"] = section
            async with lease.http_client() as http:
                found = _checked(await http.get(f"{API_URL}/cms/articles", params=params))
            return json.dumps({"articles": found["articles"]})
        key = lease.secrets["CONTENT_API_KEY"]
        return json.dumps({"articles": await cms.list(key, query, section, limit)})

    @mcp.tool()
    @governed("content-api")
    async def create_article(draft: ArticleDraft) -> str:
        """Create an article as a draft; publish it with publish_article."""
        key = current_lease().secrets["CONTENT_API_KEY"]
        return json.dumps(await cms.create(key, draft.model_dump()))

    @mcp.tool()
    @governed("content-api")
    async def publish_article(article_id: int) -> str:
        """Publish a draft article (the seed may hold this for a human approver)."""
        key = current_lease().secrets["CONTENT_API_KEY"]
        return json.dumps(await cms.publish(key, article_id))


def analytics_db(mcp: MCPServer) -> None:
    """The analytics-db tools (seed: query_metrics, export_report), read-only."""

    @mcp.tool()
    @governed("analytics-db")
    async def query_metrics(query: MetricsQuery) -> str:
        """Daily page views, newest first."""
        lease = current_lease()
        token = lease.secrets.get("METRICS_TOKEN")
        if token is not None:
            # A token for this user and the metrics API only, not a shared password.
            params: dict[str, Any] = {"days": query.days}
            if query.section is not None:
                params["section"] = query.section
            httpx = _http()
            async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=DEMO_CA),
                                         timeout=10) as http:
                answer = _checked(await http.get(
                    f"{API_URL}/metrics/page_views", params=params,
                    headers={"Authorization": f"Bearer {token}"}))
            return json.dumps({"user": answer["user"], "rows": answer["rows"]})
        dsn = lease.secrets["DATABASE_URL"]
        rows = await metrics.query(dsn, query.metric, query.section, query.days)
        return json.dumps({"rows": rows})

    @mcp.tool()
    @governed("analytics-db")
    async def export_report(query: MetricsQuery) -> str:
        """The same rows as CSV."""
        dsn = current_lease().secrets["DATABASE_URL"]
        rows = await metrics.query(dsn, query.metric, query.section, query.days)
        return "day,section,page_views\n" + "".join(
            f"{r['day']},{r['section']},{r['page_views']}\n" for r in rows)


TOOLS = {"content-api": content_api, "analytics-db": analytics_db}


def build(server: str, transport: str, public_url: str) -> MCPServer:
    """The MCP server: bearer auth verified by the daemon over HTTP, the launcher's
    identity over stdio."""
    if transport == "http":
        mcp = MCPServer(server, token_verifier=TokenVerifier(server),
                        auth=AuthSettings(issuer_url=ISSUER, resource_server_url=public_url,
                                          validate_token_resource=False))  # sidekey checks aud
    else:
        mcp = MCPServer(server)
        configure(agent_id=os.environ.get("SIDEKEY_AGENT_ID", "content-writer"),
                  user_token=lambda: os.environ.get("SIDEKEY_USER_TOKEN"))
    TOOLS[server](mcp)
    return mcp


def main() -> None:
    # httpx logs each request's URL at INFO (query values included): not for a log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=sorted(TOOLS), default="content-api")
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--stateless", action="store_true",
                        help="http: no Mcp-Session-Id (one sidekey session per access token)")
    args = parser.parse_args()
    url = f"http://{args.host}:{args.port}/mcp"
    mcp = build(args.server, args.transport, url)
    if args.transport == "stdio":
        mcp.run("stdio")
        return
    options = {"host": args.host, "port": args.port, "stateless_http": args.stateless}
    if SDK_MAJOR == 1:  # transport options are server settings there
        for name, value in options.items():
            setattr(mcp.settings, name, value)
        mcp.run("streamable-http")
    else:
        mcp.run("streamable-http", **options)


if __name__ == "__main__":
    main()
