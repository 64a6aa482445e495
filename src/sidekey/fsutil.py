"""Durable, atomic file replacement: the one way sidekey writes a whole file.

Readers see the old file or the new one, never a torn one, and once
:func:`atomic_write` returns the new file survives a crash (file and directory are
fsynced). The temporary file is created next to the target with a random name,
``O_EXCL | O_NOFOLLOW`` (a file or symlink planted under that name is never written
through), and its mode is set with ``fchmod`` so the umask cannot loosen or tighten
it; on any failure it is removed and the old file is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a write may be short); a write that
    makes no progress is EIO rather than a loop forever."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[n:]


def fsync_dir(path: Path) -> None:
    """fsync the directory ``path``, so a rename or create in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` with ``data`` atomically and durably, with exactly ``mode``.

    ``owner`` (uid, gid) is given to the new file before it becomes visible. The parent
    directory must exist. Raises OSError (the caller names the failure its own way).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, *owner)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
