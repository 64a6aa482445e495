"""Reproducers for issue 11 items 1 and 2: VaultBackend against the stand-in that models
Vault's state rules (tests/vault_server.py).

Item 1: a dynamic lease dies with the token that issued it (V vault/expiration.go
RevokeByToken), whatever its ``lease_duration`` says. Item 2: a KV v2 secret whose latest
version was deleted or destroyed still has that version as its ``current_version``, so
check-and-set must use it (KV path_data.go validateCheckAndSetOption).

Time: the backend's clock (``FakeClock``) and the stand-in's (``VaultServer.advance``) are
moved on together; nobody sleeps for a TTL.
"""

# ruff: noqa: F811 -- the fixtures imported from test_backend_vault are parameters here

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from sidekey.backends import SecretNotFound, SecretValue
from test_backend_vault import (  # noqa: F401 -- fixtures (vault, journal, make) are used by name
    DYNAMIC,
    LIMIT_S,
    FakeClock,
    Make,
    journal,
    make,
    sref,
    vault,
    wait_until,
    write_private,
)
from vault_server import VaultServer

TOKEN_MAX_TTL = 120  # the AppRole's token_max_ttl; the role's credentials live 600 s


def _assert_bound_by_token(vault: VaultServer, cred: SecretValue) -> None:
    """Vault has the credential, and sidekey does not promise it longer than the token
    that issued it lives (that token's death revokes it)."""
    assert cred.lease_id is not None and cred.lease_ttl_s is not None
    assert cred.lease_id in vault.live_leases(), "handed out a credential Vault has revoked"
    token = vault.token(vault.lease(cred.lease_id).token_id)
    assert token.expires_at is not None
    assert cred.lease_ttl_s <= token.expires_at - vault.now() + 1, (
        f"lease_ttl_s {cred.lease_ttl_s} outlives its token ({token.remaining(vault.now())} s left)")


# Issue 11 item 1 (failed before the fix: lease_ttl_s 600 with the token's 119 s left).
async def test_credential_expiry_is_capped_by_its_token(
    vault: VaultServer, make: Make, tmp_path: Path
) -> None:
    role_id, secret_id = vault.add_approle(token_ttl=TOKEN_MAX_TTL, token_max_ttl=TOKEN_MAX_TTL)
    write_private(tmp_path / "secret-id", secret_id)
    backend = make(auth="approle", role_id=role_id, secret_id_file="secret-id", clock=FakeClock())
    with trio.fail_after(LIMIT_S):
        cred = await backend.fetch(sref(**DYNAMIC))
    _assert_bound_by_token(vault, cred)


# Issue 11 item 1 (failed before the fix: the three pooled credentials, revoked by Vault
# with the old token, were handed out).
async def test_pool_after_token_rollover_hands_out_only_live_credentials(
    vault: VaultServer, make: Make, tmp_path: Path
) -> None:
    role_id, secret_id = vault.add_approle(token_ttl=TOKEN_MAX_TTL, token_max_ttl=TOKEN_MAX_TTL)
    write_private(tmp_path / "secret-id", secret_id)
    clock = FakeClock()
    ref = sref(**DYNAMIC, pool_size=3)
    backend = make(auth="approle", role_id=role_id, secret_id_file="secret-id", clock=clock)
    backend.register(ref)
    handed: list[SecretValue] = []
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            await wait_until(lambda: len(backend.pooled_lease_ids()) == 3)
            pooled = set(backend.pooled_lease_ids())
            # The token reaches its max TTL: Vault revokes it and every lease it issued,
            # though each lease_duration said 600 s.
            vault.advance(TOKEN_MAX_TTL + 1)
            clock.advance(TOKEN_MAX_TTL + 1)
            assert not pooled & vault.live_leases()
            for _ in range(3):
                handed.append(await backend.fetch(ref))
            nursery.cancel_scope.cancel()
    for cred in handed:
        _assert_bound_by_token(vault, cred)


# Issue 11 item 2 (failed before the fix: the deleted version read as "absent", cas=0 was
# sent, and Vault refused it every time).
@pytest.mark.parametrize("how", ["deleted", "destroyed"])
async def test_rotate_after_the_latest_version_was_deleted_or_destroyed(
    vault: VaultServer, make: Make, how: str
) -> None:
    vault.put_secret("secret", "app/db", {"password": "v1"})
    vault.put_secret("secret", "app/db", {"password": "v2"})
    if how == "deleted":
        vault.delete_secret_version("secret", "app/db")
    else:
        vault.destroy_secret_version("secret", "app/db")
    ref = sref(mount="secret", path="app/db", key="password")
    backend = make()
    with trio.fail_after(LIMIT_S):
        with pytest.raises(SecretNotFound) as exc:
            await backend.fetch(ref)
        # The operator is told what happened, not "no such secret".
        assert how in exc.value.message and "2" in exc.value.message
        assert await backend.rotate(ref, "v3") == "3"  # cas = 2, the current version
        assert (await backend.fetch(ref)).value == "v3"
    assert vault.secret_versions("secret", "app/db")[3] == {"password": "v3"}
