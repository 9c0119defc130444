"""Per-key limits over real processes: model-server → http-bridge (uvicorn) → openai SDK / httpx.

Nothing is mocked. Chat completions and completions are limited alike, from one budget per key.
The concurrency tests freeze the model server (SIGSTOP) so that admitted requests stay open for
as long as the test needs, whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from procs import Proc, start_bridge

from http_bridge.app import create_app
from http_bridge.limits import LIMITED_PATHS
from http_bridge.settings import Settings

KEY_A, KEY_B, KEY_C, KEY_D = "sk-limits-a", "sk-limits-b", "sk-limits-c", "sk-limits-d"
HI = [{"role": "user", "content": "Hi!"}]
PATH = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
REQUEST_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
)
TOKEN_HEADERS = tuple(h.replace("requests", "tokens") for h in REQUEST_HEADERS)


@pytest.fixture(scope="module")
def server(tiny_server: Proc) -> Proc:
    return tiny_server


@pytest.fixture(scope="module")
def keyed(server: Proc) -> Iterator[Proc]:
    """Four keys, 5 requests a minute and 2 open requests each."""
    args = ("--backend", server.target, "--no-ui", "--rate-limit", "5/minute")
    keys = ",".join((KEY_A, KEY_B, KEY_C, KEY_D))
    env = {"GLMSERVE_API_KEYS": keys, "GLMSERVE_MAX_CONCURRENT_PER_KEY": "2"}
    with start_bridge(*args, env=env) as b:
        yield b


@pytest.fixture(scope="module")
def model_id(keyed: Proc) -> str:
    return sdk(keyed, KEY_A).models.list().data[0].id


def sdk(bridge: Proc, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=bridge.url + "/v1", api_key=key, max_retries=0)


def body(model: str, **extra: object) -> dict:
    return {"model": model, "messages": HI, "max_tokens": 2, **extra}


def completion(model: str, **extra: object) -> dict:
    """A /v1/completions body (the raw-prompt path: no chat template)."""
    return {"model": model, "prompt": "Hi!", "max_tokens": 2, **extra}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_429(response: httpx.Response, limit: str, kind: str = "requests") -> None:
    """A 429 in the OpenAI envelope with Retry-After and the x-ratelimit headers of ``kind``."""
    assert response.status_code == 429, response.text
    err = response.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded", err
    assert 1 <= int(response.headers["retry-after"]) <= 60
    names = REQUEST_HEADERS if kind == "requests" else TOKEN_HEADERS
    assert all(h in response.headers for h in names), response.headers
    assert response.headers[names[0]] == limit
    if kind == "tokens":
        assert response.headers[names[1]] == "0"


def test_request_rate_is_per_api_key(keyed: Proc, model_id: str) -> None:
    client_a = sdk(keyed, KEY_A)
    remaining = []
    for _ in range(5):
        raw = client_a.chat.completions.with_raw_response.create(**body(model_id))
        assert raw.headers["x-ratelimit-limit-requests"] == "5"
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert raw.parse().choices[0].finish_reason == "length"
    assert remaining == [4, 3, 2, 1, 0]

    with pytest.raises(openai.RateLimitError) as caught:
        client_a.chat.completions.create(**body(model_id))
    assert caught.value.code == "rate_limit_exceeded"
    assert_429(caught.value.response, "5")
    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"

    # Key A's exhaustion is key A's alone.
    reply = sdk(keyed, KEY_B).chat.completions.create(**body(model_id))
    assert reply.choices[0].message.content is not None

    # Only generation is limited; the rest answers A without x-ratelimit headers.
    for path in ("/health", "/metrics", "/v1/models"):
        r = httpx.get(keyed.url + path, headers=auth(KEY_A), timeout=10)
        assert r.status_code == 200, (path, r.text)
        assert "x-ratelimit-limit-requests" not in r.headers


def test_request_rate_is_per_ip_without_keys(server: Proc) -> None:
    with start_bridge("--backend", server.target, "--no-ui", "--rate-limit", "2/minute") as b:
        client = sdk(b)
        model = client.models.list().data[0].id
        for _ in range(2):
            client.chat.completions.create(**body(model))
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(**body(model))
        assert_429(caught.value.response, "2")
        # uvicorn trusts X-Forwarded-For from loopback: another client IP, its own budget.
        other = httpx.post(
            b.url + PATH, json=body(model), headers={"x-forwarded-for": "10.1.2.3"}, timeout=30
        )
        assert other.status_code == 200, other.text
        assert other.headers["x-ratelimit-remaining-requests"] == "1"


async def _admitted(
    client: httpx.AsyncClient, key: str, model: str, path: str = PATH
) -> asyncio.Task:
    """A request of ``key`` to ``path`` that the bridge admitted (it hangs on the frozen
    server): retried while the answer is a 429, for up to 10 s."""
    payload = completion(model) if path == COMPLETIONS else body(model)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        task = asyncio.ensure_future(client.post(path, json=payload, headers=auth(key)))
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done:
            return task
        assert_429(task.result(), "5")
        await asyncio.sleep(0.1)
    raise AssertionError(f"no slot freed for {key} within 10 s")


def test_concurrent_requests_per_key(keyed: Proc, server: Proc, model_id: str) -> None:
    stream = body(model_id, stream=True, max_tokens=400, ignore_eos=True)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=keyed.url, timeout=60) as client:
            streams = []
            for _ in range(2):
                request = client.build_request("POST", PATH, json=stream, headers=auth(KEY_C))
                streams.append(await client.send(request, stream=True))
                assert streams[-1].status_code == 200
                assert streams[-1].headers["x-ratelimit-remaining-requests"] == str(
                    5 - len(streams)
                )
            server.proc.send_signal(signal.SIGSTOP)  # both streams now stay open
            try:
                third = openai.AsyncOpenAI(
                    base_url=keyed.url + "/v1", api_key=KEY_C, max_retries=0, timeout=10
                )
                with pytest.raises(openai.RateLimitError) as caught:
                    await third.chat.completions.create(**body(model_id))
                assert_429(caught.value.response, "5")
                assert "concurrent" in caught.value.message
                other_key = asyncio.ensure_future(
                    client.post(PATH, json=body(model_id), headers=auth(KEY_B))
                )
                await streams[0].aclose()  # the client leaves: its slot frees
                again = await _admitted(client, KEY_C, model_id)
            finally:
                server.proc.send_signal(signal.SIGCONT)
            for response in (await other_key, await again):
                assert response.status_code == 200, response.text
            await streams[1].aclose()

    asyncio.run(run())


def test_token_rate(server: Proc) -> None:
    args = ("--backend", server.target, "--no-ui", "--token-rate-limit", "60/minute")
    with start_bridge(*args) as b:
        client = sdk(b)
        model = client.models.list().data[0].id
        # Streams charge too: prompt once plus every choice's completion tokens.
        with client.chat.completions.create(
            **body(model, max_tokens=5, n=2, stream=True, stream_options={"include_usage": True})
        ) as chunks:
            usage = [c.usage for c in chunks if c.usage][0]
        assert usage.completion_tokens == 10
        charged = usage.total_tokens
        while charged < 60:  # a non-stream reply is charged before its headers leave
            raw = client.chat.completions.with_raw_response.create(**body(model))
            charged += raw.parse().usage.total_tokens
            assert raw.headers["x-ratelimit-limit-tokens"] == "60"
            assert raw.headers["x-ratelimit-remaining-tokens"] == str(max(0, 60 - charged))
            assert "x-ratelimit-limit-requests" not in raw.headers  # no request rate set
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(**body(model))
        assert_429(caught.value.response, "60", kind="tokens")
        assert "tokens" in caught.value.message


def test_completions_share_the_request_rate(server: Proc) -> None:
    """/v1/completions is limited as chat is, streaming or not, from the same budget per key
    (keys here are client IPs: uvicorn trusts X-Forwarded-For from loopback)."""
    with start_bridge("--backend", server.target, "--no-ui", "--rate-limit", "1/minute") as b:
        model = sdk(b).models.list().data[0].id

        def client(ip: str) -> openai.OpenAI:
            return openai.OpenAI(
                base_url=b.url + "/v1",
                api_key="unused",
                max_retries=0,
                default_headers={"x-forwarded-for": ip},
            )

        # Completions alone: the second call in the window is refused.
        only = client("10.0.0.1")
        raw = only.completions.with_raw_response.create(**completion(model))
        assert raw.headers["x-ratelimit-remaining-requests"] == "0"
        assert raw.parse().choices[0].text is not None
        with pytest.raises(openai.RateLimitError) as caught:
            only.completions.create(**completion(model))
        assert_429(caught.value.response, "1")
        with pytest.raises(openai.RateLimitError) as caught:
            only.completions.create(**completion(model, stream=True))
        assert_429(caught.value.response, "1")

        # A request that cannot generate (a GET: 405) spends nothing.
        for path in ("/v1/completions", "/v1/chat/completions"):
            wrong = httpx.get(b.url + path, headers={"x-forwarded-for": "10.0.0.4"})
            assert wrong.status_code == 405
        client("10.0.0.4").completions.create(**completion(model))

        # One budget for both routes, in either order, streams included.
        chat_first = client("10.0.0.2")
        chat_first.chat.completions.create(**body(model))
        with pytest.raises(openai.RateLimitError) as caught:
            chat_first.completions.create(**completion(model, stream=True))
        assert_429(caught.value.response, "1")
        completions_first = client("10.0.0.3")
        with completions_first.completions.create(**completion(model, stream=True)) as chunks:
            assert [c for c in chunks]
        with pytest.raises(openai.RateLimitError) as caught:
            completions_first.chat.completions.create(**body(model))
        assert_429(caught.value.response, "1")


def test_completions_streams_hold_a_concurrency_slot(
    keyed: Proc, server: Proc, model_id: str
) -> None:
    """Key D: two open completions streams fill its 2 slots (for chat too); a stream frees its
    slot when the client leaves and when it ends."""
    stream = completion(model_id, stream=True, max_tokens=400, ignore_eos=True)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=keyed.url, timeout=60) as client:
            streams = []
            for _ in range(2):
                request = client.build_request(
                    "POST", COMPLETIONS, json=stream, headers=auth(KEY_D)
                )
                streams.append(await client.send(request, stream=True))
                assert streams[-1].status_code == 200
            server.proc.send_signal(signal.SIGSTOP)  # both streams now stay open
            try:
                third = openai.AsyncOpenAI(
                    base_url=keyed.url + "/v1", api_key=KEY_D, max_retries=0, timeout=10
                )
                with pytest.raises(openai.RateLimitError) as caught:
                    await third.completions.create(**completion(model_id))
                assert_429(caught.value.response, "5")
                assert "concurrent" in caught.value.message
                refused = await client.post(PATH, json=body(model_id), headers=auth(KEY_D))
                assert_429(refused, "5")
                await streams[0].aclose()  # the client leaves: its slot frees
                again = await _admitted(client, KEY_D, model_id, COMPLETIONS)
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert (await again).status_code == 200
            async for _ in streams[1].aiter_bytes():  # this one runs to its end
                pass
            await streams[1].aclose()
            # Both slots are free again: two more requests are admitted (the 5th and 6th of
            # key D's 5 a minute would be refused, so this is also the last the rate allows).
            server.proc.send_signal(signal.SIGSTOP)
            try:
                pending = [await _admitted(client, KEY_D, model_id, COMPLETIONS) for _ in range(2)]
            finally:
                server.proc.send_signal(signal.SIGCONT)
            for response in await asyncio.gather(*pending):
                assert response.status_code == 200, response.text

    asyncio.run(run())


def test_token_rate_charges_completions(server: Proc) -> None:
    """Completions are charged as chat is: each distinct prompt once, plus every choice's
    completion tokens (as the reply's usage counts them), and over the limit both are refused."""
    args = ("--backend", server.target, "--no-ui", "--token-rate-limit", "60/minute")
    with start_bridge(*args) as b:
        client = sdk(b)
        model = client.models.list().data[0].id
        prompts = ["Hi!", "Once upon a time"]
        with client.completions.create(
            **completion(
                model,
                prompt=prompts,
                n=2,
                max_tokens=3,
                stream=True,
                stream_options={"include_usage": True},
            )
        ) as chunks:
            usage = [c.usage for c in chunks if c.usage][0]
        assert usage.completion_tokens == 12
        charged = usage.total_tokens
        raw = client.completions.with_raw_response.create(**completion(model, prompt=prompts))
        charged += raw.parse().usage.total_tokens
        assert raw.headers["x-ratelimit-limit-tokens"] == "60"
        assert raw.headers["x-ratelimit-remaining-tokens"] == str(max(0, 60 - charged))
        while charged < 60:
            raw = client.completions.with_raw_response.create(**completion(model))
            charged += raw.parse().usage.total_tokens
            assert raw.headers["x-ratelimit-remaining-tokens"] == str(max(0, 60 - charged))
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(**completion(model))
        assert_429(caught.value.response, "60", kind="tokens")
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(**body(model))
        assert_429(caught.value.response, "60", kind="tokens")


def test_every_generating_route_is_limited() -> None:
    """Every POST route generates today, and each must be limited: a new one (or a new route
    that does not generate) fails here until LIMITED_PATHS says which it is."""
    paths = create_app(Settings()).openapi()["paths"]
    assert {path for path, ops in paths.items() if "post" in ops} == LIMITED_PATHS


@pytest.mark.parametrize("rate", ["5/fortnight", "five/minute", ""])
def test_a_bad_rate_stops_the_bridge_at_startup(rate: str) -> None:
    with pytest.raises(ValueError, match="--token-rate-limit"):
        create_app(Settings(token_rate_limit=rate))
