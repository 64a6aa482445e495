"""Issue 15, item 5: operator-facing errors. A client command with the daemon down names
the socket it tried and how to point at another; ``serve`` without a config names
--config and the quickstart; an unknown key in a backend (or audit sink) section reads like
every other section's; ``check-config --probe`` reaches every backend and issuer and
fetches every mapped secret, so a typo'd secret name fails at check time; ``approvals
list`` says who approved and who redeemed."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from harness import Daemon
from moto_server import closed_port_url, run_moto_server, use_aws_test_env
from sidekey import cli
from test_approvals_daemon import hold_every_call
from test_cli import assert_not_leaked, assert_one_error_line, sidekey, write_config
from vault_server import VaultServer

pytestmark = pytest.mark.integration

HINTS = ("--socket PATH", "$SIDEKEY_SOCKET=PATH", "--config FILE")


# --------------------------------------------------------------------------- daemon down


def test_a_client_command_with_the_daemon_down_names_the_socket_and_the_ways_out(
    make_daemon: Any,
) -> None:
    d: Daemon = make_daemon()
    d.start()
    assert d.stop() == 0  # a real daemon, now down: its socket is gone
    call = ["call", "--server", "content-api", "--tool", "list_articles", "--agent", "content-writer"]
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["--config", str(d.config_path)], {},
         f"tried socket {d.socket} (listen.socket of --config {d.config_path})"),
        (["--socket", str(d.root / "other.sock")], {},
         f"tried socket {d.root / 'other.sock'} (from --socket)"),
        ([], {"SIDEKEY_SOCKET": str(d.root / "env.sock")},
         f"tried socket {d.root / 'env.sock'} (from $SIDEKEY_SOCKET)"),
        ([], {"SIDEKEY_CONFIG": str(d.config_path)},
         f"tried socket {d.socket} (listen.socket of $SIDEKEY_CONFIG {d.config_path})"),
    ]
    if not Path(cli.DEFAULT_SOCKET).exists():  # this machine runs no sidekey of its own
        cases.append(([], {}, f"tried socket {cli.DEFAULT_SOCKET} (the default: no --socket, "
                              "$SIDEKEY_SOCKET or --config given)"))
    for argv, env, tried in cases:
        for command in (call, ["status"], ["approvals", "list"]):
            line = assert_one_error_line(sidekey(*command, *argv, env=env))
            assert line.startswith("sidekey: error: connection_failed: "), line
            assert tried in line, (command, argv, env, line)
            assert "Is the daemon running there" in line and all(h in line for h in HINTS), line


def test_serve_without_a_config_names_config_and_the_quickstart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    missing = tmp_path / "etc" / "sidekey.yaml"
    monkeypatch.setattr(cli, "DEFAULT_CONFIG", str(missing))
    monkeypatch.delenv("SIDEKEY_CONFIG", raising=False)
    assert cli.main(["serve"]) == cli.EXIT_FAIL
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sidekey: error: no config: "), err
    assert f"the default {missing} does not exist" in err
    assert "--config FILE" in err and "$SIDEKEY_CONFIG" in err
    assert "examples/quickstart/run.sh" in err and "README" in err
    # Every command that reads the config says the same.
    assert cli.main(["check-config"]) == cli.EXIT_FAIL
    assert capsys.readouterr().err.startswith("sidekey: error: no config: ")
    # A named config that does not exist is the config error naming that file.
    assert cli.main(["serve", "--config", str(tmp_path / "nope.yaml")]) == cli.EXIT_FAIL
    err = capsys.readouterr().err
    assert err.startswith(f"sidekey: config error: {tmp_path / 'nope.yaml'}: cannot read"), err


# --------------------------------------------------------------------------- config errors


def _set(section: str, name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(cfg: dict[str, Any]) -> None:
        cfg.setdefault(section, {})[name] = value
    return change


def _sink(value: Any) -> Callable[[dict[str, Any]], None]:
    def change(cfg: dict[str, Any]) -> None:
        cfg.setdefault("audit", {})["sinks"] = [value]
    return change


LOCAL_KEYS = "type, path, key_file, key_credential, cache_ttl_s, stale_if_error_s"
AWS_KEYS = "type, region, endpoint_url, profile, timeout_s, max_concurrency, cache_ttl_s, stale_if_error_s"


@pytest.mark.parametrize(("change", "expected"), [
    (lambda cfg: cfg["backends"]["local"].update(kye_file="keys/local.key"),
     f"$.backends.local.kye_file: unknown key (known keys: {LOCAL_KEYS})"),
    (_set("backends", "vault", {"type": "vault", "addr": "http://127.0.0.1:1", "tokenfile": "t"}),
     "$.backends.vault.tokenfile: unknown key (known keys: type, addr, namespace, auth, token_file,"),
    (_set("backends", "aws", {"type": "aws", "region": "eu-west-1", "regoin": "x"}),
     f"$.backends.aws.regoin: unknown key (known keys: {AWS_KEYS})"),
    (_set("backends", "s3", {"type": "s3", "region": "eu-west-1"}),
     '$.backends.s3.type: expected one of local, vault, aws, oauth, got "s3"'),
    (_set("backends", "x", {"region": "eu-west-1"}),
     "$.backends.x.type: missing: set it to one of local, vault, aws, oauth"),
    (_sink({"type": "syslog", "hots": "siem.example"}),
     "$.audit.sinks.0.hots: unknown key (known keys: type, name, required, transport,"),
    # ...as every other section reads:
    (_set("listen", "sockt", "x"), "$.listen.sockt: unknown key (known keys: socket, mode,"),
])
def test_unknown_keys_in_backend_sections_read_like_every_section(
    make_daemon: Any, change: Any, expected: str,
) -> None:
    d: Daemon = make_daemon()
    path = write_config(d, "changed.yaml", change)
    line = assert_one_error_line(sidekey("check-config", "--config", str(path)),
                                 prefix="sidekey: config error:")
    assert line.startswith(f"sidekey: config error: changed.yaml: {expected}"), line


# --------------------------------------------------------------------------- check-config --probe


@pytest.fixture
def moto_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    use_aws_test_env(monkeypatch)
    with run_moto_server() as url:
        yield url


@pytest.fixture
def vault() -> Iterator[VaultServer]:
    with VaultServer() as server:
        server.put_secret("secret", "analytics/dsn", {"dsn": "postgres://ro:VAULT-VALUE@db/a"})
        server.add_dynamic_role("readonly", mount="database", ttl=3600)
        yield server


def _probe_config(d: Daemon, vault: VaultServer, moto_url: str) -> str:
    """Local, Vault (static + dynamic) and AWS secrets mapped; returns the AWS value."""
    token_file = d.root / "keys" / "vault-token"
    token_file.write_text(vault.create_token(ttl=3600) + "\n")
    os.chmod(token_file, 0o600)
    aws_value = f"AWS-VALUE-{os.urandom(4).hex()}"
    boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto_url).create_secret(
        Name="content/read", SecretString=aws_value)
    cfg = d.config
    cfg["backends"]["vault"] = {"type": "vault", "addr": vault.addr,
                                "token_file": "keys/vault-token", "timeout_s": 2}
    cfg["backends"]["aws"] = {"type": "aws", "region": "us-east-1", "endpoint_url": moto_url,
                              "timeout_s": 2}
    cfg["secrets"]["content-api"]["list_articles"] = {
        "CONTENT_API_KEY": {"backend": "aws", "secret_id": "content/read"}}
    cfg["secrets"]["analytics-db"]["query_metrics"] = {
        "DATABASE_URL": {"backend": "vault", "mount": "database", "path": "creds/readonly",
                         "kind": "dynamic"}}
    cfg["secrets"]["analytics-db"]["export_report"] = {
        "DATABASE_URL": {"backend": "vault", "mount": "secret", "path": "analytics/dsn",
                         "key": "dsn"}}
    d.config_path.write_text(yaml.safe_dump(cfg))
    return aws_value


def _probe(d: Daemon, path: Path | None = None) -> Any:
    return sidekey("check-config", "--probe", "--config", str(path or d.config_path))


def test_probe_reaches_every_backend_and_issuer(make_daemon: Any, vault: VaultServer,
                                                moto_url: str) -> None:
    d: Daemon = make_daemon()
    aws_value = _probe_config(d, vault, moto_url)
    out = _probe(d)
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert "  probe backend local (local): reached; 2/2 mapped secrets found" in out.stdout
    assert "  probe backend vault (vault): reached; 2/2 mapped secrets found" in out.stdout
    assert "  probe backend aws (aws): reached; 1/1 mapped secrets found" in out.stdout
    assert re.search(r"  probe issuer https://auth\.example\.com: 1 key\(s\) from jwks_file \S+ "
                     r"\(servers analytics-db, content-api\)", out.stdout), out.stdout
    out = sidekey("check-config", "--probe", "--json", "--config", str(d.config_path))
    summary = json.loads(out.stdout)
    assert summary["probe"]["vault"]["secrets"]["database/creds/readonly"]["checked"].startswith(
        "dynamic: not fetched")
    assert summary["probe"]["aws"]["secrets"]["content/read"]["ok"] is True
    assert vault.live_leases() == set()  # the probe never mints a dynamic credential
    for value in (aws_value, "VAULT-VALUE", *d.secrets.values()):
        assert_not_leaked(value, out)


def test_probe_names_each_typo_and_each_unreachable_service(make_daemon: Any, vault: VaultServer,
                                                            moto_url: str) -> None:
    d: Daemon = make_daemon()
    aws_value = _probe_config(d, vault, moto_url)

    def typos(cfg: dict[str, Any]) -> None:
        secrets = cfg["secrets"]
        secrets["content-api"]["create_article"]["CONTENT_API_KEY"]["name"] = "content-api/wirte-key"
        secrets["content-api"]["list_articles"]["CONTENT_API_KEY"]["secret_id"] = "content/raed"
        secrets["analytics-db"]["export_report"]["DATABASE_URL"]["path"] = "analytics/dns"
        cfg["oauth2_issuers"]["https://auth.example.com"] = {"jwks_uri": closed_port_url() + "/jwks"}

    out = _probe(d, write_config(d, "typos.yaml", typos))
    assert out.returncode == 1, (out.stdout, out.stderr)
    problems = [line for line in out.stderr.splitlines() if line.startswith("sidekey: probe failed: ")]
    assert len(problems) == 4, out.stderr
    assert any("backend local: secret content-api/wirte-key (used by content-api/create_article "
               "CONTENT_API_KEY): secret_not_found" in p for p in problems), problems
    assert any("backend aws: secret content/raed (used by content-api/list_articles "
               "CONTENT_API_KEY): secret_not_found" in p for p in problems), problems
    assert any("backend vault: secret secret/analytics/dns#dsn (used by analytics-db/export_report "
               "DATABASE_URL): secret_not_found" in p for p in problems), problems
    assert any(p.startswith("sidekey: probe failed: issuer https://auth.example.com (servers "
                            "analytics-db, content-api): jwks_unavailable") for p in problems)
    assert out.stderr.splitlines()[-1] == "sidekey: error: check-config --probe: 4 problem(s)"

    # Vault down: named once (not once per secret), the others still checked.
    vault.down()
    out = _probe(d)
    assert out.returncode == 1, (out.stdout, out.stderr)
    problems = [line for line in out.stderr.splitlines() if line.startswith("sidekey: probe failed: ")]
    assert len(problems) == 1 and problems[0].startswith(
        "sidekey: probe failed: backend vault (vault): backend_unavailable"), out.stderr
    assert "probe backend aws (aws): reached; 1/1" in out.stdout
    for value in (aws_value, "VAULT-VALUE", *d.secrets.values()):
        assert_not_leaked(value, out)


# --------------------------------------------------------------------------- approvals list


def test_approvals_list_says_who_approved_and_who_redeemed(make_daemon: Any) -> None:
    d: Daemon = make_daemon()
    hold_every_call(d)
    d.start()
    args = {"article_id": 7}
    status, body = d.authorize("content-api", "publish_article", arguments=args)
    assert status == 202, body
    approval_id = body["approval_id"]
    out = sidekey("approvals", "approve", approval_id, "--reason", "launch", "--socket", d.socket)
    assert out.returncode == 0, out.stderr
    approver = d.events_of("approval.approved")[0]["decided_by"]  # the CLI process
    status, body = d.authorize("content-api", "publish_article", arguments=args,
                               approval_id=approval_id)
    assert status == 200, body
    server = f"root (uid 0, pid {os.getpid()})"  # the process that presented the call
    assert approver != server

    out = sidekey("approvals", "list", "--state", "redeemed", "--socket", d.socket)
    assert out.returncode == 0, out.stderr
    lines = [line.strip() for line in out.stdout.splitlines()]
    assert lines[0].startswith(f"{approval_id}  redeemed  content-api/publish_article  user alice")
    assert f"requested by {server} at " in out.stdout
    [approved] = [line for line in lines if line.startswith("approved by ")]
    assert approved.startswith(f"approved by {approver} at ") and approved.endswith(": launch")
    [redeemed] = [line for line in lines if line.startswith("redeemed by ")]
    assert redeemed.startswith(f"redeemed by {server} at "), out.stdout
    out = sidekey("approvals", "list", "--state", "redeemed", "--json", "--socket", d.socket)
    [record] = json.loads(out.stdout)
    assert (record["decided_by"], record["redeemed_by"]) == (approver, server)

    # A denied one says "denied by".
    status, body = d.authorize("content-api", "publish_article", arguments={"article_id": 8})
    denied_id = body["approval_id"]
    sidekey("approvals", "deny", denied_id, "--reason", "no", "--socket", d.socket)
    out = sidekey("approvals", "list", "--state", "denied", "--socket", d.socket)
    assert re.search(r"^    denied by root \(uid 0, pid \d+\) at \S+: no$", out.stdout, re.M), out.stdout
