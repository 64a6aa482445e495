"""Tokens with a use limit (issue 11 item 1): every authenticated Vault request spends a
use, a refused one too, and the last use revokes the token with its credentials (the
stand-in follows V vault/request_handling.go). sidekey's health checks must not spend
them: ``sys/health`` is unauthenticated; ``lookup-self`` runs only for unlimited tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from sidekey.backends import BackendError
from sidekey.backends import vault as vault_module
from sidekey.backends.vault import VaultBackend
from test_backend_vault import LIMIT_S, sref, write_private
from vault_server import VaultServer

STATIC = sref(mount="secret", path="app/db", key="password")


@pytest.fixture
def vault() -> Iterator[VaultServer]:
    with VaultServer() as server:
        server.put_secret("secret", "app/db", {"password": "pw"})
        yield server


Make = Callable[..., VaultBackend]


@pytest.fixture
def make(vault_backend: Make) -> Make:
    return vault_backend


@pytest.fixture(autouse=True)
def probe_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vault_module, "HEALTH_PROBE_INTERVAL_S", 0.0)


async def test_health_checks_spend_no_use_of_a_limited_token(
    vault: VaultServer, make: Make, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = vault.create_token(ttl=3600, num_uses=10)
    write_private(tmp_path / "limited", token)
    backend = make(token_file="limited")
    caplog.set_level(logging.WARNING, logger="sidekey.backends.vault")
    with trio.fail_after(LIMIT_S):
        assert (await backend.fetch(STATIC)).value == "pw"  # lookup (login check) + read
        left = vault.token(token).num_uses
        for _ in range(5):
            health = await backend.health()
            assert health["ok"] is True, health
    assert vault.token(token).num_uses == left == 8
    assert vault.counts["health"] >= 5
    assert any("num_uses 9" in r.getMessage() and "token_num_uses=0" in r.getMessage()
               for r in caplog.records)


async def test_health_of_an_unlimited_token_still_finds_it_revoked(
    vault: VaultServer, make: Make
) -> None:
    """With no use limit, health looks the token up: a token revoked behind sidekey's back
    shows as not ok, with the reason."""
    backend = make()
    with trio.fail_after(LIMIT_S):
        assert (await backend.health())["ok"] is True
        lookups = vault.counts.get("lookup_self", 0)
        for token in vault.tokens():
            vault.revoke_token(token.id)
        health = await backend.health()
    assert vault.counts.get("lookup_self", 0) > lookups
    assert health["ok"] is False and "error" in health


async def test_a_sealed_vault_is_reported_by_health_without_spending_a_use(
    vault: VaultServer, make: Make, tmp_path: Path
) -> None:
    token = vault.create_token(ttl=3600, num_uses=10)
    write_private(tmp_path / "limited", token)
    backend = make(token_file="limited")
    with trio.fail_after(LIMIT_S):
        await backend.fetch(STATIC)
        left = vault.token(token).num_uses
        vault.set_sealed(True)
        health = await backend.health()
    assert health["ok"] is False and "sealed" in str(health["error"])
    assert vault.token(token).num_uses == left


async def test_a_denied_call_with_a_limited_approle_token_logs_in_again_without_a_lookup(
    vault: VaultServer, make: Make, tmp_path: Path
) -> None:
    """A 403 may mean a stale token or the policy's answer. For a limited-use AppRole
    token sidekey logs in again (a login spends no use) instead of looking the token up
    (one more use); the policy's answer is then reported as a denial."""
    vault.add_policy("kv-only", {"secret/data/app/*": ["read"]})
    role_id, secret_id = vault.add_approle(token_num_uses=20, token_policies=["kv-only"])
    write_private(tmp_path / "secret-id", secret_id)
    backend = make(auth="approle", role_id=role_id, secret_id_file="secret-id")
    with trio.fail_after(LIMIT_S):
        assert (await backend.fetch(STATIC)).value == "pw"
        lookups, logins = vault.counts.get("lookup_self", 0), vault.counts.get("login", 0)
        with pytest.raises(BackendError, match="permission denied"):
            await backend.fetch(sref(mount="secret", path="other/x", key="k"))
    assert vault.counts.get("lookup_self", 0) == lookups
    assert vault.counts.get("login", 0) == logins + 1
