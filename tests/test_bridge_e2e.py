"""End to end over real processes: model-server(s) → http-bridge (uvicorn) → the openai SDK.

Nothing is mocked. Every server is the installed console script on loopback, serving the tiny
random Llama (``tiny_model_dir``). Replies are random text, so tests check shapes, counts and
statuses, not wording.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from procs import (
    Proc,
    free_port,
    spawn_bridge,
    spawn_model_server,
    start_bridge,
    wait_serving,
    wait_until,
)

LONG = {"max_tokens": 400, "extra_body": {"ignore_eos": True}}  # ~seconds of tokens
LONG_RAW = {"max_tokens": 400, "ignore_eos": True}
HI = [{"role": "user", "content": "Hi!"}]


def running(server: Proc) -> float:
    return server.metrics().get("glmserve_requests_running", -1.0)


def finished(server: Proc) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("glmserve_requests_total"))


def sse_data(line: str) -> str | None:
    return line[len("data: ") :] if line.startswith("data: ") else None


@pytest.fixture(scope="module")
def main(tiny_server: Proc) -> Proc:
    """The model server most tests share (the session's: a start costs seconds)."""
    return tiny_server


@pytest.fixture(scope="module")
def spare_slot() -> Iterator[dict]:
    """A second backend's port; the recovery test starts it there, the round-robin test kills
    it. Sharing it saves a model-server start (the slowest part of these tests)."""
    slot: dict = {"port": free_port(), "proc": None}
    yield slot
    if slot["proc"] is not None:
        slot["proc"].stop(signal.SIGKILL)


def spawn_spare(slot: dict, model_dir: Path) -> Proc:
    """One request at a time and no queue, so a second concurrent request is a 429."""
    slot["proc"] = spawn_model_server(
        str(model_dir), "--max-num-seqs", "1", "--max-waiting", "0", port=slot["port"], wait=False
    )
    return slot["proc"]


@pytest.fixture(scope="module")
def bridge(main: Proc) -> Iterator[Proc]:
    with start_bridge("--backend", main.target, "--no-ui") as b:
        yield b


@pytest.fixture(scope="module")
def client(bridge: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=bridge.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_models(client: openai.OpenAI, model_id: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model_id]
    assert models.data[0].owned_by == "glmserve" and models.data[0].object == "model"
    assert client.models.retrieve(model_id).id == model_id
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"


def test_non_stream(client: openai.OpenAI, model_id: str) -> None:
    completion = client.chat.completions.create(
        model=model_id,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Hello"}]},
        ],
        max_completion_tokens=6,
        temperature=0.7,
        top_p=0.9,
        seed=7,
        stop=["\n\n"],
        user="user-1",
        extra_body={"ignore_eos": True, "top_k": 50, "min_tokens": 6},
    )
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion" and completion.model == model_id
    assert abs(completion.created - time.time()) < 60
    (choice,) = completion.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("length", "stop") and choice.logprobs is None
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0
    assert usage.completion_tokens == 6 or choice.finish_reason == "stop"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert 0 <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    # The SDK's own message object goes back into the conversation as-is.
    follow_up = client.chat.completions.create(
        model=model_id,
        messages=[*HI, choice.message, {"role": "user", "content": "And?"}],
        max_tokens=2,
    )
    assert follow_up.usage is not None and follow_up.usage.prompt_tokens > usage.prompt_tokens


def test_the_next_turn_reports_the_conversation_so_far_as_cached(
    client: openai.OpenAI, model_id: str
) -> None:
    """usage.prompt_tokens_details.cached_tokens: what the model server's prefix cache held."""
    turn = [{"role": "user", "content": "Cached tokens, turn one: list some colours."}]
    first = client.chat.completions.create(model=model_id, messages=turn, max_tokens=8)
    turn += [first.choices[0].message, {"role": "user", "content": "And turn two?"}]
    second = client.chat.completions.create(model=model_id, messages=turn, max_tokens=2)
    assert first.usage is not None and second.usage is not None
    assert second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    # At least turn one's prompt in full blocks of 16 (the random reply need not re-tokenize
    # to the tokens it was generated as), never the last token, which is always computed.
    assert first.usage.prompt_tokens >= 16
    assert first.usage.prompt_tokens // 16 * 16 <= cached < second.usage.prompt_tokens


def test_same_seed_same_reply(client: openai.OpenAI, model_id: str) -> None:
    def reply() -> str:
        c = client.chat.completions.create(
            model=model_id, messages=HI, max_tokens=5, seed=123, temperature=1.0
        )
        return c.choices[0].message.content or ""

    assert reply() == reply()


async def test_async_stream_n2_include_usage(bridge: Proc, model_id: str) -> None:
    client = openai.AsyncOpenAI(base_url=bridge.url + "/v1", api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(
        model=model_id,
        messages=HI,
        n=2,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [chunk async for chunk in stream]
    await client.close()
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" and c.model == model_id for c in chunks)
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert [ch.finish_reason for ch in mine if ch.finish_reason] == ["length"]
        assert mine[-1].finish_reason == "length"  # nothing after the finish chunk
        assert "".join(ch.delta.content or "" for ch in mine)  # some text
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 10  # 2 choices x max_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + 10
    details = last.usage.prompt_tokens_details
    assert details is not None and 0 <= (details.cached_tokens or 0) < last.usage.prompt_tokens
    assert all(c.usage is None for c in body)


def test_stream_wire_format(bridge: Proc, model_id: str) -> None:
    """The raw SSE: data lines only, first role chunk, no usage key without include_usage."""
    body = {"model": model_id, "messages": HI, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", bridge.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(sse_data(e)) for e in events[:-2]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" not in p for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_errors_through_the_sdk(client: openai.OpenAI, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model_id, messages=HI, tools=[{"type": "function", "function": {"name": "a b"}}]
        )
    assert err.value.param == "tools[0].function.name"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_id, messages=HI, logit_bias={"1": 5})
    assert err.value.param == "logit_bias"
    # Checked by the model server (it knows the context length), mapped to OpenAI's 400, which
    # names the field the client sent.
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model_id, messages=HI, max_completion_tokens=100_000)
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "max_completion_tokens")
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2)
    assert err.value.code == "model_not_found"


def test_unknown_route_is_404_envelope(bridge: Proc) -> None:
    r = httpx.post(bridge.url + "/v1/embeddings", json={})
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_keys_cors_and_body_limit(main: Proc, model_id: str) -> None:
    env = {"GLMSERVE_API_KEYS": "env-key-1,env-key-2"}
    args = ["--backend", main.target, "--cors-origin", "http://ui.test", "--max-request-bytes"]
    with start_bridge(*args, "2000", env=env) as b:
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.get(b.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        bad = openai.OpenAI(base_url=b.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=model_id, messages=HI, max_tokens=2)
        good = openai.OpenAI(base_url=b.url + "/v1", api_key="env-key-2", max_retries=0)
        assert good.chat.completions.create(model=model_id, messages=HI, max_tokens=2).choices
        with pytest.raises(openai.APIStatusError) as err:
            good.chat.completions.create(
                model=model_id, messages=[{"role": "user", "content": "x" * 3000}]
            )
        assert err.value.status_code == 413 and err.value.code == "request_too_large"
        preflight = httpx.options(
            b.url + "/v1/chat/completions",
            headers={
                "Origin": "http://ui.test",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://ui.test"


def test_client_disconnect_cancels_generation(bridge: Proc, main: Proc, model_id: str) -> None:
    body = {"model": model_id, "messages": HI, "stream": True, **LONG_RAW}
    with httpx.stream("POST", bridge.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        contents = 0
        for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                contents += 1
            if contents >= 3:
                break
        assert running(main) == 1
    # The connection is closed: bridge cancels the RPC, server aborts the generation.
    wait_until(lambda: running(main) == 0, 10, "glmserve_requests_running back to 0")
    wait_until(
        lambda: bridge.metrics().get("glmserve_bridge_streams_in_flight") == 0, 5, "no streams"
    )


def test_deadline_is_504_or_error_chunk(main: Proc, model_id: str) -> None:
    # 400 tokens of the tiny model take about a second on a quiet 2-core machine: the deadline
    # must sit well inside that (at 1 s a fast run finished first and nothing timed out).
    with start_bridge("--backend", main.target, "--request-timeout", "0.25") as b:
        sdk = openai.OpenAI(base_url=b.url + "/v1", api_key="unused")  # default: 2 retries
        with pytest.raises(openai.APIStatusError) as err:
            sdk.chat.completions.create(model=model_id, messages=HI, **LONG)
        assert err.value.status_code == 504 and err.value.code == "timeout"
        assert err.value.response.headers["x-should-retry"] == "false"
        key = 'route="/v1/chat/completions",status="504"'
        assert b.metrics()[f'glmserve_bridge_requests_total{{method="POST",{key}}}'] == 1
        wait_until(lambda: running(main) == 0, 10, "generation cancelled at the deadline")

        # Streaming: the deadline passes after the 200, so it arrives as an error chunk.
        body = {"model": model_id, "messages": HI, "stream": True, **LONG_RAW}
        with httpx.stream("POST", b.url + "/v1/chat/completions", json=body, timeout=30) as r:
            if r.status_code == 200:
                events = [sse_data(line) for line in r.iter_lines() if line]
                assert events[-1] == "[DONE]"
                assert json.loads(events[-2])["error"]["code"] == "timeout"
            else:  # a very slow machine: not even the first token within 0.25 s
                assert r.status_code == 504
        wait_until(lambda: running(main) == 0, 10, "stream cancelled at the deadline")


def test_bridge_metrics(bridge: Proc) -> None:
    m = bridge.metrics()
    ok = 'glmserve_bridge_requests_total{method="POST",route="/v1/chat/completions",status="200"}'
    assert m[ok] >= 3
    assert m['glmserve_bridge_time_to_first_token_seconds_count{stream="true"}'] >= 1
    assert m['glmserve_bridge_time_to_first_token_seconds_count{stream="false"}'] >= 1
    assert any(k.startswith("glmserve_bridge_request_duration_seconds_bucket") for k in m)
    assert m["glmserve_bridge_streams_in_flight"] == 0
    assert m["glmserve_bridge_backend_available"] == 1


def test_down_then_recovers_then_429(tiny_model_dir: Path, spare_slot: dict, model_id: str) -> None:
    """Bridge first, no backend: 503. The backend starts: served within seconds, no restart.
    That backend takes one request and queues none: a second concurrent one is a 429."""
    b = spawn_bridge("--backend", f"127.0.0.1:{spare_slot['port']}")
    try:
        sdk = openai.OpenAI(base_url=b.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            sdk.chat.completions.create(model=model_id, messages=HI, max_tokens=2)
        assert err.value.status_code == 503 and err.value.code == "backend_unavailable"
        assert err.value.response.headers["x-should-retry"] == "true"
        assert httpx.get(b.url + "/health").status_code == 503

        server = spawn_spare(spare_slot, tiny_model_dir)
        wait_serving(server)
        recovered = wait_until(
            lambda: httpx.get(b.url + "/health").status_code == 200, 10, "bridge sees backend"
        )
        assert recovered < 5
        assert sdk.chat.completions.create(model=model_id, messages=HI, max_tokens=2).choices
        assert b.metrics()["glmserve_bridge_backend_available"] == 1

        body = {"model": model_id, "messages": HI, "stream": True, **LONG_RAW}
        with httpx.stream("POST", b.url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            # Keep the iterator: dropping it would close the connection (and cancel the call).
            lines = r.iter_lines()
            assert sse_data(next(lines))  # the role chunk: the one slot is taken
            assert running(server) == 1
            busy = httpx.post(
                b.url + "/v1/chat/completions",
                json={"model": model_id, "messages": HI, "max_tokens": 2},
                timeout=30,
            )
            assert busy.status_code == 429, busy.text
            assert busy.json()["error"]["code"] == "rate_limit_exceeded"
            assert busy.headers["x-should-retry"] == "true"  # nothing ran
            with pytest.raises(openai.RateLimitError):
                sdk.chat.completions.create(model=model_id, messages=HI, max_tokens=2)
    finally:
        b.stop()


def test_round_robin_then_kill_one_mid_stream(
    main: Proc, spare_slot: dict, tiny_model_dir: Path, model_id: str
) -> None:
    spare = spare_slot["proc"] or spawn_spare(spare_slot, tiny_model_dir)
    wait_serving(spare)
    with start_bridge("--backend", main.target, "--backend", spare.target) as b:
        sdk = openai.OpenAI(base_url=b.url + "/v1", api_key="unused", max_retries=0)
        before = (finished(main), finished(spare))
        for _ in range(6):
            sdk.chat.completions.create(model=model_id, messages=HI, max_tokens=2)
        after = (finished(main), finished(spare))
        assert after[0] - before[0] >= 2 and after[1] - before[1] >= 2, (before, after)

        # Open long streams until one of them runs on `spare`.
        body = {"model": model_id, "messages": HI, "stream": True, **LONG_RAW}
        http = httpx.Client(timeout=60)
        opened = []
        readers = []  # dropping a line iterator would close its connection
        victim = None
        try:
            for _ in range(4):
                cm = http.stream("POST", b.url + "/v1/chat/completions", json=body)
                response = cm.__enter__()
                opened.append(cm)
                lines = response.iter_lines()
                readers.append(lines)
                assert sse_data(next(lines))  # the role chunk: generation has started
                if running(spare) == 1:
                    victim = lines
                    break
            assert victim is not None, "round robin never picked the second backend"
            spare.stop(signal.SIGKILL)
            rest = [sse_data(line) for line in victim if line]
            assert rest[-1] == "[DONE]"
            error = json.loads(rest[-2])["error"]
            assert error["code"] == "backend_unavailable" and error["message"]
        finally:
            for cm in opened:
                cm.__exit__(None, None, None)
            http.close()
        # The dead backend is skipped: everything now lands on `main`, without errors.
        for _ in range(4):
            assert sdk.chat.completions.create(model=model_id, messages=HI, max_tokens=2).choices
        assert httpx.get(b.url + "/health").status_code == 200


def test_many_concurrent_requests(bridge: Proc, model_id: str) -> None:
    """Parallel async clients share the one channel; each gets its own complete answer."""

    async def run() -> list[int]:
        client = openai.AsyncOpenAI(base_url=bridge.url + "/v1", api_key="unused", max_retries=0)
        try:
            results = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=model_id, messages=HI, max_tokens=3, extra_body={"ignore_eos": True}
                    )
                    for _ in range(8)
                )
            )
        finally:
            await client.close()
        return [r.usage.completion_tokens for r in results if r.usage]

    assert asyncio.run(run()) == [3] * 8


def test_one_structured_log_line_per_api_request(main: Proc) -> None:
    """info: one key=value line per /v1 request (with the completion id); probes are quiet."""
    with start_bridge("--backend", main.target, "--no-ui") as b:
        httpx.get(b.url + "/health", timeout=10)
        client = openai.OpenAI(base_url=b.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="", messages=HI, max_tokens=3)
        wait_until(lambda: f"request_id={reply.id}" in b.log_text(), what="the access line")
        lines = [line for line in b.log_text().splitlines() if "http_bridge.access" in line]
        assert len(lines) == 1, lines
        assert "method=POST path=/v1/chat/completions status=200 duration_ms=" in lines[0]
        assert "/health" not in b.log_text() and "Uvicorn running" not in b.log_text()
    with start_bridge("--backend", main.target, "--no-ui", "--log-format", "json") as b:
        httpx.get(b.url + "/v1/models", timeout=10)
        wait_until(lambda: "http_bridge.access" in b.log_text(), what="a JSON access line")
        doc = next(
            json.loads(line) for line in b.log_text().splitlines() if "http_bridge.access" in line
        )
        assert doc["path"] == "/v1/models" and doc["status"] == 200 and doc["level"] == "info"
