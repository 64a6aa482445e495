"""Fake upstreams for the example: an in-process "CMS" and a read-only metrics database.

They stand in for the real content API and analytics database the seed's servers front,
with no network. Each checks the credential it is handed, as the real one would, so the
example (and its tests) can show that a tool call really used the secret sidekey leased:

- with ``$FAKE_UPSTREAM_KEYS`` set (``role=sha256hex,...``, what the tests do), a key
  is accepted only if its SHA-256 is listed, for that role: the CMS learns fingerprints,
  never the keys;
- without it (the quickstart demo), a key is accepted for a role when it has the shape
  ``examples/quickstart/run.sh`` gives that role's demo secret
  (``demo-content-api-read-key-<random>``...).

A wrong or missing key raises :class:`Unauthorized`, like a 401 from the real API.
Upstream errors are the SDK's ``ToolError``, so the model reads their message (any
other exception reaches it as "Error executing tool ..."); a real API client's errors
would be caught and re-raised as ``ToolError`` in the tool.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import anyio

# Which secret each role is: the quickstart's demo secret names (run.sh).
DEMO_PREFIX = {
    "read": "demo-content-api-read-key-",
    "write": "demo-content-api-write-key-",
    "publish": "demo-content-api-publish-key-",
    "analytics": "demo-analytics-db-readonly-dsn-",
}


try:
    from mcp.server.mcpserver.exceptions import ToolError
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp.exceptions import ToolError  # type: ignore[no-redef]


class UpstreamError(ToolError):
    """The upstream refused a request (HTTP 4xx in a real API)."""


class Unauthorized(UpstreamError):
    """The upstream refused the credential (HTTP 401 in a real API)."""


def _fingerprints() -> dict[str, str]:
    spec = os.environ.get("FAKE_UPSTREAM_KEYS", "")
    pairs = (item.split("=", 1) for item in spec.split(",") if "=" in item)
    return {role.strip(): digest.strip() for role, digest in pairs}


def accepts(key: str, role: str) -> bool:
    """Whether the upstream takes ``key`` for ``role`` (by fingerprint, or the demo
    shape; see the module docstring)."""
    known = _fingerprints()
    if known:
        return hashlib.sha256(key.encode()).hexdigest() == known.get(role)
    return key.startswith(DEMO_PREFIX[role])


def note_access(what: str, role: str) -> None:
    """One line in $FAKE_UPSTREAM_LOG per accepted request (never the key)."""
    log = os.environ.get("FAKE_UPSTREAM_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{what} accepted {role} key\n")


async def request(key: str, role: str, what: str) -> None:
    """One request to an upstream: accept ``key`` for ``role`` or raise
    :class:`Unauthorized` (never echoing the key); note it in the access log
    ($FAKE_UPSTREAM_LOG: one line per accepted request, without the key); then take the
    upstream's latency ($FAKE_UPSTREAM_DELAY_S, default 0: lets a demo or a test
    cancel a slow call)."""
    if not accepts(key, role):
        raise Unauthorized(f"upstream refused the credential for {role!r}")
    note_access(what, role)
    await anyio.sleep(float(os.environ.get("FAKE_UPSTREAM_DELAY_S", "0")))


class FakeCMS:
    """The content API: articles in a dict. Each method takes the API key first."""

    def __init__(self) -> None:
        self.articles: dict[int, dict[str, Any]] = {
            1: {"id": 1, "title": "Hello, sidekey", "section": "news", "tags": ["security"],
                "status": "published"},
            2: {"id": 2, "title": "Q2 product update", "section": "announcements",
                "tags": ["product"], "status": "draft"},
        }

    async def list(self, key: str, query: str, section: str | None,
                   limit: int) -> list[dict[str, Any]]:
        await request(key, "read", "list")
        found = [a for a in self.articles.values()
                 if query.lower() in a["title"].lower() and section in (None, a["section"])]
        return found[:limit]

    async def create(self, key: str, fields: dict[str, Any]) -> dict[str, Any]:
        await request(key, "write", "create")
        article = {"id": max(self.articles) + 1, **fields, "status": "draft"}
        self.articles[article["id"]] = article
        return article

    async def publish(self, key: str, article_id: int) -> dict[str, Any]:
        await request(key, "publish", "publish")
        if article_id not in self.articles:
            raise UpstreamError(f"no article {article_id}")
        self.articles[article_id]["status"] = "published"
        return self.articles[article_id]


class FakeMetricsDB:
    """The analytics database, read-only: daily page views per section."""

    SECTIONS = ("news", "announcements", "blog", "docs")

    def __init__(self) -> None:
        day = 86_400
        today = int(time.time()) // day * day
        self.rows = [{"day": time.strftime("%Y-%m-%d", time.gmtime(today - n * day)),
                      "section": section, "page_views": 1000 + 37 * n + 11 * i}
                     for n in range(365) for i, section in enumerate(self.SECTIONS)]

    async def query(self, dsn: str, metric: str, section: str | None,
                    days: int) -> list[dict[str, Any]]:
        # The DSN (with its read-only user's password) is the credential.
        await request(dsn, "analytics", "query")
        if metric != "page_views":
            raise UpstreamError(f"unknown metric {metric!r} (known: page_views)")
        return [r for r in self.rows[: days * len(self.SECTIONS)]
                if section in (None, r["section"])]
