"""Issue 14 item 5: the daemon in a pod, i.e. in another PID namespace than its client.

What the kernel says (Linux 6.18, checked with ``unshare --pid --fork --mount-proc``):
a reader whose PID namespace cannot see the peer (the daemon in a child or sibling
namespace of the client's, as in a pod without ``shareProcessNamespace``) gets pid 0
from SO_PEERCRED (uid and gid still right) and a pidfd from SO_PEERPIDFD whose fdinfo
says ``Pid: 0``; a reader in an ancestor namespace sees the peer's pid in its own
namespace. So the sidecar case is reproduced here by running the daemon in a new PID
namespace (``unshare --pid --fork --mount-proc``) and the client outside it (this test
process, a child forked from it, or a client in a sibling namespace of its own); "one
PID namespace" by entering the daemon's namespace with ``nsenter`` for the client.

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
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import Daemon, run_as
from missing_binary import skip_missing

pytestmark = pytest.mark.integration

OTHER_UID = 12345  # no such user: a uid no selector names
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
UID_ONLY = {"attestation": {"pid_namespace": "uid_only"}}
CHILD_TIMEOUT_S = 60.0


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        skip_missing(tool, "apt-get install util-linux")  # reported at the end of the run
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


_REDEEM = r"""
import http.client, json, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(sys.argv[1])
c = C("localhost", timeout=20)
c.request("POST", "/v1/redeem", body=json.dumps({"resolution_token": sys.argv[2]}),
          headers={"content-type": "application/json"})
r = c.getresponse()
print(json.dumps([r.status, json.loads(r.read())]))
"""


def test_uid_only_token_is_not_redeemed_by_a_visible_process(make_daemon: Any) -> None:
    """A token issued to a uid-only peer is bound to (uid, pid 0): a process the daemon
    can see has a pid, so even under the same uid it cannot redeem it."""
    d = _ns_daemon(make_daemon, UID_ONLY)
    st, auth = d.authorize()
    assert st == 200 and auth["decision"] == "allow", auth
    _need("nsenter")
    proc = subprocess.run(
        ["nsenter", "--target", str(_daemon_host_pid(d)), "--pid", "--mount", "--",
         sys.executable, "-c", _REDEEM, d.socket, auth["resolution_token"]],
        capture_output=True, timeout=CHILD_TIMEOUT_S, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    st, body = json.loads(proc.stdout)
    assert st == 403 and body["error"]["code"] == "peer_mismatch", body


def test_uid_only_peer_holds_no_admin_tier(make_daemon: Any) -> None:
    """The daemon's own uid is owner for a visible process, service at most by uid alone."""
    d = _ns_daemon(make_daemon, UID_ONLY)
    st, body = d.request("GET", "/v1/status")
    assert st == 403 and body["error"]["code"] == "peer_unattested", body
    assert "holds service at most" in body["error"]["message"]


@pytest.mark.parametrize("mode", ["refuse", "uid_only"])
def test_sibling_pid_namespaces_as_in_a_pod(make_daemon: Any, mode: str) -> None:
    """The pod without shareProcessNamespace exactly: daemon and MCP server each in a
    PID namespace of its own (siblings), neither sees the other."""
    d = _ns_daemon(make_daemon, {"attestation": {"pid_namespace": mode}})
    proc = subprocess.run(
        [*UNSHARE, sys.executable, "-c", _CLIENT, d.socket, d.user_token(), "1"],
        capture_output=True, timeout=CHILD_TIMEOUT_S, check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    out = json.loads(proc.stdout)
    assert out["pid"] == 1  # the client is pid 1 of its own namespace
    if mode == "refuse":
        st, body = out["authorize"]
        assert st == 403 and body["error"]["code"] == "peer_unattested", out
        assert "attestation.pid_namespace" in body["error"]["message"]
    else:
        assert out["authorize"][0] == 200 and out["redeem"][0] == 200, out
        assert out["release"][0] == 200, out
        (redeem,) = d.wait_events("mcp.redeem")
        assert redeem["peer"]["attestation"] == "uid-only" and redeem["peer"]["pid"] == 0


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
    nobody = make_daemon({**UID_ONLY, "peers": {"content-api": [{"uid": 65534}]}})
    assert any("$.peers.content-api.0: 65534 is the kernel's overflow id" in w
               for w in _check_config(nobody))
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


# --------------------------------------------------------------------------- Dockerfile, manifest
#
# No container engine or cluster here: these check the files' shape (what they say), not
# that the image builds or the pod runs.

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
POD_YAML = ROOT / "examples" / "kubernetes" / "pod.yaml"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "a continuation at the end of the Dockerfile"
    return out


def test_dockerfile_runs_sidekey_serve_as_non_root_with_nothing_secret_copied() -> None:
    ins = _instructions(DOCKERFILE.read_text())
    stages = [i for i, (word, _) in enumerate(ins) if word == "FROM"]
    assert stages and all(ins[i][1].split()[0] == "python:3.11-slim" for i in stages)
    final = ins[stages[-1]:]
    # The image the daemon runs in switches to a numeric, non-root uid:gid, after the
    # last RUN (so nothing later runs as root) and before the entrypoint.
    users = [rest for word, rest in final if word == "USER"]
    assert len(users) == 1
    uid, _, gid = users[0].partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and gid.isdigit() and int(gid) >= 1000
    words = [word for word, _ in final]
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    # The venv, built in the first stage, and `sidekey serve`.
    assert any(w == "RUN" and "python -m venv /opt/sidekey" in r for w, r in ins[:stages[-1]])
    assert ("COPY", "--from=build /opt/sidekey /opt/sidekey") in final
    entry = json.loads(dict(final)["ENTRYPOINT"]) + json.loads(dict(final)["CMD"])
    assert entry[0] == "/opt/sidekey/bin/sidekey" and entry[1] == "serve"
    # Nothing from the build context but the package sources: no ADD (URLs, archives),
    # COPY of what the package build reads only (pyproject.toml, README.md, src/, and the
    # license and data files the wheel carries: LICENSE, MANIFEST.in, systemd/, examples/,
    # docs/; .dockerignore keeps keys and state out of those); no secret-looking ENV/ARG.
    assert "ADD" not in [w for w, _ in ins]
    copied = [r.split()[:-1] for w, r in ins if w == "COPY" and not r.startswith("--from=")]
    assert sorted(src for srcs in copied for src in srcs) == [
        "LICENSE", "MANIFEST.in", "README.md", "docs/", "examples/", "pyproject.toml", "src/",
        "systemd/"]
    for word, rest in ins:
        if word in ("ENV", "ARG"):  # the names set, e.g. ENV A=1 B=2, ARG NAME
            for name in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)", rest):
                assert not re.search(r"(?i)secret|token|passw|key|credential", name), rest
    ignored = (ROOT / ".dockerignore").read_text().split()
    for pattern in ("**/keys/", "**/state/", "**/*.key", "**/*.enc", ".git/", ".venv/"):
        assert pattern in ignored


def _pod_docs() -> tuple[dict[str, Any], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(POD_YAML.read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    assert sorted(kinds) == ["ConfigMap", "Pod"]
    return kinds["ConfigMap"], kinds["Pod"]


def _load_pod_config(tmp_path: Path, text: str) -> Any:
    from sidekey.config import load_config

    for name in ("mcp-server-registry.yaml", "central-registry.yaml",
                 "agent-tool-mappings.yaml", "rate-limits.yaml"):
        shutil.copy(ROOT / "examples" / "quickstart" / name, tmp_path / name)
    (tmp_path / "sidekey.yaml").write_text(text)
    return load_config(tmp_path / "sidekey.yaml")


def test_pod_manifest_shares_the_pid_namespace_and_the_socket_directory_only(
    tmp_path: Path,
) -> None:
    configmap, pod = _pod_docs()
    spec = pod["spec"]
    assert spec["shareProcessNamespace"] is True
    containers = {c["name"]: c for c in spec["containers"]}
    sidecar, server = containers["sidekey"], containers["content-api"]
    assert sidecar["args"][:1] == ["serve"]
    loaded = _load_pod_config(tmp_path, configmap["data"]["sidekey.yaml"])
    cfg = loaded.config
    socket_dir = str(Path(cfg.listen.socket).parent)

    def mounts(c: dict[str, Any]) -> dict[str, str]:
        return {m["mountPath"]: m["name"] for m in c["volumeMounts"]}

    # One emptyDir, mounted at the socket's directory in both containers; state, config
    # and credentials in the sidecar only.
    volumes = {v["name"]: v for v in spec["volumes"]}
    shared = mounts(sidecar)[socket_dir]
    assert mounts(server) == {socket_dir: shared} and "emptyDir" in volumes[shared]
    assert mounts(sidecar)[str(loaded.state_dir)] != shared
    assert server["env"][0] == {"name": "SIDEKEY_SOCKET", "value": cfg.listen.socket}
    # Two non-root uids, and the peers selector names the MCP server's.
    sc, mc = sidecar["securityContext"], server["securityContext"]
    assert 0 < sc["runAsUser"] != mc["runAsUser"] > 0
    assert [s.uid for s in cfg.peers["content-api"]] == [mc["runAsUser"]]
    assert [s.gid for s in cfg.peers["content-api"]] == [mc["runAsGroup"]]
    assert cfg.attestation.pid_namespace == "refuse"  # the default, not opted in


def test_pod_manifest_uid_only_comment_is_valid_config(tmp_path: Path) -> None:
    """The commented-out opt-in, uncommented, is what the daemon reads as the mode."""
    configmap, _ = _pod_docs()
    text = configmap["data"]["sidekey.yaml"]
    assert "# attestation:\n#   pid_namespace: uid_only" in text
    text = text.replace("# attestation:\n#   pid_namespace: uid_only", "attestation:\n  pid_namespace: uid_only")
    loaded = _load_pod_config(tmp_path, text)
    assert loaded.config.attestation.pid_namespace == "uid_only"
    assert any("$.attestation.pid_namespace: uid_only" in w for w in loaded.warnings)


def test_pod_init_container_gives_the_socket_dir_a_mode_the_daemon_accepts(tmp_path: Path) -> None:
    """kubelet makes an emptyDir 0777, which the daemon refuses as (or above) its socket
    directory; the init container's chmod makes one it accepts."""
    from sidekey.hardening import UnsafePathError, open_socket_dir

    _, pod = _pod_docs()
    (init,) = pod["spec"]["initContainers"]
    command = " ".join(init["command"])
    mode = re.search(r"chmod (\d{4}) /run/sidekey(?:\s|$)", command)
    assert mode is not None, command
    d = tmp_path / "run"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(UnsafePathError):
        os.close(open_socket_dir(d))
    os.chmod(d, int(mode.group(1), 8))
    os.close(open_socket_dir(d))
    assert "FSETID" in init["securityContext"]["capabilities"]["add"]  # keeps the setgid bit


def test_pod_readiness_probe_answers_against_a_real_daemon(daemon: Daemon) -> None:
    _, pod = _pod_docs()
    (sidecar,) = [c for c in pod["spec"]["containers"] if c["name"] == "sidekey"]
    argv = sidecar["readinessProbe"]["exec"]["command"]
    assert argv[:2] == ["/opt/sidekey/bin/python", "-c"]
    code = argv[2].replace("/run/sidekey/sidekey.sock", daemon.socket)
    assert subprocess.run([sys.executable, "-c", code], timeout=CHILD_TIMEOUT_S,
                          check=False).returncode == 0
    daemon.kill()
    assert subprocess.run([sys.executable, "-c", code], timeout=CHILD_TIMEOUT_S,
                          capture_output=True, check=False).returncode != 0
