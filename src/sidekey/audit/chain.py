"""Tamper evidence for the audit file: a hash chain plus signed checkpoints.

Every line the file sink writes ends with three chain fields, appended to the event's
own JSON (its seed keys stay first and unchanged)::

    ..., "seq": 42, "prev_hash": "<64 hex>", "log_id": "<16 hex>"}

- ``seq``: 1, 2, 3, ... per log (a deletion leaves a gap);
- ``prev_hash``: SHA-256 (hex) of the previous line **exactly as written**, its bytes
  without the trailing newline (the canonical form: no re-serialisation, so a verifier
  in any language hashes what it reads); :data:`GENESIS` for the first event of a log;
- ``log_id``: random, fixed for the life of the log (carried across restarts), so lines
  spliced in from another log are recognised even from the same host.

Every ``checkpoint_every_events`` events or ``checkpoint_every_s`` seconds the writer
appends an ``audit.checkpoint`` event whose ``checkpoint`` field holds an Ed25519
signature over :func:`checkpoint_payload` (log id, host, the seq and hash of the last
event before it, the signing time, and whether it is the daemon's closing checkpoint).
The checkpoint rides in the same write (and fsync) as the batch it follows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..protocol import ConfigError, canonical_json

GENESIS = "0" * 64
CHAIN_KEYS = ("seq", "prev_hash", "log_id")
CHECKPOINT_TYPE = "audit.checkpoint"
REPAIRED_TYPE = "audit.repaired"
PAYLOAD_FORMAT = "sidekey-audit-checkpoint/1"
KEY_ID_PREFIX = "ed25519:"
# At open, the tail of an existing file is scanned back this far for the last chained line.
TAIL_SCAN_BYTES = 4 * 1024 * 1024
_SCAN_CHUNK = 64 * 1024
MAX_KEY_FILE_BYTES = 16 * 1024


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def line_hash(line: bytes) -> str:
    """The chain hash of one line: SHA-256 hex of its bytes without the newline."""
    return hashlib.sha256(line).hexdigest()


def new_log_id() -> str:
    return secrets.token_hex(8)


def chained_line(body: bytes, seq: int, prev_hash: str, log_id: str) -> bytes:
    """``body`` (one JSON object, ``{...}``) with the chain fields appended before its
    closing brace. ``prev_hash`` and ``log_id`` are hex, so they need no escaping."""
    return b'%s,"seq":%d,"prev_hash":"%s","log_id":"%s"}' % (
        body[:-1], seq, prev_hash.encode("ascii"), log_id.encode("ascii"))


def checkpoint_payload(*, log_id: str, host: str, seq: int, hash_: str, signed_at: str,
                       final: bool) -> bytes:
    """The bytes a checkpoint signs (canonical JSON: sorted keys, no whitespace)."""
    return canonical_json({
        "format": PAYLOAD_FORMAT, "log_id": log_id, "host": host, "seq": seq, "hash": hash_,
        "signed_at": signed_at, "final": final,
    })


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """``ed25519:`` + the first 16 hex of SHA-256 of the raw public key."""
    return KEY_ID_PREFIX + hashlib.sha256(raw_public(key)).hexdigest()[:16]


class Signer:
    """The daemon's audit key: signs checkpoint payloads."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        public = key.public_key()
        self.key_id = key_id(public)
        self.public_key = b64url(raw_public(public))

    def sign(self, payload: bytes) -> str:
        return b64url(self._key.sign(payload))


def checkpoint_fields(signer: Signer, *, log_id: str, host: str, seq: int, hash_: str,
                      signed_at: str, final: bool) -> dict[str, Any]:
    """The ``checkpoint`` field of an ``audit.checkpoint`` event."""
    payload = checkpoint_payload(log_id=log_id, host=host, seq=seq, hash_=hash_,
                                 signed_at=signed_at, final=final)
    return {
        "covers_seq": seq, "covers_hash": hash_, "log_id": log_id, "host": host,
        "signed_at": signed_at, "final": final, "alg": "Ed25519", "key_id": signer.key_id,
        "public_key": signer.public_key, "sig": signer.sign(payload),
    }


def verify_checkpoint(cp: dict[str, Any], public: Ed25519PublicKey) -> bool:
    """Whether ``cp`` (a checkpoint field) carries a valid signature by ``public``."""
    try:
        payload = checkpoint_payload(
            log_id=cp["log_id"], host=cp["host"], seq=cp["covers_seq"], hash_=cp["covers_hash"],
            signed_at=cp["signed_at"], final=cp["final"])
        public.verify(b64url_decode(cp["sig"]), payload)
    except (KeyError, TypeError, ValueError, binascii.Error, InvalidSignature):
        return False
    return True


# --------------------------------------------------------------------------- keys


def generate_audit_key(out: Path) -> tuple[Path, str, str]:
    """Write a new Ed25519 audit key: ``out`` (PKCS#8 PEM, 0600) and ``out.pub`` (PEM
    public key, 0644, for auditors). Returns (public key path, key id, raw public b64url).
    Never overwrites."""
    from ..fsutil import atomic_write

    pub = out.with_name(out.name + ".pub")
    for p in (out, pub):
        if p.exists():
            raise ConfigError(f"{p}: already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(out, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()), mode=0o600)
    public = key.public_key()
    atomic_write(pub, public.public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo), mode=0o644)
    return pub, key_id(public), b64url(raw_public(public))


def load_signer(path: Path | None, credential: str | None) -> Signer:
    """The audit key from a file (regular, owned by the daemon's uid or root, no
    group/other bits) or a systemd credential. Raises :class:`ConfigError` (never
    quoting the key)."""
    from ..secretfiles import read_secret_bytes

    raw = read_secret_bytes(path, credential, what="audit checkpoint key")
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        where = path if credential is None else f"credential {credential}"
        raise ConfigError(f"{where}: not an unencrypted PEM Ed25519 private key "
                          "(create one with `sidekey keygen audit --out FILE`)")
    return Signer(key)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An auditor's copy of the audit public key: the PEM file ``keygen audit`` wrote
    (``FILE.pub``), or the raw key in base64url on one line. Raises :class:`ConfigError`."""
    try:
        raw = path.read_bytes()[:MAX_KEY_FILE_BYTES]
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the audit public key: {exc.strerror}") from None
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(raw)
            if isinstance(key, Ed25519PublicKey):
                return key
        else:
            return Ed25519PublicKey.from_public_bytes(b64url_decode(raw.decode("ascii").strip()))
    except (ValueError, TypeError, UnicodeDecodeError, binascii.Error):
        pass
    raise ConfigError(f"{path}: not an Ed25519 public key (PEM or raw base64url)")


# --------------------------------------------------------------------------- recovery


@dataclass
class ChainState:
    """Where the chain stands: the last written line's seq and hash, and the log id."""

    seq: int = 0
    head: str = GENESIS
    log_id: str = field(default_factory=new_log_id)
    # Events written since the last checkpoint (including those found at open).
    unsigned: int = 0


@dataclass
class Recovered:
    """What :func:`recover_tail` found at the end of an existing file."""

    state: ChainState | None  # None: no chained line in the scanned tail
    last_line_hash: str | None  # hash of the last complete line, chained or not
    # Lines after the last chained one that are not chained events (a torn write's
    # fragment, garbage): (bytes, sha256) each, in file order.
    skipped: list[tuple[int, str]]
    torn: bool  # the file did not end with a newline


def chain_event(line: bytes) -> dict[str, Any] | None:
    """The event of a chained line (with int ``seq``, str ``prev_hash`` and ``log_id``),
    None for anything else."""
    try:
        event = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(event, dict):
        return None
    seq, prev, log_id = event.get("seq"), event.get("prev_hash"), event.get("log_id")
    if type(seq) is not int or not isinstance(prev, str) or not isinstance(log_id, str):
        return None
    return event


def recover_tail(fd: int, size: int) -> Recovered:
    """Scan the end of the open file ``fd`` (``size`` bytes) back to its last chained
    line (at most :data:`TAIL_SCAN_BYTES`)."""
    torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
    buf = b""
    pos = size
    skipped: list[tuple[int, str]] = []
    last_line_hash: str | None = None
    seen = 0
    # Lines are taken from the end; ``buf`` holds the not yet complete head part.
    while pos > 0 and size - pos < TAIL_SCAN_BYTES:
        take = min(_SCAN_CHUNK, pos)
        pos -= take
        buf = os.pread(fd, take, pos) + buf
        lines = buf.split(b"\n")
        # lines[0] may be incomplete (its start lies before pos) unless pos == 0.
        head, complete = (b"", lines) if pos == 0 else (lines[0], lines[1:])
        for line in reversed(complete):
            if not line:
                continue
            fragment = torn and seen == 0  # the torn last line is not a complete line
            seen += 1
            if last_line_hash is None and not fragment:
                last_line_hash = line_hash(line)
            event = chain_event(line)
            if event is not None:
                state = ChainState(seq=event["seq"], head=line_hash(line), log_id=event["log_id"])
                skipped.reverse()
                if event.get("event_type") != CHECKPOINT_TYPE:
                    state.unsigned = 1
                return Recovered(state, last_line_hash, skipped, torn)
            skipped.append((len(line), line_hash(line)))
        buf = head
    skipped.reverse()
    return Recovered(None, last_line_hash, skipped, torn)
