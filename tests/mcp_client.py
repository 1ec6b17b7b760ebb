"""The official ``mcp`` Python SDK client, pointed at a service under test."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


@contextlib.asynccontextmanager
async def sdk_client(url: str, headers: dict[str, str], *, mode: str = "legacy", **options: Any) -> AsyncIterator[Client]:
    """Connect the SDK client over Streamable HTTP; ``mode`` is ``legacy``, ``auto`` or ``2026-07-28``."""
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=60.0))
    async with http:
        async with Client(streamable_http_client(url, http_client=http), mode=mode, **options) as client:
            yield client
