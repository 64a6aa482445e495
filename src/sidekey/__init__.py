"""sidekey: credential-isolation sidecar for MCP servers."""

__version__ = "0.1.0"
