"""The bridge's raw JSON against OpenAI's own schemas (JSON Schema 2020-12, jsonschema).

Real processes (``model-server`` on the tiny random Llama, ``http-bridge``), raw bodies via
httpx (the openai SDK would coerce them), every response, stream chunk and error envelope
validated against ``tests/openai_schemas/openai_chat_schemas.json``: the closure of the
``CreateChatCompletionResponse``, ``CreateChatCompletionStreamResponse``, ``ListModelsResponse``,
``Model`` and ``ErrorResponse`` schemas of the OpenAPI document in ``../shared``, extracted by
``tests/openai_schemas/extract.py`` and committed (a clean clone may not have the YAML).

One thing the spec does not describe: an error after a stream has started. The OpenAPI document
has no error event for chat-completion streams, but the official SDK's ``Stream`` raises
``openai.APIError`` on any SSE ``data`` whose JSON has an ``error`` key, so that is what the
bridge sends, and it is checked here as an ``ErrorResponse`` (the shape the SDK reads from it).
"""

from __future__ import annotations

import importlib.util
import json
import signal
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from procs import Proc, free_port, start_bridge, start_model_server

HERE = Path(__file__).resolve().parent
SCHEMAS_DIR = HERE / "openai_schemas"
SCHEMAS = SCHEMAS_DIR / "openai_chat_schemas.json"
SPEC = HERE.parent.parent / "shared" / "openai-openapi.yaml"  # repo root's sibling "shared"

HI = [{"role": "user", "content": "Hi!"}]
CHAT = "/v1/chat/completions"
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"], "additionalProperties": False}  # fmt: skip
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": ADD}}]
SHORT = {"type": "object", "properties": {"k": {"type": "string", "maxLength": 5}},
         "required": ["k"]}  # fmt: skip
FORMAT = {"type": "json_schema", "json_schema": {"name": "x", "schema": SHORT}}
ONE_CALL = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}


# ---- schema helpers ------------------------------------------------------------------------


@cache
def validator(name: str) -> Draft202012Validator:
    """A validator for ``components.schemas.<name>``, with format checking on.

    The formats in these schemas are ``unixtime`` (unknown to jsonschema, so ignored), ``uri``
    and ``date``; none can reject what the bridge sends, so the check costs nothing.
    """
    document = json.loads(SCHEMAS.read_text(encoding="utf-8"))
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def assert_valid(name: str, instance: Any) -> None:
    """Fail with every violation (path, message) when ``instance`` does not match ``name``."""
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  at {list(e.absolute_path)}: {e.message}" for e in errors]
        pytest.fail(f"not a valid {name}:\n" + "\n".join(lines) + f"\n{json.dumps(instance)}")


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """An HTTP error: the status, a JSON ErrorResponse, and (optionally) its code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert_valid("ErrorResponse", body)
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def sse_payloads(lines: Iterator[str]) -> tuple[list[Any], bool]:
    """The JSON of every ``data:`` event and whether ``data: [DONE]`` ended the stream."""
    payloads: list[Any] = []
    done = False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), f"not a data line: {line!r}"
        assert not done, "data after [DONE]"
        data = line[len("data: ") :]
        if data == "[DONE]":
            done = True
        else:
            payloads.append(json.loads(data))
    return payloads, done


def _load_extractor() -> Any:
    spec = importlib.util.spec_from_file_location(
        "openai_schemas_extract", SCHEMAS_DIR / "extract.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- processes -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_server: Proc) -> Proc:
    """The model server most tests share (the session's: a start costs seconds)."""
    return tiny_server


@pytest.fixture(scope="module")
def bridge(server: Proc) -> Iterator[Proc]:
    with start_bridge("--backend", server.target, "--no-ui") as b:
        yield b


@pytest.fixture(scope="module")
def http(bridge: Proc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=bridge.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def model_id(http: httpx.Client) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]


def stream(http: httpx.Client, body: dict) -> tuple[list[Any], bool]:
    with http.stream("POST", CHAT, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_payloads(r.iter_lines())


# ---- the schema file itself ----------------------------------------------------------------


def test_committed_schemas_match_the_spec() -> None:
    """``openai_chat_schemas.json`` is exactly what extract.py makes of ``../shared``'s YAML."""
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} is absent (not part of this repo): cannot check the extraction")
    extractor = _load_extractor()
    fresh = extractor.render(extractor.extract(SPEC))
    assert fresh == SCHEMAS.read_text(encoding="utf-8"), (
        "tests/openai_schemas/openai_chat_schemas.json is stale: run "
        ".venv/bin/python tests/openai_schemas/extract.py"
    )


def test_schemas_are_valid_2020_12() -> None:
    document = json.loads(SCHEMAS.read_text(encoding="utf-8"))
    for name in document["roots"]:
        validator(name)  # check_schema raises on an invalid schema
    assert "nullable" not in keys(document["components"]), "an OpenAPI nullable was not translated"


def test_schemas_have_teeth() -> None:
    """Deviations the bridge could plausibly make are rejected (so passing means something)."""
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": None, "logprobs": None}],
        "usage": None,
    }
    assert_valid("CreateChatCompletionStreamResponse", chunk)  # nullable fields, translated
    bad_chunks = [
        {**chunk, "object": "chat.completion"},
        {**chunk, "created": "1"},
        {**chunk, "choices": [{"index": 0, "delta": {}}]},  # finish_reason is required
        {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "eos"}]},
        {**chunk, "choices": [{"index": 0, "delta": {"role": "bot"}, "finish_reason": None}]},
        {**chunk, "usage": {"prompt_tokens": 1}},
    ]
    stream_validator = validator("CreateChatCompletionStreamResponse")
    for bad in bad_chunks:
        assert not stream_validator.is_valid(bad), bad
    error = {"message": "m", "type": "t", "param": None, "code": None}
    assert_valid("ErrorResponse", {"error": error})
    for bad in ({"error": {"message": "m", "type": "t"}}, {"message": "m"}, {"detail": "x"}):
        assert not validator("ErrorResponse").is_valid(bad), bad
    message = {"role": "assistant", "content": "x"}  # refusal is required (nullable)
    response = {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
    }
    assert not validator("CreateChatCompletionResponse").is_valid(response)
    assert not validator("Model").is_valid({"id": "m", "object": "model", "created": 1})


def keys(node: Any) -> set[str]:
    """Every object key anywhere in ``node``."""
    if isinstance(node, dict):
        return set(node).union(*(keys(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(keys(v) for v in node))
    return set()


# ---- successes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"max_tokens": 4},
        {"max_tokens": 3, "n": 2, "seed": 1},
        {"max_tokens": 8, "stop": ["\n", "."], "temperature": 0.5},
        {"max_tokens": 5, "ignore_eos": True},
        {"max_tokens": 4, "logprobs": True, "top_logprobs": 2},
        {"max_tokens": 200, **ONE_CALL},
        {"max_tokens": 60, "response_format": FORMAT},
    ],
    ids=["plain", "n2", "stop", "length", "logprobs", "tools", "json_schema"],
)
def test_non_stream(http: httpx.Client, model_id: str, extra: dict) -> None:
    r = http.post(CHAT, json={"model": model_id, "messages": HI, **extra})
    assert r.status_code == 200, r.text
    body = r.json()
    assert_valid("CreateChatCompletionResponse", body)
    assert [c["index"] for c in body["choices"]] == list(range(extra.get("n", 1)))
    if extra.get("ignore_eos"):
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize(
    "extra",
    [
        {"max_tokens": 4},
        {"max_tokens": 4, "ignore_eos": True, "stream_options": {"include_usage": True}},
        {"max_tokens": 3, "n": 2, "stream_options": {"include_usage": True}},
        {"max_tokens": 3, "n": 2, "stop": "\n"},
        {"max_tokens": 4, "logprobs": True, "top_logprobs": 2},
        {"max_tokens": 200, **ONE_CALL},
    ],
    ids=["plain", "usage", "n2-usage", "n2-stop", "logprobs", "tools"],
)
def test_stream_chunks(http: httpx.Client, model_id: str, extra: dict) -> None:
    chunks, done = stream(http, {"model": model_id, "messages": HI, **extra})
    assert done
    for chunk in chunks:
        assert_valid("CreateChatCompletionStreamResponse", chunk)
    n = extra.get("n", 1)
    # The kinds of chunk the schema must accept were really all seen.
    roles = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
    finishes = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(roles) == n and len(finishes) == n
    if extra.get("stream_options"):
        last = chunks[-1]
        assert last["choices"] == [] and last["usage"]["total_tokens"] > 0
        assert all(c["usage"] is None for c in chunks[:-1])
    else:
        assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize(
    "extra",
    [
        {"prompt": "Once upon a time", "max_tokens": 4},
        {"prompt": ["a", "b"], "n": 2, "max_tokens": 3, "logprobs": 2, "seed": 1},
        {"prompt": [1, 2, 3], "max_tokens": 3, "stop": "."},
        {"prompt": "Hello", "max_tokens": 3, "echo": True},
        {"prompt": "Hello there", "max_tokens": 0, "echo": True, "logprobs": 1},
        {"prompt": [1, 2, 3], "max_tokens": 2, "echo": True, "logprobs": 2},
    ],
    ids=["text", "batch-logprobs", "ids", "echo", "score-prompt", "echo-ids-logprobs"],
)
def test_completions(http: httpx.Client, model_id: str, extra: dict) -> None:
    r = http.post("/v1/completions", json={"model": model_id, **extra})
    assert r.status_code == 200, r.text
    assert_valid("CreateCompletionResponse", spec_nulls(r.json()))
    body = {"model": model_id, **extra, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as s:
        assert s.status_code == 200, s.read()
        chunks, done = sse_payloads(s.iter_lines())
    assert done and chunks[-1]["usage"]["total_tokens"] > 0
    finishes = 0
    for chunk in chunks:  # the spec streams CreateCompletionResponse objects...
        for choice in chunk["choices"]:
            if choice["finish_reason"] is None:  # ...but OpenAI sends null until the end
                choice["finish_reason"] = "length"
            else:
                finishes += 1
        assert_valid("CreateCompletionResponse", spec_nulls(chunk))
    assert finishes == len(r.json()["choices"])


def spec_nulls(completion: dict) -> dict:
    """The echoed prompt's first token has ``null`` in ``token_logprobs`` and
    ``top_logprobs``, as OpenAI and vLLM send it (nothing precedes it); the spec's schema has no
    null there. Only that entry is translated (to 0 and {}), so every other value is checked."""
    for choice in completion["choices"]:
        lp = choice.get("logprobs")
        if lp and lp["token_logprobs"] and lp["token_logprobs"][0] is None:
            assert lp["top_logprobs"][0] is None and None not in lp["token_logprobs"][1:]
            lp["token_logprobs"][0], lp["top_logprobs"][0] = 0.0, {}
    return completion


def test_models(http: httpx.Client, model_id: str) -> None:
    listing = http.get("/v1/models")
    assert listing.status_code == 200
    assert_valid("ListModelsResponse", listing.json())
    one = http.get(f"/v1/models/{model_id}")
    assert one.status_code == 200, one.text
    assert_valid("Model", one.json())
    assert one.json() == listing.json()["data"][0]


# ---- errors --------------------------------------------------------------------------------


def test_error_envelopes(http: httpx.Client, model_id: str) -> None:
    ok = {"model": model_id, "messages": HI, "max_tokens": 2}
    assert assert_error(http.post(CHAT, json={**ok, "temperature": 5}), 400)["param"] == (
        "temperature"
    )
    assert_error(http.post(CHAT, json={**ok, "logit_bias": {"1": 5}}), 400, "unsupported_parameter")
    assert_error(http.post(CHAT, json={**ok, "tool_choice": "required"}), 400, "invalid_value")
    assert_error(http.post(CHAT, json={**ok, "messages": []}), 400)
    assert_error(
        http.post(CHAT, content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    # Checked by the model server (prompt + max_tokens beyond the context), mapped to OpenAI's.
    assert_error(
        http.post(CHAT, json={**ok, "max_tokens": 100_000}), 400, "context_length_exceeded"
    )
    assert_error(http.post(CHAT, json={**ok, "model": "gpt-4o"}), 404, "model_not_found")
    assert_error(http.post(CHAT, json={**ok, "stream": True, "model": "gpt-4o"}), 404)
    assert_error(http.get("/v1/models/no-such-model"), 404, "model_not_found")
    assert_error(http.post("/v1/embeddings", json={}), 404, "not_found")
    assert_error(http.get(CHAT), 405)


def test_error_envelopes_of_other_bridges(server: Proc, model_id: str) -> None:
    """401 and 413 (a bridge with a key and a body limit), 503 (a backend nobody listens on)."""
    ok = {"model": model_id, "messages": HI, "max_tokens": 2}
    args = ("--backend", server.target, "--no-ui", "--api-key", "k", "--max-request-bytes", "2000")
    with start_bridge(*args) as b:
        assert_error(httpx.get(b.url + "/v1/models"), 401, "invalid_api_key")
        wrong = {"Authorization": "Bearer nope"}
        assert_error(httpx.post(b.url + CHAT, json=ok, headers=wrong), 401, "invalid_api_key")
        key = {"Authorization": "Bearer k"}
        big = {**ok, "messages": [{"role": "user", "content": "x" * 3000}]}
        assert_error(httpx.post(b.url + CHAT, json=big, headers=key), 413, "request_too_large")
        assert httpx.post(b.url + CHAT, json=ok, headers=key, timeout=60).status_code == 200
    with start_bridge("--backend", f"127.0.0.1:{free_port()}", "--no-ui") as b:
        assert_error(httpx.post(b.url + CHAT, json=ok, timeout=30), 503, "backend_unavailable")
        assert_error(httpx.get(b.url + "/v1/models", timeout=30), 503, "backend_unavailable")
        health = httpx.get(b.url + "/health", timeout=30)  # minimal: no envelope, no addresses
        assert (health.status_code, health.json()) == (503, {"status": "unavailable"})


LONG = {"max_tokens": 400, "ignore_eos": True}


def test_error_chunk_when_the_backend_dies_mid_stream(tiny_model_dir: Path) -> None:
    """SIGKILL the (dedicated) model server mid-stream: ``data: {"error": ...}`` is an
    ErrorResponse, every chunk before it a valid chunk, then ``data: [DONE]``."""
    with (
        start_model_server(str(tiny_model_dir), metrics=False) as victim,
        start_bridge("--backend", victim.target, "--no-ui") as b,
        httpx.Client(base_url=b.url, timeout=60) as http,
    ):
        model = http.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "messages": HI, "stream": True, **LONG}
        with http.stream("POST", CHAT, json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            head = [next(lines) for _ in range(6)]  # role chunk + text: generation is running
            victim.stop(signal.SIGKILL)
            chunks, done = sse_payloads(iter([*head, *lines]))
    assert done
    *deltas, error = chunks
    assert len(deltas) >= 3
    for chunk in deltas:
        assert_valid("CreateChatCompletionStreamResponse", chunk)
    assert_valid("ErrorResponse", error)
    assert error["error"]["code"] == "backend_unavailable"


def test_error_chunk_at_the_deadline(server: Proc, model_id: str) -> None:
    """A deadline passing mid-stream is an error chunk too (or a 504, on a very slow machine)."""
    with (
        start_bridge("--backend", server.target, "--no-ui", "--request-timeout", "0.25") as b,
        httpx.Client(base_url=b.url, timeout=60) as http,
        http.stream(
            "POST", CHAT, json={"model": model_id, "messages": HI, "stream": True, **LONG}
        ) as r,
    ):
        if r.status_code != 200:
            r.read()
            assert_error(r, 504, "timeout")
            return
        chunks, done = sse_payloads(r.iter_lines())
    assert done
    *deltas, error = chunks
    for chunk in deltas:
        assert_valid("CreateChatCompletionStreamResponse", chunk)
    assert_valid("ErrorResponse", error)
    assert error["error"]["code"] == "timeout"
