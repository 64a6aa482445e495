from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import pytest

from sidekey.backends import BackendError, SecretNotFound, SecretValue, build_backends
from sidekey.backends import local as local_mod
from sidekey.backends.local import (
    MAX_VALUE_BYTES,
    MAX_VERSIONS_KEPT,
    LocalBackend,
    LocalStore,
    generate_key_file,
    load_key,
    read_secret_input,
)
from sidekey.config import load_config
from sidekey.protocol import BadRequest, ConfigError, Conflict, TooLarge

VALUE = "s3cr3t-Value-xyzzy"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "local.key"
    generate_key_file(path)
    return path


@pytest.fixture
def store(tmp_path: Path, key_file: Path) -> LocalStore:
    return LocalStore(tmp_path / "state" / "secrets.enc", load_key(key_file, None))


def _reseal(path: Path, store: LocalStore, doc: dict[str, object]) -> None:
    """Write ``doc`` back with a valid file MAC, to reach the per-value AEAD checks."""
    entries = local_mod.msgspec.convert(doc["secrets"], dict[str, local_mod._Entry])
    doc["mac"] = local_mod._file_mac(store._mac_key, entries)
    path.write_text(json.dumps(doc))


# --------------------------------------------------------------------------- round trip


def test_put_get_rotate_round_trip(store: LocalStore) -> None:
    assert store.put("github/token", VALUE) == "1"
    got = store.get("github/token")
    assert got == SecretValue(value=VALUE, version="1")
    assert store.rotate("github/token", "second") == "2"
    assert store.rotate("github/token", "third ünïcode") == "3"
    assert store.get("github/token") == SecretValue(value="third ünïcode", version="3")
    assert store.get_version("github/token", "1").value == VALUE
    assert store.get_version("github/token", 2).value == "second"
    assert store.names() == ["github/token"]
    assert store.versions("github/token") == ["1", "2", "3"]


def test_put_refuses_existing_and_rotate_refuses_missing(store: LocalStore) -> None:
    store.put("a", VALUE)
    with pytest.raises(Conflict) as exc:
        store.put("a", "other")
    assert exc.value.code == "secret_exists"
    with pytest.raises(SecretNotFound):
        store.rotate("missing", "x")
    with pytest.raises(SecretNotFound) as nf:
        store.get("missing")
    assert nf.value.code == "secret_not_found" and nf.value.status == 503
    with pytest.raises(SecretNotFound) as nv:
        store.get_version("a", "7")
    assert nv.value.code == "secret_version_not_found"


def test_limits_and_names(store: LocalStore) -> None:
    with pytest.raises(BadRequest):
        store.put("bad\0name", "x")
    with pytest.raises(BadRequest):
        store.put("ok", "")
    with pytest.raises(TooLarge):
        store.put("ok", "x" * (MAX_VALUE_BYTES + 1))
    store.put("ok", "x" * MAX_VALUE_BYTES)
    assert len(store.get("ok").value) == MAX_VALUE_BYTES


def test_old_versions_are_pruned(store: LocalStore) -> None:
    store.put("a", "v1")
    for i in range(2, MAX_VERSIONS_KEPT + 4):
        store.rotate("a", f"v{i}")
    kept = store.versions("a")
    assert len(kept) == MAX_VERSIONS_KEPT
    assert kept[-1] == str(MAX_VERSIONS_KEPT + 3)
    with pytest.raises(SecretNotFound):
        store.get_version("a", "1")


def test_repr_hides_value() -> None:
    v = SecretValue(value=VALUE, version="4")
    assert VALUE not in repr(v) and VALUE not in str(v) and VALUE not in f"{v!r}"
    assert "4" in repr(v)


def test_file_on_disk_has_no_plaintext_and_is_private(store: LocalStore) -> None:
    store.put("a", VALUE)
    raw = store.path.read_bytes()
    assert VALUE.encode() not in raw
    assert base64.b64encode(VALUE.encode()) not in raw
    assert json.loads(raw)["format"] == "sidekey-local-v1"
    assert store.path.stat().st_mode & 0o777 == 0o600


def test_atomic_write_leaves_no_tmp_files(store: LocalStore) -> None:
    store.put("a", VALUE)
    store.rotate("a", "b")
    store.put("c", "d")
    files = sorted(p.name for p in store.path.parent.iterdir())
    assert files == ["secrets.enc", "secrets.enc.lock"]


def test_failed_write_keeps_old_file_and_no_tmp(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put("a", VALUE)
    before = store.path.read_bytes()

    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local_mod.os, "fsync", broken)
    with pytest.raises(BackendError, match="No space left"):
        store.rotate("a", "new")
    monkeypatch.undo()
    assert store.path.read_bytes() == before
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["secrets.enc", "secrets.enc.lock"]


def test_reload_sees_write_from_other_instance(tmp_path: Path, key_file: Path) -> None:
    key = load_key(key_file, None)
    path = tmp_path / "secrets.enc"
    daemon_view = LocalStore(path, key)
    cli_view = LocalStore(path, key)
    assert daemon_view.names() == []
    cli_view.put("a", "one")
    assert daemon_view.get("a").value == "one"
    cli_view.rotate("a", "two")
    assert daemon_view.get("a") == SecretValue(value="two", version="2")
    # A second writer re-reads under the lock: nothing the first wrote is lost.
    daemon_view.put("b", "bee")
    cli_view.rotate("a", "three")
    assert daemon_view.get("b").value == "bee"
    assert daemon_view.get("a").value == "three"


# --------------------------------------------------------------------------- tampering


def test_flipped_ciphertext_byte_is_detected(store: LocalStore) -> None:
    store.put("a", VALUE)
    doc = json.loads(store.path.read_text())
    ct = bytearray(base64.b64decode(doc["secrets"]["a"]["versions"]["1"]["ciphertext"]))
    ct[0] ^= 0x01
    doc["secrets"]["a"]["versions"]["1"]["ciphertext"] = base64.b64encode(bytes(ct)).decode()
    store.path.write_text(json.dumps(doc))
    fresh = LocalStore(store.path, load_key_of(store))
    with pytest.raises(BackendError, match="integrity check failed"):
        fresh.get("a")
    # Even with a valid file MAC the AEAD tag catches it.
    _reseal(store.path, store, doc)
    with pytest.raises(BackendError, match="cannot decrypt secret 'a' version 1") as exc:
        fresh.get("a")
    assert VALUE not in str(exc.value)


def test_swapped_ciphertexts_between_names_are_detected(store: LocalStore) -> None:
    store.put("a", "value-a")
    store.put("b", "value-b")
    doc = json.loads(store.path.read_text())
    va, vb = doc["secrets"]["a"]["versions"]["1"], doc["secrets"]["b"]["versions"]["1"]
    doc["secrets"]["a"]["versions"]["1"], doc["secrets"]["b"]["versions"]["1"] = vb, va
    store.path.write_text(json.dumps(doc))
    fresh = LocalStore(store.path, load_key_of(store))
    with pytest.raises(BackendError, match="integrity"):
        fresh.get("a")
    _reseal(store.path, store, doc)
    with pytest.raises(BackendError, match="cannot decrypt"):
        fresh.get("a")
    with pytest.raises(BackendError, match="cannot decrypt"):
        fresh.get("b")


def test_swapped_versions_and_rolled_back_pointer_are_detected(store: LocalStore) -> None:
    store.put("a", "old")
    store.rotate("a", "new")
    doc = json.loads(store.path.read_text())
    doc["secrets"]["a"]["current"] = 1
    store.path.write_text(json.dumps(doc))
    with pytest.raises(BackendError, match="integrity"):
        LocalStore(store.path, load_key_of(store)).get("a")
    doc["secrets"]["a"]["current"] = 2
    versions = doc["secrets"]["a"]["versions"]
    versions["1"], versions["2"] = versions["2"], versions["1"]
    _reseal(store.path, store, doc)
    with pytest.raises(BackendError, match="cannot decrypt secret 'a' version 2"):
        LocalStore(store.path, load_key_of(store)).get("a")


def test_wrong_key_is_a_clear_error_and_refuses_writes(store: LocalStore, tmp_path: Path) -> None:
    store.put("a", VALUE)
    other = tmp_path / "other.key"
    generate_key_file(other)
    wrong = LocalStore(store.path, load_key(other, None))
    with pytest.raises(BackendError, match=r"cannot decrypt .*wrong key\?"):
        wrong.get("a")
    with pytest.raises(BackendError, match="wrong key"):
        wrong.put("b", "x")
    assert store.get("a").value == VALUE


@pytest.mark.parametrize(
    "content", [b"", b"{", b'{"format": "other", "key_id": "", "mac": "", "secrets": {}}', b"[]"]
)
def test_corrupt_file_is_a_clear_error(store: LocalStore, content: bytes) -> None:
    store.path.parent.mkdir(parents=True, exist_ok=True)
    store.path.write_bytes(content)
    with pytest.raises(BackendError, match="corrupt local store"):
        store.get("a")
    # The error persists until the file changes.
    with pytest.raises(BackendError, match="corrupt local store"):
        store.names()


def load_key_of(store: LocalStore) -> bytes:
    return load_key(store.path.parent.parent / "keys" / "local.key", None)


# --------------------------------------------------------------------------- keys


def test_key_file_permissions(tmp_path: Path, key_file: Path) -> None:
    assert len(load_key(key_file, None)) == 32
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.parent.stat().st_mode & 0o777 == 0o700
    for mode in (0o644, 0o640, 0o604):
        os.chmod(key_file, mode)
        with pytest.raises(ConfigError, match=rf"{key_file}: key file mode is {mode:04o}"):
            load_key(key_file, None)


def test_generate_refuses_overwrite(key_file: Path) -> None:
    before = key_file.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        generate_key_file(key_file)
    assert key_file.read_bytes() == before


def test_bad_key_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open"):
        load_key(tmp_path / "missing", None)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_key(tmp_path, None)
    short = tmp_path / "short"
    short.write_text(base64.b64encode(b"x" * 16).decode())
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="must be 32 bytes"):
        load_key(short, None)
    garbage = tmp_path / "garbage"
    garbage.write_text("not base64 !!")
    garbage.chmod(0o600)
    with pytest.raises(ConfigError, match="base64"):
        load_key(garbage, None)
    with pytest.raises(ConfigError):
        load_key(None, None)


def test_key_from_systemd_credential(
    tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY is not set"):
        load_key(None, "sidekey-local")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "sidekey-local").write_bytes(key_file.read_bytes())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_key(None, "sidekey-local") == load_key(key_file, None)
    with pytest.raises(ConfigError, match="not a valid credential name"):
        load_key(None, "../etc/passwd")
    with pytest.raises(ConfigError, match="cannot open"):
        load_key(None, "absent")


# --------------------------------------------------------------------------- CLI input


def test_read_secret_input_from_stdin() -> None:
    assert read_secret_input(None, io.BytesIO(b"abc\n")) == "abc"
    assert read_secret_input("-", io.StringIO("abc\r\n")) == "abc"
    assert read_secret_input(None, io.BytesIO(b"abc\n\n")) == "abc\n"  # exactly one
    assert read_secret_input(None, io.BytesIO(b"no newline")) == "no newline"
    with pytest.raises(BadRequest, match="empty"):
        read_secret_input(None, io.BytesIO(b"\n"))
    with pytest.raises(BadRequest, match="UTF-8"):
        read_secret_input(None, io.BytesIO(b"\xff\xfe"))
    with pytest.raises(TooLarge):
        read_secret_input(None, io.BytesIO(b"x" * (MAX_VALUE_BYTES + 1) + b"\n"))
    assert len(read_secret_input(None, io.BytesIO(b"x" * MAX_VALUE_BYTES + b"\n"))) == MAX_VALUE_BYTES


def test_read_secret_input_from_file(tmp_path: Path) -> None:
    f = tmp_path / "value"
    f.write_bytes(VALUE.encode() + b"\n")
    assert read_secret_input(str(f), io.BytesIO(b"ignored")) == VALUE
    with pytest.raises(BadRequest, match="cannot read") as exc:
        read_secret_input(str(tmp_path / "nope"), io.BytesIO(b""))
    assert exc.value.code == "secret_input_unreadable"


# --------------------------------------------------------------------------- backend


async def test_local_backend_fetch_and_reload(tmp_path: Path, key_file: Path) -> None:
    key = load_key(key_file, None)
    path = tmp_path / "secrets.enc"
    cli = LocalStore(path, key)
    cli.put("api", VALUE)
    now = [100.0]
    backend = LocalBackend("local", path, key, clock=lambda: now[0])
    assert await backend.fetch("api") == SecretValue(value=VALUE, version="1")
    cli.rotate("api", "rotated")
    # Within the recheck interval the cached snapshot is served without a stat.
    assert (await backend.fetch("api")).version == "1"
    now[0] += 1.0
    assert await backend.fetch("api") == SecretValue(value="rotated", version="2")
    with pytest.raises(SecretNotFound):
        await backend.fetch("nope")
    health = await backend.health()
    assert health == {"type": "local", "path": str(path), "secrets": 1, "ok": True}
    assert await backend.rotate("api", "third") == "3"
    assert (await backend.fetch("api")).value == "third"
    await backend.aclose()


async def test_local_backend_unhealthy_on_corrupt_store(tmp_path: Path, key_file: Path) -> None:
    path = tmp_path / "secrets.enc"
    path.write_text("{broken")
    backend = LocalBackend("local", path, load_key(key_file, None))
    health = await backend.health()
    assert health["ok"] is False and "corrupt" in str(health["error"])
    with pytest.raises(BackendError) as exc:
        await backend.fetch("api")
    assert exc.value.code == "backend_unavailable" and exc.value.status == 503


def _write_config(tmp_path: Path, key_file: Path) -> Path:
    cfg = tmp_path / "sidekey.yaml"
    cfg.write_text(
        "backends:\n"
        "  local:\n"
        "    type: local\n"
        "    path: state/secrets.enc\n"
        f"    key_file: {key_file}\n"
    )
    return cfg


async def test_build_backends(tmp_path: Path, key_file: Path) -> None:
    loaded = load_config(_write_config(tmp_path, key_file))
    LocalStore(tmp_path / "state" / "secrets.enc", load_key(key_file, None)).put("x", VALUE)
    backends = build_backends(loaded)
    assert list(backends) == ["local"]
    assert (await backends["local"].fetch("x")).value == VALUE
    os.chmod(key_file, 0o640)
    with pytest.raises(ConfigError, match=r"backends\.local: .*mode is 0640"):
        build_backends(loaded)


def test_build_backends_refuses_wrong_key(tmp_path: Path, key_file: Path) -> None:
    other = tmp_path / "other.key"
    generate_key_file(other)
    LocalStore(tmp_path / "state" / "secrets.enc", load_key(other, None)).put("x", VALUE)
    loaded = load_config(_write_config(tmp_path, key_file))
    with pytest.raises(ConfigError, match="wrong key"):
        build_backends(loaded)
