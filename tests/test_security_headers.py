"""SecurityHeadersMiddleware: the headers on every response, and the real chat page under them.

The browser test serves http_bridge/static/ the way the bridge does (``/`` and ``/static``)
behind the middleware, with a stub ``/v1/models``, and loads it in Debian's Chromium: the page
must come up with no CSP violation, and no other origin may frame it.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from http_bridge.middleware import PAGE_CSP, SecurityHeadersMiddleware

STATIC = Path(__file__).resolve().parent.parent / "http_bridge" / "static"
EXPECTED = {
    "content-security-policy": PAGE_CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def page_app() -> FastAPI:
    """The bridge's page routes plus a stub model list, behind the middleware."""
    app = FastAPI()

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(
            {"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "t"}]}
        )

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(iter([b"data: 1\n\n"]), media_type="text/event-stream")

    @app.get("/own-csp")
    async def own_csp() -> PlainTextResponse:
        return PlainTextResponse("x", headers={"content-security-policy": "default-src 'none'"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(SecurityHeadersMiddleware)
    return app


@pytest.mark.parametrize(
    "path", ["/", "/static/app.js", "/static/style.css", "/v1/models", "/stream", "/nope"]
)
async def test_every_response_carries_the_headers(path: str) -> None:
    transport = httpx.ASGITransport(app=page_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get(path)
    assert r.status_code == (404 if path == "/nope" else 200)
    for name, value in EXPECTED.items():
        assert r.headers.get_list(name) == [value], name


async def test_a_header_the_route_set_is_kept() -> None:
    transport = httpx.ASGITransport(app=page_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/own-csp")
    assert r.headers.get_list("content-security-policy") == ["default-src 'none'"]
    assert r.headers["x-content-type-options"] == "nosniff"


def test_policy_forbids_framing_and_inline_code() -> None:
    directives = dict(d.strip().split(" ", 1) for d in PAGE_CSP.split(";"))
    assert directives["frame-ancestors"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert "unsafe" not in PAGE_CSP and "data:" not in PAGE_CSP


# ------------------------------------------------------------------------------ in Chromium


@pytest.fixture(scope="module")
def page_url() -> Iterator[str]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(page_app(), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.browser
def test_real_page_runs_under_the_policy(page_url: str) -> None:
    from test_ui_browser import CHROMIUM, CHROMIUM_ARGS

    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            console: list[str] = []
            errors: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.add_init_script(
                "window.__csp = []; document.addEventListener('securitypolicyviolation',"
                " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
            )
            response = page.goto(page_url + "/")
            assert response is not None
            assert response.headers["content-security-policy"] == PAGE_CSP
            sync_api.expect(page.get_by_test_id("app")).to_have_attribute("data-ready", "true")
            sync_api.expect(page.get_by_test_id("model-select")).to_have_value("m")
            # Exercise the page: styles applied, a dialog opened, the composer typed into.
            page.get_by_test_id("open-settings").click()
            sync_api.expect(page.get_by_test_id("settings-dialog")).to_be_visible()
            page.get_by_test_id("settings-cancel").click()
            page.get_by_test_id("prompt-input").fill("hello\nworld")
            # style.css was applied (not blocked): its .visually-hidden rule is in effect.
            assert (
                page.evaluate(
                    "getComputedStyle(document.querySelector('.visually-hidden')).position"
                )
                == "absolute"
            )
            page.wait_for_timeout(300)
            violations = page.evaluate("window.__csp")
            assert violations == [], violations
            csp_lines = [c for c in console if "Content Security Policy" in c]
            assert csp_lines == [] and errors == [], (csp_lines, errors)

            # Another origin (the test's about:blank page) may not frame it.
            framed: list[str] = []
            other = browser.new_page()
            other.on("console", lambda m: framed.append(m.text))
            other.set_content(f'<iframe src="{page_url}/"></iframe>')
            deadline = time.monotonic() + 10
            while not any("frame-ancestors" in m for m in framed):
                assert time.monotonic() < deadline, framed
                other.wait_for_timeout(50)
            assert all(f.url != page_url + "/" for f in other.frames[1:]), other.frames
        finally:
            browser.close()
