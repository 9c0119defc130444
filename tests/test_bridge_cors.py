"""CORS lets a browser read what it needs to back off: ``Retry-After`` and ``x-ratelimit-*``.

The real app in process (Starlette's TestClient), no model server behind it: the limiter
answers before any backend is involved.
"""

from __future__ import annotations

from fastapi.testclient import TestClient
from procs import free_port as closed_port

from http_bridge.app import create_app
from http_bridge.settings import Settings

ORIGIN = {"Origin": "http://ui.test"}


def test_cors_exposes_retry_after_and_rate_limit_headers() -> None:
    settings = Settings(
        backends=(f"127.0.0.1:{closed_port()}",),
        cors_origins=("http://ui.test",),
        rate_limit="1/minute",
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(create_app(settings)) as client:
        client.post("/v1/chat/completions", json=body, headers=ORIGIN)  # 503: no backend
        r = client.post("/v1/chat/completions", json=body, headers=ORIGIN)
    assert r.status_code == 429
    assert r.headers["access-control-allow-origin"] == "http://ui.test"
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    sent = {h for h in r.headers if h == "retry-after" or h.startswith("x-ratelimit-")}
    assert {"retry-after", "x-ratelimit-remaining-requests"} <= sent
    assert sent <= exposed, sent - exposed
    assert {f"x-ratelimit-{w}-tokens" for w in ("limit", "remaining", "reset")} <= exposed
