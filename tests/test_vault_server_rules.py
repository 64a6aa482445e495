"""The Vault stand-in (tests/vault_server.py) keeps Vault's state rules, checked with the
real client (hvac 2.4, over HTTP). Issue 11 item 5: every rule here is one the Vault
backend depends on, and each cites, in vault_server.py, the Vault source it follows.

Time is the stand-in's own clock (``VaultServer.advance``): no test sleeps for a TTL and
none asserts on the wall clock.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests

from vault_server import LAST_USE_LEASE_ERROR, VaultServer, human_duration, parse_policy

Client = Callable[..., hvac.Client]


@pytest.fixture
def vault() -> Iterator[VaultServer]:
    # A clock that stands still: time passes only by advance(), so TTLs come out exact.
    with VaultServer(clock=lambda: 1000.0) as server:
        server.add_dynamic_role("readonly", ttl=600)
        yield server


@pytest.fixture
def client(vault: VaultServer) -> Iterator[Client]:
    made: list[hvac.Client] = []

    def make(token: str | None = None, *, timeout: float = 5.0) -> hvac.Client:
        c = hvac.Client(url=vault.addr, token=token, timeout=timeout)
        made.append(c)
        return c

    yield make
    for c in made:
        c.adapter.close()


def creds(c: hvac.Client) -> dict[str, Any]:
    raw = c.adapter.get("/v1/database/creds/readonly")
    assert isinstance(raw, dict)
    return raw


def status_of(resp: object) -> int:
    assert isinstance(resp, requests.Response)
    return resp.status_code


# --------------------------------------------------------------------------- 1. token-bound leases


def test_lease_duration_is_the_roles_ttl_and_the_lease_dies_with_its_token(
    vault: VaultServer, client: Client
) -> None:
    token = vault.create_token(ttl=60)
    c = client(token)
    lease = creds(c)
    # A service token does not cap lease_duration (V expiration.go Register caps batch only).
    assert lease["lease_duration"] == 600
    assert vault.lease(lease["lease_id"]).token_id == token
    vault.advance(59)
    assert lease["lease_id"] in vault.live_leases()
    vault.advance(2)  # the token's TTL passes: it is revoked, and its lease with it
    assert lease["lease_id"] not in vault.live_leases()
    assert vault.lease(lease["lease_id"]).revoked_why == "token expired"
    assert vault.revoked_leases == []  # nobody asked: Vault did it
    with pytest.raises(hvac.exceptions.Forbidden) as exc:
        c.auth.token.lookup_self()
    # Vault >= 1.16: both texts (clients match substrings)
    assert "permission denied" in exc.value.errors and "invalid token" in exc.value.errors
    root = client(vault.root_token)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid lease"):
        root.sys.read_lease(lease["lease_id"])


def test_revoke_self_and_revoke_take_the_leases_along(vault: VaultServer, client: Client) -> None:
    one, two = vault.create_token(), vault.create_token()
    other = vault.create_token()
    a, b, keep = creds(client(one)), creds(client(two)), creds(client(other))
    assert status_of(client(one).auth.token.revoke_self()) == 204
    assert status_of(client(vault.root_token).auth.token.revoke(two)) == 204
    assert vault.live_leases() == {keep["lease_id"]}
    assert vault.lease(a["lease_id"]).revoked_why == "token revoked"
    assert vault.lease(b["lease_id"]).revoked_why == "token revoked"


def test_token_past_max_ttl_is_dead_and_renewal_is_capped_with_vaults_warning(
    vault: VaultServer, client: Client
) -> None:
    role_id, secret_id = vault.add_approle(token_ttl=60, token_max_ttl=100)
    login = client().auth.approle.login(role_id=role_id, secret_id=secret_id, use_token=False)
    assert login["auth"]["lease_duration"] == 60
    c = client(login["auth"]["client_token"])
    lease = creds(c)
    vault.advance(50)
    renewed = c.auth.token.renew_self()
    assert renewed["auth"]["lease_duration"] == 50  # 100 s after issue, not 60 more
    assert renewed["warnings"] == [
        'TTL of "1m" exceeded the effective max_ttl of "50s"; TTL value is capped accordingly']
    vault.advance(50)
    assert lease["lease_id"] not in vault.live_leases()
    with pytest.raises(hvac.exceptions.Forbidden):
        c.auth.token.renew_self()


def test_human_duration_is_gos() -> None:
    assert [human_duration(s) for s in (0, 5, 60, 90, 3600, 3601, 3660, 86400)] == [
        "0s", "5s", "1m", "1m30s", "1h", "1h1s", "1h1m", "24h"]


# --------------------------------------------------------------------------- 2. policies


POLICY = """
# the backend's least privilege, plus a few rules to rank
path "secret/data/app/*"            { capabilities = ["read", "create", "update"] }
path "secret/data/app/locked"       { capabilities = ["deny"] }
path "secret/data/app/ro/*"         { capabilities = ["read"] }
path "secret/data/+/shared"         { capabilities = ["read", "list"] }
path "database/creds/readonly"      { capabilities = ["read"] }
path "sys/leases/revoke/database/creds/readonly/*" { capabilities = ["update"] }
path "sys/leases/lookup/database/creds/readonly/*" { capabilities = ["list", "sudo"] }
path "sys/leases/lookup/database/creds/other/*"    { capabilities = ["list"] }
"""


@pytest.fixture
def app_token(vault: VaultServer) -> str:
    vault.add_policy("app", POLICY)
    return vault.create_token(policies=["app"])


def test_policy_paths_exact_glob_and_segment_wildcard(
    vault: VaultServer, client: Client, app_token: str
) -> None:
    for path in ("app/db", "app/ro/x", "app/locked", "team/shared", "app/shared", "other/x"):
        vault.put_secret("secret", path, {"v": path})
    c = client(app_token)

    def read(path: str) -> str:
        raw = c.secrets.kv.v2.read_secret_version(path=path, raise_on_deleted_version=True)
        return str(raw["data"]["data"]["v"])

    assert read("app/db") == "app/db"  # glob
    assert read("team/shared") == "team/shared"  # "+" segment
    assert read("app/shared") == "app/shared"
    for denied in ("app/locked", "other/x"):  # exact deny beats the glob; no rule at all
        with pytest.raises(hvac.exceptions.Forbidden) as exc:
            read(denied)
        assert exc.value.errors == ["permission denied"]  # a policy's answer, not "invalid token"
    # app/ro/* (longer glob) wins over app/*: read only, so the write is refused
    with pytest.raises(hvac.exceptions.Forbidden):
        c.secrets.kv.v2.create_or_update_secret(path="app/ro/x", secret={"v": "w"})
    c.secrets.kv.v2.create_or_update_secret(path="app/db", secret={"v": "w"})  # update
    c.secrets.kv.v2.create_or_update_secret(path="app/new", secret={"v": "w"})  # create


def test_create_and_update_are_distinct_capabilities(vault: VaultServer, client: Client) -> None:
    vault.add_policy("create-only", {"secret/data/*": ["create"]})
    c = client(vault.create_token(policies=["create-only"]))
    c.secrets.kv.v2.create_or_update_secret(path="fresh", secret={"v": "1"})  # no metadata: create
    with pytest.raises(hvac.exceptions.Forbidden):  # metadata exists now: update
        c.secrets.kv.v2.create_or_update_secret(path="fresh", secret={"v": "2"})


def test_wrong_mount_is_403_under_a_policy_and_404_for_root(
    vault: VaultServer, client: Client, app_token: str
) -> None:
    # V CheckToken checks the policy before the router looks for a mount.
    with pytest.raises(hvac.exceptions.Forbidden):
        client(app_token).adapter.get("/v1/databse/creds/readonly")
    with pytest.raises(hvac.exceptions.InvalidPath, match="no handler for route"):
        client(vault.root_token).adapter.get("/v1/databse/creds/readonly")


def test_revoke_scoped_by_url_and_lookup_list_needs_sudo(
    vault: VaultServer, client: Client, app_token: str
) -> None:
    c = client(app_token)
    lease = creds(c)
    lease_id = lease["lease_id"]
    # The body form needs "sys/leases/revoke", which the policy does not grant.
    with pytest.raises(hvac.exceptions.Forbidden):
        c.sys.revoke_lease(lease_id)
    assert lease_id in vault.live_leases()
    assert status_of(c.adapter.put(f"/v1/sys/leases/revoke/{lease_id}", json={"sync": True})) == 204
    assert lease_id not in vault.live_leases()
    creds(c)
    listing = c.adapter.list("/v1/sys/leases/lookup/database/creds/readonly/")
    assert len(listing["data"]["keys"]) == 1
    # "list" without "sudo" on a root-protected path (V PathsSpecial.Root "leases/lookup/*")
    with pytest.raises(hvac.exceptions.Forbidden):
        c.adapter.list("/v1/sys/leases/lookup/database/creds/other/")
    # The default policy grants lookup by body, renew-self, lookup-self.
    assert c.sys.read_lease(next(iter(vault.live_leases())))["data"]["ttl"] == 600
    assert c.auth.token.lookup_self()["data"]["policies"] == ["app", "default"]


def test_body_lease_id_overrides_the_url_one(
    vault: VaultServer, client: Client, app_token: str
) -> None:
    """URL scoping is no hard boundary: the body's lease_id wins (V handleRevoke)."""
    other = creds(client(vault.root_token))["lease_id"]
    c = client(app_token)
    resp = c.adapter.put("/v1/sys/leases/revoke/database/creds/readonly/x", json={"lease_id": other})
    assert status_of(resp) == 204
    assert other not in vault.live_leases()


def test_capabilities_self(vault: VaultServer, client: Client, app_token: str) -> None:
    paths = ["secret/data/app/db", "secret/data/app/locked", "database/creds/readonly",
             "sys/leases/revoke/database/creds/readonly/abc", "sys/leases/lookup/database/creds/readonly/",
             "sys/leases/revoke", "auth/token/renew-self"]
    answer = client(app_token).sys.get_capabilities(paths)
    assert answer["data"] == {
        "secret/data/app/db": ["create", "read", "update"],
        "secret/data/app/locked": ["deny"],
        "database/creds/readonly": ["read"],
        "sys/leases/revoke/database/creds/readonly/abc": ["update"],
        "sys/leases/lookup/database/creds/readonly/": ["list", "sudo"],
        "sys/leases/revoke": ["deny"],
        "auth/token/renew-self": ["update"],
    }
    assert answer["secret/data/app/db"] == ["create", "read", "update"]  # also at the top level
    one = client(vault.root_token).sys.get_capabilities(["anything/at/all"])
    assert one["data"] == {"anything/at/all": ["root"], "capabilities": ["root"]}


def test_no_default_policy_and_unknown_policy(vault: VaultServer, client: Client) -> None:
    vault.add_policy("kv", {"secret/*": ["read"]})
    bare = vault.create_token(policies=["kv"], no_default_policy=True)
    with pytest.raises(hvac.exceptions.Forbidden):
        client(bare).auth.token.lookup_self()
    with pytest.raises(ValueError, match="unknown policies"):
        vault.create_token(policies=["nope"])
    with pytest.raises(ValueError, match="unknown capabilities"):
        parse_policy({"x": ["reed"]})


def test_legacy_deny_knob_still_denies(vault: VaultServer, client: Client) -> None:
    vault.put_secret("secret", "a", {"v": "x"})
    vault.deny("secret/data/a")
    with pytest.raises(hvac.exceptions.Forbidden):
        client(vault.root_token).secrets.kv.v2.read_secret_version(path="a", raise_on_deleted_version=True)


# --------------------------------------------------------------------------- 3. num_uses


def test_num_uses_counts_every_authenticated_request_even_denied_ones(
    vault: VaultServer, client: Client
) -> None:
    vault.add_policy("kv", {"secret/data/ok": ["read"]})
    vault.put_secret("secret", "ok", {"v": "x"})
    token = vault.create_token(policies=["kv"], num_uses=5)
    c = client(token)
    c.secrets.kv.v2.read_secret_version(path="ok", raise_on_deleted_version=True)
    assert vault.token(token).num_uses == 4
    with pytest.raises(hvac.exceptions.Forbidden):  # denied by policy: a use all the same
        c.secrets.kv.v2.read_secret_version(path="nope", raise_on_deleted_version=True)
    assert vault.token(token).num_uses == 3
    assert c.auth.token.lookup_self()["data"]["num_uses"] == 2  # lookup-self spends one too
    c.sys.get_capabilities(["secret/data/ok"])  # and capabilities-self
    assert vault.token(token).num_uses == 1
    # Free: sys/health (never touches the token store), a bad token, a login.
    assert c.adapter.get("/v1/sys/health")["sealed"] is False
    with pytest.raises(hvac.exceptions.Forbidden):
        client("hvs.not-a-token").auth.token.lookup_self()
    role_id, secret_id = vault.add_approle()
    c.auth.approle.login(role_id=role_id, secret_id=secret_id, use_token=False)
    assert vault.token(token).num_uses == 1
    c.secrets.kv.v2.read_secret_version(path="ok", raise_on_deleted_version=True)  # the last use
    assert vault.token(token).revoked_why == "token used up"
    with pytest.raises(hvac.exceptions.Forbidden):
        c.auth.token.lookup_self()


def test_last_use_revokes_the_tokens_leases_and_a_leased_last_read_is_a_400(
    vault: VaultServer, client: Client
) -> None:
    token = vault.create_token(num_uses=2)
    c = client(token)
    first = creds(c)
    with pytest.raises(hvac.exceptions.InvalidRequest) as exc:
        creds(c)  # the last use returns a lease: Vault drops it
    assert exc.value.errors == [LAST_USE_LEASE_ERROR]
    assert len(vault.issued_leases) == 2
    assert vault.live_leases() == set()  # the dropped one and the token's earlier one
    assert vault.lease(first["lease_id"]).revoked_why == "token used up"


def test_approle_token_num_uses(vault: VaultServer, client: Client) -> None:
    role_id, secret_id = vault.add_approle(token_num_uses=3)
    auth = client().auth.approle.login(role_id=role_id, secret_id=secret_id, use_token=False)["auth"]
    assert auth["num_uses"] == 3
    assert vault.token(auth["client_token"]).num_uses == 3


# --------------------------------------------------------------------------- 4. KV v2


def test_kv_deleted_and_destroyed_latest_version_answer_404_with_metadata(
    vault: VaultServer, client: Client
) -> None:
    c = client(vault.root_token)
    kv = c.secrets.kv.v2
    kv.create_or_update_secret(path="app", secret={"v": "1"})
    kv.create_or_update_secret(path="app", secret={"v": "2"})
    assert status_of(kv.delete_latest_version_of_secret(path="app")) == 204
    with pytest.raises(hvac.exceptions.InvalidPath) as exc:
        kv.read_secret_version(path="app", raise_on_deleted_version=True)
    body = exc.value.json
    assert "errors" not in body and body["data"]["data"] is None
    meta = body["data"]["metadata"]
    assert meta["version"] == 2 and meta["deletion_time"] != "" and meta["destroyed"] is False
    # hvac's own switch hands the deleted version's body back
    assert kv.read_secret_version(path="app", raise_on_deleted_version=False)["data"]["data"] is None
    assert kv.read_secret_version(path="app", version=1, raise_on_deleted_version=True)["data"]["data"] == {"v": "1"}
    assert kv.read_secret_metadata(path="app")["data"]["current_version"] == 2  # unchanged
    kv.undelete_secret_versions(path="app", versions=[2])
    assert kv.read_secret_version(path="app", raise_on_deleted_version=True)["data"]["data"] == {"v": "2"}
    kv.destroy_secret_versions(path="app", versions=[2])
    with pytest.raises(hvac.exceptions.InvalidPath) as exc:
        # destroyed, never soft-deleted: hvac raises even with raise_on_deleted_version=False
        kv.read_secret_version(path="app", raise_on_deleted_version=False)
    meta = exc.value.json["data"]["metadata"]
    assert (meta["version"], meta["deletion_time"], meta["destroyed"]) == (2, "", True)
    kv.undelete_secret_versions(path="app", versions=[2])  # a destroyed version stays so
    with pytest.raises(hvac.exceptions.InvalidPath):
        kv.read_secret_version(path="app", raise_on_deleted_version=True)
    with pytest.raises(hvac.exceptions.InvalidPath) as exc:
        kv.read_secret_version(path="never-written", raise_on_deleted_version=True)
    assert exc.value.json == {"errors": []}
    with pytest.raises(hvac.exceptions.InvalidPath) as exc:
        kv.read_secret_version(path="app", version=9, raise_on_deleted_version=True)
    assert exc.value.json == {"errors": []}


def test_kv_check_and_set_counts_deleted_and_destroyed_versions(
    vault: VaultServer, client: Client
) -> None:
    kv = client(vault.root_token).secrets.kv.v2
    kv.create_or_update_secret(path="s", secret={"v": "1"}, cas=0)  # no metadata: cas 0
    with pytest.raises(hvac.exceptions.InvalidRequest) as exc:
        kv.create_or_update_secret(path="s", secret={"v": "x"}, cas=0)
    assert exc.value.errors == ["check-and-set parameter did not match the current version"]
    kv.create_or_update_secret(path="s", secret={"v": "2"}, cas=1)
    vault.delete_secret_version("secret", "s")
    for stale in (0, 1):  # a deleted latest version is still the current one
        with pytest.raises(hvac.exceptions.InvalidRequest, match="did not match"):
            kv.create_or_update_secret(path="s", secret={"v": "x"}, cas=stale)
    assert kv.create_or_update_secret(path="s", secret={"v": "3"}, cas=2)["data"]["version"] == 3
    vault.destroy_secret_version("secret", "s")
    assert kv.create_or_update_secret(path="s", secret={"v": "4"}, cas="3")["data"]["version"] == 4
    with pytest.raises(hvac.exceptions.InvalidRequest, match="error parsing check-and-set"):
        kv.create_or_update_secret(path="s", secret={"v": "x"}, cas="four")
    kv.delete_metadata_and_all_versions(path="s")  # metadata gone: cas 0 again, version 1
    assert kv.create_or_update_secret(path="s", secret={"v": "new"}, cas=0)["data"]["version"] == 1
    kv.update_metadata(path="s", cas_required=True)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="check-and-set parameter required"):
        kv.create_or_update_secret(path="s", secret={"v": "x"})


def test_kv_max_versions_prunes_the_oldest(vault: VaultServer, client: Client) -> None:
    kv = client(vault.root_token).secrets.kv.v2
    kv.update_metadata(path="m", max_versions=2)
    for i in range(1, 5):
        kv.create_or_update_secret(path="m", secret={"v": str(i)})
    meta = kv.read_secret_metadata(path="m")["data"]
    assert (meta["current_version"], meta["oldest_version"]) == (4, 3)
    assert sorted(meta["versions"]) == ["3", "4"]
    with pytest.raises(hvac.exceptions.InvalidPath):
        kv.read_secret_version(path="m", version=2, raise_on_deleted_version=True)
    # The default is 10 versions (KV backend.go defaultMaxVersions).
    for i in range(12):
        vault.put_secret("secret", "d", {"v": str(i)})
    assert sorted(vault.secret_versions("secret", "d")) == list(range(3, 13))


# --------------------------------------------------------------------------- 5. revocation


def test_revoke_sync_by_default_queued_on_request_unknown_is_no_error(
    vault: VaultServer, client: Client
) -> None:
    c = client(vault.root_token)
    a, b = creds(c)["lease_id"], creds(c)["lease_id"]
    assert status_of(c.sys.revoke_lease(a)) == 204  # hvac sends no sync: Vault's default true
    assert status_of(c.adapter.put("/v1/sys/leases/revoke", json={"lease_id": b, "sync": False})) == 202
    assert vault.live_leases() == set()
    assert status_of(c.sys.revoke_lease("database/creds/readonly/never-issued")) == 204
    assert status_of(c.adapter.put(f"/v1/sys/leases/revoke/{a}", json={})) == 204  # URL form, twice
    assert status_of(c.adapter.put("/v1/sys/revoke/" + a, json={"sync": False})) == 202  # legacy path
    with pytest.raises(hvac.exceptions.InvalidRequest, match="lease_id must be specified"):
        c.adapter.put("/v1/sys/leases/revoke", json={})
    assert vault.revoked_leases == [a, b, "database/creds/readonly/never-issued", a, a]


def test_revoke_engine_failure_is_a_400_and_the_lease_stays(vault: VaultServer, client: Client) -> None:
    c = client(vault.root_token)
    lease_id = creds(c)["lease_id"]
    vault.fail_revocations(2)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="failed to revoke entry") as exc:
        c.sys.revoke_lease(lease_id)
    assert "cannot be dropped" in exc.value.errors[0]
    assert lease_id in vault.live_leases()
    # Queued: accepted, and the lease is still there (Vault would retry it later).
    assert status_of(c.adapter.put(f"/v1/sys/leases/revoke/{lease_id}", json={"sync": False})) == 202
    assert lease_id in vault.live_leases()
    assert status_of(c.sys.revoke_lease(lease_id)) == 204
    assert lease_id not in vault.live_leases()


def test_slow_engine_holds_a_sync_revoke_and_a_client_bound_ends_the_wait(
    vault: VaultServer, client: Client
) -> None:
    root = client(vault.root_token)
    lease_id = creds(root)["lease_id"]
    vault.set_revoke_delay(60)
    impatient = client(vault.root_token, timeout=0.3)
    with pytest.raises(requests.exceptions.Timeout):
        impatient.sys.revoke_lease(lease_id)
    # A queued revocation does not wait for the engine.
    assert status_of(root.adapter.put(f"/v1/sys/leases/revoke/{lease_id}", json={"sync": False})) == 202
    assert lease_id not in vault.live_leases()
    # (the held handler thread is released by stop() at the fixture's end)


# --------------------------------------------------------------------------- 6. AppRole


def test_secret_id_num_uses_and_ttl(vault: VaultServer, client: Client) -> None:
    role_id, secret_id = vault.add_approle(secret_id_num_uses=2, secret_id_ttl=600)
    approle = client().auth.approle
    approle.login(role_id=role_id, secret_id=secret_id, use_token=False)
    assert vault.secret_id_uses(role_id, secret_id) == 1
    approle.login(role_id=role_id, secret_id=secret_id, use_token=False)  # its last use
    assert vault.secret_id_uses(role_id, secret_id) is None  # deleted
    with pytest.raises(hvac.exceptions.InvalidRequest) as exc:
        approle.login(role_id=role_id, secret_id=secret_id, use_token=False)
    assert exc.value.errors == ["invalid role or secret ID"]
    fresh = vault.add_secret_id(role_id, num_uses=0)  # unlimited, the role's 600 s TTL
    approle.login(role_id=role_id, secret_id=fresh, use_token=False)
    vault.advance(600)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid role or secret ID"):
        approle.login(role_id=role_id, secret_id=fresh, use_token=False)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid role or secret ID"):
        approle.login(role_id="unknown-role", secret_id=fresh, use_token=False)


def test_approle_token_policies(vault: VaultServer, client: Client) -> None:
    vault.add_policy("creds", {"database/creds/readonly": ["read"]})
    role_id, secret_id = vault.add_approle(token_policies=["creds"])
    auth = client().auth.approle.login(role_id=role_id, secret_id=secret_id, use_token=False)["auth"]
    assert auth["policies"] == ["creds", "default"]
    c = client(auth["client_token"])
    creds(c)
    with pytest.raises(hvac.exceptions.Forbidden):
        c.secrets.kv.v2.read_secret_version(path="x", raise_on_deleted_version=True)


# --------------------------------------------------------------------------- 7. quotas, health


def test_rate_limit_quota_answers_429_with_retry_after_and_spends_no_use(
    vault: VaultServer, client: Client
) -> None:
    token = vault.create_token(num_uses=10)
    vault.rate_limit(times=1, retry_after=7)
    resp = requests.get(f"{vault.addr}/v1/auth/token/lookup-self",
                        headers={"X-Vault-Token": token}, timeout=5)
    assert resp.status_code == 429 and resp.headers["Retry-After"] == "7"
    assert resp.json() == {"errors": ['request path "auth/token/lookup-self": rate limit quota exceeded']}
    assert vault.token(token).num_uses == 10
    vault.rate_limit(times=1)
    with pytest.raises(hvac.exceptions.RateLimitExceeded):
        client(token).auth.token.lookup_self()
    assert client(token).auth.token.lookup_self()["data"]["num_uses"] == 9


def test_health_is_unauthenticated_and_reports_sealed(vault: VaultServer) -> None:
    resp = requests.get(f"{vault.addr}/v1/sys/health", timeout=5)
    assert resp.status_code == 200 and resp.json()["sealed"] is False
    vault.rate_limit(times=1)  # sys/health is exempt from quotas
    assert requests.head(f"{vault.addr}/v1/sys/health", timeout=5).status_code == 200
    vault.set_sealed(True)
    resp = requests.get(f"{vault.addr}/v1/sys/health", timeout=5)
    assert resp.status_code == 503 and resp.json()["sealed"] is True
    assert requests.get(f"{vault.addr}/v1/sys/health?sealedcode=200", timeout=5).status_code == 200
    vault.set_sealed(False)
    vault.set_standby(True)
    assert requests.get(f"{vault.addr}/v1/sys/health", timeout=5).status_code == 429
    assert requests.get(f"{vault.addr}/v1/sys/health?standbyok=true", timeout=5).status_code == 200


def test_invalid_token_text_can_be_vault_1_14s() -> None:
    with VaultServer(invalid_token_errors=["permission denied"]) as old:
        resp = requests.get(f"{old.addr}/v1/auth/token/lookup-self",
                            headers={"X-Vault-Token": "hvs.bogus"}, timeout=5)
    assert resp.status_code == 403 and resp.json() == {"errors": ["permission denied"]}


@pytest.mark.parametrize(("path", "patterns", "winner"), [
    # The priority examples of V vault/acl.go CheckAllowedFromNonExactPaths.
    ("foo/ab", ["foo/+", "foo/a*"], "foo/a*"),
    ("foo/bar/x/baz", ["foo/+/bar/baz", "foo/bar/+/baz"], "foo/bar/+/baz"),
    ("foo/x/bar", ["foo/+/ba*", "foo/+/bar"], "foo/+/bar"),
    ("foo/x", ["foo/*", "foo/+"], "foo/+"),
    ("foo/bar/x/baz", ["foo/+/+/baz", "foo/bar/+/baz"], "foo/bar/+/baz"),
    ("foo/x/bar/baz", ["foo/+/bar/b*", "foo/+/bar/ba*"], "foo/+/bar/ba*"),
    ("foo/bar/baz", ["foo/*", "foo/bar/*"], "foo/bar/*"),  # longest glob
    ("foo/bar", ["foo/bar", "foo/*", "foo/+"], "foo/bar"),  # exact first
    ("foo/", ["foo", "foo/*"], "foo"),  # a LIST path also matches its exact rule without "/"
])
def test_acl_rule_priority(path: str, patterns: list[str], winner: str) -> None:
    from vault_server import _acl_lookup

    rules = {p: frozenset({p}) for p in patterns}  # each rule's "capabilities" name it
    assert _acl_lookup(rules, path, is_list=True) == frozenset({winner})
    assert _acl_lookup(rules, "elsewhere/x", is_list=False) is None


# --------------------------------------------------------------------------- the same, on a real Vault
# The rules above that need no stand-in knob run against the stand-in AND, when
# SIDEKEY_TEST_VAULT_ADDR / SIDEKEY_TEST_VAULT_TOKEN are set, against a real Vault (or
# OpenBao): a difference between the two is a bug in the stand-in. The real token must be
# allowed to write policies (sys/policy/*), create tokens (auth/token/create) and use the
# KV v2 mount SIDEKEY_TEST_VAULT_KV_MOUNT (default "secret"); a root token on a dev server
# (``vault server -dev``) will do. SIDEKEY_TEST_VAULT_DYNAMIC=<mount>/<path> adds the
# revocation cases. Everything written is under sidekey-test-<random> and removed after.

REAL_ADDR = os.environ.get("SIDEKEY_TEST_VAULT_ADDR")
REAL_TOKEN = os.environ.get("SIDEKEY_TEST_VAULT_TOKEN")
REAL_KV_MOUNT = os.environ.get("SIDEKEY_TEST_VAULT_KV_MOUNT", "secret")
REAL_DYNAMIC = os.environ.get("SIDEKEY_TEST_VAULT_DYNAMIC")


class Target:
    """A Vault to check the rules on: the stand-in or a real one, through hvac only."""

    def __init__(self, addr: str, root: str, kv_mount: str, dynamic: str | None,
                 namespace: str | None = None) -> None:
        self.addr, self.root, self.kv_mount, self.dynamic = addr, root, kv_mount, dynamic
        self.namespace = namespace
        self.prefix = f"sidekey-test-{secrets.token_hex(4)}"
        self._clients: list[hvac.Client] = []
        self._policies: list[str] = []
        self._tokens: list[str] = []

    def client(self, token: str | None = None) -> hvac.Client:
        c = hvac.Client(url=self.addr, token=token, timeout=10, namespace=self.namespace)
        self._clients.append(c)
        return c

    def add_policy(self, name: str, hcl: str) -> str:
        name = f"{self.prefix}-{name}"
        self.client(self.root).sys.create_or_update_policy(name=name, policy=hcl)
        self._policies.append(name)
        return name

    def create_token(self, policies: list[str], num_uses: int = 0) -> str:
        auth = self.client(self.root).auth.token.create(policies=policies, ttl="10m",
                                                        num_uses=num_uses)["auth"]
        self._tokens.append(auth["client_token"])
        return str(auth["client_token"])

    def close(self) -> None:
        root = self.client(self.root)
        for token in self._tokens:
            with contextlib.suppress(hvac.exceptions.VaultError):
                root.auth.token.revoke(token)
        for name in self._policies:
            root.sys.delete_policy(name)
        with contextlib.suppress(hvac.exceptions.VaultError):
            keys = root.secrets.kv.v2.list_secrets(path=self.prefix, mount_point=self.kv_mount)
            for key in keys["data"]["keys"]:
                root.secrets.kv.v2.delete_metadata_and_all_versions(
                    path=f"{self.prefix}/{key}", mount_point=self.kv_mount)
        for c in self._clients:
            c.adapter.close()


@pytest.fixture(params=["stand-in", pytest.param("real", marks=pytest.mark.real_vault)])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "stand-in":
        with VaultServer(clock=lambda: 1000.0) as server:
            server.add_dynamic_role("readonly", ttl=600)
            t = Target(server.addr, server.root_token, "secret", "database/creds/readonly")
            try:
                yield t
            finally:
                t.close()
        return
    if not (REAL_ADDR and REAL_TOKEN):
        pytest.skip("set SIDEKEY_TEST_VAULT_ADDR and SIDEKEY_TEST_VAULT_TOKEN to check against a real Vault")
    t = Target(REAL_ADDR, REAL_TOKEN, REAL_KV_MOUNT, REAL_DYNAMIC, os.environ.get("VAULT_NAMESPACE"))
    try:
        yield t
    finally:
        t.close()


def test_same_kv_deleted_version_body_and_cas(target: Target) -> None:
    kv = target.client(target.root).secrets.kv.v2
    path, mount = f"{target.prefix}/s", target.kv_mount
    kv.create_or_update_secret(path=path, secret={"v": "1"}, cas=0, mount_point=mount)
    kv.create_or_update_secret(path=path, secret={"v": "2"}, cas=1, mount_point=mount)
    kv.delete_latest_version_of_secret(path=path, mount_point=mount)
    with pytest.raises(hvac.exceptions.InvalidPath) as exc:
        kv.read_secret_version(path=path, mount_point=mount, raise_on_deleted_version=True)
    body = exc.value.json
    assert "errors" not in body and body["data"]["data"] is None
    assert body["data"]["metadata"]["version"] == 2 and body["data"]["metadata"]["deletion_time"]
    with pytest.raises(hvac.exceptions.InvalidRequest) as cas_exc:
        kv.create_or_update_secret(path=path, secret={"v": "x"}, cas=0, mount_point=mount)
    assert cas_exc.value.errors == ["check-and-set parameter did not match the current version"]
    kv.destroy_secret_versions(path=path, versions=[2], mount_point=mount)
    with pytest.raises(hvac.exceptions.InvalidPath) as exc:
        kv.read_secret_version(path=path, mount_point=mount, raise_on_deleted_version=True)
    meta = exc.value.json["data"]["metadata"]
    assert (meta["version"], meta["deletion_time"] != "", meta["destroyed"]) == (2, True, True)
    assert kv.create_or_update_secret(path=path, secret={"v": "3"}, cas=2,
                                      mount_point=mount)["data"]["version"] == 3
    with pytest.raises(hvac.exceptions.InvalidPath) as exc:
        kv.read_secret_version(path=f"{target.prefix}/never", mount_point=mount,
                               raise_on_deleted_version=True)
    assert exc.value.json == {"errors": []}


def test_same_policy_num_uses_and_capabilities(target: Target) -> None:
    mount, prefix = target.kv_mount, target.prefix
    target.client(target.root).secrets.kv.v2.create_or_update_secret(
        path=f"{prefix}/ok", secret={"v": "x"}, mount_point=mount)
    policy = target.add_policy("kv", f'''
path "{mount}/data/{prefix}/*"      {{ capabilities = ["read", "create", "update"] }}
path "{mount}/data/{prefix}/locked" {{ capabilities = ["deny"] }}
path "{mount}/data/+/{prefix}-seg"  {{ capabilities = ["list"] }}
''')
    token = target.create_token([policy], num_uses=6)
    c = target.client(token)
    c.secrets.kv.v2.read_secret_version(path=f"{prefix}/ok", mount_point=mount,
                                        raise_on_deleted_version=True)  # 5 left
    with pytest.raises(hvac.exceptions.Forbidden) as exc:  # denied: spends one all the same
        c.secrets.kv.v2.read_secret_version(path=f"{prefix}/locked", mount_point=mount,
                                            raise_on_deleted_version=True)  # 4 left
    assert "permission denied" in exc.value.errors
    with pytest.raises(hvac.exceptions.Forbidden):  # a wrong mount under a policy: 403
        c.adapter.get(f"/v1/{prefix}-no-such-mount/data/x")  # 3 left
    answer = c.sys.get_capabilities([f"{mount}/data/{prefix}/a", f"{mount}/data/{prefix}/locked",
                                     f"{mount}/data/any/{prefix}-seg", "sys/leases/revoke"])  # 2 left
    assert answer["data"] == {
        f"{mount}/data/{prefix}/a": ["create", "read", "update"],
        f"{mount}/data/{prefix}/locked": ["deny"],
        f"{mount}/data/any/{prefix}-seg": ["list"],
        "sys/leases/revoke": ["deny"],
    }
    assert c.auth.token.lookup_self()["data"]["num_uses"] == 1
    c.auth.token.lookup_self()  # the last use
    with pytest.raises(hvac.exceptions.Forbidden) as exc:
        c.auth.token.lookup_self()
    assert "permission denied" in exc.value.errors


def test_same_revoke_status_codes(target: Target) -> None:
    root = target.client(target.root)
    with pytest.raises(hvac.exceptions.InvalidRequest, match="lease_id must be specified"):
        root.adapter.put("/v1/sys/leases/revoke", json={})
    unknown = f"{target.dynamic or 'database/creds/readonly'}/{target.prefix}"
    assert status_of(root.sys.revoke_lease(unknown)) == 204  # unknown: no error
    assert status_of(root.adapter.put(f"/v1/sys/leases/revoke/{unknown}", json={"sync": False})) == 202
    if target.dynamic is None:
        return
    a = root.adapter.get(f"/v1/{target.dynamic}")["lease_id"]
    b = root.adapter.get(f"/v1/{target.dynamic}")["lease_id"]
    assert status_of(root.sys.revoke_lease(a)) == 204  # sync by default
    assert status_of(root.adapter.put(f"/v1/sys/leases/revoke/{b}", json={"sync": False})) == 202
    for lease_id in (a, b):
        with pytest.raises(hvac.exceptions.InvalidRequest, match="invalid lease"):
            root.sys.read_lease(lease_id)


def test_child_tokens_and_their_leases_die_with_the_parent(vault: VaultServer, client: Client) -> None:
    vault.add_policy("creds", {"database/creds/readonly": ["read"], "auth/token/create": ["update"]})
    parent = vault.create_token(policies=["creds"])
    pc = client(parent)
    child = pc.auth.token.create(ttl="10m")["auth"]
    assert child["policies"] == ["creds", "default"] and child["orphan"] is False
    orphan = client(vault.root_token).auth.token.create(policies=["creds"], no_parent=True)["auth"]
    with pytest.raises(hvac.exceptions.InvalidRequest, match="subset of parent"):
        pc.auth.token.create(policies=["root"])
    lease = creds(client(child["client_token"]))["lease_id"]
    kept = creds(client(orphan["client_token"]))["lease_id"]
    vault.revoke_token(parent)
    assert vault.token(child["client_token"]).revoked_why == "parent token revoked"
    assert vault.live_leases() == {kept}
    assert lease not in vault.live_leases()
