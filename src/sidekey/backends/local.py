"""The embedded ``local`` backend: an AES-256-GCM encrypted secret file.

File format (JSON)::

    {"format": "sidekey-local-v1", "key_id": "<16 hex>", "mac": "<64 hex>",
     "secrets": {name: {"current": 2, "versions": {"1": {"nonce": b64, "ciphertext": b64,
                                                         "created": iso8601}, ...}}}}

* The configured 256-bit key is split with HKDF-SHA256 into an encryption key and a
  MAC key. Each value is sealed with AES-256-GCM under a fresh random 96-bit nonce,
  with associated data binding the store format, the secret's name and its version,
  so a ciphertext moved to another name or version does not decrypt.
* ``key_id`` (an HMAC of a constant under the MAC key) tells "wrong key" apart from
  "damaged file" without trying to decrypt anything.
* ``mac`` is an HMAC-SHA256 over the canonical (sorted) encoding of ``secrets``, so
  editing the ``current`` pointer, deleting a version or swapping entries is detected
  too. (Replacing the whole file by an older complete copy is not: keep the file
  writable only by the daemon's owner.)

Writers (the CLI, the admin rotate endpoint) take an exclusive ``flock`` on a sidecar
``.lock`` file, re-read the file under the lock, and replace it atomically (tmp file,
fsync, rename, fsync of the directory). Readers never lock: they reload the file when
its (inode, mtime, size) changes, so a running daemon sees a rotation done by the CLI.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import fcntl
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, BinaryIO, TextIO

import msgspec
import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from msgspec import Meta

from ..fsutil import atomic_write, fsync_dir, write_all
from ..protocol import BadRequest, ConfigError, Conflict, SidekeyError, TooLarge
from . import BackendError, SecretNotFound, SecretValue

if TYPE_CHECKING:
    from ..config import SecretRef

log = logging.getLogger(__name__)

FORMAT = "sidekey-local-v1"
KEY_BYTES = 32
NONCE_BYTES = 12
MAX_STORE_BYTES = 64 * 1024 * 1024
MAX_VALUE_BYTES = 64 * 1024
MAX_VERSIONS_KEPT = 10
MAX_KEY_FILE_BYTES = 1024
# How often the daemon's hot path stats the store file for changes.
RECHECK_INTERVAL_S = 0.5

SECRET_NAME_RE = re.compile(r"^[A-Za-z0-9_.:@/+=-]{1,256}$")
_CREDENTIAL_RE = re.compile(r"^[A-Za-z0-9_.@:-]{1,255}$")
_VERSION_RE = re.compile(r"^[1-9][0-9]{0,17}$")


class _Version(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    nonce: str
    ciphertext: str
    created: str


class _Entry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    current: Annotated[int, Meta(ge=1)]
    versions: dict[str, _Version]


class _StoreFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    format: str
    key_id: str
    mac: str
    secrets: dict[str, _Entry]


_file_decoder = msgspec.json.Decoder(_StoreFile)
_file_encoder = msgspec.json.Encoder()
# The MAC covers a canonical encoding: sorted keys, independent of dict order.
_canonical_encoder = msgspec.json.Encoder(order="sorted")

_Sig = tuple[int, int, int]  # (st_ino, st_mtime_ns, st_size)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What the store file held at one point. ``sig`` None: the file does not exist."""

    sig: _Sig | None
    secrets: dict[str, _Entry]
    # A load that failed: every read raises this until the file changes and loads.
    error: str | None = None


# --------------------------------------------------------------------------- keys


def load_key(key_file: Path | None, credential: str | None) -> bytes:
    """Load the 32-byte store key from ``key_file`` or a systemd credential.

    The key file must be a regular file owned by the daemon's uid (or root) with no
    group/other permission bits. The credential is read from
    ``$CREDENTIALS_DIRECTORY/<credential>`` (systemd ``LoadCredential=``). Either holds
    the key as one line of base64. Raises :class:`ConfigError`; never includes key bytes.
    """
    if key_file is not None and credential is not None:
        raise ConfigError("set only one of key_file or key_credential")
    if credential is not None:
        if not _CREDENTIAL_RE.fullmatch(credential) or credential in (".", ".."):
            raise ConfigError(f"key_credential {credential!r} is not a valid credential name")
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                f"key_credential {credential!r}: $CREDENTIALS_DIRECTORY is not set "
                f"(run the daemon under systemd with LoadCredential={credential}:<key file>)"
            )
        # systemd owns access control here (the directory is private to the unit and
        # may grant the service user access through an ACL), so only the file type and
        # size are checked, not its owner and mode bits.
        path = Path(directory) / credential
        return _decode_key(_read_key_file(path, check_permissions=False), path)
    if key_file is None:
        raise ConfigError("no key_file or key_credential configured for the local store")
    return _decode_key(_read_key_file(key_file, check_permissions=True), key_file)


def _read_key_file(path: Path, *, check_permissions: bool) -> bytes:
    try:
        # O_NONBLOCK: opening a FIFO planted at the path must not hang the daemon.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open key file: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: key file is not a regular file")
        if check_permissions:
            if st.st_uid not in (os.geteuid(), 0):
                raise ConfigError(
                    f"{path}: key file is owned by uid {st.st_uid}; it must be owned by "
                    f"uid {os.geteuid()} (the daemon) or root"
                )
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise ConfigError(
                    f"{path}: key file mode is {mode:04o}; it must not be accessible by "
                    f"group or others (chmod 600 {path})"
                )
        raw = _read_fd(fd, MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read key file: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{path}: key file is larger than {MAX_KEY_FILE_BYTES} bytes")
    return raw


def _decode_key(raw: bytes, path: Path) -> bytes:
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{path}: key file is not one line of base64") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{path}: key must be {KEY_BYTES} bytes, found {len(key)}")
    return key


def generate_key_file(path: Path) -> None:
    """Create ``path`` holding a new random key (base64, mode 0600). Never overwrites.

    The parent directory is created with mode 0700 if missing. Raises
    :class:`ConfigError` if the file exists or cannot be written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"{path.parent}: cannot create directory: {exc.strerror}") from exc
    data = base64.b64encode(secrets.token_bytes(KEY_BYTES)) + b"\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path}: already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot create key file: {exc.strerror}") from exc
    try:
        try:
            os.fchmod(fd, 0o600)  # independent of the umask
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        raise ConfigError(f"{path}: cannot write key file: {exc.strerror}") from exc


# --------------------------------------------------------------------------- CLI input


def read_secret_input(from_file: str | None, stdin: TextIO | BinaryIO) -> str:
    """Read a secret value from ``from_file`` (``-`` or None: ``stdin``), never argv.

    Exactly one trailing newline (``\\n`` or ``\\r\\n``) is stripped. Raises
    :class:`BadRequest` for an unreadable, empty or non-UTF-8 value and
    :class:`TooLarge` above :data:`MAX_VALUE_BYTES`.
    """
    limit = MAX_VALUE_BYTES + 2  # room for the trailing newline
    raw: bytes
    if from_file is not None and from_file != "-":
        try:
            with open(from_file, "rb") as f:
                raw = f.read(limit + 1)
        except OSError as exc:
            raise BadRequest(
                f"cannot read {from_file}: {exc.strerror}", code="secret_input_unreadable"
            ) from exc
    else:
        data = stdin.read(limit + 1)
        raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    if raw.endswith(b"\r\n"):
        raw = raw[:-2]
    elif raw.endswith(b"\n"):
        raw = raw[:-1]
    if len(raw) > MAX_VALUE_BYTES:
        raise TooLarge(
            f"secret value is larger than {MAX_VALUE_BYTES} bytes", code="secret_too_large"
        )
    if not raw:
        raise BadRequest("secret value is empty", code="secret_empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("secret value is not valid UTF-8", code="secret_not_utf8") from None


# --------------------------------------------------------------------------- the store


def _ad(name: str, version: str) -> bytes:
    # Names cannot contain NUL (SECRET_NAME_RE), so this encoding is unambiguous.
    return FORMAT.encode() + b"\0" + name.encode() + b"\0" + version.encode()


def _file_mac(mac_key: bytes, entries: dict[str, _Entry]) -> str:
    body = FORMAT.encode() + b"\0" + _canonical_encoder.encode(entries)
    return hmac.new(mac_key, body, hashlib.sha256).hexdigest()


def _check_name(name: str) -> None:
    if not SECRET_NAME_RE.fullmatch(name):
        raise BadRequest(
            "secret name must be 1-256 characters of A-Z a-z 0-9 _ . : @ / + = -",
            code="invalid_secret_name",
        )


class LocalStore:
    """Synchronous core of the local backend, shared by the CLI and the daemon.

    Thread-safe for one writer and many readers: a reload builds a new immutable
    snapshot and swaps it in with one assignment.
    """

    def __init__(self, path: Path, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigError(f"local store key must be {KEY_BYTES} bytes")
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        okm = HKDF(
            algorithm=hashes.SHA256(), length=2 * KEY_BYTES, salt=None, info=FORMAT.encode() + b" subkeys"
        ).derive(key)
        self._aead = AESGCM(okm[:KEY_BYTES])
        self._mac_key = okm[KEY_BYTES:]
        self.key_id = hmac.new(self._mac_key, b"key-id", hashlib.sha256).hexdigest()[:16]
        self._snap: _Snapshot | None = None
        self._reload_lock = threading.Lock()

    # ----------------------------------------------------------------- reading

    def get(self, name: str, *, reload: bool = True) -> SecretValue:
        """Decrypt the current version of ``name``.

        ``reload=False`` uses the last loaded snapshot without statting the file.
        Raises :class:`SecretNotFound` or :class:`BackendError`.
        """
        snap = self._snapshot(reload)
        entry = self._entry(snap, name)
        return self._decrypt(entry, name, str(entry.current))

    def get_version(self, name: str, version: str | int) -> SecretValue:
        """Decrypt one kept version of ``name`` (the last :data:`MAX_VERSIONS_KEPT`)."""
        snap = self._snapshot(True)
        entry = self._entry(snap, name)
        return self._decrypt(entry, name, str(version))

    def names(self, *, reload: bool = True) -> list[str]:
        """Sorted names of the stored secrets."""
        return sorted(self._snapshot(reload).secrets)

    def versions(self, name: str) -> list[str]:
        """Kept versions of ``name``, oldest first."""
        entry = self._entry(self._snapshot(True), name)
        return sorted(entry.versions, key=int)

    def unchanged(self) -> bool:
        """True if the loaded snapshot matches the file on disk (one stat, no read)."""
        snap = self._snap
        try:
            return snap is not None and snap.sig == self._stat()
        except BackendError:
            return False

    def reload_if_changed(self) -> bool:
        """Stat the file and reload it if (inode, mtime, size) changed.

        Returns whether it reloaded. Raises :class:`BackendError` if the file cannot
        be read, is corrupt or was written with another key; reads keep failing with
        that error until the file changes.
        """
        sig = self._stat()
        snap = self._snap
        if snap is not None and snap.sig == sig:
            return False
        with self._reload_lock:
            snap = self._snap
            if snap is not None and snap.sig == sig and snap.error is None:
                return False  # another thread loaded it while we waited
            try:
                new = self._read()
            except BackendError as exc:
                self._snap = _Snapshot(sig=sig, secrets={}, error=exc.message)
                raise
            self._snap = new
        log.debug("loaded local store %s (%d secrets)", self.path, len(new.secrets))
        return True

    def _snapshot(self, reload: bool) -> _Snapshot:
        if reload or self._snap is None:
            self.reload_if_changed()
        snap = self._snap
        if snap is None:  # reload_if_changed sets it or raises; never serve without one
            raise BackendError(f"local store {self.path} is not loaded")
        if snap.error is not None:
            raise BackendError(snap.error)
        return snap

    def _entry(self, snap: _Snapshot, name: str) -> _Entry:
        entry = snap.secrets.get(name)
        if entry is None:
            raise SecretNotFound(f"secret {name!r} is not in the local store {self.path}")
        return entry

    def _decrypt(self, entry: _Entry, name: str, version: str) -> SecretValue:
        sealed = entry.versions.get(version)
        if sealed is None:
            raise SecretNotFound(
                f"secret {name!r} has no version {version!r} in {self.path}",
                code="secret_version_not_found",
            )
        try:
            nonce = base64.b64decode(sealed.nonce, validate=True)
            ciphertext = base64.b64decode(sealed.ciphertext, validate=True)
        except (binascii.Error, ValueError):
            raise self._corrupt(f"secret {name!r} version {version}: bad base64") from None
        if len(nonce) != NONCE_BYTES:
            raise self._corrupt(f"secret {name!r} version {version}: bad nonce length")
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, _ad(name, version))
        except InvalidTag:
            raise BackendError(
                f"{self.path}: cannot decrypt secret {name!r} version {version}: "
                "wrong key, or the file was tampered with"
            ) from None
        try:
            value = plaintext.decode("utf-8")
        except UnicodeDecodeError:
            raise self._corrupt(f"secret {name!r} version {version}: not UTF-8") from None
        return SecretValue(value=value, version=version)

    def _corrupt(self, what: str) -> BackendError:
        return BackendError(f"{self.path}: corrupt local store: {what}")

    def _stat(self) -> _Sig | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BackendError(f"{self.path}: cannot stat local store: {exc.strerror}") from exc
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self) -> _Snapshot:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except FileNotFoundError:
            return _Snapshot(sig=None, secrets={})
        except OSError as exc:
            raise BackendError(f"{self.path}: cannot open local store: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._corrupt("not a regular file")
            if st.st_size > MAX_STORE_BYTES:
                raise self._corrupt(f"larger than {MAX_STORE_BYTES} bytes")
            raw = _read_fd(fd, MAX_STORE_BYTES + 1)
        except OSError as exc:
            raise BackendError(f"{self.path}: cannot read local store: {exc.strerror}") from exc
        finally:
            os.close(fd)
        if len(raw) > MAX_STORE_BYTES:
            raise self._corrupt(f"larger than {MAX_STORE_BYTES} bytes")
        return _Snapshot(sig=(st.st_ino, st.st_mtime_ns, st.st_size), secrets=self._parse(raw))

    def _parse(self, raw: bytes) -> dict[str, _Entry]:
        try:
            doc = _file_decoder.decode(raw)
        except msgspec.ValidationError as exc:
            raise self._corrupt(str(exc)) from None
        except msgspec.DecodeError:
            raise self._corrupt("not valid JSON") from None
        if doc.format != FORMAT:
            raise self._corrupt(f"unsupported format {doc.format[:40]!r} (expected {FORMAT!r})")
        if not hmac.compare_digest(doc.key_id, self.key_id):
            raise BackendError(
                f"cannot decrypt {self.path}: wrong key? The store was written with key id "
                f"{doc.key_id[:16]!r}, the configured key has id {self.key_id!r}"
            )
        if not hmac.compare_digest(doc.mac, _file_mac(self._mac_key, doc.secrets)):
            raise self._corrupt("integrity check failed (the file was modified outside sidekey)")
        for name, entry in doc.secrets.items():
            if not SECRET_NAME_RE.fullmatch(name):
                raise self._corrupt("invalid secret name")
            if not all(_VERSION_RE.fullmatch(v) for v in entry.versions):
                raise self._corrupt(f"secret {name!r}: invalid version number")
            if str(entry.current) not in entry.versions:
                raise self._corrupt(f"secret {name!r}: current version {entry.current} is missing")
        return doc.secrets

    # ----------------------------------------------------------------- writing

    def put(self, name: str, value: str) -> str:
        """Store a new secret as version ``"1"``. Raises :class:`Conflict` if it exists."""
        _check_name(name)
        plaintext = _value_bytes(value)

        def change(entries: dict[str, _Entry]) -> tuple[dict[str, _Entry], str]:
            if name in entries:
                raise Conflict(
                    f"secret {name!r} already exists in {self.path}; rotate it to store a new version",
                    code="secret_exists",
                )
            return self._with_version(entries, name, 1, plaintext), "1"

        version = self._mutate(change)
        log.info("stored secret %r version %s in %s", name, version, self.path)
        return version

    def rotate(self, name: str, value: str) -> str:
        """Store a new current version of an existing secret; returns the new version.

        Keeps the last :data:`MAX_VERSIONS_KEPT` versions. Raises :class:`SecretNotFound`
        if ``name`` does not exist.
        """
        _check_name(name)
        plaintext = _value_bytes(value)

        def change(entries: dict[str, _Entry]) -> tuple[dict[str, _Entry], str]:
            entry = entries.get(name)
            if entry is None:
                raise SecretNotFound(
                    f"secret {name!r} is not in the local store {self.path}; put it first"
                )
            version = max([entry.current, *map(int, entry.versions)]) + 1
            return self._with_version(entries, name, version, plaintext), str(version)

        version = self._mutate(change)
        log.info("rotated secret %r to version %s in %s", name, version, self.path)
        return version

    def _with_version(
        self, entries: dict[str, _Entry], name: str, version: int, plaintext: bytes
    ) -> dict[str, _Entry]:
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = _Version(
            nonce=base64.b64encode(nonce).decode(),
            ciphertext=base64.b64encode(
                self._aead.encrypt(nonce, plaintext, _ad(name, str(version)))
            ).decode(),
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        )
        old = entries[name].versions if name in entries else {}
        versions = {**old, str(version): sealed}
        kept = sorted(versions, key=int)[-MAX_VERSIONS_KEPT:]
        out = dict(entries)
        out[name] = _Entry(current=version, versions={v: versions[v] for v in kept})
        return out

    def _mutate(
        self, change: Callable[[dict[str, _Entry]], tuple[dict[str, _Entry], str]]
    ) -> str:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise BackendError(f"{self.path}: cannot lock local store: {exc.strerror}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            # Re-read under the lock: another writer may have changed the file since
            # our last load, and its versions must not be lost.
            current = self._read()
            entries, version = change(current.secrets)
            raw = _file_encoder.encode(
                _StoreFile(
                    format=FORMAT,
                    key_id=self.key_id,
                    mac=_file_mac(self._mac_key, entries),
                    secrets=entries,
                )
            )
            if len(raw) > MAX_STORE_BYTES:
                raise TooLarge(
                    f"{self.path}: the local store would exceed {MAX_STORE_BYTES} bytes",
                    code="store_too_large",
                )
            owner = self._owner_to_keep(lock_fd)
            self._write_atomic(raw, owner)
            sig = self._stat()
            self._snap = _Snapshot(sig=sig, secrets=entries)
        except OSError as exc:
            raise BackendError(f"{self.path}: cannot write local store: {exc.strerror}") from exc
        finally:
            os.close(lock_fd)  # releases the flock
        return version

    def _owner_to_keep(self, lock_fd: int) -> tuple[int, int] | None:
        # `sudo sidekey secrets rotate` must not leave a root-owned 0600 file that the
        # daemon's own uid can no longer read: root keeps the existing owner.
        if os.geteuid() != 0:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        if os.fstat(lock_fd).st_uid != st.st_uid:
            os.fchown(lock_fd, st.st_uid, st.st_gid)
        return (st.st_uid, st.st_gid)

    def _write_atomic(self, raw: bytes, owner: tuple[int, int] | None) -> None:
        atomic_write(self.path, raw, mode=0o600, owner=owner)


def _value_bytes(value: str) -> bytes:
    try:
        data = value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("secret value is not valid UTF-8", code="secret_not_utf8") from None
    if not data:
        raise BadRequest("secret value is empty", code="secret_empty")
    if len(data) > MAX_VALUE_BYTES:
        raise TooLarge(f"secret value is larger than {MAX_VALUE_BYTES} bytes", code="secret_too_large")
    return data


# --------------------------------------------------------------------------- the backend


class LocalBackend:
    """:class:`~sidekey.backends.Backend` over a :class:`LocalStore`."""

    def __init__(
        self,
        name: str,
        path: Path,
        key: bytes,
        *,
        recheck_interval_s: float = RECHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.store = LocalStore(path, key)
        self._recheck_s = recheck_interval_s
        self._clock = clock
        self._next_check = -math.inf
        # One worker thread at a time: reloads and writes are serialised anyway.
        self._limiter = trio.CapacityLimiter(1)

    async def fetch(self, ref: SecretRef | str) -> SecretValue:
        """Decrypt the current version of the secret ``ref`` names.

        Raises :class:`SecretNotFound` or :class:`BackendError`.
        """
        secret_name = ref if isinstance(ref, str) else ref.name
        if secret_name is None:
            raise SecretNotFound("a local secret reference needs a name")
        await self._maybe_reload()
        # Decrypting is synchronous on purpose: AES-GCM over a value capped at 64 KiB
        # takes microseconds, far less than a thread hop. Only file I/O (the reload,
        # which reads and MAC-checks up to 64 MiB) goes to a worker thread, and only
        # every RECHECK_INTERVAL_S at most, so the hot path is a dict lookup + decrypt.
        return self.store.get(secret_name, reload=False)

    async def _maybe_reload(self) -> None:
        now = self._clock()
        if now < self._next_check:
            return
        self._next_check = now + self._recheck_s
        await trio.to_thread.run_sync(self.store.reload_if_changed, limiter=self._limiter)

    async def release(self, lease_id: str) -> None:
        """Local secrets are static: there is no backend lease to end."""

    async def rotate(self, ref: SecretRef | str, value: str) -> str:
        """Store a new version of an existing secret (admin rotate); returns the version."""
        secret_name = ref if isinstance(ref, str) else ref.name
        if secret_name is None:
            raise SecretNotFound("a local secret reference needs a name")
        version = await trio.to_thread.run_sync(
            self.store.rotate, secret_name, value, limiter=self._limiter
        )
        self._next_check = -math.inf
        return version

    async def health(self) -> dict[str, object]:
        """``{"type": "local", "ok": ..., "secrets": n, "path": ...}``; ``error`` if not ok."""
        info: dict[str, object] = {"type": "local", "path": str(self.store.path)}
        try:
            if not self.store.unchanged():  # a stat is cheaper than a thread hop
                await trio.to_thread.run_sync(self.store.reload_if_changed, limiter=self._limiter)
            info["secrets"] = len(self.store.names(reload=False))
            info["ok"] = True
        except SidekeyError as exc:
            info["ok"] = False
            info["error"] = exc.message
        return info

    async def aclose(self) -> None:
        """Nothing to release: the store holds no open files between calls."""


# --------------------------------------------------------------------------- file helpers


def _read_fd(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = os.read(fd, min(1024 * 1024, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)
