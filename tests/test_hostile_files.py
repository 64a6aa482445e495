"""Hostile host, files and process (issue 9 items 11-14): a full disk under the audit
log, files readable by others, an empty or corrupt state database, core dumps, and a
socket directory an attacker controls. Every test drives a real daemon subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import Daemon, run_as

NOBODY = 65534
NOGROUP = 65534
TEST_TIMEOUT_S = 120.0


def _call(d: Daemon) -> int:
    """One governed call (authorize, redeem, release); the first non-200 status, or 200."""
    status, auth = d.authorize(arguments={"title": "x" * 200})
    if status != 200:
        return status
    status, lease = d.request("POST", "/v1/redeem", {"resolution_token": auth["resolution_token"]})
    if status != 200:
        return status
    status, _ = d.request("POST", "/v1/release", {"lease_id": lease["lease_id"], "status": "success",
                                                 "duration_ms": 1})
    return status


def _serve(d: Daemon, *extra: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """`sidekey serve` that is expected to refuse to start: its exit status and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "sidekey", "serve", "--config", str(d.config_path), *extra],
        capture_output=True, text=True, timeout=timeout, cwd=d.root,
    )


# --------------------------------------------------------------------------- item 11


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (the test runs as root)."""
    mnt = tmp_path / "disk"
    mnt.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)],
                   check=True, timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def _fill(path: Path) -> None:
    """Write ``path`` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk = b"\0" * 4096
        while True:
            try:
                os.write(fd, chunk)
            except OSError:
                chunk = chunk[: len(chunk) // 2]
                if not chunk:
                    return
    finally:
        os.close(fd)


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_disk_full_leaves_every_audit_line_whole(make_daemon: Any, small_disk: Path) -> None:
    audit = small_disk / "audit.jsonl"
    d = make_daemon({"audit": {"path": str(audit)}})
    d.audit_path = audit
    d.start()
    assert _call(d) == 200
    filler = small_disk / "filler"
    _fill(filler)
    # The disk is full: the next events cannot be appended (the first batches may
    # still fit in the audit file's last page, then a write comes up short).
    statuses = [_call(d) for _ in range(60)]
    assert 503 in statuses, statuses
    failed_at = statuses.index(503)
    assert all(s == 503 for s in statuses[failed_at + 3:]), statuses  # stays failed, closed
    status, health = d.request("GET", "/v1/health")
    assert status == 503 and health["audit"]["ok"] is False
    status, body = d.request("POST", "/v1/authorize", {
        "server": "content-api", "tool": "create_article", "agent_id": "content-writer",
        "session_id": "s1", "arguments": {"title": "t"}, "user_token": d.user_token()})
    assert status == 503 and body["error"]["code"] == "audit_unavailable"
    # Space is back: appends succeed again, and every line of the file is one event.
    filler.unlink()
    assert [_call(d) for _ in range(5)] == [200] * 5
    assert d.request("GET", "/v1/health")[0] == 200
    d.stop()
    raw = audit.read_bytes()
    assert raw.endswith(b"\n")
    events = [json.loads(line) for line in raw.split(b"\n")[:-1]]  # each line parses
    assert events[-1]["event_type"] == "daemon.stopped"
    assert sum(e["event_type"] == "mcp.tool_call" for e in events) >= 6
