"""OAuth discovery routes: RFC 9728 resource metadata, RFC 8414 proxy, JWKS."""

from __future__ import annotations

from urllib.parse import urlsplit

from handlers.base import BaseHandler

OAUTH_MCP_PATHS = ("/v1/mcp", "/mcp")
ANONYMOUS_MCP_PATHS = ("/v1/mcp/anonymous", "/mcp/anonymous")
RESOURCE_METADATA_PATH = "/.well-known/oauth-protected-resource"


def oauth_unavailable(service) -> tuple[int, str] | None:
    """Return (status, message) when OAuth is not configured: 404 self-hosted, 503 required."""
    if service.settings.issuer_url:
        return None
    if service.settings.oauth_required:
        return 503, "MCP OAuth must be configured for cloud deployments"
    return 404, "MCP OAuth is not configured"


class ProtectedResourceHandler(BaseHandler):
    """``GET /.well-known/oauth-protected-resource[/v1/mcp|/mcp]`` (RFC 9728)."""

    async def get(self, inserted_path: str | None = None) -> None:
        if not await self.check_rate(RESOURCE_METADATA_PATH, self.service.settings.mcp_rate_per_minute):
            return
        unavailable = oauth_unavailable(self.service)
        if unavailable is not None:
            self.send_error_json(*unavailable)
            return

        path = inserted_path or ""
        if path in ANONYMOUS_MCP_PATHS:
            self.send_error_json(404, "Anonymous MCP does not use OAuth discovery")
            return
        if path not in ("", *OAUTH_MCP_PATHS):
            self.send_error_json(404, f"No protected resource at {path[:200]}")
            return

        base = self.service.settings.base_url
        resource_path = path or "/v1/mcp"
        query = self._query_without_hint()
        hint = self.get_query_argument("resource", None)
        if hint is not None:
            resolved = self._resolve_hint(hint, base)
            if resolved is None:
                return
            resource_path, query = resolved

        resource = f"{base}{resource_path}" + (f"?{query}" if query else "")
        self.set_header("Cache-Control", "max-age=300")
        self.send_json(
            200,
            {
                "resource": resource,
                "authorization_servers": [self.service.settings.issuer_url],
                "bearer_methods_supported": ["header"],
                "resource_name": "executor-tornado MCP",
            },
        )

    def _query_without_hint(self) -> str:
        query = self.request.query
        if "resource=" not in query:
            return query
        kept = [part for part in query.split("&") if not part.startswith("resource=")]
        return "&".join(kept)

    def _resolve_hint(self, hint: str, base: str) -> tuple[str, str] | None:
        try:
            parts = urlsplit(hint)
            hint_origin = f"{parts.scheme}://{parts.netloc}".lower()
        except ValueError:
            self.send_error_json(400, "Invalid resource parameter: it must be an absolute URL")
            return None
        if not parts.scheme or not parts.netloc:
            self.send_error_json(400, "Invalid resource parameter: it must be an absolute URL")
            return None
        if hint_origin != base.lower():
            self.send_error_json(400, f"Invalid resource parameter: it must be on {base}")
            return None
        path = parts.path.rstrip("/") or "/"
        if path in ANONYMOUS_MCP_PATHS:
            self.send_error_json(404, "Anonymous MCP does not use OAuth discovery")
            return None
        if path not in OAUTH_MCP_PATHS:
            self.send_error_json(400, "Invalid resource parameter: it must name /v1/mcp or /mcp")
            return None
        return "/v1/mcp", parts.query


class AuthorizationServerMetadataHandler(BaseHandler):
    """``GET /.well-known/oauth-authorization-server``: a cached proxy of the issuer's RFC 8414 metadata."""

    async def get(self) -> None:
        if not await self.check_rate("/.well-known/oauth-authorization-server", self.service.settings.mcp_rate_per_minute):
            return
        unavailable = oauth_unavailable(self.service)
        if unavailable is not None:
            self.send_error_json(*unavailable)
            return
        upstream = await self.service.metadata_proxy.fetch()
        if upstream is None:
            self.send_error_json(502, "The authorization server could not be reached; try again later")
            return
        self.set_status(upstream.status)
        self.set_header("Content-Type", upstream.content_type)
        self.finish(upstream.body)


class JwksHandler(BaseHandler):
    """``GET /.well-known/jwks.json``: public keys of anonymous tokens."""

    async def get(self) -> None:
        if not await self.check_rate("/.well-known/jwks.json", self.service.settings.mcp_rate_per_minute):
            return
        signer = self.service.keys.signer
        if signer is None:
            self.send_error_json(503, "Anonymous auth key pair is not configured")
            return
        self.set_header("Cache-Control", "public, max-age=300")
        self.send_json(200, signer.jwks())


default_handlers = [
    (r"/\.well-known/oauth-protected-resource(/.*)?", ProtectedResourceHandler),
    (r"/\.well-known/oauth-authorization-server", AuthorizationServerMetadataHandler),
    (r"/\.well-known/jwks\.json", JwksHandler),
]
