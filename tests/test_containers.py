"""Issue 14 item 5: the daemon in a pod, i.e. in another PID namespace than its client.

What the kernel says (Linux 6.18, checked with ``unshare --pid --fork --mount-proc``):
a reader whose PID namespace cannot see the peer (the daemon in a child or sibling
namespace of the client's, as in a pod without ``shareProcessNamespace``) gets pid 0
from SO_PEERCRED (uid and gid still right) and a pidfd from SO_PEERPIDFD whose fdinfo
says ``Pid: 0``; a reader in an ancestor namespace sees the peer's pid in its own
namespace. So the sidecar case is reproduced here by running the daemon in a new PID
namespace (``unshare --pid --fork --mount-proc``) and the client (this test process,
or a child forked from it) outside it; "one PID namespace" by entering the daemon's
namespace with ``nsenter`` for the client.

1. By default such a peer is answered (no connection reset), as an anonymous peer:
   every request above anonymous gets 403 ``peer_unattested`` whose message names
   ``attestation.pid_namespace`` and ``shareProcessNamespace``, audited as
   ``peer.rejected`` with ``attestation: "uid-only"``.
2. With ``attestation.pid_namespace: uid_only`` a uid-only selector attests it and
   authorize + redeem + release work; another uid is refused; a selector with ``exe``
   never matches it (it does for a client in the daemon's namespace).
3. In one PID namespace (``shareProcessNamespace: true``) the daemon attests in full
   (pidfd, exe), as on a host.

Tests need root and util-linux ``unshare``/``nsenter`` (present here; under CI a missing
one fails the test instead of skipping it). Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness import Daemon, run_as

pytestmark = pytest.mark.integration

OTHER_UID = 12345  # no such user: a uid no selector names
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
UID_ONLY = {"attestation": {"pid_namespace": "uid_only"}}
CHILD_TIMEOUT_S = 60.0


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} (util-linux) is not installed (CI is set: not skipping)")
        pytest.skip(f"{tool} (util-linux) is not installed")
    if os.geteuid() != 0:
        pytest.skip("creating PID namespaces needs root")


def _ns_daemon(make_daemon: Any, overrides: dict[str, Any] | None = None) -> Daemon:
    """A started daemon that is pid 1 of a new PID namespace (and a mount namespace
    with its own /proc): this test process is in no namespace it can see."""
    _need("unshare")
    d: Daemon = make_daemon(overrides, command_prefix=UNSHARE)
    return d.start()


def _daemon_host_pid(d: Daemon) -> int:
    """The daemon's pid in our namespace: the child unshare forked."""
    assert d.proc is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kids = Path(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children").read_text().split()
        if kids:
            return int(kids[0])
        time.sleep(0.05)
    raise AssertionError("unshare has no child")


# A client run inside the daemon's PID and mount namespaces (nsenter): stdlib only.
_CLIENT = r"""
import http.client, json, os, socket, sys
sock_path, token, redeem = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(sock_path)
c = C("localhost", timeout=20)
def call(path, body):
    c.request("POST", path, body=json.dumps(body), headers={"content-type": "application/json"})
    r = c.getresponse()
    return r.status, json.loads(r.read())
out = {"pid": os.getpid()}
out["authorize"] = call("/v1/authorize", {
    "server": "content-api", "tool": "create_article", "agent_id": "content-writer",
    "session_id": "s1", "arguments": {"title": "hello"}, "user_token": token})
if redeem and out["authorize"][0] == 200:
    st, lease = call("/v1/redeem", {"resolution_token": out["authorize"][1]["resolution_token"]})
    out["redeem"] = [st, lease]
    if st == 200:
        out["release"] = call("/v1/release", {"lease_id": lease["lease_id"], "status": "success"})
print(json.dumps(out))
"""


def _client_in_daemon_namespace(d: Daemon, *, redeem: bool = True) -> dict[str, Any]:
    _need("nsenter")
    pid = _daemon_host_pid(d)
    proc = subprocess.run(
        ["nsenter", "--target", str(pid), "--pid", "--mount", "--",
         sys.executable, "-c", _CLIENT, d.socket, d.user_token(), "1" if redeem else "0"],
        capture_output=True, timeout=CHILD_TIMEOUT_S, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def _full_call(d: Daemon) -> dict[str, Any]:
    """authorize, redeem, release from this process (outside the daemon's namespace)."""
    st, auth = d.authorize()
    out: dict[str, Any] = {"authorize": [st, auth]}
    if st != 200:
        return out
    st, lease = d.request("POST", "/v1/redeem", {"resolution_token": auth["resolution_token"]})
    out["redeem"] = [st, lease]
    if st == 200:
        out["release"] = list(d.request("POST", "/v1/release",
                                        {"lease_id": lease["lease_id"], "status": "success"}))
    return out


# --------------------------------------------------------------------------- default: refused


def test_pid_not_visible_is_refused_by_default_with_an_answer_and_an_audit_event(
    make_daemon: Any,
) -> None:
    d = _ns_daemon(make_daemon)
    # Anonymous requests are served as to any anonymous peer (probes, version checks)...
    assert d.request("GET", "/v1/health")[0] in (200, 503)
    # ...and every request above anonymous is answered 403, not reset: the client reads
    # a message that says what to change.
    st, body = d.authorize()
    assert st == 403, body
    err = body["error"]
    assert err["code"] == "peer_unattested"
    assert "attestation.pid_namespace" in err["message"]
    assert "shareProcessNamespace" in err["message"]
    assert err["details"]["pid_namespace"] == "refuse"
    raw = d.raw(b"POST /v1/release HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: 37\r\nconnection: close\r\n\r\n"
                b'{"lease_id": "lse_x", "status": "ok"}', timeout=20)
    assert raw.startswith(b"HTTP/1.1 403 "), raw[:200]
    assert b"peer_unattested" in raw
    events = d.wait_events("peer.rejected", 2)
    assert len(events) >= 2
    for e in events[:2]:
        assert e["error"]["code"] == "peer_unattested"
        assert e["peer"]["attestation"] == "uid-only" and e["peer"]["pid"] == 0
        assert e["peer"]["uid"] == 0
    assert not d.events_of("mcp.authorize")


# --------------------------------------------------------------------------- uid_only mode


def test_uid_only_mode_attests_by_uid_and_a_full_call_works(make_daemon: Any) -> None:
    d = _ns_daemon(make_daemon, UID_ONLY)
    out = _full_call(d)
    assert out["authorize"][0] == 200 and out["authorize"][1]["decision"] == "allow", out
    assert out["redeem"][0] == 200, out
    assert out["redeem"][1]["secrets"] == {"CONTENT_API_KEY": d.secrets["content-api/write-key"]}
    assert out["release"][0] == 200, out
    (redeem,) = d.wait_events("mcp.redeem")
    assert redeem["peer"]["attestation"] == "uid-only"
    assert redeem["peer"]["pid"] == 0 and redeem["peer"]["exe"] is None
    assert len(d.wait_events("mcp.tool_call")) == 1


def test_uid_only_mode_refuses_another_uid(make_daemon: Any) -> None:
    d = _ns_daemon(make_daemon, UID_ONLY)

    def child(d: Daemon) -> list[Any]:
        return list(d.authorize())

    st, body = run_as(d, OTHER_UID, OTHER_UID, child)
    assert st == 403, body
    assert body["error"]["code"] == "peer_unattested"
    assert f"uid {OTHER_UID}" in body["error"]["message"]
    assert any(e["peer"]["uid"] == OTHER_UID and e["error"]["code"] == "peer_unattested"
               for e in d.wait_events("peer.rejected"))
    assert not d.events_of("mcp.authorize")


def test_uid_only_mode_exe_selector_never_matches(make_daemon: Any) -> None:
    exe = os.path.realpath(sys.executable)
    peers = {"content-api": [{"uid": 0, "exe": exe}], "analytics-db": [{"uid": 0, "exe": exe}]}
    d = _ns_daemon(make_daemon, {**UID_ONLY, "peers": peers})
    st, body = d.authorize()
    assert st == 403 and body["error"]["code"] == "peer_unattested", body
    # The selector is right: a client in the daemon's namespace running that file matches.
    inside = _client_in_daemon_namespace(d, redeem=False)
    assert inside["authorize"][0] == 200, inside


def test_uid_only_peer_holds_no_admin_tier(make_daemon: Any) -> None:
    """The daemon's own uid is owner for a visible process, service at most by uid alone."""
    d = _ns_daemon(make_daemon, UID_ONLY)
    st, body = d.request("GET", "/v1/status")
    assert st == 403 and body["error"]["code"] == "peer_unattested", body
    assert "holds service at most" in body["error"]["message"]


# --------------------------------------------------------------------------- one PID namespace


def test_one_pid_namespace_attests_in_full(make_daemon: Any) -> None:
    """shareProcessNamespace: true: daemon and client in one (new) PID namespace."""
    d = _ns_daemon(make_daemon)
    out = _client_in_daemon_namespace(d)
    assert out["authorize"][0] == 200, out
    assert out["redeem"][0] == 200 and out["release"][0] == 200, out
    (redeem,) = d.wait_events("mcp.redeem")
    assert redeem["peer"]["attestation"] == "pidfd"
    assert redeem["peer"]["pid"] == out["pid"] > 1  # its pid in that namespace
    assert redeem["peer"]["exe"] is not None


# --------------------------------------------------------------------------- check-config


def _check_config(d: Daemon) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "sidekey", "check-config", "--json", "--config", str(d.config_path)],
        capture_output=True, timeout=CHILD_TIMEOUT_S, check=False, cwd=d.root,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    warnings: list[str] = json.loads(proc.stdout)["warnings"]
    return warnings


def test_check_config_warns_while_uid_only_is_on(make_daemon: Any) -> None:
    exe = os.path.realpath(sys.executable)
    on = make_daemon({**UID_ONLY, "peers": {"content-api": [{"uid": "self"}],
                                            "analytics-db": [{"uid": 0, "exe": exe}]}})
    warnings = _check_config(on)
    assert any("$.attestation.pid_namespace: uid_only" in w for w in warnings), warnings
    assert any("$.peers.analytics-db.0: uses exe" in w for w in warnings), warnings
    assert any("$.peers.analytics-db: no selector of uid/user/gid/group" in w for w in warnings)
    off = make_daemon()
    assert not any("pid_namespace" in w for w in _check_config(off))


def test_config_refuses_an_unknown_mode(make_daemon: Any) -> None:
    d = make_daemon({"attestation": {"pid_namespace": "trust"}})
    proc = subprocess.run(
        [sys.executable, "-m", "sidekey", "check-config", "--config", str(d.config_path)],
        capture_output=True, timeout=CHILD_TIMEOUT_S, check=False, cwd=d.root,
    )
    assert proc.returncode != 0
    assert b"$.attestation.pid_namespace" in proc.stderr + proc.stdout


def test_uid_only_connection_dies_with_its_process(make_daemon: Any) -> None:
    """What the re-check still means without a pid: the connecting process's pidfd (the
    one pidfd operation that works across PID namespaces is poll) says it exited, so a
    socket handed on (SCM_RIGHTS) after its opener exited is refused (peer_gone)."""
    d = _ns_daemon(make_daemon, UID_ONLY)
    token = d.user_token()
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            left.close()
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket)
            socket.send_fds(right, [b"x"], [s.fileno()])
        finally:
            os._exit(0)
    right.close()
    with left:
        left.settimeout(CHILD_TIMEOUT_S)
        _, fds, _, _ = socket.recv_fds(left, 1, 1)
    os.waitpid(pid, 0)  # the opener is gone (reaped)
    handed = socket.socket(fileno=fds[0])
    with handed:
        handed.settimeout(CHILD_TIMEOUT_S)
        body = json.dumps({"server": "content-api", "tool": "create_article",
                           "agent_id": "content-writer", "session_id": "s1",
                           "arguments": {"title": "hello"}, "user_token": token}).encode()
        handed.sendall(b"POST /v1/authorize HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                       b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        raw = b""
        while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
            chunk = handed.recv(65536)
            if not chunk:
                break
            raw += chunk
    assert raw.startswith(b"HTTP/1.1 403 "), raw[:300]
    assert b'"peer_gone"' in raw
    assert not d.events_of("mcp.authorize")


# --------------------------------------------------------------------------- pure matching


def _uid_only_ident(uid: int = 1000, gid: int = 1000) -> Any:
    from sidekey.peer import PeerIdentity

    return PeerIdentity(pid=0, uid=uid, gid=gid, user=None, group=None, supplementary_gids=(),
                        supplementary_groups=(), exe=None, unit=None, start_time=0,
                        attestation="uid-only")


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ({"uid": 1000}, True),
        ({"uid": 1000, "gid": 1000}, True),
        ({"gid": 1000}, True),
        ({"uid": 1001}, False),
        ({"uid": 1000, "exe": "/usr/bin/python3"}, False),
        ({"uid": 1000, "unit": "mcp.service"}, False),
        ({"uid": 1000, "supplementary_group": "mcp"}, False),
        ({"uid": 1000, "exe_sha256": "0" * 64}, False),
    ],
)
def test_uid_only_identity_matches_uid_gid_selectors_only_in_the_mode(
    selector: dict[str, Any], matches: bool,
) -> None:
    from sidekey.config import PeerSelector
    from sidekey.peer import selector_matches, tier_of

    sel = PeerSelector(**selector)
    ident = _uid_only_ident()
    assert selector_matches(sel, ident, daemon_uid=0, daemon_gid=0, uid_only=True) is matches
    assert selector_matches(sel, ident, daemon_uid=0, daemon_gid=0) is False  # default: off
    from sidekey.config import RbacConfig, RbacEntry

    owner_by_uid = RbacConfig(owner=RbacEntry(uids=[1000]), admin=RbacEntry(uids=[1000]))
    assert tier_of(owner_by_uid, ident, daemon_uid=1000, daemon_gid=0, is_service=True) == "service"
    assert tier_of(owner_by_uid, ident, daemon_uid=1000, daemon_gid=0, is_service=False) == "anonymous"
