"""Issue 9, items 1-3: identity attacks against a real daemon.

1. A connection keeps the identity of the process that opened it only while that
   process is alive and unchanged: a socket handed to another process (SCM_RIGHTS)
   after its opener exited, or an opener that setuid()s, is refused on the next
   request (403 peer_gone / peer_changed, audited as peer.rejected) before anything
   is minted, reloaded, rotated, counted or held for approval.
2. An ``exe`` selector is not satisfied by a process that made the configured path
   name its own file in a private mount namespace (user namespace + tmpfs).
3. A ``unit`` selector is not satisfied by a cgroup outside the system manager's
   slices (a hand-made/delegated subtree named like the unit).

Every child process is forked from the test (root) and drops to another uid itself;
every wait on a child or a pipe is bounded.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from harness import Daemon, run_as

pytestmark = pytest.mark.integration

NOBODY = pwd.getpwnam("nobody")
ATTACKER_UID = 4321  # a uid with no entry anywhere in the config (only "in the clients group")
WAIT_S = 20.0  # bound on every wait for a child or a pipe
WRITE_KEY = "content-api/write-key"
ROTATE_PATH = "/v1/admin/secrets/" + WRITE_KEY.replace("/", "%2F") + "/rotate"


# --------------------------------------------------------------------------- helpers


def _http(sock: socket.socket, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 request on an already connected socket (kept open for the next
    unless the daemon answers ``connection: close``; then the socket is closed, and
    the body says so under ``"closed"``)."""
    conn = http.client.HTTPConnection("sidekey", timeout=WAIT_S)
    conn.sock = sock
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"} if data is not None else {}
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    out = json.loads(raw) if raw else {}
    if (resp.getheader("connection") or "").lower() == "close":
        out["closed"] = True
    return resp.status, out


def _drop_to(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _drop_keeping_root(uid: int, gid: int) -> None:
    """Effective and real ids become uid/gid (what the daemon attests); the saved uid
    stays root, so that this process (or its child) can change its ids again later."""
    os.setgroups([])
    os.setresgid(gid, gid, 0)
    os.setresuid(uid, uid, 0)


def _connect(d: Daemon, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(WAIT_S)
        sock.connect(d.socket)
        socks.append(sock)
    return socks


def _read_all(fd: int, deadline: float) -> bytes:
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("timed out waiting for a child's result")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk


def _wait_reaped(pid: int, deadline: float) -> int:
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not exit in time")


def _report(fn: Callable[[], Any], label: str = "") -> NoReturn:
    """In a forked child: write ``fn()``'s result to stdout as JSON (``{"child_error":
    label + repr(exc)}`` if it raised), then exit whatever happened."""
    try:
        os.write(1, json.dumps(fn()).encode())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(1, json.dumps({"child_error": label + repr(exc)}).encode())
    finally:
        os._exit(0)


def in_child(
    fn: Callable[[], Any], *, label: str = "", parent: Callable[[int], None] | None = None,
) -> Any:
    """Fork; the child runs ``fn()`` with its stdout on a pipe and reports as
    ``_report`` does (or, if ``fn`` execs, the program's output is the result; a
    grandchild that inherits the stdout may report instead). The test process runs
    ``parent(child_pid)`` if given, reads the child's stdout to its end and returns it
    decoded from JSON. Reading and reaping are bounded by WAIT_S (then the child is
    killed and the test fails)."""
    r, w = os.pipe()
    deadline = time.monotonic() + WAIT_S
    pid = os.fork()
    if pid == 0:

        def run() -> Any:
            os.close(r)
            os.dup2(w, 1)
            os.close(w)
            return fn()

        _report(run, label)
    os.close(w)
    try:
        if parent is not None:
            parent(pid)
        data = _read_all(r, deadline)
    finally:
        os.close(r)
        _wait_reaped(pid, deadline + 5)
    return json.loads(data)


def handed_over(
    d: Daemon,
    opener: Callable[[list[socket.socket]], Any],
    receiver: Callable[[list[socket.socket]], Any],
    *,
    connections: int,
    opener_ids: tuple[int, int],
    receiver_ids: tuple[int, int],
) -> dict[str, Any]:
    """Connections opened by one process and used by another.

    Process A (``opener_ids``) opens ``connections`` connections, runs
    ``opener(socks)`` (proving what they may do), forks B, passes the connected
    sockets to B with SCM_RIGHTS, closes its own copies and exits. B drops to
    ``receiver_ids``, waits until A is gone (B is reparented), then runs
    ``receiver(socks)``. Returns ``{"opener": ..., "opener_pid": ..., "receiver": ...}``
    (``child_error`` on failure). Each refused connection is closed by the daemon, so
    an attacker needs one handed-over connection per attempt.
    """
    for server in ("content-api", "analytics-db"):
        d.user_token(server)  # minted while the issuer key is readable

    def a() -> Any:  # the opener
        _drop_keeping_root(*opener_ids)  # so that B can still become the receiver
        socks = _connect(d, connections)
        first = opener(socks)
        pass_a, pass_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        me = os.getpid()

        def b() -> Any:  # the receiver
            pass_a.close()
            for sock in socks:
                sock.close()  # inherited by fork; B uses only what it is sent
            os.setresuid(0, 0, 0)  # allowed: the saved uid is root
            _drop_to(*receiver_ids)
            pass_b.settimeout(WAIT_S)
            _, fds, _, _ = socket.recv_fds(pass_b, 16, connections)
            assert len(fds) == connections, fds
            got = [socket.socket(fileno=fd) for fd in fds]
            for sock in got:
                sock.settimeout(WAIT_S)
            until = time.monotonic() + WAIT_S
            while os.getppid() == me and time.monotonic() < until:
                time.sleep(0.005)  # A exits right after the hand-over
            assert os.getppid() != me, "the opener did not exit"
            return {"opener": first, "opener_pid": me, "receiver": receiver(got)}

        if os.fork() == 0:
            _report(b)  # on the stdout inherited from A: B reports for both
        pass_b.close()
        socket.send_fds(pass_a, [b"s"], [sock.fileno() for sock in socks])
        for sock in socks:
            sock.close()  # the receiver holds the only copies now
        os._exit(0)

    result: dict[str, Any] = in_child(a, label="opener: ")
    return result


def nobody_serves_content_api(make_daemon: Any, *, seed_limits: bool = False) -> Daemon:
    """A started daemon whose content-api is any process of nobody's and whose
    publish_article holds every call for a human's approval."""
    d: Daemon = make_daemon({"peers": {"content-api": [{"uid": NOBODY.pw_uid}]}}, seed_limits=seed_limits)
    path = d.root / "rate-limits.yaml"
    limits = yaml.safe_load(path.read_text())
    limits["limits"]["per_tool"].setdefault("publish_article", {})["requires_human_approval"] = True
    path.write_text(yaml.safe_dump(limits))
    return d.start()


def rejected(d: Daemon, code: str) -> list[dict[str, Any]]:
    return [e for e in d.events_of("peer.rejected") if e.get("error", {}).get("code") == code]


# --------------------------------------------------------------------------- item 1: hand-over


def test_owner_connection_handed_to_nobody_after_the_owner_exited_is_refused(daemon: Daemon) -> None:
    """A root (owner-tier) process connects, shows the connection is owner (GET
    /v1/status 200), passes it to a child that dropped to nobody, and exits. The child
    tries to mint a token, reload the config and rotate a secret to a value of its
    choice: each 403 peer_gone, audited as peer.rejected; nothing minted, reloaded or
    rotated, and the secret still has its old value."""
    d = daemon
    chosen = f"SECRET-attacker-{uuid.uuid4().hex}"

    def opener(socks: list[socket.socket]) -> Any:
        return [_http(sock, "GET", "/v1/status")[0] for sock in socks]

    def receiver(socks: list[socket.socket]) -> Any:
        token = {"server": "content-api", "tool": "create_article", "user": "mallory"}
        return {
            "uid": os.geteuid(),
            "tokens": _http(socks[0], "POST", "/v1/tokens", token),
            "reload": _http(socks[1], "POST", "/v1/admin/reload"),
            "rotate": _http(socks[2], "POST", ROTATE_PATH, {"value": chosen}),
            "status": _http(socks[3], "GET", "/v1/status"),
        }

    got = handed_over(d, opener, receiver, connections=4, opener_ids=(0, 0),
                      receiver_ids=(NOBODY.pw_uid, NOBODY.pw_gid))
    assert "child_error" not in got, got
    assert got["opener"] == [200] * 4  # owner-tier connections while their opener lived
    out = got["receiver"]
    assert out["uid"] == NOBODY.pw_uid
    for name in ("tokens", "reload", "rotate", "status"):
        status, body = out[name]
        assert status == 403 and body["error"]["code"] == "peer_gone", (name, body)
        assert body.get("closed"), body  # one refusal per connection
    gone = rejected(d, "peer_gone")
    assert len(gone) == 4, gone
    assert {e["peer"]["pid"] for e in gone} == {got["opener_pid"]}
    assert {e["path"] for e in gone} == {"/v1/tokens", "/v1/admin/reload", ROTATE_PATH, "/v1/status"}
    assert d.events_of("token.issued") == []
    assert d.events_of("secret.rotated") == []
    assert [e for e in d.events_of("config.reloaded") if e.get("extra", {}).get("source") == "api"] == []
    # The secret still has its old value: a real call as the owner gets it.
    status, auth = d.authorize("content-api", "create_article")
    assert status == 200, auth
    status, lease = d.request("POST", "/v1/redeem", {"resolution_token": auth["resolution_token"]})
    assert status == 200, lease
    assert lease["secrets"] == {"CONTENT_API_KEY": d.secrets[WRITE_KEY]}
    assert chosen.encode() not in d.everything_written()


def test_service_connection_handed_over_after_the_server_exited_gets_no_authorize(
    make_daemon: Any,
) -> None:
    """content-api runs as nobody. Its connection is handed to another uid after the
    server exited: /v1/authorize is 403 peer_gone (audited with the dead server's pid)
    and the connection closed; no quota is counted for the user (a real content-api
    process then gets all 5 calls below the seed's approval threshold allowed), no
    approval is opened (not even for a tool that holds every call)."""
    d = nobody_serves_content_api(make_daemon, seed_limits=True)
    token = d.user_token("content-api")

    def call(tool: str) -> dict[str, Any]:
        return {"server": "content-api", "tool": tool, "agent_id": "content-writer",
                "session_id": "s1", "arguments": {"title": "x"}, "user_token": token}

    def opener(socks: list[socket.socket]) -> Any:
        # The server's own connections are attested: an unknown tool is a policy answer
        # (not peer_mismatch), and nothing is counted for it.
        out = []
        for sock in socks:
            status, body = _http(sock, "POST", "/v1/authorize", call("no_such_tool"))
            out.append([status, body.get("error", {}).get("code")])
        return out

    def receiver(socks: list[socket.socket]) -> Any:
        return {
            "create": _http(socks[0], "POST", "/v1/authorize", call("create_article")),
            "publish": _http(socks[1], "POST", "/v1/authorize", call("publish_article")),
        }

    got = handed_over(d, opener, receiver, connections=2,
                      opener_ids=(NOBODY.pw_uid, NOBODY.pw_gid),
                      receiver_ids=(ATTACKER_UID, ATTACKER_UID))
    assert "child_error" not in got, got
    assert all(code != "peer_mismatch" for _, code in got["opener"]), got["opener"]
    out = got["receiver"]
    for name in ("create", "publish"):
        status, body = out[name]
        assert status == 403 and body["error"]["code"] == "peer_gone", (name, body)
        assert body.get("closed"), body
    gone = rejected(d, "peer_gone")
    assert len(gone) == 2 and {e["peer"]["pid"] for e in gone} == {got["opener_pid"]}
    assert d.events_of("approval.requested") == []
    assert [e for e in d.events_of("mcp.authorize") if e.get("tool") != "no_such_tool"] == []
    status, listed = d.request("GET", "/v1/approvals?state=all")
    assert status == 200 and listed["approvals"] == []
    # Nothing was counted for alice: the real server's next 5 create_article calls are
    # all below requires_approval_above (5), so none is held (with the attacker's call
    # counted, the fifth would be the sixth, and held).
    statuses = run_as(d, NOBODY.pw_uid, NOBODY.pw_gid, lambda dd: [
        dd.authorize("content-api", "create_article")[0] for _ in range(5)])
    assert statuses == [200] * 5, statuses


def test_process_that_setuids_after_connecting_is_peer_changed(daemon: Daemon) -> None:
    """Same process, still alive: connects as root (owner), then setuid(nobody). The
    next requests are 403 peer_changed, audited; nothing is minted."""
    d = daemon

    def connect_then_setuid() -> Any:
        socks = _connect(d, 2)
        before = [_http(sock, "GET", "/v1/status")[0] for sock in socks]
        _drop_to(NOBODY.pw_uid, NOBODY.pw_gid)
        token = {"server": "content-api", "tool": "create_article", "user": "mallory"}
        return {"before": before, "tokens": _http(socks[0], "POST", "/v1/tokens", token),
                "status": _http(socks[1], "GET", "/v1/status"), "pid": os.getpid()}

    got = in_child(connect_then_setuid)
    assert "child_error" not in got, got
    assert got["before"] == [200, 200]
    for name in ("tokens", "status"):
        status, body = got[name]
        assert status == 403 and body["error"]["code"] == "peer_changed", (name, body)
        assert body.get("closed"), body
    changed = rejected(d, "peer_changed")
    assert len(changed) == 2 and {e["peer"]["pid"] for e in changed} == {got["pid"]}
    assert changed[0]["peer"]["uid"] == 0  # the identity the connection was opened with
    assert d.events_of("token.issued") == []


def test_approval_long_poll_rechecks_before_answering(make_daemon: Any) -> None:
    """A service waits on its held call; while it waits its process drops to another
    uid (it must not learn the verdict under the server's identity): the answer is 403
    peer_changed, not the approval."""
    d = nobody_serves_content_api(make_daemon)
    token = d.user_token("content-api")

    def wait_then_setuid() -> Any:
        # Saved uid root lets this process change its effective uid later, mid-poll.
        _drop_keeping_root(NOBODY.pw_uid, NOBODY.pw_gid)
        [sock] = _connect(d, 1)
        status, held = _http(sock, "POST", "/v1/authorize", {
            "server": "content-api", "tool": "publish_article", "agent_id": "content-writer",
            "session_id": "s1", "arguments": {"a": 1}, "user_token": token})
        assert status == 202, held

        def switch(*_: Any) -> None:
            os.seteuid(0)  # allowed: the saved uid is root
            os.setresuid(NOBODY.pw_uid, ATTACKER_UID, 0)

        signal.signal(signal.SIGALRM, switch)
        signal.setitimer(signal.ITIMER_REAL, 0.5)  # during the 3 s wait below
        answer = _http(sock, "GET", f"/v1/approvals/{held['approval_id']}/wait?timeout=3")
        return {"answer": answer, "euid": os.geteuid()}

    got = in_child(wait_then_setuid)
    assert "child_error" not in got, got
    assert got["euid"] == ATTACKER_UID
    status, body = got["answer"]
    assert status == 403 and body["error"]["code"] == "peer_changed", body
    assert rejected(d, "peer_changed")


# --------------------------------------------------------------------------- item 2: exe and mount namespaces

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
PR_SET_DUMPABLE = 4
_libc = ctypes.CDLL(None, use_errno=True)

# What the attacker's (and the control's) program does once it runs as the configured
# executable: one authorize on a fresh connection; prints [status, body].
CALL_SCRIPT = r"""
import http.client, json, os, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(os.environ["SK_SOCKET"])
c = C("sidekey", timeout=20)
body = {"server": "content-api", "tool": "create_article", "agent_id": "content-writer",
        "session_id": "s1", "arguments": {"title": "x"}, "user_token": os.environ["SK_TOKEN"]}
c.request("POST", "/v1/authorize", body=json.dumps(body).encode(),
          headers={"content-type": "application/json"})
r = c.getresponse()
print(json.dumps([r.status, json.loads(r.read()), os.geteuid(), os.readlink("/proc/self/exe")]))
"""


def _python_for_nobody() -> str:
    """A Python interpreter that nobody can run (the test's own may live under /root)."""
    candidates = [os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    for exe in candidates:
        if not os.path.exists(exe):
            continue
        try:
            probe = subprocess.run([exe, "-c", "pass"], user=NOBODY.pw_uid, group=NOBODY.pw_gid,
                                   extra_groups=[], capture_output=True, timeout=WAIT_S, check=False)
        except PermissionError:
            continue
        if probe.returncode == 0:
            return os.path.realpath(exe)
    pytest.fail(f"no Python interpreter nobody can run among {candidates}")


def _unprivileged_userns_works() -> bool:
    def probe() -> bool:
        _drop_to(NOBODY.pw_uid, NOBODY.pw_gid)
        return bool(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) == 0)

    return in_child(probe) is True


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _run_script(d: Daemon, exe: str, prepare: Callable[[], None]) -> Any:
    """Fork; ``prepare()`` in the child (namespaces, mounts, uid), then exec ``exe``
    (a Python) with CALL_SCRIPT; return what it printed."""
    token = d.user_token("content-api")

    def run() -> None:
        prepare()
        env = {"SK_SOCKET": d.socket, "SK_TOKEN": token, "PATH": "/usr/bin:/bin"}
        os.execve(exe, [exe, "-I", "-c", CALL_SCRIPT], env)

    return in_child(run)


@pytest.fixture
def exe_daemon(make_daemon: Any) -> Iterator[tuple[Daemon, str, str]]:
    """A daemon whose content-api is "whatever runs <root>/bin/mcp-content", a copy of
    a Python that only root may run (0700): nobody cannot run the real one."""
    python = _python_for_nobody()
    d: Daemon = make_daemon()
    bin_dir = d.root / "bin"
    bin_dir.mkdir()
    os.chmod(bin_dir, 0o755)
    exe = bin_dir / "mcp-content"
    shutil.copy(python, exe)
    os.chmod(exe, 0o700)
    d.config["peers"] = {"content-api": [{"exe": str(exe)}], "analytics-db": [{"uid": "self"}]}
    d.config_path.write_text(yaml.safe_dump(d.config))
    d.start()
    yield d, str(exe), python


def test_exe_selector_is_not_satisfied_from_a_private_mount_namespace(
    exe_daemon: tuple[Daemon, str, str],
) -> None:
    """nobody creates a user and mount namespace, mounts a tmpfs over the configured
    executable's directory, copies a Python there under the configured name and runs
    it: /proc/<pid>/exe shows exactly the configured path, but the file is not the
    configured one. Not attested as content-api (nor anything else): authorize 403
    peer_rejected, audited as peer.rejected. (Root running the real file is attested, as a control.)"""
    d, exe, python = exe_daemon
    control = _run_script(d, exe, lambda: None)
    assert "child_error" not in control, control
    assert control[0] == 200, control  # the selector works for the real executable

    bin_dir = str(Path(exe).parent).encode()
    unprivileged = _unprivileged_userns_works()

    def attacker() -> None:
        if unprivileged:  # what any local user can do where user namespaces are allowed
            _drop_to(NOBODY.pw_uid, NOBODY.pw_gid)
            _libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # so it may write its own uid_map
            _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare")
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"0 {NOBODY.pw_uid} 1")
            Path("/proc/self/gid_map").write_text(f"0 {NOBODY.pw_gid} 1")
        else:  # the kernel forbids that: root builds the same namespace, then drops
            _check(_libc.unshare(CLONE_NEWNS), "unshare")
            _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount private")
        _check(_libc.mount(b"tmpfs", bin_dir, b"tmpfs", 0, None), "mount tmpfs")
        shutil.copy(python, exe)
        os.chmod(exe, 0o755)
        if not unprivileged:
            _drop_to(NOBODY.pw_uid, NOBODY.pw_gid)

    got = _run_script(d, exe, attacker)
    assert "child_error" not in got, got
    status, body, euid, seen_exe = got
    assert seen_exe == exe and euid in (0, NOBODY.pw_uid)  # the attack is set up as described
    # Attested as no server, so the process holds no tier: refused before authorize.
    assert status == 403 and body["error"]["code"] == "peer_rejected", body
    [event] = [e for e in rejected(d, "peer_rejected") if e["peer"]["uid"] == NOBODY.pw_uid]
    assert event["peer"]["exe"] == exe and event["path"] == "/v1/authorize"
    assert os.stat(exe).st_mode & 0o777 == 0o700  # the host's file was never touched


def test_exe_selector_still_matches_the_real_file_from_another_mount_namespace(
    exe_daemon: tuple[Daemon, str, str],
) -> None:
    """The rule is "the very file", not "the same namespace": a process in its own
    mount namespace (as a systemd unit with ProtectSystem=/PrivateTmp= is) that runs
    the configured file itself is attested."""
    d, exe, _ = exe_daemon

    def own_namespace() -> None:
        _check(_libc.unshare(CLONE_NEWNS), "unshare")
        _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount private")

    got = _run_script(d, exe, own_namespace)
    assert "child_error" not in got, got
    assert got[0] == 200, got


# --------------------------------------------------------------------------- item 3: unit and cgroups


def _cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


@pytest.fixture
def cgroup2() -> Iterator[Path]:
    root = _cgroup2_root()
    probe = None if root is None else root / f"sk-probe-{uuid.uuid4().hex[:8]}"
    try:
        if probe is None:
            raise OSError("no cgroup2 mount")
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"cgroup2 is not writable here ({exc}); CI is set: not skipping")
        pytest.skip(f"cgroup2 is not writable here: {exc}")
    assert root is not None
    yield root


def _in_cgroup(d: Daemon, cgroup: Path, uid: int, gid: int) -> Any:
    """Fork a child, move it into ``cgroup``, let it drop to uid/gid and authorize as
    content-api; return [status, body, its /proc/self/cgroup line]."""
    token = d.user_token("content-api")
    go_r, go_w = os.pipe()

    def child() -> Any:
        os.close(go_w)
        ready, _, _ = select.select([go_r], [], [], WAIT_S)
        assert ready and os.read(go_r, 1) == b"g", "not moved into the cgroup"
        _drop_to(uid, gid)
        cg = [x for x in Path("/proc/self/cgroup").read_text().splitlines() if x.startswith("0::")]
        status, body = d.authorize("content-api", "create_article", user_token=token)
        return [status, body, cg]

    def move(pid: int) -> None:
        os.close(go_r)
        (cgroup / "cgroup.procs").write_text(str(pid))
        os.write(go_w, b"g")

    try:
        return in_child(child, parent=move)
    finally:
        os.close(go_w)


def test_unit_selector_ignores_a_cgroup_outside_the_system_slices(
    make_daemon: Any, cgroup2: Path,
) -> None:
    """content-api is "unit mcp-content-api.service". A process (dropped to nobody)
    placed in a hand-made cgroup /<dir>/mcp-content-api.service (what a delegated
    subtree allows its owner to create) is not attested: 403 peer_rejected, audited.
    The same name under a *.slice (which only root can create at the top) is, as a
    control."""
    d: Daemon = make_daemon({"peers": {"content-api": [{"unit": "mcp-content-api.service"}]}})
    d.start()
    tag = uuid.uuid4().hex[:8]
    delegated = cgroup2 / f"sk-delegated-{tag}"
    slice_ = cgroup2 / f"sk-test-{tag}.slice"
    made: list[Path] = []
    try:
        for parent in (delegated, slice_):
            parent.mkdir()
            made.append(parent)
            (parent / "mcp-content-api.service").mkdir()
            made.append(parent / "mcp-content-api.service")
        got = _in_cgroup(d, delegated / "mcp-content-api.service", NOBODY.pw_uid, NOBODY.pw_gid)
        assert "child_error" not in got, got
        status, body, cg = got
        assert cg == [f"0::/{delegated.name}/mcp-content-api.service"], cg
        assert status == 403 and body["error"]["code"] == "peer_rejected", body
        [event] = rejected(d, "peer_rejected")
        assert event["peer"]["unit"] is None and event["peer"]["uid"] == NOBODY.pw_uid

        got = _in_cgroup(d, slice_ / "mcp-content-api.service", NOBODY.pw_uid, NOBODY.pw_gid)
        assert "child_error" not in got, got
        assert got[0] == 200, got
    finally:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                path.rmdir()


# --------------------------------------------------------------------------- check-config


def test_check_config_warns_about_selectors_that_rely_on_exe_alone() -> None:
    """Each selector with exe (or exe_sha256) and none of uid/user/gid/group/
    supplementary_group/unit gets a warning naming its $.path; pinned ones do not."""
    from test_cli import sidekey

    d = Daemon({"peers": {
        "content-api": [{"exe": "/usr/bin/python3"}, {"uid": 0, "exe": "/usr/bin/python3"}],
        "analytics-db": [{"unit": "mcp-analytics.service", "exe_sha256": "0" * 64},
                         {"exe_sha256": "1" * 64}],
    }})
    try:
        out = sidekey("check-config", "--config", str(d.config_path))
        assert out.returncode == 0, out.stderr
        warned = [line.strip() for line in out.stdout.splitlines()
                  if "is no boundary against a user who can run" in line]
        assert len(warned) == 2, out.stdout
        assert any("$.peers.content-api.0.exe: exe is no boundary" in w for w in warned)
        assert any("$.peers.analytics-db.1.exe_sha256: exe_sha256 is no boundary" in w for w in warned)
        assert all(w.startswith("warning:") and w.endswith("add uid or unit") for w in warned)
        as_json = json.loads(sidekey("check-config", "--config", str(d.config_path), "--json").stdout)
        assert sum("no boundary" in w for w in as_json["warnings"]) == 2
    finally:
        d.cleanup()
