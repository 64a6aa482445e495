"""The webhook audit sink (issue 12 item 3): batches of committed audit lines POSTed over
verified TLS to a loopback collector (tests/webhook_collector.py), the audit file as the
spool, at-least-once across a collector outage, a clean restart and a kill -9, the spool
bound with its alert event, the auth header from a secret reference, required delivery,
and the collector formats (NDJSON, JSON array, Splunk HEC, Elastic bulk)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from harness import BOTH_LOG_FORMATS, Daemon
from sidekey.audit import AuditLog
from sidekey.audit.jsonl import JsonlSink
from sidekey.audit.webhook import Cursor, FileTail, WebhookAuth, WebhookSink, format_body
from sidekey.backends.local import LocalStore, load_key
from sidekey.config import load_config
from sidekey.protocol import ConfigError
from test_audit_chain import SIDEKEY, call, chained_daemon, raw_lines, verify_cli
from test_audit_sinks import audit_files, wait_for
from webhook_collector import Collector

TOKEN_NAME = "siem/hec-token"


def put_secret(d: Daemon, name: str, value: str) -> None:
    store = LocalStore(d.root / "state" / "secrets.enc", load_key(d.root / "keys" / "local.key", None))
    if name in store.names():
        store.rotate(name, value)
    else:
        store.put(name, value)


def webhook_daemon(make_daemon: Any, collector: Collector, **sink: Any) -> tuple[Daemon, Path, str]:
    """A daemon with signed checkpoints and one webhook sink to ``collector`` whose auth
    header comes from the local backend; returns it, the audit public key and the token."""
    token = "hec-" + "ab12" * 8
    entry = {"type": "webhook", "name": "siem", "url": collector.url + "/services/collector/raw",
             "ca_file": str(collector.ca),
             "auth": {"header": "Authorization", "prefix": "Splunk ",
                      "secret": {"backend": "local", "name": TOKEN_NAME}}, **sink}
    d, pub = chained_daemon(make_daemon, sinks=[entry])
    put_secret(d, TOKEN_NAME, token)
    collector.auth = ("Authorization", f"Splunk {token}")
    return d, pub, token


def sink_health(d: Daemon, name: str = "siem") -> dict[str, Any]:
    st, status = d.request("GET", "/v1/status")
    assert st in (200, 503), status
    return next(s for s in status["audit"]["sinks"] if s.get("name") == name)


def file_lines(d: Daemon) -> list[bytes]:
    return [line for path in audit_files(d) for line in raw_lines(path)]


def seqs_of(lines: list[bytes]) -> list[int]:
    return [json.loads(line)["seq"] for line in lines]


def delivered_all(collector: Collector, d: Daemon, first_seq: int = 1) -> bool:
    want = {line for line in file_lines(d) if json.loads(line)["seq"] >= first_seq}
    return want <= set(collector.lines())


# Waits after a collector comes back only guard a hang: the sink may be in its longest
# backoff (forward.BACKOFF_MAX_S, 30 s) when it does, on a machine that may be loaded.


@pytest.fixture
def collector(tmp_path: Path) -> Any:
    c = Collector(tmp_path / "collector").start()
    yield c
    c.stop()


# --------------------------------------------------------------------------- daemons


@BOTH_LOG_FORMATS
def test_every_committed_line_arrives_once_in_order_with_the_secret_header(
        make_daemon: Any, collector: Collector) -> None:
    d, pub, token = webhook_daemon(make_daemon, collector)
    d.start()
    for _ in range(5):
        call(d)
    assert wait_for(lambda: delivered_all(collector, d))
    h = sink_health(d)
    assert h["ok"] and h["sink"] == "webhook" and h["required"] is False, h
    assert h["url"] == collector.url + "/services/collector/raw" and h["auth"] == f"local:{TOKEN_NAME}"
    assert d.stop() == 0
    # The clean stop sent the closing checkpoint too: the collector has the whole file,
    # byte for byte, in order, exactly once (no outage, no restart).
    got = collector.lines()
    assert seqs_of(got) == seqs_of(file_lines(d)), d.log()[-3000:]
    assert got == file_lines(d)
    assert seqs_of(got) == list(range(1, len(got) + 1))
    path, headers, _ = collector.requests[0]
    assert path == "/services/collector/raw"
    assert headers["content-type"] == "application/x-ndjson"
    assert headers["authorization"] == f"Splunk {token}"
    # A SIEM can check the chain of what it received, like the file.
    received = d.root / "received.jsonl"
    received.write_bytes(b"\n".join(got) + b"\n")
    rc, report = verify_cli("--key", pub, received)
    assert rc == 0, report
    # The token is in no log line and nowhere in the audit file.
    assert token not in d.log() and token.encode() not in d.audit_path.read_bytes()


def test_outage_clean_restart_and_kill9_lose_nothing(make_daemon: Any, collector: Collector) -> None:
    d, pub, _ = webhook_daemon(make_daemon, collector)
    d.start()
    call(d)
    assert wait_for(lambda: delivered_all(collector, d))
    # Outage: calls go on (the sink is not required); its health shows the backlog.
    collector.stop()
    for _ in range(4):
        call(d)
    h = wait_for(lambda: (lambda h: h if not h["ok"] and h["queued"] > 0 else None)(sink_health(d)))
    assert h and h["failures"] >= 1 and h["last_error"] and h["dropped"] == 0, h
    st, health = d.request("GET", "/v1/health")
    assert st == 200 and health["status"] == "ok", health  # optional sink: not degraded
    out = subprocess.run([*SIDEKEY, "status", "--config", str(d.config_path)],
                         capture_output=True, text=True, timeout=60)
    assert "audit sink siem (webhook): FAILING (" in out.stdout, out.stdout + out.stderr
    # A clean restart while the collector is still down: nothing is sent, nothing is lost.
    assert d.stop() == 0
    d.start()
    call(d)
    # kill -9 with lines still unsent.
    d.kill()
    collector.start()
    d.start()
    call(d)
    assert wait_for(lambda: delivered_all(collector, d), timeout=120)
    got = seqs_of(collector.lines())
    # At least once: every seq of the file arrived; each more than once only if resent.
    assert set(got) == set(seqs_of(file_lines(d)))
    assert sink_health(d)["ok"]
    assert d.stop() == 0
    rc, report = verify_cli("--key", pub, *audit_files(d))
    assert rc == 0, report


def test_the_spool_is_bounded_and_its_loss_is_an_audit_event(make_daemon: Any,
                                                               collector: Collector) -> None:
    d, _, _ = webhook_daemon(make_daemon, collector, spool_max_bytes=64 * 1024)
    d.start()
    call(d)
    assert wait_for(lambda: delivered_all(collector, d))
    collector.stop()
    # Well over 64 KiB of audit lines while the collector is down.
    while d.audit_path.stat().st_size < 400 * 1024:
        call(d)
    alerts = d.wait_events("audit.sink_overflow", timeout=120)
    alert = alerts[0]["sink_overflow"]
    assert alert["sink"] == "siem" and alert["type"] == "webhook" and alert["reason"] == "spool_full"
    first, last = alert["lost_from_seq"], alert["lost_to_seq"]
    assert first and last >= first
    h = sink_health(d)
    assert h["dropped"] >= last - first + 1 and h["skips"] >= 1 and h["ok"] is False
    collector.start()
    call(d)
    assert wait_for(lambda: sink_health(d)["ok"], timeout=120)
    # Every gap has its alert (one per skip): their ranges are exactly what is missing.
    lost = {seq for a in d.events_of("audit.sink_overflow")
            for seq in range(a["sink_overflow"]["lost_from_seq"], a["sink_overflow"]["lost_to_seq"] + 1)}
    assert set(range(first, last + 1)) <= lost
    everything = set(seqs_of(file_lines(d)))
    assert wait_for(lambda: everything - lost <= set(seqs_of(collector.lines())), timeout=120)
    assert not set(seqs_of(collector.lines())) & lost
    # ...and the alert itself reached the collector.
    assert any(e["event_type"] == "audit.sink_overflow" for e in collector.ndjson_events())
    assert d.stop() == 0


def test_required_webhook_fails_calls_closed_while_the_collector_is_down(
        make_daemon: Any, collector: Collector) -> None:
    d, _, _ = webhook_daemon(make_daemon, collector, required=True, deliver_timeout_s=5.0)
    d.start()
    call(d)
    collector.stop()
    st, a = d.authorize()
    assert st == 200, a
    # The redeem's event and then its refusal's event each wait deliver_timeout_s.
    st, r = d.request("POST", "/v1/redeem", {"resolution_token": a["resolution_token"],
                                             "arguments": {"title": "hello"}}, timeout=60)
    assert st == 503 and r["error"]["code"] == "audit_unavailable", r
    st, health = d.request("GET", "/v1/health")
    assert st == 503 and not health["audit"]["ok"]
    collector.start()
    assert wait_for(lambda: sink_health(d)["ok"], timeout=120)
    call(d)
    assert d.stop() == 0
    assert delivered_all(collector, d)


def test_a_wrong_or_rotated_token_is_fetched_again_after_401(make_daemon: Any,
                                                              collector: Collector) -> None:
    d, _, _ = webhook_daemon(make_daemon, collector)
    d.start()
    call(d)
    assert wait_for(lambda: delivered_all(collector, d))
    # The security team rotates the HEC token: the collector now wants the new one, the
    # daemon still holds the old one until a 401 makes it read the secret again.
    new = "hec-" + "cd34" * 8
    put_secret(d, TOKEN_NAME, new)
    collector.auth = ("Authorization", f"Splunk {new}")
    call(d)
    assert wait_for(lambda: delivered_all(collector, d), timeout=120)
    assert 401 in collector.refused
    assert new not in d.log() and new.encode() not in d.audit_path.read_bytes()
    assert d.stop() == 0


def test_webhook_config_rules(tmp_path: Path) -> None:
    base = Daemon()
    try:
        def load(sink: dict[str, Any]) -> str:
            cfg = dict(base.config)
            cfg["audit"] = {"sinks": [{"type": "webhook", **sink}]}
            path = base.root / "bad.yaml"
            path.write_text(yaml.safe_dump(cfg))
            with pytest.raises(ConfigError) as info:
                load_config(path)
            return str(info.value)

        assert "$.audit.sinks.0.url: must use https" in load({"url": "http://siem.example.com/x"})
        assert "must not carry credentials" in load({"url": "https://u:p@siem.example.com/"})
        assert "$.audit.sinks.0.headers.X-Api-Key: looks like a credential" in load(
            {"url": "https://siem.example.com/", "headers": {"X-Api-Key": "k"}})
        assert "$.audit.sinks.0.headers.Content-Type: set by sidekey" in load(
            {"url": "https://siem.example.com/", "headers": {"Content-Type": "x"}})
        # The secret itself cannot be written in the config: only a reference.
        assert "$.audit.sinks.0.auth.secret" in load(
            {"url": "https://siem.example.com/", "auth": {"secret": "hec-token-in-clear"}})
        assert "auth.secret.backend: no backend 'vault'" in load(
            {"url": "https://siem.example.com/", "auth": {"secret": {"backend": "vault", "name": "x"}}})
        assert "auth.secret.name: required" in load(
            {"url": "https://siem.example.com/", "auth": {"secret": {"backend": "local"}}})
        assert "$.audit.sinks.0.format" in load({"url": "https://siem.example.com/", "format": "xml"})
        assert "$.audit.sinks.0.url: query parameter dd-api-key looks like a credential" in load(
            {"url": "https://siem.example.com/v1/input?dd-api-key=abc&ddsource=sidekey"})
        cfg = dict(base.config)
        cfg["audit"] = {"sinks": [{"type": "syslog"}, {"type": "webhook", "name": "syslog",
                                                       "url": "https://siem.example.com/"}]}
        (base.root / "bad.yaml").write_text(yaml.safe_dump(cfg))
        with pytest.raises(ConfigError, match="two sinks with the same name"):
            load_config(base.root / "bad.yaml")
    finally:
        base.cleanup()


# --------------------------------------------------------------------------- units


def _write(sink: JsonlSink, n: int) -> None:
    for i in range(n):
        sink.write_sync({"event_type": "test.event", "i": i, "timestamp": "2026-11-30T00:00:00Z"})


def test_file_tail_follows_rotation_resumes_by_cursor_and_reports_deleted_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path, fsync=False, rotate_bytes=4096)
    sink.open()
    tail = FileTail(path)
    assert tail.start(None, sink.committed_seq) == []
    _write(sink, 100)  # several rotations
    got: list[int] = []
    while True:
        chunk = tail.read(sink.committed_seq, 7, 1 << 20)
        assert chunk.gaps == []
        if not chunk.lines:
            break
        tail.advance()
        got += [seq for seq, _ in chunk.lines]
    assert got == list(range(1, sink.committed_seq + 1))
    assert len(list(tmp_path.glob("audit.jsonl.*"))) >= 3
    # Resume from a saved cursor in a rotated file (by inode and offset).
    saved = Cursor.from_json(tail.cursor.to_json())
    _write(sink, 40)
    tail2 = FileTail(path)
    assert tail2.start(saved, sink.committed_seq) == []
    chunk = tail2.read(sink.committed_seq, 1000, 1 << 20)
    assert chunk.lines[0][0] == saved.seq + 1
    # A cursor whose file retention deleted: the next file's first seq is past it.
    old = Cursor(log_id=saved.log_id, seq=3, dev=0, ino=0, offset=0)
    for p in sorted(tmp_path.glob("audit.jsonl.*"))[:2]:
        p.unlink()
    tail3 = FileTail(path)
    tail3.start(old, sink.committed_seq)
    chunk = tail3.read(sink.committed_seq, 1000, 1 << 20)
    assert chunk.gaps and chunk.gaps[0].reason == "file_deleted" and chunk.gaps[0].first == 4
    assert chunk.lines[0][0] == chunk.gaps[0].last + 1
    tail.close()
    tail2.close()
    tail3.close()


def test_skip_keeps_at_most_the_budget_from_a_line_start_and_names_the_gap(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path, fsync=False, rotate_bytes=8192)
    sink.open()
    tail = FileTail(path)
    tail.start(None, sink.committed_seq)
    _write(sink, 200)
    assert tail.backlog() > 20_000
    assert tail.skip_to(20_000)
    assert tail.backlog() <= 20_000
    lines: list[tuple[int, bytes]] = []
    gaps = []
    while True:  # a batch never spans two files
        chunk = tail.read(sink.committed_seq, 10_000, 1 << 22)
        gaps += chunk.gaps
        if not chunk.lines:
            break
        tail.advance()
        lines += chunk.lines
    assert len(gaps) == 1
    gap = gaps[0]
    assert gap.reason == "spool_full" and gap.first == 1 and gap.last == lines[0][0] - 1
    # What is left is whole lines, to the end, with nothing else missing.
    assert [s for s, _ in lines] == list(range(gap.last + 1, sink.committed_seq + 1))
    assert sum(len(line) + 1 for _, line in lines) <= 20_000
    assert not tail.skip_to(1 << 30)  # under the budget: nothing to skip
    tail.close()


def test_file_tail_never_reads_past_the_committed_seq_or_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path, fsync=False)
    sink.open()
    _write(sink, 3)
    tail = FileTail(path)
    tail.start(Cursor(), 0)
    assert [s for s, _ in tail.read(2, 100, 1 << 20).lines] == [1, 2]
    with path.open("ab") as f:
        f.write(b'{"event_type":"half')  # a write in progress: no newline yet
    assert [s for s, _ in tail.read(3, 100, 1 << 20).lines] == [1, 2, 3]


def test_bodies_for_each_collector_format() -> None:
    lines = [(1, b'{"event_type":"mcp.redeem","timestamp":"2026-11-30T10:00:00.500Z","host":"h1",'
                 b'"event_id":"e1","seq":1,"prev_hash":"00","log_id":"ab"}'),
             (2, b'{"event_type":"mcp.release","timestamp":"2026-11-30T10:00:01Z","host":"h1",'
                 b'"event_id":"e2","seq":2,"prev_hash":"11","log_id":"ab"}')]
    assert format_body(lines, "ndjson") == lines[0][1] + b"\n" + lines[1][1] + b"\n"
    assert [e["seq"] for e in json.loads(format_body(lines, "json_array"))] == [1, 2]
    hec = [json.loads(x) for x in format_body(lines, "splunk_hec").splitlines()]
    assert hec[0]["time"] == 1796032800.5 and hec[0]["host"] == "h1"
    assert hec[0]["sourcetype"] == "_json" and hec[0]["event"]["event_id"] == "e1"
    bulk = format_body(lines, "elastic_bulk").splitlines()
    assert json.loads(bulk[0]) == {"create": {"_id": "ab-1"}}
    doc = json.loads(bulk[1])
    assert doc["event"]["action"] == "mcp.redeem" and doc["event"]["sequence"] == 1
    assert doc["event"]["original"] == lines[0][1].decode()


async def _sink_against(tmp_path: Path, collector: Collector, fmt: str, n: int,
                        **kw: Any) -> tuple[WebhookSink, JsonlSink]:
    path = tmp_path / "audit.jsonl"
    file_sink = JsonlSink(path, fsync=False)
    file_sink.open()
    hook = WebhookSink("t", url=collector.url + "/_bulk", audit_path=path,
                       cursor_path=tmp_path / "t.cursor", fmt=fmt, ca_file=str(collector.ca), **kw)
    AuditLog([file_sink], forwarders=[hook])
    return hook, file_sink


async def deliver(hook: WebhookSink, file_sink: JsonlSink, n: int) -> None:
    """Run ``hook`` while ``n`` events are written, until it has delivered them all."""
    async with trio.open_nursery() as nursery:
        await nursery.start(hook.run)
        _write(file_sink, n)
        hook.offer([])
        with trio.fail_after(30):
            while hook.delivered_seq < n:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_elastic_bulk_items_429_retry_409_counts_400_rejects(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "c").start()
    calls = {"n": 0}

    def answer(path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes, dict[str, str]]:
        calls["n"] += 1
        docs = body.splitlines()[1::2]
        items = []
        for raw in docs:
            seq = json.loads(raw)["event"]["sequence"]
            status = 201
            if seq == 2 and calls["n"] == 1:
                status = 429  # the first try: retried as a whole
            elif seq == 2:
                status = 409  # the resend: already there
            elif seq == 3:
                status = 400  # a mapping error: refused for good
            items.append({"create": {"status": status}})
        return 200, json.dumps({"errors": True, "items": items}).encode(), {}

    collector.answer = answer
    try:
        hook, file_sink = await _sink_against(tmp_path, collector, "elastic_bulk", 0)
        alerts: list[tuple[str, dict[str, Any]]] = []
        hook.alert = lambda kind, extra: alerts.append((kind, extra))
        await deliver(hook, file_sink, 3)
        assert calls["n"] == 2 and hook.rejected == 1
        assert alerts and alerts[0][0] == "audit.sink_rejected"
        assert alerts[0][1]["sink_rejected"]["count"] == 1
        await hook.aclose()
        assert Cursor.from_json((tmp_path / "t.cursor").read_bytes()).seq == 3
    finally:
        collector.stop()


async def test_retry_after_413_halving_and_secret_refetch(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "c").start()
    seen: list[int] = []
    busy: list[int] = []
    tokens = iter(["old", "new", "new"])
    fetched: list[str] = []

    async def fetch() -> str:
        fetched.append(next(tokens))
        return fetched[-1]

    def answer(path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes, dict[str, str]]:
        n = len(body.splitlines())
        seen.append(n)
        if headers.get("dd-api-key") != "new":
            return 403, b"{}", {}
        if n > 2:
            return 413, b"{}", {}
        if not busy:
            busy.append(n)
            return 503, b"{}", {"Retry-After": "0"}
        return 202, b"{}", {}

    collector.answer = answer
    try:
        hook, file_sink = await _sink_against(
            tmp_path, collector, "ndjson", 0,
            auth=WebhookAuth(header="DD-API-KEY", prefix="", fetch=fetch, label="t"))
        await deliver(hook, file_sink, 5)
        assert fetched == ["old", "new"]  # fetched again after the 403, then cached
        assert 413 in collector.refused and 503 in collector.refused
        big = next(i for i, n in enumerate(seen) if n > 2 and i > 0)  # the first 413
        assert seen[big + 1] <= seen[big] // 2  # halved after it
        assert hook.rejected == 0 and hook.failures >= 3
        got = [json.loads(line)["seq"] for line in collector.lines()]
        assert sorted(set(got)) == [1, 2, 3, 4, 5]
        await hook.aclose()
    finally:
        collector.stop()


def test_new_sink_starts_at_the_end_and_saves_its_cursor_at_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    file_sink = JsonlSink(path, fsync=False)
    file_sink.open()
    _write(file_sink, 4)
    hook = WebhookSink("t", url="https://localhost:1/", audit_path=path,
                       cursor_path=tmp_path / "sinks" / "t.cursor")
    AuditLog([file_sink], forwarders=[hook])

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(hook.run)
            nursery.cancel_scope.cancel()

    trio.run(main)
    cursor = Cursor.from_json((tmp_path / "sinks" / "t.cursor").read_bytes())
    assert cursor.seq == 4 and cursor.offset == path.stat().st_size
    assert oct((tmp_path / "sinks" / "t.cursor").stat().st_mode & 0o777) == "0o600"


def test_otlp_json_body_is_an_export_logs_request_the_otlp_schema_accepts() -> None:
    from google.protobuf import json_format
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    lines = [(1, b'{"event_type":"mcp.redeem","timestamp":"2026-11-30T10:00:00.500Z","host":"h1",'
                 b'"event_id":"e1","user_id":"alice","server":"content-api","tool":"t",'
                 b'"seq":1,"prev_hash":"00","log_id":"ab"}'),
             (2, b'{"event_type":"mcp.authorize","timestamp":"2026-11-30T10:00:01Z","host":"h1",'
                 b'"event_id":"e2","error":{"code":"scope_missing"},"seq":2,"prev_hash":"11",'
                 b'"log_id":"ab"}')]
    # Strict parse (unknown fields refused): a Collector's otlp receiver would take it.
    request = json_format.Parse(format_body(lines, "otlp_json"), ExportLogsServiceRequest())
    (resource_logs,) = request.resource_logs
    attrs = {a.key: a.value.string_value for a in resource_logs.resource.attributes}
    assert attrs["service.name"] == "sidekey" and attrs["host.name"] == "h1"
    (scope,) = resource_logs.scope_logs
    assert scope.scope.name == "sidekey.audit"
    first, second = scope.log_records
    assert first.time_unix_nano == 1796032800_500_000_000
    assert first.body.string_value.encode() == lines[0][1]  # the line as written
    by_key = {a.key: a.value for a in first.attributes}
    assert by_key["event.name"].string_value == "mcp.redeem"
    assert by_key["sidekey.seq"].int_value == 1 and by_key["user.id"].string_value == "alice"
    assert first.severity_number == 9 and second.severity_number == 13  # a refusal: WARN


async def test_a_400_batch_is_halved_until_the_bad_line_is_alone(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "c").start()

    def answer(path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes, dict[str, str]]:
        seqs = [json.loads(line)["seq"] for line in body.splitlines()]
        return (400, b"{}", {}) if 4 in seqs else (200, b"{}", {})

    collector.answer = answer
    try:
        hook, file_sink = await _sink_against(tmp_path, collector, "ndjson", 0)
        alerts: list[tuple[str, dict[str, Any]]] = []
        hook.alert = lambda kind, extra: alerts.append((kind, extra))
        await deliver(hook, file_sink, 9)
        got = sorted(json.loads(line)["seq"] for line in collector.lines())
        assert got == [1, 2, 3, 5, 6, 7, 8, 9] and hook.rejected == 1
        assert [a[1]["sink_rejected"]["seq"] for a in alerts] == [4]
        await hook.aclose()
    finally:
        collector.stop()


def test_a_cursor_in_a_logrotate_moved_file_resumes_there_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path, fsync=False)
    sink.open()
    _write(sink, 5)
    tail = FileTail(path)
    tail.start(Cursor(), sink.committed_seq)
    chunk = tail.read(3, 100, 1 << 20)  # seqs 1..3 sent, 4 and 5 not yet
    tail.advance()
    saved = Cursor.from_json(tail.cursor.to_json())
    tail.close()
    # logrotate: mv audit.jsonl audit.jsonl.1, then SIGHUP (reopen): a new file whose
    # first line (audit.rotated) continues the chain.
    path.rename(tmp_path / "audit.jsonl.1")
    assert sink.reopen()
    _write(sink, 2)
    resumed = FileTail(path)
    assert resumed.start(saved, sink.committed_seq) == []
    got: list[int] = []
    while True:
        chunk = resumed.read(sink.committed_seq, 100, 1 << 20)
        assert chunk.gaps == []
        if not chunk.lines:
            break
        resumed.advance()
        got += [seq for seq, _ in chunk.lines]
    assert got == list(range(4, sink.committed_seq + 1))
    resumed.close()
