"""Config reload (SIGHUP and POST /v1/admin/reload) against a real daemon: atomic,
audited, and a bad config leaves the running policy in force."""

from __future__ import annotations

import pwd
import signal
import time
from typing import Any

import yaml

from harness import Daemon

NOBODY = pwd.getpwnam("nobody").pw_uid


def _edit_main(d: Daemon, change: Any) -> None:
    cfg = yaml.safe_load(d.config_path.read_text())
    change(cfg)
    d.config_path.write_text(yaml.safe_dump(cfg))


def _reloaded(d: Daemon, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        events = d.events_of("config.reloaded")
        if len(events) >= count:
            return events
        assert time.monotonic() < deadline, "no config.reloaded event"
        time.sleep(0.05)


def test_api_reload_applies_new_policy(daemon: Daemon) -> None:
    assert daemon.authorize("content-api", "list_articles")[0] == 200
    _edit_main(daemon, lambda c: c["peers"].update({"content-api": [{"uid": NOBODY}]}))
    status, body = daemon.request("POST", "/v1/admin/reload", {})
    assert status == 200 and body["outcome"] == "applied", body
    status, body = daemon.authorize("content-api", "list_articles")
    assert status == 403 and body["error"]["code"] == "peer_mismatch", body
    event = daemon.events_of("config.reloaded")[-1]
    assert event["outcome"] == "applied" and event["source"] == "api"
    assert event["peer"]["uid"] == 0


def test_bad_config_is_rejected_and_old_policy_still_enforced(daemon: Daemon) -> None:
    # The new file would deny root as content-api, but it also has an unknown key:
    # the reload is refused and root's calls keep working under the old policy.
    def change(c: dict[str, Any]) -> None:
        c["peers"]["content-api"] = [{"uid": NOBODY}]
        c["listen"]["surprise"] = 1

    _edit_main(daemon, change)
    status, body = daemon.request("POST", "/v1/admin/reload", {})
    assert status == 422 and body["error"]["code"] == "config_rejected", body
    assert "$.listen.surprise" in body["error"]["message"]
    assert daemon.authorize("content-api", "list_articles")[0] == 200
    event = daemon.events_of("config.reloaded")[-1]
    assert event["outcome"] == "rejected" and "surprise" in event["reason"]
    assert "rejected, keeping the running config" in daemon.log()


def test_sighup_reload_and_restart_only_changes(daemon: Daemon) -> None:
    assert daemon.proc is not None
    # A YAML syntax error: refused, logged, audited, daemon keeps serving.
    daemon.config_path.write_text(daemon.config_path.read_text() + "\n  : [unclosed\n")
    daemon.proc.send_signal(signal.SIGHUP)
    events = _reloaded(daemon, 1)
    assert events[-1]["outcome"] == "rejected" and events[-1]["source"] == "SIGHUP"
    assert daemon.authorize("content-api", "list_articles")[0] == 200

    # A change only a restart can apply (the socket path): refused, naming it.
    daemon.config_path.write_text(yaml.safe_dump(daemon.config))
    _edit_main(daemon, lambda c: c["listen"].update({"socket": "run/other"}))
    daemon.proc.send_signal(signal.SIGHUP)
    events = _reloaded(daemon, 2)
    assert events[-1]["outcome"] == "rejected" and "listen" in events[-1]["reason"]

    # The audit HMAC key is read when the audit file is opened: a reload naming another
    # one is refused (not silently kept).
    daemon.config_path.write_text(yaml.safe_dump(daemon.config))
    _edit_main(daemon, lambda c: c.setdefault("audit", {}).update({"hmac_key_file": "keys/other.key"}))
    daemon.proc.send_signal(signal.SIGHUP)
    events = _reloaded(daemon, 3)
    assert events[-1]["outcome"] == "rejected" and "audit.hmac_key_file" in events[-1]["reason"]
    assert "only a restart applies" in events[-1]["reason"]

    # A good one applies; the daemon is still the same process.
    daemon.config_path.write_text(yaml.safe_dump(daemon.config))
    _edit_main(daemon, lambda c: c["peers"].update({"analytics-db": [{"uid": NOBODY}]}))
    daemon.proc.send_signal(signal.SIGHUP)
    events = _reloaded(daemon, 4)
    assert events[-1]["outcome"] == "applied"
    status, body = daemon.authorize("analytics-db", "query_metrics")
    assert status == 403 and body["error"]["code"] == "peer_mismatch"
    assert daemon.proc.poll() is None


def test_reload_requires_admin(make_daemon: Any) -> None:
    from test_integration import _as_nobody

    d = make_daemon({"peers": {"analytics-db": [{"uid": NOBODY}]}}).start()
    result = _as_nobody(d, lambda dd: list(dd.request("POST", "/v1/admin/reload", {})))
    assert result[0] == 403 and result[1]["error"]["code"] == "peer_rejected"


def test_leases_in_flight_survive_a_reload(daemon: Daemon) -> None:
    _, tok = daemon.request("POST", "/v1/tokens", {"server": "content-api", "tool": "list_articles",
                                                   "user": "u1"})
    status, lease = daemon.request("POST", "/v1/redeem", {"resolution_token": tok["resolution_token"]})
    assert status == 200
    _edit_main(daemon, lambda c: c["leases"].update({"max_ttl_seconds": 60}))
    assert daemon.request("POST", "/v1/admin/reload", {})[0] == 200
    status, body = daemon.request("POST", "/v1/release", {"lease_id": lease["lease_id"],
                                                         "status": "success"})
    assert status == 200 and body["state"] == "released", body


def _sidekey(*args: str) -> Any:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "sidekey", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def _signed(d: Daemon) -> str:
    """Turn on require_signed_config with a fresh key, sign, return the key path."""
    import json

    key = d.root / "keys" / "config-signing.pem"
    out = _sidekey("keygen", "ed25519", "--out", str(key), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    _edit_main(d, lambda c: c.update({"config_signing": {
        "require_signed_config": True,
        "trusted_keys": [{"kid": info["kid"], "public_key": info["public_key"]}]}}))
    signed = _sidekey("config", "sign", "--config", str(d.config_path), "--key", str(key))
    assert signed.returncode == 0, signed.stderr
    return str(key)


def test_signed_config_tamper_refuses_start_and_reload(make_daemon: Any) -> None:
    d = make_daemon()
    _signed(d)
    signed_main = d.config_path.read_bytes()
    d.start()
    assert d.authorize("content-api", "list_articles")[0] == 200

    # One byte of an include changes: the reload is refused, the old policy serves.
    include = d.root / "agent-tool-mappings.yaml"
    original = include.read_bytes()
    include.write_bytes(original.replace(b"publishes content", b"publishes contenT", 1))
    status, body = d.request("POST", "/v1/admin/reload", {})
    assert status == 422 and "stale signature" in body["error"]["message"], body
    assert "agent-tool-mappings.yaml" in body["error"]["message"]
    assert d.authorize("content-api", "list_articles")[0] == 200

    # A new main file that switches the check off is still checked (the running config
    # requires it), and it is not signed: refused.
    include.write_bytes(original)
    _edit_main(d, lambda c: c["config_signing"].update({"require_signed_config": False}))
    status, body = d.request("POST", "/v1/admin/reload", {})
    assert status == 422 and "stale signature" in body["error"]["message"], body

    # A restart on the signed main file with the tampered include is refused outright.
    assert d.stop() == 0
    d.config_path.write_bytes(signed_main)
    include.write_bytes(original.replace(b"publishes content", b"publishes contenT", 1))
    out = _sidekey("serve", "--config", str(d.config_path))
    assert out.returncode == 1, out.stderr
    assert "stale signature" in out.stderr and "agent-tool-mappings.yaml" in out.stderr
    assert "Traceback" not in out.stderr

    # With the files as signed it starts again.
    include.write_bytes(original)
    d.start()
    assert d.authorize("content-api", "list_articles")[0] == 200
