"""GET /health: 200 when the bridge is up and some backend answers SERVING, else 503.

The body says only that by default: backend addresses are for operators (``--health-details``),
not for whoever can reach a load balancer's probe URL.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from http_bridge.backend import Backend

router = APIRouter(tags=["ops"])


class HealthStatus(BaseModel):
    """``status`` is ``ok`` or ``unavailable``; ``backends`` only with ``--health-details``."""

    status: str
    backends: list[str] | None = None


@router.get(
    "/health",
    response_model=HealthStatus,
    response_model_exclude_none=True,
    responses={503: {"model": HealthStatus, "description": "No backend is SERVING"}},
)
async def health(request: Request) -> JSONResponse:
    """A grpc.health.v1 Check through the load-balanced channel (only healthy backends)."""
    backend: Backend = request.app.state.backend
    ok = await backend.check_health()
    body = HealthStatus(status="ok" if ok else "unavailable")
    if backend.settings.health_details:
        body.backends = list(backend.settings.backends)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ok else 503)
