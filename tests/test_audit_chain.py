"""Tamper evidence written by a real daemon: the hash chain on every audit line, signed
checkpoints, and the chain carried across a restart, a kill -9 and a torn last line.

(`sidekey audit verify` against tampered files: tests/test_audit_cli.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import Daemon
from sidekey.audit.chain import GENESIS, load_public_key, verify_checkpoint

SIDEKEY = [sys.executable, "-m", "sidekey"]


def keygen(path: Path) -> Path:
    """`sidekey keygen audit --out path`; returns the public key file."""
    out = subprocess.run([*SIDEKEY, "keygen", "audit", "--out", str(path)], capture_output=True,
                         text=True, timeout=60, check=True)
    assert "key_id: ed25519:" in out.stdout
    return path.with_name(path.name + ".pub")


def chained_daemon(make: Callable[..., Daemon], **audit: Any) -> tuple[Daemon, Path]:
    """A daemon (not started) whose audit checkpoints are signed by a fresh key; returns
    it and the public key file."""
    staged = make()
    pub = keygen(staged.root / "keys" / "audit.pem")
    d = make({"audit": {"checkpoint_key_file": "keys/audit.pem", **audit}}, root=staged.root)
    return d, pub


def call(d: Daemon, user_token: str | None = None) -> None:
    """One governed call: authorize, redeem, release."""
    st, a = d.authorize(**({"user_token": user_token} if user_token else {}))
    assert st == 200, a
    st, lease = d.request("POST", "/v1/redeem", {"resolution_token": a["resolution_token"],
                                                 "arguments": {"title": "hello"}})
    assert st == 200, lease
    st, r = d.request("POST", "/v1/release", {"lease_id": lease["lease_id"], "status": "success",
                                              "duration_ms": 1})
    assert st == 200, r


def raw_lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def verify_cli(*args: str | Path) -> tuple[int, dict[str, Any]]:
    out = subprocess.run([*SIDEKEY, "audit", "verify", "--json", *map(str, args)],
                         capture_output=True, text=True, timeout=120)
    return out.returncode, json.loads(out.stdout)


def check_chain(lines: list[bytes]) -> list[dict[str, Any]]:
    """Assert the chain holds line by line (seq 1, 2, ...; prev_hash = SHA-256 of the
    previous line's bytes; one log_id); return the events."""
    events = [json.loads(line) for line in lines]
    prev = GENESIS
    for i, (line, event) in enumerate(zip(lines, events, strict=True)):
        assert event["seq"] == i + 1, (i, event)
        assert event["prev_hash"] == prev, (i, event)
        assert event["log_id"] == events[0]["log_id"]
        assert event["schema_version"] == 3
        prev = hashlib.sha256(line).hexdigest()
    return events


@pytest.fixture
def make(make_daemon: Callable[..., Daemon]) -> Iterator[Callable[..., Daemon]]:
    yield make_daemon


def test_every_line_is_chained_and_checkpoints_are_signed(make: Callable[..., Daemon]) -> None:
    d, pub = chained_daemon(make, checkpoint_every_events=50)
    d.start()
    for _ in range(200):
        call(d)
    assert d.stop() == 0
    lines = raw_lines(d.audit_path)
    events = check_chain(lines)
    # The seed's keys come first, unchanged; the chain fields close the object.
    assert list(events[1])[:3] == ["event_id", "timestamp", "event_type"]
    assert list(events[1])[-3:] == ["seq", "prev_hash", "log_id"]
    key = load_public_key(pub)
    checkpoints = [e for e in events if e["event_type"] == "audit.checkpoint"]
    # 200 calls write >= 600 events: a checkpoint at least every 50 of them.
    assert len(checkpoints) >= 600 // 51
    last_cp = 0
    for e in events:
        if e["event_type"] != "audit.checkpoint":
            continue
        cp = e["checkpoint"]
        assert cp["covers_seq"] == e["seq"] - 1 and cp["covers_hash"] == e["prev_hash"]
        assert cp["log_id"] == e["log_id"] and cp["host"] == e["host"]
        assert verify_checkpoint(cp, key)
        # At the end of the batch that reaches 50 unsigned events (sequential calls: a
        # batch holds a few events).
        assert e["seq"] - last_cp <= 60
        last_cp = e["seq"]
    # The daemon's last word is its closing checkpoint.
    assert events[-1]["event_type"] == "audit.checkpoint" and events[-1]["checkpoint"]["final"]
    assert not any(e["checkpoint"]["final"] for e in checkpoints[:-1])
    # A forged signature does not verify.
    forged = dict(checkpoints[0]["checkpoint"], covers_seq=checkpoints[0]["seq"])
    assert not verify_checkpoint(forged, key)
    code, report = verify_cli("--key", pub, d.audit_path)
    assert code == 0 and report["problems"] == [], report
    assert report["closed"] and report["last_seq"] == len(lines)
    # Without FILES: the audit file of the config.
    code, report = verify_cli("--config", d.config_path, "--key", pub)
    assert code == 0 and report["files"] == [str(d.audit_path)], report
    st_key = os.stat(d.root / "keys" / "audit.pem")
    assert stat.S_IMODE(st_key.st_mode) == 0o600


def test_the_chain_continues_across_restart_and_kill_9(make: Callable[..., Daemon]) -> None:
    d, pub = chained_daemon(make, checkpoint_every_events=100)
    d.start()
    for _ in range(30):
        call(d)
    d.restart()
    for _ in range(30):
        call(d)
    d.kill()  # kill -9: no daemon.stopped, no closing checkpoint
    killed_at = len(raw_lines(d.audit_path))
    d.start()
    for _ in range(30):
        call(d)
    assert d.stop() == 0
    lines = raw_lines(d.audit_path)
    events = check_chain(lines)  # one log: seq and hashes run on through both restarts
    assert [e["event_type"] for e in events].count("daemon.started") == 3
    # Whatever the killed daemon left unsigned is covered by the next daemon's first
    # checkpoint (it signs the hash of the line before it, which chains back).
    after_kill = [e for e in events[killed_at:] if e["event_type"] == "audit.checkpoint"]
    assert after_kill and after_kill[0]["checkpoint"]["covers_seq"] > killed_at
    code, report = verify_cli("--key", pub, d.audit_path)
    assert code == 0 and report["problems"] == [], report


def test_a_torn_line_left_by_a_crash_is_acknowledged_and_the_chain_resumes(
    make: Callable[..., Daemon],
) -> None:
    d, pub = chained_daemon(make)
    d.start()
    for _ in range(10):
        call(d)
    d.kill()
    # What a crash in the middle of a write leaves: the first part of a line.
    good = raw_lines(d.audit_path)
    fragment = good[-2][: len(good[-2]) // 2]
    with d.audit_path.open("ab") as f:
        f.write(fragment)
    code, report = verify_cli("--key", pub, d.audit_path)
    assert code == 1
    # The cut line (named by the seq it would have had), and the killed daemon's events
    # that no checkpoint signed yet.
    assert [(p["kind"], p["line"], p["seq"]) for p in report["problems"]] == [
        ("unsigned_tail", 1, 1), ("truncated_tail", len(good) + 1, len(good) + 1)], report
    d.start()
    for _ in range(5):
        call(d)
    assert d.stop() == 0
    lines = raw_lines(d.audit_path)
    assert lines[len(good)] == fragment  # left as it was, terminated
    repaired = json.loads(lines[len(good) + 1])
    assert repaired["event_type"] == "audit.repaired"
    assert repaired["repaired"]["lines"] == [
        {"bytes": len(fragment), "sha256": hashlib.sha256(fragment).hexdigest()}]
    assert repaired["seq"] == len(good) + 1  # chained to the last whole event
    assert repaired["prev_hash"] == hashlib.sha256(good[-1]).hexdigest()
    code, report = verify_cli("--key", pub, d.audit_path)
    assert code == 0 and report["problems"] == [], report
    assert [n["kind"] for n in report["notes"]] == ["repaired"]


def test_an_idle_daemon_signs_its_unsigned_tail_without_further_traffic(
    make: Callable[..., Daemon],
) -> None:
    d, _ = chained_daemon(make, checkpoint_every_events=1000, checkpoint_every_s=0.2)
    d.start()
    call(d)
    last = d.wait_events("mcp.tool_call")[-1]
    deadline = time.monotonic() + 30  # a guard against a hang, not a timing assertion
    covered = False
    while not covered and time.monotonic() < deadline:
        covered = any(e["checkpoint"]["covers_seq"] >= last["seq"]
                      for e in d.events_of("audit.checkpoint"))
        time.sleep(0.05)
    assert covered
    st, status = d.request("GET", "/v1/status")
    assert st == 200, status
    chain = status["audit"]["sinks"][0]["chain"]
    assert chain["checkpoints"] is True and chain["checkpoints_written"] >= 1
    assert chain["key_id"].startswith("ed25519:") and chain["seq"] >= last["seq"]


def test_the_audit_key_from_a_systemd_credential_and_a_loose_key_file_is_refused(
    make: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch,
) -> None:
    staged = make()
    creds = staged.root / "creds"
    creds.mkdir()
    pub = keygen(creds / "sidekey-audit")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    d = make({"audit": {"checkpoint_key_credential": "sidekey-audit"}}, root=staged.root)
    d.start()
    call(d)
    assert d.stop() == 0
    code, report = verify_cli("--key", pub, d.audit_path)
    assert code == 0 and report["checkpoints"] >= 1, report
    # A key file that others can read: the daemon does not start.
    loose = staged.root / "keys" / "loose.pem"
    keygen(loose)
    os.chmod(loose, 0o644)
    bad = make({"audit": {"checkpoint_key_file": "keys/loose.pem"}}, root=staged.root)
    with pytest.raises(RuntimeError, match="audit checkpoint key"):
        bad.start()


def test_file_and_credential_together_are_a_config_error(make: Callable[..., Daemon]) -> None:
    d = make({"audit": {"checkpoint_key_file": "keys/a.pem", "checkpoint_key_credential": "a"}})
    out = subprocess.run([*SIDEKEY, "check-config", "--config", str(d.config_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "$.audit.checkpoint_key_file: set at most one of" in out.stderr


def _chained_file(path: Path, n: int, pad: int) -> list[bytes]:
    from sidekey.audit.chain import chained_line, line_hash

    lines, head = [], GENESIS
    for i in range(n):
        body = json.dumps({"event_id": f"e{i}", "event_type": "mcp.redeem", "pad": "x" * pad},
                          separators=(",", ":")).encode()
        line = chained_line(body, i + 1, head, "00ff00ff00ff00ff")
        head = line_hash(line)
        lines.append(line)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return lines


@pytest.mark.parametrize("pad", [10, 5000, 70_000])  # lines shorter and longer than a scan chunk
def test_recover_tail_finds_the_last_chained_line_past_fragments(tmp_path: Path, pad: int) -> None:
    from sidekey.audit.chain import recover_tail

    path = tmp_path / "audit.jsonl"
    lines = _chained_file(path, 40, pad)
    garbage = [b"not json " * (pad // 9 + 1), b'{"event_id":"no chain fields"}']
    with path.open("ab") as f:
        f.write(b"\n".join(garbage) + b"\n" + lines[-1][: len(lines[-1]) // 2])  # + a torn line
    fd = os.open(path, os.O_RDONLY)
    try:
        found = recover_tail(fd, path.stat().st_size)
    finally:
        os.close(fd)
    assert found.state is not None and found.torn
    assert (found.state.seq, found.state.log_id) == (40, "00ff00ff00ff00ff")
    assert found.state.head == hashlib.sha256(lines[-1]).hexdigest()
    fragment = lines[-1][: len(lines[-1]) // 2]
    assert found.skipped == [(len(x), hashlib.sha256(x).hexdigest()) for x in [*garbage, fragment]]
    assert found.last_line_hash == hashlib.sha256(garbage[-1]).hexdigest()
