"""Secret material kept in files: a Vault token, an AppRole secret_id, a Redis password.

Read from a file that must be a regular file owned by the daemon's uid (or root) with
no group/other permission bits, or from a systemd credential
(``$CREDENTIALS_DIRECTORY/<name>``, where systemd owns access control). Never inline in
the config, never in a message: errors name the file and the problem only.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .protocol import ConfigError

MAX_SECRET_FILE_BYTES = 16 * 1024
_CREDENTIAL_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,255}$")


def read_secret(path: Path | None, credential: str | None, *, what: str) -> str:
    """Read one line of secret material (a token, a secret_id) from ``path`` or from the
    systemd credential ``$CREDENTIALS_DIRECTORY/<credential>``.

    ``path`` must be a regular file owned by the daemon's uid (or root) with no
    group/other permission bits (like the local store's key file). Raises
    :class:`ConfigError`; the message never contains the material.
    """
    if credential is not None:
        # systemd owns access control here (a private directory, maybe an ACL for the
        # service user): check the file type and size, not owner and mode bits.
        return read_secret_file(_credential_path(credential, what), what=what, check_permissions=False)
    if path is None:
        raise ConfigError(f"no file or credential configured for the {what}")
    return read_secret_file(path, what=what, check_permissions=True)


def read_secret_bytes(path: Path | None, credential: str | None, *, what: str) -> bytes:
    """Like :func:`read_secret` but the file's raw bytes (a PEM key spans several lines)."""
    if credential is not None:
        return _read_bytes(_credential_path(credential, what), what=what, check_permissions=False)
    if path is None:
        raise ConfigError(f"no file or credential configured for the {what}")
    return _read_bytes(path, what=what, check_permissions=True)


def _credential_path(credential: str, what: str) -> Path:
    if not _CREDENTIAL_RE.fullmatch(credential) or credential in (".", ".."):
        raise ConfigError(f"{what} credential {credential!r} is not a valid credential name")
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise ConfigError(
            f"{what} credential {credential!r}: $CREDENTIALS_DIRECTORY is not set "
            f"(run the daemon under systemd with LoadCredential={credential}:<file>)"
        )
    return Path(directory) / credential


def read_secret_file(path: Path, *, what: str, check_permissions: bool) -> str:
    raw = _read_bytes(path, what=what, check_permissions=check_permissions)
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: the {what} file is not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{path}: the {what} file is empty")
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ConfigError(f"{path}: the {what} file must hold one {what} on one line")
    return text


def _read_bytes(path: Path, *, what: str, check_permissions: bool) -> bytes:
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the daemon.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open the {what} file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: the {what} file is not a regular file")
        if check_permissions:
            check_private(path, st, what)
        raw = os.read(fd, MAX_SECRET_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} file: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_SECRET_FILE_BYTES:
        raise ConfigError(f"{path}: the {what} file is larger than {MAX_SECRET_FILE_BYTES} bytes")
    return raw


def check_private(path: Path, st: os.stat_result, what: str) -> None:
    if st.st_uid not in (os.geteuid(), 0):
        raise ConfigError(
            f"{path}: the {what} file is owned by uid {st.st_uid}; it must be owned by "
            f"uid {os.geteuid()} (the daemon) or root"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{path}: the {what} file mode is {mode:04o}; it must not be accessible by "
            f"group or others (chmod 600 {path})"
        )
