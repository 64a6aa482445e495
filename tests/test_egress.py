"""Issue 16, item 1: egress with injection.

A tool's secret with an ``egress:`` rule is never handed out: the MCP server sends its
upstream HTTPS requests through the daemon (``Lease.http_client()``), which checks them
against the rule, injects the credential and sends them itself over verified TLS. These
tests run a real daemon and a real HTTPS upstream with its own CA
(tests/https_upstream.py), and drive them through the Python client under asyncio and
trio (and the sync client): the credential reaches the upstream and nothing the MCP
server's process gets or holds contains it; refusals (host, method, path, after
release, another process) are precise and audited; slow and huge upstreams are cut;
an upstream echoing the credential has it stripped; an upstream whose certificate is
not from the configured CA fails with its own code.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from harness import Daemon, UnixHTTPConnection, run_as
from https_upstream import Upstream, make_ca, start_upstream
from sidekey import egress as eg
from sidekey.client import (
    AccessDenied,
    AsyncClient,
    BadRequestError,
    Client,
    ConflictError,
    SidekeyClientError,
)

pytestmark = pytest.mark.integration
SRC = Path(__file__).resolve().parents[1] / "src"
READ_KEY = "content-api/read-key"  # list_articles: header injection, the upstream's CA
WRITE_KEY = "content-api/write-key"  # create_article: a CA the upstream is not from
PUBLISH_KEY = "content-api/publish-key"  # publish_article: query parameter
DSN = "analytics-db/readonly-dsn"  # query_metrics: basic auth (a value with : / @)


class Env:
    def __init__(self, d: Daemon, up: Upstream) -> None:
        self.d = d
        self.up = up

    def url(self, path: str) -> str:
        return f"https://{self.up.host}{path}"

    def secret(self, name: str) -> str:
        return self.d.secrets[name]


def _config(up: Upstream, other_ca: Path) -> dict[str, Any]:
    host = up.host
    return {"secrets": {
        "content-api": {
            "list_articles": {"CONTENT_API_KEY": {
                "backend": "local", "name": READ_KEY, "egress": {
                    "hosts": [host], "methods": ["GET", "HEAD", "POST"],
                    "paths": ["/echo", "/slow", "/huge", "/redirect", "/ok"],
                    "inject": {"header": "Authorization", "value": "Bearer {CONTENT_API_KEY}"},
                    "ca_file": str(up.ca_file), "timeout_s": 2,
                    "max_response_bytes": 1024 * 1024}}},
            "create_article": {"CONTENT_API_KEY": {
                "backend": "local", "name": WRITE_KEY, "egress": {
                    "hosts": [host], "methods": ["GET", "POST"],
                    "inject": {"header": "X-Api-Key", "value": "{CONTENT_API_KEY}"},
                    "ca_file": str(other_ca)}}},
            "publish_article": {"CONTENT_API_KEY": {
                "backend": "local", "name": PUBLISH_KEY, "egress": {
                    "hosts": [host],
                    "inject": {"query": {"name": "api_key", "value": "{CONTENT_API_KEY}"}},
                    "ca_file": str(up.ca_file)}}},
        },
        "analytics-db": {
            "query_metrics": {"DATABASE_URL": {
                "backend": "local", "name": DSN, "egress": {
                    "hosts": [host],
                    "inject": {"basic": {"username": "svc", "password": "{DATABASE_URL}"}},
                    "ca_file": str(up.ca_file), "max_response_bytes": 4 * 1024 * 1024}}},
        },
    }}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("egress")
    up = start_upstream(tmp / "up")
    other_ca, _, _ = make_ca(tmp, name="another CA")
    os.chmod(tmp, 0o755)
    d = Daemon(_config(up, other_ca)).start()
    try:
        yield Env(d, up)
    finally:
        d.cleanup()
        up.stop()


def _call_kw(d: Daemon, server: str = "content-api") -> dict[str, Any]:
    return {"user_token": d.user_token(server), "agent_id": "content-writer",
            "session_id": "s1", "arguments": {"q": "x"}}


def _run(lib: str, fn: Callable[[], Any]) -> Any:
    """Run the async ``fn`` under asyncio or trio, within a time bound."""
    async def bounded() -> Any:
        if lib == "trio":
            with trio.fail_after(60):
                return await fn()
        return await asyncio.wait_for(fn(), 60)

    return trio.run(bounded) if lib == "trio" else asyncio.run(bounded())


def _texts(*things: Any) -> str:
    return "\n".join(repr(t) if not isinstance(t, bytes | str) else
                     (t.decode("latin-1") if isinstance(t, bytes) else t) for t in things)


def _events(d: Daemon, event_type: str, lease_id: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while True:
        found = [e for e in d.events_of(event_type) if e.get("lease_id") == lease_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


# --------------------------------------------------------------------------- injection


@pytest.mark.parametrize("lib", ["asyncio", "trio"])
def test_injected_header_reaches_upstream_and_never_the_client(env: Env, lib: str) -> None:
    d, up = env.d, env.up
    secret = env.secret(READ_KEY)

    async def scenario() -> dict[str, Any]:
        client = AsyncClient(d.socket)
        async with client.tool_call("content-api", "list_articles", **_call_kw(d)) as lease:
            assert lease.egress == ("CONTENT_API_KEY",)
            assert dict(lease.secrets) == {}
            async with lease.http_client() as http:
                r = await http.get(env.url("/echo/a"), params={"q": "v1", "page": "2"},
                                   headers={"Authorization": "Bearer forged",
                                            "Cookie": "c=1", "X-Mine": "m"})
                head = await http.head(env.url("/ok"))
                posted = await http.post(env.url("/echo/p"), json={"k": "v"})
                redirected = await http.get(env.url("/redirect"))
        await client.close()
        return {"lease": lease, "r": r, "head": head, "posted": posted,
                "redirected": redirected}

    before = len(up.seen)
    out = _run(lib, scenario)
    r = out["r"]
    assert r.status_code == 200
    seen = up.seen[before]
    # The upstream got the daemon's credential, not the one the server tried to send,
    # and no cookie.
    assert seen.headers["authorization"] == f"Bearer {secret}"
    assert "cookie" not in seen.headers and seen.headers["x-mine"] == "m"
    # The upstream set a cookie on /echo: never sent back (the daemon keeps no jar).
    assert all("cookie" not in s.headers for s in up.seen[before:])
    assert seen.path == "/echo/a?q=v1&page=2"
    assert seen.headers["accept-encoding"] == "identity"  # what is redacted is what was sent
    # Echoed back in a header and in the body: stripped and redacted.
    assert "x-echo-authorization" not in r.headers
    assert "set-cookie" not in r.headers and r.headers["x-upstream"] == "yes"
    assert r.json()["authorization"] == "[REDACTED]"  # the whole rendered value
    assert out["head"].status_code == 200
    assert out["posted"].json()["body"] == '{"k":"v"}' and out["posted"].json()["method"] == "POST"
    # A redirect comes back as it is (never followed by the daemon).
    assert out["redirected"].status_code == 302
    assert out["redirected"].headers["location"] == "/echo"
    everything = _texts(out["lease"], *(o.headers.raw for o in out.values()
                                         if isinstance(o, httpx.Response)),
                        *(o.content for o in out.values() if isinstance(o, httpx.Response)))
    assert secret not in everything
    # The call's audit event lists the upstream requests: no query values, no credential.
    lease_id = out["lease"].lease_id
    [call] = _events(d, "mcp.tool_call", lease_id)
    entries = call["egress"]
    assert [(e["method"], e["path"], e["status"]) for e in entries] == [
        ("GET", "/echo/a", 200), ("HEAD", "/ok", 200), ("POST", "/echo/p", 200),
        ("GET", "/redirect", 302)]
    first = entries[0]
    assert first["host"] == "localhost" and first["port"] == up.port
    assert first["query"] == ["q", "page"]
    assert first["bytes_in"] > 0 and first["duration_ms"] >= 0
    # in the body twice: as "authorization" and among the echoed "headers"
    assert first["credential_echoed"] == {"headers_stripped": 1, "body_redacted": 2}
    [redeem] = _events(d, "mcp.redeem", lease_id)
    assert redeem["secrets"][0]["egress"] is True
    assert "v1" not in json.dumps(entries)
    assert secret.encode() not in d.everything_written()


def test_sync_client_basic_auth_and_query_injection(env: Env) -> None:
    d, up = env.d, env.up
    dsn, key = env.secret(DSN), env.secret(PUBLISH_KEY)
    with Client(d.socket) as client:
        with (client.tool_call("analytics-db", "query_metrics", **_call_kw(d, "analytics-db"))
              as lease, lease.http_client() as http):
            basic = http.get(env.url("/echo/basic"))
        before = len(up.seen)
        with (client.tool_call("content-api", "publish_article", **_call_kw(d)) as lease2,
              lease2.http_client() as http):
            query = http.get(env.url("/echo/q"), params={"api_key": "forged", "x": "1"})
    import base64
    blob = base64.b64encode(f"svc:{dsn}".encode()).decode()
    assert basic.status_code == 200
    assert basic.json()["authorization"] == "Basic [REDACTED]"
    assert "x-echo-authorization" not in basic.headers
    seen = up.seen[before]
    import urllib.parse
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(seen.path).query) == {
        "x": ["1"], "api_key": [key]}
    assert query.status_code == 200 and "x-echo-query" not in query.headers
    assert key not in query.text and "[REDACTED]" in query.json()["query"]
    for text in (_texts(basic.headers.raw, basic.content, lease), _texts(query.headers.raw, query.content, lease2)):
        assert dsn not in text and blob not in text and key not in text
    # The query-injected credential is in the URL the daemon sends: never in its log.
    assert key.encode() not in d.everything_written() and dsn.encode() not in d.everything_written()


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("lib", ["asyncio", "trio"])
def test_disallowed_host_method_path_refused_and_audited(env: Env, lib: str) -> None:
    d, up = env.d, env.up

    async def scenario() -> tuple[str, list[SidekeyClientError], Exception]:
        client = AsyncClient(d.socket)
        errors: list[SidekeyClientError] = []
        async with (client.tool_call("content-api", "list_articles", **_call_kw(d)) as lease,
                    lease.http_client() as http):
            for method, url in (("GET", f"https://127.0.0.1:{up.port}/echo"),
                                ("DELETE", env.url("/echo")),
                                ("GET", env.url("/admin")),
                                ("GET", env.url("/echo/../admin")),
                                ("GET", env.url("/echo%2F..%2Fadmin"))):
                try:
                    await http.request(method, url)
                except SidekeyClientError as exc:
                    errors.append(exc)
            try:
                await http.get(f"http://{up.host}/echo")
            except httpx.UnsupportedProtocol as exc:
                plain: Exception = exc
        await client.close()
        return lease.lease_id, errors, plain

    before = len(up.seen)
    lease_id, errors, plain = _run(lib, scenario)
    # httpx removes the dot segments of /echo/../admin itself (so the daemon sees
    # /admin); an encoded one cannot be removed and is refused as ambiguous.
    assert [(type(e), e.status, e.code) for e in errors] == [
        (AccessDenied, 403, "egress_not_allowed"), (AccessDenied, 403, "egress_not_allowed"),
        (AccessDenied, 403, "egress_not_allowed"), (AccessDenied, 403, "egress_not_allowed"),
        (BadRequestError, 400, "egress_bad_target")]
    assert "host 127.0.0.1" in errors[0].message and "DELETE" in errors[1].message
    assert "https" in str(plain)
    assert len(up.seen) == before  # nothing reached the upstream
    refused = _events(d, "egress.refused", lease_id)
    assert [(e["error"]["code"], e["egress"]["method"], e["egress"]["host"]) for e in refused] == [
        ("egress_not_allowed", "GET", "127.0.0.1"), ("egress_not_allowed", "DELETE", "localhost"),
        ("egress_not_allowed", "GET", "localhost"), ("egress_not_allowed", "GET", "localhost")]
    [call] = _events(d, "mcp.tool_call", lease_id)
    assert [e["error"] for e in call["egress"]] == ["egress_not_allowed"] * 4
    bad = [e for e in d.events_of("request.rejected") if lease_id in e.get("path", "")]
    assert [e["error"]["code"] for e in bad] == ["egress_bad_target"]


@pytest.mark.parametrize("lib", ["asyncio", "trio"])
def test_request_after_release_refused(env: Env, lib: str) -> None:
    d, up = env.d, env.up

    async def scenario() -> tuple[str, SidekeyClientError]:
        client = AsyncClient(d.socket)
        async with client.tool_call("content-api", "list_articles", **_call_kw(d)) as lease:
            http = lease.http_client()
            assert (await http.get(env.url("/ok"))).status_code == 200
        try:
            await http.get(env.url("/ok"))
        except SidekeyClientError as exc:
            error = exc
        await http.aclose()
        await client.close()
        return lease.lease_id, error

    before = len(up.seen)
    lease_id, error = _run(lib, scenario)
    assert isinstance(error, ConflictError) and error.code == "lease_released"
    assert len(up.seen) == before + 1
    [refused] = _events(d, "egress.refused", lease_id)
    assert refused["error"]["code"] == "lease_released"


def test_other_processes_cannot_use_the_lease(env: Env) -> None:
    """The lease id is not a capability: a process of another uid (not attested) and
    another process of the same uid (not the holder) are refused, and nothing reaches
    the upstream."""
    d, up = env.d, env.up
    path = f"/v1/egress/{{}}/{up.host}/echo"

    def attempt(dd: Daemon) -> dict[str, Any]:
        conn = UnixHTTPConnection(dd.socket, timeout=10)
        try:
            conn.request("GET", path.format(os.environ["SK_LEASE"]))
            resp = conn.getresponse()
            return {"status": resp.status, "body": json.loads(resp.read())}
        finally:
            conn.close()

    before = len(up.seen)
    with (Client(d.socket) as client,
          client.tool_call("content-api", "list_articles", **_call_kw(d)) as lease):
        os.environ["SK_LEASE"] = lease.lease_id
        try:
            nobody = run_as(d, 65534, 65534, attempt)
            sibling = run_as(d, os.getuid(), os.getgid(), attempt)
        finally:
            del os.environ["SK_LEASE"]
        with lease.http_client() as http:
            assert http.get(env.url("/ok")).status_code == 200  # the holder still can
        # The holder itself, raw (no httpx to normalize the path): a dot segment that
        # would escape the allowed prefix upstream is refused, not resolved.
        raw = []
        for tail in ("/../../admin", "/..%2F..%2Fadmin", "/%2e%2e/%2e%2e/admin"):
            conn = UnixHTTPConnection(d.socket, timeout=10)
            try:
                conn.request("GET", path.format(lease.lease_id) + tail)
                resp = conn.getresponse()
                raw.append((resp.status, json.loads(resp.read())["error"]["code"]))
            finally:
                conn.close()
    assert raw == [(400, "egress_bad_target")] * 3
    assert nobody["status"] == 403 and nobody["body"]["error"]["code"] == "peer_rejected"
    assert sibling["status"] == 403 and sibling["body"]["error"]["code"] == "peer_mismatch"
    assert len(up.seen) == before + 1
    rejected = [e for e in d.events_of("peer.rejected")
                if lease.lease_id in e.get("path", "")]
    assert {e["error"]["code"] for e in rejected} == {"peer_rejected", "peer_mismatch"}


# --------------------------------------------------------------------------- faults and caps


@pytest.mark.parametrize("lib", ["asyncio", "trio"])
def test_slow_and_huge_upstreams_are_cut(env: Env, lib: str) -> None:
    d = env.d

    async def scenario() -> tuple[str, list[SidekeyClientError], float]:
        client = AsyncClient(d.socket)
        errors: list[SidekeyClientError] = []
        async with (client.tool_call("content-api", "list_articles", **_call_kw(d)) as lease,
                    lease.http_client() as http):
            started = time.monotonic()
            for url in (env.url("/slow?s=6"), env.url("/huge?mb=8"),
                        env.url("/huge?mb=8&nolength=1")):
                try:
                    await http.get(url)
                except SidekeyClientError as exc:
                    errors.append(exc)
            elapsed = time.monotonic() - started
            # Under the cap it passes whole.
            ok = await http.get(env.url("/huge?mb=0.5"))
            assert ok.status_code == 200 and len(ok.content) == 512 * 1024
        await client.close()
        return lease.lease_id, errors, elapsed

    lease_id, errors, elapsed = _run(lib, scenario)
    assert [(e.status, e.code) for e in errors] == [
        (504, "egress_upstream_timeout"), (502, "egress_response_too_large"),
        (502, "egress_response_too_large")]
    assert errors[1].details["limit"] == "max_response_bytes"
    assert elapsed < 30  # a bound on the hang, not a timing claim (timeout_s is 2)
    failed = _events(d, "egress.failed", lease_id)
    assert [e["error"]["code"] for e in failed] == [
        "egress_upstream_timeout", "egress_response_too_large", "egress_response_too_large"]


def test_result_budget_bounds_egress_over_the_call(env: Env) -> None:
    """query_metrics has max_result_size_kb 512: what flows back over the whole call is
    bounded by it, whatever one rule's max_response_bytes (4 MiB) says."""
    d = env.d
    with (Client(d.socket) as client,
          client.tool_call("analytics-db", "query_metrics", **_call_kw(d, "analytics-db")) as lease,
          lease.http_client() as http):
        first = http.get(env.url("/huge?mb=0.375"))  # 384 KiB of 512
        with pytest.raises(SidekeyClientError) as caught:
            http.get(env.url("/huge?mb=0.25"))
    assert first.status_code == 200
    assert caught.value.code == "egress_response_too_large"
    assert caught.value.details["limit"] == "max_result_size_kb"


def test_caps_on_concurrency_and_count_and_release_cancels_in_flight(env: Env) -> None:
    """At most MAX_IN_FLIGHT_PER_LEASE requests of one lease at once; a release ends
    the requests still in flight (the value is gone with the lease). publish_article's
    rule has the default timeout (10 s); the upstream holds each /hold until told."""
    d, up = env.d, env.up

    async def upstream_holds(count: int) -> None:
        # The upstream records a request when it arrives, before it waits.
        while sum(1 for s in up.seen[before:] if s.path.startswith("/hold")) < count:
            await trio.sleep(0.01)

    async def scenario() -> dict[str, Any]:
        client = AsyncClient(d.socket)
        kw = _call_kw(d)
        token = (await client.authorize("content-api", "publish_article", **kw)).resolution_token
        assert token is not None
        lease = await client.redeem(token, kw["arguments"])
        codes: list[str | int] = []
        async with lease.http_client() as http:

            async def hold() -> None:
                try:
                    codes.append((await http.get(env.url("/hold"))).status_code)
                except SidekeyClientError as exc:
                    codes.append(exc.code)

            async with trio.open_nursery() as nursery:
                for _ in range(eg.MAX_IN_FLIGHT_PER_LEASE):
                    nursery.start_soon(hold)
                await upstream_holds(eg.MAX_IN_FLIGHT_PER_LEASE)
                await hold()  # one more while all of them are held upstream
                up.holds.set()
            counted = list(codes)
            codes.clear()
            up.holds.clear()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold)
                await upstream_holds(eg.MAX_IN_FLIGHT_PER_LEASE + 1)
                await client.release(lease, "success", 1)
            up.holds.set()
        await client.close()
        return {"counted": counted, "after": codes, "lease": lease.lease_id}

    before = len(up.seen)
    try:
        out = _run("trio", scenario)
    finally:
        up.holds.set()
    assert out["counted"] == ["egress_concurrency_limit"] + [200] * eg.MAX_IN_FLIGHT_PER_LEASE
    assert out["after"] == ["egress_lease_ended"]
    [call] = _events(d, "mcp.tool_call", out["lease"])
    assert [e.get("error") for e in call["egress"]].count("egress_concurrency_limit") == 1
    # The request the release cut short: its own event (it ended after the call's).
    [ended] = [e for e in _events(d, "egress.failed", out["lease"])
               if e["error"]["code"] == "egress_lease_ended"]
    assert ended["egress"]["path"] == "/hold"


def test_request_count_cap(env: Env) -> None:
    d = env.d
    with (Client(d.socket) as client,
          client.tool_call("content-api", "list_articles", **_call_kw(d)) as lease,
          lease.http_client() as http):
        for _ in range(eg.MAX_REQUESTS_PER_CALL):
            assert http.get(env.url("/ok")).status_code == 200
        for _ in range(3):  # refused, the first one audited, the others counted
            with pytest.raises(SidekeyClientError) as caught:
                http.get(env.url("/ok"))
            assert (caught.value.status, caught.value.code) == (429, "egress_request_limit")
    assert [e["error"]["code"] for e in _events(d, "egress.refused", lease.lease_id)] == [
        "egress_request_limit"]
    [call] = _events(d, "mcp.tool_call", lease.lease_id)
    # Kept within their bytes (the event's cap), the rest counted.
    kept = len(call["egress"])
    assert 0 < kept <= eg.MAX_AUDIT_ENTRIES and call["egress"][0]["path"] == "/ok"
    assert len(json.dumps(call["egress"], separators=(",", ":"))) <= eg.MAX_AUDIT_BYTES
    assert call["egress_dropped"] == eg.MAX_REQUESTS_PER_CALL + 3 - kept
    assert "_truncated" not in json.dumps(call)


def test_expired_lease_egress_refused(env: Env, make_daemon: Any, tmp_path: Path) -> None:
    up = env.up
    d = make_daemon({**_config(up, up.ca_file), "leases": {"max_ttl_seconds": 2}}).start()
    with Client(d.socket) as client:
        kw = _call_kw(d)
        token = client.authorize("content-api", "list_articles", **kw).resolution_token
        assert token is not None
        lease = client.redeem(token, kw["arguments"])
        with lease.http_client() as http:
            assert http.get(env.url("/ok")).status_code == 200
            [expired] = _events(d, "lease.expired", lease.lease_id)
            with pytest.raises(ConflictError) as caught:
                http.get(env.url("/ok"))
    assert caught.value.code == "lease_expired"
    assert [(e["path"], e["status"]) for e in expired["egress"]] == [("/ok", 200)]


def test_tls_from_another_ca_fails_with_its_code(env: Env) -> None:
    d, up = env.d, env.up
    secret = env.secret(WRITE_KEY)
    before = len(up.seen)
    with (Client(d.socket) as client,
          client.tool_call("content-api", "create_article", **_call_kw(d)) as lease,
          lease.http_client() as http, pytest.raises(SidekeyClientError) as caught):
        http.post(env.url("/echo"), json={})
    assert caught.value.status == 502 and caught.value.code == "egress_tls_failed"
    assert "not trusted" in caught.value.message
    assert len(up.seen) == before  # no request was sent over the untrusted connection
    [failed] = _events(d, "egress.failed", lease.lease_id)
    assert failed["error"]["code"] == "egress_tls_failed"
    assert secret.encode() not in d.everything_written()


# --------------------------------------------------------------------------- the process's view

_CHILD = textwrap.dedent("""
    import asyncio, json, sys
    from sidekey.client import AsyncClient

    async def main():
        sock, tool, token, url = sys.argv[1:5]
        client = AsyncClient(sock)
        kw = dict(user_token=token, agent_id="content-writer", session_id="s1",
                  arguments={"q": "x"})
        async with client.tool_call("content-api", tool, **kw) as lease:
            if lease.egress:
                async with lease.http_client() as http:
                    r = await http.get(url)
                    body = r.text
            else:
                body = lease.secrets["CONTENT_API_KEY"][:0]
        print(json.dumps({"egress": list(lease.egress), "n": len(body)}), flush=True)
        sys.stdin.readline()  # the test scans our memory now
        await client.close()

    asyncio.run(main())
""")


def _scan_memory(pid: int, needle: bytes) -> bool:
    """Whether ``needle`` is anywhere in the readable memory of process ``pid``."""
    found = False
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if "r" not in perms:
                continue
            start, end = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            if needle in chunk:
                found = True
                break
    return found


def _child_holds(socket_path: str, tool: str, token: str, url: str, secret: bytes) -> bool:
    """Run an MCP server's tool call (asyncio) in a child process, then, while it waits
    at its end, scan its whole memory for ``secret``."""
    with subprocess.Popen([sys.executable, "-c", _CHILD, socket_path, tool, token, url],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, "PYTHONPATH": str(SRC)}) as proc:
        assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
        try:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-2000:]
            assert json.loads(line)["n"] >= 0
            return _scan_memory(proc.pid, secret)
        finally:
            proc.stdin.close()
            proc.wait(timeout=30)


@pytest.mark.parametrize(("tool", "key"), [("list_articles", READ_KEY),
                                           ("publish_article", PUBLISH_KEY)])
def test_mcp_server_process_memory_never_holds_the_value(env: Env, tool: str, key: str) -> None:
    d = env.d
    assert not _child_holds(d.socket, tool, d.user_token("content-api"), env.url("/echo/mem"),
                            env.secret(key).encode())


def test_memory_scan_finds_a_handed_out_secret(env: Env, make_daemon: Any) -> None:
    """The scan's control: the same child on a tool whose secret is a plain lease (a
    daemon without egress rules) has the value in its memory, and the scan sees it."""
    d = make_daemon().start()
    assert _child_holds(d.socket, "list_articles", d.user_token("content-api"),
                        env.url("/echo/mem"), d.secrets[READ_KEY].encode())


# --------------------------------------------------------------------------- pure parts


def test_parse_target_refuses_ambiguous_paths() -> None:
    t = eg.parse_target("/v1/egress/lse_ab12/API.example.com:8443/v1/x%20y", "a=1")
    assert (t.host, t.port, t.raw_path, t.path, t.query) == (
        "api.example.com", 8443, "/v1/x%20y", "/v1/x y", "a=1")
    assert eg.parse_target("/v1/egress/lse_ab12/h.example", "").raw_path == "/"
    for bad in ("/v1/egress/lse_ab12/h/a/../b", "/v1/egress/lse_ab12/h/a/%2e%2e/b",
                "/v1/egress/lse_ab12/h/a%2fb", "/v1/egress/lse_ab12/h/a\\b",
                "/v1/egress/lse_ab12/h/%00", "/v1/egress/lse_ab12/*.h/x",
                "/v1/egress/lse_ab12/h/a/..;x/b", "/v1/egress/lse_ab12/h/a/%2e%2e;/b",
                "/v1/egress/lse_ab12/u@h/x", "/v1/egress/nope/h/x", "/v1/egress/lse_ab12/h:0/x"):
        with pytest.raises(eg.BadTarget):
            eg.parse_target(bad, "")


def test_rule_problems_name_each_field() -> None:
    import msgspec

    def problems(rule: dict[str, Any]) -> list[str]:
        return eg.rule_problems("KEY", msgspec.convert(rule, eg.EgressRule), max_body_bytes=1024)

    assert problems({"hosts": ["a.example"], "inject": {"header": "X-K", "value": "{KEY}"}}) == []
    assert problems({"hosts": ["*.example", "https://a", "a:99999"],
                     "inject": {"header": "Host", "value": "{OTHER} {KEY}"},
                     "paths": ["v1", "/a/../b"], "max_request_bytes": 4096}) == [
        ".hosts.0: expected host or host:port (no scheme, path, user info or wildcard)",
        ".hosts.1: expected host or host:port (no scheme, path, user info or wildcard)",
        ".hosts.2: the port must be 1-65535",
        ".paths.0: a path prefix starts with /",
        ".paths.1: no . or .. segments",
        ".inject.header: Host cannot carry a credential here",
        ".inject.value: {OTHER}: a template may name only its own secret, {KEY}",
        ".max_request_bytes: more than listen.max_body_bytes (1024), which bounds every "
        "request the daemon reads",
    ]
    assert problems({"hosts": ["a"], "inject": {"basic": {"username": "u", "password": "p"},
                                                "query": {"name": "k", "value": "{KEY}"}}}) == [
        ".inject: set exactly one of header (with value), basic or query"]
    assert problems({"hosts": ["a"], "inject": {"query": {"name": "k", "value": "static"}}}) == [
        ".inject: no template names the secret ({KEY})"]


def test_config_error_names_the_path(tmp_path: Path) -> None:
    from sidekey.config import load_config
    from sidekey.protocol import ConfigError

    d = Daemon({"secrets": {"content-api": {"list_articles": {"CONTENT_API_KEY": {
        "backend": "local", "name": READ_KEY,
        "egress": {"hosts": ["*.example.com"], "inject": {"header": "Authorization",
                                                           "value": "Bearer {DATABASE_URL}"}}}}}}})
    try:
        with pytest.raises(ConfigError) as caught:
            load_config(d.config_path)
        text = str(caught.value)
        assert "$.secrets.content-api.list_articles.CONTENT_API_KEY.egress.hosts.0" in text
        assert "$.secrets.content-api.list_articles.CONTENT_API_KEY.egress.inject.value" in text
        assert re.search(r"egress\.inject: no template names the secret", text)
    finally:
        d.cleanup()
    for rule, where in (({"timeout_s": 100}, ".egress.timeout_s: expected float <= 60.0"),
                        ({"host": ["a"]}, ".egress: Object contains unknown field host"),
                        ({"methods": ["TRACE"]}, ".egress.methods.0: Invalid enum value")):
        d = Daemon({"secrets": {"content-api": {"list_articles": {"CONTENT_API_KEY": {
            "backend": "local", "name": READ_KEY, "egress": {
                "hosts": ["a.example"], "inject": {"header": "X-K", "value": "{CONTENT_API_KEY}"},
                **rule}}}}}})
        try:
            with pytest.raises(ConfigError, match=re.escape(where)):
                load_config(d.config_path)
        finally:
            d.cleanup()


def test_injection_needles_and_redaction() -> None:
    import msgspec

    rule = msgspec.convert({"hosts": ["a"], "inject": {"basic": {"username": "u",
                                                                 "password": "{K}"}}},
                           eg.EgressRule)
    inj = eg.injection("K", rule, "p/w:@\"x")
    assert inj.headers[0][0] == "authorization" and inj.headers[0][1].startswith("Basic ")
    body = b'{"a": "p/w:@\\"x", "b": "p%2Fw%3A%40%22x", "c": "' + inj.headers[0][1][6:].encode() + b'"}'
    cleaned, n = eg.redact(body, inj.needles)
    assert n == 3 and b"p/w" not in cleaned and b"p%2F" not in cleaned
    headers, ctype, stripped = eg.response_headers(
        [(b"X-Echo", inj.headers[0][1].encode()), (b"Content-Type", b"text/plain"),
         (b"Set-Cookie", b"s=1"), (b"Sidekey-Egress", b"upstream"), (b"X-Ok", b"1")],
        inj.needles)
    assert headers == [(b"x-ok", b"1")] and ctype == b"text/plain" and stripped == 1
    assert eg.upstream_query("a=1&api_key=forged&b", [("api_key", "s/1")]) == "a=1&b&api_key=s%2F1"


# --------------------------------------------------------------------------- sidekey.mcp


def test_governed_mcp_tool_uses_current_lease_http_client(env: Env) -> None:
    """Inside a ``@governed`` tool of the official MCP SDK, ``current_lease().http_client()``
    sends through the daemon: the tool reads the upstream's answer, never the key."""
    import anyio
    from mcp import Client as McpClient
    from mcp.server.mcpserver import MCPServer

    from sidekey.mcp import Governor, current_lease

    d, up = env.d, env.up
    token = d.user_token("content-api")
    gov = Governor(AsyncClient(d.socket), agent_id="content-writer", user_token=lambda: token)
    server = MCPServer("content-api")
    seen: dict[str, Any] = {}

    @server.tool()
    @gov.governed("content-api")
    async def list_articles(query: str) -> str:
        lease = current_lease()
        seen["secrets"] = dict(lease.secrets)
        seen["lease_id"] = lease.lease_id
        async with lease.http_client(base_url=f"https://{up.host}") as http:
            r = await http.get("/echo/mcp", params={"query": query})
        return r.text

    async def main() -> Any:
        try:
            with anyio.fail_after(60):
                async with McpClient(server) as client:
                    return await client.call_tool("list_articles", {"query": "ai"})
        finally:
            await gov.client.close()

    before = len(up.seen)
    result = anyio.run(main, backend="asyncio")
    assert not result.is_error, result
    text = result.content[0].text
    assert json.loads(text)["path"] == "/echo/mcp" and env.secret(READ_KEY) not in text
    assert seen["secrets"] == {}
    assert up.seen[before].headers["authorization"] == f"Bearer {env.secret(READ_KEY)}"
    [call] = _events(d, "mcp.tool_call", seen["lease_id"])
    assert [(e["path"], e["status"]) for e in call["egress"]] == [("/echo/mcp", 200)]


# --------------------------------------------------------------------------- with item 2


def test_a_per_user_downstream_token_is_injected_never_handed_out(env: Env,
                                                                  make_daemon: Any) -> None:
    """Egress composes with a token exchange (``kind: oauth_token_exchange``): the
    daemon exchanges the user's token and injects the per-user downstream token; the
    MCP server sees the upstream's answer only."""
    from oauth_issuer import OAuthIssuer
    from test_token_exchange import DOWNSTREAM, _governed, _user_token

    up = env.up
    with OAuthIssuer(audience="mcp:content-api") as issuer:
        d = _governed(make_daemon, issuer, secrets={"content-api": {"create_article": {
            "DOWNSTREAM_TOKEN": {
                "backend": "idp", "kind": "oauth_token_exchange", "audience": DOWNSTREAM,
                "scopes": ["articles:write"], "egress": {
                    "hosts": [up.host], "methods": ["POST"], "paths": ["/echo/"],
                    "inject": {"header": "Authorization", "value": "Bearer {DOWNSTREAM_TOKEN}"},
                    "ca_file": str(up.ca_file)}}}}})
        before = len(up.seen)
        with (Client(d.socket, timeout=30) as client,
              client.tool_call("content-api", "create_article",
                               user_token=_user_token(issuer, "dave"), agent_id="content-writer",
                               arguments={"t": 1}) as lease,
              lease.http_client() as http):
            r = http.post(env.url("/echo/articles"), json={"title": "t"})
        sent = up.seen[before].headers["authorization"].removeprefix("Bearer ")
        assert issuer.verify_issued(sent, audience=DOWNSTREAM)["sub"] == "dave"
    assert "DOWNSTREAM_TOKEN" not in lease.secrets and lease.egress == ("DOWNSTREAM_TOKEN",)
    assert r.status_code == 200 and sent not in r.text and sent not in str(r.headers)
    assert sent.encode() not in d.everything_written()


def test_ended_egress_records_are_bounded() -> None:
    """The records of ended leases wait for their end event, which pops them; if an end
    never asks (its event failed), at most MAX_ENDED_RECORDS stay, oldest dropped
    first, and a closed grant keeps no value."""
    from types import SimpleNamespace

    from sidekey.daemon.egress import MAX_ENDED_RECORDS, Egress, EgressGrant, EgressState

    state = EgressState()
    daemon = SimpleNamespace(egress_state=state)
    for i in range(MAX_ENDED_RECORDS + 5):
        state.grants[f"l{i}"] = EgressGrant(
            lease_id=f"l{i}", server="s", tool="t", user_id=None, holder=(0, 1, 1),
            expires_at=0.0, rules={}, values={"K": "v"}, needles=(b"v",))
        grant = state.grants[f"l{i}"]
        Egress._egress_close(daemon, f"l{i}")  # type: ignore[arg-type]
        assert grant.closed and grant.values == {} and grant.needles == ()
    assert state.grants == {}
    assert len(state.ended) == MAX_ENDED_RECORDS
    assert "l0" not in state.ended and f"l{MAX_ENDED_RECORDS + 4}" in state.ended
    assert Egress.egress_audit(daemon, "l5") == {"egress": []}  # type: ignore[arg-type]
    assert "l5" not in state.ended
