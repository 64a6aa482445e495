"""Hostile host, files and process (issue 9 items 11-14): a full disk under the audit
log, files readable by others, an empty or corrupt state database, core dumps, and a
socket directory an attacker controls. Every test drives a real daemon subprocess."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import select
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import Daemon, run_as

NOBODY = 65534
NOGROUP = 65534
TEST_TIMEOUT_S = 120.0


def _call(d: Daemon) -> int:
    """One governed call (authorize, redeem, release); the first non-200 status, or 200."""
    status, auth = d.authorize(arguments={"title": "x" * 200})
    if status != 200:
        return status
    status, lease = d.request("POST", "/v1/redeem", {"resolution_token": auth["resolution_token"]})
    if status != 200:
        return status
    status, _ = d.request("POST", "/v1/release", {"lease_id": lease["lease_id"], "status": "success",
                                                 "duration_ms": 1})
    return status


def _serve(d: Daemon, *extra: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """`sidekey serve` that is expected to refuse to start: its exit status and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "sidekey", "serve", "--config", str(d.config_path), *extra],
        capture_output=True, text=True, timeout=timeout, cwd=d.root,
    )


# --------------------------------------------------------------------------- item 11


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (the test runs as root)."""
    mnt = tmp_path / "disk"
    mnt.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)],
                   check=True, timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def _fill(path: Path) -> None:
    """Write ``path`` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk = b"\0" * 4096
        while True:
            try:
                os.write(fd, chunk)
            except OSError:
                chunk = chunk[: len(chunk) // 2]
                if not chunk:
                    return
    finally:
        os.close(fd)


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_disk_full_leaves_every_audit_line_whole(make_daemon: Any, small_disk: Path) -> None:
    audit = small_disk / "audit.jsonl"
    d = make_daemon({"audit": {"path": str(audit)}})
    d.audit_path = audit
    d.start()
    assert _call(d) == 200
    filler = small_disk / "filler"
    _fill(filler)
    # The disk is full: the next events cannot be appended (the first batches may
    # still fit in the audit file's last page, then a write comes up short).
    statuses = [_call(d) for _ in range(60)]
    assert 503 in statuses, statuses
    failed_at = statuses.index(503)
    assert all(s == 503 for s in statuses[failed_at + 3:]), statuses  # stays failed, closed
    status, health = d.request("GET", "/v1/health")
    assert status == 503 and health["audit"]["ok"] is False
    status, body = d.request("POST", "/v1/authorize", {
        "server": "content-api", "tool": "create_article", "agent_id": "content-writer",
        "session_id": "s1", "arguments": {"title": "t"}, "user_token": d.user_token()})
    assert status == 503 and body["error"]["code"] == "audit_unavailable"
    # Space is back: appends succeed again, and every line of the file is one event.
    filler.unlink()
    assert [_call(d) for _ in range(5)] == [200] * 5
    assert d.request("GET", "/v1/health")[0] == 200
    d.stop()
    raw = audit.read_bytes()
    assert raw.endswith(b"\n")
    events = [json.loads(line) for line in raw.split(b"\n")[:-1]]  # each line parses
    assert events[-1]["event_type"] == "daemon.stopped"
    assert sum(e["event_type"] == "mcp.tool_call" for e in events) >= 6


# --------------------------------------------------------------------------- item 12


def _corrupt_burned_jti_page(db: Path) -> None:
    """With the daemon stopped: fill burned_jti (far-future expiry, so nothing purges it)
    until it has many leaf pages, then overwrite bytes in the middle of one of them."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO burned_jti (jti, expires_at) VALUES (?, ?)",
                         [(f"jti_{i:06d}_{os.urandom(8).hex()}", 4e9) for i in range(3000)])
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        leaves = [r[0] for r in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'burned_jti' AND pagetype = 'leaf' ORDER BY pageno")]
    finally:
        conn.close()
    assert len(leaves) >= 10
    page = leaves[len(leaves) // 2]
    with db.open("r+b") as f:
        f.seek((page - 1) * page_size + page_size // 4)
        f.write(bytes(range(256)) * 2)  # cell pointers and cells: garbage


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_corrupt_state_page_makes_health_unhealthy(make_daemon: Any) -> None:
    d = make_daemon()
    d.start()
    assert _call(d) == 200
    assert d.stop() == 0
    _corrupt_burned_jti_page(d.root / "state" / "state.db")
    # A point lookup does not touch the damaged page: only a check of the whole file
    # finds it. The daemon starts degraded and says why.
    d.start()
    status, health = d.request("GET", "/v1/health")
    assert status == 503, health
    assert health["store"] == {"ok": False, "reason": "state_corrupt"}
    # Every store operation fails closed meanwhile (a damaged table may hide a burned jti).
    status, body = d.authorize()
    assert status == 503 and body["error"]["code"] == "state_corrupt", body
    status, st = d.request("GET", "/v1/status")
    assert st["store"]["reason"] == "state_corrupt" and "quick_check" not in st["store"]["last_error"]
    assert "is corrupt" in d.log()


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_empty_state_db_is_refused_unless_init(make_daemon: Any) -> None:
    d = make_daemon()
    d.start()
    assert _call(d) == 200
    assert d.stop() == 0
    db = d.root / "state" / "state.db"
    os.truncate(db, 0)  # a restore gone wrong: the file is there, its pages are not
    out = _serve(d)
    assert out.returncode == 1, out
    assert "state_db_empty" in out.stderr and "--init" in out.stderr, out.stderr
    assert db.stat().st_size == 0  # nothing was created in its place
    # With --init the operator accepts a new database.
    log = d.log_path.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "sidekey", "serve", "--init", "--config",
                             str(d.config_path)], stdout=log, stderr=log, cwd=d.root)
    log.close()
    d.proc = proc
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, d.log()
            assert time.monotonic() < deadline, d.log()
            with contextlib.suppress(OSError):
                if d.request("GET", "/v1/health", timeout=1.0)[0] == 200:
                    break
            time.sleep(0.05)
        assert _call(d) == 200
        assert d.events_of("daemon.started")[-1]["state_reinitialized"] is True
    finally:
        assert d.stop() == 0


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_loose_file_modes_are_fixed_with_a_warning(make_daemon: Any) -> None:
    d = make_daemon()
    d.start()
    assert _call(d) == 200
    d.kill()  # kill -9: state.db-wal and -shm stay behind
    state = d.root / "state"
    files = [state / "audit.jsonl", state / "state.db", state / "state.db-wal",
             state / "state.db-shm", state / "secrets.enc"]
    for f in files:
        os.chmod(f, 0o644)
    check = subprocess.run([sys.executable, "-m", "sidekey", "check-config", "--config",
                            str(d.config_path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    for f in files:
        assert f"warning: {f}: " in check.stdout and "mode 0644" in check.stdout, check.stdout
    d.start()
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert f"{f}: the " in d.log()
    fixed = d.events_of("daemon.started")[-1]["files_fixed"]
    assert len(fixed) == len(files) and all("changed to 0600" in w for w in fixed)
    assert _call(d) == 200


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_files_the_daemon_does_not_own_are_refused(make_daemon: Any) -> None:
    d = make_daemon()
    d.start()
    assert d.stop() == 0
    # A key file readable by others: refused (the operator's file; rotate, not chmod).
    key = d.root / "keys" / "local.key"
    os.chmod(key, 0o644)
    check = subprocess.run([sys.executable, "-m", "sidekey", "check-config", "--config",
                            str(d.config_path)], capture_output=True, text=True, timeout=30)
    assert "the daemon refuses to start: key_file_unsafe" in check.stdout, check.stdout
    out = _serve(d)
    assert out.returncode == 1 and "chmod 600" in out.stderr and str(key) in out.stderr, out.stderr
    os.chmod(key, 0o600)
    # The audit log owned by another uid: whoever owns it can rewrite it.
    audit = d.root / "state" / "audit.jsonl"
    os.chown(audit, NOBODY, NOGROUP)
    out = _serve(d)
    assert out.returncode == 1 and "file_owner_unsafe" in out.stderr, out.stderr
    os.chown(audit, 0, 0)
    # The state directory writable by others: they could swap state.db.
    os.chmod(d.root / "state", 0o777)
    out = _serve(d)
    assert out.returncode == 1 and "dir_unsafe" in out.stderr, out.stderr


# --------------------------------------------------------------------------- item 13


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_DAC_READ_SEARCH = 2
PR_SET_KEEPCAPS = 8
PR_SET_DUMPABLE = 4


def _become(uid: int, gid: int) -> None:
    """Switch to ``uid``/``gid`` keeping only CAP_DAC_READ_SEARCH (this machine's
    interpreter and stdlib live under a 0700 /root), and dumpable again, as a process
    started by exec would be (changing uid clears the flag)."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) == 0
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = 1 << CAP_DAC_READ_SEARCH
    if libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    assert libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) == 0


def _fork_daemon_as(d: Daemon, uid: int, gid: int) -> int:
    """``sidekey serve`` in a forked child running as ``uid``. Returns its pid once it
    answers."""
    import sidekey.cli

    log_fd = os.open(d.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.chdir(d.root)
            _become(uid, gid)
            code = sidekey.cli.main(["serve", "--config", str(d.config_path)])
        except BaseException as exc:
            os.write(2, f"child failed: {exc!r}\n".encode())
        finally:
            os._exit(code)
    os.close(log_fd)
    deadline = time.monotonic() + 20
    while True:
        done, _status = os.waitpid(pid, os.WNOHANG)
        assert done == 0, d.log()
        assert time.monotonic() < deadline, d.log()
        with contextlib.suppress(OSError):
            if d.request("GET", "/v1/health", timeout=1.0)[0] == 200:
                return pid
        time.sleep(0.05)


def _stop_pid(pid: int) -> int:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the daemon did not stop on SIGTERM")


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_daemon_memory_is_not_dumpable(make_daemon: Any) -> None:
    """Run the daemon as nobody; another process of the same uid must not get at its
    memory (environment, maps, ptrace), and it must not dump core."""
    d = make_daemon()
    for token_server in ("content-api", "analytics-db"):
        d.user_token(token_server)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOGROUP}", str(d.root)], check=True, timeout=30)
    pid = _fork_daemon_as(d, NOBODY, NOGROUP)
    try:
        assert os.stat(f"/proc/{pid}").st_uid == NOBODY  # it does run as nobody
        limits = Path(f"/proc/{pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core
        # PR_SET_DUMPABLE 0: the kernel gives /proc/<pid>/* to root, so the daemon's own
        # uid can neither read its environment and memory nor ptrace it.
        for name in ("environ", "mem", "maps"):
            assert os.stat(f"/proc/{pid}/{name}").st_uid == 0, name

        # Another process of the same uid with the same capabilities (so that only the
        # dumpable flag can stand in its way):
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - child
            try:
                os.close(r)
                _become(NOBODY, NOGROUP)
                out = {}
                for name in ("environ", "maps", "mem"):
                    try:
                        with open(f"/proc/{pid}/{name}", "rb") as f:
                            f.read(1)
                        out[name] = "read"
                    except OSError as exc:
                        out[name] = errno.errorcode.get(exc.errno or 0, "error")
                os.write(w, json.dumps(out).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            seen = json.loads(f.read() or b"{}")
        os.waitpid(child, 0)
        assert seen == {"environ": "EACCES", "maps": "EACCES", "mem": "EACCES"}, seen
    finally:
        assert _stop_pid(pid) == 0


# --------------------------------------------------------------------------- item 14


@pytest.mark.timeout(TEST_TIMEOUT_S)
@pytest.mark.parametrize("setup", ["owned_by_attacker", "group_writable", "sticky_world_writable",
                                   "ancestor_world_writable", "symlink_to_attacker_dir"])
def test_socket_directory_open_to_others_is_refused(make_daemon: Any, setup: str) -> None:
    d = make_daemon()
    run = d.root / "run"
    if setup == "owned_by_attacker":
        os.chown(run, NOBODY, NOGROUP)  # mode 0755 but nobody's: they can replace the socket
    elif setup == "group_writable":
        os.chmod(run, 0o775)
    elif setup == "sticky_world_writable":
        os.chmod(run, 0o1777)  # like /tmp: others can still pre-create the socket's name
    elif setup == "ancestor_world_writable":
        os.chmod(d.root, 0o777)  # no sticky bit: others can rename run/ away and make their own
    else:
        attacker = d.root / "attacker"
        attacker.mkdir()
        os.chown(attacker, NOBODY, NOGROUP)
        run.rmdir()
        run.symlink_to(attacker)
    out = _serve(d)
    assert out.returncode == 1, out
    assert "socket_dir_unsafe" in out.stderr, out.stderr
    assert not Path(d.socket).exists()


class FakeDaemon:
    """A plain socket server run by nobody on ``path``: records every byte it receives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        ready_r, ready_w = os.pipe()
        self._stop_r, self._stop_w = os.pipe()
        self._out_r, out_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - child
            try:
                os.close(ready_r)
                os.close(self._stop_w)
                os.close(self._out_r)
                os.setgroups([])
                os.setgid(NOGROUP)
                os.setuid(NOBODY)
                received = self._serve(ready_w)
                os.write(out_w, received)
            except BaseException as exc:
                os.write(2, f"fake daemon failed: {exc!r}\n".encode())
            finally:
                os._exit(0)
        os.close(ready_w)
        os.close(self._stop_r)
        os.close(out_w)
        assert os.read(ready_r, 1) == b"R"
        os.close(ready_r)

    def _serve(self, ready_w: int) -> bytes:  # pragma: no cover - child
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(str(self.path))
        os.chmod(self.path, 0o666)
        srv.listen(16)
        os.write(ready_w, b"R")
        received = bytearray()
        conns: list[socket.socket] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            readable, _, _ = select.select([srv, self._stop_r, *conns], [], [], 0.5)
            if self._stop_r in readable:
                break
            for r in readable:
                if r is srv:
                    conns.append(srv.accept()[0])
                else:
                    chunk = r.recv(65536)
                    received += chunk
                    if not chunk:
                        conns.remove(r)
                        r.close()
        return bytes(received)

    def received(self) -> bytes:
        os.close(self._stop_w)
        data = b""
        while chunk := os.read(self._out_r, 65536):
            data += chunk
        os.close(self._out_r)
        os.waitpid(self.pid, 0)
        return data


@pytest.fixture
def fake_daemon() -> Iterator[FakeDaemon]:
    top = Path(tempfile.mkdtemp(prefix="sk-fake-"))  # tmp_path's parents are 0700
    os.chmod(top, 0o755)
    home = top / "attacker"
    home.mkdir()
    os.chown(home, NOBODY, NOGROUP)
    fake = FakeDaemon(home / "sock")
    try:
        yield fake
    finally:
        with contextlib.suppress(OSError):
            fake.received()
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_client_refuses_an_impostor_daemon_and_sends_nothing(
    fake_daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import trio

    from sidekey.client import AsyncClient, Client, DaemonIdentityError

    token = "eyJhbGciOiJSUzI1NiJ9.USER-BEARER-TOKEN.sig"
    sock = str(fake_daemon.path)
    monkeypatch.delenv("SIDEKEY_DAEMON_UID", raising=False)
    # expected_uid set: the fake runs as nobody, not root.
    with Client(sock, timeout=5, expected_uid=0) as client, pytest.raises(DaemonIdentityError) as info:
        client.authorize(server="content-api", tool="create_article", user_token=token)
    assert info.value.code == "daemon_identity" and "uid 65534" in str(info.value)
    assert token not in str(info.value)
    # The default (unset): root or this process's own uid (root here), also refused.
    with Client(sock, timeout=5) as client, pytest.raises(DaemonIdentityError):
        client.authorize(server="content-api", tool="create_article", user_token=token)

    async def via_async() -> None:
        async with AsyncClient(sock, timeout=5, expected_uid="root") as client:
            await client.authorize(server="content-api", tool="create_article", user_token=token)

    with pytest.raises(DaemonIdentityError):
        trio.run(via_async)
    # The CLI: `sidekey call` with the user's token in $SIDEKEY_USER_TOKEN.
    env = {**os.environ, "SIDEKEY_USER_TOKEN": token, "SIDEKEY_DAEMON_UID": "0"}
    out = subprocess.run([sys.executable, "-m", "sidekey", "call", "--socket", sock, "--server",
                          "content-api", "--tool", "create_article"],
                         capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert out.returncode == 1 and "daemon_identity" in out.stderr, out
    assert fake_daemon.received() == b""  # not one byte, so not the token


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_client_talks_to_the_uid_it_was_told(fake_daemon: FakeDaemon) -> None:
    """The control: told the daemon runs as nobody, the client does send (the fake
    records the request), so the refusal above is the uid check and nothing else."""
    from sidekey.client import Client, SidekeyClientError

    with Client(str(fake_daemon.path), timeout=1, expected_uid="nobody") as client, \
            pytest.raises(SidekeyClientError) as info:
        client.health()
    assert info.value.code in ("timeout", "connection_failed", "protocol_error")
    assert b"GET /v1/health" in fake_daemon.received()


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_client_default_accepts_a_root_daemon(daemon: Daemon) -> None:
    """Default expectations keep the quickstart and the tests working: a root daemon is
    accepted by a client running as nobody (as are systemd-activated sockets)."""
    def health(d: Daemon) -> Any:
        from sidekey.client import Client

        with Client(d.socket, timeout=5) as client:
            return client.health()["status"]

    assert run_as(daemon, NOBODY, NOGROUP, health) == "ok"


@pytest.mark.timeout(TEST_TIMEOUT_S)
def test_maintenance_quick_check_finds_a_page_damaged_while_running(tmp_path: Path) -> None:
    """The periodic half of item 12: a page damaged under a running store is found by
    the maintenance task's quick_check, not first by the call that happens to read it."""
    import trio

    from sidekey.store import StateUnavailable
    from sidekey.store.sqlite import SqliteStore

    async def running() -> None:
        # Damage the file under a store that opened it sound.
        db = tmp_path / "state2" / "state.db"
        store = SqliteStore.open(db.parent)
        await store.aclose()
        conn = sqlite3.connect(db, isolation_level=None)
        conn.executemany("INSERT INTO burned_jti (jti, expires_at) VALUES (?, ?)",
                         [(f"jti_{i:06d}", 4e9) for i in range(3000)])
        conn.close()
        store = SqliteStore.open(db.parent)
        try:
            assert store.health()["ok"] is True
            assert await store.burn_jti("jti_000001", 4e9) is False  # a point lookup works
            await store.checkpoint()
            _corrupt_leaf(db)
            async with trio.open_nursery() as nursery:
                await nursery.start(lambda task_status: store.run_maintenance(
                    interval=0.01, quick_check_interval=0.0, task_status=task_status))
                with trio.fail_after(30):
                    while store.health()["reason"] != "state_corrupt":
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            assert store.health()["ok"] is False
            with pytest.raises(StateUnavailable) as info:
                await store.burn_jti("jti-new", 4e9)
            assert info.value.code == "state_corrupt"
        finally:
            await store.aclose()

    trio.run(running)


def _corrupt_leaf(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        leaves = [r[0] for r in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'burned_jti' AND pagetype = 'leaf' ORDER BY pageno")]
    finally:
        conn.close()
    page = leaves[len(leaves) // 2]
    with db.open("r+b") as f:
        f.seek((page - 1) * page_size + page_size // 4)
        f.write(bytes(range(256)) * 2)
