from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Daemon, with_log_format
from missing_binary import report as report_missing_binaries


def pytest_terminal_summary(terminalreporter: Any) -> None:
    # Tests skipped because a program (redis-server, systemd-analyze, ...) is missing: a
    # banner at the end of the run, so a fresh machine's run does not pass quietly.
    report_missing_binaries(terminalreporter)


@pytest.fixture
def log_format(request: pytest.FixtureRequest) -> str:
    """The daemons' ``log.format`` (parametrize indirectly, e.g. BOTH_LOG_FORMATS)."""
    return str(getattr(request, "param", "text"))


@pytest.fixture
def daemon(log_format: str) -> Iterator[Daemon]:
    d = Daemon(with_log_format(None, log_format)).start()
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def staged() -> Iterator[Daemon]:
    """A daemon's files (config, keys, secrets, state dir), not started: for tests that
    run the app in process (``test_daemon_app.app_on``)."""
    d = Daemon()
    (d.root / "state").mkdir(exist_ok=True)
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture
def make_daemon(log_format: str) -> Iterator[object]:
    made: list[Daemon] = []

    def make(overrides: dict[str, object] | None = None, **kw: object) -> Daemon:
        d = Daemon(with_log_format(overrides, log_format), **kw)  # type: ignore[arg-type]
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.cleanup()


@pytest.fixture
async def vault_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Makes VaultBackends on the module's ``vault`` fixture (a tests/vault_server.py
    stand-in): ``vault_backend(journal=None, **config fields)``; token auth with a fresh
    unrestricted token unless a token or another auth is given. Closed at the end."""
    import msgspec
    import trio

    from sidekey.backends.vault import VaultBackend
    from sidekey.config import VaultBackendConfig

    vault = request.getfixturevalue("vault")
    made: list[VaultBackend] = []

    def make(*, journal: Any = None, **fields: Any) -> VaultBackend:
        fields.setdefault("addr", vault.addr)
        fields.setdefault("timeout_s", 1.0)
        if (fields.get("auth", "token") == "token" and "token_file" not in fields
                and "token_credential" not in fields):
            token_file = tmp_path / f"vault-token-{len(made)}"
            token_file.write_text(vault.create_token(ttl=3600) + "\n")
            token_file.chmod(0o600)
            fields["token_file"] = token_file.name
        backend = VaultBackend("vault", msgspec.convert(fields, VaultBackendConfig),
                               base_dir=tmp_path, journal=journal)
        made.append(backend)
        return backend

    yield make
    with trio.fail_after(20):
        for backend in made:
            await backend.aclose()
