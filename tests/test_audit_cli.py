"""`sidekey audit verify | tail | export` on the files a real daemon wrote, copied and
tampered with (as an attacker with write access to audit.jsonl would): each tampering
is named exactly (file, line, seq, kind), and a clean copy verifies."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import Daemon
from test_audit_chain import call, keygen

SIDEKEY = [sys.executable, "-m", "sidekey"]


class Log:
    """A stopped daemon's audit file (lines without newline) and its public key."""

    def __init__(self, lines: list[bytes], pub: Path) -> None:
        self.lines = lines
        self.pub = pub
        self.events = [json.loads(x) for x in lines]

    def index(self, event_type: str, nth: int = 0, after: int = 0) -> int:
        """0-based index of the nth event of a type at or after index ``after``."""
        hits = [i for i, e in enumerate(self.events) if e["event_type"] == event_type and i >= after]
        return hits[nth]


def _make_log(tmp: Path, calls: int) -> Log:
    d = Daemon(root=Path(tempfile.mkdtemp(prefix="sk-")))
    try:
        pub = keygen(d.root / "keys" / "audit.pem")
        d = Daemon({"audit": {"checkpoint_key_file": "keys/audit.pem",
                              "checkpoint_every_events": 20}}, root=d.root)
        d.start()
        for _ in range(calls):
            call(d)
        assert d.stop() == 0
        kept_pub = tmp / f"{d.root.name}.pub"
        shutil.copy(pub, kept_pub)
        lines = d.audit_path.read_bytes()[:-1].split(b"\n")
        return Log(lines, kept_pub)
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def logs() -> Iterator[tuple[Log, Log]]:
    tmp = Path(tempfile.mkdtemp(prefix="sk-logs-"))
    try:
        yield _make_log(tmp, 30), _make_log(tmp, 5)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def log(logs: tuple[Log, Log]) -> Log:
    return logs[0]


def write(tmp_path: Path, lines: list[bytes], tail: bytes = b"\n") -> Path:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"\n".join(lines) + tail)
    return path


def verify(*args: str | Path) -> tuple[int, dict[str, Any]]:
    out = subprocess.run([*SIDEKEY, "audit", "verify", "--json", *map(str, args)],
                         capture_output=True, text=True, timeout=120)
    return out.returncode, json.loads(out.stdout)


def found(report: dict[str, Any]) -> list[tuple[int, int | None, str]]:
    return [(p["line"], p["seq"], p["kind"]) for p in report["problems"]]


def rechain(lines: list[bytes], start: int) -> list[bytes]:
    """Recompute prev_hash from ``start`` on, as an attacker covering an edit would."""
    out = list(lines)
    for i in range(max(1, start), len(out)):
        event = json.loads(out[i])
        new = hashlib.sha256(out[i - 1]).hexdigest()
        field = b'"prev_hash":"%s"' % event["prev_hash"].encode()
        out[i] = out[i].replace(field, b'"prev_hash":"%s"' % new.encode())
    return out


# --------------------------------------------------------------------------- verify


def test_a_clean_log_verifies(log: Log, tmp_path: Path) -> None:
    path = write(tmp_path, log.lines)
    code, report = verify("--key", log.pub, path)
    assert code == 0 and report["ok"] and report["problems"] == [], report
    assert report["events"] == len(log.lines) and report["closed"]
    assert report["checkpoints"] >= len(log.lines) // 21
    out = subprocess.run([*SIDEKEY, "audit", "verify", "--key", str(log.pub), str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("audit log ok: ")


def test_a_deleted_line_is_named(log: Log, tmp_path: Path) -> None:
    i = log.index("mcp.redeem", 3)
    path = write(tmp_path, log.lines[:i] + log.lines[i + 1:])
    code, report = verify("--key", log.pub, path)
    # Named at the line where it was (now its successor's), by its own seq.
    assert code == 1 and found(report) == [(i + 1, i + 1, "deleted")], report
    out = subprocess.run([*SIDEKEY, "audit", "verify", "--key", str(log.pub), str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stdout.splitlines() == [
        f"{path}:{i + 1}: seq {i + 1}: deleted: seq {i + 1} missing (1 event between line {i} "
        f"and line {i + 1})"]


def test_three_deleted_redeems_are_named(log: Log, tmp_path: Path) -> None:
    # The attack: three mcp.redeem lines gone.
    gone = [log.index("mcp.redeem", n) for n in (2, 5, 9)]
    path = write(tmp_path, [x for j, x in enumerate(log.lines) if j not in gone])
    code, report = verify("--key", log.pub, path)
    assert code == 1
    assert found(report) == [(g + 1 - k, g + 1, "deleted") for k, g in enumerate(gone)], report


def test_an_altered_field_is_named(log: Log, tmp_path: Path) -> None:
    i = log.index("mcp.redeem", 4)
    lines = list(log.lines)
    assert b'"user_id":"alice"' in lines[i]
    lines[i] = lines[i].replace(b'"user_id":"alice"', b'"user_id":"mallory"')
    code, report = verify("--key", log.pub, write(tmp_path, lines))
    assert code == 1 and found(report) == [(i + 1, i + 1, "altered")], report


def test_an_edit_with_the_chain_recomputed_is_caught_by_the_next_checkpoint(
    log: Log, tmp_path: Path,
) -> None:
    i = log.index("mcp.redeem", 4)
    lines = list(log.lines)
    lines[i] = lines[i].replace(b'"user_id":"alice"', b'"user_id":"mallory"')
    lines = rechain(lines, i + 1)
    cp = log.index("audit.checkpoint", 0, after=i)
    code, report = verify("--key", log.pub, write(tmp_path, lines))
    # Every checkpoint from the edit on signed other hashes than the chain now holds.
    later = [j for j in range(cp, len(lines)) if log.events[j]["event_type"] == "audit.checkpoint"]
    assert code == 1 and found(report) == [(j + 1, j + 1, "altered") for j in later], report
    assert "chain recomputed" in report["problems"][0]["detail"]


def test_swapped_lines_are_named_as_reordered(log: Log, tmp_path: Path) -> None:
    i = log.index("mcp.redeem", 6)
    lines = list(log.lines)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    code, report = verify("--key", log.pub, write(tmp_path, lines))
    # Line i+2 now holds seq i+1, written after seq i+2.
    assert code == 1 and found(report) == [(i + 2, i + 1, "reordered")], report


def test_a_line_cut_in_the_middle_is_a_truncated_tail(log: Log, tmp_path: Path) -> None:
    i = log.index("mcp.redeem", 8)
    last_cp = max(j for j in range(i) if log.events[j]["event_type"] == "audit.checkpoint")
    path = write(tmp_path, [*log.lines[:i], log.lines[i][:40]], tail=b"")
    code, report = verify("--key", log.pub, path)
    assert code == 1
    problems = found(report)
    assert (i + 1, i + 1, "truncated_tail") in problems, report
    # The events between the last surviving checkpoint and the cut are unsigned.
    assert problems == [(last_cp + 2, last_cp + 2, "unsigned_tail"),
                        (i + 1, i + 1, "truncated_tail")], report


def test_a_tail_dropped_after_a_checkpoint_is_named(log: Log, tmp_path: Path) -> None:
    cp = log.index("audit.checkpoint", 2)
    assert not log.events[cp]["checkpoint"]["final"]
    code, report = verify("--key", log.pub, write(tmp_path, log.lines[: cp + 1]))
    assert code == 1 and found(report) == [(cp + 1, cp + 1, "truncated_tail")], report
    # Without the final checkpoint but with events after the previous one: unsigned.
    code, report = verify("--key", log.pub, write(tmp_path, log.lines[:cp]))
    prev = log.index("audit.checkpoint", 1)
    assert code == 1 and found(report) == [(prev + 2, prev + 2, "unsigned_tail")], report
    # A running daemon's file: those are notes (--live), not failures.
    code, report = verify("--live", "--key", log.pub, write(tmp_path, log.lines[:cp]))
    assert code == 0 and [n["kind"] for n in report["notes"]] == ["unsigned_tail"], report


def test_lines_spliced_from_another_daemons_log_are_named(logs: tuple[Log, Log],
                                                         tmp_path: Path) -> None:
    a, b = logs
    i = a.index("mcp.redeem", 5)
    foreign = b.lines[3:6]
    lines = [*a.lines[:i], *foreign, *a.lines[i:]]
    code, report = verify("--key", a.pub, write(tmp_path, lines))
    assert code == 1 and found(report) == [(i + 1, 4, "spliced")], report
    assert f"lines {i + 1}..{i + 3}" in report["problems"][0]["detail"]
    assert b.events[3]["log_id"] in report["problems"][0]["detail"]
    # Replacing a stretch of the log by another log's lines: spliced, and the hole.
    lines = [*a.lines[:i], *foreign, *a.lines[i + 3:]]
    code, report = verify("--key", a.pub, write(tmp_path, lines))
    assert code == 1 and found(report) == [(i + 1, 4, "spliced"), (i + 4, i + 1, "deleted")], report


def test_checkpoint_signatures_are_checked_against_the_trusted_key(
    logs: tuple[Log, Log], tmp_path: Path,
) -> None:
    a, b = logs
    path = write(tmp_path, a.lines)
    # Another daemon's key: every checkpoint is by an untrusted key.
    code, report = verify("--key", b.pub, path)
    assert code == 1 and {p["kind"] for p in report["problems"]} == {"untrusted_key"}
    assert len(report["problems"]) == report["checkpoints"]
    # A signature changed by one character.
    cp = a.index("audit.checkpoint", 1)
    lines = list(a.lines)
    event = a.events[cp]
    sig = event["checkpoint"]["sig"]
    lines[cp] = lines[cp].replace(sig.encode(), (("A" if sig[0] != "A" else "B") + sig[1:]).encode())
    code, report = verify("--key", a.pub, write(tmp_path, lines))
    # The line changed (the chain says so) and its signature no longer verifies.
    assert code == 1 and sorted(found(report)) == [(cp + 1, cp + 1, "altered"),
                                                   (cp + 1, cp + 1, "bad_signature")], report


def test_a_rotated_log_verifies_across_its_files_in_order(log: Log, tmp_path: Path) -> None:
    cut = len(log.lines) // 2
    first, second = tmp_path / "audit.jsonl.1", tmp_path / "audit.jsonl"
    first.write_bytes(b"\n".join(log.lines[:cut]) + b"\n")
    second.write_bytes(b"\n".join(log.lines[cut:]) + b"\n")
    code, report = verify("--key", log.pub, first, second)
    assert code == 0, report
    # The second file alone: its head is missing.
    code, report = verify("--key", log.pub, second)
    assert code == 1 and found(report) == [(1, 1, "deleted")], report


# --------------------------------------------------------------------------- tail, export


def test_tail_filters_by_type_user_server_and_time(log: Log, tmp_path: Path) -> None:
    path = write(tmp_path, log.lines)
    out = subprocess.run([*SIDEKEY, "audit", "tail", "-n", "1000", "--type", "mcp.redeem",
                          "--user", "alice", "--server", "content-api", str(path)],
                         capture_output=True, text=True, timeout=60, check=True)
    rows = out.stdout.splitlines()
    redeems = [e for e in log.events if e["event_type"] == "mcp.redeem"]
    assert len(rows) == len(redeems) == 30
    assert all(" mcp.redeem user=alice " in r and "server=content-api" in r for r in rows)
    assert rows[-1].startswith(f"{redeems[-1]['timestamp']} #{redeems[-1]['seq']} ")
    out = subprocess.run([*SIDEKEY, "audit", "tail", "--user", "bob", str(path)],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout == ""
    out = subprocess.run([*SIDEKEY, "audit", "tail", "--since", "2999-01-01T00:00:00Z", str(path)],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout == ""
    out = subprocess.run([*SIDEKEY, "audit", "tail", "-n", "3", "--type", "audit.", str(path)],
                         capture_output=True, text=True, timeout=60, check=True)
    assert len(out.stdout.splitlines()) == 3 and out.stdout.rstrip().endswith("final")


def test_tail_follow_prints_new_events_and_stops_on_sigint(tmp_path: Path,
                                                           make_daemon: Any) -> None:
    d: Daemon = make_daemon().start()
    proc = subprocess.Popen([*SIDEKEY, "audit", "tail", "-n", "0", "-f", "--interval", "0.05",
                             "--type", "mcp.redeem", str(d.audit_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # let it take the file's current end
        call(d)
        call(d)
        d.wait_events("mcp.redeem", 2)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert [" mcp.redeem " in r for r in out.splitlines()] == [True, True], out


def test_export_json_cef_and_ecs(log: Log, tmp_path: Path) -> None:
    path = write(tmp_path, log.lines)
    out = subprocess.run([*SIDEKEY, "audit", "export", "--format", "json", str(path)],
                         capture_output=True, timeout=60, check=True)
    assert out.stdout == b"\n".join(log.lines) + b"\n"  # the lines as written
    out = subprocess.run([*SIDEKEY, "audit", "export", "--format", "cef", "--type", "mcp.redeem",
                          str(path)], capture_output=True, text=True, timeout=60, check=True)
    rows = out.stdout.splitlines()
    assert len(rows) == 30
    first = next(e for e in log.events if e["event_type"] == "mcp.redeem")
    header, _, ext = rows[0].rpartition("|")
    assert header.startswith("CEF:0|sidekey|sidekey|") and "|mcp.redeem|" in header
    assert f"externalId={first['event_id']}" in ext and "suser=alice" in ext
    assert f"cn1Label=seq cn1={first['seq']}" in ext and f"flexString2={first['log_id']}" in ext
    assert "cs1Label=server cs1=content-api" in ext and f"cs5={first['lease_id']}" in ext
    out = subprocess.run([*SIDEKEY, "audit", "export", "--format", "ecs", "--since",
                          first["timestamp"], str(path)],
                         capture_output=True, text=True, timeout=60, check=True)
    docs = [json.loads(x) for x in out.stdout.splitlines()]
    redeem = next(doc for doc in docs if doc["event"]["action"] == "mcp.redeem")
    assert redeem["@timestamp"] == first["timestamp"] and redeem["user"]["id"] == "alice"
    assert redeem["event"]["id"] == first["event_id"] and redeem["event"]["sequence"] == first["seq"]
    assert redeem["sidekey"]["mcp" if "mcp" in redeem["sidekey"] else "server"] == "content-api"
    assert json.loads(redeem["event"]["original"]) == first  # the line as written
    assert redeem["ecs"]["version"]


def test_events_from_before_the_chain_are_named_once_per_stretch(log: Log, tmp_path: Path) -> None:
    # A log upgraded from schema 1: unchained lines, then the chain (whose first
    # prev_hash names the last of them).
    legacy = [json.dumps({"event_id": f"evt_{i}", "event_type": "mcp.redeem",
                          "schema_version": 1}).encode() for i in range(3)]
    path = write(tmp_path, [*legacy, *log.lines])
    code, report = verify("--key", log.pub, path)
    assert code == 1 and found(report) == [(1, None, "unchained")], report
    assert report["problems"][0]["detail"].startswith("lines 1..3: ")


# --------------------------------------------------------------------------- SIEM formats lose nothing


# Top-level fields that each format maps in full to a field of its own (README "Audit
# export formats"); every other field must come out in sidekeyFields (CEF) / sidekey.* (ECS).
_CEF_OWN = {"timestamp": "rt", "event_id": "externalId", "event_type": "cat", "host": "dvchost",
            "user_id": "suser", "server": "cs1", "tool": "cs2", "agent_id": "cs3",
            "session_id": "cs4", "lease_id": "cs5", "request_id": "request", "seq": "cn1",
            "prev_hash": "flexString1", "log_id": "flexString2", "arguments": "sidekeyArguments",
            "auth": "sidekeyAuth", "result": "sidekeyResult"}
_ECS_OWN = {"timestamp": ("@timestamp",), "event_id": ("event", "id"),
            "event_type": ("event", "action"), "host": ("host", "name"), "user_id": ("user", "id"),
            "seq": ("sidekey", "chain", "seq"), "prev_hash": ("sidekey", "chain", "prev_hash"),
            "log_id": ("sidekey", "chain", "log_id"), "trace_id": ("trace", "id")}


def parse_cef(line: str) -> tuple[list[str], dict[str, str]]:
    """(the 7 header fields, the extensions) of a CEF:0 line, unescaped."""
    header: list[str] = []
    field, i = "", 0
    while len(header) < 7:
        ch = line[i]
        if ch == "\\":
            field += line[i + 1]
            i += 2
            continue
        if ch == "|":
            header.append(field)
            field = ""
        else:
            field += ch
        i += 1
    ext = line[i:]
    # A key is a word followed by an unescaped "=" (values escape theirs as "\=").
    keys = list(re.finditer(r"(?:^| )([A-Za-z0-9_]+)=", ext))
    out: dict[str, str] = {}
    for m, nxt in zip(keys, [*keys[1:], None], strict=True):
        value = ext[m.end(): nxt.start() if nxt is not None else len(ext)]
        out[m[1]] = re.sub(r"\\(.)", lambda e: {"n": "\n", "r": "\r"}.get(e[1], e[1]), value)
    return header, out


def _own_kinds_of_events() -> list[bytes]:
    """Events of types a short daemon run does not write (rotation, sink overflow, an
    approval decision, a refusal with an error and a full peer), as the daemon builds them."""
    import datetime

    from sidekey.audit.events import make_event

    now = datetime.datetime.now(datetime.UTC)
    peer = {"pid": 4242, "uid": 1001, "gid": 1002, "unit": "mcp-content-api.service",
            "exe": "/usr/bin/python3.11", "attestation": "proc"}
    events = [
        make_event("audit.rotated", host="h1", now=now, redact_keys=(), extra={"rotated": {
            "reason": "size", "previous_file": "audit.jsonl.20261130T181700Z.000000000042",
            "previous_seq": 42, "previous_hash": "ab" * 32}}),
        make_event("audit.sink_overflow", host="h1", now=now, redact_keys=(), extra={
            "sink_overflow": {"sink": "siem", "type": "syslog", "queue_max": 10,
                              "dropped_total": 3, "last_error": "ECONNREFUSED"}}),
        make_event("approval.granted", host="h1", now=now, server="content-api",
                   tool="publish_article", user_id="alice", redact_keys=(), peer=peer,
                   extra={"approval_id": "apr_1", "decided_by": "bob", "reason": "ok"}),
        make_event("request.rejected", host="h1", now=now, redact_keys=(), peer=peer,
                   request_id="req_1", trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
                   policy={"evaluated": True, "rules_matched": ["r1"],
                                               "decision": "deny"},
                   error={"code": "peer_not_allowed", "message": "no", "status": 403},
                   extra={"path": "/v1/redeem", "method": "POST"}),
    ]
    return [json.dumps(e, separators=(",", ":")).encode() for e in events]


def test_every_field_of_every_event_reaches_cef_and_ecs(log: Log, tmp_path: Path) -> None:
    # A real daemon's log (calls, checkpoints, start and stop events) plus the event types
    # it did not write: each top-level field comes out in a CEF field of its own or in
    # sidekeyFields, and in its ECS field or under sidekey.<name>, with its value.
    lines = [*log.lines, *_own_kinds_of_events()]
    events = [json.loads(x) for x in lines]
    assert {"audit.checkpoint", "audit.rotated", "audit.sink_overflow", "approval.granted",
            "request.rejected", "daemon.started", "daemon.stopped", "mcp.redeem"} <= {
        e["event_type"] for e in events}
    path = write(tmp_path, lines)
    cef = subprocess.run([*SIDEKEY, "audit", "export", "--format", "cef", str(path)],
                         capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    ecs = subprocess.run([*SIDEKEY, "audit", "export", "--format", "ecs", str(path)],
                         capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert len(cef) == len(ecs) == len(events)
    for event, cef_line, ecs_line in zip(events, cef, ecs, strict=True):
        header, ext = parse_cef(cef_line)
        assert header[4] == event["event_type"], cef_line
        doc = json.loads(ecs_line)
        rest = json.loads(ext["sidekeyFields"]) if "sidekeyFields" in ext else {}
        for key, value in event.items():
            if value is None:
                continue
            if key in _CEF_OWN:
                got: Any = ext[_CEF_OWN[key]]
                if key in ("arguments", "auth", "result"):
                    assert json.loads(got) == value, (key, cef_line)
                elif key != "timestamp":
                    assert got == str(value), (key, cef_line)
            else:
                assert rest.get(key) == value, (key, cef_line)
            where = _ECS_OWN.get(key, ("sidekey", key))
            node: Any = doc
            for part in where:
                node = node[part]
            assert node == value, (key, ecs_line)
    refused = json.loads(ecs[-1])
    assert refused["http"]["response"]["status_code"] == 403
    assert refused["process"]["group"]["id"] == "1002"
