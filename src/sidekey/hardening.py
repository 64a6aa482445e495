"""Start-up hardening against a hostile host: process memory, file modes, the socket path.

Three guards the daemon applies before it holds any secret or accepts a connection:

* :func:`protect_process_memory`: no core dumps (``RLIMIT_CORE`` 0) and not dumpable
  (``PR_SET_DUMPABLE`` 0), so neither a crash nor another process of the daemon's own
  uid (``ptrace``, ``/proc/<pid>/mem``, ``/proc/<pid>/environ``) can read the token HMAC
  key, the local store key, cached secrets or users' bearer tokens out of memory.
* :func:`check_daemon_files`: the files the daemon itself writes (the audit log, the
  SQLite state database and its ``-wal``/``-shm``, local secret stores) must not be
  accessible to group or others. The daemon owns them, so a loose mode is *fixed*
  (``chmod 0600``) with a warning; a file owned by another uid is *refused*: the daemon
  cannot repair it, and whoever owns it can rewrite it. (Key files — the local store
  key, the token key set, Vault/Redis secret files — are refused when loose by the code
  that loads them: the operator provides them, a copy may already have been taken, and
  the fix is to rotate the key, not to chmod it.)
* :func:`open_socket_dir`: the listening socket's directory must be writable by no one
  but the daemon's uid or root (not even with the sticky bit: whoever can create a
  name there can pre-create the socket), and no directory above it may be writable by
  others without the sticky bit (they could rename the whole subtree away and put
  their own in its place). The socket is then bound inside the directory fd that was
  checked, so no symlink swapped in later can redirect it.

Errors are :class:`UnsafePathError` with a stable ``code``; messages name the path and
the fix, never file contents.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .protocol import SidekeyError

if TYPE_CHECKING:
    from .config import LoadedConfig

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PRIVATE_FILE_MODE = 0o600
SQLITE_SUFFIXES = ("", "-wal", "-shm")


class UnsafePathError(SidekeyError):
    """A file or directory the daemon depends on is open to other users.

    Codes: ``socket_dir_unsafe`` (the socket's directory or one above it),
    ``file_owner_unsafe`` (a daemon file owned by another uid, or not a regular file),
    ``file_mode_unsafe`` (a loose mode the daemon cannot fix), ``dir_unsafe`` (the
    directory of a daemon file is writable by others), ``key_file_unsafe`` (a key or
    credential file open to others).
    """

    status = 500
    code = "unsafe_path"


# --------------------------------------------------------------------------- memory


def protect_process_memory() -> None:
    """Disable core dumps and make the process non-dumpable. Raises OSError if prctl fails.

    ``PR_SET_DUMPABLE`` 0 also makes the kernel give ``/proc/<pid>/*`` to root, so a
    process of the daemon's own uid can no longer ptrace it or read its memory or
    environment. It is reset by execve(), so it must run in the daemon process itself.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(err)}")


def is_dumpable() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))


# --------------------------------------------------------------------------- daemon files


def daemon_files(loaded: LoadedConfig) -> list[tuple[Path, str]]:
    """The files the daemon writes itself, with what each is (for messages)."""
    from .config import LocalBackendConfig

    files = [(loaded.audit_path, "audit log")]
    if loaded.config.state.backend == "sqlite":
        db = loaded.state_dir / "state.db"
        files += [(db.with_name(db.name + suffix), "state database") for suffix in SQLITE_SUFFIXES]
    for name, backend in sorted(loaded.config.backends.items()):
        if isinstance(backend, LocalBackendConfig):
            files.append((loaded.resolve(backend.path), f"local secret store {name!r}"))
    return files


def check_daemon_files(files: Iterable[tuple[Path, str]], *, fix: bool) -> list[str]:
    """Check the daemon's own files (those that exist) and their directories.

    A file that group or others can access is chmod-ed 0600 when ``fix`` (else only
    reported). Returns the warnings (also logged). Raises :class:`UnsafePathError` for
    what cannot be fixed: a symlink or non-regular file, a file owned by another uid,
    a directory that others can write to.
    """
    warnings: list[str] = []
    euid = os.geteuid()
    seen_dirs: set[Path] = set()
    for path, what in files:
        parent = path.parent
        if parent not in seen_dirs:
            seen_dirs.add(parent)
            try:
                dst = os.stat(parent)
            except FileNotFoundError:
                dst = None
            if dst is not None:
                _check_dir_owner_and_mode(parent, dst, euid, what, sticky_ok=False, code="dir_unsafe")
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(
                f"{path}: the {what} is not a regular file (a symlink or other file type); "
                "refusing to use it", code="file_owner_unsafe",
            )
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != euid:
            if st.st_uid != 0 or mode & 0o077:
                raise UnsafePathError(
                    f"{path}: the {what} is owned by uid {st.st_uid} with mode {mode:04o}; the "
                    f"daemon (uid {euid}) must own it and it must not be accessible by group "
                    f"or others (chown {euid} {path}; chmod 600 {path})",
                    code="file_owner_unsafe" if st.st_uid != 0 else "file_mode_unsafe",
                )
            continue
        if not mode & 0o077:
            continue
        if fix:
            _fchmod_private(path)
            message = (f"{path}: the {what} had mode {mode:04o} (accessible by group or "
                       f"others); changed to 0600")
        else:
            message = (f"{path}: the {what} has mode {mode:04o} (accessible by group or "
                       "others); the daemon changes it to 0600 at start")
        log.warning("%s", message)
        warnings.append(message)
    return warnings


def _fchmod_private(path: Path) -> None:
    # O_NOFOLLOW + fchmod: the file checked is the file changed, even if the name moves.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(f"{path}: not a regular file", code="file_owner_unsafe")
        os.fchmod(fd, PRIVATE_FILE_MODE)
    finally:
        os.close(fd)


def _check_dir_owner_and_mode(
    directory: Path, st: os.stat_result, euid: int, what: str, *, sticky_ok: bool, code: str
) -> None:
    if st.st_uid not in (euid, 0):
        raise UnsafePathError(
            f"{directory}: the directory of the {what} is owned by uid {st.st_uid}, not by the "
            f"daemon (uid {euid}) or root; whoever owns it can replace what is in it",
            code=code,
        )
    writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        raise UnsafePathError(
            f"{directory}: the directory of the {what} has mode {stat.S_IMODE(st.st_mode):04o}: "
            f"users other than the daemon's can create or replace files in it "
            f"(chmod go-w {directory})",
            code=code,
        )


# --------------------------------------------------------------------------- key files


def key_files(loaded: LoadedConfig) -> list[tuple[Path, str]]:
    """Files holding keys or credentials that the operator provides (never the daemon)."""
    from .config import LocalBackendConfig, VaultBackendConfig

    files: list[tuple[Path, str]] = [(loaded.keyset_path, "token key set")]
    for name, backend in sorted(loaded.config.backends.items()):
        if isinstance(backend, LocalBackendConfig) and backend.key_file:
            files.append((loaded.resolve(backend.key_file), f"key file of backend {name!r}"))
        elif isinstance(backend, VaultBackendConfig):
            for attr, what in (("token_file", "Vault token"), ("secret_id_file", "AppRole secret_id"),
                               ("client_key", "Vault TLS client key")):
                value = getattr(backend, attr)
                if value:
                    files.append((loaded.resolve(value), f"{what} file of backend {name!r}"))
    if loaded.config.audit.checkpoint_key_file:
        files.append((loaded.resolve(loaded.config.audit.checkpoint_key_file), "audit checkpoint key"))
    from .audit.hmackey import key_path as audit_hmac_key_path

    hmac_key = audit_hmac_key_path(loaded)
    if hmac_key is not None:  # the configured file, or the one the daemon created
        files.append((hmac_key, "audit HMAC key"))
    state = loaded.config.state
    if state.redis_password_file:
        files.append((loaded.resolve(state.redis_password_file), "Redis password file"))
    return files


def check_key_files(files: Iterable[tuple[Path, str]]) -> None:
    """Refuse key files (those that exist) that are not regular files owned by the
    daemon's uid or root with no group/other bits. Not fixed: the operator owns them,
    and a key that others could read may already be copied; the fix is to rotate it.
    Raises :class:`UnsafePathError` (``key_file_unsafe``)."""
    euid = os.geteuid()
    for path, what in files:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue  # created later (the token key set) or reported by its loader
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (euid, 0) or mode & 0o077:
            raise UnsafePathError(
                f"{path}: the {what} is owned by uid {st.st_uid} with mode {mode:04o}; it must "
                f"be a regular file owned by uid {euid} (the daemon) or root, not accessible "
                f"by group or others (chmod 600 {path}; if others could read it, rotate it)",
                code="key_file_unsafe",
            )


# --------------------------------------------------------------------------- socket path


def _prefixes(path: Path) -> list[Path]:
    return [*reversed(path.parents), path]


def open_socket_dir(directory: Path) -> int:
    """Check the socket's directory and every directory above it; return an fd of it.

    The directory itself: owned by the daemon's uid or root, writable by nobody else
    (group/other write bit refused, sticky or not). Each directory above it (on the
    path as written and on the resolved path): owned by the daemon's uid or root, and
    writable by others only with the sticky bit (as ``/tmp``), which keeps others from
    renaming or removing the entries they do not own. Raises :class:`UnsafePathError`
    (``socket_dir_unsafe``) or OSError.
    """
    euid = os.geteuid()
    what = "socket"
    lexical = Path(os.path.abspath(directory))
    real = Path(os.path.realpath(lexical))
    ancestors = {p for p in (*_prefixes(lexical)[:-1], *_prefixes(real)[:-1])}
    for above in sorted(ancestors, key=lambda p: len(p.parts)):
        _check_dir_owner_and_mode(above, os.stat(above), euid, what, sticky_ok=True,
                                  code="socket_dir_unsafe")
    # realpath has no symlinks left (and the checked directories above cannot be
    # changed by others); O_NOFOLLOW covers a symlink put there since.
    try:
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError(f"{directory}: the socket directory changed while it was "
                                  "checked", code="socket_dir_unsafe") from exc
        raise
    try:
        _check_dir_owner_and_mode(lexical, os.fstat(fd), euid, what, sticky_ok=False,
                                  code="socket_dir_unsafe")
    except BaseException:
        os.close(fd)
        raise
    return fd


__all__ = [
    "UnsafePathError",
    "check_daemon_files",
    "check_key_files",
    "daemon_files",
    "is_dumpable",
    "key_files",
    "open_socket_dir",
    "protect_process_memory",
]
