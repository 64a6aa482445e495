"""Vault and AWS Secrets Manager behind a real daemon: hvac against the in-repo Vault
API server, boto3 over HTTP against moto in server mode. Faults, dynamic credentials
revoked at release / expiry / restart (asserted on the Vault side), rotation under load."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import yaml

from harness import Daemon
from moto_server import run_moto_server, use_aws_test_env
from vault_server import VaultServer

DB_VALUE = "postgres://ro:static-pw@db/analytics"


@pytest.fixture
def moto_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    use_aws_test_env(monkeypatch)
    with run_moto_server() as url:
        yield url


@pytest.fixture
def vault() -> Iterator[VaultServer]:
    with VaultServer() as server:
        server.put_secret("secret", "analytics/dsn", {"dsn": DB_VALUE})
        server.add_dynamic_role("readonly", mount="database", ttl=3600)
        yield server


def _configure(d: Daemon, vault: VaultServer, moto_url: str, *, max_ttl: int = 120) -> str:
    token_file = d.root / "keys" / "vault-token"
    token_file.write_text(vault.create_token(ttl=3600) + "\n")
    os.chmod(token_file, 0o600)
    aws_value = f"aws-read-key-{os.urandom(4).hex()}"
    boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto_url).create_secret(
        Name="content/read", SecretString=aws_value)
    cfg = d.config
    cfg["backends"]["vault"] = {"type": "vault", "addr": vault.addr, "token_file": "keys/vault-token",
                                "timeout_s": 2}
    cfg["backends"]["aws"] = {"type": "aws", "region": "us-east-1", "endpoint_url": moto_url,
                              "timeout_s": 2}
    cfg["secrets"]["content-api"]["list_articles"] = {
        "CONTENT_API_KEY": {"backend": "aws", "secret_id": "content/read"}}
    cfg["secrets"]["analytics-db"]["query_metrics"] = {
        "DATABASE_URL": {"backend": "vault", "mount": "database", "path": "creds/readonly",
                         "kind": "dynamic"}}
    cfg["secrets"]["analytics-db"]["export_report"] = {
        "DATABASE_URL": {"backend": "vault", "mount": "secret", "path": "analytics/dsn", "key": "dsn"}}
    cfg["leases"]["max_ttl_seconds"] = max_ttl
    # content-writer may also export reports here
    agents = d.root / "agent-tool-mappings.yaml"
    doc = yaml.safe_load(agents.read_text())
    doc["agents"]["content-writer"]["allowed_servers"][1]["tools"] = ["query_metrics", "export_report"]
    agents.write_text(yaml.safe_dump(doc))
    d.config_path.write_text(yaml.safe_dump(cfg))
    return aws_value


def _redeem(d: Daemon, server: str, tool: str) -> tuple[int, dict[str, Any]]:
    status, auth = d.authorize(server, tool)
    if status != 200:
        return status, auth
    return d.request("POST", "/v1/redeem", {"resolution_token": auth["resolution_token"]})


def test_aws_and_vault_values_and_dynamic_revocation(make_daemon: Any, vault: VaultServer,
                                                     moto_url: str) -> None:
    d: Daemon = make_daemon()
    aws_value = _configure(d, vault, moto_url)
    d.start()
    status, lease = _redeem(d, "content-api", "list_articles")
    assert status == 200 and lease["secrets"]["CONTENT_API_KEY"] == aws_value, lease
    status, health = d.request("GET", "/v1/health")
    assert status == 200, health
    assert health["backends"]["vault"]["authenticated"] is True
    assert health["backends"]["vault"]["token_ttl_s"] > 3000
    assert health["backends"]["aws"]["reachable"] is True
    status, lease = _redeem(d, "analytics-db", "export_report")
    assert status == 200 and lease["secrets"]["DATABASE_URL"] == DB_VALUE, lease

    # dynamic: a fresh credential per call, revoked when the call's lease is released
    status, one = _redeem(d, "analytics-db", "query_metrics")
    assert status == 200, one
    status, two = _redeem(d, "analytics-db", "query_metrics")
    assert one["secrets"]["DATABASE_URL"] != two["secrets"]["DATABASE_URL"]
    assert len(vault.live_leases()) == 2
    assert d.request("POST", "/v1/release", {"lease_id": one["lease_id"], "status": "success"})[0] == 200
    assert len(vault.live_leases()) == 1 and len(vault.revoked_leases) == 1

    # a crash with a dynamic credential out: revoked at the next start
    d.kill()
    d.start()
    deadline = time.monotonic() + 10
    while vault.live_leases() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vault.live_leases() == set()
    assert any(e["lease_id"] == two["lease_id"] for e in d.events_of("lease.revoked"))
    assert DB_VALUE.encode() not in d.everything_written()
    assert aws_value.encode() not in d.everything_written()


def test_dynamic_credential_revoked_at_lease_expiry(make_daemon: Any, vault: VaultServer,
                                                    moto_url: str) -> None:
    d: Daemon = make_daemon()
    _configure(d, vault, moto_url, max_ttl=1)
    d.start()
    status, lease = _redeem(d, "analytics-db", "query_metrics")
    assert status == 200, lease
    assert len(vault.live_leases()) == 1
    deadline = time.monotonic() + 15
    while vault.live_leases() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vault.live_leases() == set()
    assert d.wait_events("lease.expired")


def test_backend_down_is_503_and_other_tools_still_served(make_daemon: Any, vault: VaultServer,
                                                          moto_url: str) -> None:
    d: Daemon = make_daemon()
    aws_value = _configure(d, vault, moto_url)
    d.start()
    vault.down()
    # No hang: each request has the harness's 10 s socket timeout (TimeoutError otherwise).
    status, body = _redeem(d, "analytics-db", "export_report")
    assert status == 503 and body["error"]["code"] == "backend_unavailable", body
    status, lease = _redeem(d, "content-api", "list_articles")
    assert status == 200 and lease["secrets"]["CONTENT_API_KEY"] == aws_value
    vault.up()
    status, lease = _redeem(d, "analytics-db", "export_report")
    assert status == 200, lease


def test_rotation_mid_traffic_never_mixes_or_fails(make_daemon: Any, vault: VaultServer,
                                                   moto_url: str) -> None:
    d: Daemon = make_daemon()
    old = _configure(d, vault, moto_url)
    d.start()
    new = "aws-rotated-value-0123456789"
    seen: list[tuple[bool, str]] = []  # (request started after the rotation answered, value)
    errors: list[Any] = []
    stop = threading.Event()
    rotated = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            after = rotated.is_set()
            status, lease = _redeem(d, "content-api", "list_articles")
            if status != 200:
                errors.append(lease)
            else:
                seen.append((after, lease["secrets"]["CONTENT_API_KEY"]))

    def wait_for(pred: Any) -> None:
        # Observed progress, not a guessed duration; the deadline only bounds a hang.
        deadline = time.monotonic() + 30
        while not pred() and not errors:
            assert time.monotonic() < deadline, f"traffic stalled: {len(seen)} calls"
            time.sleep(0.01)

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        wait_for(lambda: len(seen) >= 3)  # the rotation lands mid-traffic
        status, body = d.request("POST", "/v1/admin/secrets/content%2Fread/rotate",
                                 {"value": new})
        assert status == 200, body
        rotated.set()
        wait_for(lambda: sum(after for after, _ in seen) >= 3)
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert errors == []
    assert {value for _, value in seen} <= {old, new}
    assert old in {value for after, value in seen if not after}
    assert {value for after, value in seen if after} == {new}
    stages = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto_url)\
        .describe_secret(SecretId="content/read")["VersionIdsToStages"]
    assert sorted(sorted(v) for v in stages.values()) == [["AWSCURRENT"], ["AWSPREVIOUS"]]


def test_warm_pool_is_filled_at_start_and_each_credential_handed_out_once(
    make_daemon: Any, vault: VaultServer, moto_url: str
) -> None:
    d: Daemon = make_daemon()
    _configure(d, vault, moto_url)
    cfg = yaml.safe_load(d.config_path.read_text())
    cfg["secrets"]["analytics-db"]["query_metrics"]["DATABASE_URL"]["pool_size"] = 2
    d.config_path.write_text(yaml.safe_dump(cfg))
    d.start()
    deadline = time.monotonic() + 10
    while len(vault.live_leases()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    pooled = set(vault.live_leases())
    assert len(pooled) == 2  # filled before any call
    values = set()
    for _ in range(3):
        status, lease = _redeem(d, "analytics-db", "query_metrics")
        assert status == 200, lease
        values.add(lease["secrets"]["DATABASE_URL"])
    assert len(values) == 3  # never the same credential twice
    assert d.stop() == 0
    # a clean stop revokes what is still pooled; the 3 handed out belong to open leases
    handed_out = set(vault.live_leases())
    assert len(handed_out) == 3 and pooled <= handed_out
    # ... which the next start revokes (before it fills a new pool)
    d.start()
    deadline = time.monotonic() + 10
    while handed_out & vault.live_leases() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not handed_out & vault.live_leases()


def test_failed_revocation_is_retried(make_daemon: Any, vault: VaultServer, moto_url: str) -> None:
    d: Daemon = make_daemon()
    _configure(d, vault, moto_url)
    cfg = yaml.safe_load(d.config_path.read_text())
    cfg["leases"]["revocation_retry_s"] = 0.5
    d.config_path.write_text(yaml.safe_dump(cfg))
    d.start()
    status, lease = _redeem(d, "analytics-db", "query_metrics")
    assert status == 200, lease
    vault.down()
    status, body = d.request("POST", "/v1/release", {"lease_id": lease["lease_id"], "status": "success"})
    assert status == 200, body  # the call is over; the revocation failed and is pending
    assert len(vault.live_leases()) == 1
    vault.up()
    deadline = time.monotonic() + 15
    while vault.live_leases() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vault.live_leases() == set()
