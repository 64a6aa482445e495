"""The ``sidekey`` command's entry point: the CLI, or a clear message when the daemon's
dependencies are not installed.

``pip install sidekey`` installs only the client an MCP server imports
(:mod:`sidekey.client`); the daemon and the CLI need ``pip install 'sidekey[daemon]'``.
Without them, ``import sidekey.cli`` would fail deep inside with a traceback naming
whichever module came first.
"""

from __future__ import annotations

import sys

# The top-level modules of the `daemon` extra's distributions (pyproject.toml).
DAEMON_MODULES = frozenset({"trio", "httptools", "yaml", "jwt", "cryptography", "psutil",
                            "httpx", "hvac", "boto3", "botocore", "redis", "prometheus_client"})


def daemon_dependency_missing(exc: ImportError) -> str | None:
    """The message for an ImportError of one of the daemon's dependencies, else None."""
    missing = (exc.name or "").partition(".")[0]
    if missing not in DAEMON_MODULES:
        return None
    return (f"sidekey: this needs the daemon's dependencies (no module {missing!r} here): "
            f"pip install 'sidekey[daemon]' (pip install sidekey alone is the client "
            f"library, sidekey.client)")


def main() -> int:
    if sys.argv[1:] == ["--version"]:
        # Answers without the daemon's dependencies too (a client-only install).
        from .buildinfo import version_line

        print(version_line())
        return 0
    try:
        from .cli import main as cli_main
    except ImportError as exc:
        message = daemon_dependency_missing(exc)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2
    return cli_main()
