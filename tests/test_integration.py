"""End to end against a real daemon subprocess on a real socket."""

from __future__ import annotations

import datetime
import json
import os
import pwd
import select
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from harness import BOTH_LOG_FORMATS, Daemon, UnixHTTPConnection, run_as

pytestmark = pytest.mark.integration


def full_call(d: Daemon, server: str = "content-api", tool: str = "create_article") -> dict[str, Any]:
    status, auth = d.authorize(server, tool)
    assert status == 200, auth
    status, lease = d.request("POST", "/v1/redeem", {"resolution_token": auth["resolution_token"]})
    assert status == 200, lease
    status, rel = d.request("POST", "/v1/release", {"lease_id": lease["lease_id"], "status": "success", "duration_ms": 3})
    assert status == 200, rel
    return {"auth": auth, "lease": lease, "release": rel}


def test_health_and_one_call(daemon: Daemon) -> None:
    status, health = daemon.request("GET", "/v1/health")
    assert status == 200 and health["status"] == "ok"
    out = full_call(daemon)
    assert out["lease"]["secrets"] == {"CONTENT_API_KEY": daemon.secrets["content-api/write-key"]}
    assert out["release"]["state"] == "released"
    types = [e["event_type"] for e in daemon.audit_events()]
    assert types[0] == "daemon.started"
    assert types[-3:] == ["mcp.authorize", "mcp.redeem", "mcp.tool_call"]
    tool_call = daemon.events_of("mcp.tool_call")[0]
    # seed shape
    for key in ("event_id", "timestamp", "event_type", "server", "tool", "user_id", "agent_id",
                "session_id", "arguments", "result", "auth", "policy"):
        assert key in tool_call, key
    assert tool_call["result"]["status"] == "success" and tool_call["result"]["duration_ms"] == 3
    assert tool_call["policy"]["decision"] == "allow"
    assert tool_call["peer"]["pid"] and tool_call["peer"]["attestation"] == "pidfd"
    assert tool_call["lease_id"] == out["lease"]["lease_id"]


def test_lease_carries_only_that_tools_secrets(daemon: Daemon) -> None:
    out = full_call(daemon, "analytics-db", "query_metrics")
    assert set(out["lease"]["secrets"]) == {"DATABASE_URL"}


def _as_nobody(d: Daemon, fn: Any) -> dict[str, Any]:
    """Run fn(d) in a forked child that has dropped to uid nobody; return its JSON result."""
    nobody = pwd.getpwnam("nobody")
    result: dict[str, Any] = run_as(d, nobody.pw_uid, nobody.pw_gid, fn)
    return result


def test_other_uid_is_refused_and_audited(daemon: Daemon) -> None:
    result = _as_nobody(daemon, lambda d: list(d.authorize()))
    status, body = result if isinstance(result, list) else (None, result)
    assert status == 403, body
    assert body["error"]["code"] == "peer_rejected"
    rejected = daemon.events_of("peer.rejected")
    assert rejected and rejected[-1]["peer"]["uid"] == pwd.getpwnam("nobody").pw_uid
    # anonymous may still ask for health
    result = _as_nobody(daemon, lambda d: list(d.request("GET", "/v1/health")))
    assert result[0] == 200


def test_token_single_use_also_after_restart(daemon: Daemon) -> None:
    _, auth = daemon.authorize()
    token = auth["resolution_token"]
    assert daemon.request("POST", "/v1/redeem", {"resolution_token": token})[0] == 200
    status, body = daemon.request("POST", "/v1/redeem", {"resolution_token": token})
    assert status == 409 and body["error"]["code"] == "token_replayed"
    assert daemon.events_of("token.replayed")
    _, auth2 = daemon.authorize()
    daemon.kill()  # crash, not a clean stop
    daemon.start()
    status, body = daemon.request("POST", "/v1/redeem", {"resolution_token": token})
    assert status == 409 and body["error"]["code"] == "token_replayed"
    # the unredeemed token from before the crash still works once
    assert daemon.request("POST", "/v1/redeem", {"resolution_token": auth2["resolution_token"]})[0] == 200


def test_expired_token_refused(make_daemon: Any) -> None:
    d = make_daemon({"tokens": {"ttl_seconds": 1, "leeway_seconds": 0}}).start()
    _, auth = d.authorize()
    # Wait for the token's own expiry (its exp, on the machine clock the daemon reads),
    # not for a guessed duration; the deadline only bounds a hang.
    exp = datetime.datetime.fromisoformat(auth["expires_at"]).timestamp()
    deadline = time.monotonic() + 30
    while time.time() <= exp:
        assert time.monotonic() < deadline, "the clock never passed the token's exp"
        time.sleep(0.05)
    status, body = d.request("POST", "/v1/redeem", {"resolution_token": auth["resolution_token"]})
    assert status == 401 and body["error"]["code"] == "token_expired"
    assert d.events_of("token.rejected")[-1]["error"]["code"] == "token_expired"


def test_token_for_server_a_redeemed_by_server_b_peer(make_daemon: Any) -> None:
    """content-api is uid self (root); analytics-db is uid nobody. nobody asks for content-api's secret."""
    nobody = pwd.getpwnam("nobody").pw_uid
    d = make_daemon({"peers": {"analytics-db": [{"uid": nobody}]}}).start()
    status, tok = d.request("POST", "/v1/tokens", {"server": "content-api", "tool": "list_articles", "user": "u1"})
    assert status == 200, tok
    result = _as_nobody(d, lambda dd: list(dd.request("POST", "/v1/redeem", {"resolution_token": tok["resolution_token"]})))
    assert result[0] == 403 and result[1]["error"]["code"] == "peer_mismatch", result
    assert d.events_of("peer.rejected")
    # nobody is analytics-db's peer: its own calls work
    ok = _as_nobody(d, lambda dd: list(dd.authorize("analytics-db", "query_metrics")))
    assert ok[0] == 200, ok
    # and the token was not burned by the refused attempt: content-api's peer can still use it
    assert d.request("POST", "/v1/redeem", {"resolution_token": tok["resolution_token"]})[0] == 200


def test_lease_released_once(daemon: Daemon) -> None:
    out = full_call(daemon)
    status, body = daemon.request("POST", "/v1/release", {"lease_id": out["lease"]["lease_id"], "status": "success"})
    assert status == 409 and body["error"]["code"] == "lease_released"
    status, body = daemon.request("POST", "/v1/release", {"lease_id": "lse_nope", "status": "success"})
    assert status == 404 and body["error"]["code"] == "lease_not_found"


def test_lease_expires_with_event(make_daemon: Any) -> None:
    d = make_daemon({"leases": {"max_ttl_seconds": 1}}).start()
    _, auth = d.authorize()
    _, lease = d.request("POST", "/v1/redeem", {"resolution_token": auth["resolution_token"]})
    deadline = time.monotonic() + 30  # a hang guard: the loop ends at the event
    while time.monotonic() < deadline and not d.events_of("lease.expired"):
        time.sleep(0.1)
    assert d.events_of("lease.expired")[-1]["lease_id"] == lease["lease_id"]
    status, body = d.request("POST", "/v1/release", {"lease_id": lease["lease_id"], "status": "success"})
    assert status == 409 and body["error"]["code"] == "lease_expired"


def test_pid_reuse_does_not_get_a_secret(daemon: Daemon) -> None:
    """A child connects (as root, a valid peer) and exits; a process running as nobody
    inherits the connected fd and tries to redeem a valid token over it."""
    _, tok = daemon.request("POST", "/v1/tokens", {"server": "content-api", "tool": "list_articles", "user": "u1"})
    token = tok["resolution_token"]
    nobody = pwd.getpwnam("nobody")
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(r)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(daemon.socket)
            # make sure the daemon attested us (one request on the connection)
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nhost: sidekey\r\n\r\n")
            sock.recv(65536)
            attested = os.getpid()
            grandchild = os.fork()
            if grandchild == 0:
                # holds the fd, drops to another identity, waits for the parent to die
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                # Wait (bounded) until the attested process is gone and reaped, i.e. its
                # /proc entry vanished, rather than for a guessed 0.5 s.
                until = time.monotonic() + 20
                while os.path.exists(f"/proc/{attested}") and time.monotonic() < until:
                    time.sleep(0.01)
                body = json.dumps({"resolution_token": token}).encode()
                sock.sendall(b"POST /v1/redeem HTTP/1.1\r\nhost: sidekey\r\ncontent-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                sock.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 10:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                os.write(w, data)
                os._exit(0)
            os._exit(0)  # the attested process exits while the grandchild keeps the fd
        finally:
            os._exit(1)
    os.close(w)
    os.waitpid(child, 0)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    assert data.startswith(b"HTTP/1.1 403"), data[:200]
    assert b"peer_gone" in data
    assert daemon.secrets["content-api/read-key"].encode() not in data
    assert daemon.events_of("peer.rejected")[-1]["error"]["code"] == "peer_gone"


# --------------------------------------------------------------------------- robustness


def test_garbage_bad_json_unknown_fields_big_body_stall(daemon: Daemon) -> None:
    resp = daemon.raw(b"\x00\x01garbage\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 400"), resp[:100]
    full_call(daemon)

    status, body = daemon.request("POST", "/v1/authorize", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = daemon.request("POST", "/v1/authorize", {"server": "content-api", "tool": "x", "surprise": 1})
    assert status == 400 and body["error"]["code"] == "invalid_request" and "surprise" in body["error"]["message"]
    full_call(daemon)

    big = b"{" + b" " * (10 * 1024 * 1024) + b"}"
    conn = UnixHTTPConnection(daemon.socket)
    try:
        # The daemon answers 413 as soon as it sees the length, then lingers draining the
        # rest, so this client finishes sending and reads the 413 (no broken pipe / reset).
        conn.request("POST", "/v1/authorize", body=big, headers={"content-type": "application/json"})
        resp2 = conn.getresponse()
        assert resp2.status == 413
        assert json.loads(resp2.read())["error"]["code"] == "body_too_large"
    finally:
        conn.close()
    full_call(daemon)

    # chunked body over the cap
    chunk = b"x" * 65536
    req = b"POST /v1/authorize HTTP/1.1\r\nhost: s\r\ntransfer-encoding: chunked\r\n\r\n"
    req += b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(8))
    resp = daemon.raw(req, timeout=5)
    assert resp.startswith(b"HTTP/1.1 413"), resp[:100]

    # a client that stalls mid-body gets 408 after body_timeout_s (10 s); others are served
    # meanwhile: a whole call completes while the stalled one is still unanswered.
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(daemon.socket)
    stalled.sendall(b"POST /v1/authorize HTTP/1.1\r\nhost: s\r\ncontent-length: 100\r\n\r\n{\"serv")
    full_call(daemon)
    readable, _, _ = select.select([stalled], [], [], 0)
    assert not readable, "the stalled request was answered before another client was served"
    stalled.settimeout(20)
    got = stalled.recv(65536)
    stalled.close()
    assert got.startswith(b"HTTP/1.1 408"), got[:100]
    full_call(daemon)
    assert daemon.proc is not None and daemon.proc.poll() is None
    codes = {e["error"]["code"] for e in daemon.events_of("request.rejected")}
    assert {"bad_http", "invalid_json", "invalid_request", "body_too_large", "request_timeout"} <= codes


def test_header_too_large(daemon: Daemon) -> None:
    resp = daemon.raw(b"GET /v1/health HTTP/1.1\r\nhost: s\r\nx-big: " + b"a" * 40000 + b"\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 431"), resp[:100]
    assert daemon.request("GET", "/v1/health")[0] == 200


def test_keep_alive_many_requests_one_connection(daemon: Daemon) -> None:
    conn = UnixHTTPConnection(daemon.socket)
    try:
        for _ in range(20):
            conn.request("GET", "/v1/health")
            r = conn.getresponse()
            r.read()
            assert r.status == 200
    finally:
        conn.close()


def test_unknown_path_and_method(daemon: Daemon) -> None:
    status, body = daemon.request("GET", "/v1/nope")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = daemon.request("GET", "/v1/authorize")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"


def test_second_daemon_refused_stale_socket_removed(daemon: Daemon) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "sidekey", "serve", "--config", str(daemon.config_path)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert second.returncode != 0
    assert "another sidekey daemon is listening" in second.stderr, second.stderr
    assert daemon.request("GET", "/v1/health")[0] == 200  # the first one is untouched
    daemon.kill()  # leaves the socket file behind
    assert os.path.exists(daemon.socket)
    daemon.start()
    assert daemon.request("GET", "/v1/health")[0] == 200


def test_sigterm_lets_in_flight_finish_and_exits_zero(daemon: Daemon) -> None:
    full_call(daemon)
    assert daemon.stop() == 0
    assert daemon.events_of("daemon.stopped")
    assert not os.path.exists(daemon.socket)


@BOTH_LOG_FORMATS
def test_no_secret_anywhere_sidekey_wrote(daemon: Daemon) -> None:
    """Run every kind of call, success and failure, then grep every byte written."""
    bodies: list[bytes] = []
    for server, tool in (("content-api", "create_article"), ("content-api", "list_articles"),
                         ("analytics-db", "query_metrics")):
        full_call(daemon, server, tool)
    _, auth = daemon.authorize(arguments={"password": "hunter2-SECRET", "title": "t"})
    token = auth["resolution_token"]
    daemon.request("POST", "/v1/redeem", {"resolution_token": token})
    for body in ({"resolution_token": token}, {"resolution_token": token + "x"}, {"resolution_token": "a.b.c"}):
        _status, err = daemon.request("POST", "/v1/redeem", body)
        bodies.append(json.dumps(err).encode())
    bodies.append(json.dumps(daemon.request("POST", "/v1/release", {"lease_id": "x", "status": "success"})[1]).encode())
    daemon.stop()
    written = daemon.everything_written() + b"\n".join(bodies)
    assert b"daemon.started" in written  # we are grepping the right files
    for value in daemon.secrets.values():
        assert value.encode() not in written, value
    assert b"hunter2-SECRET" not in written
    assert token.encode() not in written


def test_connection_cap_refuses_then_recovers(make_daemon: Any) -> None:
    d = make_daemon({"listen": {"max_connections": 2}}).start()
    held = []
    try:
        for _ in range(2):
            conn = UnixHTTPConnection(d.socket)
            conn.request("GET", "/v1/health")  # keep-alive: the connection stays open
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            held.append(conn)
        resp = d.raw(b"GET /v1/health HTTP/1.1\r\nhost: s\r\n\r\n", timeout=5)
        assert resp.startswith(b"HTTP/1.1 503"), resp[:100]
        assert b"too_many_connections" in resp
    finally:
        for conn in held:
            conn.close()
    deadline = time.monotonic() + 10
    while True:  # the daemon notices the closed connections
        status, _ = d.request("GET", "/v1/health")
        if status == 200:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
