"""executor-tornado: a self-hosted MCP Streamable HTTP service on Tornado."""

__version__ = "0.1.0"
