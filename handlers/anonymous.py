"""Anonymous identity routes: token issuance and session bootstrap."""

from __future__ import annotations

import json

import jwt

from executor_tornado.identity import AuthFailure, bootstrap_anonymous_session, issue_anonymous_identity
from executor_tornado.ratelimit import retry_after_header
from handlers.base import BoundedBodyHandler

TOKEN_PATH = "/auth/anonymous/token"
SESSION_PATH = "/auth/anonymous/session"
MAX_SESSION_ID_CHARS = 200


class AnonymousTokenHandler(BoundedBodyHandler):
    """``POST /auth/anonymous/token`` (``GET`` too, for old clients)."""

    async def post(self) -> None:
        if not await self.check_rate(TOKEN_PATH, self.service.settings.token_rate_per_minute):
            return
        signer = self.service.keys.signer
        if signer is None:
            self.send_error_json(503, "Anonymous auth is not configured: set ANONYMOUS_AUTH_PRIVATE_KEY_PEM")
            return
        body = await issue_anonymous_identity(self.service.store, signer, self.service.clock)
        self.send_json(200, body, {"Cache-Control": "no-store"})

    get = post


class AnonymousSessionHandler(BoundedBodyHandler):
    """``POST /auth/anonymous/session``: anonymous token in, API key and MCP URL out."""

    async def post(self) -> None:
        service = self.service
        if not await self.check_rate(SESSION_PATH, service.settings.mcp_rate_per_minute):
            return
        signer, api_keys = service.keys.signer, service.keys.api_keys
        if signer is None or api_keys is None:
            self.send_error_json(503, "Anonymous sessions are not configured: set the anonymous key pair and MCP_API_KEY_SECRET")
            return

        session_id = self._requested_session_id()
        if session_id is False:
            return
        token = self.bearer_token()
        if token is None:
            self.send_error_json(401, "Missing anonymous token: send Authorization: Bearer <accessToken>")
            return
        try:
            claims = signer.verify_anonymous(token)
        except jwt.PyJWTError:
            self.send_error_json(401, "Invalid or expired anonymous token; request a new one from /auth/anonymous/token")
            return

        kind, identifier = ("session", session_id) if session_id else ("account", claims["sub"])
        decision = await service.limiter.check_bootstrap(kind, identifier)
        if not decision.allowed:
            service.metrics.rate_limited(SESSION_PATH)
            self.send_error_json(429, "Rate limit exceeded", {"Retry-After": retry_after_header(decision)})
            return

        try:
            result = await bootstrap_anonymous_session(
                service.store, api_keys, service.clock, claims["sub"],
                session_id=session_id, base_url=service.settings.base_url,
            )
        except AuthFailure as failure:
            self.send_error_json(failure.status, failure.message)
            return
        self.send_json(200, result.to_json(), {"Cache-Control": "no-store"})

    def _requested_session_id(self) -> str | None | bool:
        """Return the optional ``sessionId`` of the JSON body; send 400 and return ``False`` on a bad body."""
        if not self.body.strip():
            return None
        try:
            body = json.loads(self.body)
        except ValueError:
            self.send_error_json(400, "Invalid JSON body: send {} or {\"sessionId\": \"...\"}")
            return False
        if not isinstance(body, dict):
            self.send_error_json(400, "Invalid JSON body: expected an object")
            return False
        session_id = body.get("sessionId")
        if session_id is None:
            return None
        if not isinstance(session_id, str) or not session_id or len(session_id) > MAX_SESSION_ID_CHARS:
            self.send_error_json(400, f"Invalid sessionId: expected a string of 1 to {MAX_SESSION_ID_CHARS} characters")
            return False
        return session_id


default_handlers = [
    (TOKEN_PATH, AnonymousTokenHandler),
    (SESSION_PATH, AnonymousSessionHandler),
]
