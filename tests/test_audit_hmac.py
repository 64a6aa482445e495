"""Issue 12 item 5: sensitive argument values become an HMAC-SHA256 under a per-host key.

Unit tests of :mod:`sidekey.audit.hmackey` and the redactor, then a real daemon: the
same value gives the same ``hmac-sha256:<hex>`` (also after a restart), different values
differ, the raw value is nowhere in what the daemon wrote, the key file is 0600 and a
loose one stops the start, and ``sidekey audit hmac`` finds the value an event hides.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness import Daemon
from sidekey.audit.events import make_event, redact
from sidekey.audit.hmackey import (
    HMAC_PREFIX,
    ValueHasher,
    canonical_json,
    generate_key_file,
    load_key,
)
from sidekey.protocol import ConfigError

SIDEKEY = [sys.executable, "-m", "sidekey"]
HMAC_RE = re.compile(r"^hmac-sha256:[0-9a-f]{64}$")
KEY = bytes(range(32))


# --------------------------------------------------------------------------- unit


def test_digest_is_keyed_deterministic_and_over_canonical_json() -> None:
    h = ValueHasher(KEY)
    assert HMAC_RE.match(h.digest("s3cret"))
    assert h.digest("s3cret") == h.digest("s3cret") != h.digest("s3cret2")
    assert h.digest("s3cret") != ValueHasher(bytes(32)).digest("s3cret")  # keyed
    # Non-strings work; object key order does not matter; 1 and "1" differ.
    assert h.digest({"b": 1, "a": [2]}) == h.digest({"a": [2], "b": 1})
    assert h.digest(1) != h.digest("1")
    assert canonical_json("s3cret") == b'"s3cret"'
    import hashlib
    import hmac

    assert h.digest("s3cret") == HMAC_PREFIX + hmac.new(KEY, b'"s3cret"', hashlib.sha256).hexdigest()
    assert "00010203" not in repr(h)
    with pytest.raises(ValueError):
        ValueHasher(b"short")


def test_every_redaction_shape_carries_the_hmac_of_the_hidden_part() -> None:
    h = ValueHasher(KEY)
    args = {
        "password": "p1", "nested": {"api_key": {"id": 3}},
        "headers": [["Authorization", "Bearer abc"]],
        "header_objects": [{"name": "Cookie", "value": "sid=2"}],
        "raw_headers": ["Authorization:  Bearer jkl"],
        "argv": ["psql", "--password", "mno", "--token=pqr"],
        "url": "postgres://user:stu@db:5432/app",
        "title": "kept",
    }
    out = redact(args, [], hasher=h)
    assert out == {
        "password": h.digest("p1"), "nested": {"api_key": h.digest({"id": 3})},
        "headers": [["Authorization", h.digest("Bearer abc")]],
        "header_objects": [{"name": "Cookie", "value": h.digest("sid=2")}],
        "raw_headers": [f"Authorization: {h.digest('Bearer jkl')}"],
        "argv": ["psql", "--password", h.digest("mno"), f"--token={h.digest('pqr')}"],
        "url": f"postgres://user:{h.digest('stu')}@db:5432/app",
        "title": "kept",
    }
    ev = make_event("mcp.authorize", host="h", now=__import__("datetime").datetime(2026, 1, 1),
                    tool="t", arguments={"body": "b"}, redact_keys=[],
                    redact_tool_fields={"t": ["body"]}, hasher=h)
    assert ev["arguments"] == {"body": h.digest("b")} and ev["schema_version"] == 3


def test_key_file_is_created_private_and_loose_or_bad_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "k" / "audit-hmac.key"
    generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(load_key(path, None)) == 32
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_key_file(path)
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="mode is 0640") as info:
        load_key(path, None)
    assert path.read_text().strip() not in str(info.value)
    bad = tmp_path / "bad.key"
    bad.write_text("abcd\n")
    os.chmod(bad, 0o600)
    with pytest.raises(ConfigError, match="64 hex digits"):
        load_key(bad, None)


# --------------------------------------------------------------------------- daemon

PASSWORD_A = "corr3ct-h0rse-A-value"
PASSWORD_B = "corr3ct-h0rse-B-value"


def _pass_of(d: Daemon, nth: int) -> str:
    events = [e for e in d.audit_events()
              if e["event_type"] == "mcp.authorize" and e.get("arguments")]
    value: str = events[nth]["arguments"]["db_password"]
    return value


def _authorize(d: Daemon, password: str) -> None:
    status, body = d.authorize("content-api", "create_article",
                               arguments={"title": "t", "db_password": password})
    assert status == 200, body


def _audit_hmac(d: Daemon, value: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SIDEKEY, "audit", "hmac", "--config", str(d.config_path), *extra],
                          input=value + "\n", capture_output=True, text=True, timeout=60,
                          cwd=d.root)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_same_value_same_hmac_across_restart_never_the_value(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    d.start()
    _authorize(d, PASSWORD_A)
    _authorize(d, PASSWORD_A)
    _authorize(d, PASSWORD_B)
    d.wait_events("mcp.authorize", 3)
    first, second, other = _pass_of(d, 0), _pass_of(d, 1), _pass_of(d, 2)
    assert HMAC_RE.match(first), first
    assert first == second != other
    key_file = d.root / "state" / "audit-hmac.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key_hex = key_file.read_text().strip()
    assert first == ValueHasher(bytes.fromhex(key_hex)).digest(PASSWORD_A)
    d.restart()
    _authorize(d, PASSWORD_A)
    d.wait_events("mcp.authorize", 4)
    assert _pass_of(d, 3) == first  # the key survived the restart
    assert key_file.read_text().strip() == key_hex
    # The auditor's check: the value on stdin, the config's key.
    out = _audit_hmac(d, PASSWORD_A)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == first
    assert _audit_hmac(d, PASSWORD_A, "--expect", first).returncode == 0
    miss = _audit_hmac(d, PASSWORD_B, "--expect", first)
    assert miss.returncode == 1 and "no match" in miss.stderr
    assert d.stop(timeout=30) == 0
    # Neither the values nor the key anywhere the daemon wrote (audit, log, state).
    written = d.audit_path.read_bytes() + d.log_path.read_bytes()
    for name in os.listdir(d.root / "state"):
        if name != "audit-hmac.key" and (d.root / "state" / name).is_file():
            written += (d.root / "state" / name).read_bytes()
    for needle in (PASSWORD_A, PASSWORD_B, key_hex):
        assert needle.encode() not in written, needle
    assert all(e["schema_version"] == 3 for e in map(json.loads, d.audit_path.read_text().splitlines()))


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_loose_key_file_stops_the_start(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    d.start()
    assert d.stop(timeout=30) == 0
    key_file = d.root / "state" / "audit-hmac.key"
    os.chmod(key_file, 0o644)
    with pytest.raises(RuntimeError, match="key_file_unsafe") as info:
        d.start()
    assert "audit HMAC key" in str(info.value)
    assert key_file.read_text().strip() not in str(info.value)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o644  # refused, not silently fixed


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_configured_key_file_is_used_and_never_created(make_daemon: Any, tmp_path: Path) -> None:
    key_file = tmp_path / "hmac.key"
    d: Daemon = make_daemon({"audit": {"hmac_key_file": str(key_file)}})
    with pytest.raises(RuntimeError, match="audit HMAC key"):
        d.start()  # a configured key that is missing is an error, not a new key
    assert not key_file.exists()
    key_file.write_text(KEY.hex() + "\n")
    os.chmod(key_file, 0o600)
    d.start()
    _authorize(d, PASSWORD_A)
    d.wait_events("mcp.authorize", 1)
    assert _pass_of(d, 0) == ValueHasher(KEY).digest(PASSWORD_A)
    assert not (d.root / "state" / "audit-hmac.key").exists()
    out = _audit_hmac(d, PASSWORD_A)
    assert out.stdout.strip() == ValueHasher(KEY).digest(PASSWORD_A), out.stderr
    out = subprocess.run([*SIDEKEY, "audit", "hmac", "--key-file", str(key_file), "--json-value"],
                         input='{"b": 1, "a": 2}', capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == ValueHasher(KEY).digest({"a": 2, "b": 1}), out.stderr


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_key_from_a_systemd_credential(make_daemon: Any, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "sidekey-audit-hmac").write_text(KEY.hex() + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))  # inherited by the daemon
    d: Daemon = make_daemon({"audit": {"hmac_key_credential": "sidekey-audit-hmac"}})
    d.start()
    _authorize(d, PASSWORD_B)
    d.wait_events("mcp.authorize", 1)
    assert _pass_of(d, 0) == ValueHasher(KEY).digest(PASSWORD_B)
    assert not (d.root / "state" / "audit-hmac.key").exists()


def test_file_and_credential_together_are_a_config_error(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"audit": {"hmac_key_file": "keys/h.key", "hmac_key_credential": "h"}})
    out = subprocess.run([*SIDEKEY, "check-config", "--config", str(d.config_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "$.audit.hmac_key_file: set at most one of" in out.stderr
