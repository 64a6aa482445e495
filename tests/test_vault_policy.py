"""The least-privilege policy sidekey ships (examples/vault/sidekey-policy.hcl), held to
by the Vault stand-in's ACL rules (tests/vault_server.py), and the capability probe
(``VaultBackend.probe``, ``sidekey check-config --probe``) that names what a policy lacks.

Issue 11 item 3: with Vault's default policy alone every release is refused (it grants no
``sys/leases/revoke``); the shipped policy allows exactly what sidekey does, and the
probe says, by path and capability, what is missing before the first call fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from harness import Daemon
from sidekey.backends import BackendError
from sidekey.backends.vault import VaultBackend
from test_backend_vault import LIMIT_S, TIMEOUT_S, Journal, sref, write_private
from vault_server import VaultServer

POLICY = Path(__file__).resolve().parents[1] / "examples" / "vault" / "sidekey-policy.hcl"
STATIC = sref(mount="secret", path="mcp/content-api", key="api_key")
DYNAMIC = sref(mount="database", path="creds/readonly", kind="dynamic")
REVOKE = "sys/leases/revoke/database/creds/readonly/lease-id"
LOOKUP = "sys/leases/lookup/database/creds/readonly/"


def without_block(policy: str, path: str) -> str:
    """The policy text without its ``path "<path>" { ... }`` block."""
    out = re.sub(r'path "' + re.escape(path) + r'" \{[^}]*\}\n', "", policy)
    assert out != policy, path
    return out


@pytest.fixture
def vault() -> Iterator[VaultServer]:
    with VaultServer() as server:
        server.add_dynamic_role("readonly", ttl=600)
        server.put_secret("secret", "mcp/content-api", {"api_key": "key-v1"})
        yield server


@pytest.fixture
def backend_for(vault: VaultServer, vault_backend: Any, tmp_path: Path) -> Any:
    made = [0]

    def make(policy_text: str | None, journal: Journal | None = None) -> VaultBackend:
        made[0] += 1
        if policy_text is None:
            token = vault.create_token(ttl=3600, policies=[])  # Vault's default policy only
        else:
            vault.add_policy(f"p{made[0]}", policy_text)
            token = vault.create_token(ttl=3600, policies=[f"p{made[0]}"])
        write_private(tmp_path / f"token-{made[0]}", token)
        backend: VaultBackend = vault_backend(token_file=f"token-{made[0]}", timeout_s=TIMEOUT_S,
                                              journal=journal)
        return backend

    return make


async def test_the_shipped_policy_allows_every_call_sidekey_makes(
    vault: VaultServer, backend_for: Any
) -> None:
    """Under the shipped policy (plus Vault's default): read, rotate, issue, release
    (URL-form revoke, scoped to the role), crash-recovery listing; the probe finds nothing
    missing."""
    backend = backend_for(POLICY.read_text(), Journal())
    with trio.fail_after(LIMIT_S):
        assert await backend.probe([STATIC, DYNAMIC]) == []
        assert (await backend.fetch(STATIC)).value == "key-v1"
        assert await backend.rotate(STATIC, "key-v2") == "2"
        cred = await backend.fetch(DYNAMIC)
        assert cred.lease_id is not None and cred.lease_id in vault.live_leases()
        await backend.release(cred.lease_id)
        assert cred.lease_id not in vault.live_leases()

        async def nobody_journaled(ids: list[str]) -> set[str]:
            return set()

        # Listing the role's leases is a root-protected path: list + sudo are granted.
        assert await backend.sweep_orphans("database/creds/readonly/", [], nobody_journaled) == 0


async def test_default_policy_alone_misses_what_each_step_needs(backend_for: Any) -> None:
    """A token with only Vault's default policy: the probe names every missing
    capability with the step that needs it; rotation is reported as optional."""
    backend = backend_for(None)
    with trio.fail_after(LIMIT_S):
        missing = await backend.probe([STATIC, DYNAMIC])
    got = {(m["path"], m["capability"], m["required"]) for m in missing}
    assert got == {
        ("secret/data/mcp/content-api", "read", True),
        ("secret/data/mcp/content-api", "update", False),
        ("database/creds/readonly", "read", True),
        (REVOKE, "update", True),
        (LOOKUP, "list", True),
        (LOOKUP, "sudo", True),
    }
    why = {m["capability"]: m["needed_for"] for m in missing if m["path"] == REVOKE}
    assert "revoking database/creds/readonly credentials at release" in why["update"]


async def test_a_policy_without_revoke_is_named_by_the_probe_and_refuses_release(
    vault: VaultServer, backend_for: Any
) -> None:
    """The mistake the issue found in the field: a "read database/creds/x" policy. The
    probe names the revoke capability; a release is refused as a policy denial (not
    'not found'), and the credential stays live until its TTL."""
    policy = without_block(POLICY.read_text(), "sys/leases/revoke/database/creds/readonly/*")
    backend = backend_for(policy, Journal())
    with trio.fail_after(LIMIT_S):
        missing = await backend.probe([DYNAMIC])
        assert [(m["path"], m["capability"]) for m in missing] == [(REVOKE, "update")]
        cred = await backend.fetch(DYNAMIC)
        assert cred.lease_id is not None
        with pytest.raises(BackendError, match="permission denied"):
            await backend.release(cred.lease_id)
    assert cred.lease_id in vault.live_leases()


async def test_revocation_is_scoped_to_the_roles_in_the_policy(
    vault: VaultServer, backend_for: Any
) -> None:
    """The URL form (sys/leases/revoke/<lease_id>) is what makes the role-scoped grant
    work: a credential of a role the policy does not name cannot be revoked."""
    vault.add_dynamic_role("admin", ttl=600)
    root = backend_for("path \"database/creds/admin\" { capabilities = [\"read\"] }")
    scoped = backend_for(POLICY.read_text())
    with trio.fail_after(LIMIT_S):
        other = await root.fetch(sref(mount="database", path="creds/admin", kind="dynamic"))
        assert other.lease_id is not None
        with pytest.raises(BackendError, match="permission denied"):
            await scoped.release(other.lease_id)
        mine = await scoped.fetch(DYNAMIC)
        assert mine.lease_id is not None
        await scoped.release(mine.lease_id)
    assert other.lease_id in vault.live_leases() and mine.lease_id not in vault.live_leases()


def test_check_config_probe_names_the_missing_capability(vault: VaultServer) -> None:
    """`sidekey check-config --probe` on a config whose Vault token lacks revoke: exit 1,
    one line naming the capability, the path and what needs it; --json has the same."""
    d = Daemon()
    try:
        vault.add_policy("no-revoke", without_block(
            POLICY.read_text(), "sys/leases/revoke/database/creds/readonly/*"))
        token_file = d.root / "keys" / "vault-token"
        token_file.write_text(vault.create_token(ttl=3600, policies=["no-revoke"]) + "\n")
        token_file.chmod(0o600)
        cfg = d.config
        cfg["backends"]["vault"] = {"type": "vault", "addr": vault.addr,
                                    "token_file": "keys/vault-token", "timeout_s": TIMEOUT_S}
        cfg["secrets"]["analytics-db"]["query_metrics"] = {
            "DATABASE_URL": {"backend": "vault", "mount": "database", "path": "creds/readonly",
                             "kind": "dynamic"}}
        d.config_path.write_text(yaml.safe_dump(cfg))

        def check(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "sidekey", "check-config", "-c", str(d.config_path),
                 "--probe", *extra], capture_output=True, text=True, timeout=60)

        out = check()
        assert out.returncode == 1, out.stdout + out.stderr
        assert (f"probe backend vault: MISSING update on {REVOKE}, for revoking database/creds/readonly "
                "credentials at release") in out.stdout, out.stdout
        as_json = check("--json")
        assert as_json.returncode == 1
        probe = yaml.safe_load(as_json.stdout)["probe"]["vault"]
        assert probe["ok"] is False
        assert [(m["path"], m["capability"]) for m in probe["missing"]] == [(REVOKE, "update")]
        assert token_file.read_text().strip() not in out.stdout + as_json.stdout
    finally:
        d.cleanup()
