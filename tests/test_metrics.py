"""Prometheus metrics (sidekey.metrics, daemon/scrape.py): scraped from a real daemon,
over its socket (GET /v1/metrics, tier admin) and over the loopback TCP listener
(metrics.listen), during and after real governed calls, and parsed with
prometheus_client's own parser."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from harness import Daemon, UnixHTTPConnection, free_port, run_as
from sidekey.client import Client
from sidekey.config import Config, load_config
from sidekey.daemon import scrape as scrape_mod
from sidekey.metrics import CODES, OTHER, Metrics, Snapshot, quota_limit_kind
from sidekey.protocol import ConfigError

SERVER, AGENT = "content-api", "content-writer"
SRC = Path(__file__).resolve().parents[1] / "src" / "sidekey"
WAIT_S = 30.0  # bounds a wait for something that must come (never a timing assertion)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --------------------------------------------------------------------------- helpers


def parse(text: str) -> Samples:
    """Every sample of a scrape, parsed by prometheus_client's parser."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def has(samples: Samples, name: str, **labels: str) -> bool:
    want = set(labels.items())
    return any(n == name and want <= ls for (n, ls) in samples)


def scrape_socket(d: Daemon) -> tuple[int, str, str]:
    """(status, content type, body) of GET /v1/metrics on the daemon's socket."""
    conn = UnixHTTPConnection(d.socket, timeout=10)
    try:
        conn.request("GET", "/v1/metrics")
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type") or "", resp.read().decode()
    finally:
        conn.close()


def metrics(d: Daemon) -> Samples:
    status, ctype, body = scrape_socket(d)
    assert status == 200, body
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    return parse(body)


def wait_for(d: Daemon, ok: Callable[[Samples], bool]) -> Samples:
    """Scrape until ``ok`` holds (bounded: a hang fails, a slow machine only waits)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        samples = metrics(d)
        if ok(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def tcp_get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type") or "", resp.read().decode()
    finally:
        conn.close()


def tcp_raw(port: int, data: bytes, *, timeout: float = 15.0) -> bytes:
    """Send ``data``, read until the listener closes (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return b""
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


CALL: dict[str, Any] = {"agent_id": AGENT, "arguments": {"title": "hello"}}


# --------------------------------------------------------------------------- pure


def test_every_error_code_in_the_source_is_a_known_label_value() -> None:
    """A code="..." literal that CODES does not list would be counted as _other: add
    new codes to sidekey.metrics.CODES when they are introduced."""
    found: set[str] = set()
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        found.update(re.findall(r'\bcode ?= ?"([a-z_]+)"', text))
        # the decision chain's denials: policy's stop("code", ...), registry's constants
        found.update(re.findall(r'\bstop\(\s*"([a-z_]+)"', text))
        if path.name == "registry.py":
            found.update(re.findall(r'^[A-Z_]+ = "([a-z_]+)"$', text, re.M))
    assert {"scope_missing", "server_deprecated", "tool_unknown", "token_expired"} <= found
    missing = sorted(found - CODES)
    assert not missing, f"add to sidekey.metrics.CODES: {missing}"


def test_label_values_are_bounded_by_the_config(staged: Daemon) -> None:
    cfg = load_config(staged.config_path).config
    current: list[Config] = [cfg]
    m = Metrics(lambda: current[0])
    m.request("/v1/authorize", ("content-api", "create_article"), "ok", 0.001)
    m.request("/v1/authorize", ("evil-server", "x" * 500), "ok", 0.001)
    m.request("/v1/authorize", ("content-api", "no_such_tool"), "made_up_code", 0.001)
    m.decision("content-api", "create_article", "allow", None)
    m.decision("nope", "nope", "weird", "nope")
    m.quota_refused("per_tool.create_article.requests_per_minute")
    m.quota_refused("per_department.marketing.monthly_tool_calls")
    m.quota_refused("something.else")
    m.backend_fetch("unknown-backend", 0.01, ok=False)
    snapshot = Snapshot(leases_active=0, approvals_pending=None, approvals_waiting=0,
                        connections=0, in_flight=0, config_generation=1, store="sqlite",
                        store_up=True)
    s = parse(m.render(snapshot).decode())
    assert value(s, "sidekey_requests_total", server="content-api", tool="create_article") == 1
    assert value(s, "sidekey_requests_total", server=OTHER, tool=OTHER) == 1
    assert value(s, "sidekey_requests_total", tool=OTHER, code=OTHER) == 1
    assert value(s, "sidekey_decisions_total", decision="allow", code="ok") == 1
    assert value(s, "sidekey_decisions_total", server=OTHER, decision=OTHER, code=OTHER) == 1
    assert value(s, "sidekey_quota_refusals_total", limit="per_tool.requests_per_minute") == 1
    assert value(s, "sidekey_quota_refusals_total",
                 limit="per_department.monthly_tool_calls") == 1
    assert value(s, "sidekey_quota_refusals_total", limit=OTHER) == 1
    assert value(s, "sidekey_backend_fetch_duration_seconds_count", backend=OTHER) == 1
    assert not has(s, "sidekey_approvals_pending")  # unknown is left out, not 0
    assert "evil-server" not in m.render(snapshot).decode()
    # A reload (a new Config object) changes the accepted names, nothing is registered
    # again and no counter restarts.
    current[0] = msgspec.structs.replace(cfg, servers={})
    m.request("/v1/authorize", ("content-api", "create_article"), "ok", 0.001)
    s = parse(m.render(snapshot).decode())
    assert value(s, "sidekey_requests_total", server="content-api") == 2  # as before
    assert value(s, "sidekey_requests_total", server=OTHER) == 2  # the new one, now unknown
    assert quota_limit_kind("in_flight_cap") == "in_flight_cap"


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "10.1.2.3:9464", "[::]:9464",
                                    "localhost:9464", "9464", "127.0.0.1:99999", "::1:9464"])
def test_non_loopback_listen_is_refused_at_load(staged: Daemon, listen: str) -> None:
    cfg = yaml.safe_load(staged.config_path.read_text())
    cfg["metrics"] = {"listen": listen}
    staged.config_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"sidekey\.yaml: \$\.metrics\.listen: ") as info:
        load_config(staged.config_path)
    assert listen in str(info.value)


def test_loopback_listen_loads_and_unknown_keys_are_refused(staged: Daemon) -> None:
    cfg = yaml.safe_load(staged.config_path.read_text())
    for listen in ("127.0.0.1:9464", "[::1]:9464", "127.0.0.53:1"):
        cfg["metrics"] = {"listen": listen}
        staged.config_path.write_text(yaml.safe_dump(cfg))
        assert load_config(staged.config_path).config.metrics.listen == listen
    cfg["metrics"] = {"listen": "127.0.0.1:9464", "port": 1}
    staged.config_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"\$\.metrics\.port: unknown key"):
        load_config(staged.config_path)


def test_daemon_refuses_to_start_on_a_non_loopback_listen(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"metrics": {"listen": "0.0.0.0:9464"}})
    with pytest.raises(RuntimeError, match=r"\$\.metrics\.listen: \"0\.0\.0\.0:9464\": "
                                           r"0\.0\.0\.0 is not a loopback address"):
        d.start()


# --------------------------------------------------------------------------- real daemon


@pytest.mark.integration
def test_scrape_during_and_after_real_calls(make_daemon: Any) -> None:
    """Counters move with real governed calls (allowed, denied with its code, rate
    limited with its limit, held for approval), histograms have counts, the gauges read
    the daemon's state, and no secret or token appears anywhere in a scrape."""
    dead_port = free_port()  # nothing listens: the webhook sink falls behind
    d: Daemon = make_daemon({
        "backends": {"local": {"cache_ttl_s": 60}},
        "audit": {"sinks": [{"type": "webhook", "name": "siem", "timeout_s": 1,
                             "url": f"http://127.0.0.1:{dead_port}/ingest"}]},
    }, seed_limits=True).start()
    token = d.user_token(SERVER)
    before = metrics(d)
    assert value(before, "sidekey_requests_total", endpoint="/v1/authorize") == 0
    assert value(before, "sidekey_leases_active") == 0
    seen_tokens: list[str] = [token]
    with Client(socket_path=d.socket) as client:
        with client.tool_call(SERVER, "list_articles", user_token=token, **CALL) as lease:
            during = metrics(d)  # while the lease is active
            assert value(during, "sidekey_leases_active") == 1
            assert value(during, "sidekey_requests_total", endpoint="/v1/authorize",
                         server=SERVER, tool="list_articles", code="ok") == 1
            assert value(during, "sidekey_decisions_total", server=SERVER, tool="list_articles",
                         decision="allow", code="ok") == 1
        after_one = metrics(d)
        assert value(after_one, "sidekey_leases_active") == 0
        assert value(after_one, "sidekey_requests_total", endpoint="/v1/release",
                     server=SERVER, tool="list_articles", code="ok") == 1
        # the same static secret again: answered from the backend's value cache
        with client.tool_call(SERVER, "list_articles", user_token=token, **CALL):
            pass
        del lease
    s = metrics(d)
    assert value(s, "sidekey_backend_cache_misses_total", backend="local") == 1
    assert value(s, "sidekey_backend_cache_hits_total", backend="local") == 1
    assert value(s, "sidekey_backend_fetch_duration_seconds_count", backend="local",
                 outcome="ok") == 2

    # a denial, counted with its code (an agent the mappings do not know)
    status, body = d.authorize(SERVER, "list_articles", agent_id="intruder-agent")
    assert status == 403, body
    code = body["error"]["code"]
    # the seed's create_article: 10 a minute per user, approval needed beyond 5
    statuses = [d.authorize(SERVER, "create_article")[0] for _ in range(11)]
    assert statuses == [200] * 5 + [202] * 5 + [429], statuses
    s = wait_for(d, lambda s: value(s, "sidekey_approvals_pending") == 5)
    assert value(s, "sidekey_approvals_pending") == 5
    assert value(s, "sidekey_decisions_total", server=SERVER, tool="list_articles",
                 decision="deny", code=code) == 1
    assert value(s, "sidekey_requests_total", endpoint="/v1/authorize", code=code) == 1
    assert value(s, "sidekey_decisions_total", tool="create_article", decision="allow") == 5
    assert value(s, "sidekey_decisions_total", tool="create_article",
                 decision="pending_approval", code="pending_approval") == 5
    assert value(s, "sidekey_requests_total", endpoint="/v1/authorize", tool="create_article",
                 code="pending_approval") == 5
    assert value(s, "sidekey_decisions_total", tool="create_article", decision="deny",
                 code="rate_limited") == 1
    assert value(s, "sidekey_quota_refusals_total", limit="per_tool.requests_per_minute") == 1
    assert value(s, "sidekey_requests_total", endpoint="/v1/authorize", tool="create_article",
                 code="rate_limited") == 1
    # histograms have counts
    assert value(s, "sidekey_request_duration_seconds_count", endpoint="/v1/authorize") == 14
    assert value(s, "sidekey_request_duration_seconds_bucket", endpoint="/v1/authorize",
                 le="+Inf") == 14
    assert value(s, "sidekey_request_duration_seconds_sum", endpoint="/v1/authorize") > 0
    assert value(s, "sidekey_audit_commit_duration_seconds_count") >= 1
    # state store and audit sinks: the file is up; the webhook cannot deliver and
    # falls behind (its spool is the audit file)
    assert value(s, "sidekey_state_store_up", store="sqlite") == 1
    assert value(s, "sidekey_state_store_errors_total", store="sqlite") == 0
    assert value(s, "sidekey_audit_sink_up", sink="file", type="jsonl") == 1
    s = wait_for(d, lambda s: value(s, "sidekey_audit_sink_up", sink="siem") == 0)
    assert value(s, "sidekey_audit_sink_up", sink="siem", type="webhook") == 0
    assert value(s, "sidekey_audit_sink_lines_behind", sink="siem") > 0
    assert value(s, "sidekey_audit_sink_spool_bytes", sink="siem") > 0
    assert value(s, "process_resident_memory_bytes") > 0

    # no secret value, user token, resolution token or token id in any scrape
    _, _, text = scrape_socket(d)
    status, body = d.authorize(SERVER, "list_articles")
    seen_tokens += [body["resolution_token"], d.user_token("analytics-db")]
    _, _, text2 = scrape_socket(d)
    for scraped in (text, text2):
        for secret in d.secrets.values():
            assert secret not in scraped
        for t in seen_tokens:
            assert t not in scraped
            assert t.split(".")[-1] not in scraped  # not even a signature
        assert "alice" not in scraped  # no user ids either
        assert "intruder-agent" not in scraped


@pytest.mark.integration
def test_counters_keep_moving_while_calls_run(make_daemon: Any) -> None:
    """Scrapes interleaved with calls from another thread: every counter only grows,
    and the last scrape counts every call."""
    d: Daemon = make_daemon().start()
    token = d.user_token(SERVER)
    calls = 30
    done = threading.Event()
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            with Client(socket_path=d.socket) as client:
                for _ in range(calls):
                    with client.tool_call(SERVER, "create_article", user_token=token,
                                          **CALL):
                        pass
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=caller)
    thread.start()
    seen: list[float] = []
    deadline = time.monotonic() + WAIT_S * 2
    while not done.is_set() and time.monotonic() < deadline:
        s = metrics(d)
        seen.append(value(s, "sidekey_requests_total", endpoint="/v1/release", code="ok"))
    thread.join(WAIT_S)
    assert not errors, errors
    assert seen == sorted(seen), seen
    s = metrics(d)
    assert value(s, "sidekey_requests_total", endpoint="/v1/authorize", server=SERVER,
                 tool="create_article", code="ok") == calls
    assert value(s, "sidekey_requests_total", endpoint="/v1/release", code="ok") == calls
    assert value(s, "sidekey_backend_fetch_duration_seconds_count", backend="local") == calls
    assert value(s, "sidekey_leases_active") == 0


@pytest.mark.integration
def test_non_admin_peer_gets_403_on_metrics(daemon: Daemon) -> None:
    def scrape(d: Daemon) -> dict[str, Any]:
        status, body = d.request("GET", "/v1/metrics")
        return {"status": status, "body": body}

    got = run_as(daemon, 65534, 65534, scrape)
    assert got["status"] == 403, got
    assert got["body"]["error"]["code"] == "peer_rejected"
    assert "sidekey_" not in json.dumps(got)
    # refused and audited like any endpoint above the caller's tier; counted too
    refusals = [e for e in daemon.events_of("peer.rejected")
                if e.get("path") == "/v1/metrics"]
    assert refusals and refusals[0]["peer"]["uid"] == 65534
    s = metrics(daemon)
    assert value(s, "sidekey_requests_total", endpoint="/v1/metrics", code="peer_rejected") == 1


@pytest.mark.integration
def test_a_corrupt_state_store_shows_as_down_with_errors(make_daemon: Any) -> None:
    """A damaged state database (a real corrupt page, found by the start-up check): the
    store is down, every call fails closed and counts as a store error; the pending
    approvals the store cannot list are left out rather than reported as 0."""
    from test_hostile_files import _corrupt_burned_jti_page

    d: Daemon = make_daemon().start()
    assert d.authorize()[0] == 200
    assert value(metrics(d), "sidekey_state_store_up", store="sqlite") == 1
    assert d.stop() == 0
    _corrupt_burned_jti_page(d.root / "state" / "state.db")
    d.start()
    status, body = d.authorize()
    assert status == 503 and body["error"]["code"] == "state_corrupt", body
    s = metrics(d)
    assert value(s, "sidekey_state_store_up", store="sqlite") == 0
    assert value(s, "sidekey_state_store_errors_total", store="sqlite", kind="corrupt") >= 1
    assert value(s, "sidekey_requests_total", endpoint="/v1/authorize", code="state_corrupt") == 1
    assert not has(s, "sidekey_approvals_pending")


@pytest.mark.integration
def test_transport_refusals_are_counted_by_code(daemon: Daemon) -> None:
    """Refusals the listener answers itself (no endpoint runs) have their own counter."""
    assert daemon.raw(b"NOT HTTP AT ALL\r\n\r\n", shutdown=True).startswith(b"HTTP/1.1 400")
    big = b"POST /v1/authorize HTTP/1.1\r\nhost: x\r\ncontent-length: 999999999\r\n\r\n"
    assert daemon.raw(big, shutdown=True).startswith(b"HTTP/1.1 413")
    s = metrics(daemon)
    assert value(s, "sidekey_transport_refusals_total", code="bad_http") == 1
    assert value(s, "sidekey_transport_refusals_total", code="body_too_large") == 1
    assert value(s, "sidekey_requests_total", endpoint="/v1/authorize") == 0


@pytest.mark.integration
def test_tcp_listener_serves_metrics_only(make_daemon: Any) -> None:
    port = free_port()
    d: Daemon = make_daemon({"metrics": {"listen": f"127.0.0.1:{port}"}}).start()
    token = d.user_token(SERVER)
    with Client(socket_path=d.socket) as client, client.tool_call(
            SERVER, "create_article", user_token=token, **CALL):
        status, ctype, body = tcp_get(port, "/metrics")
    assert status == 200 and ctype == "text/plain; version=0.0.4; charset=utf-8"
    s = parse(body)
    assert value(s, "sidekey_requests_total", endpoint="/v1/authorize", code="ok") == 1
    assert value(s, "sidekey_leases_active") == 1
    assert tcp_get(port, "/metrics?name[]=x")[0] == 200  # a scraper's query is ignored
    # any local process can reach this port: it renders at most once a second, so a
    # request loop gets the same bytes (checked when the two fall within that second)
    started = time.monotonic()
    first = tcp_get(port, "/metrics")[2]
    assert d.authorize()[0] == 200  # moves sidekey_requests_total
    second = tcp_get(port, "/metrics")[2]
    if time.monotonic() - started < scrape_mod.TCP_RENDER_INTERVAL_S:
        assert first == second
    # nothing else on that port: not the socket's API, not another method
    for method, path in [("GET", "/v1/metrics"), ("GET", "/"), ("GET", "/v1/health"),
                         ("POST", "/metrics"), ("HEAD", "/metrics"), ("GET", "/metrics/"),
                         ("POST", "/v1/authorize"), ("GET", "/v1/status")]:
        status, _, body = tcp_get(port, path, method)
        assert status == 404, (method, path, status)
        assert "sidekey_" not in body
    # not HTTP, or a head over the cap: closed without an answer
    for junk in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64,  # TLS
                 b"garbage\r\n\r\n"):
        assert not tcp_raw(port, junk).startswith(b"HTTP/1.1 200")
    big = b"GET /metrics HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 20_000 + b"\r\n\r\n"
    assert not tcp_raw(port, big).startswith(b"HTTP/1.1 200")
    # bounded connections: with every slot held by a silent client, one more is closed
    # at once; the slots come back when those go
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
    try:
        time.sleep(0.2)  # let the daemon accept them (not a timing assertion)
        extra = tcp_raw(port, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n", timeout=10)
        assert extra == b"", extra[:100]
    finally:
        for s_ in silent:
            s_.close()
    deadline = time.monotonic() + WAIT_S
    while True:  # the closed slots are freed as the daemon notices the EOFs
        try:
            if tcp_get(port, "/metrics")[0] == 200:
                break
        except (ConnectionError, http.client.HTTPException):
            pass
        assert time.monotonic() < deadline, "the listener did not recover its slots"
        time.sleep(0.1)
    # the listener is TCP on loopback only: the daemon's socket still answers as before
    assert d.request("GET", "/v1/health")[0] == 200


@pytest.mark.integration
def test_metrics_listen_is_restart_only_and_reload_keeps_counting(make_daemon: Any) -> None:
    port = free_port()
    d: Daemon = make_daemon({"metrics": {"listen": f"127.0.0.1:{port}"}}).start()
    assert d.authorize()[0] == 200
    # a reload with the same config: applied, nothing registered twice, no reset
    status, body = d.request("POST", "/v1/admin/reload", {})
    assert status == 200, body
    assert d.authorize()[0] == 200
    s = metrics(d)
    assert value(s, "sidekey_requests_total", endpoint="/v1/authorize", code="ok") == 2
    assert value(s, "sidekey_config_generation") == 2
    # moving the listener needs a restart: the reload is refused and says why
    cfg = yaml.safe_load(d.config_path.read_text())
    cfg["metrics"]["listen"] = f"127.0.0.1:{free_port()}"
    d.config_path.write_text(yaml.safe_dump(cfg))
    status, body = d.request("POST", "/v1/admin/reload", {})
    assert status == 422 and body["error"]["code"] == "config_rejected", body
    assert "metrics.listen" in body["error"]["message"]
    assert tcp_get(port, "/metrics")[0] == 200  # the old listener keeps serving
