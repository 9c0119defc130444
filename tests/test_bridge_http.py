"""The bridge app in process, with no model server behind it (a closed port).

Everything here is decided before a backend is involved (validation, auth, body size, routing,
CORS, static page) or is about the backend being absent (503). The app is the real one; only
the transport is Starlette's in-process TestClient.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from procs import free_port as closed_port

from http_bridge.app import create_app
from http_bridge.settings import Settings

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "hi"}]


def _client(**overrides: object) -> TestClient:
    settings = Settings(backends=(f"127.0.0.1:{closed_port()}",), **overrides)  # type: ignore[arg-type]
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with _client(max_request_bytes=4096) as c:
        yield c


@pytest.fixture(scope="module")
def keyed() -> Iterator[TestClient]:
    with _client(api_keys=(KEY, "other-key"), cors_origins=("http://ui.test",)) as c:
        yield c


def _assert_envelope(body: dict, *, param: str | None = "any", code: str | None = "any") -> dict:
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param != "any":
        assert err["param"] == param, err
    if code != "any":
        assert err["code"] == code, err
    return err


# Each bad request and the param the 400 must name.
BAD_REQUESTS: list[tuple[str, dict, str | None]] = [
    ("tool without name", {"tools": [{"type": "function", "function": {}}]},
     "tools[0].function.name"),
    ("tool bad name", {"tools": [{"type": "function", "function": {"name": "a b"}}]},
     "tools[0].function.name"),
    ("tool_choice unknown", {"tool_choice": "sometimes"}, "tool_choice"),
    # Union fields: param is the path the client wrote, without pydantic's branch labels.
    ("tool_choice function without name", {"tool_choice": {"type": "function", "function": {}}},
     "tool_choice.function.name"),
    ("tool_choice unknown key", {"tool_choice": {"type": "function", "function": {"name": "f"},
     "str": 1}}, "tool_choice.str"),
    ("user number", {"user": 5}, "user"),
    ("user list", {"user": ["a"]}, "user"),
    ("tool_choice required w/o tools", {"tool_choice": "required"}, None),
    ("named tool not in tools", {"tools": [{"type": "function", "function": {"name": "f"}}],
     "tool_choice": {"type": "function", "function": {"name": "g"}}}, None),
    ("functions", {"functions": [{"name": "f"}]}, "functions"),
    ("response_format type", {"response_format": {"type": "yaml"}}, "response_format.type"),
    ("json_schema without name", {"response_format": {"type": "json_schema",
     "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
    ("logprobs type", {"logprobs": 1}, "logprobs"),
    ("top_logprobs w/o logprobs", {"top_logprobs": 3}, "top_logprobs"),
    ("top_logprobs range", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("min_p range", {"min_p": 1.5}, "min_p"),
    ("logit_bias", {"logit_bias": {"50256": -100}}, "logit_bias"),
    ("audio", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("modalities", {"modalities": ["text", "audio"]}, "modalities"),
    ("prediction", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("web_search_options", {"web_search_options": {}}, "web_search_options"),
    ("stream_options w/o stream", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("obfuscation", {"stream": True, "stream_options": {"include_obfuscation": True}},
     "stream_options.include_obfuscation"),
    ("n too big", {"n": 9}, "n"),
    ("n zero", {"n": 0}, "n"),
    ("17 stops", {"stop": [f"<{i}>" for i in range(17)]}, "stop"),
    ("empty stop", {"stop": [""]}, "stop"),
    ("temperature range", {"temperature": 2.5}, "temperature"),
    ("temperature type", {"temperature": "hot"}, "temperature"),
    ("top_p range", {"top_p": 1.5}, "top_p"),
    ("max_tokens zero", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens conflict", {"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
    ("presence_penalty", {"presence_penalty": 3}, "presence_penalty"),
    ("frequency_penalty", {"frequency_penalty": -3}, "frequency_penalty"),
    ("repetition_penalty", {"repetition_penalty": 0}, "repetition_penalty"),
    ("top_k", {"top_k": -2}, "top_k"),
    ("min_tokens", {"min_tokens": -1}, "min_tokens"),
    ("stream type", {"stream": "yes"}, "stream"),
    ("no messages", {"messages": []}, "messages"),
    ("no model", {"model": None}, "model"),
    ("tool role without id", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
    ("function role", {"messages": [{"role": "function", "content": "x", "name": "f"}]},
     "messages[0].role"),
    ("bad role", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("image part", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages[0].content"),
    ("missing content", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("user tool_calls", {"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[0].tool_calls"),
    ("unknown message field", {"messages": [{"role": "user", "content": "x", "mood": "ok"}]},
     "messages[0].mood"),
    # The keys SDKs add to a reply they send back are known only where they add them.
    ("parsed in a content part", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x", "parsed": {}}]}]}, "messages[0].content"),
    ("index on a function", {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "index": 0}}]},
        *MSG]}, "messages[0].tool_calls[0].function.index"),
    ("parsed_arguments on a tool call", {"messages": [{"role": "assistant", "content": None,
     "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f"},
     "parsed_arguments": {}}]}, *MSG]}, "messages[0].tool_calls[0].parsed_arguments"),
    ("tool call index negative", {"messages": [{"role": "assistant", "content": None,
     "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f"}, "index": -1}]},
     *MSG]}, "messages[0].tool_calls[0].index"),
    ("reasoning_content not text", {"messages": [{"role": "assistant", "content": "x",
     "reasoning_content": 5}, *MSG]}, "messages[0].reasoning_content"),
    # vLLM's fields: constraints are checked here, before any backend.
    ("guided_choice empty", {"guided_choice": []}, "guided_choice"),
    ("guided_choice not strings", {"guided_choice": ["a", 1]}, "guided_choice[1]"),
    ("guided_json a number", {"guided_json": 5}, "guided_json"),
    ("two constraints", {"guided_regex": "a", "guided_grammar": "start: \"a\""},
     "guided_grammar"),
    ("guided with json_schema", {"response_format": {"type": "json_schema", "json_schema":
     {"name": "x"}}, "guided_json": {}}, "guided_json"),
    ("structured_outputs empty", {"structured_outputs": {}}, "structured_outputs"),
    ("structured_outputs unknown kind", {"structured_outputs": {"yaml": "x"}},
     "structured_outputs.yaml"),
    ("structured_outputs additional properties", {"structured_outputs": {"json": {},
     "disable_additional_properties": True}}, "structured_outputs.disable_additional_properties"),
    ("skip_special_tokens number", {"skip_special_tokens": 0}, "skip_special_tokens"),
    ("chat best_of", {"n": 2, "best_of": 3}, "best_of"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "patch", "param"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_400_names_the_field(client: TestClient, case: str, patch: dict, param: str) -> None:
    body = {"model": "m", "messages": MSG, **patch}
    body = {k: v for k, v in body.items() if v is not None}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = _assert_envelope(r.json(), param=param)
    assert err["type"] == "invalid_request_error"


def test_400_invalid_json_and_missing_body(client: TestClient) -> None:
    r = client.post(
        "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    _assert_envelope(r.json(), param=None, code="invalid_json")
    r = client.post("/v1/chat/completions")
    assert r.status_code == 400
    _assert_envelope(r.json(), param=None)


def test_neutral_values_of_unimplemented_fields_pass_validation(client: TestClient) -> None:
    """What SDKs send when a feature is off must not be a 400 (here: 503, no backend)."""
    body = {
        "model": "m",
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "x"}]}, *MSG],
        "logprobs": False,
        "response_format": {"type": "text"},
        "tools": [],
        "tool_choice": "none",
        "store": True,  # ignored (the extra-field policy), like the next two
        "user": {"id": "u-1"},
        "num_ctx": 4096,
        "stream": True,
        "stream_options": {"include_usage": True, "include_obfuscation": False},
        # vLLM's defaults.
        "skip_special_tokens": True,
        "add_generation_prompt": True,
        "include_stop_str_in_output": False,
        "stop_token_ids": [],
        "best_of": 1,
        "chat_template_kwargs": {},
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 503, r.text


def test_backend_down_is_503_with_retry_allowed(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": MSG})
    assert r.status_code == 503
    _assert_envelope(r.json(), code="backend_unavailable")
    assert r.headers["x-should-retry"] == "true"  # nothing ran: retrying is safe
    assert r.headers["x-request-id"].startswith("chatcmpl-")
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": MSG, "stream": True})
    assert r.status_code == 503  # a stream fails before its 200 too
    assert r.headers["content-type"].startswith("application/json")
    for path in ("/v1/models", "/v1/models/m"):
        r = client.get(path)
        assert r.status_code == 503, path
        err = _assert_envelope(r.json(), code="backend_unavailable")
        rid = r.headers["x-request-id"]  # named in the message, as on the other routes
        assert rid.startswith("req-") and f"(request id {rid})" in err["message"]
    r = client.get("/health")  # minimal: no envelope, no backend addresses
    assert (r.status_code, r.json()) == (503, {"status": "unavailable"})


def test_413_with_and_without_content_length(client: TestClient) -> None:
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}
    r = client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413
    _assert_envelope(r.json(), code="request_too_large")
    # Chunked upload (no Content-Length): FastAPI's own limit, same envelope.
    chunks = iter(
        [b'{"model": "m", "messages": [{"role": "user", "content": "', b"x" * 5000, b'"}]}']
    )
    r = client.post(
        "/v1/chat/completions", content=chunks, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    _assert_envelope(r.json(), code="request_too_large")


def test_unknown_route_and_method(client: TestClient) -> None:
    r = client.get("/v1/nothing-here")
    assert r.status_code == 404
    _assert_envelope(r.json(), code="not_found")
    r = client.delete("/v1/chat/completions")
    assert r.status_code == 405
    _assert_envelope(r.json())


def test_401_without_and_with_wrong_key(keyed: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("get", "/v1/models"), ("post", "/v1/chat/completions")):
            r = getattr(keyed, method)(path, headers=headers)
            assert r.status_code == 401, (headers, path)
            _assert_envelope(r.json(), code="invalid_api_key")
    # Unauthenticated oversize or malformed bodies are not even read: 401 first.
    r = keyed.post("/v1/chat/completions", content=b"{bad", headers={"content-type": "x"})
    assert r.status_code == 401
    # The right key (either of them) gets through to the (absent) backend.
    r = keyed.get("/v1/models", headers=AUTH)
    assert r.status_code == 503
    r = keyed.get("/v1/models", headers={"Authorization": "Bearer other-key"})
    assert r.status_code == 503
    r = keyed.post("/v1/chat/completions", json={"model": "m", "messages": []}, headers=AUTH)
    assert r.status_code == 400
    # Non-/v1 routes stay open (load balancers probe /health, Prometheus scrapes /metrics).
    assert keyed.get("/metrics").status_code == 200
    assert keyed.get("/health").status_code == 503


def test_cors_only_when_configured(keyed: TestClient, client: TestClient) -> None:
    preflight = {
        "Origin": "http://ui.test",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = keyed.options("/v1/chat/completions", headers=preflight)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://ui.test"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    # Errors carry CORS headers too, so the browser can read the envelope.
    r = keyed.get("/v1/models", headers={"Origin": "http://ui.test"})
    assert r.status_code == 401
    assert r.headers["access-control-allow-origin"] == "http://ui.test"
    r = keyed.get("/v1/models", headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in r.headers
    r = client.get("/health", headers={"Origin": "http://ui.test"})
    assert "access-control-allow-origin" not in r.headers


def test_metrics_exposition(client: TestClient) -> None:
    client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    text = client.get("/metrics").text
    assert (
        'glmserve_bridge_requests_total{method="POST",route="/v1/chat/completions",status="400"}'
        in text
    )
    for name in (
        "glmserve_bridge_request_duration_seconds_bucket",
        "glmserve_bridge_time_to_first_token_seconds",
        "glmserve_bridge_streams_in_flight 0.0",
        "glmserve_bridge_backend_available 0.0",
    ):
        assert name in text


def test_static_page_and_no_ui(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><title>chat</title>")
    (tmp_path / "app.js").write_text("console.log(1)")
    settings = Settings(backends=(f"127.0.0.1:{closed_port()}",))
    with TestClient(create_app(settings, static_dir=tmp_path)) as c:
        r = c.get("/")
        assert r.status_code == 200 and "<title>chat</title>" in r.text
        assert c.get("/static/app.js").text == "console.log(1)"
        assert c.get("/static/missing.js").status_code == 404
    no_ui = Settings(backends=settings.backends, ui=False)
    with TestClient(create_app(no_ui, static_dir=tmp_path)) as c:
        assert c.get("/").status_code == 404
        assert c.get("/static/app.js").status_code == 404


def test_openapi_schema_builds(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    assert "ChatCompletionRequest" in schema["components"]["schemas"]


def test_every_answer_carries_the_security_headers(keyed: TestClient) -> None:
    """The real app wraps everything in SecurityHeadersMiddleware: the page, the API and the
    answers that middleware gives before a route runs (401 here)."""
    for method, path, headers in (
        ("get", "/", {}),
        ("get", "/health", {}),
        ("get", "/v1/models", {}),  # 401: the key middleware answers
        ("get", "/v1/models", AUTH),  # 503: the backend is absent
    ):
        r = getattr(keyed, method)(path, headers=headers)
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
        assert r.headers["x-content-type-options"] == "nosniff", path
