"""Peer attestation: which process is on the other end of a Unix socket connection.

At accept the daemon reads the kernel's record of the connecting process
(``SO_PEERCRED``: pid, uid, gid as of ``connect()``), pins that process with
``SO_PEERPIDFD`` (Linux >= 6.5) and reads ``/proc/<pid>`` for its executable,
systemd unit (from the cgroup path), groups and start time. Reading ``/proc`` by pid
races with pid reuse, so after the reads the pidfd is checked to still name that pid:
if the original process died and the pid was recycled, the pidfd says so and the
connection is refused. :meth:`PeerHandle.recheck` repeats the check (alive, same
effective uid, gid and supplementary groups, same executable file) before every request
that needs more than the anonymous tier and again right before a secret leaves, which
defeats "connect, exit, hand the fd to a process with another identity" and "connect,
then setuid()".

``exe`` selectors compare the path ``/proc/<pid>/exe`` shows, which is the path as the
*peer's* mount namespace sees it: a user who can create a user and mount namespace can
make any path name a file of its choice there. So an ``exe`` key matches a peer in
another mount namespace only when the file the peer runs is the very file (device and
inode) that the configured path names in the daemon's own namespace.

``unit`` comes from the cgroup v2 path and counts only when every cgroup above the unit
is a ``*.slice``: a cgroup subtree that someone was delegated (or made by hand) can hold
directories with any name.

On kernels without ``SO_PEERPIDFD`` the fallback holds a ``/proc/<pid>`` directory
fd (reads through it fail with ESRCH once that process is gone, even if the pid is
reused) and re-checks start time and uid; that is weaker, and the identity says
``attestation: "best-effort"``.

uid/gid are the security boundary: a process running under the same uid can
ptrace another, so every MCP server should run under its own uid (or systemd
``DynamicUser=``).

A peer in a PID namespace the daemon cannot see (a Kubernetes sidecar without
``shareProcessNamespace``: the daemon's namespace is a sibling of the client's, or a
child of it) has no pid here: ``SO_PEERCRED`` says pid 0 (uid and gid are still the
kernel's, mapped into the daemon's user namespace), ``SO_PEERPIDFD`` still gives a
pidfd whose fdinfo says ``Pid: 0``, ``pidfd_send_signal`` on it fails with EINVAL and
``PIDFD_GET_INFO`` with EREMOTE; only ``poll()`` on it works (readable once the
process exited). :func:`attest` refuses such a peer (:class:`PidNotVisible`);
:func:`attest_uid_only` makes a handle with ``attestation: "uid-only"`` out of the
uid and gid alone, which :func:`selector_matches` lets match nothing unless the
caller says the uid-only mode is on (``attestation.pid_namespace: uid_only``), and
then only selectors made of uid/user/gid/group keys; :func:`tier_of` gives such a
peer at most ``service``.

The selector and RBAC functions at the bottom are pure.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import hashlib
import os
import pwd
import re
import select
import signal
import socket
import stat
import struct
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from .config import UID_ONLY_SELECTOR_KEYS as _UID_ONLY_KEYS
from .protocol import Denied

if TYPE_CHECKING:
    from .config import PeerSelector, RbacConfig, RbacEntry

SO_PEERPIDFD = 77  # include/uapi/asm-generic/socket.h; Python has no constant
_UCRED = struct.Struct("3i")
_UNIT_RE = re.compile(r"[^/]+\.(?:service|scope)$")
_SLICE_RE = re.compile(r"[^/]+\.slice$")
PROC = "/proc"

TIER_RANK: dict[str, int] = {
    "owner": 5,
    "admin": 4,
    "security": 3,
    "approver": 2,
    "service": 1,
    "anonymous": 0,
}

Attestation = Literal["pidfd", "best-effort", "uid-only"]

# Selector keys a uid-only peer can be matched on: facts of the socket's SO_PEERCRED
# (user and group are the names the daemon's own passwd/group give those ids). Any other
# key (supplementary_group, unit, exe, exe_sha256) needs /proc/<pid>, which such a peer
# does not have here.
UID_ONLY_SELECTOR_KEYS = frozenset(_UID_ONLY_KEYS)


@lru_cache(maxsize=1024)
def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


@lru_cache(maxsize=1024)
def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """What the kernel says about the connecting process. Immutable per connection."""

    pid: int
    uid: int
    gid: int
    user: str | None
    group: str | None
    supplementary_gids: tuple[int, ...]
    supplementary_groups: tuple[str, ...]
    exe: str | None
    unit: str | None
    start_time: int  # clock ticks since boot (/proc/<pid>/stat field 22)
    attestation: Attestation
    # Whether the peer's mount namespace is the daemon's (/proc/<pid>/ns/mnt and
    # /proc/self/ns/mnt name one namespace). False when unknown: fail closed.
    same_mnt_ns: bool = False
    # (st_dev, st_ino) of the file the peer runs, read through /proc/<pid>/exe (which
    # opens the real file, whatever path the peer's namespace shows); None if unreadable.
    exe_id: tuple[int, int] | None = None

    def audit(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "uid": self.uid,
            "gid": self.gid,
            "unit": self.unit,
            "exe": self.exe,
            "attestation": self.attestation,
        }


# --------------------------------------------------------------------------- /proc reads


@dataclass(frozen=True, slots=True)
class _ProcFacts:
    uids: tuple[int, int, int, int]  # real, effective, saved, fs
    gids: tuple[int, int, int, int]
    groups: tuple[int, ...]
    start_time: int
    state: str


def _read_at(dir_fd: int, name: str, limit: int = 64 * 1024) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def _status_field(raw: bytes, key: bytes) -> bytes:
    """The value of ``key`` (e.g. ``b"\\nUid:"``) in a /proc status text.

    The kernel escapes newlines in ``Name:``, so a key found after a newline is the
    field itself, not text a process chose.
    """
    i = raw.find(key)
    if i < 0:
        raise ValueError(f"no {key!r} in /proc status")
    i += len(key)
    j = raw.find(b"\n", i)
    return raw[i:] if j < 0 else raw[i:j]


STATUS_READ_MAX = 64 * 1024  # room for a long Groups line


def _proc_facts(dir_fd: int, *, with_start_time: bool = True,
                status_fd: int | None = None) -> _ProcFacts:
    """Parse status (and stat) through a /proc/<pid> directory fd (ESRCH once it is gone).

    ``with_start_time=False`` skips the stat read (start time -1): a live pidfd already
    proves the process is the same one. This runs on every request above the anonymous
    tier, so status is read once and searched, not split into lines. ``status_fd``: an
    open ``status`` of the same directory, re-read from offset 0 (a /proc seq_file
    regenerates its text for a read at offset 0, and fails with ESRCH once the process
    is reaped, like an open through the directory): one syscall instead of three.
    """
    if status_fd is None:
        raw = _read_at(dir_fd, "status", STATUS_READ_MAX)
    else:
        raw = os.pread(status_fd, STATUS_READ_MAX, 0)
    uids = tuple(map(int, _status_field(raw, b"\nUid:").split()))
    gids = tuple(map(int, _status_field(raw, b"\nGid:").split()))
    groups = tuple(sorted(map(int, _status_field(raw, b"\nGroups:").split())))
    state = _status_field(raw, b"\nState:").strip()[:1].decode("ascii", "replace")
    if len(uids) != 4 or len(gids) != 4 or not state:
        raise ValueError("unexpected /proc status format")
    start_time = -1
    if with_start_time:
        raw_stat = _read_at(dir_fd, "stat").decode("utf-8", "replace")
        # comm may contain spaces and parentheses: split after the last ')'.
        rest = raw_stat[raw_stat.rindex(")") + 2 :].split()
        start_time = int(rest[19])
    return _ProcFacts(
        uids=(uids[0], uids[1], uids[2], uids[3]),
        gids=(gids[0], gids[1], gids[2], gids[3]),
        groups=groups,
        start_time=start_time,
        state=state,
    )


def _unit_from_cgroup(text: str) -> str | None:
    """The systemd unit of a cgroup v2 path, or None.

    Rule: walk the path from the root; every component before the unit must be a
    ``*.slice``, and the first ``*.service``/``*.scope`` reached is the unit
    (``/system.slice/x.service``, ``/init.scope``,
    ``/user.slice/user-1000.slice/user@1000.service/...`` -> ``user@1000.service``).
    Anything else yields no unit: a first component that is not a slice
    (``/delegated/mcp-content-api.service``, a hand-made or container cgroup), and
    every name *inside* a unit's subtree, which whoever the unit delegates to
    (``Delegate=yes``, a user's service manager, where ``systemd-run --user
    --unit=anything.service`` works) may choose. Slices directly below the root are
    created by the system manager, which only root can write to.
    """
    for line in text.splitlines():
        hierarchy, _, path = line.partition("::")
        if hierarchy != "0":
            continue
        if not path.startswith("/"):
            return None
        for part in path[1:].split("/"):
            if _UNIT_RE.fullmatch(part):
                return part
            if not _SLICE_RE.fullmatch(part):
                return None
        return None
    return None


def _pidfd_pid(pidfd: int) -> int | None:
    """The pid a pidfd refers to per its fdinfo; -1 once the process was reaped."""
    try:
        with open(f"{PROC}/self/fdinfo/{pidfd}", "rb") as f:
            for line in f.read(4096).splitlines():
                if line.startswith(b"Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _pidfd_alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, we may not signal it (daemon not root)
    return True


def _ns_id(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _same_mnt_ns(dir_fd: int) -> bool:
    """Whether the process of a /proc/<pid> dirfd shares this process's mount namespace.

    A namespace is identified by the device and inode of its ``ns/mnt`` file. Unreadable
    (no ptrace-read access, process gone) counts as another namespace: fail closed.
    """
    try:
        return _ns_id(os.stat("ns/mnt", dir_fd=dir_fd)) == _ns_id(os.stat(f"{PROC}/self/ns/mnt"))
    except OSError:
        return False


class PidNotVisible(Denied):
    """The kernel reports no pid for the peer: it runs in a PID namespace the daemon
    cannot see (or it is no process at all). :func:`attest_uid_only` may still say who
    it is by uid and gid."""

    code = "peer_unattested"


def _gone(pid: int) -> Denied:
    return Denied(
        f"the process that opened this connection (pid {pid}) is gone; reconnect",
        code="peer_gone",
    )


class PeerHandle:
    """An attested connection peer: identity plus the means to re-verify it."""

    __slots__ = ("_closed", "_dir_fd", "_pidfd", "_status_fd", "identity")

    def __init__(self, identity: PeerIdentity, *, pidfd: int | None, dir_fd: int,
                 status_fd: int | None = None) -> None:
        self.identity = identity
        self._pidfd = pidfd
        self._dir_fd = dir_fd  # -1 for a uid-only identity (no /proc/<pid> to open)
        self._closed = False
        # /proc/<pid>/status of the same directory, kept open for the re-checks (see
        # _proc_facts); None: opened through dir_fd at each re-check.
        self._status_fd = status_fd

    def recheck(self) -> None:
        """Raise :class:`Denied` unless the attested process is still alive, unchanged.

        ``peer_gone``: exited (zombie or reaped), or the fds were closed. ``peer_changed``:
        another effective uid or gid, other supplementary groups, or another executable
        file than at attestation. Runs before every request above the anonymous tier,
        so it costs one /proc read (status) plus one stat of ``exe`` when the identity
        had one; with a pidfd, one ``pidfd_send_signal(0)``.
        """
        ident = self.identity
        if ident.attestation == "uid-only":
            self._recheck_uid_only()
            return
        if self._dir_fd < 0:
            raise _gone(ident.pid)
        pinned = self._pidfd is not None
        # attest() proved that the pidfd and the /proc/<pid> dirfd name one process; both
        # stay bound to it (not to the pid number), and reads through the dirfd fail with
        # ESRCH once it is reaped. A zombie still answers: its status says Z. Without a
        # pidfd the dirfd may have been opened on a recycled pid, so the start time must
        # match too.
        if self._pidfd is not None and not _pidfd_alive(self._pidfd):
            raise _gone(ident.pid)
        try:
            facts = _proc_facts(self._dir_fd, with_start_time=not pinned,
                                status_fd=self._status_fd)
        except (OSError, KeyError, ValueError, IndexError):
            raise _gone(ident.pid) from None
        if facts.state in ("Z", "X") or (not pinned and facts.start_time != ident.start_time):
            raise _gone(ident.pid)
        if (
            facts.uids[1] != ident.uid
            or facts.gids[1] != ident.gid
            or facts.groups != ident.supplementary_gids
        ):
            raise Denied(
                f"process {ident.pid} changed its credentials after connecting", code="peer_changed"
            )
        if ident.exe_id is not None:
            # The file itself, not its path: after unshare() and a mount, another file
            # can show the same path.
            try:
                st = os.stat("exe", dir_fd=self._dir_fd)
                same = (st.st_dev, st.st_ino) == ident.exe_id
            except OSError:
                same = False
        elif ident.exe is not None:
            try:
                same = os.readlink("exe", dir_fd=self._dir_fd) == ident.exe
            except OSError:
                same = False
        else:
            same = True
        if not same:
            raise Denied(
                f"process {ident.pid} executed another program after connecting",
                code="peer_changed",
            )

    def _recheck_uid_only(self) -> None:
        """What can be re-checked of a peer without a visible pid: that the process
        which connected has not exited (its pidfd is readable once it has; the only
        pidfd operation that works across PID namespaces). Its uid and gid are the
        socket's, fixed at connect(); a setuid() after connecting, or another process
        that holds the socket while the first one lives, cannot be seen."""
        if self._closed:
            raise _gone(0)
        if self._pidfd is None:
            return  # kernel < 6.5: nothing to re-check
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        try:
            exited = bool(poller.poll(0))
        except OSError:
            exited = True
        if exited:
            raise Denied(
                "the process that opened this connection has exited; reconnect",
                code="peer_gone",
            )

    def close(self) -> None:
        self._closed = True
        for attr in ("_pidfd", "_dir_fd", "_status_fd"):
            fd = getattr(self, attr)
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pidfd = None
        self._status_fd = None
        self._dir_fd = -1

    def __enter__(self) -> PeerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _peer_pidfd(sock: socket.socket) -> int | None:
    """SO_PEERPIDFD, or None when this kernel does not support it."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
    except OSError as exc:
        if exc.errno == errno.ENOPROTOOPT:
            return None  # kernel < 6.5: no SO_PEERPIDFD
        # 6.5-6.14 answer EINVAL, later kernels ESRCH, when the peer was already reaped.
        if exc.errno in (errno.ESRCH, errno.EINVAL):
            raise Denied("the connecting process exited before attestation", code="peer_gone") from None
        raise Denied(f"cannot pin the connecting process: {exc.strerror}", code="peer_unattested") from None
    fd: int = struct.unpack("i", raw)[0]
    return fd


def no_pid_message(uid: int, gid: int) -> str:
    return (
        f"the kernel reports no pid for this peer (uid {uid}, gid {gid}): it runs in a PID "
        "namespace the daemon cannot see, e.g. a pod without shareProcessNamespace. Run "
        "the daemon and the MCP server in one PID namespace (shareProcessNamespace: true), "
        "or opt in to attestation by uid/gid alone with attestation.pid_namespace: uid_only "
        "(uid/user/gid/group selectors only)"
    )


def attest_uid_only(sock: socket.socket) -> PeerHandle:
    """A handle for a peer whose pid the daemon cannot see: uid and gid from
    SO_PEERCRED, no exe, unit, groups or start time, and (Linux >= 6.5) the pidfd, kept
    for :meth:`PeerHandle.recheck` to notice that the connecting process exited.

    Whether anything may be granted to it is the caller's decision
    (``uid_only=`` of :func:`servers_of_peer`); by itself it matches no selector.
    """
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    if pid != 0 or uid < 0 or gid < 0:
        # A visible peer is attested in full by attest(), never by uid alone.
        raise Denied("this peer has a visible pid; attest it in full", code="peer_unattested")
    pidfd = _peer_pidfd(sock)
    identity = PeerIdentity(
        pid=0,
        uid=uid,
        gid=gid,
        user=_user_name(uid),
        group=_group_name(gid),
        supplementary_gids=(),
        supplementary_groups=(),
        exe=None,
        unit=None,
        # 0, not -1: tokens carry (uid, pid, start) and a pid/start of 0 is valid there;
        # a token issued to a uid-only peer is then redeemable only by a uid-only peer
        # of the same uid (a visible process has pid > 0).
        start_time=0,
        attestation="uid-only",
    )
    return PeerHandle(identity, pidfd=pidfd, dir_fd=-1)


def attest(sock: socket.socket, *, use_pidfd: bool = True) -> PeerHandle:
    """Identify the peer of a connected AF_UNIX stream socket or raise :class:`Denied`.

    Only ``getsockopt`` is used on *sock*, so a trio socket works as well.
    """
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    if pid <= 0:
        # Peer in a PID namespace the daemon cannot see (see the module docstring).
        raise PidNotVisible(no_pid_message(uid, gid), code="peer_unattested")
    pidfd = _peer_pidfd(sock) if use_pidfd else None
    dir_fd = -1
    status_fd: int | None = None
    try:
        try:
            dir_fd = os.open(f"{PROC}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            status_fd = os.open("status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
            facts = _proc_facts(dir_fd, status_fd=status_fd)
            try:
                exe: str | None = os.readlink("exe", dir_fd=dir_fd)
                exe_st = os.stat("exe", dir_fd=dir_fd)
                exe_id: tuple[int, int] | None = (exe_st.st_dev, exe_st.st_ino)
            except OSError:
                # kernel thread, zombie, or no ptrace-read access (daemon not root)
                exe, exe_id = None, None
            same_mnt_ns = _same_mnt_ns(dir_fd)
            try:
                unit = _unit_from_cgroup(_read_at(dir_fd, "cgroup").decode("utf-8", "replace"))
            except OSError:
                unit = None
        except (OSError, KeyError, ValueError, IndexError):
            raise _gone(pid) from None
        if facts.state in ("Z", "X"):
            raise _gone(pid)
        if pidfd is not None and (_pidfd_pid(pidfd) != pid or not _pidfd_alive(pidfd)):
            # The pid was recycled between SO_PEERCRED and the /proc reads.
            raise _gone(pid)
        if facts.uids[1] != uid or facts.gids[1] != gid:
            raise Denied(f"process {pid} changed its credentials after connecting", code="peer_changed")
        identity = PeerIdentity(
            pid=pid,
            uid=uid,
            gid=gid,
            user=_user_name(uid),
            group=_group_name(gid),
            supplementary_gids=facts.groups,
            supplementary_groups=tuple(
                name for name in (_group_name(g) for g in facts.groups) if name is not None
            ),
            exe=exe,
            unit=unit,
            start_time=facts.start_time,
            attestation="pidfd" if pidfd is not None else "best-effort",
            same_mnt_ns=same_mnt_ns,
            exe_id=exe_id,
        )
    except BaseException:
        for fd in (pidfd, dir_fd, status_fd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        raise
    return PeerHandle(identity, pidfd=pidfd, dir_fd=dir_fd, status_fd=status_fd)


# --------------------------------------------------------------------------- exe hashes


@dataclass(slots=True)
class ExeHashCache:
    """SHA-256 of a process's executable, cached by (device, inode, mtime, size), and
    the file identity of a configured ``exe`` path (:meth:`file_id`).

    The file is read through ``/proc/<pid>/exe``, i.e. the executable actually
    mapped, even if the path was replaced since. Files above ``max_bytes`` are not
    hashed (the selector then fails to match: fail closed).
    """

    max_entries: int = 256
    max_bytes: int = 256 * 1024 * 1024
    _cache: OrderedDict[tuple[int, int, int, int], str] = field(default_factory=OrderedDict)

    def file_id(self, path: str) -> tuple[int, int] | None:
        """(st_dev, st_ino) of ``path`` as the daemon's mount namespace resolves it, or
        None. Not cached: a package upgrade replaces the file at the path."""
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            return None
        return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None

    def sha256(self, pid: int) -> str | None:
        try:
            fd = os.open(f"{PROC}/{pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > self.max_bytes:
                return None
            key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            h = hashlib.sha256()
            with os.fdopen(os.dup(fd), "rb") as f:
                while chunk := f.read(1024 * 1024):
                    h.update(chunk)
            digest = h.hexdigest()
            self._cache[key] = digest
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
            return digest
        except OSError:
            return None
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- pure matching


def _resolve_id(value: int | str, daemon_id: int) -> int:
    return daemon_id if value == "self" else int(value)


def _exe_is_the_configured_file(
    path: str, ident: PeerIdentity, exe_hashes: ExeHashCache | None
) -> bool:
    """For an ``exe`` key whose path already equals the peer's: does that path name the
    file the peer runs? In the daemon's mount namespace the path is the daemon's path.
    In another one (a user namespace with its own mounts, a container, a systemd unit
    with ProtectSystem=/PrivateTmp=) it is only the peer's view, so the file the peer
    runs must be the one the path names for the daemon (same device and inode)."""
    if ident.same_mnt_ns:
        return True
    if exe_hashes is None or ident.exe_id is None:
        return False
    return exe_hashes.file_id(path) == ident.exe_id


def selector_matches(
    sel: PeerSelector,
    ident: PeerIdentity,
    *,
    daemon_uid: int,
    daemon_gid: int,
    exe_hashes: ExeHashCache | None = None,
    uid_only: bool = False,
) -> bool:
    """True when every key the selector sets matches (an empty selector never does).

    A uid-only identity (no visible pid) matches only when ``uid_only`` (the config's
    ``attestation.pid_namespace: uid_only``) and the selector has uid/user/gid/group
    keys only: a key that needs /proc/<pid> can never be checked for it.
    """
    if ident.attestation == "uid-only" and (
        not uid_only
        or any(getattr(sel, f) is not None and f not in UID_ONLY_SELECTOR_KEYS
               for f in sel.__struct_fields__)
    ):
        return False
    expected: list[tuple[object, object]] = []  # (the peer's value, the selector's value)
    if sel.uid is not None:
        expected.append((ident.uid, _resolve_id(sel.uid, daemon_uid)))
    if sel.user is not None:
        expected.append((ident.user, sel.user))
    if sel.gid is not None:
        expected.append((ident.gid, _resolve_id(sel.gid, daemon_gid)))
    if sel.group is not None:
        expected.append((ident.group, sel.group))
    if sel.supplementary_group is not None:
        expected.append((sel.supplementary_group in ident.supplementary_groups, True))
    if sel.unit is not None:
        expected.append((ident.unit, sel.unit))
    if sel.exe is not None:
        expected.append((ident.exe, sel.exe))
    if not all(have == want for have, want in expected):
        return False
    if sel.exe is not None and not _exe_is_the_configured_file(sel.exe, ident, exe_hashes):
        return False
    if sel.exe_sha256 is not None:  # last: hashing is the expensive check
        return exe_hashes is not None and exe_hashes.sha256(ident.pid) == sel.exe_sha256
    return bool(expected)


def servers_of_peer(
    peers: Mapping[str, Sequence[PeerSelector]],
    ident: PeerIdentity,
    *,
    daemon_uid: int,
    daemon_gid: int,
    exe_hashes: ExeHashCache | None = None,
    uid_only: bool = False,
) -> list[str]:
    """Names of the servers whose selectors (any one of them) this peer matches.
    ``uid_only``: see :func:`selector_matches`."""
    return [
        server
        for server, selectors in peers.items()
        if any(
            selector_matches(s, ident, daemon_uid=daemon_uid, daemon_gid=daemon_gid,
                             exe_hashes=exe_hashes, uid_only=uid_only)
            for s in selectors
        )
    ]


def _entry_matches(entry: RbacEntry, ident: PeerIdentity, daemon_uid: int, daemon_gid: int) -> bool:
    if any(ident.uid == _resolve_id(u, daemon_uid) for u in entry.uids):
        return True
    if ident.user is not None and ident.user in entry.users:
        return True
    all_gids: Iterable[int] = (ident.gid, *ident.supplementary_gids)
    wanted_gids = {_resolve_id(g, daemon_gid) for g in entry.gids}
    if wanted_gids.intersection(all_gids):
        return True
    names = {n for n in (ident.group, *ident.supplementary_groups) if n is not None}
    if names.intersection(entry.groups):
        return True
    return ident.unit is not None and ident.unit in entry.units


def tier_of(
    rbac: RbacConfig,
    ident: PeerIdentity,
    *,
    daemon_uid: int,
    daemon_gid: int,
    is_service: bool,
) -> str:
    """The highest tier this peer holds. The daemon's own uid is always owner;
    a peer matching some server's selectors is at least service. A uid-only peer (pid
    not visible) holds service at most, whatever rbac says: approving, rotating or
    reloading is for a process the daemon can see (``kubectl exec`` into its container)."""
    if ident.attestation == "uid-only":
        return "service" if is_service else "anonymous"
    if ident.uid == daemon_uid:
        return "owner"
    for tier in ("owner", "admin", "security", "approver", "service"):
        if _entry_matches(getattr(rbac, tier), ident, daemon_uid, daemon_gid):
            return tier
    return "service" if is_service else "anonymous"


def tier_allows(tier: str, minimum: str) -> bool:
    return TIER_RANK.get(tier, -1) >= TIER_RANK[minimum]
