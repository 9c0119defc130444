"""The load generator: closed-loop asyncio workers over the bridge (openai SDK) or gRPC.

Each level runs ``concurrency`` workers; a worker sends one streaming request, waits for its end
and takes the next prompt, until the level's prompts run out (or its time box passes). Every
request asks for a fixed-length reply (``ignore_eos`` + ``max_tokens``, temperature 0).

Per request we record the time to the first token (TTFT: from sending the request to the first
chunk with content; over gRPC, the first message carrying a token) and the inter-token latency
(ITL) samples. Over gRPC every message lists its ``token_ids``, so a gap is split exactly per
token. Through the bridge a token whose text is empty (held back as incomplete UTF-8, or a
special token under ``ignore_eos``) produces no chunk; when a request's ``usage`` says it got
``k`` tokens in ``m < k`` content chunks, its ``m - 1`` gaps are scaled by ``(m - 1) / (k - 1)``
so they stay per-token figures (``tokens_without_chunk`` in the results counts such tokens).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from glmserve.v1 import chat_pb2, chat_pb2_grpc

if TYPE_CHECKING:  # the gRPC path runs where the openai SDK is not installed (bench.gpu)
    from openai import AsyncOpenAI


@dataclass
class RequestResult:
    """What one request measured."""

    ok: bool = True
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens_without_chunk: int = 0
    seq: int = -1  # order of sending within the level (0 = first)


RequestFn = Callable[[str], Awaitable[RequestResult]]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _check_length(result: RequestResult, max_tokens: int) -> RequestResult:
    if result.ok and result.completion_tokens != max_tokens:
        result.ok = False
        result.error = f"got {result.completion_tokens} completion tokens, wanted {max_tokens}"
    return result


def bridge_request_fn(client: AsyncOpenAI, model: str, max_tokens: int) -> RequestFn:
    """One streaming chat completion through the bridge with the official SDK."""

    async def send(prompt: str) -> RequestResult:
        result = RequestResult()
        times: list[float] = []
        t0 = time.perf_counter()
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    result.prompt_tokens = chunk.usage.prompt_tokens
                    result.completion_tokens = chunk.usage.completion_tokens
                if any(c.delta.content for c in chunk.choices):
                    times.append(now)
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the level
            return RequestResult(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
        if times:
            result.ttft = times[0] - t0
        gaps = [b - a for a, b in zip(times, times[1:])]
        k, m = result.completion_tokens, len(times)
        if k > m >= 2:
            gaps = [g * (m - 1) / (k - 1) for g in gaps]
        result.tokens_without_chunk = max(0, k - m)
        result.itl = gaps
        return _check_length(result, max_tokens)

    return send


def grpc_request_fn(
    stub: chat_pb2_grpc.ChatServiceStub,
    model: str,
    max_tokens: int,
    timeout: float = 900.0,
    structured: chat_pb2.StructuredOutput | None = None,
) -> RequestFn:
    """One server-streaming glmserve.v1 ChatService.Chat call (``structured``: under that
    grammar, which must not end before ``max_tokens``, since a grammar excludes ignore_eos)."""

    async def send(prompt: str) -> RequestResult:
        result = RequestResult()
        request = chat_pb2.ChatRequest(
            model=model,
            messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content=prompt)],
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=structured is None,
            structured_output=structured,
        )
        t0 = time.perf_counter()
        last: float | None = None
        try:
            async for msg in stub.Chat(request, timeout=timeout):
                now = time.perf_counter()
                n = len(msg.token_ids)
                if n:
                    if last is None:
                        result.ttft = now - t0
                        n -= 1  # the first token's own wait is the TTFT
                    if n and last is not None:
                        result.itl += [(now - last) / n] * n
                    last = now
                if msg.HasField("usage"):
                    result.prompt_tokens = msg.usage.prompt_tokens
                    result.completion_tokens = msg.usage.completion_tokens
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "?"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            return RequestResult(ok=False, error=f"{code}: {details}"[:300])
        return _check_length(result, max_tokens)

    return send


async def run_level(
    send: RequestFn,
    prompts: list[str],
    concurrency: int,
    time_box: float | None = None,
    ramp: float = 0.0,
) -> tuple[list[RequestResult], float]:
    """Runs ``prompts`` through ``concurrency`` closed-loop workers; returns results and wall s.

    Worker k starts ``k * ramp / concurrency`` seconds in: users arrive spread over ``ramp``
    rather than in the same millisecond (with fixed-length replies a burst start would also
    keep every later wave in lockstep). With ``time_box`` no new request starts after that
    many seconds (running ones finish).
    """
    results: list[RequestResult] = []
    next_index = 0
    start = time.perf_counter()

    async def worker(k: int) -> None:
        nonlocal next_index
        await asyncio.sleep(k * ramp / concurrency)
        while next_index < len(prompts):
            if time_box is not None and time.perf_counter() - start > time_box:
                return
            index = next_index
            next_index += 1
            result = await send(prompts[index])
            result.seq = index
            results.append(result)

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return results, time.perf_counter() - start


async def run_interleaved(
    sends: list[RequestFn], prompts: list[str], time_box: float | None = None
) -> list[tuple[list[RequestResult], float]]:
    """Concurrency 1 over several transports, one request at a time, alternating: prompt i
    goes through every transport before prompt i+1 (the first transport rotates), so drifting
    machine load hits each alike. Returns, per transport, its results and summed durations."""
    out: list[tuple[list[RequestResult], float]] = [([], 0.0) for _ in sends]
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        if time_box is not None and time.perf_counter() - start > time_box:
            break
        for j in range(len(sends)):
            k = (i + j) % len(sends)
            t0 = time.perf_counter()
            result = await sends[k](prompt)
            result.seq = i
            results, spent = out[k]
            results.append(result)
            out[k] = (results, spent + time.perf_counter() - t0)
    return out


def summarize(
    name: str, kind: str, concurrency: int, results: list[RequestResult], wall: float
) -> dict[str, Any]:
    """One table row: aggregate throughput and latency percentiles (seconds)."""
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    # The first wave arrives as one burst of ``concurrency`` prompts at t=0; later requests
    # arrive one at a time as earlier ones finish: the steady state of that many users.
    steady = [r.ttft for r in ok if r.ttft is not None and r.seq >= concurrency]
    itls = [g for r in ok for g in r.itl]
    tokens = sum(r.completion_tokens for r in results)
    errors = [r.error for r in results if not r.ok]
    return {
        "name": name,
        "kind": kind,
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "error_samples": sorted(set(e or "" for e in errors))[:5],
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "completion_tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p95": percentile(ttfts, 95),
        "ttft_steady_p50": percentile(steady, 50),
        "ttft_steady_p95": percentile(steady, 95),
        "itl_p50": percentile(itls, 50),
        "itl_p95": percentile(itls, 95),
        "tokens_without_chunk": sum(r.tokens_without_chunk for r in ok),
    }
