"""Issue 15, item 4: registry queries. "Which MCP servers are deployed, who owns them, and
when were they last reviewed?" in one query: ``sidekey registry list`` (from the running
daemon, or ``--offline`` from the files) and ``GET /v1/registry`` (tier security), on the
seed files; and a call naming a server that only the central registry knows as deprecated
(the seed's legacy-crm, which mcp-server-registry.yaml does not declare) answers
``server_deprecated`` naming the date and crm-v2, not ``server_unknown``."""

from __future__ import annotations

import datetime
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from harness import Daemon, run_as
from sidekey import daemon as daemon_mod
from sidekey import registry
from sidekey.audit import AuditLog
from sidekey.audit.jsonl import open_jsonl_sink
from sidekey.backends import build_backends
from sidekey.config import load_config
from sidekey.peer import attest
from sidekey.protocol import BadRequest
from sidekey.server import ConnectionState, Request
from sidekey.store import open_store
from test_cli import sidekey

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
SEED = REPO.parent / "shared" / "seed-configs"
if not SEED.is_dir():  # the quickstart carries identical copies of the seed files
    SEED = REPO / "examples" / "quickstart"
SEED_FILES = ("mcp-server-registry.yaml", "central-registry.yaml",
              "agent-tool-mappings.yaml", "rate-limits.yaml")
AS_OF = "2026-05-20"  # content-api reviewed 66 days before, analytics-db 49

# `sidekey registry list --stale 60 --as-of 2026-05-20` against a daemon running the seed
# files: content-api (last review 2026-03-15) and legacy-crm (never reviewed), not
# analytics-db (2026-04-01). The quickstart config does not poll health (disabled).
STALE_60_DAEMON = """\
2 server(s); registry 2026-04-07; as of 2026-05-20; last review older than 60 days (or never); from the running daemon
SERVER       OWNER         VERSION  STATUS      DEPRECATION  REPLACEMENT  LAST REVIEW       HEALTH    HOST      CALLS
content-api  content-team  3.1.0    active      -            -            2026-03-15 (66d)  disabled  declared  allow
legacy-crm   sales-ops     1.0.3    deprecated  2026-06-01   crm-v2       never             disabled  -         server_deprecated
"""


def seed_config(tmp_path: Path) -> Path:
    """A main config that includes the seed files as they are (nothing else)."""
    main = tmp_path / "sidekey.yaml"
    main.write_text("include:\n" + "".join(f"  - {SEED / f}\n" for f in SEED_FILES))
    return main


def servers_of(body: dict[str, Any]) -> list[str]:
    return [row["server"] for row in body["servers"]]


# --------------------------------------------------------------------------- pure


def test_listing_of_the_seed_files_answers_the_inventory_question(tmp_path: Path) -> None:
    cfg = load_config(seed_config(tmp_path)).config
    today = datetime.date.fromisoformat(AS_OF)
    rows = {r.server: r for r in registry.listing(cfg, today=today)}
    assert list(rows) == ["analytics-db", "content-api", "legacy-crm"]
    content = rows["content-api"]
    assert (content.owner, content.version, content.status, content.last_review,
            content.declared, content.verdict) == (
        "content-team", "3.1.0", "active", datetime.date(2026, 3, 15), True, "allow")
    legacy = rows["legacy-crm"]
    assert (legacy.owner, legacy.status, legacy.deprecation_date, legacy.replacement,
            legacy.last_review, legacy.declared, legacy.verdict) == (
        "sales-ops", "deprecated", datetime.date(2026, 6, 1), "crm-v2", None, False,
        "server_deprecated")
    # "older than DAYS": 66 days is older than 65, not than 66; never reviewed is stale.
    assert [r.server for r in registry.select(list(rows.values()), today=today, stale_days=65)] \
        == ["content-api", "legacy-crm"]
    assert [r.server for r in registry.select(list(rows.values()), today=today, stale_days=66)] \
        == ["legacy-crm"]
    assert [r.server for r in registry.select(list(rows.values()), today=today,
                                              owner="data-team")] == ["analytics-db"]


@pytest.mark.parametrize(("query", "code", "param"), [
    ("stale=-1", "query_param_invalid", "stale"),
    ("stale=abc", "query_param_invalid", "stale"),
    ("stale=1.5", "query_param_invalid", "stale"),
    ("stale=36501", "query_param_invalid", "stale"),
    ("stale=%EF%BC%91", "query_param_invalid", "stale"),  # a full-width digit
    ("stale=1&stale=2", "query_param_invalid", "stale"),
    ("owner=", "query_param_invalid", "owner"),
    ("owner=%20x", "query_param_invalid", "owner"),
    ("owner=" + "x" * 129, "query_param_invalid", "owner"),
    ("as_of=2026-13-01", "query_param_invalid", "as_of"),
    ("as_of=20260520", "query_param_invalid", "as_of"),
    ("bogus=1", "query_param_unknown", "bogus"),
])
def test_bad_query_parameters_are_refused_with_their_name(query: str, code: str, param: str) -> None:
    with pytest.raises(BadRequest) as caught:
        registry.parse_query(query)
    assert caught.value.code == code and caught.value.details["param"] == param
    assert param in caught.value.message


def test_good_query_parameters() -> None:
    assert registry.parse_query("") == registry.RegistryQuery()
    assert registry.parse_query("stale=0&owner=data-team&as_of=2026-05-20") == registry.RegistryQuery(
        stale_days=0, owner="data-team", as_of=datetime.date(2026, 5, 20))


# --------------------------------------------------------------------------- CLI and daemon


def test_registry_list_stale_60_on_the_seed_files_prints_exactly_the_stale_servers(
    daemon: Daemon,
) -> None:
    out = sidekey("registry", "list", "--stale", "60", "--as-of", AS_OF, "--socket", daemon.socket)
    assert out.returncode == 0, out.stderr
    assert out.stdout == STALE_60_DAEMON
    # Without filters: every server, with its health state and what calls get.
    out = sidekey("registry", "list", "--as-of", AS_OF, "--json", "--config", str(daemon.config_path))
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert servers_of(body) == ["analytics-db", "content-api", "legacy-crm"]
    analytics = body["servers"][0]
    assert analytics == {
        "server": "analytics-db", "owner": "data-team", "version": "2.4.1", "status": "active",
        "deprecation_date": None, "replacement": None, "last_review": "2026-04-01",
        "review_age_days": 49,
        "health": {"state": "disabled", "url": "https://mcp.internal.example.com/analytics/health"},
        "declared": True, "listed": True, "verdict": "allow",
        "url": "https://mcp.internal.example.com/analytics",
    }
    assert body["as_of"] == AS_OF and body["registry_version"] == "2026-04-07"
    out = sidekey("registry", "list", "--owner", "sales-ops", "--json", "--socket", daemon.socket)
    assert servers_of(json.loads(out.stdout)) == ["legacy-crm"]


def test_registry_list_offline_reads_the_seed_files_without_a_daemon(tmp_path: Path) -> None:
    main = seed_config(tmp_path)
    out = sidekey("registry", "list", "--offline", "--stale", "60", "--as-of", AS_OF,
                  "--config", str(main))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == (f"2 server(s); registry 2026-04-07; as of {AS_OF}; last review older than "
                        f"60 days (or never); from config files {main}")
    # The same rows as from the daemon, without a health state.
    assert lines[1:] == [
        "SERVER       OWNER         VERSION  STATUS      DEPRECATION  REPLACEMENT  LAST REVIEW       HEALTH  HOST      CALLS",
        "content-api  content-team  3.1.0    active      -            -            2026-03-15 (66d)  -       declared  allow",
        "legacy-crm   sales-ops     1.0.3    deprecated  2026-06-01   crm-v2       never             -       -         server_deprecated",
    ]
    # The daemon is not running: the error says how to read the files instead.
    out = sidekey("registry", "list", "--socket", str(tmp_path / "no.sock"))
    assert out.returncode == 1 and "add --offline" in out.stderr, out.stderr


def test_get_registry_filters_and_tier(daemon: Daemon) -> None:
    status, body = daemon.request("GET", f"/v1/registry?stale=60&as_of={AS_OF}")
    assert status == 200, body
    assert servers_of(body) == ["content-api", "legacy-crm"]
    assert body["filters"] == {"stale": 60, "owner": None}
    status, body = daemon.request("GET", "/v1/registry?owner=content-team")
    assert status == 200 and servers_of(body) == ["content-api"], body
    # Today by the daemon's clock (2026-12-01 or later): every review is older than 60 days.
    status, body = daemon.request("GET", "/v1/registry?stale=60")
    assert servers_of(body) == ["analytics-db", "content-api", "legacy-crm"], body
    # A bad parameter: 400 with its own code naming the parameter, audited.
    for query, code in (("stale=-1", "query_param_invalid"), ("stail=60", "query_param_unknown"),
                        ("as_of=tomorrow", "query_param_invalid")):
        status, body = daemon.request("GET", f"/v1/registry?{query}")
        assert status == 400 and body["error"]["code"] == code, body
        rid = body["error"]["request_id"]
        assert any(e.get("request_id") == rid and e["error"]["code"] == code
                   for e in daemon.audit_events()), query
    # Tier security: an anonymous process (nobody) is refused.
    result = run_as(daemon, 65534, 65534, lambda d: d.request("GET", "/v1/registry"))
    assert result[0] == 403 and result[1]["error"]["code"] == "peer_rejected", result


def test_the_daemons_injected_clock_dates_the_listing(staged: Daemon) -> None:
    """The codebase's clock pattern (``Sidekey(clock=...)``, in process): without
    ``as_of`` the daemon counts review ages to its own clock's date."""
    loaded = load_config(staged.config_path)
    now = datetime.datetime(2026, 5, 20, 23, 59, tzinfo=datetime.UTC).timestamp()

    async def main() -> tuple[int, dict[str, Any]]:
        store = open_store(loaded.state_dir)
        sink = open_jsonl_sink(loaded.audit_path, fsync=True)
        app = daemon_mod.Sidekey(loaded, store=store, audit=AuditLog([sink]),
                                 backends=build_backends(loaded),
                                 codec=daemon_mod.build_codec(loaded), clock=lambda: now)
        a, b = socket.socketpair()
        peer = attest(a)
        try:
            with trio.fail_after(30):
                await handled(app, peer, sink)
        finally:
            peer.close()
            a.close()
            b.close()
            await app.oauth.aclose()
            await sink.aclose()
            await store.aclose()
        return resp_box[0].status, json.loads(resp_box[0].body)

    resp_box: list[Any] = []

    async def handled(app: Any, peer: Any, sink: Any) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            req = Request(method="GET", path="/v1/registry", query="stale=60", headers={},
                          body=b"", peer=peer, request_id="req_t",
                          conn=ConnectionState(peer=peer))
            resp_box.append(await app.handle(req))
            nursery.cancel_scope.cancel()

    status, body = trio.run(main)
    assert status == 200, body
    assert body["as_of"] == AS_OF and servers_of(body) == ["content-api", "legacy-crm"]


# --------------------------------------------------------------------------- legacy-crm


def test_a_call_to_legacy_crm_names_its_date_and_crm_v2(daemon: Daemon) -> None:
    """legacy-crm is only in central-registry.yaml (deprecated from 2026-06-01, replaced
    by crm-v2): the refusal says so, with a registry rule in the audit event."""
    status, body = daemon.authorize("legacy-crm", "list_accounts", agent_id="sales-assistant",
                                    user_token=None)
    assert status == 403, body
    error = body["error"]
    assert error["code"] == "server_deprecated", body
    assert "2026-06-01" in error["message"] and '"crm-v2"' in error["message"]
    assert error["details"]["replacement"] == "crm-v2"
    assert error["details"]["deprecation_date"] == "2026-06-01"
    assert error["details"]["rules_matched"] == ["registry.deprecated:legacy-crm"]
    [event] = [e for e in daemon.events_of("mcp.authorize")
               if e.get("request_id") == error["request_id"]]
    assert event["error"]["code"] == "server_deprecated"
    assert "crm-v2" in event["error"]["message"] and "2026-06-01" in event["error"]["message"]
    assert event["policy"]["rules_matched"] == ["registry.deprecated:legacy-crm"]
    assert event["policy"]["decision"] == "deny"
    # The CLI says it in one line.
    out = sidekey("call", "--server", "legacy-crm", "--tool", "list_accounts", "--agent",
                  "sales-assistant", "--socket", daemon.socket)
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("sidekey: error: server_deprecated: ")
    assert "crm-v2" in out.stderr and "2026-06-01" in out.stderr
    # A server nobody knows is still server_unknown (404).
    status, body = daemon.authorize("crm-v3", "list_accounts", user_token=None)
    assert status == 404 and body["error"]["code"] == "server_unknown", body


def test_a_retired_undeclared_server_is_server_retired(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    path = d.root / "central-registry.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["registry"]["servers"]["legacy-crm"]["status"] = "retired"
    path.write_text(yaml.safe_dump(doc))
    d.start()
    status, body = d.authorize("legacy-crm", "list_accounts", user_token=None)
    assert status == 403 and body["error"]["code"] == "server_retired", body
    assert '"crm-v2"' in body["error"]["message"]
    out = sidekey("registry", "list", "--json", "--socket", d.socket)
    legacy = json.loads(out.stdout)["servers"][-1]
    assert (legacy["server"], legacy["status"], legacy["verdict"]) == (
        "legacy-crm", "retired", "server_retired")


def test_the_health_column_shows_the_daemons_latest_checks(make_daemon: Any) -> None:
    """With policy.registry_health_checks on, each row carries the poller's last result:
    content-api's health endpoint answers (healthy), legacy-crm's port is closed."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/content/health" else 404)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        d: Daemon = make_daemon({"policy": {"registry_health_checks": True}})
        path = d.root / "central-registry.yaml"
        doc = yaml.safe_load(path.read_text())
        entries = doc["registry"]["servers"]
        entries["content-api"]["url"] = f"http://127.0.0.1:{server.server_address[1]}/content"
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]
        entries["legacy-crm"]["url"] = f"http://127.0.0.1:{closed}/crm-v1"
        del entries["analytics-db"]["health_check"]  # not monitored
        path.write_text(yaml.safe_dump(doc))
        d.start()
        deadline = time.monotonic() + 20
        while True:
            out = sidekey("registry", "list", "--json", "--socket", d.socket)
            assert out.returncode == 0, out.stderr
            health = {r["server"]: r["health"] for r in json.loads(out.stdout)["servers"]}
            states = {s: (h or {}).get("state") for s, h in health.items()}
            if states == {"analytics-db": None, "content-api": "healthy",
                          "legacy-crm": "unhealthy"} or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert states == {"analytics-db": None, "content-api": "healthy",
                          "legacy-crm": "unhealthy"}, health
        out = sidekey("registry", "list", "--socket", d.socket)
        rows = {line.split()[0]: line for line in out.stdout.splitlines()[2:]}
        assert "  healthy  " in rows["content-api"] and "  unhealthy  " in rows["legacy-crm"]
    finally:
        server.shutdown()
        server.server_close()
