"""Peer attestation (sidekey.peer) against real sockets and real processes.

The attestation tests use AF_UNIX sockets and forked children that connect, exit,
linger as zombies or drop privileges on command. The selector/RBAC tests build
PeerIdentity values directly. Stub sockets appear only where stated: to drive
``getsockopt`` error paths that this kernel does not produce on demand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import grp
import hashlib
import os
import pwd
import re
import select
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import pytest
import trio
from hypothesis import assume, given
from hypothesis import strategies as st

import sidekey.peer as peer_module
from sidekey.config import PeerSelector, RbacConfig, RbacEntry
from sidekey.peer import (
    SO_PEERPIDFD,
    TIER_RANK,
    ExeHashCache,
    PeerHandle,
    PeerIdentity,
    _pidfd_alive,
    _pidfd_pid,
    _proc_facts,
    _same_mnt_ns,
    _status_field,
    _unit_from_cgroup,
    attest,
    selector_matches,
    servers_of_peer,
    tier_allows,
    tier_of,
)
from sidekey.protocol import Denied

TIMEOUT = 10.0  # every wait on a child or a pipe is bounded by this
CHILD_TIMEOUT = 30.0  # a forked child exits on its own if the test forgets it


# --------------------------------------------------------------------------- helpers


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _stat_start_time(pid: int | str) -> int:
    """Field 22 of /proc/<pid>/stat, parsed independently of peer.py."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    after_comm = raw[raw.rindex(")") + 2 :].split()  # after_comm[0] is field 3
    return int(after_comm[22 - 3])


def _exe_sha256_of_self() -> str:
    return hashlib.sha256(Path("/proc/self/exe").read_bytes()).hexdigest()


def _pidfd_supported() -> bool:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        try:
            raw = a.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
        except OSError:
            return False
    os.close(int.from_bytes(raw, "little", signed=True))
    return True


PIDFD_SUPPORTED = _pidfd_supported()
# Reasons whose ground is missing on this machine: skipped on a dev machine, but under CI
# (nothing may be skipped there) the autouse fixture below fails the test instead.
_MISSING_GROUND: set[str] = set()


def _needs(ok: bool, reason: str) -> pytest.MarkDecorator:
    if not ok:
        _MISSING_GROUND.add(reason)
    return pytest.mark.skipif(not ok and not os.environ.get("CI"), reason=reason)


needs_pidfd = _needs(PIDFD_SUPPORTED, "kernel lacks SO_PEERPIDFD")
needs_root = _needs(os.geteuid() == 0, "changing a child's uid needs root")


@pytest.fixture(autouse=True)
def _ci_fails_on_missing_ground(request: pytest.FixtureRequest) -> None:
    for mark in request.node.iter_markers("skipif"):
        if mark.kwargs.get("reason") in _MISSING_GROUND:
            pytest.fail(f"{mark.kwargs['reason']} (CI is set: not skipping)")

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture(
    params=[
        pytest.param(True, id="pidfd", marks=needs_pidfd),
        pytest.param(False, id="best-effort"),
    ]
)
def use_pidfd(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _expected_attestation(use_pidfd: bool) -> str:
    return "pidfd" if use_pidfd else "best-effort"


def _code(exc_info: pytest.ExceptionInfo[Denied]) -> str:
    return exc_info.value.code


def _child_main(addr: str, cmd_r: int, ack_w: int, before_connect: Callable[[], None] | None) -> int:
    """Runs in the forked child: ``before_connect()``, connect, then obey one-byte commands."""
    if before_connect is not None:
        before_connect()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(addr)
    os.write(ack_w, b"c")
    while True:
        ready, _, _ = select.select([cmd_r], [], [], CHILD_TIMEOUT)
        if not ready:
            return 2
        cmd = os.read(cmd_r, 1)
        if cmd in (b"", b"x"):
            return 0
        if cmd == b"u":  # become nobody for good
            os.setgroups([])
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
        elif cmd == b"g":  # change only the group
            os.setgid(NOBODY.pw_gid)
        elif cmd == b"G":  # change only the supplementary groups
            os.setgroups([NOBODY.pw_gid])
        elif cmd == b"e":  # become another program (same pid, same credentials)
            os.write(ack_w, cmd)
            os.execv(SLEEP, ["sleep", str(CHILD_TIMEOUT)])
        else:
            return 3
        os.write(ack_w, cmd)


class ForkedPeer:
    """A forked child connected to a listener of ours; ``conn`` is our accepted end.

    Commands: ``exit()``, ``command(b"u")`` (setuid nobody), ``command(b"g")``
    (setgid nobody), ``command(b"G")`` (supplementary groups: nobody's gid only). The
    child runs ``before_connect()`` (if given) before it connects. Every wait is
    bounded; ``close()`` kills and reaps the child.
    """

    def __init__(self, before_connect: Callable[[], None] | None = None) -> None:
        self.before_connect = before_connect
        self.addr = f"\0sidekey-test-peer-{uuid.uuid4().hex}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn: socket.socket | None = None
        self.pid = 0
        self.reaped = False
        self.exit_code: int | None = None
        self._cmd_w = -1
        self._ack_r = -1

    def __enter__(self) -> ForkedPeer:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _start(self) -> None:
        self.listener.bind(self.addr)
        self.listener.listen(1)
        self.listener.settimeout(TIMEOUT)
        cmd_r, cmd_w = os.pipe()
        ack_r, ack_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                os.close(cmd_w)
                os.close(ack_r)
                code = _child_main(self.addr, cmd_r, ack_w, self.before_connect)
            finally:
                os._exit(code)
        self.pid = pid
        os.close(cmd_r)
        os.close(ack_w)
        self._cmd_w, self._ack_r = cmd_w, ack_r
        assert self._ack() == b"c", "child did not connect"
        self.conn, _ = self.listener.accept()

    @property
    def sock(self) -> socket.socket:
        assert self.conn is not None
        return self.conn

    def _ack(self) -> bytes:
        ready, _, _ = select.select([self._ack_r], [], [], TIMEOUT)
        if not ready:
            raise AssertionError("timed out waiting for the child")
        return os.read(self._ack_r, 1)

    def command(self, cmd: bytes) -> None:
        os.write(self._cmd_w, cmd)
        got = self._ack()
        assert got == cmd, f"child failed command {cmd!r} (got {got!r})"

    def exit(self) -> None:
        os.write(self._cmd_w, b"x")

    def wait_exited(self) -> None:
        """Wait until the child is a zombie, without reaping it."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return
            time.sleep(0.005)
        raise AssertionError("child did not exit in time")

    def reap(self) -> int:
        for attempt in range(2):
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid == self.pid:
                    self.reaped = True
                    self.exit_code = os.waitstatus_to_exitcode(status)
                    return self.exit_code
                time.sleep(0.005)
            if attempt == 0:
                os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"could not reap child {self.pid}")

    def exit_and_reap(self) -> None:
        self.exit()
        assert self.reap() == 0

    def close(self) -> None:
        if self.pid and not self.reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.reap()
        for fd in (self._cmd_w, self._ack_r):
            if fd >= 0:
                os.close(fd)
        self._cmd_w = self._ack_r = -1
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


@pytest.fixture
def peer() -> Iterator[ForkedPeer]:
    with ForkedPeer() as p:
        yield p


class StubSock:
    """Stands in for a socket only to inject getsockopt results the kernel will not
    produce on demand. SO_PEERCRED is served by a real socket unless *cred* is given."""

    def __init__(
        self,
        real: socket.socket,
        *,
        pidfd_errno: int | None = None,
        cred: tuple[int, int, int] | None = None,
    ) -> None:
        self.real = real
        self.pidfd_errno = pidfd_errno
        self.cred = cred
        self.calls: list[int] = []

    def getsockopt(self, level: int, opt: int, buflen: int) -> bytes:
        self.calls.append(opt)
        if opt == SO_PEERPIDFD and self.pidfd_errno is not None:
            raise OSError(self.pidfd_errno, os.strerror(self.pidfd_errno))
        if opt == socket.SO_PEERCRED and self.cred is not None:
            return b"".join(v.to_bytes(4, "little", signed=True) for v in self.cred)
        return self.real.getsockopt(level, opt, buflen)

    def as_socket(self) -> socket.socket:
        return cast(socket.socket, self)


# --------------------------------------------------------------------------- attest: ourselves


def _assert_identity_is_this_process(ident: PeerIdentity) -> None:
    assert ident.pid == os.getpid()
    assert ident.uid == os.geteuid()
    assert ident.gid == os.getegid()
    assert ident.user == pwd.getpwuid(os.geteuid()).pw_name
    assert ident.group == grp.getgrgid(os.getegid()).gr_name
    assert set(ident.supplementary_gids) == set(os.getgroups())
    names = set()
    for g in os.getgroups():
        with contextlib.suppress(KeyError):
            names.add(grp.getgrgid(g).gr_name)
    assert set(ident.supplementary_groups) == names
    assert ident.start_time == _stat_start_time("self")
    assert ident.exe == os.readlink("/proc/self/exe")
    assert ident.unit == _unit_from_cgroup(Path("/proc/self/cgroup").read_text())


@needs_pidfd
def test_attest_socketpair_identifies_this_process() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        handle = attest(a)
        try:
            ident = handle.identity
            _assert_identity_is_this_process(ident)
            assert ident.attestation == "pidfd"
            handle.recheck()
            handle.recheck()  # repeatable
        finally:
            handle.close()


@needs_pidfd
def test_attest_listener_and_connect_in_same_process() -> None:
    addr = f"\0sidekey-test-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener, client:
        listener.bind(addr)
        listener.listen(1)
        listener.settimeout(TIMEOUT)
        client.connect(addr)
        server_side, _ = listener.accept()
        with server_side:
            for s in (server_side, client):  # both ends name this process
                with attest(s) as handle:
                    _assert_identity_is_this_process(handle.identity)
                    assert handle.identity.attestation == "pidfd"
                    handle.recheck()


def test_attest_best_effort_when_pidfd_disabled() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, attest(a, use_pidfd=False) as handle:
        _assert_identity_is_this_process(handle.identity)
        assert handle.identity.attestation == "best-effort"
        handle.recheck()


def test_best_effort_does_not_ask_for_a_pidfd() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        stub = StubSock(a, pidfd_errno=errno.EPERM)  # would fail if it were asked
        with attest(stub.as_socket(), use_pidfd=False) as handle:
            assert handle.identity.attestation == "best-effort"
        assert SO_PEERPIDFD not in stub.calls


def test_audit_has_exactly_the_documented_keys(use_pidfd: bool) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, attest(a, use_pidfd=use_pidfd) as handle:
        ident = handle.identity
        audit = ident.audit()
        assert set(audit) == {"pid", "uid", "gid", "unit", "exe", "attestation"}
        assert audit == {
            "pid": ident.pid,
            "uid": ident.uid,
            "gid": ident.gid,
            "unit": ident.unit,
            "exe": ident.exe,
            "attestation": _expected_attestation(use_pidfd),
        }


def test_identity_is_immutable() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, attest(a) as handle, pytest.raises(dataclasses.FrozenInstanceError):
        handle.identity.uid = 0  # type: ignore[misc]


def test_close_is_idempotent_releases_fds_and_recheck_then_fails(use_pidfd: bool) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        before = _open_fds()
        handle = attest(a, use_pidfd=use_pidfd)
        # the pidfd (if any), /proc/<pid> and its status (kept open for the re-checks)
        assert _open_fds() == before + (3 if use_pidfd else 2)
        handle.close()
        assert _open_fds() == before
        handle.close()
        handle.close()
        assert _open_fds() == before
        with pytest.raises(Denied) as exc_info:
            handle.recheck()
        assert _code(exc_info) == "peer_gone"


def test_second_close_does_not_close_reused_fd_numbers(use_pidfd: bool) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        handle = attest(a, use_pidfd=use_pidfd)
        handle.close()
        r, w = os.pipe()  # lowest free numbers: the ones the handle just released
        try:
            handle.close()
            os.fstat(r)
            os.fstat(w)
        finally:
            os.close(r)
            os.close(w)


def test_context_manager_closes(use_pidfd: bool) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        before = _open_fds()
        with attest(a, use_pidfd=use_pidfd) as handle:
            assert isinstance(handle, PeerHandle)
        assert _open_fds() == before
        with pytest.raises(Denied) as exc_info:
            handle.recheck()
        assert _code(exc_info) == "peer_gone"


async def test_attest_accepts_a_trio_socket() -> None:
    a, b = trio.socket.socketpair()
    with a, b, attest(a) as handle:  # type: ignore[arg-type]
        assert handle.identity.pid == os.getpid()
        assert handle.identity.attestation == ("pidfd" if PIDFD_SUPPORTED else "best-effort")
        handle.recheck()


# --------------------------------------------------------------------------- attest: a forked child


def test_attest_identifies_a_forked_child(peer: ForkedPeer, use_pidfd: bool) -> None:
    with attest(peer.sock, use_pidfd=use_pidfd) as handle:
        ident = handle.identity
        assert ident.pid == peer.pid != os.getpid()
        assert (ident.uid, ident.gid) == (os.geteuid(), os.getegid())
        assert ident.start_time == _stat_start_time(peer.pid)
        assert ident.exe == os.readlink(f"/proc/{peer.pid}/exe")
        assert ident.attestation == _expected_attestation(use_pidfd)
        handle.recheck()
        peer.exit_and_reap()


def test_attest_after_peer_exited_and_was_reaped_is_peer_gone(
    peer: ForkedPeer, use_pidfd: bool
) -> None:
    peer.exit_and_reap()
    before = _open_fds()
    with pytest.raises(Denied) as exc_info:
        attest(peer.sock, use_pidfd=use_pidfd)
    assert _code(exc_info) == "peer_gone"
    assert str(peer.pid) in exc_info.value.message
    assert _open_fds() == before  # the pidfd / dir fd opened on the way were closed


def test_attest_of_a_zombie_peer_is_peer_gone(peer: ForkedPeer, use_pidfd: bool) -> None:
    peer.exit()
    peer.wait_exited()  # zombie: exited, not yet reaped
    assert Path(f"/proc/{peer.pid}").exists()
    before = _open_fds()
    with pytest.raises(Denied) as exc_info:
        attest(peer.sock, use_pidfd=use_pidfd)
    assert _code(exc_info) == "peer_gone"
    assert _open_fds() == before
    assert peer.reap() == 0


def test_recheck_after_peer_exited_and_was_reaped_is_peer_gone(
    peer: ForkedPeer, use_pidfd: bool
) -> None:
    with attest(peer.sock, use_pidfd=use_pidfd) as handle:
        assert handle.identity.pid == peer.pid
        handle.recheck()
        peer.exit_and_reap()
        with pytest.raises(Denied) as exc_info:
            handle.recheck()
        assert _code(exc_info) == "peer_gone"


def test_recheck_of_a_zombie_peer_is_peer_gone(peer: ForkedPeer, use_pidfd: bool) -> None:
    with attest(peer.sock, use_pidfd=use_pidfd) as handle:
        handle.recheck()
        peer.exit()
        peer.wait_exited()  # not reaped: /proc/<pid> still there, state Z
        with pytest.raises(Denied) as exc_info:
            handle.recheck()
        assert _code(exc_info) == "peer_gone"
        assert peer.reap() == 0
        with pytest.raises(Denied) as exc_info:
            handle.recheck()
        assert _code(exc_info) == "peer_gone"


SLEEP = os.path.realpath("/bin/sleep")


@pytest.mark.parametrize("use_pidfd", [True, False])
def test_recheck_after_peer_exec_is_peer_changed(use_pidfd: bool) -> None:
    with ForkedPeer() as peer, attest(peer.sock, use_pidfd=use_pidfd) as handle:
        handle.recheck()
        peer.command(b"e")
        deadline = time.monotonic() + TIMEOUT
        while os.readlink(f"/proc/{peer.pid}/exe") != SLEEP:
            assert time.monotonic() < deadline, "child did not exec"
            time.sleep(0.01)
        with pytest.raises(Denied) as exc_info:
            handle.recheck()
        assert _code(exc_info) == "peer_changed"


@needs_root
def test_recheck_after_peer_setuid_is_peer_changed(peer: ForkedPeer, use_pidfd: bool) -> None:
    with attest(peer.sock, use_pidfd=use_pidfd) as handle:
        assert handle.identity.uid == 0
        handle.recheck()
        peer.command(b"u")  # setgroups([]), setgid(nobody), setuid(nobody); stays alive
        with pytest.raises(Denied) as exc_info:
            handle.recheck()
        assert _code(exc_info) == "peer_changed"
        assert str(peer.pid) in exc_info.value.message
        with pytest.raises(Denied) as exc_info:  # and it stays refused
            handle.recheck()
        assert _code(exc_info) == "peer_changed"
        peer.exit_and_reap()
        with pytest.raises(Denied) as exc_info:
            handle.recheck()
        assert _code(exc_info) == "peer_gone"


@needs_root
def test_recheck_after_peer_setgid_only_is_peer_changed(peer: ForkedPeer, use_pidfd: bool) -> None:
    with attest(peer.sock, use_pidfd=use_pidfd) as handle:
        handle.recheck()
        peer.command(b"g")
        with pytest.raises(Denied) as exc_info:
            handle.recheck()
        assert _code(exc_info) == "peer_changed"
        peer.exit_and_reap()


@needs_root
def test_attest_after_peer_setuid_is_peer_changed(peer: ForkedPeer, use_pidfd: bool) -> None:
    """SO_PEERCRED keeps the uid of connect(); /proc shows the new one: refused."""
    peer.command(b"u")
    before = _open_fds()
    with pytest.raises(Denied) as exc_info:
        attest(peer.sock, use_pidfd=use_pidfd)
    assert _code(exc_info) == "peer_changed"
    assert _open_fds() == before
    peer.exit_and_reap()


# --------------------------------------------------------------------------- PeerHandle.recheck on hand-built handles


def _own_identity(**overrides: Any) -> PeerIdentity:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, attest(a, use_pidfd=False) as handle:
        return dataclasses.replace(handle.identity, **overrides)


def _proc_self_dir_fd() -> int:
    return os.open(f"/proc/{os.getpid()}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({}, None),
        ({"start_time": -1}, "peer_gone"),  # same pid, other process (pid reuse)
        ({"uid": 4242}, "peer_changed"),
        ({"gid": 4242}, "peer_changed"),
    ],
)
def test_recheck_compares_start_time_and_credentials(
    overrides: dict[str, Any], code: str | None
) -> None:
    with PeerHandle(_own_identity(**overrides), pidfd=None, dir_fd=_proc_self_dir_fd()) as h:
        if code is None:
            h.recheck()
        else:
            with pytest.raises(Denied) as exc_info:
                h.recheck()
            assert _code(exc_info) == code


def test_recheck_refuses_when_the_pinned_process_was_reaped(peer: ForkedPeer) -> None:
    """recheck asks the pidfd whether its process lives (attest already proved that the
    pidfd and the /proc dirfd name one process; that pairing is tested on attest, and
    recheck no longer re-reads fdinfo for it). Here the pidfd's process is reaped while
    the dirfd still works: peer_gone."""
    pidfd = os.pidfd_open(peer.pid)
    peer.exit_and_reap()
    with PeerHandle(_own_identity(), pidfd=pidfd, dir_fd=_proc_self_dir_fd()) as h:
        with pytest.raises(Denied) as exc_info:
            h.recheck()
        assert _code(exc_info) == "peer_gone"


def test_recheck_accepts_a_pidfd_naming_the_pid() -> None:
    with PeerHandle(
        _own_identity(), pidfd=os.pidfd_open(os.getpid()), dir_fd=_proc_self_dir_fd()
    ) as h:
        h.recheck()


# --------------------------------------------------------------------------- getsockopt error paths (stubbed)


def test_attest_refuses_a_peer_without_pid() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        stub = StubSock(a, cred=(0, 0, 0))  # what a peer in another pid namespace looks like
        before = _open_fds()
        with pytest.raises(Denied) as exc_info:
            attest(stub.as_socket())
        assert _code(exc_info) == "peer_unattested"
        assert SO_PEERPIDFD not in stub.calls
        assert _open_fds() == before


def test_attest_falls_back_when_kernel_lacks_so_peerpidfd() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, attest(StubSock(a, pidfd_errno=errno.ENOPROTOOPT).as_socket()) as handle:
        _assert_identity_is_this_process(handle.identity)
        assert handle.identity.attestation == "best-effort"
        handle.recheck()


@pytest.mark.parametrize(
    ("err", "code"), [(errno.ESRCH, "peer_gone"), (errno.EPERM, "peer_unattested")]
)
def test_attest_maps_so_peerpidfd_errors(err: int, code: str) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        before = _open_fds()
        with pytest.raises(Denied) as exc_info:
            attest(StubSock(a, pidfd_errno=err).as_socket())
        assert _code(exc_info) == code
        assert _open_fds() == before


def test_attest_refuses_a_recycled_pid_when_the_pidfd_says_gone(peer: ForkedPeer) -> None:
    """The connecting child is reaped and "its" pid now names a live process (this
    one): the kernel still hands out a pidfd for the reaped child, and attest must
    notice that it no longer names that pid. SO_PEERCRED is stubbed to the recycled
    pid; the pidfd is the real one of the reaped peer."""
    peer.exit_and_reap()
    real = peer.sock
    try:
        stale = real.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
    except OSError:
        pytest.skip("this kernel gives no pidfd for a reaped peer")
    os.close(int.from_bytes(stale, "little", signed=True))

    class Recycled(StubSock):
        def getsockopt(self, level: int, opt: int, buflen: int) -> bytes:
            if opt == SO_PEERPIDFD:
                return real.getsockopt(level, opt, buflen)
            return super().getsockopt(level, opt, buflen)

    stub = Recycled(real, cred=(os.getpid(), os.geteuid(), os.getegid()))
    before = _open_fds()
    with pytest.raises(Denied) as exc_info:
        attest(stub.as_socket())
    assert _code(exc_info) == "peer_gone"
    assert _open_fds() == before  # the stale pidfd was closed


def test_attest_refuses_a_pidfd_of_another_live_process() -> None:
    """A pidfd naming some other live process than SO_PEERCRED's pid: refused."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:

        class OtherPidfd(StubSock):
            def getsockopt(self, level: int, opt: int, buflen: int) -> bytes:
                if opt == SO_PEERPIDFD:
                    return os.pidfd_open(os.getppid()).to_bytes(4, "little", signed=True)
                return super().getsockopt(level, opt, buflen)

        before = _open_fds()
        with pytest.raises(Denied) as exc_info:
            attest(OtherPidfd(a).as_socket())
        assert _code(exc_info) == "peer_gone"
        assert _open_fds() == before


def test_einval_from_so_peerpidfd_means_the_peer_was_reaped() -> None:
    """On Linux 6.5-6.14 SO_PEERPIDFD fails with EINVAL exactly when the peer was
    already reaped (pidfd_prepare finds no task); it must not be taken for "kernel
    lacks SO_PEERPIDFD", or attest would fall back to best-effort and attest whatever
    process now holds the recycled pid. This process stands in for the recycler."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        before = _open_fds()
        try:
            handle = attest(StubSock(a, pidfd_errno=errno.EINVAL).as_socket())
        except Denied as exc:
            assert exc.code == "peer_gone"
        else:
            attestation = handle.identity.attestation
            handle.close()
            raise AssertionError(f"attested a recycled pid ({attestation})")
        assert _open_fds() == before


# --------------------------------------------------------------------------- _unit_from_cgroup


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        ("0::/system.slice/mcp-content.service\n", "mcp-content.service"),
        ("0::/system.slice/mcp-content.service", "mcp-content.service"),
        # A user's own service manager can name units anything (systemd-run --user
        # --unit=mcp-content.service): the unit is the user manager, not what it runs.
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/foo.scope\n",
            "user@1000.service",
        ),
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/mcp-content.service\n",
            "user@1000.service",
        ),
        # Delegate=yes services create sub-cgroups with any name: the outer unit counts.
        ("0::/system.slice/mcp-content.service/evil.service\n", "mcp-content.service"),
        ("0::/user.slice/user-1000.slice/user@1000.service\n", "user@1000.service"),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope"),
        ("0::/system.slice/mcp-content.service/payload\n", "mcp-content.service"),
        ("0::/system.slice/getty@tty1.service\n", "getty@tty1.service"),
        ("0::/init.scope\n", "init.scope"),
        ("0::/\n", None),
        ("0::/system.slice\n", None),
        ("0::/system.slice/x.services\n", None),
        ("0::/system.slice/.service\n", None),
        ("0::/system.slice/mcp.service.d\n", None),
        ("", None),
        ("garbage\n", None),
        # cgroup v1 lines are ignored, whatever they say
        ("1:name=systemd:/system.slice/v1.service\n0::/\n", None),
        ("12:pids:/system.slice/v1.service\n", None),
        ("4:memory:/system.slice/v1.service\n0::/system.slice/v2.service\n", "v2.service"),
        ("10::/system.slice/fake.service\n", None),  # only hierarchy 0 is v2
        # Only cgroups under the system manager's slices count (issue 9, item 3): a
        # delegated or hand-made subtree can hold directories with any name.
        ("0::/delegated/mcp-content-api.service\n", None),
        ("0::/sk-test/mcp-content-api.service\n", None),
        ("0::/machine/qemu.scope\n", None),
        ("0::/system.slice/payload/mcp-content-api.service\n", None),
        ("0::/user.slice/user-1000.slice/mine/mcp-content-api.service\n", None),
        ("0::/system.slice/system-getty.slice/getty@tty1.service\n", "getty@tty1.service"),
        ("0::/.slice/x.service\n", None),
        ("0::system.slice/x.service\n", None),  # not an absolute path
        ("0:://system.slice/x.service\n", None),
    ],
)
def test_unit_from_cgroup(text: str, unit: str | None) -> None:
    assert _unit_from_cgroup(text) == unit


_UNIT = re.compile(r"[^/]+\.(?:service|scope)")


@given(st.text())
def test_unit_from_cgroup_never_raises_on_arbitrary_text(text: str) -> None:
    unit = _unit_from_cgroup(text)
    assert unit is None or (_UNIT.fullmatch(unit) and unit in text)


_COMPONENT = st.one_of(
    st.sampled_from(["system.slice", "user.slice", "app.slice", "payload", ""]),
    st.builds(
        lambda stem, suffix: stem + suffix,
        st.text(st.characters(blacklist_characters="/\n\r"), min_size=0, max_size=8),
        st.sampled_from([".service", ".scope", ".slice", ".mount", ""]),
    ),
)


@given(st.lists(_COMPONENT, max_size=6), st.sampled_from(["0", "1", "12"]))
def test_unit_from_cgroup_is_the_outermost_unit(parts: list[str], hierarchy: str) -> None:
    path = "/" + "/".join(parts)
    line = f"{hierarchy}::{path}"
    expected = None
    if hierarchy == "0":
        # Item 3 of issue 9: the first unit, and only when everything above it is a slice.
        for p in path.split("/")[1:]:
            if _UNIT.fullmatch(p):
                expected = p
                break
            if not re.fullmatch(r"[^/]+\.slice", p):
                break
    # splitlines() line boundaries inside a component would make it not one cgroup path
    assume(not any(ch in line for ch in "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"))
    assert _unit_from_cgroup(line + "\n") == expected


# --------------------------------------------------------------------------- ExeHashCache


def test_exe_hash_of_this_process_matches_hashlib_and_is_cached() -> None:
    cache = ExeHashCache()
    digest = cache.sha256(os.getpid())
    assert digest == _exe_sha256_of_self()
    assert len(cache._cache) == 1
    assert cache.sha256(os.getpid()) == digest
    assert len(cache._cache) == 1


def test_exe_hash_second_call_is_served_from_the_cache() -> None:
    cache = ExeHashCache()
    st_ = os.stat("/proc/self/exe")
    key = (st_.st_dev, st_.st_ino, st_.st_mtime_ns, st_.st_size)
    cache._cache[key] = "f" * 64  # a cached value no file hashes to
    assert cache.sha256(os.getpid()) == "f" * 64
    assert len(cache._cache) == 1


def test_exe_hash_size_limit_fails_closed() -> None:
    size = os.stat("/proc/self/exe").st_size
    assert ExeHashCache(max_bytes=size - 1).sha256(os.getpid()) is None
    assert ExeHashCache(max_bytes=size).sha256(os.getpid()) == _exe_sha256_of_self()
    small = ExeHashCache(max_bytes=size - 1)
    small.sha256(os.getpid())
    assert len(small._cache) == 0


def test_exe_hash_of_nonexistent_pid_is_none() -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    cache = ExeHashCache()
    assert cache.sha256(pid_max) is None  # pids are always below pid_max
    assert cache.sha256(-1) is None
    assert len(cache._cache) == 0


def test_exe_hash_of_a_reaped_child_is_none(peer: ForkedPeer) -> None:
    peer.exit_and_reap()
    assert ExeHashCache().sha256(peer.pid) is None


def test_exe_hash_cache_evicts_least_recently_used() -> None:
    proc = subprocess.Popen(["sleep", "60"])  # a process with another executable
    try:
        sleep_digest = hashlib.sha256(Path(f"/proc/{proc.pid}/exe").read_bytes()).hexdigest()
        own_digest = _exe_sha256_of_self()
        assert sleep_digest != own_digest

        cache = ExeHashCache(max_entries=2)
        assert cache.sha256(os.getpid()) == own_digest  # [self]
        fake_key = (-1, -1, -1, -1)
        cache._cache[fake_key] = "0" * 64  # [self, fake]
        assert cache.sha256(os.getpid()) == own_digest  # hit moves self last: [fake, self]
        assert cache.sha256(proc.pid) == sleep_digest  # [self, sleep]; fake evicted
        assert len(cache._cache) == 2
        assert fake_key not in cache._cache
        assert set(cache._cache.values()) == {own_digest, sleep_digest}

        tiny = ExeHashCache(max_entries=1)
        assert tiny.sha256(os.getpid()) == own_digest
        assert tiny.sha256(proc.pid) == sleep_digest
        assert list(tiny._cache.values()) == [sleep_digest]
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUT)


# --------------------------------------------------------------------------- selectors

DAEMON_UID = 0
DAEMON_GID = 0


def ident(**overrides: Any) -> PeerIdentity:
    base = PeerIdentity(
        pid=os.getpid(),
        uid=1000,
        gid=1000,
        user="alice",
        group="staff",
        supplementary_gids=(27, 100),
        supplementary_groups=("sudo", "users"),
        exe="/usr/bin/mcp-content",
        unit="mcp-content.service",
        start_time=12345,
        attestation="pidfd",
        same_mnt_ns=True,
    )
    return dataclasses.replace(base, **overrides)


def matches(sel: PeerSelector, who: PeerIdentity, **kw: Any) -> bool:
    kw.setdefault("daemon_uid", DAEMON_UID)
    kw.setdefault("daemon_gid", DAEMON_GID)
    return selector_matches(sel, who, **kw)


@pytest.mark.parametrize(
    ("sel", "expected"),
    [
        (PeerSelector(uid=1000), True),
        (PeerSelector(uid=1001), False),
        (PeerSelector(user="alice"), True),
        (PeerSelector(user="bob"), False),
        (PeerSelector(gid=1000), True),
        (PeerSelector(gid=27), False),  # a supplementary gid is not the gid
        (PeerSelector(group="staff"), True),
        (PeerSelector(group="sudo"), False),
        (PeerSelector(supplementary_group="users"), True),
        (PeerSelector(supplementary_group="sudo"), True),
        (PeerSelector(supplementary_group="staff"), False),  # primary group is not supplementary
        (PeerSelector(unit="mcp-content.service"), True),
        (PeerSelector(unit="mcp-other.service"), False),
        (PeerSelector(exe="/usr/bin/mcp-content"), True),
        (PeerSelector(exe="/usr/bin/mcp-content2"), False),
    ],
)
def test_selector_each_key(sel: PeerSelector, expected: bool) -> None:
    assert matches(sel, ident()) is expected


def test_selector_uid_and_gid_zero_are_real_values() -> None:
    root = ident(uid=0, gid=0)
    assert matches(PeerSelector(uid=0), root, daemon_uid=1000)
    assert matches(PeerSelector(gid=0), root, daemon_gid=1000)
    assert not matches(PeerSelector(uid=0), ident())
    assert not matches(PeerSelector(gid=0), ident())


def test_selector_self_resolves_against_the_daemon_ids() -> None:
    who = ident(uid=1234, gid=5678)
    assert matches(PeerSelector(uid="self"), who, daemon_uid=1234)
    assert not matches(PeerSelector(uid="self"), who, daemon_uid=1235)
    assert matches(PeerSelector(gid="self"), who, daemon_gid=5678)
    assert not matches(PeerSelector(gid="self"), who, daemon_gid=5679)
    # "self" for uid uses the daemon uid, not the gid (and vice versa)
    assert not matches(PeerSelector(uid="self"), who, daemon_uid=0, daemon_gid=1234)
    assert not matches(PeerSelector(gid="self"), who, daemon_uid=5678, daemon_gid=0)


def test_selector_keys_on_missing_identity_fields_never_match() -> None:
    who = ident(user=None, group=None, unit=None, exe=None, supplementary_groups=())
    for sel in (
        PeerSelector(user="alice"),
        PeerSelector(group="staff"),
        PeerSelector(unit="mcp-content.service"),
        PeerSelector(exe="/usr/bin/mcp-content"),
        PeerSelector(supplementary_group="users"),
    ):
        assert not matches(sel, who), sel


def test_selector_exe_sha256() -> None:
    digest = _exe_sha256_of_self()
    hashes = ExeHashCache()
    me = ident()  # pid is this process
    assert matches(PeerSelector(exe_sha256=digest), me, exe_hashes=hashes)
    assert not matches(PeerSelector(exe_sha256="0" * 64), me, exe_hashes=hashes)
    # without a hash cache the key cannot be checked: fail closed
    assert not matches(PeerSelector(exe_sha256=digest), me)
    # a pid that does not exist has no hash
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert not matches(PeerSelector(exe_sha256=digest), ident(pid=pid_max), exe_hashes=hashes)
    # a hash limit below the executable's size: fail closed
    size = os.stat("/proc/self/exe").st_size
    assert not matches(
        PeerSelector(exe_sha256=digest), me, exe_hashes=ExeHashCache(max_bytes=size - 1)
    )
    # combined with other keys, all must hold
    assert matches(PeerSelector(uid=1000, exe_sha256=digest), me, exe_hashes=hashes)
    assert not matches(PeerSelector(uid=1001, exe_sha256=digest), me, exe_hashes=hashes)


def test_empty_selector_never_matches() -> None:
    assert not matches(PeerSelector(), ident())
    assert not matches(PeerSelector(), ident(uid=DAEMON_UID, gid=DAEMON_GID))


def test_selector_requires_all_keys() -> None:
    assert matches(PeerSelector(uid=1000, user="alice", unit="mcp-content.service"), ident())
    assert not matches(PeerSelector(uid=1000, user="bob"), ident())
    assert not matches(PeerSelector(user="alice", unit="other.service"), ident())
    assert not matches(PeerSelector(uid=1000, exe="/usr/bin/evil"), ident())


_GOOD: dict[str, Any] = {
    "uid": 1000,
    "user": "alice",
    "gid": 1000,
    "group": "staff",
    "supplementary_group": "users",
    "unit": "mcp-content.service",
    "exe": "/usr/bin/mcp-content",
}
_BAD: dict[str, Any] = {
    "uid": 1001,
    "user": "bob",
    "gid": 1001,
    "group": "wheel",
    "supplementary_group": "docker",
    "unit": "other.service",
    "exe": "/usr/bin/evil",
}


@given(
    keys=st.sets(st.sampled_from(sorted(_GOOD))),
    wrong=st.none() | st.sampled_from(sorted(_GOOD)),
)
def test_selector_is_the_conjunction_of_its_keys(keys: set[str], wrong: str | None) -> None:
    kwargs = {k: _GOOD[k] for k in keys}
    if wrong is not None:
        kwargs[wrong] = _BAD[wrong]
    expected = bool(kwargs) and wrong is None
    assert matches(PeerSelector(**kwargs), ident()) is expected


def test_servers_of_peer_lists_only_matching_servers_in_order() -> None:
    peers: dict[str, list[PeerSelector]] = {
        "content-api": [PeerSelector(uid=1001), PeerSelector(unit="mcp-content.service")],
        "analytics-db": [PeerSelector(uid=1001)],
        "empty": [],
        "empty-selector": [PeerSelector()],
        "by-user": [PeerSelector(user="alice", gid=1000)],
        "half-match": [PeerSelector(user="alice", gid=1001)],
    }
    got = servers_of_peer(peers, ident(), daemon_uid=DAEMON_UID, daemon_gid=DAEMON_GID)
    assert got == ["content-api", "by-user"]
    assert servers_of_peer({}, ident(), daemon_uid=DAEMON_UID, daemon_gid=DAEMON_GID) == []


def test_servers_of_peer_passes_daemon_ids_and_exe_hashes() -> None:
    digest = _exe_sha256_of_self()
    peers = {
        "mine": [PeerSelector(uid="self")],
        "hashed": [PeerSelector(exe_sha256=digest)],
    }
    who = ident(uid=4321)
    assert servers_of_peer(peers, who, daemon_uid=4321, daemon_gid=0) == ["mine"]
    assert servers_of_peer(
        peers, who, daemon_uid=4321, daemon_gid=0, exe_hashes=ExeHashCache()
    ) == ["mine", "hashed"]
    assert servers_of_peer(peers, who, daemon_uid=1, daemon_gid=0, exe_hashes=ExeHashCache()) == [
        "hashed"
    ]


# --------------------------------------------------------------------------- RBAC tiers


def tier(rbac: RbacConfig, who: PeerIdentity, *, is_service: bool = False, **kw: Any) -> str:
    kw.setdefault("daemon_uid", DAEMON_UID)
    kw.setdefault("daemon_gid", DAEMON_GID)
    return tier_of(rbac, who, is_service=is_service, **kw)


def test_daemon_uid_is_always_owner() -> None:
    nothing = RbacConfig(owner=RbacEntry())
    assert tier(nothing, ident(uid=DAEMON_UID)) == "owner"
    assert tier(nothing, ident(uid=4242), daemon_uid=4242) == "owner"
    # default owner entry is uids: [self]
    assert tier(RbacConfig(), ident(uid=4242), daemon_uid=4242) == "owner"
    assert tier(RbacConfig(), ident(uid=4242), daemon_uid=1) == "anonymous"


@pytest.mark.parametrize(
    ("entry", "who"),
    [
        (RbacEntry(uids=[1000]), ident()),
        (RbacEntry(users=["alice"]), ident()),
        (RbacEntry(gids=[1000]), ident()),  # primary gid
        (RbacEntry(gids=[100]), ident()),  # supplementary gid
        (RbacEntry(gids=["self"]), ident(gid=DAEMON_GID)),
        (RbacEntry(gids=["self"]), ident(gid=5, supplementary_gids=(DAEMON_GID,))),
        (RbacEntry(groups=["staff"]), ident()),  # primary group name
        (RbacEntry(groups=["users"]), ident()),  # supplementary group name
        (RbacEntry(units=["mcp-content.service"]), ident()),
    ],
)
@pytest.mark.parametrize("level", ["owner", "admin", "security", "approver", "service"])
def test_each_entry_key_grants_its_tier(entry: RbacEntry, who: PeerIdentity, level: str) -> None:
    kwargs: dict[str, RbacEntry] = {"owner": RbacEntry(), level: entry}
    rbac = RbacConfig(**kwargs)
    assert tier(rbac, who) == level
    assert tier(rbac, who, is_service=True) == level


@pytest.mark.parametrize(
    "entry",
    [
        RbacEntry(uids=[1001]),
        RbacEntry(uids=["self"]),  # daemon uid is 0, peer is 1000
        RbacEntry(users=["bob"]),
        RbacEntry(gids=[1001]),
        RbacEntry(gids=["self"]),  # daemon gid is 0
        RbacEntry(groups=["wheel"]),
        RbacEntry(units=["other.service"]),
        RbacEntry(),
    ],
)
def test_non_matching_entries_grant_nothing(entry: RbacEntry) -> None:
    rbac = RbacConfig(admin=entry, security=entry, approver=entry, service=entry)
    assert tier(rbac, ident()) == "anonymous"
    assert tier(rbac, ident(), is_service=True) == "service"


def test_missing_identity_names_never_match_entries() -> None:
    who = ident(user=None, group=None, unit=None, supplementary_groups=())
    rbac = RbacConfig(
        admin=RbacEntry(users=["alice"]),
        security=RbacEntry(groups=["staff", "users"]),
        approver=RbacEntry(units=["mcp-content.service"]),
    )
    assert tier(rbac, who) == "anonymous"


_LEVELS = ["owner", "admin", "security", "approver", "service"]


@pytest.mark.parametrize(
    ("high", "low"),
    [(h, lo) for i, h in enumerate(_LEVELS) for lo in _LEVELS[i + 1 :]],
)
def test_tier_priority_for_every_pair(high: str, low: str) -> None:
    """A peer listed in two tiers (by different keys) gets the higher one."""
    kwargs: dict[str, RbacEntry] = {
        "owner": RbacEntry(),
        high: RbacEntry(users=["alice"]),
        low: RbacEntry(uids=[1000]),
    }
    assert tier(RbacConfig(**kwargs), ident()) == high
    kwargs[high], kwargs[low] = RbacEntry(units=["mcp-content.service"]), RbacEntry(gids=[100])
    assert tier(RbacConfig(**kwargs), ident()) == high


def test_tier_priority_highest_wins() -> None:
    who = ident()
    rbac = RbacConfig(
        owner=RbacEntry(units=["nope.service"]),
        admin=RbacEntry(users=["nobody-here"]),
        security=RbacEntry(groups=["users"]),
        approver=RbacEntry(uids=[1000]),
        service=RbacEntry(units=["mcp-content.service"]),
    )
    assert tier(rbac, who) == "security"
    rbac2 = RbacConfig(
        owner=RbacEntry(groups=["sudo"]),
        admin=RbacEntry(uids=[1000]),
        security=RbacEntry(uids=[1000]),
        approver=RbacEntry(uids=[1000]),
        service=RbacEntry(uids=[1000]),
    )
    assert tier(rbac2, who) == "owner"
    rbac3 = RbacConfig(approver=RbacEntry(uids=[1000]), service=RbacEntry(uids=[1000]))
    assert tier(rbac3, who) == "approver"
    assert tier(rbac3, who, is_service=True) == "approver"  # is_service is only a floor


def test_service_entry_versus_is_service() -> None:
    rbac = RbacConfig(service=RbacEntry(units=["mcp-content.service"]))
    assert tier(rbac, ident()) == "service"
    assert tier(rbac, ident(unit="x.service")) == "anonymous"
    assert tier(rbac, ident(unit="x.service"), is_service=True) == "service"


def test_tier_allows_ordering() -> None:
    order = ["anonymous", "service", "approver", "security", "admin", "owner"]
    assert sorted(TIER_RANK, key=TIER_RANK.__getitem__) == order
    for i, have in enumerate(order):
        for j, need in enumerate(order):
            assert tier_allows(have, need) is (i >= j), (have, need)


@pytest.mark.parametrize("unknown", ["", "root", "Owner", "superuser"])
def test_unknown_tier_allows_nothing(unknown: str) -> None:
    for need in TIER_RANK:
        assert tier_allows(unknown, need) is False


def test_unknown_minimum_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        tier_allows("owner", "root")


# --------------------------------------------------------------------------- issue 9: groups, exe file, mount namespace


def test_attest_records_the_mount_namespace_and_the_exe_file() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, attest(a) as handle:
        st_ = os.stat("/proc/self/exe")
        assert handle.identity.same_mnt_ns is True
        assert handle.identity.exe_id == (st_.st_dev, st_.st_ino)


@needs_root
def test_attest_of_a_peer_in_another_mount_namespace(use_pidfd: bool) -> None:
    """A child that unshare()d its mount namespace before connecting: same_mnt_ns is
    False, and its exe file is still identified (same device and inode)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def own_mount_namespace() -> None:
        if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")

    with ForkedPeer(own_mount_namespace) as peer, attest(peer.sock, use_pidfd=use_pidfd) as handle:
        st_ = os.stat("/proc/self/exe")
        assert handle.identity.same_mnt_ns is False
        assert handle.identity.exe_id == (st_.st_dev, st_.st_ino)
        handle.recheck()  # another namespace is not a change


def test_recheck_compares_the_exe_file_not_only_its_path() -> None:
    """Same path, another file (what a mount in a private namespace produces):
    peer_changed. The path alone is compared only when the file was unreadable."""
    me = _own_identity()
    assert me.exe_id is not None
    with PeerHandle(dataclasses.replace(me, exe_id=(me.exe_id[0], me.exe_id[1] + 1)),
                    pidfd=None, dir_fd=_proc_self_dir_fd()) as h:
        with pytest.raises(Denied) as exc_info:
            h.recheck()
        assert _code(exc_info) == "peer_changed"
    with PeerHandle(dataclasses.replace(me, exe_id=None), pidfd=None, dir_fd=_proc_self_dir_fd()) as h:
        h.recheck()
    with PeerHandle(dataclasses.replace(me, exe_id=None, exe="/usr/bin/other"),
                    pidfd=None, dir_fd=_proc_self_dir_fd()) as h:
        with pytest.raises(Denied) as exc_info:
            h.recheck()
        assert _code(exc_info) == "peer_changed"


def test_recheck_compares_supplementary_groups() -> None:
    me = _own_identity()
    with PeerHandle(dataclasses.replace(me, supplementary_gids=(*me.supplementary_gids, 4242)),
                    pidfd=None, dir_fd=_proc_self_dir_fd()) as h:
        with pytest.raises(Denied) as exc_info:
            h.recheck()
        assert _code(exc_info) == "peer_changed"


@needs_root
def test_recheck_after_peer_setgroups_is_peer_changed(use_pidfd: bool) -> None:
    """A real process that only changes its supplementary groups after connecting
    (uid and gid unchanged): peer_changed."""
    with ForkedPeer(lambda: os.setgroups([])) as peer, attest(peer.sock, use_pidfd=use_pidfd) as handle:
        assert handle.identity.supplementary_gids == ()
        handle.recheck()
        peer.command(b"G")  # setgroups([nobody's gid]); uid and gid unchanged
        with pytest.raises(Denied) as exc_info:
            handle.recheck()
        assert _code(exc_info) == "peer_changed"


def test_exe_key_in_another_mount_namespace_needs_the_very_file(tmp_path: Path) -> None:
    """Pure rule with a real file: in the daemon's namespace the path decides; in
    another, the peer's file (device, inode) must be the one the path names here.
    Without the means to stat (no ExeHashCache) or an unknown file: no match."""
    exe = tmp_path / "mcp-content"
    exe.write_bytes(b"\x7fELF")
    st_ = os.stat(exe)
    real = (st_.st_dev, st_.st_ino)
    cache = ExeHashCache()
    sel = PeerSelector(exe=str(exe))
    assert matches(sel, ident(exe=str(exe), same_mnt_ns=True, exe_id=None))
    assert matches(sel, ident(exe=str(exe), same_mnt_ns=False, exe_id=real), exe_hashes=cache)
    assert not matches(sel, ident(exe=str(exe), same_mnt_ns=False, exe_id=(real[0], real[1] + 1)),
                       exe_hashes=cache)
    assert not matches(sel, ident(exe=str(exe), same_mnt_ns=False, exe_id=real))  # no cache
    assert not matches(sel, ident(exe=str(exe), same_mnt_ns=False, exe_id=None), exe_hashes=cache)
    # the path must still be the peer's path
    assert not matches(sel, ident(exe="/elsewhere", same_mnt_ns=False, exe_id=real), exe_hashes=cache)
    # a path that does not exist here names no file
    gone = PeerSelector(exe=str(tmp_path / "missing"))
    assert not matches(gone, ident(exe=str(tmp_path / "missing"), same_mnt_ns=False, exe_id=real),
                       exe_hashes=cache)
    # keys other than exe do not care about the namespace
    assert matches(PeerSelector(uid=1000), ident(same_mnt_ns=False, exe_id=None))
    # the default for an identity built without namespace facts is "another": fail closed
    bare = dataclasses.replace(ident(exe=str(exe)))
    assert not matches(sel, PeerIdentity(**{
        f: getattr(bare, f) for f in ("pid", "uid", "gid", "user", "group", "supplementary_gids",
                                      "supplementary_groups", "exe", "unit", "start_time",
                                      "attestation")}))


# --------------------------------------------------------------------------- issue 10: mutants that survived
# Crafted /proc-like inputs (a temp dir opened as the /proc/<pid> dirfd, or peer.PROC
# pointed at a temp tree) reach the branches a live kernel does not produce on demand.

UNKNOWN_GID = 4242421  # a gid no group database on a test machine names


def _status_text(
    *, uid: str, gid: str, groups: str = "", state: str | None = "S (sleeping)"
) -> bytes:
    """A /proc/<pid>/status as the kernel lays it out (fields in its order)."""
    lines = ["Name:\tfake", "Umask:\t0022"]
    if state is not None:
        lines.append(f"State:\t{state}")
    lines += ["Tgid:\t1", "Pid:\t1", f"Uid:\t{uid}", f"Gid:\t{gid}", "FDSize:\t64", f"Groups:\t{groups}"]
    return ("\n".join(lines) + "\n").encode()


def _crafted_proc_dir(where: Path, files: dict[str, bytes]) -> int:
    """A directory holding *files*, opened the way attest opens /proc/<pid>."""
    where.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (where / name).write_bytes(content)
    return os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _own_proc_files() -> dict[str, bytes]:
    """This process's real status and stat (uid, gid, groups and start time match
    ``_own_identity()``), but no ``exe``."""
    return {name: Path(f"/proc/self/{name}").read_bytes() for name in ("status", "stat")}


@contextlib.contextmanager
def _fd_zero_free() -> Iterator[None]:
    """Run with fd 0 closed, as in a daemon started with stdin closed: the next fd the
    process opens is number 0. Restores stdin (closing whatever was left on 0); works
    when the test run itself has no stdin too."""
    try:
        saved: int | None = os.dup(0)
    except OSError:  # already closed (a runner without stdin)
        saved = None
    else:
        os.close(0)
    try:
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 0)
            os.close(saved)
        else:
            with contextlib.suppress(OSError):
                os.close(0)


def _as_nobody_in_a_child(fn: Callable[[], bool]) -> int:
    """Run ``fn`` in a forked child that dropped to nobody (a daemon that is not root).
    Returns 0 when fn returned True, 1 when False, 2 when it raised."""
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            os.setgroups([])
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
            code = 0 if fn() else 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the child did not finish in time")


def test_status_field_finds_a_key_at_either_end_of_the_text() -> None:
    """The parser takes a key wherever it stands, first or last, with or without a
    trailing newline; a missing key is an error (the caller refuses the peer)."""
    assert _status_field(b"\nUid:\t1\t2\t3\t4", b"\nUid:") == b"\t1\t2\t3\t4"
    assert _status_field(b"\nUid:\t1\n\nGid:\t5\n", b"\nUid:") == b"\t1"
    assert _status_field(b"Name:\tx\nGroups:\n", b"\nGroups:") == b""
    with pytest.raises(ValueError):
        _status_field(b"Name:\tUid:\t0\n", b"\nUid:")  # only at a line start


@pytest.mark.parametrize(
    "status",
    [
        _status_text(uid="0\t0\t0\t0\t0", gid="0\t0\t0\t0"),  # a 5th uid: unknown format
        _status_text(uid="0\t0\t0\t0", gid="0\t0\t0\t0\t0"),  # a 5th gid
        _status_text(uid="0\t0\t0", gid="0\t0\t0\t0"),
        _status_text(uid="0\t0\t0\t0", gid="0\t0\t0"),
        _status_text(uid="0\t0\t0\t0", gid="0\t0\t0\t0", state=""),  # empty State
        _status_text(uid="0\t0\t0\t0", gid="0\t0\t0\t0", state=None),  # no State
        _status_text(uid="0\tx\t0\t0", gid="0\t0\t0\t0"),
        b"Name:\tfake\n",
    ],
    ids=["uid5", "gid5", "uid3", "gid3", "state-empty", "state-missing", "uid-nan", "bare"],
)
def test_a_malformed_status_is_refused_not_parsed(tmp_path: Path, status: bytes) -> None:
    """A status text not in the kernel's known layout (four uids, four gids, a state)
    is an error, never partly used; recheck then answers peer_gone."""
    dir_fd = _crafted_proc_dir(tmp_path / "pid", {"status": status})
    try:
        with pytest.raises(ValueError):
            _proc_facts(dir_fd, with_start_time=False)
    finally:
        os.close(dir_fd)
    me = _own_identity(uid=0, gid=0, supplementary_gids=(), exe=None, exe_id=None)
    with PeerHandle(me, pidfd=os.pidfd_open(os.getpid()),
                    dir_fd=_crafted_proc_dir(tmp_path / "pid", {"status": status})) as h:
        with pytest.raises(Denied) as exc_info:
            h.recheck()
        assert _code(exc_info) == "peer_gone"


def test_a_well_formed_crafted_status_parses(tmp_path: Path) -> None:
    status = _status_text(uid="1\t2\t3\t4", gid="5\t6\t7\t8", groups="9 3 7")
    dir_fd = _crafted_proc_dir(tmp_path / "pid", {"status": status})
    try:
        facts = _proc_facts(dir_fd, with_start_time=False)
    finally:
        os.close(dir_fd)
    assert (facts.uids, facts.gids, facts.groups, facts.state, facts.start_time) == (
        (1, 2, 3, 4), (5, 6, 7, 8), (3, 7, 9), "S", -1
    )


@pytest.mark.parametrize(
    ("exe", "exe_id", "code"),
    [
        (None, None, None),  # attest could not read exe (daemon not root): nothing to compare
        ("/usr/bin/x", (1, 2), "peer_changed"),  # the file was known, now it cannot be read
        ("/usr/bin/x", None, "peer_changed"),  # the path was known, now it cannot be read
    ],
)
def test_recheck_when_exe_is_unreadable(
    tmp_path: Path, exe: str | None, exe_id: tuple[int, int] | None, code: str | None
) -> None:
    """recheck of a process whose ``exe`` can no longer be read: refused when attest had
    read it (the file or path cannot be shown to be the same), accepted when attest had
    nothing to compare either. The crafted dir has this process's status and stat, no exe."""
    me = _own_identity(exe=exe, exe_id=exe_id)
    with PeerHandle(me, pidfd=None, dir_fd=_crafted_proc_dir(tmp_path / "pid", _own_proc_files())) as h:
        if code is None:
            h.recheck()
            h.recheck()
        else:
            with pytest.raises(Denied) as exc_info:
                h.recheck()
            assert _code(exc_info) == code


@needs_root
def test_attest_after_peer_setgid_only_is_peer_changed(peer: ForkedPeer, use_pidfd: bool) -> None:
    """SO_PEERCRED keeps the gid of connect(); the process then changed only its gid
    (uid unchanged): refused at attest, not only at the first recheck."""
    peer.command(b"g")
    before = _open_fds()
    with pytest.raises(Denied) as exc_info:
        attest(peer.sock, use_pidfd=use_pidfd)
    assert _code(exc_info) == "peer_changed"
    assert _open_fds() == before
    peer.exit_and_reap()


@needs_root
def test_attest_names_exactly_the_known_supplementary_groups() -> None:
    """supplementary_groups (what ``supplementary_group`` selectors and RBAC ``groups``
    compare) holds the names of the groups that have one, and nothing for a gid no group
    database names; supplementary_gids keeps every gid."""
    with pytest.raises(KeyError):
        grp.getgrgid(UNKNOWN_GID)
    with ForkedPeer(lambda: os.setgroups([0, UNKNOWN_GID])) as peer, attest(peer.sock) as handle:
        assert handle.identity.supplementary_gids == (0, UNKNOWN_GID)
        assert handle.identity.supplementary_groups == (grp.getgrgid(0).gr_name,)


def test_a_handle_whose_fd_is_number_zero_works_and_is_released(use_pidfd: bool) -> None:
    """In a daemon started with stdin closed the pidfd or /proc dirfd can be fd 0: a
    valid fd that recheck must use and close() must release."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, _fd_zero_free():
        before = _open_fds()
        handle = attest(a, use_pidfd=use_pidfd)
        try:
            assert os.fstat(0)  # the handle holds fd 0
            handle.recheck()
        finally:
            handle.close()
        assert _open_fds() == before
        with pytest.raises(OSError):
            os.fstat(0)


def test_a_refused_attest_releases_fd_zero(peer: ForkedPeer, use_pidfd: bool) -> None:
    peer.exit()
    peer.wait_exited()  # a zombie: the fds open, then attest refuses
    with _fd_zero_free():
        before = _open_fds()
        with pytest.raises(Denied) as exc_info:
            attest(peer.sock, use_pidfd=use_pidfd)
        assert _code(exc_info) == "peer_gone"
        assert _open_fds() == before
    assert peer.reap() == 0


@needs_root
def test_pidfd_alive_for_a_process_the_daemon_may_not_signal() -> None:
    """A daemon that is not root may not signal a peer of another uid (EPERM): that
    peer is alive, not gone. Here a child running as nobody asks about a root process."""
    parent = os.getpid()
    assert _as_nobody_in_a_child(lambda: _pidfd_alive(os.pidfd_open(parent))) == 0


def test_pidfd_alive_is_false_once_reaped(peer: ForkedPeer) -> None:
    pidfd = os.pidfd_open(peer.pid)
    try:
        assert _pidfd_alive(pidfd)
        peer.exit_and_reap()
        assert not _pidfd_alive(pidfd)
    finally:
        os.close(pidfd)


def test_same_mnt_ns_is_false_when_unknown(tmp_path: Path, peer: ForkedPeer) -> None:
    """No readable ``ns/mnt`` (not a /proc dir, a reaped process, no ptrace access)
    counts as another mount namespace: exe selectors then need the very file."""
    with contextlib.ExitStack() as stack:
        own = _proc_self_dir_fd()
        stack.callback(os.close, own)
        assert _same_mnt_ns(own) is True
        crafted = _crafted_proc_dir(tmp_path / "pid", _own_proc_files())
        stack.callback(os.close, crafted)
        assert _same_mnt_ns(crafted) is False
        child = os.open(f"/proc/{peer.pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        stack.callback(os.close, child)
        assert _same_mnt_ns(child) is True
        peer.exit_and_reap()
        assert _same_mnt_ns(child) is False


@needs_root
def test_same_mnt_ns_is_false_without_ptrace_access() -> None:
    """A daemon that is not root cannot read a root peer's ns/mnt: another namespace."""
    parent = os.getpid()

    def check() -> bool:
        fd = os.open(f"/proc/{parent}", os.O_RDONLY | os.O_DIRECTORY)
        return _same_mnt_ns(fd) is False

    assert _as_nobody_in_a_child(check) == 0


def test_pidfd_pid_is_none_when_fdinfo_cannot_be_read_or_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """_pidfd_pid answers None (attest then refuses: None is no pid) for an fd that is
    not open or an fdinfo it cannot parse, instead of raising."""
    pidfd = os.pidfd_open(os.getpid())
    assert _pidfd_pid(pidfd) == os.getpid()
    os.close(pidfd)
    assert _pidfd_pid(pidfd) is None  # no such fd any more
    fdinfo = tmp_path / "self" / "fdinfo"
    fdinfo.mkdir(parents=True)
    (fdinfo / "7").write_bytes(b"pos:\t0\nPid:\tforty-two\n")
    (fdinfo / "8").write_bytes(b"pos:\t0\nflags:\t02000002\n")
    monkeypatch.setattr(peer_module, "PROC", str(tmp_path))
    assert _pidfd_pid(7) is None
    assert _pidfd_pid(8) is None


def test_attest_without_a_cgroup_file_has_no_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel without cgroups (no /proc/<pid>/cgroup) still attests peers, with no
    unit (unit selectors then fail to match); exe and the namespace are unknown here
    too (the crafted dir has neither), which also fails closed."""
    _crafted_proc_dir(tmp_path / str(os.getpid()), _own_proc_files())
    monkeypatch.setattr(peer_module, "PROC", str(tmp_path))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, attest(a, use_pidfd=False) as handle:
        ident = handle.identity
        assert (ident.pid, ident.uid, ident.gid) == (os.getpid(), os.geteuid(), os.getegid())
        assert (ident.unit, ident.exe, ident.exe_id, ident.same_mnt_ns) == (None, None, None, False)
        handle.recheck()


def test_exe_hash_read_error_is_no_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An executable that opens but fails to read (EIO) yields no hash, so an
    exe_sha256 selector does not match; it does not raise into the connection."""
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "exe").symlink_to("/proc/self/mem")  # regular file; read at 0: EIO
    monkeypatch.setattr(peer_module, "PROC", str(tmp_path))
    cache = ExeHashCache()
    assert cache.sha256(4242) is None
    assert len(cache._cache) == 0
