"""GET /health: 200 when the bridge is up and some backend answers SERVING, else 503."""

from __future__ import annotations

from fastapi import APIRouter, Request

from http_bridge.backend import Backend
from http_bridge.errors import APIError
from http_bridge.protocol import ErrorResponse

router = APIRouter(tags=["ops"])


@router.get(
    "/health",
    responses={503: {"model": ErrorResponse, "description": "No backend is SERVING"}},
)
async def health(request: Request) -> dict[str, str]:
    """A grpc.health.v1 Check through the load-balanced channel (only healthy backends)."""
    backend: Backend = request.app.state.backend
    if await backend.check_health():
        return {"status": "ok"}
    raise APIError(
        503,
        f"No model server is SERVING (backends: {', '.join(backend.settings.backends)}).",
        type="server_error",
        code="backend_unavailable",
    )
