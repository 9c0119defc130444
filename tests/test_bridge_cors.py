"""CORS lets a browser call the API the way SDKs do, and read what it needs to back off
(``Retry-After`` and ``x-ratelimit-*``).

The real app in process (Starlette's TestClient), no model server behind it: the limiter
answers before any backend is involved. The SDK preflight runs against a real ``http-bridge``
process, with the headers the official openai SDK really sends.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from procs import free_port as closed_port
from procs import start_bridge

from http_bridge.app import create_app
from http_bridge.settings import Settings

ORIGIN = {"Origin": "http://ui.test"}
# What the OpenAI JS SDK sends from a browser, so what its preflight names: its own
# x-stainless-* telemetry, and the organization, project and beta headers when set.
JS_SDK_HEADERS = {
    "authorization",
    "content-type",
    "x-stainless-lang",
    "x-stainless-package-version",
    "x-stainless-os",
    "x-stainless-arch",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-retry-count",
    "x-stainless-timeout",
    "openai-organization",
    "openai-project",
    "openai-beta",
    "x-request-id",
}
# Headers a page cannot set (the browser does) and so never lists in a preflight.
BROWSER_OWNED = {"host", "connection", "content-length", "accept-encoding"}


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


def test_preflight_allows_the_openai_sdk_headers() -> None:
    """A browser asks before every SDK call whether it may send the SDK's headers; a refusal
    fails the call before it is made. The request the preflight stands for is then answered
    (503 here: no backend) with the origin allowed, and never with credentials."""
    sent: list[httpx.Request] = []
    backend = f"127.0.0.1:{closed_port()}"
    with (
        start_bridge("--backend", backend, "--cors-origin", ORIGIN["Origin"]) as bridge,
        httpx.Client(event_hooks={"request": [sent.append]}) as http,
    ):
        client = openai.OpenAI(
            base_url=bridge.url + "/v1",
            api_key="sk-test",
            organization="org-test",
            project="proj-test",
            default_headers={**ORIGIN, "OpenAI-Beta": "assistants=v2"},
            max_retries=0,
            http_client=http,
        )
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        answer = info.value.response
        assert answer.status_code == 503
        assert answer.headers["access-control-allow-origin"] == ORIGIN["Origin"]
        assert "access-control-allow-credentials" not in answer.headers
        (request,) = sent
        python_sdk = {name.lower() for name in request.headers} - BROWSER_OWNED - {"origin"}
        assert {"x-stainless-lang", "openai-organization", "openai-project"} <= python_sdk
        asked = sorted(python_sdk | JS_SDK_HEADERS)
        preflight = {
            **ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": ", ".join(asked),
        }
        r = httpx.options(bridge.url + "/v1/chat/completions", headers=preflight)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == ORIGIN["Origin"]
        allowed = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
        assert set(asked) <= allowed, set(asked) - allowed
        assert "access-control-allow-credentials" not in r.headers
        # The headers open nothing for an origin that is not allowed.
        r = httpx.options(
            bridge.url + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.test"}
        )
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
