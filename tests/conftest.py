from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Daemon


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    d = Daemon().start()
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
def make_daemon() -> Iterator[object]:
    made: list[Daemon] = []

    def make(overrides: dict[str, object] | None = None, **kw: object) -> Daemon:
        d = Daemon(overrides, **kw)  # type: ignore[arg-type]
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            d.cleanup()
