"""The app factory: routes, middleware, error handlers, static page, backend lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from http_bridge.backend import Backend
from http_bridge.errors import (
    APIError,
    http_error,
    internal_error,
    request_id_for,
    validation_error,
)
from http_bridge.limits import Limiter, LimitsMiddleware
from http_bridge.metrics import BridgeMetrics, MetricsMiddleware
from http_bridge.middleware import (
    ApiKeyMiddleware,
    ContentLengthGuard,
    SecurityHeadersMiddleware,
    UnexpectedErrorMiddleware,
    too_large,
)
from http_bridge.protocol import ChatCompletionRequest
from http_bridge.routes import chat, completions, health, metrics, models
from http_bridge.settings import Settings

log = logging.getLogger("http_bridge")

STATIC_DIR = Path(__file__).parent / "static"
# OpenAI's rate-limit headers (limits.py sets them): CORS must name each one to expose it.
RATE_LIMIT_HEADERS = tuple(
    f"x-ratelimit-{what}-{kind}"
    for what in ("limit", "remaining", "reset")
    for kind in ("requests", "tokens")
)


def create_app(settings: Settings | None = None, static_dir: Path = STATIC_DIR) -> FastAPI:
    """Build the bridge. The backend channel opens in the lifespan, so no backend is needed
    to start, and the app answers 503 until one is SERVING."""
    settings = settings or Settings()
    if settings.metrics_require_key and not settings.api_keys:  # it would protect nothing
        raise ValueError("--metrics-require-key needs at least one --api-key")
    backend = Backend(settings)  # validates --backend targets now, not at first request
    limiter = Limiter(  # and the rates
        settings.rate_limit, settings.token_rate_limit, settings.max_concurrent_per_key
    )
    bridge_metrics = BridgeMetrics(backend.available, backend.calls)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            yield
        finally:
            await backend.close()

    app = FastAPI(
        title="glmserve HTTP bridge",
        summary="OpenAI-compatible chat completions over glmserve's gRPC model servers.",
        version="0.1.0",
        lifespan=lifespan,
        # The interactive pages are opt-in; the schema (with every bound) stays published.
        docs_url="/docs" if settings.api_docs else None,
        redoc_url="/redoc" if settings.api_docs else None,
    )
    app.state.settings = settings
    app.state.backend = backend
    app.state.metrics = bridge_metrics
    app.openapi = _exact_openapi(app)  # type: ignore[method-assign]

    # FastAPI's own limit catches bodies without a Content-Length; the guard below the rest.
    app.include_router(chat.router, max_body_size=settings.max_request_bytes)
    app.include_router(completions.router, max_body_size=settings.max_request_bytes)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    if settings.ui:
        _add_ui(app, static_dir)

    _add_error_handlers(app, settings)

    # add_middleware wraps: the last added runs first. Order on the way in: security headers
    # (on every answer, errors included) → metrics → CORS (answers preflights, decorates
    # errors) → API key → limits → body size → unexpected errors (so their 500 passes back
    # through all of the above).
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(ContentLengthGuard, max_bytes=settings.max_request_bytes)
    if limiter.enabled:
        app.add_middleware(LimitsMiddleware, limiter=limiter, keyed=bool(settings.api_keys))
    keyed_paths = frozenset({"/metrics"} if settings.metrics_require_key else ())
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys, paths=keyed_paths)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            # Any header a preflight asks for (echoed back): SDKs add their own, like the
            # OpenAI JS SDK's x-stainless-* and openai-organization/-project/-beta, and a
            # list would refuse the next one they add. No credentials (cookies) are allowed,
            # so this opens nothing: the API key is a header the page itself sends.
            allow_headers=["*"],
            # What a browser client may read: the id, and when and how far to back off.
            expose_headers=[
                "x-request-id",
                "retry-after",
                "x-glmserve-ignored-params",
                *RATE_LIMIT_HEADERS,
            ],
            max_age=600,
        )
    routers = (chat, completions, models, health, metrics)
    flat_routes = [r for m in routers for r in m.router.routes]
    flat_routes += [r for r in app.router.routes if hasattr(r, "path_regex")]
    app.add_middleware(MetricsMiddleware, metrics=bridge_metrics, routes=flat_routes)
    app.add_middleware(SecurityHeadersMiddleware)
    return app


def _exact_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's OpenAPI document, with the request model's schemas exactly as pydantic writes
    them: FastAPI's own document model stores minimum/maximum as floats, so the int64 bounds of
    ``seed`` would read 9.223372036854776e+18, one past the largest seed accepted."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = default()
            exact = ChatCompletionRequest.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            components = document["components"]["schemas"]
            components.update(exact.pop("$defs"))
            components[ChatCompletionRequest.__name__] = exact
        return app.openapi_schema

    return openapi


def _add_ui(app: FastAPI, static_dir: Path) -> None:
    """``GET /`` is the chat page; ``/static/*`` its assets (absent files are 404s)."""
    index = static_dir / "index.html"

    @app.get("/", include_in_schema=False)
    async def index_page() -> Response:
        if not index.is_file():
            raise APIError(404, "The chat page is not installed.", code="not_found")
        return FileResponse(index, headers={"cache-control": "no-cache"})

    app.mount("/static", StaticFiles(directory=static_dir, check_dir=False), name="static")


def _add_error_handlers(app: FastAPI, settings: Settings) -> None:
    """Every error, whoever raises it, leaves as the OpenAI envelope."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.to_response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors(), _body_model(request)).to_response()

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            error = too_large(settings.max_request_bytes)
        elif exc.status_code == 404:
            error = http_error(404, f"Invalid URL ({request.method} {request.url.path})")
        elif exc.status_code == 405:
            error = http_error(405, f"Method {request.method} is not allowed on {request.url.path}")
        else:
            error = http_error(exc.status_code, str(exc.detail))
        response = error.to_response()
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    # Only for failures of the middleware itself: Starlette runs this handler outside all of
    # it, so its answer lacks their headers. A route's are UnexpectedErrorMiddleware's.
    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        request_id = request_id_for(request.headers)
        log.error(
            "unhandled error on %s %s (request id %s)",
            request.method,
            request.url.path,
            request_id,
            exc_info=exc,
        )
        return internal_error(request_id).to_response()


def _body_model(request: Request) -> type[BaseModel] | None:
    """The request model of the route whose body failed validation, if it has one."""
    body_field = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(body_field, "field_info", None), "annotation", None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None
