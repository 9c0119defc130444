"""Pure ASGI middleware: API keys and body size (before a route reads the body), the
security headers every response carries, and the 500 of an unexpected exception.

The API-key, body-size and unexpected-error layers answer with the OpenAI envelope via
:mod:`http_bridge.errors`.

Why not a FastAPI dependency for the key check: FastAPI parses the body before it runs
dependencies, so an unauthenticated client could make us parse (and 400 or 413) its body.

Why a Content-Length guard next to FastAPI's ``max_body_size``: FastAPI's limiter (used on the
chat route for bodies without a Content-Length, i.e. chunked uploads) answers a too-large
Content-Length with a plain-text 413 that bypasses our error envelope.
"""

from __future__ import annotations

import hmac
import logging

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from http_bridge.errors import APIError, internal_error, request_id_for

log = logging.getLogger("http_bridge")


class ApiKeyMiddleware:
    """Every ``/v1`` request (and any of ``paths``, e.g. ``/metrics``) needs
    ``Authorization: Bearer <key>`` when keys are configured."""

    def __init__(
        self,
        app: ASGIApp,
        keys: tuple[str, ...],
        prefix: str = "/v1",
        paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.prefix = prefix
        self.paths = paths

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
            or not (path == self.prefix or path.startswith(self.prefix + "/") or path in self.paths)
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


# What the chat page (http_bridge/static/) needs and no more: its own module scripts,
# stylesheet and favicon, fetches to this origin only; no inline code, eval or data: URLs.
# The page's <meta> policy says the same (minus data: images, which it never uses); a header
# adds what a <meta> cannot: frame-ancestors, so no other site can frame the page.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "font-src 'self'; connect-src 'self'; object-src 'none'; frame-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class SecurityHeadersMiddleware:
    """Adds Content-Security-Policy, nosniff and Referrer-Policy to every HTTP response.

    On every response, not only the page's: a JSON error opened in a browser tab is then
    just as inert, and nosniff stops a browser from guessing a script out of any body.
    Headers a route already set are kept.
    """

    def __init__(
        self, app: ASGIApp, csp: str = PAGE_CSP, referrer_policy: str = "no-referrer"
    ) -> None:
        self.app = app
        self.headers = {
            "content-security-policy": csp,
            "x-content-type-options": "nosniff",
            "referrer-policy": referrer_policy,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(raw=list(message.get("headers", [])))
                for name, value in self.headers.items():
                    headers.setdefault(name, value)
                message["headers"] = headers.raw
            await send(message)

        await self.app(scope, receive, send_with_headers)


class UnexpectedErrorMiddleware:
    """An exception no handler took (a bug) → the 500 envelope, answered from inside the other
    middleware so that it carries CORS, security and ``x-request-id`` headers like any answer.

    Starlette runs ``exception_handler(Exception)`` in its outermost layer, past all user
    middleware; this one sits innermost instead. Once a response has started nothing can replace
    it: the exception goes on (uvicorn closes the connection).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:
                raise
            request_id = request_id_for(Headers(scope=scope))
            log.error(
                "unhandled error on %s %s (request id %s)",
                scope.get("method", ""),
                scope.get("path", ""),
                request_id,
                exc_info=exc,
            )
            await internal_error(request_id).to_response()(scope, receive, send)
