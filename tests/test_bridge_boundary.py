"""The bridge's input boundary, case by case: every hostile input gets a 2xx or a 4xx.

Real processes on loopback (``model-server`` on the tiny random Llama, ``http-bridge`` under
uvicorn), raw bytes over ``http.client`` so nothing is coerced on the way. Every case asserts its
exact status, the OpenAI error envelope (with ``param`` where the field is known), and that the
connection survives: the same socket then answers ``GET /health``. ``model: ""`` means the served
model, so valid bodies really generate (a token or two).
"""

from __future__ import annotations

import gzip
import http.client
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from procs import Proc, free_port, start_bridge

from http_bridge.app import create_app
from http_bridge.protocol import MAX_TEXT_CHARS, ChatCompletionRequest
from http_bridge.routes.chat import grpc_requests
from http_bridge.settings import Settings

CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}
HI = [{"role": "user", "content": "hi"}]
ANY = object()  # "any param": the case does not pin it


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def error(self) -> dict[str, Any]:
        return json.loads(self.body)["error"]


class Wire:
    """One keep-alive HTTP/1.1 connection; each exchange asserts the server kept it open.

    Uvicorn closes a connection idle for 5 s (its keep-alive timeout), which slow example
    generation can cause between two requests: past :data:`IDLE_S` the next exchange opens a
    new connection, so only a close with a request in flight (or announced) counts as a drop."""

    IDLE_S = 4.0

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.last = time.monotonic()

    def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        *,
        chunked: bool = False,
    ) -> Answer:
        if time.monotonic() - self.last > self.IDLE_S:
            self.conn.close()
        before = self.conn.sock
        payload: Any = [body] if chunked and body is not None else body
        self.conn.request(method, path, body=payload, headers=headers or {}, encode_chunked=chunked)
        response = self.conn.getresponse()
        answer = Answer(response.status, response.headers, response.read())
        assert before is None or self.conn.sock is before, "a new connection was opened"
        assert not response.will_close, f"the server closed the connection after {answer}"
        self.last = time.monotonic()
        return answer

    def close(self) -> None:
        self.conn.close()


def assert_answered(answer: Answer, what: object = "") -> None:
    """A 2xx (complete JSON, or an SSE stream ending in [DONE]) or a 4xx with the envelope."""
    status, body = answer.status, answer.body
    assert 200 <= status < 300 or 400 <= status < 500, f"{what}: {status} {body[:300]!r}"
    content_type = answer.headers.get("content-type", "")
    if status >= 400:
        assert content_type.startswith("application/json"), (what, content_type)
        envelope = json.loads(body)
        assert set(envelope) == {"error"}, envelope
        error = envelope["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"], error
        assert error["type"] == "invalid_request_error", error
    elif content_type.startswith("text/event-stream"):
        data = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        assert data and data[-1] == "[DONE]", (what, body[-300:])
        for item in data[:-1]:
            assert "error" not in json.loads(item), (what, item)
    else:
        assert json.loads(body)["object"] == "chat.completion", (what, body[:300])


# ---- processes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_server: Proc) -> Proc:
    return tiny_server


@pytest.fixture(scope="module")
def bridge(server: Proc) -> Iterator[Proc]:
    with start_bridge("--backend", server.target, "--no-ui", "--log-level", "warning") as proc:
        yield proc


@pytest.fixture(scope="module")
def wire(bridge: Proc) -> Iterator[Wire]:
    w = Wire(bridge.port)
    yield w
    w.close()


# ---- the cases -----------------------------------------------------------------------------


def chat(**fields: Any) -> dict[str, Any]:
    """A valid request for the served model (two tokens at most), with ``fields`` on top."""
    return {"model": "", "messages": HI, "max_tokens": 2, **fields}


def raw(text: str, **fields: Any) -> bytes:
    """A body with ``text`` spliced in verbatim as the value of "x" (the bytes json cannot make)."""
    head = json.dumps(chat(**fields))[:-1]
    return f'{head}, "x": {text}}}'.encode()


def user_bytes(content: bytes) -> bytes:
    """A user message whose content is ``content`` verbatim (bytes that are not UTF-8 text)."""
    return json.dumps(user("X")).encode().replace(b"X", content)


def with_literal(name: str, literal: str) -> bytes:
    """``chat()`` with field ``name`` set to a JSON literal written by hand (NaN, 1e400, ...)."""
    head = json.dumps(chat())[:-1]
    return f'{head}, "{name}": {literal}}}'.encode()


def user(content: Any, **fields: Any) -> dict[str, Any]:
    return chat(messages=[{"role": "user", "content": content, **fields}])


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


@dataclass
class Case:
    id: str
    body: dict[str, Any] | list[Any] | bytes | str | None
    status: int
    param: Any = ANY
    code: Any = ANY
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))
    method: str = "POST"
    path: str = CHAT
    chunked: bool = False

    def payload(self) -> bytes | None:
        if self.body is None or isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()  # ensure_ascii: "\ud800" stays an escape


MIB = 1024 * 1024
CASES = [
    # -- integers: the proto's uint32/int64 and OpenAI's ranges
    Case("max_tokens 2**32", chat(max_tokens=2**32), 400, "max_tokens"),
    Case("max_tokens 2**64", chat(max_tokens=2**64), 400, "max_tokens"),
    Case("max_tokens uint32 max: past the context", chat(max_tokens=2**32 - 1), 400, "max_tokens"),
    Case("max_tokens negative", chat(max_tokens=-1), 400, "max_tokens"),
    Case("max_tokens zero", chat(max_tokens=0), 400, "max_tokens"),
    Case("max_tokens float", chat(max_tokens=1.5), 400, "max_tokens"),
    Case("max_tokens string", chat(max_tokens="2"), 400, "max_tokens"),
    Case("max_tokens bool", chat(max_tokens=True), 400, "max_tokens"),
    Case("max_tokens 10**30", chat(max_tokens=10**30), 400, "max_tokens"),
    Case("integer of 200 digits", chat(max_tokens=10**200), 400, None, "invalid_value"),
    Case("max_completion_tokens 2**32", chat(max_completion_tokens=2**32, max_tokens=None), 400,
         "max_completion_tokens"),
    Case("min_tokens 2**32", chat(min_tokens=2**32), 400, "min_tokens"),
    Case("min_tokens negative", chat(min_tokens=-1), 400, "min_tokens"),
    Case("top_k 2**40", chat(top_k=2**40), 400, "top_k"),
    Case("top_k uint32 max", chat(top_k=2**32 - 1), 200),
    Case("top_k -2", chat(top_k=-2), 400, "top_k"),
    Case("top_k bool", chat(top_k=False), 400, "top_k"),
    Case("seed 2**63", chat(seed=2**63), 400, "seed"),
    Case("seed below int64", chat(seed=-(2**63) - 1), 400, "seed"),
    Case("seed int64 min", chat(seed=-(2**63)), 200),
    Case("seed int64 max", chat(seed=2**63 - 1), 200),
    Case("n 0", chat(n=0), 400, "n"),
    Case("n 9", chat(n=9), 400, "n"),
    Case("n 8", chat(n=8, max_tokens=1), 200),
    # -- floats: finite, OpenAI's ranges; tiny values are greedy, not NaN
    Case("temperature 1e-40", chat(temperature=1e-40), 200),
    Case("temperature smallest subnormal", chat(temperature=5e-324), 200),
    Case("temperature -0.0", chat(temperature=-0.0), 200),
    Case("temperature above 2", chat(temperature=2.0000001), 400, "temperature"),
    Case("temperature 1e400", with_literal("temperature", "1e400"), 400, "temperature"),
    Case("temperature NaN", with_literal("temperature", "NaN"), 400, None, "invalid_json"),
    Case("temperature Infinity", with_literal("temperature", "Infinity"), 400, None,
         "invalid_json"),
    Case("temperature -Infinity", with_literal("temperature", "-Infinity"), 400, None,
         "invalid_json"),
    Case("top_p 0", chat(top_p=0), 200),
    Case("top_p 1e-40", chat(top_p=1e-40), 200),
    Case("top_p negative", chat(top_p=-0.1), 400, "top_p"),
    Case("repetition_penalty 1e-40", chat(repetition_penalty=1e-40), 400, "repetition_penalty"),
    Case("repetition_penalty 0.01", chat(repetition_penalty=0.01), 200),
    Case("presence_penalty -2", chat(presence_penalty=-2), 200),
    Case("presence_penalty 2.5", chat(presence_penalty=2.5), 400, "presence_penalty"),
    Case("frequency_penalty string", chat(frequency_penalty="1"), 400, "frequency_penalty"),
    # -- strings: Unicode scalar values only (NUL is text), bounded lengths
    Case("content lone high surrogate", user("a\ud800b"), 400, "messages[0].content",
         "invalid_encoding"),
    Case("content lone low surrogate", user("\udc00"), 400, "messages[0].content"),
    Case("content reversed pair", user("\udc00\ud800"), 400, "messages[0].content"),
    Case("content surrogate pair (emoji)", user("\U0001f600"), 200),
    Case("content part lone surrogate", user([{"type": "text", "text": "\ud800"}]), 400,
         "messages[0].content[0].text"),
    Case("stop lone surrogate", chat(stop=["\ud800"]), 400, "stop[0]"),
    Case("model lone surrogate", chat(model="\ud800"), 400, "model"),
    Case("name lone surrogate", user("hi", name="\udfff"), 400, "messages[0].name"),
    Case("key lone surrogate", chat(**{"\ud800": 1}), 400, "\\ud800"),
    Case("content NUL", user("a\u0000b"), 200),
    Case("stop NUL", chat(stop=["\u0000"]), 200),
    Case("model NUL", chat(model="\u0000"), 404, "model", "model_not_found"),
    Case("content 900 KB: longer than the context", user("word " * 180_000), 400, "messages"),
    Case("model 257 chars", chat(model="m" * 257), 400, "model"),
    Case("stop 257 bytes", chat(stop=["é" * 128 + "x"]), 400, "stop"),
    Case("stop 17 items", chat(stop=[f"<{i}>" for i in range(17)]), 400, "stop"),
    Case("stop 16 items: the model server's limit", chat(stop=[f"<{i}>" for i in range(16)]),
         200),
    Case("stop empty", chat(stop=""), 400, "stop"),
    Case("stop list of int", chat(stop=[1]), 400, "stop[0]"),
    Case("user 300 chars", chat(user="u" * 300), 400, "user"),
    # -- bytes that are not UTF-8 JSON
    Case("UTF-8-encoded surrogate", user_bytes(b"\xed\xa0\x80"), 400, None, "invalid_encoding"),
    Case("overlong UTF-8", user_bytes(b"\xc0\xaf"), 400, None, "invalid_encoding"),
    Case("Latin-1 byte", user_bytes(b"\xe9"), 400, None, "invalid_encoding"),
    Case("UTF-16 body", json.dumps(chat()).encode("utf-16"), 400, None, "invalid_encoding"),
    Case("UTF-8 BOM", b"\xef\xbb\xbf" + json.dumps(chat()).encode(), 400, None, "invalid_json"),
    Case("invalid JSON", b'{"model": ', 400, None, "invalid_json"),
    Case("trailing garbage", json.dumps(chat()).encode() + b" x", 400, None, "invalid_json"),
    Case("raw control character in a string", b'{"model": "\x01", "messages": []}', 400, None,
         "invalid_json"),
    Case("empty body", b"", 400, None, "missing_body"),
    Case("whitespace body", b"   ", 400, None, "invalid_json"),
    Case("JSON null body", b"null", 400, None, "invalid_value"),
    Case("top-level array", [chat()], 400, None),
    Case("top-level string", "hi", 400, None),
    Case("top-level number", b"1", 400, None),
    # -- structure: sizes, types, roles, nesting, duplicate keys
    Case("messages empty", chat(messages=[]), 400, "messages"),
    Case("messages 4097", chat(messages=HI * 4097), 400, "messages"),
    Case("messages 4096: longer than the context", chat(messages=HI * 4096), 400, "messages"),
    Case("messages an object", chat(messages={"role": "user", "content": "hi"}), 400,
         "messages"),
    Case("message a string", chat(messages=["hi"]), 400, "messages[0]"),
    Case("role tool without tool_call_id", chat(messages=[{"role": "tool", "content": "x"}]), 400,
         "messages[0]"),
    Case("role function", chat(messages=[{"role": "function", "content": "x", "name": "f"}]),
         400, "messages[0].role", "unsupported_parameter"),
    Case("role unknown", chat(messages=[{"role": "wizard", "content": "x"}]), 400,
         "messages[0].role"),
    Case("role number", chat(messages=[{"role": 1, "content": "x"}]), 400, "messages[0].role"),
    Case("role missing", chat(messages=[{"content": "x"}]), 400, "messages[0].role"),
    Case("content number", user(5), 400, "messages[0].content"),
    Case("content object", user({"type": "text", "text": "x"}), 400, "messages[0].content"),
    Case("content empty list", user([]), 400, "messages[0].content"),
    Case("content part not an object", user(["x"]), 400, "messages[0].content"),
    Case("content part image", user([{"type": "image_url", "image_url": {"url": "x"}}]), 400,
         "messages[0].content", "unsupported_parameter"),
    Case("content part without text", user([{"type": "text"}]), 400, "messages[0].content"),
    Case("content part text number", user([{"type": "text", "text": 1}]), 400,
         "messages[0].content"),
    Case("content part type number", user([{"type": 1, "text": "x"}]), 400,
         "messages[0].content"),
    Case("content part extra key", user([{"type": "text", "text": "x", "cache": 1}]), 400,
         "messages[0].content", "unsupported_parameter"),
    Case("content 257 parts", user([{"type": "text", "text": "x"}] * 257), 400,
         "messages[0].content"),
    Case("content null from user", user(None), 400, "messages[0].content"),
    Case("content null from assistant", chat(messages=[
        *HI, {"role": "assistant", "content": None}, *HI]), 200),
    Case("last message from assistant", chat(messages=[*HI, {"role": "assistant", "content": "x"}]),
         400, "messages"),
    Case("nesting 32 levels (an ignored field)", chat(metadata=nested(31)), 200),
    Case("nesting 33 levels", chat(metadata=nested(32)), 400, "metadata" + ".a" * 31,
         "invalid_json"),
    Case("nesting 100000 levels", b"[" * 100_000, 400, None, "invalid_json"),
    Case("duplicate top-level key", raw('"y"').replace(b'"x"', b'"model"'), 400, "model",
         "duplicate_key"),
    Case("duplicate key, same value", b'{"model": "", "model": "", "messages": []}', 400,
         "model", "duplicate_key"),
    Case("duplicate nested key",
         b'{"model": "", "messages": [{"role": "user", "role": "user", "content": "x"}]}', 400,
         "messages[0].role", "duplicate_key"),
    Case("unknown field with a huge array (ignored)", chat(x=[0] * 100_000), 200),
    Case("tools with 1000 functions", chat(tools=[{"type": "function"}] * 1000), 400, "tools"),
    Case("stream not a bool", chat(stream="yes"), 400, "stream"),
    Case("stream with a lone surrogate", chat(stream=True, messages=[
        {"role": "user", "content": "\ud800"}]), 400, "messages[0].content"),
    Case("stream_options without stream", chat(stream_options={"include_usage": True}), 400,
         "stream_options"),
    Case("stream", chat(stream=True, n=2, stream_options={"include_usage": True}), 200),
    # -- transport: content type, content encoding, size, method, paths
    Case("no content-type", chat(), 415, None, "unsupported_media_type", headers={}),
    Case("text/plain", chat(), 415, None, "unsupported_media_type",
         headers={"content-type": "text/plain"}),
    Case("form-urlencoded", chat(), 415, None, "unsupported_media_type",
         headers={"content-type": "application/x-www-form-urlencoded"}),
    Case("charset utf-16", chat(), 415, None, "unsupported_media_type",
         headers={"content-type": "application/json; charset=utf-16"}),
    Case("charset UTF-8", chat(), 200, headers={"content-type": "application/json; charset=UTF-8"}),
    Case("+json subtype", chat(), 200, headers={"content-type": "application/merge-patch+json"}),
    Case("gzip content-encoding lie", chat(), 415, None, "unsupported_content_encoding",
         headers={**JSON, "content-encoding": "gzip"}),
    Case("real gzip", gzip.compress(json.dumps(chat()).encode()), 415, None,
         "unsupported_content_encoding", headers={**JSON, "content-encoding": "gzip"}),
    Case("identity content-encoding", chat(), 200,
         headers={**JSON, "content-encoding": "identity"}),
    Case("chunked body", chat(), 200, chunked=True),
    Case("chunked body over the limit", user("x" * (MIB + 10)), 413, None, "request_too_large",
         chunked=True),
    Case("GET on the chat route", None, 405, None, "method_not_allowed", method="GET"),
    Case("model id with an encoded surrogate", None, 404, "model", method="GET",
         path="/v1/models/%ED%A0%80"),
    Case("model id with NUL", None, 404, "model", method="GET", path="/v1/models/%00"),
]  # fmt: skip


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(wire: Wire, case: Case) -> None:
    answer = wire.send(case.method, case.path, case.payload(), case.headers, chunked=case.chunked)
    assert_answered(answer, case.id)
    assert answer.status == case.status, answer.body[:300]
    if answer.status >= 400:
        error = answer.error()
        if case.param is not ANY:
            assert error["param"] == case.param, error
        if case.code is not ANY:
            assert error["code"] == case.code, error
    health = wire.send("GET", "/health")
    assert health.status == 200, health.body


# x-request-id values that cannot be gRPC metadata (printable ASCII) or are no plain id, which
# the HTTP parser lets through: the bridge must neither forward nor echo them.
ODD_REQUEST_IDS = {
    "latin-1": "caf\xe9",  # http.client sends it as the byte 0xE9
    "4000 chars": "r" * 4000,
    "space": "two words",
    "tab": "a\tb",
}
ROUTES = {
    "models": ("GET", "/v1/models", None, "req-"),
    "model": ("GET", "/v1/models/{model}", None, "req-"),
    "chat": ("POST", CHAT, chat(), "chatcmpl-"),
    "completions": ("POST", "/v1/completions", {"model": "", "prompt": "hi", "max_tokens": 2},
                    "cmpl-"),
}  # fmt: skip


@pytest.fixture(scope="module")
def served(wire: Wire) -> str:
    return json.loads(wire.send("GET", "/v1/models").body)["data"][0]["id"]


@pytest.mark.parametrize("request_id", ODD_REQUEST_IDS.values(), ids=ODD_REQUEST_IDS)
@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES)
def test_odd_request_id_is_replaced(
    wire: Wire, served: str, route: tuple[str, str, Any, str], request_id: str
) -> None:
    method, path, body, prefix = route
    payload = None if body is None else json.dumps(body).encode()
    headers = {**JSON, "x-request-id": request_id}
    answer = wire.send(method, path.format(model=served), payload, headers)
    assert answer.status == 200, answer.body[:300]
    echoed = answer.headers["x-request-id"]
    assert echoed.startswith(prefix) and request_id not in echoed, echoed


def test_request_id_with_a_control_byte(bridge: Proc) -> None:
    """DEL: uvicorn's parser (httptools) refuses the request itself, with its own plain 400
    and a closed connection; a parser that let it through would get the bridge's own id."""
    conn = http.client.HTTPConnection("127.0.0.1", bridge.port, timeout=30)
    try:
        conn.request("GET", "/v1/models", headers={"x-request-id": "a\x7fb"})
        response = conn.getresponse()
        response.read()
        assert response.status in (200, 400), response.status
        assert response.headers.get("x-request-id", "req-").startswith("req-")
    finally:
        conn.close()


@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES)
def test_plain_request_id_is_echoed(
    wire: Wire, served: str, route: tuple[str, str, Any, str]
) -> None:
    method, path, body, _prefix = route
    payload = None if body is None else json.dumps(body).encode()
    headers = {**JSON, "x-request-id": "trace-7:a/b+c=d_e.f"}
    answer = wire.send(method, path.format(model=served), payload, headers)
    assert answer.status == 200, answer.body[:300]
    assert answer.headers["x-request-id"] == "trace-7:a/b+c=d_e.f"


def test_oversize_content_length_is_413(bridge: Proc) -> None:
    """Declared too large: answered before the body is read, so closing is the server's right."""
    conn = http.client.HTTPConnection("127.0.0.1", bridge.port, timeout=30)
    try:
        conn.request("POST", CHAT, body=b"x" * (MIB + 1), headers=JSON)
        response = conn.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"]["code"] == "request_too_large"
    finally:
        conn.close()


def test_both_processes_still_serve(wire: Wire, server: Proc, bridge: Proc) -> None:
    answer = wire.send("POST", CHAT, json.dumps(chat(max_tokens=4)).encode(), JSON)
    assert answer.status == 200, answer.body
    assert server.proc.poll() is None and bridge.proc.poll() is None
    assert "Traceback" not in bridge.log_text()


# ---- in process: what a default body limit cannot reach, the mapping, the published schema --


@pytest.fixture(scope="module")
def roomy() -> Iterator[TestClient]:
    """The app with a 16 MiB body limit and no backend (a closed port)."""
    settings = Settings(backends=(f"127.0.0.1:{free_port()}",), max_request_bytes=16 * MIB)
    with TestClient(create_app(settings)) as client:
        yield client


def test_text_past_the_grpc_limit(roomy: TestClient) -> None:
    """With --max-request-bytes above 4 MiB: text the model server could never receive is a 400
    (not the 429 grpc's RESOURCE_EXHAUSTED would become)."""
    r = roomy.post(CHAT, json=user("x" * (MAX_TEXT_CHARS + 1)))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages[0].content"
    half = {"role": "user", "content": "x" * (MAX_TEXT_CHARS // 2 + 1)}
    r = roomy.post(CHAT, json=chat(messages=[half, half]))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages"
    assert r.json()["error"]["code"] == "request_too_large"


def test_tiny_temperature_or_top_p_is_greedy() -> None:
    """Below 1e-5 both mean "the likeliest token"; the model server gets temperature 0."""
    for fields in ({"temperature": 1e-40}, {"top_p": 0.0}, {"top_p": 1e-9, "temperature": 1.0}):
        (req,) = grpc_requests(ChatCompletionRequest.model_validate(chat(**fields)), "id")
        assert req.temperature == 0.0 and not req.HasField("top_p"), fields
    (req,) = grpc_requests(ChatCompletionRequest.model_validate(chat(temperature=1e-5)), "id")
    assert req.temperature == pytest.approx(1e-5)


def test_openapi_states_the_bounds(roomy: TestClient) -> None:
    schemas = roomy.get("/openapi.json").json()["components"]["schemas"]
    request = schemas["ChatCompletionRequest"]["properties"]

    def bounds(name: str) -> tuple[Any, Any]:
        (number, _null) = request[name]["anyOf"]
        return number.get("minimum"), number.get("maximum")

    for name in ("max_tokens", "max_completion_tokens"):
        assert bounds(name) == (1, 2**32 - 1)
    assert bounds("min_tokens") == (0, 2**32 - 1)
    assert bounds("top_k") == (-1, 2**32 - 1)
    assert bounds("seed") == (-(2**63), 2**63 - 1)  # exact, not the float 2**63
    assert bounds("temperature") == (0, 2)
    assert bounds("repetition_penalty") == (0.01, 2)
    assert request["messages"]["maxItems"] == 4096
    assert request["model"]["maxLength"] == 256
    stop_string, stop_list, _null = request["stop"]["anyOf"]
    assert stop_list["maxItems"] == 16 and stop_string["maxLength"] == 256
    legacy = schemas["CompletionRequest"]["properties"]
    assert legacy["stop"]["anyOf"][1]["maxItems"] == 16
    content = schemas["ChatMessage"]["properties"]["content"]["anyOf"]
    assert content[0]["maxLength"] == MAX_TEXT_CHARS and content[1]["maxItems"] == 256
