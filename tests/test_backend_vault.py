"""VaultBackend through hvac against the in-repo Vault API server (tests/vault_server.py).

The HTTP calls are real (loopback, worker threads), so there is no autojump clock here:
every test runs under ``trio.fail_after(LIMIT_S)``, every wait polls with a bound, and
the failure cases assert that they came back within their own, much smaller bound.
Token and lease expiry use short real TTLs, or an injected wall clock (``FakeClock``)
where the backend's view of time is what matters.

``TestRealVault`` runs the main flows against a real Vault when
``SIDEKEY_TEST_VAULT_ADDR`` and ``SIDEKEY_TEST_VAULT_TOKEN`` are set (skipped otherwise).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from sidekey.backends import BackendError, SecretNotFound, SecretValue
from sidekey.backends import vault as vault_module
from sidekey.backends.vault import VaultBackend
from sidekey.config import SecretRef, VaultBackendConfig
from sidekey.protocol import BadRequest, ConfigError, SidekeyError
from vault_server import VaultServer

LIMIT_S = 20.0  # per test; the backend's own bounds are far smaller
TIMEOUT_S = 1.0  # the backends' timeout_s unless a test says otherwise


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Journal:
    """A LeaseJournal that remembers what it was told, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, float | None]] = []
        self.fail_issued: Exception | None = None
        self.intents: dict[str, str] = {}  # open intent id -> lease prefix

    async def intent(self, backend: str, intent_id: str, prefix: str, *, at: float,
                     deadline: float) -> None:
        assert backend == "vault" and prefix.endswith("/") and deadline > at
        self.intents[intent_id] = prefix

    async def issued(self, backend: str, lease_id: str, expires_at: float, *,
                     intent_id: str | None = None) -> None:
        assert backend == "vault"
        if self.fail_issued is not None:
            raise self.fail_issued
        assert intent_id is not None and lease_id.startswith(self.intents.pop(intent_id))
        self.events.append(("issued", lease_id, expires_at))

    async def intent_done(self, backend: str, intent_id: str) -> None:
        assert backend == "vault"
        self.intents.pop(intent_id, None)

    async def revoked(self, backend: str, lease_id: str) -> None:
        assert backend == "vault"
        self.events.append(("revoked", lease_id, None))

    def ids(self, kind: str) -> list[str]:
        return [lid for k, lid, _ in self.events if k == kind]


def vcfg(**fields: Any) -> VaultBackendConfig:
    """Build the config section the way the daemon does: by decoding."""
    return msgspec.convert(fields, VaultBackendConfig)


def sref(**fields: Any) -> SecretRef:
    return msgspec.convert({"backend": "vault", **fields}, SecretRef)


def write_private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return path


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


DYNAMIC = {"mount": "database", "path": "creds/readonly", "kind": "dynamic"}


@pytest.fixture
def vault() -> Iterator[VaultServer]:
    with VaultServer() as server:
        server.add_dynamic_role("readonly", ttl=600)
        yield server


@pytest.fixture
def journal() -> Journal:
    return Journal()


@pytest.fixture
def approle(vault: VaultServer, tmp_path: Path) -> dict[str, Any]:
    role_id, secret_id = vault.add_approle()
    write_private(tmp_path / "secret-id", secret_id)
    return {"auth": "approle", "role_id": role_id, "secret_id_file": "secret-id"}


Make = Callable[..., VaultBackend]


@pytest.fixture
async def make(tmp_path: Path, vault: VaultServer, journal: Journal) -> AsyncIterator[Make]:
    made: list[VaultBackend] = []

    def make(*, journal: Any = journal, clock: Callable[[], float] | None = None,
             **fields: Any) -> VaultBackend:
        fields.setdefault("addr", vault.addr)
        fields.setdefault("timeout_s", TIMEOUT_S)
        if (fields.get("auth", "token") == "token" and "token_file" not in fields
                and "token_credential" not in fields):
            write_private(tmp_path / "vault-token", vault.create_token(ttl=3600))
            fields["token_file"] = "vault-token"
        extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
        backend = VaultBackend("vault", vcfg(**fields), base_dir=tmp_path, journal=journal, **extra)
        made.append(backend)
        return backend

    yield make
    with trio.fail_after(LIMIT_S):
        for backend in made:
            await backend.aclose()


def approle_tokens(vault: VaultServer) -> list[str]:
    return [t.id for t in vault.tokens() if t.path == "auth/approle/login"]


# --------------------------------------------------------------------------- KV v2


async def test_kv_reads_latest_and_pinned_version(vault: VaultServer, make: Make) -> None:
    vault.put_secret("secret", "app/db", {"password": "first-pw"})
    vault.put_secret("secret", "app/db", {"password": "second-pw"})
    backend = make()
    with trio.fail_after(LIMIT_S):
        latest = await backend.fetch(sref(mount="secret", path="app/db"))
        pinned = await backend.fetch(sref(mount="secret", path="app/db", version=1))
    assert (latest.value, latest.version, latest.lease_id) == ("second-pw", "2", None)
    assert (pinned.value, pinned.version) == ("first-pw", "1")
    assert "second-pw" not in repr(latest)


async def test_kv_key_selection(vault: VaultServer, make: Make) -> None:
    vault.put_secret("secret", "app/db", {"username": "app", "password": "pw-1", "port": 5432})
    backend = make()
    with trio.fail_after(LIMIT_S):
        assert (await backend.fetch(sref(mount="secret", path="app/db", key="password"))).value == "pw-1"
        # Non-string values are handed out as JSON text.
        assert (await backend.fetch(sref(mount="secret", path="app/db", key="port"))).value == "5432"
        with pytest.raises(SecretNotFound, match="set key") as no_key:
            await backend.fetch(sref(mount="secret", path="app/db"))
        with pytest.raises(SecretNotFound, match="no key 'pass'") as bad_key:
            await backend.fetch(sref(mount="secret", path="app/db", key="pass"))
    for exc in (no_key.value, bad_key.value):
        assert "pw-1" not in exc.message and "password" in exc.message  # names, not values


async def test_kv_missing_path_or_version_is_secret_not_found(vault: VaultServer, make: Make) -> None:
    vault.put_secret("secret", "app/db", {"password": "pw"})
    backend = make()
    with trio.fail_after(LIMIT_S):
        with pytest.raises(SecretNotFound):
            await backend.fetch(sref(mount="secret", path="app/nothing"))
        with pytest.raises(SecretNotFound):
            await backend.fetch(sref(mount="secret", path="app/db", version=7))
        with pytest.raises(SecretNotFound, match="invalid path"):
            await backend.fetch(sref(mount="secret", path="app/../../sys/leases"))


# --------------------------------------------------------------------------- auth


async def test_token_from_private_file(vault: VaultServer, make: Make, tmp_path: Path) -> None:
    token = vault.create_token(ttl=3600)
    write_private(tmp_path / "tok", token)
    vault.put_secret("secret", "a", {"v": "x"})
    backend = make(token_file="tok")
    with trio.fail_after(LIMIT_S):
        assert (await backend.fetch(sref(mount="secret", path="a"))).value == "x"
        health = await backend.health()
    assert vault.counts["lookup_self"] >= 1  # learned the TTL at start
    assert health["authenticated"] is True and health["auth"] == "token"
    assert 3500 < health["token_ttl_s"] <= 3600  # type: ignore[operator]


def test_token_file_must_be_private(vault: VaultServer, tmp_path: Path) -> None:
    token = vault.create_token()
    write_private(tmp_path / "tok", token, mode=0o644)
    with pytest.raises(ConfigError, match="chmod 600") as exc:
        VaultBackend("vault", vcfg(addr=vault.addr, token_file="tok"), base_dir=tmp_path)
    assert token not in str(exc.value)
    with pytest.raises(ConfigError, match="cannot open"):
        VaultBackend("vault", vcfg(addr=vault.addr, token_file="missing"), base_dir=tmp_path)
    write_private(tmp_path / "two", f"{token} {token}")
    with pytest.raises(ConfigError, match="one line") as exc:
        VaultBackend("vault", vcfg(addr=vault.addr, token_file="two"), base_dir=tmp_path)
    assert token not in str(exc.value)


async def test_token_from_systemd_credential(
    vault: VaultServer, make: Make, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    # systemd owns access control of the credentials directory: the mode is not checked.
    write_private(creds / "vault-token", vault.create_token(), mode=0o440)
    vault.put_secret("secret", "a", {"v": "from-cred"})
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    backend = make(token_credential="vault-token")
    with trio.fail_after(LIMIT_S):
        assert (await backend.fetch(sref(mount="secret", path="a"))).value == "from-cred"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        VaultBackend("vault", vcfg(addr=vault.addr, token_credential="vault-token"),
                     base_dir=tmp_path)


def test_constructor_checks_config(vault: VaultServer, tmp_path: Path) -> None:
    write_private(tmp_path / "tok", vault.create_token())
    with pytest.raises(ConfigError, match="role_id"):
        VaultBackend("vault", vcfg(addr=vault.addr, auth="approle", secret_id_file="x"),
                     base_dir=tmp_path)
    with pytest.raises(ConfigError, match="ca_file"):
        VaultBackend("vault", vcfg(addr=vault.addr, token_file="tok", ca_file="nope.pem"),
                     base_dir=tmp_path)
    (tmp_path / "client.pem").write_text("cert")
    write_private(tmp_path / "client.key", "key", mode=0o640)
    with pytest.raises(ConfigError, match="client key file mode"):
        VaultBackend("vault", vcfg(addr=vault.addr, token_file="tok", client_cert="client.pem",
                                   client_key="client.key"), base_dir=tmp_path)


async def test_approle_login(vault: VaultServer, make: Make, approle: dict[str, Any]) -> None:
    vault.put_secret("secret", "a", {"v": "x"})
    backend = make(**approle)
    with trio.fail_after(LIMIT_S):
        assert (await backend.fetch(sref(mount="secret", path="a"))).value == "x"
        assert (await backend.fetch(sref(mount="secret", path="a"))).value == "x"
    assert vault.counts["login"] == 1
    assert len(approle_tokens(vault)) == 1


async def test_approle_bad_secret_id(vault: VaultServer, make: Make, tmp_path: Path) -> None:
    role_id, _ = vault.add_approle()
    write_private(tmp_path / "wrong-id", "not-the-secret-id-0123")
    backend = make(auth="approle", role_id=role_id, secret_id_file="wrong-id")
    with trio.fail_after(LIMIT_S), pytest.raises(BackendError, match="invalid role or secret ID") as exc:
        await backend.fetch(sref(mount="secret", path="a"))
    assert "not-the-secret-id-0123" not in exc.value.message
    assert exc.value.code == "backend_unavailable" and exc.value.status == 503


async def test_run_renews_token_near_expiry(
    vault: VaultServer, make: Make, tmp_path: Path, mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Real time while Vault is called (worker threads), then a virtual stretch in which
    # the auth loop wakes several times: "no second renewal" is shown over three of its
    # longest sleeps, however loaded the machine is, instead of a fixed real 0.3 s.
    mock_clock.rate = 1.0
    caplog.set_level(logging.DEBUG, logger="sidekey.backends.vault")
    token = vault.create_token(ttl=3600)
    vault.set_token_ttl(token, 5)  # 5 s left of a 3600 s grant
    write_private(tmp_path / "tok", token)
    backend = make(token_file="tok", renew_before_s=300)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(LIMIT_S):
            await nursery.start(backend.run)
            # Logged once the renewal's answer is applied: no Vault call is in flight.
            await wait_until(lambda: "renewed the token" in caplog.text)
        mock_clock.autojump_threshold = 0
        try:
            await trio.sleep(3 * vault_module.MAX_SLEEP_S + 1)
        finally:
            mock_clock.autojump_threshold = math.inf
        with trio.fail_after(LIMIT_S):
            health = await backend.health()
        nursery.cancel_scope.cancel()
    assert vault.token(token).remaining(time.monotonic()) > 3000
    assert health["token_ttl_s"] > 3000  # type: ignore[operator]
    assert vault.counts["renew_self"] == 1  # renewed once, not in a loop


async def test_non_renewable_token_is_not_renewed_in_a_loop(
    vault: VaultServer, make: Make, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = vault.create_token(ttl=60, renewable=False)
    vault.set_token_ttl(token, 2)
    write_private(tmp_path / "tok", token)
    vault.put_secret("secret", "a", {"v": "x"})
    clock = FakeClock()  # the backend's view of the token's 2 s moves only when told
    backend = make(token_file="tok", renew_before_s=300, clock=clock)
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            # The auth loop's decision on the non-renewable token is the warning.
            await wait_until(lambda: "cannot be renewed" in caplog.text)
            nursery.cancel_scope.cancel()
        assert vault.counts.get("renew_self", 0) == 0
        assert vault.counts["lookup_self"] <= 2  # at start; no polling until the expiry
        assert caplog.text.count("cannot be renewed") == 1
        # Expired now, for Vault and for the backend: the operator puts a new token in
        # the file, and the next call uses it.
        vault.expire_token(token)
        clock.advance(3)
        write_private(tmp_path / "tok", vault.create_token())
        assert (await backend.fetch(sref(mount="secret", path="a"))).value == "x"


async def test_run_logs_in_again_when_renewal_is_refused(
    vault: VaultServer, make: Make, tmp_path: Path
) -> None:
    role_id, secret_id = vault.add_approle(token_ttl=3)  # renewal due after ~1.5 s
    write_private(tmp_path / "secret-id", secret_id)
    backend = make(auth="approle", role_id=role_id, secret_id_file="secret-id", renew_before_s=60)
    vault.fail("renew_self", 403, ["permission denied"])
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            await wait_until(lambda: vault.counts.get("login", 0) == 2)
            nursery.cancel_scope.cancel()
        health = await backend.health()
    assert vault.counts["renew_self"] == 1
    assert health["authenticated"] is True and health["ok"] is True


async def test_expired_token_logs_in_again_and_the_call_succeeds(
    vault: VaultServer, make: Make, approle: dict[str, Any]
) -> None:
    vault.put_secret("secret", "a", {"v": "x"})
    backend = make(**approle)
    with trio.fail_after(LIMIT_S):
        await backend.fetch(sref(mount="secret", path="a"))
        vault.expire_all_tokens()  # Vault forgot the token: 403 permission denied
        assert (await backend.fetch(sref(mount="secret", path="a"))).value == "x"
    assert vault.counts["login"] == 2


async def test_concurrent_403s_log_in_once(
    vault: VaultServer, make: Make, approle: dict[str, Any]
) -> None:
    vault.put_secret("secret", "a", {"v": "x"})
    backend = make(**approle)
    values: list[str] = []

    async def one() -> None:
        values.append((await backend.fetch(sref(mount="secret", path="a"))).value)

    with trio.fail_after(LIMIT_S):
        await backend.fetch(sref(mount="secret", path="a"))
        vault.expire_all_tokens()
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(one)
    assert values == ["x"] * 6
    assert vault.counts["login"] == 2


async def test_token_auth_expired_token_fails_clearly_then_picks_up_a_new_file(
    vault: VaultServer, make: Make, tmp_path: Path
) -> None:
    token = vault.create_token()
    write_private(tmp_path / "tok", token)
    vault.put_secret("secret", "a", {"v": "x"})
    backend = make(token_file="tok")
    with trio.fail_after(LIMIT_S):
        await backend.fetch(sref(mount="secret", path="a"))
        vault.expire_token(token)
        with pytest.raises(BackendError, match="invalid or expired") as exc:
            await backend.fetch(sref(mount="secret", path="a"))
        assert token not in exc.value.message and str(tmp_path / "tok") in exc.value.message
        write_private(tmp_path / "tok", vault.create_token())  # the operator (or Agent) rotates it
        assert (await backend.fetch(sref(mount="secret", path="a"))).value == "x"


async def test_policy_denial_is_reported_without_logging_in_again(
    vault: VaultServer, make: Make, approle: dict[str, Any]
) -> None:
    vault.put_secret("secret", "a", {"v": "x"})
    vault.deny("secret/data/a")
    backend = make(**approle)
    with trio.fail_after(LIMIT_S), pytest.raises(BackendError, match="permission denied") as exc:
        await backend.fetch(sref(mount="secret", path="a"))
    assert "policy" in exc.value.message
    assert vault.counts["login"] == 1  # the token was fine (lookup-self): no new login


async def test_namespace_header(tmp_path: Path) -> None:
    with VaultServer(namespace="team-a") as server:
        server.put_secret("secret", "a", {"v": "ns-value"})
        write_private(tmp_path / "tok", server.create_token())
        good = VaultBackend("vault", vcfg(addr=server.addr, token_file="tok", namespace="team-a",
                                          timeout_s=TIMEOUT_S), base_dir=tmp_path)
        wrong = VaultBackend("vault", vcfg(addr=server.addr, token_file="tok",
                                           timeout_s=TIMEOUT_S), base_dir=tmp_path)
        try:
            with trio.fail_after(LIMIT_S):
                assert (await good.fetch(sref(mount="secret", path="a"))).value == "ns-value"
                with pytest.raises(BackendError, match="invalid or expired"):
                    await wrong.fetch(sref(mount="secret", path="a"))
        finally:
            await good.aclose()
            await wrong.aclose()


# --------------------------------------------------------------------------- dynamic secrets


async def test_dynamic_fetch_issues_a_distinct_journaled_credential(
    vault: VaultServer, make: Make, journal: Journal
) -> None:
    clock = FakeClock()
    backend = make(clock=clock)
    with trio.fail_after(LIMIT_S):
        one = await backend.fetch(sref(**DYNAMIC))
        two = await backend.fetch(sref(**DYNAMIC))
    assert one.lease_id and two.lease_id and one.lease_id != two.lease_id
    assert one.version == "dynamic" and one.lease_ttl_s == 600
    creds = [json.loads(v.value) for v in (one, two)]
    assert creds[0]["username"] != creds[1]["username"]
    assert {c["password"] for c in creds} == {le.password for le in vault.issued_leases}
    assert journal.events == [("issued", one.lease_id, clock.now + 600),
                              ("issued", two.lease_id, clock.now + 600)]
    assert vault.live_leases() == {one.lease_id, two.lease_id}


async def test_dynamic_credential_is_journaled_before_it_is_returned(
    vault: VaultServer, make: Make
) -> None:
    gate, entered = trio.Event(), trio.Event()
    got: list[SecretValue] = []

    class GatedJournal(Journal):
        async def issued(self, backend: str, lease_id: str, expires_at: float, *,
                         intent_id: str | None = None) -> None:
            await super().issued(backend, lease_id, expires_at, intent_id=intent_id)
            entered.set()
            await gate.wait()

    gated = GatedJournal()
    backend = make(journal=gated)

    async def fetch() -> None:
        got.append(await backend.fetch(sref(**DYNAMIC)))

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch)
            await entered.wait()
            await trio.testing.wait_all_tasks_blocked()  # the fetch is parked on the gate
            assert got == []  # journaled, not yet handed out
            assert gated.ids("issued") == [vault.issued_leases[0].lease_id]
            gate.set()
    assert got[0].lease_id == gated.ids("issued")[0]


async def test_journal_failure_revokes_the_credential(
    vault: VaultServer, make: Make, journal: Journal
) -> None:
    journal.fail_issued = SidekeyError("state store down", code="state_unavailable")
    backend = make()
    with trio.fail_after(LIMIT_S), pytest.raises(SidekeyError, match="state store down"):
        await backend.fetch(sref(**DYNAMIC))
    issued = vault.issued_leases[0].lease_id
    assert vault.revoked_leases == [issued] and vault.live_leases() == set()


async def test_release_revokes_the_vault_lease(
    vault: VaultServer, make: Make, journal: Journal
) -> None:
    backend = make()
    with trio.fail_after(LIMIT_S):
        cred = await backend.fetch(sref(**DYNAMIC))
        assert cred.lease_id is not None
        await backend.release(cred.lease_id)
        # A lease Vault no longer knows (expired, revoked twice) counts as revoked.
        await backend.release(cred.lease_id)
        await backend.release("database/creds/readonly/never-issued")
    assert vault.revoked_leases[0] == cred.lease_id
    assert vault.live_leases() == set()
    assert journal.ids("revoked") == [cred.lease_id, cred.lease_id,
                                      "database/creds/readonly/never-issued"]


async def test_dynamic_key_selection(vault: VaultServer, make: Make) -> None:
    backend = make()
    with trio.fail_after(LIMIT_S):
        cred = await backend.fetch(sref(**DYNAMIC, key="password"))
        assert cred.value == vault.issued_leases[0].password
        with pytest.raises(SecretNotFound, match="no key 'token'"):
            await backend.fetch(sref(**DYNAMIC, key="token"))
    # The credential that had no such key was never handed out: it is revoked.
    assert vault.live_leases() == {cred.lease_id}


async def test_unknown_role_is_secret_not_found(vault: VaultServer, make: Make) -> None:
    backend = make()
    with trio.fail_after(LIMIT_S), pytest.raises(SecretNotFound):
        await backend.fetch(sref(mount="database", path="creds/nope", kind="dynamic"))


async def test_cancelled_issue_does_not_leak_the_credential(
    vault: VaultServer, make: Make, journal: Journal
) -> None:
    gate = vault.hold("creds")  # the request reaches Vault and waits there...
    backend = make(timeout_s=LIMIT_S / 2)  # ...well within the HTTP timeout...
    with trio.fail_after(LIMIT_S):
        with trio.CancelScope() as caller:
            async with trio.open_nursery() as nursery:
                async def give_up() -> None:  # ...but the caller gives up first
                    await wait_until(lambda: vault.counts.get("creds", 0) == 1)
                    caller.cancel()
                nursery.start_soon(give_up)
                await backend.fetch(sref(**DYNAMIC))
        assert caller.cancelled_caught
        gate.set()  # then Vault issues the credential and answers
        await wait_until(lambda: len(vault.issued_leases) == 1)
        issued = vault.issued_leases[0].lease_id
        # The worker thread finds the call abandoned and revokes what it got.
        await wait_until(lambda: issued in vault.revoked_leases)
    assert vault.live_leases() == set()
    assert journal.ids("issued") == []  # never handed out, never journaled


# --------------------------------------------------------------------------- warm pools


async def test_warm_pool_hands_out_each_credential_once_and_refills(
    vault: VaultServer, make: Make, journal: Journal
) -> None:
    ref = sref(**DYNAMIC, pool_size=2)
    backend = make()
    backend.register(ref)
    handed: list[str] = []
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            await wait_until(lambda: len(backend.pooled_lease_ids()) == 2)
            pooled = set(backend.pooled_lease_ids())
            assert set(journal.ids("issued")) == pooled  # journaled when pooled
            for _ in range(2):
                cred = await backend.fetch(ref)
                assert cred.lease_id is not None
                handed.append(cred.lease_id)
            assert set(handed) == pooled  # both pooled ones, each once
            await wait_until(lambda: len(backend.pooled_lease_ids()) == 2)  # refilled
            refilled = set(backend.pooled_lease_ids())
            assert not refilled & set(handed)
            assert (await backend.health())["pools"] == {"database/creds/readonly": 2}
            await backend.aclose()  # ends run() too
    # The unused pooled credentials are revoked at close; handed-out ones live on
    # until their tool call releases them.
    assert refilled <= set(vault.revoked_leases)
    assert vault.live_leases() == set(handed)
    assert refilled <= set(journal.ids("revoked"))


async def test_failing_journal_does_not_end_run(
    vault: VaultServer, make: Make, journal: Journal
) -> None:
    journal.fail_issued = RuntimeError("disk I/O error")  # not a SidekeyError
    backend = make()
    backend.register(sref(**DYNAMIC, pool_size=2))
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            await wait_until(lambda: len(vault.revoked_leases) >= 1)
            # run() is still alive (or the nursery would raise): woken by a larger pool,
            # it tries again and fails again.
            backend.register(sref(**DYNAMIC, pool_size=3))
            await wait_until(lambda: len(vault.revoked_leases) >= 2)
            nursery.cancel_scope.cancel()
    assert backend.pooled_lease_ids() == frozenset()
    assert vault.live_leases() == set()  # nothing unjournaled stays alive


async def test_pooled_credential_with_short_ttl_left_is_revoked_not_handed_out(
    vault: VaultServer, make: Make
) -> None:
    clock = FakeClock()
    ref = sref(**DYNAMIC, pool_size=2)
    backend = make(clock=clock)
    backend.register(ref)
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            await wait_until(lambda: len(backend.pooled_lease_ids()) == 2)
            stale = set(backend.pooled_lease_ids())
            clock.advance(600 - 20)  # 20 s left < max(2 * timeout_s, 30 s)
            cred = await backend.fetch(ref)
            assert cred.lease_id not in stale
            await wait_until(lambda: stale <= set(vault.revoked_leases))
            nursery.cancel_scope.cancel()


async def test_pool_is_disabled_when_credentials_live_too_short(
    vault: VaultServer, make: Make, journal: Journal, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0  # real time while Vault is called (worker threads)
    vault.add_dynamic_role("brief", ttl=10)
    ref = sref(mount="database", path="creds/brief", kind="dynamic", pool_size=3)
    backend = make()
    backend.register(ref)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(LIMIT_S):
            await nursery.start(backend.run)
            # Journaled once the revocation's answer is back: no Vault call is in flight.
            await wait_until(lambda: len(journal.ids("revoked")) == 1)
        # A virtual stretch over two of the pool loop's longest sleeps: it wakes and
        # issues nothing (no churn), shown however loaded the machine is.
        mock_clock.autojump_threshold = 0
        try:
            await trio.sleep(2 * vault_module.MAX_SLEEP_S + 1)
        finally:
            mock_clock.autojump_threshold = math.inf
        with trio.fail_after(LIMIT_S):
            cred = await backend.fetch(ref)  # issued directly
        nursery.cancel_scope.cancel()
    assert len(vault.issued_leases) == 2  # one to learn the TTL, one for the call: no churn
    assert cred.lease_id == vault.issued_leases[1].lease_id


async def test_release_of_a_pooled_credential_takes_it_out_of_the_pool(
    vault: VaultServer, make: Make
) -> None:
    """A journal sweep at start may revoke a pooled (journaled, unattached) credential."""
    ref = sref(**DYNAMIC, pool_size=1)
    backend = make()
    backend.register(ref)
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(backend.run)
            await wait_until(lambda: len(backend.pooled_lease_ids()) == 1)
            (swept,) = backend.pooled_lease_ids()
            await backend.release(swept)
            cred = await backend.fetch(ref)
            nursery.cancel_scope.cancel()
    assert cred.lease_id != swept


# --------------------------------------------------------------------------- rotation


async def test_rotate_writes_a_new_version_the_next_fetch_sees(vault: VaultServer, make: Make) -> None:
    vault.put_secret("secret", "app/db", {"username": "app", "password": "old-pw"})
    ref = sref(mount="secret", path="app/db", key="password")
    backend = make()
    with trio.fail_after(LIMIT_S):
        assert await backend.rotate(ref, "new-pw") == "2"
        assert (await backend.fetch(ref)).value == "new-pw"
    assert vault.secret_versions("secret", "app/db")[2] == {"username": "app", "password": "new-pw"}


async def test_rotate_picks_the_single_key_or_value(vault: VaultServer, make: Make) -> None:
    vault.put_secret("secret", "single", {"api_key": "k1"})
    backend = make()
    with trio.fail_after(LIMIT_S):
        assert await backend.rotate(sref(mount="secret", path="single"), "k2") == "2"
        assert await backend.rotate(sref(mount="secret", path="fresh"), "v1") == "1"
        vault.put_secret("secret", "multi", {"a": "1", "b": "2"})
        with pytest.raises(SecretNotFound, match="set key"):
            await backend.rotate(sref(mount="secret", path="multi"), "x")
    assert vault.secret_versions("secret", "single")[2] == {"api_key": "k2"}
    assert vault.secret_versions("secret", "fresh") == {1: {"value": "v1"}}


async def test_rotate_failure_leaves_the_old_version(vault: VaultServer, make: Make) -> None:
    vault.put_secret("secret", "a", {"v": "old"})
    ref = sref(mount="secret", path="a")
    backend = make()
    vault.fail("kv_write", 500, ["internal error"])
    with trio.fail_after(LIMIT_S):
        with pytest.raises(BackendError, match="may not have been applied") as exc:
            await backend.rotate(ref, "brand-new-value")
        assert "brand-new-value" not in exc.value.message
        assert (await backend.fetch(ref)).value == "old"
        with pytest.raises(BadRequest):
            await backend.rotate(sref(**DYNAMIC), "x")


async def test_rotate_does_not_overwrite_a_concurrent_write(vault: VaultServer, make: Make) -> None:
    """Check-and-set on the version read: a write in between makes the rotation fail."""
    vault.put_secret("secret", "a", {"v": "old"})
    # The other write lands between our read and our write: ours is held on arrival
    # (after the read) until theirs is in; no timing decides the order.
    gate = vault.hold("kv_write")
    backend = make(timeout_s=LIMIT_S / 2)  # the held write is not a slow Vault
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            async def other_writer() -> None:
                await wait_until(lambda: vault.counts.get("kv_write", 0) == 1)
                await trio.to_thread.run_sync(vault.put_secret, "secret", "a", {"v": "theirs"})
                gate.set()
            nursery.start_soon(other_writer)
            with pytest.raises(BackendError, match="check-and-set"):
                await backend.rotate(sref(mount="secret", path="a"), "ours")
    assert vault.secret_versions("secret", "a")[2] == {"v": "theirs"}


# --------------------------------------------------------------------------- failures


async def test_server_down_fails_fast(vault: VaultServer, make: Make) -> None:
    vault.put_secret("secret", "a", {"v": "x"})
    backend = make()
    with trio.fail_after(LIMIT_S):
        await backend.fetch(sref(mount="secret", path="a"))
        vault.down()
        # "connection refused" (not a timeout) is the proof that it failed fast.
        with pytest.raises(BackendError, match=r"unreachable.*connection refused") as exc:
            await backend.fetch(sref(mount="secret", path="a"))
        assert exc.value.code == "backend_unavailable"
        health = await backend.health()
        assert health["reachable"] is False and health["ok"] is False
        assert "unreachable" in str(health["error"])
        vault.up()
        assert (await backend.fetch(sref(mount="secret", path="a"))).value == "x"


async def test_hung_server_times_out_and_never_blocks_the_loop(
    vault: VaultServer, make: Make, mock_clock: trio.testing.MockClock
) -> None:
    # The clock is virtual once the first fetch is done (it jumps as soon as every task
    # waits), so the call's bound is checked exactly, however loaded the machine is.
    vault.put_secret("secret", "a", {"v": "x"})
    backend = make(timeout_s=0.5)
    fetch_returned = False
    ran_while_in_flight: list[bool] = []

    async def other_task() -> None:
        # If fetch blocked the event loop, this task could only wake after it returned.
        await trio.sleep(0.01)
        ran_while_in_flight.append(not fetch_returned)

    with trio.fail_after(LIMIT_S):
        await backend.fetch(sref(mount="secret", path="a"))  # real time: the clock does not move yet
        vault.set_delay(30)
        mock_clock.autojump_threshold = 0
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(other_task)
                start = trio.current_time()
                with pytest.raises(BackendError, match="unreachable"):
                    await backend.fetch(sref(mount="secret", path="a"))
                elapsed = trio.current_time() - start
                fetch_returned = True
        finally:
            mock_clock.autojump_threshold = math.inf
    assert elapsed == pytest.approx(0.5 + vault_module.CALL_MARGIN_S)  # the documented bound
    assert ran_while_in_flight == [True]
    vault.set_delay(0)


async def test_sealed_vault(vault: VaultServer, make: Make) -> None:
    backend = make()
    vault.set_sealed(True)
    with trio.fail_after(LIMIT_S), pytest.raises(BackendError, match="sealed"):
        await backend.fetch(sref(mount="secret", path="a"))


async def test_aclose_is_idempotent_and_ends_calls(vault: VaultServer, make: Make) -> None:
    backend = make()
    with trio.fail_after(LIMIT_S):
        await backend.aclose()
        await backend.aclose()
        with pytest.raises(BackendError, match="closed"):
            await backend.fetch(sref(mount="secret", path="a"))
        health = await backend.health()
    assert health["ok"] is False and health["error"] == "backend closed"


# --------------------------------------------------------------------------- no secret anywhere


async def test_no_secret_in_health_errors_or_logs(
    vault: VaultServer, make: Make, approle: dict[str, Any], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret_id = (tmp_path / "secret-id").read_text().strip()
    vault.put_secret("secret", "app", {"password": "static-value-1"})
    backend = make(**approle)
    messages: list[str] = []
    values: list[SecretValue] = []
    with trio.fail_after(LIMIT_S):
        values.append(await backend.fetch(sref(mount="secret", path="app")))
        values.append(await backend.fetch(sref(**DYNAMIC)))
        await backend.rotate(sref(mount="secret", path="app"), "rotated-value-2")
        vault.expire_all_tokens()
        values.append(await backend.fetch(sref(mount="secret", path="app")))
        vault.fail("kv_write", 400, ["bad request"])
        for call in (
            backend.rotate(sref(mount="secret", path="app"), "never-written-3"),
            backend.fetch(sref(mount="secret", path="app", key="nope")),
            backend.fetch(sref(mount="secret", path="missing")),
        ):
            try:
                await call
            except SidekeyError as exc:
                messages.append(exc.message)
        assert values[1].lease_id is not None
        await backend.release(values[1].lease_id)
        health = await backend.health()
        vault.down()
        try:
            await backend.fetch(sref(mount="secret", path="app"))
        except SidekeyError as exc:
            messages.append(exc.message)
        health_down = await backend.health()
    assert len(messages) == 4
    secrets_seen = [t.id for t in vault.tokens()] + [secret_id, "static-value-1",
                                                      "rotated-value-2", "never-written-3"]
    secrets_seen += [le.password for le in vault.issued_leases] + [le.username for le in vault.issued_leases]
    haystack = "\n".join([caplog.text, json.dumps(health), json.dumps(health_down),
                          *messages, *(repr(v) for v in values)])
    for secret in secrets_seen:
        assert secret not in haystack


# --------------------------------------------------------------------------- a real Vault

REAL_ADDR = os.environ.get("SIDEKEY_TEST_VAULT_ADDR")
REAL_TOKEN = os.environ.get("SIDEKEY_TEST_VAULT_TOKEN")
# KV v2 mount to write test secrets under (sidekey-test/<random>); "secret" on a dev server.
REAL_KV_MOUNT = os.environ.get("SIDEKEY_TEST_VAULT_KV_MOUNT", "secret")
# Optional "<mount>/<path>" of a dynamic secret, e.g. "database/creds/readonly".
REAL_DYNAMIC = os.environ.get("SIDEKEY_TEST_VAULT_DYNAMIC")


@pytest.mark.real_vault
@pytest.mark.skipif(
    not (REAL_ADDR and REAL_TOKEN),
    reason="set SIDEKEY_TEST_VAULT_ADDR and SIDEKEY_TEST_VAULT_TOKEN to run against a real Vault",
)
class TestRealVault:
    """The main flows against a real Vault (a dev server will do: ``vault server -dev``)."""

    @pytest.fixture
    async def real(self, tmp_path: Path) -> AsyncIterator[VaultBackend]:
        assert REAL_ADDR and REAL_TOKEN
        write_private(tmp_path / "tok", REAL_TOKEN)
        backend = VaultBackend("vault", vcfg(addr=REAL_ADDR, token_file="tok", timeout_s=5,
                                             namespace=os.environ.get("VAULT_NAMESPACE")),
                               base_dir=tmp_path, journal=Journal())
        try:
            yield backend
        finally:
            await backend.aclose()

    async def test_kv_round_trip(self, real: VaultBackend) -> None:
        path = f"sidekey-test/{secrets.token_hex(6)}"
        ref = sref(mount=REAL_KV_MOUNT, path=path, key="password")
        client = real._client
        with trio.fail_after(LIMIT_S):
            await trio.to_thread.run_sync(lambda: client.secrets.kv.v2.create_or_update_secret(
                path=path, secret={"username": "u", "password": "p1"}, mount_point=REAL_KV_MOUNT))
            try:
                first = await real.fetch(ref)
                assert (first.value, first.version) == ("p1", "1")
                assert await real.rotate(ref, "p2") == "2"
                assert (await real.fetch(ref)).value == "p2"
                pinned = sref(mount=REAL_KV_MOUNT, path=path, key="password", version=1)
                assert (await real.fetch(pinned)).value == "p1"
                with pytest.raises(SecretNotFound):
                    await real.fetch(sref(mount=REAL_KV_MOUNT, path=path + "-missing"))
                health = await real.health()
                assert health["ok"] is True and health["authenticated"] is True
                assert REAL_TOKEN not in json.dumps(health)
            finally:
                await trio.to_thread.run_sync(
                    lambda: client.secrets.kv.v2.delete_metadata_and_all_versions(
                        path=path, mount_point=REAL_KV_MOUNT))

    @pytest.mark.parametrize("how", ["deleted", "destroyed"])
    async def test_rotation_after_the_current_version_was_deleted(
        self, real: VaultBackend, how: str
    ) -> None:
        """Issue 11 item 2 against Vault itself: the read says which version is gone, and
        rotation writes the next one with cas on it (cas=0 would be refused forever)."""
        path = f"sidekey-test/{secrets.token_hex(6)}"
        ref = sref(mount=REAL_KV_MOUNT, path=path, key="password")
        kv = real._client.secrets.kv.v2
        with trio.fail_after(LIMIT_S):
            await trio.to_thread.run_sync(lambda: kv.create_or_update_secret(
                path=path, secret={"password": "p1"}, mount_point=REAL_KV_MOUNT))
            try:
                if how == "deleted":
                    await trio.to_thread.run_sync(lambda: kv.delete_latest_version_of_secret(
                        path=path, mount_point=REAL_KV_MOUNT))
                else:
                    await trio.to_thread.run_sync(lambda: kv.destroy_secret_versions(
                        path=path, versions=[1], mount_point=REAL_KV_MOUNT))
                with pytest.raises(SecretNotFound) as gone:
                    await real.fetch(ref)
                assert gone.value.code == "secret_deleted" and f"version 1 of this secret was {how}" in (
                    gone.value.message)
                assert await real.rotate(ref, "p2") == "2"
                assert (await real.fetch(ref)).value == "p2"
            finally:
                await trio.to_thread.run_sync(lambda: kv.delete_metadata_and_all_versions(
                    path=path, mount_point=REAL_KV_MOUNT))

    async def test_probe_names_what_a_policy_lacks(self, real: VaultBackend, tmp_path: Path) -> None:
        """A token whose policy only reads one KV path: the probe (sys/capabilities-self)
        names the rotation write as optional and, for a dynamic secret, the revocation."""
        name = f"sidekey-test-{secrets.token_hex(4)}"
        path = f"sidekey-test/{secrets.token_hex(6)}"
        client = real._client
        rules = f'path "{REAL_KV_MOUNT}/data/{path}" {{ capabilities = ["read"] }}\n'
        if REAL_DYNAMIC:
            rules += f'path "{REAL_DYNAMIC}" {{ capabilities = ["read"] }}\n'
        refs = [sref(mount=REAL_KV_MOUNT, path=path, key="password")]
        if REAL_DYNAMIC:
            mount, _, dyn = REAL_DYNAMIC.partition("/")
            refs.append(sref(mount=mount, path=dyn, kind="dynamic"))
        with trio.fail_after(LIMIT_S):
            await trio.to_thread.run_sync(lambda: client.sys.create_or_update_policy(name, rules))
            try:
                created = await trio.to_thread.run_sync(
                    lambda: client.auth.token.create(policies=[name], ttl="10m"))
                write_private(tmp_path / "limited", created["auth"]["client_token"])
                limited = VaultBackend(
                    "vault", vcfg(addr=REAL_ADDR, token_file="limited", timeout_s=5,
                                  namespace=os.environ.get("VAULT_NAMESPACE")),
                    base_dir=tmp_path)
                try:
                    missing = await limited.probe(refs)
                finally:
                    await limited.aclose()
            finally:
                await trio.to_thread.run_sync(lambda: client.sys.delete_policy(name))
        got = {(m["path"], m["capability"], m["required"]) for m in missing}
        assert (f"{REAL_KV_MOUNT}/data/{path}", "update", False) in got
        assert not any(p == f"{REAL_KV_MOUNT}/data/{path}" and c == "read" for p, c, _ in got)
        if REAL_DYNAMIC:
            assert (f"sys/leases/revoke/{REAL_DYNAMIC}/lease-id", "update", True) in got

    @pytest.mark.skipif(not REAL_DYNAMIC, reason="set SIDEKEY_TEST_VAULT_DYNAMIC=<mount>/<path>")
    async def test_dynamic_issue_and_release(self, real: VaultBackend) -> None:
        assert REAL_DYNAMIC
        mount, _, path = REAL_DYNAMIC.partition("/")
        with trio.fail_after(LIMIT_S):
            cred = await real.fetch(sref(mount=mount, path=path, kind="dynamic"))
            assert cred.lease_id and cred.lease_ttl_s
            await real.release(cred.lease_id)
