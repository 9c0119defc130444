"""Pure ASGI middleware that must act before a route reads the body: API keys and body size.

Both answer with the OpenAI envelope via :mod:`http_bridge.errors`.

Why not a FastAPI dependency for the key check: FastAPI parses the body before it runs
dependencies, so an unauthenticated client could make us parse (and 400 or 413) its body.

Why a Content-Length guard next to FastAPI's ``max_body_size``: FastAPI's limiter (used on the
chat route for bodies without a Content-Length, i.e. chunked uploads) answers a too-large
Content-Length with a plain-text 413 that bypasses our error envelope.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from http_bridge.errors import APIError


class ApiKeyMiddleware:
    """Every ``/v1`` request needs ``Authorization: Bearer <key>`` when keys are configured."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], prefix: str = "/v1") -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.prefix = prefix

    def _valid(self, presented: bytes) -> bool:
        # compare_digest against every key, without an early exit, so timing reveals nothing.
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(presented, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] != "http"
            or not self.keys
            or scope.get("method") == "OPTIONS"  # CORS preflights carry no credentials
            or not (path == self.prefix or path.startswith(self.prefix + "/"))
        ):
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip() and self._valid(token.strip().encode()):
            await self.app(scope, receive, send)
            return
        message = (
            "Incorrect API key provided."
            if header
            else "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
        )
        error = APIError(
            401, message, code="invalid_api_key", headers={"www-authenticate": "Bearer"}
        )
        await error.to_response()(scope, receive, send)


class ContentLengthGuard:
    """Reject a declared Content-Length over the limit before anything reads the body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = Headers(scope=scope).get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                error = too_large(self.max_bytes)
                await error.to_response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"Request body too large: the limit is {max_bytes} bytes (--max-request-bytes).",
        code="request_too_large",
    )
