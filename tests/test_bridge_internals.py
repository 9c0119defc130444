"""No internals to clients: generic server-side errors with the request id, details in the log.

The real ``http-bridge`` process (uvicorn) is pointed at a fake model server served in this
process on loopback (sync grpc, with grpc.health.v1 SERVING so the bridge's client-side health
checks admit it), whose Chat aborts with secret details on demand. The flag checks (``/health``,
``/metrics``, ``/docs``) use the real app in process, with no backend behind it.

The fake also sends what a real model server should not: log-probabilities of -inf (which the
bridge floors) and NaN (no JSON number: the bridge fails on it, which is how the tests reach its
handling of an unexpected exception through a real route, with nothing patched).
"""

from __future__ import annotations

import collections
import json
import time
import uuid
from collections.abc import Iterator
from concurrent import futures

import grpc
import httpx
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from procs import Proc, free_port, start_bridge

from glmserve.v1 import chat_pb2, chat_pb2_grpc
from http_bridge.app import create_app
from http_bridge.settings import Settings

SECRET = "SECRET-dsn postgres://10.9.8.7:5432"
ORIGIN = "http://ui.test"
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


class Failing(chat_pb2_grpc.ChatServiceServicer):
    """The request's model picks the failure."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()  # Chat calls per message

    def ListModels(self, request, context):  # noqa: N802 - gRPC method name
        return chat_pb2.ListModelsResponse(models=[chat_pb2.ModelInfo(id="fake")])

    def Chat(self, request, context):  # noqa: N802 - gRPC method name
        text = request.messages[-1].content if request.messages else ""
        self.calls[text] += 1  # one gRPC thread per call; the tests read it after the call
        if request.model == "draining" or (
            request.model == "refused-once" and self.calls[text] == 1
        ):
            context.abort(grpc.StatusCode.UNAVAILABLE, "refused before accepting the call")
        if request.model == "refused-once":
            usage = chat_pb2.Usage(prompt_tokens=1, completion_tokens=1)
            yield chat_pb2.ChatResponse(text="fine", token_ids=[7])
            yield chat_pb2.ChatResponse(finish_reason=chat_pb2.FINISH_REASON_STOP, usage=usage)
            return
        if request.model == "internal":
            context.abort(grpc.StatusCode.INTERNAL, f"{SECRET} exploded")
        if request.model == "unauthenticated":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"bad token for {SECRET}")
        if request.model == "invalid":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: must be <= 5")
        if request.model in LOGPROBS:
            value = LOGPROBS[request.model]
            top = [chat_pb2.TokenLogprob(token=b"y", logprob=value)]
            chosen = chat_pb2.TokenLogprob(token=b"x", logprob=value)
            position = chat_pb2.PositionLogprobs(chosen=chosen, top=top)
            yield chat_pb2.ChatResponse(text="x", token_ids=[7], logprobs=[position])
            usage = chat_pb2.Usage(prompt_tokens=1, completion_tokens=1)
            yield chat_pb2.ChatResponse(finish_reason=chat_pb2.FINISH_REASON_STOP, usage=usage)
            return
        yield chat_pb2.ChatResponse(text="partial")
        context.abort(grpc.StatusCode.INTERNAL, f"{SECRET} died mid-stream")


LOGPROBS = {"inf-logprob": float("-inf"), "nan-logprob": float("nan")}
FAKE = Failing()


@pytest.fixture(scope="module")
def fake_target() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    chat_pb2_grpc.add_ChatServiceServicer_to_server(FAKE, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def _wait_healthy(bridge: Proc) -> httpx.Response:
    for _ in range(100):
        r = httpx.get(bridge.url + "/health", timeout=5)
        if r.status_code == 200:
            return r
        time.sleep(0.1)
    raise AssertionError(f"bridge never healthy; log:\n{bridge.log_text()[-2000:]}")


@pytest.fixture(scope="module")
def bridge(fake_target: str) -> Iterator[Proc]:
    with start_bridge("--backend", fake_target, "--no-ui", "--cors-origin", ORIGIN) as b:
        _wait_healthy(b)
        yield b


def _generic(r: httpx.Response, status: int, code: str) -> str:
    """Asserts a generic server-side error; returns its request id."""
    assert r.status_code == status, r.text
    rid = r.headers["x-request-id"]
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "server_error"
    assert f"(request id {rid}); see the server logs." in err["message"]
    assert "SECRET" not in r.text and "10.9.8.7" not in r.text and "127.0.0.1" not in r.text
    return rid


def test_internal_error_is_generic_and_logged(bridge: Proc, fake_target: str) -> None:
    r = httpx.post(bridge.url + CHAT, json={"model": "internal", "messages": MSG}, timeout=30)
    rid = _generic(r, 500, "internal_error")
    assert r.json()["error"]["message"] == (
        f"The model server failed to process the request (request id {rid}); see the server logs."
    )
    assert r.headers["x-should-retry"] == "false"
    line = next(line for line in bridge.log_text().splitlines() if rid in line and "SECRET" in line)
    assert "INTERNAL" in line and fake_target in line


def test_caller_request_id_names_the_failure(bridge: Proc) -> None:
    r = httpx.post(
        bridge.url + CHAT,
        json={"model": "internal", "messages": MSG},
        headers={"x-request-id": "trace-42"},
        timeout=30,
    )
    assert _generic(r, 500, "internal_error") == "trace-42"


def test_backend_refusing_our_credentials_is_503(bridge: Proc) -> None:
    r = httpx.post(bridge.url + CHAT, json={"model": "unauthenticated", "messages": MSG})
    rid = _generic(r, 503, "backend_unavailable")
    assert r.headers["x-should-retry"] == "false"  # a retry meets the same misconfiguration
    assert any(rid in line and "UNAUTHENTICATED" in line for line in bridge.log_text().splitlines())


def test_client_errors_keep_their_message(bridge: Proc) -> None:
    r = httpx.post(bridge.url + CHAT, json={"model": "invalid", "messages": MSG}, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["message"], err["param"]) == ("max_tokens: must be <= 5", "max_tokens")


def test_in_stream_error_chunk_is_generic(bridge: Proc) -> None:
    body = {"model": "midstream", "messages": MSG, "stream": True}
    with httpx.stream("POST", bridge.url + CHAT, json=body, timeout=30) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    err = json.loads(data[-2])["error"]
    assert err["code"] == "internal_error"
    assert f"(request id {rid}); see the server logs." in err["message"]
    assert "SECRET" not in "".join(data)
    assert any(rid in line and "mid-stream" in line for line in bridge.log_text().splitlines())


def test_a_refused_call_is_tried_once_more_on_the_only_backend(bridge: Proc) -> None:
    """The only backend answers UNAVAILABLE before any message (what a stream started on a
    connection the server is closing at its --max-connection-age gets). The bridge tries it
    once more, instead of answering 503."""
    text = f"hello {uuid.uuid4()}"
    body = {"model": "refused-once", "messages": [{"role": "user", "content": text}]}
    r = httpx.post(bridge.url + CHAT, json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "fine"
    assert FAKE.calls[text] == 2


def test_a_backend_that_keeps_refusing_is_503_after_one_more_try(bridge: Proc) -> None:
    """Draining (UNAVAILABLE every time): one more try, then 503, no loop."""
    text = f"hello {uuid.uuid4()}"
    body = {"model": "draining", "messages": [{"role": "user", "content": text}]}
    r = httpx.post(bridge.url + CHAT, json=body, timeout=30)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"]
    assert FAKE.calls[text] == 2


def test_chat_logprob_of_minus_infinity_is_floored(bridge: Proc) -> None:
    """As /v1/completions does (vLLM's -9999): JSON has no -inf, streamed or not."""
    body = {"model": "inf-logprob", "messages": MSG, "logprobs": True, "top_logprobs": 1}
    r = httpx.post(bridge.url + CHAT, json=body, timeout=30)
    assert r.status_code == 200, r.text
    (token,) = r.json()["choices"][0]["logprobs"]["content"]
    assert token["logprob"] == -9999.0 and token["top_logprobs"][0]["logprob"] == -9999.0
    with httpx.stream("POST", bridge.url + CHAT, json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    choices = [c for d in data[:-1] for c in json.loads(d)["choices"] if c.get("logprobs")]
    (token,) = [t for c in choices for t in c["logprobs"]["content"]]
    assert token["logprob"] == -9999.0 and token["top_logprobs"][0]["logprob"] == -9999.0


def test_unexpected_exception_answers_with_the_usual_headers(bridge: Proc) -> None:
    """A NaN log-probability cannot be written as JSON: the bridge's response fails, an
    exception no handler expects. Its 500 still passes through the middleware: CORS (so the
    page can read it), security headers, the request id, and no retry."""
    body = {"model": "nan-logprob", "messages": MSG, "logprobs": True}
    headers = {"Origin": ORIGIN, "x-request-id": "trace-nan"}
    r = httpx.post(bridge.url + CHAT, json=body, headers=headers, timeout=30)
    assert r.status_code == 500, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-should-retry"] == "false"
    assert _generic(r, 500, "internal_error") == "trace-nan"
    log = bridge.log_text()
    assert "unhandled error on POST /v1/chat/completions (request id trace-nan)" in log
    assert "Traceback" in log
    # Without a plain id of the caller's, the answer and the log line share a new one.
    r = httpx.post(bridge.url + CHAT, json=body, headers={"x-request-id": "a b"}, timeout=30)
    rid = _generic(r, 500, "internal_error")
    assert rid.startswith("req-") and f"(request id {rid})" in bridge.log_text()


def test_health_minimal_by_default(bridge: Proc) -> None:
    r = httpx.get(bridge.url + "/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


def test_health_details_flag(fake_target: str) -> None:
    with start_bridge("--backend", fake_target, "--no-ui", "--health-details") as b:
        r = _wait_healthy(b)
    assert r.json() == {"status": "ok", "backends": [fake_target]}


def _client(**overrides: object) -> TestClient:
    settings = Settings(backends=(f"127.0.0.1:{free_port()}",), **overrides)  # type: ignore[arg-type]
    return TestClient(create_app(settings))


def test_health_unavailable_keeps_503() -> None:
    with _client() as c:
        r = c.get("/health")
        assert (r.status_code, r.json()) == (503, {"status": "unavailable"})
    with _client(health_details=True) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        assert r.json()["backends"] == list(c.app.state.settings.backends)


def test_metrics_require_key() -> None:
    with _client(api_keys=("k",), metrics_require_key=True) as c:
        r = c.get("/metrics")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
        assert c.get("/health").status_code == 503  # probes stay open
    with pytest.raises(ValueError, match="--api-key"):  # the bridge refuses to start
        create_app(Settings(metrics_require_key=True))


def test_api_docs_off_by_default_schema_published() -> None:
    with _client() as c:
        assert c.get("/docs").status_code == 404
        assert c.get("/redoc").status_code == 404
        assert c.get("/openapi.json").status_code == 200
    with _client(api_docs=True) as c:
        assert c.get("/docs").status_code == 200
        assert c.get("/redoc").status_code == 200
