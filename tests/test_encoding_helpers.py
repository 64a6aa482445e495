"""Issue 10, item 6: one base64url, one ISO-8601 UTC formatter, one atomic file write.

They replaced copies in tokens, signing, oauth, devissuer, the daemon, the approval
desk, healthcheck, quotas, approvals, the audit log and the local backend. These tests
pin what each caller relied on: the strict decoder refuses exactly what the old strict
copies refused (token, JWT and signature parsing), each caller's time format is byte
for byte what it was, and the atomic write keeps the strictest behaviour (exact mode
whatever the umask, no torn file, no temp file left, nothing written through a planted
symlink).
"""

from __future__ import annotations

import base64
import datetime
import errno
import json
import os
import random
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidekey import approval_desk, devissuer, fsutil, healthcheck, signing, tokens
from sidekey.audit.events import format_timestamp
from sidekey.daemon.context import _iso
from sidekey.encoding import b64url_decode, b64url_encode, iso_utc
from sidekey.protocol import ConfigError

UTC = datetime.UTC

# --------------------------------------------------------------------------- base64url

# The strict decoder as tokens.py, oauth.py and signing.py each had it (the reference).
_OLD_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")


def _old_strict(text: str) -> bytes:
    if len(text) % 4 == 1 or not _OLD_ALPHABET.fullmatch(text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _old_lenient(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_b64url_round_trip_without_padding() -> None:
    for n in range(0, 70):
        data = os.urandom(n)
        text = b64url_encode(data)
        assert "=" not in text and "+" not in text and "/" not in text
        assert text == base64.urlsafe_b64encode(data).decode().rstrip("=")
        assert b64url_decode(text) == data


@pytest.mark.parametrize(
    "text",
    ["AAAA=", "AA==", "AAA=", "A", "AAAAA", "AA+A", "AA/A", "AA A", "AAAA\n", " AAAA",
     "AA.A", "AAé=", "AA\x00A", "AA-_=", "=AAA"],
)
def test_strict_decode_refuses_non_canonical_framing(text: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(text)
    with pytest.raises(ValueError):
        _old_strict(text)


def test_strict_decode_matches_the_old_strict_copies() -> None:
    rng = random.Random(10)
    alphabet = "AZaz09-_=+/ .\n!é"
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        try:
            want: bytes | type[ValueError] = _old_strict(text)
        except ValueError:
            want = ValueError
        try:
            got: bytes | type[ValueError] = b64url_decode(text)
        except ValueError:
            got = ValueError
        assert got == want, text


def test_lenient_decode_is_the_old_key_decoder() -> None:
    key = os.urandom(32)
    padded = base64.urlsafe_b64encode(key).decode()  # with "="
    assert padded.endswith("=")
    assert b64url_decode(padded, strict=False) == key == _old_lenient(padded)
    with pytest.raises(ValueError):
        b64url_decode(padded)  # never on a security path


def test_configured_public_key_may_still_be_padded() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    raw = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    for text in (b64url_encode(raw), base64.urlsafe_b64encode(raw).decode()):
        key = tokens.load_ed25519_public(text, None)
        assert key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == raw


# --------------------------------------------------------------------------- ISO-8601 UTC


def test_iso_utc_timespecs() -> None:
    ts = 1_775_571_791.847_321  # 2026-04-07T14:23:11.847321Z
    assert iso_utc(ts) == "2026-04-07T14:23:11Z"
    assert iso_utc(ts, "seconds") == "2026-04-07T14:23:11Z"
    assert iso_utc(ts, "milliseconds") == "2026-04-07T14:23:11.847Z"
    when = datetime.datetime(2026, 4, 7, 14, 23, 11, 847_321, tzinfo=UTC)
    assert iso_utc(when, "auto") == "2026-04-07T14:23:11.847321Z"
    assert iso_utc(when.replace(microsecond=0), "auto") == "2026-04-07T14:23:11Z"
    # Truncated, never rounded into the next second / millisecond.
    assert iso_utc(when.replace(microsecond=999_999)) == "2026-04-07T14:23:11Z"
    assert iso_utc(when.replace(microsecond=999_999), "milliseconds") == "2026-04-07T14:23:11.999Z"


def test_iso_utc_converts_to_utc_and_takes_naive_as_utc() -> None:
    cet = datetime.timezone(datetime.timedelta(hours=2))
    assert iso_utc(datetime.datetime(2026, 4, 7, 16, 0, tzinfo=cet)) == "2026-04-07T14:00:00Z"
    assert iso_utc(datetime.datetime(2026, 4, 7, 14, 0)) == "2026-04-07T14:00:00Z"


def test_each_callers_format_is_unchanged() -> None:
    """The old formatters, inline, against the callers that now use iso_utc."""
    rng = random.Random(6)
    for _ in range(5_000):
        ts = rng.uniform(0, 253_402_300_799)
        utc = datetime.datetime.fromtimestamp(ts, UTC)
        # daemon context: whole seconds (int() of the timestamp), strftime
        assert _iso(ts) == datetime.datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        # signing: signed_at to the second
        assert iso_utc(ts) == utc.replace(microsecond=0).isoformat().replace("+00:00", "Z")
        # healthcheck: milliseconds
        assert healthcheck._iso(ts) == utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        # approval desk, quotas, approvals: isoformat() (microseconds when non-zero)
        assert approval_desk._iso(utc) == utc.isoformat().replace("+00:00", "Z")
        # audit events: strftime + milliseconds
        assert format_timestamp(utc) == utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


# --------------------------------------------------------------------------- atomic write


@pytest.fixture
def umask() -> Iterator[None]:
    """Restores the process umask a test changes."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077, 0o277])
def test_atomic_write_sets_exactly_the_mode(tmp_path: Path, umask: None, mask: int) -> None:
    os.umask(mask)
    for mode in (0o600, 0o644):
        path = tmp_path / f"f{mode:o}"
        fsutil.atomic_write(path, b"one", mode=mode)
        fsutil.atomic_write(path, b"two", mode=mode)  # replacing keeps the mode too
        assert stat.S_IMODE(path.stat().st_mode) == mode
        assert path.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f600", "f644"]


def test_atomic_write_failure_keeps_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    fsutil.atomic_write(path, b"old", mode=0o600)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        fsutil.atomic_write(path, b"new" * 1000, mode=0o600)
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_atomic_write_gives_the_owner(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("tests run as root (COMMON.md); chown needs it")
    path = tmp_path / "f"
    fsutil.atomic_write(path, b"x", mode=0o600, owner=(65534, 65534))
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o600)


def test_write_all_survives_short_writes_and_refuses_no_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    path = tmp_path / "f"
    data = bytes(range(256)) * 40
    fsutil.atomic_write(path, data, mode=0o600)
    assert path.read_bytes() == data
    monkeypatch.setattr(os, "write", lambda fd, data: 0)
    with pytest.raises(OSError) as info:
        fsutil.atomic_write(path, b"never", mode=0o600)
    assert info.value.errno == errno.EIO
    monkeypatch.undo()
    assert path.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_dev_issuer_jwks_is_written_atomically_and_not_through_a_planted_link(tmp_path: Path) -> None:
    """``write_jwks`` used a fixed ``<name>.tmp`` and wrote through whatever was there:
    a symlink planted under that name redirected the write (as root) anywhere."""
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    jwks = tmp_path / "jwks.json"
    (tmp_path / "jwks.json.tmp").symlink_to(victim)
    key = tmp_path / "issuer.key"
    kid = devissuer.create_issuer(key, jwks)
    assert victim.read_text() == "keep me"
    assert json.loads(jwks.read_text())["keys"][0]["kid"] == kid
    assert stat.S_IMODE(jwks.stat().st_mode) == 0o644
    assert not jwks.is_symlink()


def test_token_key_files_stay_private(tmp_path: Path, umask: None) -> None:
    os.umask(0o000)
    keyset = tmp_path / "keys" / "tokens.json"
    tokens.rotate_keyset(keyset)
    tokens.rotate_keyset(keyset)
    assert stat.S_IMODE(keyset.stat().st_mode) == 0o600
    assert len(tokens.load_keyset(keyset).keys) == 2
    assert sorted(p.name for p in keyset.parent.iterdir()) == ["tokens.json"]


def test_signature_file_write_failure_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot write"):
        signing._write_public(tmp_path / "missing-dir" / "x.sig", b"{}")
    signing._write_public(tmp_path / "x.sig", b"{}")
    assert stat.S_IMODE((tmp_path / "x.sig").stat().st_mode) == 0o644


def test_random_uuid4_is_a_version_4_uuid_text_and_random_hex_its_length() -> None:
    import uuid

    from sidekey.encoding import random_hex, random_uuid4

    ids = {random_uuid4() for _ in range(2000)}
    assert len(ids) == 2000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
    assert {len(random_hex(n)) for n in (1, 10, 16)} == {2, 20, 32}
