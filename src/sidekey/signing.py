"""Configuration integrity: detached Ed25519 signatures over the main config and its includes.

``sidekey config sign`` writes ``<main file>.sig`` next to the main file::

    {
      "format": "sidekey-config-signature-v1",
      "kid": "ed-1a2b3c4d",
      "signed_at": "2025-01-31T12:00:00Z",
      "files": {"sidekey.yaml": "<sha256 hex>", "mcp-server-registry.yaml": "<sha256 hex>"},
      "signature": "<base64url, unpadded>"
    }

``files`` holds every file the loader read (main file first, then the includes in
order), keyed by its path relative to the main file's directory. ``signature`` is the
Ed25519 signature over the canonical JSON (``protocol.canonical_json``: sorted keys, no
whitespace, UTF-8) of the object made of the other four members. The layout of the
``.sig`` file itself is not signed, only those members.

The ``kid`` names the key in ``config_signing.trusted_keys``; verification picks the key
by ``kid`` from *our* trusted keys, never from the signature file. When signing, the kid
is the one under which the config lists the signing key's public key, else an explicit
one, else the key's fingerprint (:func:`fingerprint`).

Digests are over the exact bytes read; each file is read once per verification, or
taken from ``contents`` when the caller already holds the bytes it parsed.
"""

from __future__ import annotations

import binascii
import datetime
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from msgspec import Meta

from .config import MAX_CONFIG_BYTES, LoadedConfig
from .encoding import b64url_decode, b64url_encode, iso_utc
from .fsutil import atomic_write
from .protocol import ConfigError, canonical_json
from .tokens import load_ed25519_private, load_ed25519_public

log = logging.getLogger(__name__)

SIGNATURE_FORMAT = "sidekey-config-signature-v1"
SIGNATURE_SUFFIX = ".sig"
MAX_SIGNATURE_BYTES = 64 * 1024
SIGNATURE_FILE_MODE = 0o644
ED25519_SIGNATURE_BYTES = 64
FINGERPRINT_PREFIX = "ed25519:"
FINGERPRINT_HEX_CHARS = 16


class SignatureFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The decoded ``.sig`` file (format checked separately, for a clearer message)."""

    format: str
    kid: Annotated[str, Meta(min_length=1, max_length=128)]
    signed_at: Annotated[str, Meta(min_length=1, max_length=64)]
    files: Annotated[dict[str, Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]], Meta(min_length=1)]
    signature: Annotated[str, Meta(min_length=1, max_length=256)]


@dataclass(frozen=True, slots=True)
class VerifiedSignature:
    """What a valid signature vouches for: who signed, when, and which file digests."""

    kid: str
    signed_at: str
    files: Mapping[str, str]


_signature_decoder = msgspec.json.Decoder(SignatureFile)


# --------------------------------------------------------------------------- helpers


def signature_path(main: Path) -> Path:
    """The detached signature of the main config file ``main``: ``<main>.sig``."""
    return main.with_name(main.name + SIGNATURE_SUFFIX)


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_text(key: Ed25519PublicKey) -> str:
    """The raw 32-byte public key in base64url, as ``trusted_keys[].public_key`` takes it."""
    return b64url_encode(_raw_public(key))


def fingerprint(key: Ed25519PublicKey) -> str:
    """A kid derived from the public key: ``ed25519:`` + the first 16 hex of its SHA-256.

    Used when the signing key is not listed in the config's ``trusted_keys`` and no kid
    is given (the kids ``sidekey keygen ed25519`` prints are random labels, not derived).
    """
    return FINGERPRINT_PREFIX + hashlib.sha256(_raw_public(key)).hexdigest()[:FINGERPRINT_HEX_CHARS]


def signed_files(loaded: LoadedConfig) -> list[tuple[str, Path]]:
    """(name relative to the main file's directory, path) per loaded file, deduplicated."""
    out: dict[str, Path] = {}
    for path in loaded.files:
        name = os.path.relpath(path, loaded.path.parent)
        out.setdefault(name, path)
    return list(out.items())


def _read_capped(path: Path, cap: int) -> bytes:
    """Read at most ``cap`` bytes of ``path``; :class:`ConfigError` if larger or unreadable."""
    try:
        with path.open("rb") as f:
            raw = f.read(cap + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(raw) > cap:
        raise ConfigError(f"{path}: larger than {cap} bytes")
    return raw


def _signed_payload(fmt: str, kid: str, signed_at: str, files: Mapping[str, str]) -> bytes:
    try:
        return canonical_json({"format": fmt, "kid": kid, "signed_at": signed_at, "files": dict(files)})
    except UnicodeEncodeError as exc:  # a file name that is not valid UTF-8
        raise ConfigError(f"cannot sign a file name that is not valid UTF-8: {exc.object!r}") from None


def _write_public(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with exactly mode 0644, whatever the umask
    (:func:`sidekey.fsutil.atomic_write`: tmp + fsync + rename + directory fsync)."""
    try:
        atomic_write(path, data, mode=SIGNATURE_FILE_MODE)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror or exc}") from exc


# --------------------------------------------------------------------------- keys


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (unencrypted PKCS#8 PEM, mode 0600).

    Raises :class:`ConfigError` (missing, too open, not an Ed25519 private key).
    """
    try:
        return load_ed25519_private(path)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: private key not found; create one with `sidekey keygen ed25519 --out {path}`"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (ValueError, TypeError) as exc:
        # ValueError: not PEM / not a private key; TypeError: encrypted PEM.
        raise ConfigError(f"{path}: not an unencrypted PEM Ed25519 private key") from exc


def load_public_key_file(path: Path) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a PEM file. Raises :class:`ConfigError`."""
    try:
        return load_ed25519_public(None, path)
    except ConfigError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError):
            raise ConfigError(f"{path}: cannot read: {cause.strerror or cause}") from exc
        raise ConfigError(f"{path}: not a PEM Ed25519 public key") from exc


def trusted_keys(loaded: LoadedConfig) -> dict[str, Ed25519PublicKey]:
    """The keys in ``config_signing.trusted_keys``, by kid.

    ``public_key`` is raw 32 bytes in base64url; ``public_key_file`` a PEM file, relative
    to the main file's directory. Raises :class:`ConfigError` naming the entry.
    """
    out: dict[str, Ed25519PublicKey] = {}
    errors: list[str] = []
    for i, entry in enumerate(loaded.config.config_signing.trusted_keys):
        where = f"{loaded.path.name}: $.config_signing.trusted_keys.{i}"
        if (entry.public_key is None) == (entry.public_key_file is None):
            errors.append(f"{where}: set exactly one of public_key or public_key_file")
            continue
        if entry.kid in out:
            errors.append(f'{where}.kid: "{entry.kid}" is listed twice')
            continue
        try:
            if entry.public_key_file is not None:
                key = load_public_key_file(loaded.resolve(entry.public_key_file))
            else:
                key = load_ed25519_public(entry.public_key, None)
        except ConfigError as exc:
            field = "public_key_file" if entry.public_key_file is not None else "public_key"
            detail = str(exc) if entry.public_key_file is not None else (
                "expected a raw 32-byte Ed25519 public key in base64url"
            )
            errors.append(f"{where}.{field}: {detail}")
            continue
        out[entry.kid] = key
    if errors:
        raise ConfigError("\n".join(errors))
    return out


def kid_for(loaded: LoadedConfig, public_key: Ed25519PublicKey) -> str | None:
    """The kid under which ``config_signing.trusted_keys`` lists ``public_key``, if any."""
    raw = _raw_public(public_key)
    for kid, key in trusted_keys(loaded).items():
        if _raw_public(key) == raw:
            return kid
    return None


# --------------------------------------------------------------------------- sign


def sign_config(
    loaded: LoadedConfig,
    private_key_file: Path,
    *,
    kid: str | None = None,
    now: float | None = None,
    contents: Mapping[Path, bytes] | None = None,
) -> Path:
    """Sign every file of ``loaded`` (main file and includes) with an Ed25519 key.

    ``kid`` defaults to the kid under which the config's ``trusted_keys`` lists the key,
    else the key's :func:`fingerprint`. ``contents`` (path -> bytes, as in
    ``loaded.files``) signs those bytes instead of reading the files again.
    Writes ``<main>.sig`` atomically (mode 0644) and returns its path.
    Raises :class:`ConfigError` (bad key, unreadable file, cannot write).
    """
    private = load_private_key(private_key_file)
    if kid is None:
        kid = kid_for(loaded, private.public_key()) or fingerprint(private.public_key())
    if not 1 <= len(kid) <= 128:
        raise ConfigError(f"kid must be 1 to 128 characters, got {len(kid)}")
    files: dict[str, str] = {}
    for name, path in signed_files(loaded):
        if contents is not None and path in contents:
            data = contents[path]
        else:
            data = _read_capped(path, MAX_CONFIG_BYTES)
        files[name] = hashlib.sha256(data).hexdigest()
    signed_at = iso_utc(datetime.datetime.now(datetime.UTC).timestamp() if now is None else now)
    payload = _signed_payload(SIGNATURE_FORMAT, kid, signed_at, files)
    doc: dict[str, Any] = {
        "format": SIGNATURE_FORMAT,
        "kid": kid,
        "signed_at": signed_at,
        "files": files,  # insertion order: main file first
        "signature": b64url_encode(private.sign(payload)),
    }
    out = signature_path(loaded.path)
    _write_public(out, msgspec.json.format(msgspec.json.encode(doc), indent=2) + b"\n")
    log.debug("signed %d config files with key %s: %s", len(files), kid, out)
    return out


# --------------------------------------------------------------------------- verify


def _read_signature(loaded: LoadedConfig) -> SignatureFile:
    sig_path = signature_path(loaded.path)
    try:
        with sig_path.open("rb") as f:
            raw = f.read(MAX_SIGNATURE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"{sig_path}: missing; sign with "
            f"`sidekey config sign --config {loaded.path} --key <private key>`"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{sig_path}: cannot read: {exc.strerror or exc}") from exc
    if len(raw) > MAX_SIGNATURE_BYTES:
        raise ConfigError(f"{sig_path}: larger than {MAX_SIGNATURE_BYTES} bytes; not a config signature")
    try:
        doc = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{sig_path}: garbled: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise ConfigError(
            f"{sig_path}: garbled: format is {found!r}, expected {SIGNATURE_FORMAT!r}"
        )
    try:
        sig = _signature_decoder.decode(raw)
        datetime.datetime.fromisoformat(sig.signed_at)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"{sig_path}: garbled: {exc}") from None
    return sig


def _check_signature(
    loaded: LoadedConfig,
    sig: SignatureFile,
    candidates: Callable[[str], Iterable[Ed25519PublicKey]],
    unknown: Callable[[str], str],
    under: str,
) -> None:
    sig_path = signature_path(loaded.path)
    keys = list(candidates(sig.kid))
    if not keys:
        raise ConfigError(f"{sig_path}: {unknown(sig.kid)}")
    try:
        signature = b64url_decode(sig.signature)
    except (ValueError, binascii.Error):
        raise ConfigError(f"{sig_path}: garbled: signature is not base64url") from None
    if len(signature) != ED25519_SIGNATURE_BYTES:
        raise ConfigError(
            f"{sig_path}: garbled: signature is {len(signature)} bytes, "
            f"expected {ED25519_SIGNATURE_BYTES}"
        )
    payload = _signed_payload(sig.format, sig.kid, sig.signed_at, sig.files)
    for key in keys:
        try:
            key.verify(signature, payload)
            return
        except InvalidSignature:
            continue
    raise ConfigError(
        f"{sig_path}: bad signature: it does not verify under {under} "
        "(forged, or the .sig file was edited)"
    )


def _check_files(
    loaded: LoadedConfig, sig: SignatureFile, contents: Mapping[Path, bytes] | None
) -> None:
    problems: list[str] = []
    loaded_names: set[str] = set()
    for name, path in signed_files(loaded):
        loaded_names.add(name)
        if contents is not None and path in contents:
            data = contents[path]
        else:
            try:
                data = _read_capped(path, MAX_CONFIG_BYTES)
            except ConfigError as exc:
                problems.append(str(exc))
                continue
        expected = sig.files.get(name)
        if expected is None:
            problems.append(
                f"{name} is loaded but not covered by the signature made at {sig.signed_at}"
            )
        elif hashlib.sha256(data).hexdigest() != expected:
            problems.append(f"stale signature: {name} changed since it was signed at {sig.signed_at}")
    for name in sig.files:
        if name not in loaded_names:
            problems.append(
                f"{name} was signed at {sig.signed_at} but is no longer included"
            )
    if problems:
        raise ConfigError("\n".join(problems))


def verify_config_details(
    loaded: LoadedConfig,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    contents: Mapping[Path, bytes] | None = None,
) -> VerifiedSignature:
    """Like :func:`verify_config`, returning the kid, ``signed_at`` and the signed digests."""
    sig = _read_signature(loaded)

    def candidates(kid: str) -> list[Ed25519PublicKey]:
        key = trusted.get(kid)
        return [] if key is None else [key]

    def unknown(kid: str) -> str:
        known = ", ".join(sorted(trusted)) or "none; set config_signing.trusted_keys"
        return f"signed with unknown kid {kid!r} (trusted: {known})"

    _check_signature(loaded, sig, candidates, unknown, f"trusted key {sig.kid}")
    _check_files(loaded, sig, contents)
    return VerifiedSignature(kid=sig.kid, signed_at=sig.signed_at, files=dict(sig.files))


def verify_config(
    loaded: LoadedConfig,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    contents: Mapping[Path, bytes] | None = None,
) -> str:
    """Check ``<main>.sig`` against the files of ``loaded``; return the kid that signed.

    The key is chosen by the signature's ``kid`` from ``trusted`` (see
    :func:`trusted_keys`). ``contents`` (path -> bytes, as in ``loaded.files``) lets the
    loader pass the exact bytes it parsed; otherwise each file is read once here.
    Raises :class:`ConfigError`, one line per problem: the signature file is missing,
    unreadable or garbled; the kid is unknown; the signature does not verify; a file
    changed since signing, is loaded but not signed, or was signed but is no longer
    included.
    """
    return verify_config_details(loaded, trusted, contents=contents).kid


def verify_config_with_keys(
    loaded: LoadedConfig,
    keys: Iterable[Ed25519PublicKey],
    *,
    contents: Mapping[Path, bytes] | None = None,
) -> VerifiedSignature:
    """Verify against explicitly given public keys, whatever kid the signature names.

    For ``sidekey config verify --key FILE``: a PEM file carries no kid, so the operator
    vouches for the key itself. Raises :class:`ConfigError` like :func:`verify_config`.
    """
    given = list(keys)
    sig = _read_signature(loaded)

    def unknown(kid: str) -> str:
        return f"signed with kid {kid!r}; no keys given to verify with"

    under = "the given key" if len(given) == 1 else f"any of the {len(given)} given keys"
    _check_signature(loaded, sig, lambda _kid: given, unknown, f"{under} (kid {sig.kid})")
    _check_files(loaded, sig, contents)
    return VerifiedSignature(kid=sig.kid, signed_at=sig.signed_at, files=dict(sig.files))
