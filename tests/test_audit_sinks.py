"""Audit sinks (issue 12 item 3): the file sink's rotation (size, age, SIGHUP after an
external mv) with the chain running on across files, and the syslog sink (RFC 5424 to a
Unix datagram socket and to TCP with octet counting), against real daemons.

The RFC 5424 check is a strict regex of the RFC's ABNF (section 6) written below, and
every message must also parse with ``syslog-rfc5424-parser`` (a published parser, last
released in 2019, so not the only check) to the same fields.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from syslog_rfc5424_parser import SyslogMessage

from harness import Daemon
from sidekey.audit import AuditLog, AuditUnavailable
from sidekey.audit.jsonl import JsonlSink
from sidekey.audit.syslog import SyslogSink, format_message
from sidekey.config import load_config
from sidekey.protocol import ConfigError
from test_audit_chain import call, chained_daemon, raw_lines, verify_cli
from webhook_collector import make_ca

# RFC 5424 section 6, SYSLOG-MSG = HEADER SP STRUCTURED-DATA [SP MSG].
_PRINT = rb"[\x21-\x7e]"
_SD_NAME = rb"[\x21\x23-\x3c\x3e-\x5c\x5e-\x7e]{1,32}"  # PRINTUSASCII except = SP ] "
_SD_PARAM = _SD_NAME + rb'="(?:[^"\\\]]|\\["\\\]])*"'
_SD_ELEMENT = rb"\[" + _SD_NAME + rb"(?: " + _SD_PARAM + rb")*\]"
RFC5424 = re.compile(
    rb"<(?P<pri>\d{1,3})>(?P<version>[1-9]\d{0,2}) "
    rb"(?P<timestamp>-|(?P<date>\d{4}-\d\d-\d\d)T(?P<time>\d\d:\d\d:\d\d)(?:\.\d{1,6})?"
    rb"(?:Z|[+-]\d\d:\d\d)) "
    rb"(?P<hostname>-|" + _PRINT + rb"{1,255}) (?P<app>-|" + _PRINT + rb"{1,48}) "
    rb"(?P<procid>-|" + _PRINT + rb"{1,128}) (?P<msgid>-|" + _PRINT + rb"{1,32}) "
    rb"(?P<sd>-|(?:" + _SD_ELEMENT + rb")+)(?: (?P<msg>.*))?\Z",
    re.DOTALL,
)


def parse_5424(data: bytes) -> dict[str, Any]:
    """The fields of one RFC 5424 message; fails the test on anything the ABNF rejects."""
    m = RFC5424.match(data)
    assert m is not None, data[:300]
    assert 0 <= int(m["pri"]) <= 191
    if m["date"]:  # FULL-DATE / PARTIAL-TIME ranges
        datetime.datetime.strptime(m["date"].decode() + " " + m["time"].decode(), "%Y-%m-%d %H:%M:%S")
    msg = m["msg"] or b""
    if msg.startswith(b"\xef\xbb\xbf"):
        msg = msg[3:]
    msg.decode("utf-8")  # MSG-UTF8 (or ASCII MSG-ANY): valid UTF-8 either way
    # And a published RFC 5424 parser reads the same fields.
    parsed = SyslogMessage.parse(data.decode("utf-8")).as_dict()
    assert parsed["hostname"] == m["hostname"].decode() and parsed["appname"] == m["app"].decode()
    assert parsed["msgid"] == m["msgid"].decode() and str(parsed["procid"]) == m["procid"].decode()
    assert parsed["msg"].encode() == msg, (parsed["msg"][:200], msg[:200])
    return {"facility": int(m["pri"]) // 8, "severity": int(m["pri"]) % 8,
            "hostname": m["hostname"].decode(), "app": m["app"].decode(),
            "procid": m["procid"].decode(), "msgid": m["msgid"].decode(), "msg": msg}


def audit_files(d: Daemon) -> list[Path]:
    """The audit files oldest first: rotated ones (their names sort by time), then the live one."""
    rotated = sorted(p for p in d.audit_path.parent.iterdir()
                     if p.name.startswith(d.audit_path.name + "."))
    return [*rotated, d.audit_path]


def wait_for(pred: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


# --------------------------------------------------------------------------- file rotation


def test_rotation_by_size_keeps_one_chain_across_files_and_a_restart(make_daemon: Any) -> None:
    d, pub = chained_daemon(make_daemon, sinks=[{"type": "file", "rotate_bytes": 4096}])
    d.start()
    for _ in range(8):
        call(d)
    d.restart()
    for _ in range(4):
        call(d)
    st, status = d.request("GET", "/v1/status")
    assert st == 200
    rotations = status["audit"]["sinks"][0]["rotation"]["rotations"]
    assert d.stop() == 0
    files = audit_files(d)
    assert len(files) >= 3 and rotations >= 1, files
    for old, new in itertools.pairwise(files):
        first = json.loads(raw_lines(new)[0])
        # The new file's first line names the old file's last line.
        assert first["event_type"] == "audit.rotated", first
        assert first["prev_hash"] == hashlib.sha256(raw_lines(old)[-1]).hexdigest()
        assert first["rotated"]["reason"] == "size"
        assert first["rotated"]["previous_file"] == old.name
        # The rotated file ends signed (a checkpoint covers its last events).
        assert json.loads(raw_lines(old)[-1])["event_type"] == "audit.checkpoint"
        assert old.stat().st_mode & 0o777 == 0o600
    rc, report = verify_cli("--key", pub, *files)
    assert rc == 0, report
    assert report["first_seq"] == 1 and report["closed"]
    # One file alone is not the whole log: verify says where the rest is.
    rc, report = verify_cli("--key", pub, files[-1])
    assert rc == 1 and report["problems"][0]["kind"] == "deleted"
    # Without FILES, verify reads the config's audit file and its rotated files, in order.
    rc, report = verify_cli("--key", pub, "--config", d.config_path)
    assert rc == 0 and report["files"] == [str(p) for p in files], report


def test_sighup_after_external_mv_reopens_and_the_chain_continues(make_daemon: Any) -> None:
    d, pub = chained_daemon(make_daemon)
    d.start()
    call(d)
    moved = d.audit_path.with_name("audit.jsonl.1")
    os.rename(d.audit_path, moved)  # logrotate without copytruncate: mv, then SIGHUP
    call(d)  # still lands in the moved file (the daemon holds it open)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: d.audit_path.exists() and d.events_of("audit.rotated"))
    rotated = d.events_of("audit.rotated")[0]
    assert rotated["rotated"]["reason"] == "reopen"
    call(d)
    assert d.stop() == 0
    old_lines, new_lines = raw_lines(moved), raw_lines(d.audit_path)
    assert json.loads(new_lines[0])["prev_hash"] == hashlib.sha256(old_lines[-1]).hexdigest()
    assert json.loads(old_lines[-1])["event_type"] == "audit.checkpoint"
    assert any(json.loads(x)["event_type"] == "mcp.redeem" for x in new_lines)
    assert d.audit_path.stat().st_mode & 0o777 == 0o600
    rc, report = verify_cli("--key", pub, moved, d.audit_path)
    assert rc == 0, report
    # A SIGHUP with nothing moved opens nothing new (and still reloads the config).
    d.start()
    d.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: d.events_of("config.reloaded"))
    assert len(d.events_of("audit.rotated")) == 1
    assert d.stop() == 0
    rc, report = verify_cli("--key", pub, moved, d.audit_path)
    assert rc == 0, report


def test_rotation_by_age_and_retention(tmp_path: Path) -> None:
    """Unit level (no daemon): rotate_every_s and keep."""
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path, fsync=False, rotate_every_s=1, keep=2)
    sink.open()
    sink._opened_at -= 2  # the file is "2 s old": the next event rotates it
    for i in range(4):
        sink.write_sync({"event_id": f"e{i}", "event_type": "test"})
        sink._opened_at -= 2
    rotated = sorted(p.name for p in tmp_path.iterdir() if p.name != "audit.jsonl")
    assert len(rotated) == 2, rotated  # keep: 2 (the oldest was deleted)
    assert all(re.fullmatch(r"audit\.jsonl\.\d{8}T\d{6}Z\.\d{12}", n) for n in rotated)
    assert sink.rotations == 3  # the first event found the file empty: nothing to rotate
    first = json.loads(raw_lines(path)[0])
    assert first["event_type"] == "audit.rotated" and first["rotated"]["reason"] == "age"
    # A file the sink did not name is never deleted by retention.
    (tmp_path / "audit.jsonl.keepme").write_text("x")
    sink._opened_at -= 2
    sink.write_sync({"event_id": "e9", "event_type": "test"})
    assert (tmp_path / "audit.jsonl.keepme").exists()


def test_audit_sink_config_rules(tmp_path: Path) -> None:
    import yaml

    from harness import QUICKSTART

    def load(sinks: list[dict[str, Any]]) -> str:
        base = yaml.safe_load((QUICKSTART / "sidekey.yaml").read_text())
        for f in QUICKSTART.glob("*.yaml"):
            if f.name != "sidekey.yaml":
                (tmp_path / f.name).write_bytes(f.read_bytes())
        base.setdefault("audit", {})["sinks"] = sinks
        (tmp_path / "sidekey.yaml").write_text(yaml.safe_dump(base))
        try:
            load_config(tmp_path / "sidekey.yaml")
        except ConfigError as exc:
            return str(exc)
        return ""

    assert load([]) == ""
    assert load([{"type": "file", "rotate_bytes": 1 << 20, "keep": 3},
                 {"type": "syslog"}, {"type": "syslog", "name": "siem", "transport": "tcp",
                                      "host": "siem.example", "tls": True, "format": "cef"}]) == ""
    assert "$.audit.sinks.1: at most one sink of type file" in load([{"type": "file"}, {"type": "file"}])
    assert "$.audit.sinks.0.required: the file sink is always required" in load(
        [{"type": "file", "required": False}])
    assert "$.audit.sinks.0.host: transport tcp needs a host" in load(
        [{"type": "syslog", "transport": "tcp"}])
    assert "$.audit.sinks.0.tls" in load([{"type": "syslog", "tls": True}])
    assert "same name" in load([{"type": "syslog"}, {"type": "syslog"}])
    assert "$.audit.sinks.0.rotate_bytes" in load([{"type": "file", "rotate_bytes": 10}])
    assert "$.audit.sinks.0.facility" in load([{"type": "syslog", "facility": "nope"}])


# --------------------------------------------------------------------------- syslog


class DgramReceiver:
    """A Unix datagram socket the test owns, standing in for /dev/log. For each message
    it records whether the audit file already held it when it arrived."""

    def __init__(self, path: Path, audit_path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)
        self.sock.settimeout(0.2)
        self.audit_path = audit_path
        self.messages: list[bytes] = []
        self.committed_first: list[bool] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            msg = parse_5424(data)["msg"]
            on_disk = self.audit_path.read_bytes() if self.audit_path.exists() else b""
            self.committed_first.append(msg in on_disk)
            self.messages.append(data)

    def close(self) -> None:
        self._stop = True
        self.thread.join(5)
        self.sock.close()


def test_syslog_unix_datagram_gets_every_committed_line_as_rfc5424(make_daemon: Any) -> None:
    d, _pub = chained_daemon(make_daemon, sinks=[
        {"type": "syslog", "socket": "log.sock", "facility": "local3", "app_name": "sk-test"}])
    receiver = DgramReceiver(d.root / "log.sock", d.audit_path)
    try:
        d.start()
        for _ in range(3):
            call(d)
        st, health = d.request("GET", "/v1/health")
        assert st == 200 and health["audit"]["ok"], health
        syslog_health = next(s for s in health["audit"]["sinks"] if s["sink"] == "syslog")
        assert syslog_health["required"] is False and syslog_health["dropped"] == 0
        assert d.stop() == 0
        lines = raw_lines(d.audit_path)
        assert wait_for(lambda: len(receiver.messages) >= len(lines))
    finally:
        receiver.close()
    parsed = [parse_5424(m) for m in receiver.messages]
    # Every committed line, in file order, byte for byte (closing checkpoint included),
    # and none before the file held it.
    assert [p["msg"] for p in parsed] == lines
    assert all(receiver.committed_first)
    for p, line in zip(parsed, lines, strict=True):
        event = json.loads(line)
        assert p["facility"] == 19 and p["app"] == "sk-test"
        assert p["msgid"] == event["event_type"][:32] and p["hostname"] == event["host"]
        assert p["procid"].isdigit()
    assert parsed[-1]["msgid"] == "audit.checkpoint"


class TcpReceiver:
    """A loopback TCP syslog receiver reading RFC 6587 octet-counted frames."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.frames: list[bytes] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(0.2)
            buf = b""
            with conn:
                while not self._stop:
                    try:
                        chunk = conn.recv(65536)
                    except TimeoutError:
                        continue
                    if not chunk:
                        break
                    buf += chunk
                    while b" " in buf:
                        length, _, rest = buf.partition(b" ")
                        assert length.isdigit() and not length.startswith(b"0"), buf[:40]
                        if len(rest) < int(length):
                            break
                        self.frames.append(rest[:int(length)])
                        buf = rest[int(length):]
            assert buf == b""

    def close(self) -> None:
        self._stop = True
        self.thread.join(5)
        self.listener.close()


def test_syslog_tcp_octet_counting_with_cef(make_daemon: Any) -> None:
    receiver = TcpReceiver()
    try:
        d = make_daemon({"audit": {"sinks": [
            {"type": "syslog", "transport": "tcp", "host": "127.0.0.1", "port": receiver.port,
             "format": "cef"}]}}).start()
        call(d)
        assert d.stop() == 0
        lines = raw_lines(d.audit_path)
        assert wait_for(lambda: len(receiver.frames) >= len(lines))
    finally:
        receiver.close()
    parsed = [parse_5424(f) for f in receiver.frames]
    assert len(parsed) == len(lines)
    for p, line in zip(parsed, lines, strict=True):
        event = json.loads(line)
        msg = p["msg"].decode()
        assert msg.startswith("CEF:0|sidekey|sidekey|"), msg
        assert f"cn1={event['seq']}" in msg and f"externalId={event['event_id']}" in msg
        assert p["facility"] == 10  # authpriv, the default


def test_unreachable_optional_sink_never_blocks_calls_and_loss_is_visible(make_daemon: Any) -> None:
    d = make_daemon({"audit": {"sinks": [
        {"type": "syslog", "socket": "nobody-listens.sock", "queue_max": 5}]}}).start()
    for _ in range(4):
        call(d)
    st, health = d.request("GET", "/v1/health")
    assert st == 200 and health["status"] == "ok", health  # not required: not degraded
    entry = next(s for s in health["audit"]["sinks"] if s["sink"] == "syslog")
    assert entry["ok"] is False and entry["dropped"] > 0
    st, status = d.request("GET", "/v1/status")
    full = next(s for s in status["audit"]["sinks"] if s.get("sink") == "syslog")
    assert full["failures"] >= 1 and full["last_error"] and full["overflows"] >= 1
    alerts = d.wait_events("audit.sink_overflow")
    assert alerts and alerts[0]["sink_overflow"]["sink"] == "syslog"
    assert d.stop() == 0


def test_unreachable_required_sink_fails_the_call_closed(make_daemon: Any) -> None:
    d = make_daemon({"audit": {"sinks": [
        {"type": "syslog", "socket": "log.sock", "required": True, "deliver_timeout_s": 0.5}]}})
    # Down at start: the daemon does not start (its daemon.started event is not delivered).
    with pytest.raises(RuntimeError, match="required audit sink syslog did not accept"):
        d.start()
    receiver = DgramReceiver(d.root / "log.sock", d.audit_path)
    try:
        d.start()
        call(d)  # up: calls go through
    finally:
        receiver.close()
    (d.root / "log.sock").unlink()
    st, a = d.authorize()
    assert st == 200, a  # an allowed authorize is queued, not waited for
    st, r = d.request("POST", "/v1/redeem", {"resolution_token": a["resolution_token"],
                                             "arguments": {"title": "hello"}})
    assert st == 503 and r["error"]["code"] == "audit_unavailable", r
    # The file is the source of truth: the event is there all the same.
    assert d.wait_events("mcp.redeem")
    st, health = d.request("GET", "/v1/health")
    assert st == 503 and health["audit"]["ok"] is False
    # Its daemon.stopped event is not delivered either: the stop says so (exit 1).
    assert d.stop() == 1
    assert d.events_of("daemon.stopped")


# --------------------------------------------------------------------------- units


def test_format_message_truncates_with_a_marker_naming_the_line() -> None:
    line = json.dumps({"event_type": "mcp.redeem", "host": "h1", "timestamp":
                       "2026-04-07T14:23:11.847Z", "arguments": {"body": "é" * 5000}},
                      ensure_ascii=False).encode()
    msg = format_message(line, facility=10, app_name="sidekey", procid="1", fmt="json",
                         max_message_bytes=1024)
    p = parse_5424(msg)
    assert len(p["msg"]) <= 1024
    assert p["msg"].endswith(f"…[truncated {len(line)} bytes sha256="
                             f"{hashlib.sha256(line).hexdigest()}]".encode())
    assert p["severity"] == 6 and p["msgid"] == "mcp.redeem"
    # Header fields are printable US-ASCII whatever the event holds.
    odd = json.dumps({"event_type": "a b\n", "host": "h\u00e9 x"}).encode()
    p = parse_5424(format_message(odd, facility=1, app_name="x", procid="1", fmt="json",
                                  max_message_bytes=4096))
    assert p["msgid"] == "ab" and p["hostname"] == "hx"


async def test_forwarder_gets_only_committed_lines_and_overflow_alerts(tmp_path: Path) -> None:
    sent: list[bytes] = []

    class Fake(SyslogSink):
        fail = True

        async def send(self, lines: list[tuple[int, bytes]]) -> None:
            if self.fail:
                raise ConnectionRefusedError(111, "refused")
            sent.extend(line for _, line in lines)

    sink = JsonlSink(tmp_path / "a.jsonl", fsync=False)
    sink.open()
    fwd = Fake("fake", queue_max=3)
    log = AuditLog([sink], forwarders=[fwd])
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await nursery.start(fwd.run)
        for i in range(5):
            await log.emit({"event_id": f"e{i}", "event_type": "t"})
        assert fwd.dropped >= 2 and fwd.overflows == 1
        fwd.fail = False
        await log.emit({"event_id": "last", "event_type": "t"})
        with trio.fail_after(10):
            while fwd.health()["queued"]:
                await trio.sleep(0.05)
        await log.aclose()
        nursery.cancel_scope.cancel()
    on_disk = raw_lines(tmp_path / "a.jsonl")
    assert set(sent) <= set(on_disk)
    assert any(json.loads(x)["event_type"] == "audit.sink_overflow" for x in on_disk)


async def test_required_forwarder_wait(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "a.jsonl", fsync=False)
    sink.open()
    fwd = SyslogSink("down", socket_path=str(tmp_path / "none.sock"), required=True,
                     deliver_timeout_s=0.3)
    log = AuditLog([sink], forwarders=[fwd])
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await nursery.start(fwd.run)
        with pytest.raises(AuditUnavailable):
            await log.emit({"event_id": "e", "event_type": "t"})
        assert not log.health()["ok"]
        await log.aclose()
        nursery.cancel_scope.cancel()


def _tls_files(tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``localhost`` signed by it: (ca, cert, key)."""
    return make_ca(tmp_path / name)


async def test_syslog_tls_verifies_the_collector(tmp_path: Path) -> None:
    """TLS with ca_file: a collector whose certificate that CA signed receives the
    octet-counted messages; one signed by another CA gets nothing (verification is on)."""
    import ssl

    ca, cert, key = _tls_files(tmp_path, "good")
    other_ca, _, _ = _tls_files(tmp_path, "other")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    received = bytearray()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):  # the rejected handshake, then the good client
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                return
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(10)
                    while chunk := tls.recv(65536):
                        received.extend(chunk)
            except (ssl.SSLError, OSError):
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    line = b'{"event_type":"mcp.redeem","host":"h","seq":1}'
    try:
        bad = SyslogSink("bad", transport="tcp", host="localhost", port=port, tls=True,
                         ca_file=str(other_ca))
        with pytest.raises(OSError, match="TLS"):
            await bad.send([(1, line)])
        await bad.disconnect()
        good = SyslogSink("good", transport="tcp", host="localhost", port=port, tls=True,
                          ca_file=str(ca))
        await good.send([(1, line), (2, line)])
        await good.disconnect()
        await trio.to_thread.run_sync(thread.join, 10)
    finally:
        listener.close()
    length, _, rest = bytes(received).partition(b" ")
    first = rest[:int(length)]
    assert parse_5424(first)["msg"] == line
    assert rest[int(length):].split(b" ", 1)[0] == length  # the second frame


async def test_oversized_datagram_is_cut_not_stuck_and_queue_bytes_are_capped(tmp_path: Path) -> None:
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(str(tmp_path / "rx.sock"))
    rx.settimeout(10)
    try:
        sink = SyslogSink("big", socket_path=str(tmp_path / "rx.sock"),
                          max_message_bytes=1 << 20, queue_max_bytes=1 << 20)
        line = json.dumps({"event_type": "t", "host": "h", "x": "a" * 600_000}).encode()
        await sink.send([(1, line)])  # over the socket's send buffer: EMSGSIZE, then cut
        msg = parse_5424(rx.recv(1 << 20))["msg"]
        assert len(msg) <= 2048 and b"[truncated 600" in msg
        await sink.disconnect()
        # The queue holds at most queue_max_bytes: the second 600 kB line is dropped.
        sink.offer([(1, line), (2, line)])
        assert sink.health()["queued"] == 1 and sink.dropped == 1
    finally:
        rx.close()
