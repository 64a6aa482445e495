"""sidekey for servers written with the MCP Python SDK (``pip install 'sidekey[mcp]'``).

Importing this package needs no SDK; its parts import it when used:
``sidekey.mcp.TokenVerifier`` (:mod:`sidekey.mcp.auth`).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy: the SDK is an optional dependency, imported only by what needs it.
    if name == "TokenVerifier":
        from .auth import TokenVerifier

        return TokenVerifier
    raise AttributeError(f"module 'sidekey.mcp' has no attribute {name!r}")
