"""Secret rotation through the daemon (`sidekey secrets rotate`, POST
/v1/admin/secrets/{name}/rotate): new version in the secret's own backend, cache
dropped, leases of the old version optionally revoked, audited without values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from harness import Daemon

WRITE_KEY = "content-api/write-key"


def sidekey(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidekey", *args], input=stdin.decode() if stdin else None,
                          capture_output=True, text=True, timeout=60, check=False)


def redeem(d: Daemon) -> dict[str, Any]:
    status, auth = d.authorize("content-api", "create_article")
    assert status == 200, auth
    status, lease = d.request("POST", "/v1/redeem", {"resolution_token": auth["resolution_token"]})
    assert status == 200, lease
    return lease


def test_rotate_via_daemon_is_seen_at_once_and_audited(daemon: Daemon) -> None:
    old = daemon.secrets[WRITE_KEY]
    assert redeem(daemon)["secrets"]["CONTENT_API_KEY"] == old
    new = f"SECRET-rotated-{os.urandom(6).hex()}"
    out = sidekey("secrets", "rotate", WRITE_KEY, "--config", str(daemon.config_path), "--json",
                  stdin=new.encode())
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (result["old_version"], result["new_version"], result["backend"]) == ("1", "2", "local")
    assert new not in out.stdout + out.stderr
    # the very next call gets the new version (no waiting for a cache or a file re-check)
    assert redeem(daemon)["secrets"]["CONTENT_API_KEY"] == new
    event = daemon.events_of("secret.rotated")[-1]
    assert event["outcome"] == "applied" and event["secret"] == WRITE_KEY
    assert (event["old_version"], event["new_version"]) == ("1", "2")
    assert new.encode() not in daemon.everything_written()
    assert old.encode() not in daemon.everything_written()


def test_rotate_generate_and_revoke_leases(daemon: Daemon) -> None:
    lease = redeem(daemon)
    status, body = daemon.request(
        "POST", "/v1/admin/secrets/" + WRITE_KEY.replace("/", "%2F") + "/rotate",
        {"generate": 40, "revoke_leases": True})
    assert status == 200 and body["leases_revoked"] == 1, body
    status, err = daemon.request("POST", "/v1/release", {"lease_id": lease["lease_id"], "status": "success"})
    assert status == 409 and err["error"]["code"] == "lease_revoked", err
    revoked = daemon.events_of("lease.revoked")[-1]
    assert revoked["lease_id"] == lease["lease_id"] and WRITE_KEY in revoked["reason"]
    fresh = redeem(daemon)["secrets"]["CONTENT_API_KEY"]
    assert len(fresh) == 40 and fresh != daemon.secrets[WRITE_KEY]


def test_rotate_errors(daemon: Daemon) -> None:
    status, body = daemon.request("POST", "/v1/admin/secrets/no%2Fsuch/rotate", {"value": "x" * 20})
    assert status == 404 and body["error"]["code"] == "secret_unknown"
    status, body = daemon.request("POST", "/v1/admin/secrets/" + WRITE_KEY.replace("/", "%2F") + "/rotate",
                                  {"value": "x" * 20, "generate": 20})
    assert status == 400 and body["error"]["code"] == "invalid_request"
    status, body = daemon.request("GET", "/v1/admin/secrets/x/rotate")
    assert status == 404
    out = sidekey("secrets", "rotate", "no/such", "--config", str(daemon.config_path), "--generate", "20")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "secret_unknown" in out.stderr


def test_rotate_needs_security_tier(make_daemon: Any) -> None:
    import pwd

    from test_integration import _as_nobody

    NOBODY_UID = pwd.getpwnam("nobody").pw_uid

    d = make_daemon({"peers": {"analytics-db": [{"uid": NOBODY_UID}]}}).start()
    result = _as_nobody(d, lambda dd: list(dd.request(
        "POST", "/v1/admin/secrets/" + WRITE_KEY.replace("/", "%2F") + "/rotate", {"generate": 20})))
    assert result[0] == 403 and result[1]["error"]["code"] == "peer_rejected", result
    assert d.events_of("secret.rotated") == []


def test_rotation_on_one_host_drops_the_cached_copy_on_another(make_daemon: Any, tmp_path: Any) -> None:
    """Two hosts share a Redis state store and one secret (here: the same local store
    file, cached 300 s on both). Host B has the old value cached; a rotation through
    host A reaches B's cache through the store's rotation notices within seconds."""
    import time

    from redis_server import RedisServer

    server = RedisServer(tmp_path).start()
    try:
        first: Daemon = make_daemon()  # creates the key and the store with its secrets
        a: Daemon = first
        shared = {"type": "local", "path": str(a.root / "state" / "secrets.enc"),
                  "key_file": str(a.root / "keys" / "local.key"), "cache_ttl_s": 300}
        state = {"backend": "redis", "redis_url": server.url, "redis_key_prefix": "sk-rot:"}
        a = make_daemon({"state": state, "backends": {"local": shared}}, root=first.root)
        b: Daemon = make_daemon({"state": state, "backends": {"local": shared}})
        a.secrets = b.secrets = first.secrets
        a.start()
        b.start()
        old = a.secrets[WRITE_KEY]
        assert redeem(b)["secrets"]["CONTENT_API_KEY"] == old  # cached on B now
        new = f"SECRET-rotated-{os.urandom(6).hex()}"
        out = sidekey("secrets", "rotate", WRITE_KEY, "--config", str(a.config_path), stdin=new.encode())
        assert out.returncode == 0, out.stderr
        assert redeem(a)["secrets"]["CONTENT_API_KEY"] == new
        deadline = time.monotonic() + 10
        seen = old
        while seen != new and time.monotonic() < deadline:
            time.sleep(0.2)
            seen = redeem(b)["secrets"]["CONTENT_API_KEY"]
        assert seen == new
        assert "rotation notice" in b.log()
    finally:
        server.stop()
