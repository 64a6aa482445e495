"""How VaultBackend reads Vault's less common answers (issue 11 items 2, 4, 6): a
synchronous revocation that is slow or fails, statuses hvac has no exception class for,
a rate-limit quota's Retry-After, a deleted secret named as such."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

from sidekey.backends import BackendError, SecretNotFound
from sidekey.backends.vault import CALL_MARGIN_S, VaultBackend
from test_backend_vault import LIMIT_S, Journal, sref
from vault_server import VaultServer

TIMEOUT_S = 0.5
DYNAMIC = sref(mount="database", path="creds/readonly", kind="dynamic")
STATIC = sref(mount="secret", path="app/db", key="password")


@pytest.fixture
def vault() -> Iterator[VaultServer]:
    with VaultServer() as server:
        server.add_dynamic_role("readonly", ttl=600)
        server.put_secret("secret", "app/db", {"password": "pw"})
        yield server


@pytest.fixture
def backend(vault_backend: Callable[..., VaultBackend]) -> VaultBackend:
    return vault_backend(timeout_s=TIMEOUT_S, journal=Journal())


async def test_a_slow_synchronous_revocation_is_bounded_and_retried(
    vault: VaultServer, backend: VaultBackend
) -> None:
    """Revocation is synchronous (Vault's API default: 204 once the database dropped the
    user). A database that takes longer than the call's timeout: release fails within
    the bound (the journal keeps the lease, as for any failed release) and a later
    release, once the database is quick again, ends it."""
    with trio.fail_after(LIMIT_S):
        cred = await backend.fetch(DYNAMIC)
        assert cred.lease_id is not None
        vault.set_revoke_delay(5 * TIMEOUT_S)
        with pytest.raises(BackendError) as slow:
            await backend.release(cred.lease_id)
        # Ended by the backend's own bounds (the HTTP read timeout, timeout_s, or the
        # call's, timeout_s + CALL_MARGIN_S; the message says which), not by the test's.
        message = slow.value.message
        assert ("lease revocation: timed out" in message
                or f"no answer within {TIMEOUT_S + CALL_MARGIN_S:g} s" in message), message
        vault.set_revoke_delay(0)
        await backend.release(cred.lease_id)  # the slow one may have finished: 204 either way
    assert cred.lease_id not in vault.live_leases()


async def test_a_failed_synchronous_revocation_is_an_error_and_the_lease_stays(
    vault: VaultServer, backend: VaultBackend
) -> None:
    """The database engine fails to drop the user: Vault answers 400 and keeps the lease;
    release says so (with Vault's reason), and a retry revokes it."""
    with trio.fail_after(LIMIT_S):
        cred = await backend.fetch(DYNAMIC)
        assert cred.lease_id is not None
        vault.fail_revocations(1)
        with pytest.raises(BackendError, match=r"HTTP 400.*cannot be dropped"):
            await backend.release(cred.lease_id)
        assert cred.lease_id in vault.live_leases()
        await backend.release(cred.lease_id)
    assert cred.lease_id not in vault.live_leases()


@pytest.mark.parametrize("status", [405, 412, 504])
async def test_statuses_hvac_has_no_class_for_are_reported_by_number(
    vault: VaultServer, backend: VaultBackend, status: int
) -> None:
    vault.fail("kv_read", status, ["upstream says no"])
    with trio.fail_after(LIMIT_S), pytest.raises(BackendError) as err:
        await backend.fetch(STATIC)
    assert f"HTTP {status}: upstream says no" in err.value.message


async def test_a_rate_limit_quota_reports_its_retry_after(
    vault: VaultServer, backend: VaultBackend
) -> None:
    vault.rate_limit(times=1, retry_after=7, route="kv_read")
    with trio.fail_after(LIMIT_S), pytest.raises(BackendError) as err:
        await backend.fetch(STATIC)
    assert "rate-limited" in err.value.message and "retry after 7 s" in err.value.message


@pytest.mark.parametrize("how", ["deleted", "destroyed"])
async def test_reading_a_deleted_secret_says_so(
    vault: VaultServer, backend: VaultBackend, how: str
) -> None:
    remove: Callable[..., Any] = (vault.delete_secret_version if how == "deleted"
                                  else vault.destroy_secret_version)
    remove("secret", "app/db")
    with trio.fail_after(LIMIT_S), pytest.raises(SecretNotFound) as err:
        await backend.fetch(STATIC)
    assert err.value.code == "secret_deleted"
    assert f"version 1 of this secret was {how}" in err.value.message
    with trio.fail_after(LIMIT_S), pytest.raises(SecretNotFound) as absent:
        await backend.fetch(sref(mount="secret", path="app/never", key="k"))
    assert "no such secret" in absent.value.message and absent.value.code != "secret_deleted"
