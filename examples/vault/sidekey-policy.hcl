# The least-privilege Vault policy for sidekey (issue 11; README "Vault in production").
#
# Load it:   vault policy write sidekey examples/vault/sidekey-policy.hcl
# AppRole:   vault write auth/approle/role/sidekey token_policies=sidekey \
#              token_ttl=1h token_max_ttl=24h token_num_uses=0 secret_id_num_uses=0
# Check it:  sidekey check-config --probe -c /etc/sidekey/sidekey.yaml
#            (asks Vault, through sys/capabilities-self, for every path below that your
#            config uses, and names each missing capability)
#
# Keep Vault's "default" policy attached (do not set token_no_default_policy): it grants
# auth/token/lookup-self (read), auth/token/renew-self (update), sys/leases/lookup
# (update: an orphaned lease's issue time) and sys/capabilities-self (update).
#
# Replace the example mounts and paths by yours: "secret" (a KV v2 mount) with secrets
# under "mcp/", and the database role "readonly" under the "database" mount. One block per
# KV prefix and per role.

# Static secrets (KV v2): read; create/update only for `sidekey rotate` (check-and-set
# writes of a new version). Drop create and update on a host that never rotates.
path "secret/data/mcp/*" {
  capabilities = ["read", "create", "update"]
}

# Dynamic credentials: one read issues one credential with its own lease.
path "database/creds/readonly" {
  capabilities = ["read"]
}

# Release: sidekey revokes a credential when its tool call ends, with the URL form
# PUT sys/leases/revoke/<lease_id>, so this grant is scoped to the role's leases (Vault's
# default policy grants no revocation at all: without this block every release is
# refused and the credential lives until its TTL). Not a hard boundary: Vault lets a
# lease_id in the request body override the URL's, so a holder of this token can revoke
# other leases (never read them).
path "sys/leases/revoke/database/creds/readonly/*" {
  capabilities = ["update"]
}

# Crash recovery: after a crash between Vault's answer and sidekey's journal, sidekey
# lists the role's leases to revoke the orphan. sys/leases/lookup/* is a root-protected
# path in Vault: list needs sudo there.
path "sys/leases/lookup/database/creds/readonly/*" {
  capabilities = ["list", "sudo"]
}
