"""sidekey for MCP servers written with the official MCP Python SDK (``sidekey[mcp]``).

``@mcp.tool()`` + ``@governed("server")`` govern a tool; ``current_lease()`` inside it
gives the call's secrets. See :mod:`sidekey.mcp.governed`.
"""

from .governed import APPROVAL_ARG, Governor, configure, current_lease, governed

__all__ = ["APPROVAL_ARG", "Governor", "configure", "current_lease", "governed"]
