"""sidekey for MCP servers written with the official MCP Python SDK (``pip install
'sidekey[mcp]'``).

``@mcp.tool()`` + ``@governed("server")`` govern a tool; ``current_lease()`` inside it
gives the call's secrets (:mod:`sidekey.mcp._governed`); ``end_session()`` ends a
session at the daemon where the SDK offers no hook for it. ``TokenVerifier`` verifies the
SDK's bearer tokens through the daemon (:mod:`sidekey.mcp.auth`).

Importing this package needs no SDK: each name imports its part (and with it the SDK)
when first used, and without the SDK that raises an ImportError naming the extra.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["APPROVAL_ARG", "Governor", "TokenVerifier", "configure", "current_lease",
           "end_session", "governed"]

_WHERE = {
    "APPROVAL_ARG": "._governed",
    "Governor": "._governed",
    "configure": "._governed",
    "current_lease": "._governed",
    "end_session": "._governed",
    "governed": "._governed",
    "TokenVerifier": ".auth",
}


def __getattr__(name: str) -> Any:
    # Lazy: the SDK is an optional dependency, imported only by what needs it.
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'sidekey.mcp' has no attribute {name!r}")
    try:
        module = importlib.import_module(where, __name__)
    except ImportError as exc:
        if exc.name is not None and exc.name.partition(".")[0] in ("mcp", "pydantic",
                                                                   "pydantic_core"):
            raise ImportError(
                f"sidekey.mcp.{name} needs the MCP Python SDK (mcp >= 1.10): "
                f"pip install 'sidekey[mcp]'", name=exc.name) from exc
        raise
    value = getattr(module, name)
    globals()[name] = value
    return value
