"""examples/mcp-content-api with its own config (sidekey.yaml there): credentials the MCP
server never holds. ``list_articles`` reaches the HTTPS content API through the
daemon's egress, which injects the content API key; ``query_metrics`` gets a per-user
token the daemon exchanged (RFC 8693) at the demo IdP. The daemon, the example's
upstreams (``upstreams.py``: IdP and APIs over TLS with their own demo CA) and the
example server run as separate processes; the SDK's client drives the server.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import Daemon, free_port, http_mcp_server
from sidekey.backends.local import LocalStore, load_key
from test_mcp_example import EXAMPLE, SERVER, calls, env, ok, tool_calls

pytestmark = pytest.mark.integration

UPSTREAMS = EXAMPLE / "upstreams.py"


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "upstreams.py did not start"
            time.sleep(0.1)


@contextlib.contextmanager
def upstreams(d: Daemon, keys: Path, idp_port: int, api_port: int) -> Iterator[None]:
    log = d.root / "upstreams.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(UPSTREAMS), "--keys", str(keys),
                                 "--idp-port", str(idp_port), "--api-port", str(api_port)],
                                env=env(d), stdout=out, stderr=out)
    try:
        _wait_for_port(idp_port, proc, log)
        _wait_for_port(api_port, proc, log)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def configure(d: Daemon, keys: Path, idp_port: int, api_port: int) -> None:
    """The example's sidekey.yaml mappings on the test daemon (its ports, its CA), and
    the IdP client secret in the daemon's store, as ``run.sh daemon`` puts it there."""
    example = yaml.safe_load((EXAMPLE / "sidekey.yaml").read_text())
    cfg = yaml.safe_load(d.config_path.read_text())
    ca = str(keys / "demo-ca.pem")
    cfg["backends"]["demo-idp"] = {**example["backends"]["demo-idp"], "ca_file": ca,
                                   "token_endpoint": f"https://localhost:{idp_port}/token"}
    listing = example["secrets"]["content-api"]["list_articles"]
    listing["CONTENT_API_KEY"]["egress"].update(hosts=[f"localhost:{api_port}"], ca_file=ca)
    cfg["secrets"]["content-api"]["list_articles"] = listing
    cfg["secrets"]["analytics-db"]["query_metrics"] = \
        example["secrets"]["analytics-db"]["query_metrics"]
    d.config_path.write_text(yaml.safe_dump(cfg))
    store = LocalStore(d.root / "state" / "secrets.enc",
                       load_key(d.root / "keys" / "local.key", None))
    store.put("demo-idp/client-secret", (keys / "demo-idp-client-secret").read_text().strip())


def test_the_server_never_holds_the_cms_key_nor_a_shared_metrics_password(
    make_daemon: Any, tmp_path: Path,
) -> None:
    d: Daemon = make_daemon()
    keys = tmp_path / "keys"
    keys.mkdir()
    # The demo IdP is the users' issuer: it signs with the key the daemon trusts.
    (keys / "demo-issuer.pem").write_bytes(d.issuer_key.read_bytes())
    (keys / "demo-issuer.pem").chmod(0o600)
    (keys / "demo-issuer-jwks.json").write_bytes(d.issuer_jwks.read_bytes())
    subprocess.run([sys.executable, str(UPSTREAMS), "--keys", str(keys), "--init"],
                   check=True, timeout=60, env=env(d))
    idp_port, api_port, mcp_port = free_port(), free_port(), free_port()
    configure(d, keys, idp_port, api_port)
    d.start()
    server_env = env(d, SIDEKEY_EXAMPLE_API=f"https://localhost:{api_port}",
                     SIDEKEY_EXAMPLE_CA=str(keys / "demo-ca.pem"))
    content = d.user_token("content-api", extra={"azp": "content-writer"})
    alice = d.user_token("analytics-db", extra={"azp": "content-writer"})
    bob = d.user_token("analytics-db", user="bob", extra={"azp": "content-writer"})
    with upstreams(d, keys, idp_port, api_port):
        with http_mcp_server([sys.executable, str(SERVER), "--transport", "http",
                              "--port", str(mcp_port)], port=mcp_port, env=server_env,
                             log_path=d.root / "mcp-content.log") as url:
            [listed] = calls(url, ("list_articles", {"query": "hello"}), token=content)
        with http_mcp_server([sys.executable, str(SERVER), "--transport", "http", "--server",
                              "analytics-db", "--port", str(mcp_port)], port=mcp_port,
                             env=server_env, log_path=d.root / "mcp-analytics.log") as url:
            [for_alice] = calls(url, ("query_metrics", {"query": {"days": 1}}), token=alice)
            [for_bob] = calls(url, ("query_metrics", {"query": {"days": 1}}), token=bob)

    # list_articles: the CMS got the read key (by fingerprint), injected by the daemon.
    assert [a["title"] for a in ok(listed)["articles"]] == ["Hello, sidekey"]
    assert "list (https) accepted read key" in (d.root / "upstream.log").read_text()
    key = d.secrets["content-api/read-key"]
    everything_returned = json.dumps([r.model_dump(mode="json") for r in (listed,)])
    assert key not in everything_returned
    # query_metrics: each user's own downstream token, for the metrics audience.
    assert ok(for_alice)["user"] == "alice" and ok(for_bob)["user"] == "bob"
    assert len(ok(for_alice)["rows"]) == 4
    events = {(e["server"], e["user_id"]): e for e in tool_calls(d, 3)}
    [egress] = events[("content-api", "alice")]["egress"]
    assert (egress["method"], egress["host"], egress["port"], egress["status"]) == \
        ("GET", "localhost", api_port, 200), egress
    assert egress["path"].startswith("/cms/articles"), egress
    redeemed = [s for e in d.events_of("mcp.redeem") if e["server"] == "analytics-db"
                for s in e["secrets"]]
    assert {s["kind"] for s in redeemed} == {"oauth_token_exchange"}, redeemed
    assert all(s["audience"] == "https://metrics.example.com" for s in redeemed), redeemed
    # No key, token or client secret in anything the daemon wrote.
    written = d.audit_path.read_text() + d.log()
    for secret in (key, (keys / "demo-idp-client-secret").read_text().strip(), alice, bob):
        assert secret not in written
