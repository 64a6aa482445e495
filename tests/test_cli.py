"""The ``sidekey`` command line as a user runs it: a subprocess, its exit code and output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import Daemon
from sidekey.backends.local import LocalStore, load_key

pytestmark = pytest.mark.integration

CLI_TIMEOUT_S = 30.0
WRITE_KEY = "content-api/write-key"


def sidekey(
    *argv: str, stdin: bytes | None = b"", env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sidekey ARGV`` with a clean SIDEKEY_* environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SIDEKEY_")}
    proc = subprocess.run(
        [sys.executable, "-m", "sidekey", *argv],
        input=stdin,
        capture_output=True,
        timeout=CLI_TIMEOUT_S,
        env={**base, **(env or {})},
        cwd=cwd,
    )
    return subprocess.CompletedProcess(
        proc.args,
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )


def assert_one_error_line(out: subprocess.CompletedProcess[str], prefix: str = "sidekey: error:") -> str:
    """Exit 1 and exactly one stderr line."""
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(prefix), out.stderr
    return lines[0]


def assert_not_leaked(value: str, out: subprocess.CompletedProcess[str]) -> None:
    assert value not in out.stdout
    assert value not in out.stderr


def write_config(d: Daemon, name: str, change: Any) -> Path:
    """A copy of the daemon's main config, changed by ``change(cfg)``, next to it."""
    cfg = yaml.safe_load(d.config_path.read_text())
    change(cfg)
    path = d.root / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def redeem_value(d: Daemon, tool: str = "create_article") -> str:
    status, auth = d.authorize("content-api", tool)
    assert status == 200, auth
    status, lease = d.request("POST", "/v1/redeem", {"resolution_token": auth["resolution_token"]})
    assert status == 200, lease
    status, rel = d.request("POST", "/v1/release", {"lease_id": lease["lease_id"], "status": "success"})
    assert status == 200, rel
    value: str = lease["secrets"]["CONTENT_API_KEY"]
    return value


# --------------------------------------------------------------------------- --help


HELP_CASES = [
    ([], ["serve", "check-config", "keygen", "secrets", "token", "call", "status"]),
    (["serve"], ["sidekey serve", "--config", "--socket"]),
    (["check-config"], ["sidekey check-config", "--json"]),
    (["keygen"], ["sidekey keygen", "tokens", "local", "ed25519", "--out"]),
    (["secrets"], ["sidekey secrets", "put", "rotate", "list"]),
    (["secrets", "put"], ["sidekey secrets put", "name", "--from-file"]),
    (["secrets", "rotate"], ["sidekey secrets rotate", "name", "--from-file"]),
    (["secrets", "list"], ["sidekey secrets list", "--json"]),
    (["token"], ["sidekey token", "issue"]),
    (["token", "issue"], ["sidekey token issue", "--server", "--tool", "--user", "--ttl"]),
    (["call"], ["sidekey call", "--server", "--tool", "--show-secrets", "--socket"]),
    (["status"], ["sidekey status", "--json", "--socket"]),
]


@pytest.mark.parametrize(("argv", "mentions"), HELP_CASES, ids=[" ".join(c[0]) or "top" for c in HELP_CASES])
def test_help(argv: list[str], mentions: list[str]) -> None:
    out = sidekey(*argv, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: sidekey"), out.stdout
    for word in mentions:
        assert word in out.stdout, (word, out.stdout)
    assert out.stderr == ""


def test_version_and_missing_command() -> None:
    out = sidekey("--version")
    assert out.returncode == 0 and out.stdout.startswith("sidekey ")
    out = sidekey()
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "required" in out.stderr


# --------------------------------------------------------------------------- check-config


# The seed's dangling references: a grant to, and a replacement by, the undeclared
# "crm-v2", and a rate limit for a tool no server declares. Warnings, not errors.
SEED_WARNINGS = [
    ("agent-tool-mappings.yaml", "$.agents.sales-assistant.allowed_servers.0.server", "crm-v2"),
    ("central-registry.yaml", "$.registry.servers.legacy-crm.replacement", "crm-v2"),
    ("rate-limits.yaml", "$.limits.per_tool.delete_record", "no server declares this tool"),
]


def test_check_config_ok(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    out = sidekey("check-config", "--config", str(d.config_path))
    assert out.returncode == 0, out.stderr  # warnings do not fail the check
    lines = out.stdout.splitlines()
    stripped = [line.strip() for line in lines]
    assert lines[0] == f"config ok: {d.config_path}"
    assert "servers: 2, tools: 5, agents: 2, backends: 1, secrets mapped: 5" in out.stdout
    # servers, each followed by its tools and their required scopes
    content = stripped.index("- content-api: oauth2 mcp:content-api; peers 1; registry active")
    assert stripped[content + 1 : content + 4] == [
        "create_article: content:write",
        "list_articles: content:read",
        "publish_article: content:publish",
    ]
    analytics = stripped.index("- analytics-db: oauth2 mcp:analytics-db; peers 1; registry active")
    assert stripped[analytics + 1 : analytics + 3] == [
        "export_report: analytics:read",
        "query_metrics: analytics:read",
    ]
    # agents with their grants and denials
    assert (
        "agent content-writer: content-api: list_articles, create_article, publish_article; "
        "analytics-db: query_metrics; denied legacy-crm"
    ) in stripped
    assert (
        "agent sales-assistant: crm-v2: list_opportunities, update_opportunity; "
        "analytics-db: query_metrics; denied content-api"
    ) in stripped
    # the seed's dangling references, one warning line each
    warnings = [line for line in stripped if line.startswith("warning: ")]
    assert len(warnings) == len(SEED_WARNINGS), warnings
    for (file, where, what), line in zip(SEED_WARNINGS, warnings, strict=True):
        assert line.startswith(f"warning: {file}: {where}"), line
        assert what in line, line
    assert out.stderr == ""

    out = sidekey("check-config", "--json", "--config", str(d.config_path))
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["config"] == str(d.config_path)
    assert summary["socket"] == d.socket
    assert summary["backends"] == {"local": "local"}
    assert summary["secrets_mapped"] == 5
    assert set(summary["servers"]) == {"content-api", "analytics-db"}
    assert summary["servers"]["content-api"]["tool_scopes"] == {
        "create_article": ["content:write"],
        "list_articles": ["content:read"],
        "publish_article": ["content:publish"],
    }
    assert summary["servers"]["analytics-db"]["tool_scopes"] == {
        "export_report": ["analytics:read"],
        "query_metrics": ["analytics:read"],
    }
    assert summary["agents"]["content-writer"] == {
        "allowed": {
            "content-api": ["list_articles", "create_article", "publish_article"],
            "analytics-db": ["query_metrics"],
        },
        "denied": ["legacy-crm"],
    }
    assert summary["agents"]["sales-assistant"]["denied"] == ["content-api"]
    assert len(summary["warnings"]) == len(SEED_WARNINGS)
    for (file, where, what), warning in zip(SEED_WARNINGS, summary["warnings"], strict=True):
        assert warning.startswith(f"{file}: {where}") and what in warning, warning
    # the secret values are nowhere in a config summary
    for value in d.secrets.values():
        assert value not in out.stdout


def test_check_config_from_environment(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    out = sidekey("check-config", env={"SIDEKEY_CONFIG": str(d.config_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"config ok: {d.config_path}")


def _unknown_key(cfg: dict[str, Any]) -> None:
    cfg["bogus_section"] = {"x": 1}


def _missing_backend(cfg: dict[str, Any]) -> None:
    cfg["secrets"]["content-api"]["list_articles"]["CONTENT_API_KEY"]["backend"] = "vault-nope"


def _bad_type(cfg: dict[str, Any]) -> None:
    cfg["listen"]["max_connections"] = "many"


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (_unknown_key, "$.bogus_section"),
        (_missing_backend, "$.secrets.content-api.list_articles.CONTENT_API_KEY.backend"),
        (_bad_type, "$.listen.max_connections"),
    ],
    ids=["unknown-key", "missing-backend", "bad-type"],
)
def test_check_config_broken_main_file(make_daemon: Any, change: Any, where: str) -> None:
    d: Daemon = make_daemon()
    path = write_config(d, "broken.yaml", change)
    out = sidekey("check-config", "--config", str(path))
    assert out.returncode == 1, out.stdout
    assert out.stdout == ""
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert lines
    assert all(line.startswith("sidekey: config error:") for line in lines), out.stderr
    assert "broken.yaml" in out.stderr
    assert where in out.stderr


def test_check_config_broken_included_file(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    limits = d.root / "rate-limits.yaml"
    doc = yaml.safe_load(limits.read_text())
    doc["limits"]["per_tool"]["delete_record"]["requests_per_minute"] = "two"
    limits.write_text(yaml.safe_dump(doc))
    out = sidekey("check-config", "--config", str(d.config_path))
    line = assert_one_error_line(out, "sidekey: config error:")
    assert "rate-limits.yaml" in line
    assert "$.limits.per_tool.delete_record.requests_per_minute" in line


def test_check_config_missing_file(tmp_path: Path) -> None:
    out = sidekey("check-config", "--config", str(tmp_path / "nope.yaml"))
    line = assert_one_error_line(out, "sidekey: config error:")
    assert "nope.yaml" in line


# --------------------------------------------------------------------------- secrets


def test_secrets_put_rotate_list_offline(make_daemon: Any, tmp_path: Path) -> None:
    d: Daemon = make_daemon()  # never started: the CLI works on the store file alone
    cfg = str(d.config_path)
    from_stdin = f"stdin-value-{os.urandom(6).hex()}"
    from_file = f"file-value-{os.urandom(6).hex()}"
    rotated = f"rotated-value-{os.urandom(6).hex()}"

    out = sidekey("secrets", "put", "demo/stdin", "--config", cfg, stdin=from_stdin.encode() + b"\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "demo/stdin: version 1 stored"
    assert_not_leaked(from_stdin, out)

    value_file = tmp_path / "value.txt"
    value_file.write_text(from_file + "\n")
    out = sidekey("secrets", "put", "demo/file", "--from-file", str(value_file), "--config", cfg)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "demo/file: version 1 stored"
    assert_not_leaked(from_file, out)

    out = sidekey("secrets", "rotate", "demo/stdin", "--offline", "--config", cfg, stdin=rotated.encode())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "demo/stdin: version 2 stored"
    assert_not_leaked(rotated, out)

    out = sidekey("secrets", "list", "--config", cfg)
    assert out.returncode == 0, out.stderr
    names = out.stdout.splitlines()
    assert names == sorted([*d.secrets, "demo/stdin", "demo/file"])
    out_json = sidekey("secrets", "list", "--json", "--config", cfg)
    assert out_json.returncode == 0, out_json.stderr
    assert json.loads(out_json.stdout) == names
    for listing in (out, out_json):
        for value in (from_stdin, from_file, rotated, *d.secrets.values()):
            assert_not_leaked(value, listing)

    # the values are stored encrypted, and the store decrypts them to what was given
    raw = (d.root / "state" / "secrets.enc").read_bytes()
    for value in (from_stdin, from_file, rotated):
        assert value.encode() not in raw
    store = LocalStore(d.root / "state" / "secrets.enc", load_key(d.root / "keys" / "local.key", None))
    assert store.get("demo/stdin").value == rotated
    assert store.get("demo/stdin").version == "2"
    assert store.get_version("demo/stdin", 1).value == from_stdin
    assert store.get("demo/file").value == from_file


def test_secrets_errors_are_one_line(make_daemon: Any, tmp_path: Path) -> None:
    d: Daemon = make_daemon()
    cfg = str(d.config_path)
    value = f"never-stored-{os.urandom(6).hex()}"

    line = assert_one_error_line(
        sidekey("secrets", "rotate", "no/such-secret", "--offline", "--config", cfg, stdin=value.encode())
    )
    assert "no/such-secret" in line and value not in line

    line = assert_one_error_line(
        sidekey("secrets", "put", WRITE_KEY, "--config", cfg, stdin=value.encode())
    )
    assert "secret_exists" in line and value not in line

    line = assert_one_error_line(sidekey("secrets", "put", "demo/empty", "--config", cfg, stdin=b""))
    assert "empty" in line

    line = assert_one_error_line(
        sidekey("secrets", "put", "demo/missing-file", "--from-file", str(tmp_path / "nope"), "--config", cfg)
    )
    assert "nope" in line

    assert_one_error_line(
        sidekey("secrets", "put", "bad name with spaces", "--config", cfg, stdin=value.encode())
    )

    # a value on the command line is refused, not echoed, and nothing is stored
    out = sidekey("secrets", "put", "demo/argv", value, "--config", cfg, stdin=b"from-stdin")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "never from the command line" in out.stderr
    assert value not in out.stderr and value not in out.stdout
    out = sidekey("secrets", "rotate", WRITE_KEY, value, "--config", cfg, stdin=b"from-stdin")
    assert out.returncode == 2

    listing = sidekey("secrets", "list", "--config", cfg)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines() == sorted(d.secrets)


def test_secrets_rotate_is_seen_by_running_daemon(daemon: Daemon) -> None:
    cfg = str(daemon.config_path)
    old = daemon.secrets[WRITE_KEY]
    assert redeem_value(daemon) == old
    new = f"SECRET-rotated-{os.urandom(6).hex()}"
    out = sidekey("secrets", "rotate", WRITE_KEY, "--offline", "--config", cfg, stdin=new.encode() + b"\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{WRITE_KEY}: version 2 stored"
    assert_not_leaked(new, out)
    assert_not_leaked(old, out)

    # a new secret written while the daemon runs (concurrent writer) is kept too
    out = sidekey("secrets", "put", "demo/while-running", "--config", cfg, stdin=b"v1")
    assert out.returncode == 0, out.stderr

    deadline = time.monotonic() + 10
    seen = redeem_value(daemon)
    while seen != new and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = redeem_value(daemon)
    assert seen == new
    listing = sidekey("secrets", "list", "--config", cfg)
    assert "demo/while-running" in listing.stdout.splitlines()
    assert new.encode() not in daemon.everything_written()


# --------------------------------------------------------------------------- against a daemon


CALL = ["call", "--server", "content-api", "--tool", "create_article", "--agent", "content-writer"]


def user_env(d: Daemon, **extra: str) -> dict[str, str]:
    """The environment ``sidekey call`` reads the user's OAuth2 bearer token from."""
    return {"SIDEKEY_USER_TOKEN": d.user_token("content-api"), **extra}


def test_call_prints_names_not_values(daemon: Daemon) -> None:
    value = daemon.secrets[WRITE_KEY]
    token = daemon.user_token("content-api")
    out = sidekey(
        *CALL, "--config", str(daemon.config_path), "--arguments", '{"title": "Q2"}',
        env=user_env(daemon),
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["decision"] == "allow"
    assert summary["user_id"] == "alice"  # the user named by the token
    assert summary["secrets"] == ["CONTENT_API_KEY"]
    assert summary["released"] == "released"
    assert summary["lease_id"].startswith("lse_")
    assert_not_leaked(value, out)
    assert_not_leaked(token, out)

    events = [e for e in daemon.events_of("mcp.tool_call") if e["lease_id"] == summary["lease_id"]]
    assert len(events) == 1
    assert events[0]["result"]["status"] == "success"
    assert "duration_ms" in events[0]["result"]
    assert events[0]["agent_id"] == "content-writer"
    assert events[0]["arguments"] == {"title": "Q2"}


def test_call_debug_logging_does_not_leak(daemon: Daemon) -> None:
    value = daemon.secrets[WRITE_KEY]
    out = sidekey("--log-level", "debug", *CALL, "--config", str(daemon.config_path), env=user_env(daemon))
    assert out.returncode == 0, out.stderr
    assert_not_leaked(value, out)
    assert_not_leaked(daemon.user_token("content-api"), out)


def test_call_show_secrets(daemon: Daemon) -> None:
    value = daemon.secrets[WRITE_KEY]
    out = sidekey(*CALL, "--show-secrets", "--socket", daemon.socket, env=user_env(daemon))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["secrets"] == {"CONTENT_API_KEY": value}
    assert value in out.stdout
    assert value not in out.stderr
    assert_not_leaked(daemon.user_token("content-api"), out)  # only secrets are shown


def test_call_reports_status_and_socket_from_environment(daemon: Daemon) -> None:
    out = sidekey(*CALL, "--status", "error", env=user_env(daemon, SIDEKEY_SOCKET=daemon.socket))
    assert out.returncode == 0, out.stderr
    lease_id = json.loads(out.stdout)["lease_id"]
    event = next(e for e in daemon.events_of("mcp.tool_call") if e["lease_id"] == lease_id)
    assert event["result"]["status"] == "error"


def test_call_errors_are_one_line(daemon: Daemon) -> None:
    cfg = str(daemon.config_path)
    env = user_env(daemon)
    token = env["SIDEKEY_USER_TOKEN"]
    out = sidekey("call", "--server", "content-api", "--tool", "nope", "--config", cfg, env=env)
    assert "tool_unknown" in assert_one_error_line(out)
    assert_not_leaked(token, out)
    line = assert_one_error_line(sidekey(*CALL, "--config", cfg, "--arguments", "[1, 2]", env=env))
    assert "--arguments" in line
    line = assert_one_error_line(sidekey(*CALL, "--config", cfg, "--arguments", "{not json", env=env))
    assert "--arguments" in line
    # no SIDEKEY_USER_TOKEN: the server requires the user's token
    line = assert_one_error_line(sidekey(*CALL, "--config", cfg))
    assert "token_missing" in line
    # a token without the tool's scope
    read_only = daemon.user_token("content-api", scopes=["content:read"])
    out = sidekey(*CALL, "--config", cfg, env={"SIDEKEY_USER_TOKEN": read_only})
    assert "scope_missing" in assert_one_error_line(out)
    assert_not_leaked(read_only, out)
    # an agent the policy denies this server
    out = sidekey("call", "--server", "content-api", "--tool", "create_article",
                  "--agent", "sales-assistant", "--config", cfg, env=env)
    assert "agent_denied_server" in assert_one_error_line(out)
    assert not [e for e in daemon.events_of("mcp.redeem") if e.get("agent_id") == "sales-assistant"]


def test_status(daemon: Daemon) -> None:
    assert daemon.proc is not None
    out = sidekey("status", "--config", str(daemon.config_path))
    assert out.returncode == 0, out.stderr
    assert f"pid {daemon.proc.pid}" in out.stdout
    assert "store: ok; audit: ok" in out.stdout
    assert "backend local: ok" in out.stdout

    out = sidekey("status", "--json", "--config", str(daemon.config_path))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["pid"] == daemon.proc.pid
    assert status["socket"] == daemon.socket
    assert status["backends"]["local"]["ok"] is True

    out = sidekey("status", "--json", env={"SIDEKEY_CONFIG": str(daemon.config_path)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pid"] == daemon.proc.pid
    for value in daemon.secrets.values():
        assert value not in out.stdout


def test_token_issue_redeems_once(daemon: Daemon) -> None:
    out = sidekey(
        "token", "issue", "--server", "content-api", "--tool", "list_articles", "--user", "u1",
        "--json", "--config", str(daemon.config_path),
    )
    assert out.returncode == 0, out.stderr
    tok = json.loads(out.stdout)
    assert set(tok) >= {"resolution_token", "jti", "expires_at"}
    assert daemon.events_of("token.issued")

    status, lease = daemon.request("POST", "/v1/redeem", {"resolution_token": tok["resolution_token"]})
    assert status == 200, lease
    assert lease["secrets"] == {"CONTENT_API_KEY": daemon.secrets["content-api/read-key"]}
    assert lease["tool"] == "list_articles"
    status, body = daemon.request("POST", "/v1/redeem", {"resolution_token": tok["resolution_token"]})
    assert status == 409 and body["error"]["code"] == "token_replayed"

    # without --json: the token alone, on one line
    out = sidekey(
        "token", "issue", "--server", "content-api", "--tool", "list_articles", "--user", "u1",
        "--socket", daemon.socket,
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1
    assert out.stdout.count(".") == 2  # a JWS compact token
    status, _ = daemon.request("POST", "/v1/redeem", {"resolution_token": out.stdout.strip()})
    assert status == 200

    line = assert_one_error_line(sidekey(
        "token", "issue", "--server", "content-api", "--tool", "nope", "--user", "u1",
        "--socket", daemon.socket,
    ))
    assert "tool_unknown" in line


def test_second_serve_on_live_socket_fails(daemon: Daemon) -> None:
    out = sidekey("serve", "--config", str(daemon.config_path))
    line = assert_one_error_line(out)
    assert daemon.socket in line
    assert daemon.request("GET", "/v1/health")[0] == 200


# --------------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize("command", ["call", "status", "token"])
def test_unreachable_daemon_is_one_line(command: str) -> None:
    argv = {
        "call": ["call", "--server", "content-api", "--tool", "create_article"],
        "status": ["status"],
        "token": ["token", "issue", "--server", "content-api", "--tool", "x", "--user", "u"],
    }[command]
    out = sidekey(*argv, "--socket", "/nonexistent/x.sock", "--timeout", "5")
    line = assert_one_error_line(out)
    assert "connection_failed" in line
    assert out.stdout == ""


def test_serve_with_missing_key_file(make_daemon: Any) -> None:
    d: Daemon = make_daemon({"backends": {"local": {"key_file": "keys/missing.key"}}})
    # The backend key is checked before anything is created, and the config's warnings
    # are logged only after a successful start: stderr is exactly the one error line.
    out = sidekey("serve", "--config", str(d.config_path), cwd=d.root)
    line = assert_one_error_line(out, "sidekey: config error:")
    assert "missing.key" in line and "cannot open key file" in line
    assert not Path(d.socket).exists()
    # without the INFO logs, stderr is exactly that line
    out = sidekey("--log-level", "warning", "serve", "--config", str(d.config_path), cwd=d.root)
    assert assert_one_error_line(out, "sidekey: config error:") == line
    assert not Path(d.socket).exists()


def test_serve_with_loose_key_file_mode(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    os.chmod(d.root / "keys" / "local.key", 0o644)
    out = sidekey("serve", "--config", str(d.config_path), cwd=d.root)
    line = assert_one_error_line(out, "sidekey: config error:")  # no warnings, no logs
    assert "local.key" in line and "0644" in line
    assert not Path(d.socket).exists()


def test_keygen_local(tmp_path: Path) -> None:
    key = tmp_path / "k" / "local.key"
    out = sidekey("keygen", "local", "--out", str(key))
    assert out.returncode == 0, out.stderr
    assert key.stat().st_mode & 0o777 == 0o600
    before = key.read_bytes()
    line = assert_one_error_line(sidekey("keygen", "local", "--out", str(key)), "sidekey: config error:")
    assert "refusing to overwrite" in line
    assert key.read_bytes() == before
    assert_one_error_line(sidekey("keygen", "local"))
