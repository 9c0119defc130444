"""Scheduling over real gRPC: the KV budget, cancellation freeing cache, and a long mixed soak.

All against the installed ``model-server`` on loopback serving the tiny random Llama.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_client import chat_request, collect
from procs import Proc, start_model_server, wait_until

from glmserve.v1 import chat_pb2, chat_pb2_grpc

POOL = 400  # KV-cache tokens: 25 blocks of 16 (lanes with padding and spare room included)


def idle(server: Proc) -> bool:
    """Nothing queued or running, and the only KV memory held is the prefix cache's."""
    m = server.metrics()
    return (
        m["glmserve_requests_running"] == 0
        and m["glmserve_requests_waiting"] == 0
        and m["glmserve_kv_cache_blocks_used"] == m["glmserve_prefix_cache_blocks"]
    )


@pytest.fixture(scope="module")
def small_pool(tiny_model_dir: Path) -> Iterator[Proc]:
    # Backpressure off: a stream read more slowly than the tiny model writes would be paused
    # (its KV freed), and the pool would never run out (tests/test_backpressure.py has it).
    args = ("--kv-cache-tokens", str(POOL), "--no-prefix-caching", "--max-stream-backlog", "0")
    with start_model_server(str(tiny_model_dir), *args) as server:
        yield server


def test_request_that_can_never_fit_is_invalid_argument(small_pool):
    stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(small_pool.target))
    with pytest.raises(grpc.RpcError) as err:
        collect(stub.Chat(chat_request("hello", max_tokens=POOL), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details()
    assert f"max_tokens ({POOL})" in details and "holds 336 tokens" in details, details
    assert idle(small_pool)


def solo(stub: chat_pb2_grpc.ChatServiceStub, prompt: str, n: int) -> list[int]:
    _, msgs = collect(stub.Chat(chat_request(prompt, max_tokens=n, ignore_eos=True, temperature=0)))
    return [t for m in msgs for t in m.token_ids]


def test_pool_runs_out_the_youngest_is_preempted_and_resumes_without_a_seam(small_pool):
    """Nothing is reserved for max_tokens: both start at once. When the pool cannot hold
    both rows, the younger one is preempted, waits, is recomputed from its prompt plus what
    it already streamed, and its client gets exactly its solo tokens: no repeat, no gap."""
    import threading

    stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(small_pool.target))
    alone = solo(stub, "second", 150)
    first_alone = solo(stub, "first", 200)
    before = small_pool.metrics()
    first = stub.Chat(chat_request("first", max_tokens=200, ignore_eos=True, temperature=0))
    head = next(first)
    rest: list[chat_pb2.ChatResponse] = []
    reader = threading.Thread(target=lambda: rest.extend(first))
    reader.start()
    second = stub.Chat(chat_request("second", max_tokens=150, ignore_eos=True, temperature=0))
    got = [t for m in second for t in m.token_ids]
    reader.join(timeout=60)
    assert rest[-1].finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert rest[-1].usage.completion_tokens == 200
    assert [t for m in (head, *rest) for t in m.token_ids] == first_alone
    assert got == alone
    after = small_pool.metrics()
    assert after["glmserve_num_preemptions_total"] > before["glmserve_num_preemptions_total"]
    wait_until(lambda: idle(small_pool), what="idle")


def test_cancel_frees_slot_and_cache_at_once(small_pool):
    stub = chat_pb2_grpc.ChatServiceStub(grpc.insecure_channel(small_pool.target))
    call = stub.Chat(chat_request("go", max_tokens=250, ignore_eos=True, temperature=0))
    next(call)
    # The gauges are published right after the first token is sent: wait for them, not race.
    wait_until(
        lambda: small_pool.metrics()["glmserve_kv_cache_blocks_used"] > 0,
        what="the KV gauges to show the running request",
    )
    call.cancel()
    wait_until(lambda: idle(small_pool), timeout=5, what="gauges back to 0")
    assert small_pool.metrics()["glmserve_kv_cache_blocks_used"] == 0


PROMPTS = [
    "Hi",
    "Tell me about the sea",
    "一二三四五六七八九十 count on please",
    "A much longer prompt that goes on about many things " * 6,
]
MAX_TOKENS = 16


async def _one(
    stub: chat_pb2_grpc.ChatServiceStub, prompt: str, max_tokens: int, cancel_after: int | None
) -> list[int] | None:
    """Runs a greedy request; cancels it after ``cancel_after`` messages (None: never)."""
    call = stub.Chat(chat_request(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True))
    ids: list[int] = []
    seen = 0
    try:
        async for msg in call:
            if cancel_after is not None and seen >= cancel_after:
                call.cancel()
                return None
            ids += msg.token_ids
            seen += 1
    except asyncio.CancelledError:
        return None
    if cancel_after is not None and seen >= cancel_after:
        return None  # finished before we got round to cancelling
    return ids


def test_soak_mixed_requests_with_random_cancels(tiny_model_dir):
    """A few hundred requests, a quarter cancelled at random points: no cross-talk (every
    completed reply equals its solo greedy reply), no starvation (all finish), gauges back to
    0 and memory back near its baseline."""
    rng = random.Random(1234)
    with start_model_server(str(tiny_model_dir), "--max-num-seqs", "16") as server:
        rss = psutil.Process(server.proc.pid)

        async def run() -> None:
            async with grpc.aio.insecure_channel(server.target) as ch:
                stub = chat_pb2_grpc.ChatServiceStub(ch)
                solo = {p: await _one(stub, p, MAX_TOKENS, None) for p in PROMPTS}
                # Warm-up round so allocator pools and caches settle before the baseline.
                await asyncio.gather(*(_one(stub, p, MAX_TOKENS, None) for p in PROMPTS * 8))
                baseline = rss.memory_info().rss

                plan = []
                for _ in range(320):
                    prompt = rng.choice(PROMPTS)
                    n = rng.randint(1, MAX_TOKENS)
                    cancel = rng.choice([None, None, None, rng.randint(0, 4)])
                    plan.append((prompt, n, cancel))
                sem = asyncio.Semaphore(24)

                async def bounded(prompt: str, n: int, cancel: int | None):
                    async with sem:
                        await asyncio.sleep(rng.random() * 0.01)
                        return await _one(stub, prompt, n, cancel)

                results = await asyncio.wait_for(
                    asyncio.gather(*(bounded(*p) for p in plan)), timeout=240
                )
                completed = 0
                for (prompt, n, _), ids in zip(plan, results, strict=True):
                    if ids is not None:
                        assert ids == solo[prompt][:n], "a reply differs from its solo run"
                        completed += 1
                assert completed > 150

                await asyncio.to_thread(wait_until, lambda: idle(server), 10, "idle")
                grown = rss.memory_info().rss - baseline
                assert grown < 64 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB over the soak"
                # After the soak the server still answers like on its first request.
                assert await _one(stub, PROMPTS[1], MAX_TOKENS, None) == solo[PROMPTS[1]]

        asyncio.run(run())
        m = server.metrics()
        finished = sum(v for k, v in m.items() if k.startswith("glmserve_requests_total"))
        # solo + warm-up + soak + the last check: every request accounted for exactly once.
        assert finished == len(PROMPTS) + len(PROMPTS) * 8 + 320 + 1
        assert server.log_text().count("request done") == finished
        assert m['glmserve_requests_total{finish_reason="aborted"}'] > 30
