"""Config signatures: sign, verify, every way verification fails, and the CLI end to end."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from harness import QUICKSTART
from sidekey.config import LoadedConfig, load_config
from sidekey.protocol import ConfigError
from sidekey.signing import (
    MAX_SIGNATURE_BYTES,
    SIGNATURE_FORMAT,
    fingerprint,
    sign_config,
    trusted_keys,
    verify_config,
    verify_config_details,
    verify_config_with_keys,
)
from sidekey.tokens import generate_ed25519, load_ed25519_private

CLI_TIMEOUT_S = 30.0
NOW = 1_700_000_000.0
SIGNED_AT = "2023-11-14T22:13:20Z"
INCLUDES = [
    "mcp-server-registry.yaml",
    "central-registry.yaml",
    "agent-tool-mappings.yaml",
    "rate-limits.yaml",
]


@dataclass
class Setup:
    root: Path
    main: Path
    key: Path
    kid: str
    public: str

    @property
    def sig(self) -> Path:
        return self.root / "sidekey.yaml.sig"

    def load(self) -> LoadedConfig:
        return load_config(self.main)

    def sign(self, key: Path | None = None, *, kid: str | None = None) -> Path:
        return sign_config(self.load(), key or self.key, kid=kid, now=NOW)

    def verify(self) -> str:
        loaded = self.load()
        return verify_config(loaded, trusted_keys(loaded))

    def verify_error(self) -> str:
        with pytest.raises(ConfigError) as info:
            self.verify()
        return str(info.value)

    def new_key(self, name: str) -> Path:
        path = self.root / name
        generate_ed25519(path)
        return path

    def public_pem(self, private: Path) -> Path:
        out = private.with_suffix(".pub")
        public = load_ed25519_private(private).public_key()
        out.write_bytes(
            public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return out


def _trust(main: Path, entry: str) -> None:
    with main.open("a") as f:
        f.write(f"\nconfig_signing:\n  trusted_keys:\n    - {entry}\n")


@pytest.fixture
def qs() -> Iterator[Setup]:
    """The quickstart's YAML files in a short temp dir, trusting a fresh signing key."""
    root = Path(tempfile.mkdtemp(prefix="sk-"))
    try:
        for f in QUICKSTART.glob("*.yaml"):
            shutil.copy(f, root / f.name)
        key = root / "signing.pem"
        kid, public = generate_ed25519(key)
        main = root / "sidekey.yaml"
        _trust(main, f"{{kid: {kid}, public_key: {public}}}")
        yield Setup(root=root, main=main, key=key, kid=kid, public=public)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def flip_byte(path: Path, needle: bytes) -> None:
    """Change one byte of ``path``: the last byte of the first ``needle``."""
    data = bytearray(path.read_bytes())
    i = data.index(needle) + len(needle) - 1
    data[i] ^= 0x20  # flips letter case: still valid YAML
    path.write_bytes(bytes(data))


def edit_sig(qs: Setup, change: Callable[[dict[str, Any]], object]) -> None:
    doc = json.loads(qs.sig.read_text())
    change(doc)
    qs.sig.write_text(json.dumps(doc))


# --------------------------------------------------------------------------- sign + verify


def test_sign_then_verify(qs: Setup) -> None:
    out = qs.sign()
    assert out == qs.sig
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert qs.verify() == qs.kid
    doc = json.loads(out.read_text())
    assert doc["format"] == SIGNATURE_FORMAT
    assert doc["kid"] == qs.kid
    assert doc["signed_at"] == SIGNED_AT
    assert list(doc["files"]) == ["sidekey.yaml", *INCLUDES]  # main file first
    for name, digest in doc["files"].items():
        assert digest == hashlib.sha256((qs.root / name).read_bytes()).hexdigest()
    # The signature is over the canonical JSON of the four other members, so anyone can
    # check it without sidekey: the documented form (sorted keys, no whitespace, UTF-8)
    # is rebuilt here with the standard library alone, not with sidekey's canonical_json.
    members = {k: doc[k] for k in ("format", "kid", "signed_at", "files")}
    payload = json.dumps(
        members, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    signature = base64.urlsafe_b64decode(doc["signature"] + "==")
    public = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(qs.public + "="))
    public.verify(signature, payload)
    assert not [p for p in qs.root.iterdir() if p.name.endswith(".tmp")]


def test_details_and_resign_replaces(qs: Setup) -> None:
    qs.sign()
    flip_byte(qs.root / "rate-limits.yaml", b"# rate-limits.yam")
    qs.sign()  # a reviewed change is re-signed: the new .sig replaces the old one
    loaded = qs.load()
    details = verify_config_details(loaded, trusted_keys(loaded))
    assert (details.kid, details.signed_at) == (qs.kid, SIGNED_AT)
    assert set(details.files) == {"sidekey.yaml", *INCLUDES}


def test_signature_file_mode_ignores_umask(qs: Setup) -> None:
    old = os.umask(0o077)
    try:
        qs.sign()
    finally:
        os.umask(old)
    assert stat.S_IMODE(qs.sig.stat().st_mode) == 0o644


def test_kid_defaults_to_fingerprint_when_key_not_trusted(qs: Setup) -> None:
    other = qs.new_key("other.pem")
    qs.sign(other)
    kid = json.loads(qs.sig.read_text())["kid"]
    assert kid == fingerprint(load_ed25519_private(other).public_key())
    assert kid.startswith("ed25519:")
    qs.sign(other, kid="release-2024")
    assert json.loads(qs.sig.read_text())["kid"] == "release-2024"


# --------------------------------------------------------------------------- tampering


def test_tampered_include_is_stale(qs: Setup) -> None:
    qs.sign()
    flip_byte(qs.root / "mcp-server-registry.yaml", b"# mcp-server-registry.yam")  # a comment
    assert qs.verify_error() == (
        f"stale signature: mcp-server-registry.yaml changed since it was signed at {SIGNED_AT}"
    )


def test_tampered_main_file_is_stale(qs: Setup) -> None:
    qs.sign()
    text = qs.main.read_text()
    assert "ttl_seconds: 300" in text
    qs.main.write_text(text.replace("ttl_seconds: 300", "ttl_seconds: 200", 1))
    assert qs.verify_error() == (
        f"stale signature: sidekey.yaml changed since it was signed at {SIGNED_AT}"
    )


def test_missing_signature(qs: Setup) -> None:
    assert qs.verify_error() == (
        f"{qs.sig}: missing; sign with "
        f"`sidekey config sign --config {qs.main} --key <private key>`"
    )
    qs.sign()
    qs.sig.unlink()
    assert qs.verify_error().startswith(f"{qs.sig}: missing; sign with")


def test_untrusted_key_is_unknown_kid(qs: Setup) -> None:
    other = qs.new_key("other.pem")
    qs.sign(other)
    kid = fingerprint(load_ed25519_private(other).public_key())
    assert qs.verify_error() == (
        f"{qs.sig}: signed with unknown kid '{kid}' (trusted: {qs.kid})"
    )


def test_untrusted_key_claiming_a_trusted_kid_is_forged(qs: Setup) -> None:
    qs.sign(qs.new_key("other.pem"), kid=qs.kid)
    assert qs.verify_error() == (
        f"{qs.sig}: bad signature: it does not verify under trusted key {qs.kid} "
        "(forged, or the .sig file was edited)"
    )


def test_flipped_signature_byte_is_forged(qs: Setup) -> None:
    qs.sign()

    def flip(doc: dict[str, str]) -> None:
        raw = bytearray(base64.urlsafe_b64decode(doc["signature"] + "=="))
        raw[10] ^= 0x01
        doc["signature"] = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()

    edit_sig(qs, flip)
    assert "bad signature: it does not verify under trusted key" in qs.verify_error()


def test_digest_edited_in_signature_file_is_forged_not_stale(qs: Setup) -> None:
    """Tamper a file and write its new digest into the .sig: the signature catches it."""
    qs.sign()
    path = qs.root / "rate-limits.yaml"
    flip_byte(path, b"# rate-limits.yam")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    edit_sig(qs, lambda doc: doc["files"].__setitem__("rate-limits.yaml", digest))
    error = qs.verify_error()
    assert error.startswith(f"{qs.sig}: bad signature:"), error
    assert "stale" not in error


def test_include_added_after_signing_is_not_covered(qs: Setup) -> None:
    qs.sign()
    (qs.root / "extra.yaml").write_text("# adds nothing, but is loaded\n")
    text = qs.main.read_text()
    qs.main.write_text(text.replace("  - rate-limits.yaml\n", "  - rate-limits.yaml\n  - extra.yaml\n"))
    assert qs.verify_error().splitlines() == [
        f"stale signature: sidekey.yaml changed since it was signed at {SIGNED_AT}",
        f"extra.yaml is loaded but not covered by the signature made at {SIGNED_AT}",
    ]


def test_include_dropped_after_signing_is_reported(qs: Setup) -> None:
    qs.sign()
    qs.main.write_text(qs.main.read_text().replace("  - rate-limits.yaml\n", ""))
    assert qs.verify_error().splitlines() == [
        f"stale signature: sidekey.yaml changed since it was signed at {SIGNED_AT}",
        f"rate-limits.yaml was signed at {SIGNED_AT} but is no longer included",
    ]


def test_include_in_subdirectory_is_named_relative(qs: Setup) -> None:
    (qs.root / "policy").mkdir()
    (qs.root / "rate-limits.yaml").rename(qs.root / "policy" / "rate-limits.yaml")
    qs.main.write_text(qs.main.read_text().replace("  - rate-limits.yaml", "  - policy/rate-limits.yaml"))
    qs.sign()
    assert "policy/rate-limits.yaml" in json.loads(qs.sig.read_text())["files"]
    assert qs.verify() == qs.kid
    flip_byte(qs.root / "policy" / "rate-limits.yaml", b"# rate-limits.yam")
    assert qs.verify_error() == (
        f"stale signature: policy/rate-limits.yaml changed since it was signed at {SIGNED_AT}"
    )


def test_contents_passed_through_are_what_is_checked(qs: Setup) -> None:
    """The loader can hand over the bytes it parsed; the files on disk are then not read."""
    qs.sign()
    loaded = qs.load()
    parsed = {p: p.read_bytes() for p in loaded.files}
    flip_byte(qs.root / "rate-limits.yaml", b"# rate-limits.yam")  # changed after parsing
    assert verify_config(loaded, trusted_keys(loaded), contents=parsed) == qs.kid
    parsed[qs.main] += b"\n# sneaked in\n"
    with pytest.raises(ConfigError, match=r"^stale signature: sidekey\.yaml changed"):
        verify_config(loaded, trusted_keys(loaded), contents=parsed)


# --------------------------------------------------------------------------- garbled .sig


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not json at all", "garbled: not JSON"),
        (b"[]", "garbled: format is None"),
        (b'{"format": "something-else"}', "garbled: format is 'something-else'"),
        (json.dumps({"format": SIGNATURE_FORMAT, "kid": "k"}).encode(), "garbled: Object missing required field"),
        (b"{" + b" " * MAX_SIGNATURE_BYTES + b"}", f"larger than {MAX_SIGNATURE_BYTES} bytes"),
    ],
    ids=["not-json", "not-object", "other-format", "missing-fields", "oversized"],
)
def test_garbled_signature_file(qs: Setup, content: bytes, expected: str) -> None:
    qs.sig.write_bytes(content)
    error = qs.verify_error()
    assert error.startswith(f"{qs.sig}: "), error
    assert expected in error, error
    assert len(error.splitlines()) == 1


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.__setitem__("signature", "!!!"), "garbled: signature is not base64url"),
        (lambda d: d.__setitem__("signature", "AAAA"), "garbled: signature is 3 bytes, expected 64"),
        (lambda d: d.__setitem__("signed_at", "yesterday"), "garbled: Invalid isoformat"),
        (lambda d: d["files"].__setitem__("x.yaml", "abc"), "garbled: Expected `str` matching regex"),
        (lambda d: d.__setitem__("extra", 1), "garbled: Object contains unknown field `extra`"),
    ],
    ids=["signature-alphabet", "signature-length", "signed-at", "digest", "unknown-field"],
)
def test_garbled_signature_members(
    qs: Setup, change: Callable[[dict[str, Any]], object], expected: str
) -> None:
    qs.sign()
    edit_sig(qs, change)
    assert expected in qs.verify_error()


# --------------------------------------------------------------------------- trusted keys


def test_trusted_key_from_pem_file(qs: Setup) -> None:
    other = qs.new_key("other.pem")
    (qs.root / "keys").mkdir()
    pem = qs.public_pem(other).rename(qs.root / "keys" / "other.pub")
    with qs.main.open("a") as f:
        f.write(f"    - {{kid: other, public_key_file: keys/{pem.name}}}\n")
    qs.sign(other)  # the config lists the key: its kid is taken from there
    assert json.loads(qs.sig.read_text())["kid"] == "other"
    assert qs.verify() == "other"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("{kid: bad, public_key: AAAA}",
         "$.config_signing.trusted_keys.1.public_key: expected a raw 32-byte Ed25519 public key"),
        ("{kid: bad, public_key_file: nope.pem}",
         "$.config_signing.trusted_keys.1.public_key_file: "),
        ("{kid: bad}", "$.config_signing.trusted_keys.1: set exactly one of public_key or public_key_file"),
        ("{kid: KID, public_key: PUB}", '$.config_signing.trusted_keys.1.kid: "KID" is listed twice'),
    ],
    ids=["bad-raw", "missing-file", "neither", "duplicate-kid"],
)
def test_bad_trusted_keys(qs: Setup, entry: str, expected: str) -> None:
    with qs.main.open("a") as f:
        f.write(f"    - {entry.replace('KID', qs.kid).replace('PUB', qs.public)}\n")
    with pytest.raises(ConfigError) as info:
        trusted_keys(qs.load())
    error = str(info.value)
    assert error.startswith("sidekey.yaml: "), error
    assert len(error.splitlines()) == 1, error
    assert expected.replace("KID", qs.kid) in error
    if "nope.pem" in entry:
        assert error.endswith(f"{qs.root}/nope.pem: cannot read: No such file or directory")


def test_verify_with_explicit_keys(qs: Setup) -> None:
    qs.sign()
    loaded = qs.load()
    mine = load_ed25519_private(qs.key).public_key()
    other = load_ed25519_private(qs.new_key("other.pem")).public_key()
    assert verify_config_with_keys(loaded, [other, mine]).kid == qs.kid
    with pytest.raises(ConfigError, match="does not verify under the given key"):
        verify_config_with_keys(loaded, [other])


def test_bad_private_key(qs: Setup) -> None:
    with pytest.raises(ConfigError, match="private key not found; create one with"):
        qs.sign(qs.root / "nope.pem")
    pub = qs.public_pem(qs.key)
    pub.chmod(0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PEM Ed25519 private key"):
        qs.sign(pub)
    assert not qs.sig.exists()


# --------------------------------------------------------------------------- CLI


def sidekey(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m sidekey ARGV`` as a user would, with a clean SIDEKEY_* environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDEKEY_")}
    return subprocess.run(
        [sys.executable, "-m", "sidekey", *argv],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def error_lines(out: subprocess.CompletedProcess[str], count: int = 1) -> list[str]:
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == count, out.stderr
    assert all(line.startswith("sidekey: ") for line in lines), out.stderr
    return lines


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["config"], ["sign", "verify"]),
        (["config", "sign"], ["--config", "--key", "PRIVATE_KEY_PEM", "--kid", "require_signed_config"]),
        (["config", "verify"], ["--config", "--key", "PUBLIC_KEY_PEM", "trusted_keys"]),
    ],
    ids=["config", "sign", "verify"],
)
def test_cli_help(argv: list[str], mentions: list[str], tmp_path: Path) -> None:
    out = sidekey(*argv, "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: sidekey {' '.join(argv)}")
    for word in mentions:
        assert word in out.stdout, (word, out.stdout)


def test_cli_sign_and_verify(qs: Setup) -> None:
    out = sidekey("config", "sign", "--config", "sidekey.yaml", "--key", "signing.pem", cwd=qs.root)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"signed 5 files with key {qs.kid}: {qs.sig}\n"
    assert out.stderr == ""
    out = sidekey("config", "verify", "--config", str(qs.main), cwd=qs.root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"signature ok (kid {qs.kid}): 5 files, signed at ")
    pub = qs.public_pem(qs.key)
    out = sidekey("config", "verify", "--config", str(qs.main), "--key", str(pub), cwd=qs.root)
    assert out.returncode == 0, out.stderr

    flip_byte(qs.root / "mcp-server-registry.yaml", b"# mcp-server-registry.yam")
    (line,) = error_lines(sidekey("config", "verify", "--config", str(qs.main), cwd=qs.root))
    assert line.startswith(
        "sidekey: config error: stale signature: mcp-server-registry.yaml changed since it was signed at "
    ), line
    qs.main.write_text(qs.main.read_text().replace("  - rate-limits.yaml\n", ""))
    lines = error_lines(sidekey("config", "verify", "--config", str(qs.main), cwd=qs.root), 3)
    assert "stale signature: sidekey.yaml changed" in lines[0]
    assert "stale signature: mcp-server-registry.yaml changed" in lines[1]
    assert "rate-limits.yaml was signed at" in lines[2] and "no longer included" in lines[2]

    qs.sig.unlink()
    (line,) = error_lines(sidekey("config", "verify", "--config", str(qs.main), cwd=qs.root))
    assert line == (
        f"sidekey: config error: {qs.sig}: missing; sign with "
        f"`sidekey config sign --config {qs.main} --key <private key>`"
    )


def test_cli_untrusted_and_wrong_keys(qs: Setup) -> None:
    other = qs.new_key("other.pem")
    out = sidekey("config", "sign", "--config", str(qs.main), "--key", str(other), cwd=qs.root)
    assert out.returncode == 0, out.stderr
    kid = fingerprint(load_ed25519_private(other).public_key())
    assert out.stdout == f"signed 5 files with key {kid}: {qs.sig}\n"
    (warning,) = out.stderr.splitlines()
    assert warning.startswith(f"sidekey: warning: key {kid} is not in config_signing.trusted_keys")

    (line,) = error_lines(sidekey("config", "verify", "--config", str(qs.main), cwd=qs.root))
    assert line == f"sidekey: config error: {qs.sig}: signed with unknown kid '{kid}' (trusted: {qs.kid})"
    out = sidekey("config", "verify", "--config", str(qs.main), "--key", str(qs.public_pem(other)),
                  cwd=qs.root)
    assert out.returncode == 0, out.stderr
    (line,) = error_lines(sidekey("config", "verify", "--config", str(qs.main), "--key",
                                  str(qs.public_pem(qs.key)), cwd=qs.root))
    assert "bad signature: it does not verify under the given key" in line

    # --kid naming a trusted kid whose key is a different one is refused up front.
    (line,) = error_lines(sidekey("config", "sign", "--config", str(qs.main), "--key", str(other),
                                  "--kid", qs.kid, cwd=qs.root))
    assert line.startswith(f"sidekey: error: kid {qs.kid} is listed in config_signing.trusted_keys")


def test_cli_one_line_errors(qs: Setup) -> None:
    (line,) = error_lines(sidekey("config", "sign", "--config", str(qs.main), "--key", "nope.pem",
                                  cwd=qs.root))
    assert "nope.pem: private key not found" in line
    (line,) = error_lines(sidekey("config", "verify", "--config", str(qs.main), "--key", "nope.pub",
                                  cwd=qs.root))
    assert "nope.pub: cannot read: No such file or directory" in line
    (line,) = error_lines(sidekey("config", "verify", "--config", "missing.yaml", cwd=qs.root))
    assert "missing.yaml: cannot read" in line
    qs.main.write_text(qs.main.read_text().split("\nconfig_signing:")[0])
    (line,) = error_lines(sidekey("config", "verify", "--config", str(qs.main), cwd=qs.root))
    assert line == (
        "sidekey: error: sidekey.yaml lists no config_signing.trusted_keys; add them or pass "
        "--key PUBLIC_KEY_PEM"
    )
    out = sidekey("config", "sign", "--config", str(qs.main), cwd=qs.root)
    assert out.returncode == 2 and "--key" in out.stderr  # argparse usage error
