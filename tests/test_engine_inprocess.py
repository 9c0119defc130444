"""The engine in-process on the tiny model: prefix caching changes nothing but the work
done, preemption storms keep every token, and the watchdog ends streams of a dead engine."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from model_server.engine.engine import Engine, EngineConfig
from model_server.engine.types import EngineDeadError, GenerationRequest, SamplingParams
from model_server.models.base import ChatMessage
from model_server.models.registry import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir), torch.device("cpu"), "float32", None)


async def _generate(engine: Engine, prompt: list[int], n: int, rid: str) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    ids: list[int] = []
    async for out in engine.submit(GenerationRequest(rid, prompt, params)):
        assert out.error is None, out.error
        ids += out.token_ids
    return ids


async def _conversation(engine: Engine, tiny, turns: int) -> list[list[int]]:
    """A chat resent in full every turn, each reply appended verbatim (as chat UIs do)."""
    history: list[ChatMessage] = []
    replies = []
    for turn in range(turns):
        history.append(ChatMessage("user", f"Turn {turn}: tell me more about topic {turn * 7}"))
        ids = await _generate(engine, tiny.chat_format.render(history), 20, f"t{turn}")
        replies.append(ids)
        history.append(ChatMessage("assistant", tiny.tokenizer.decode(ids)))
    return replies


async def test_prefix_caching_gives_identical_greedy_output_and_hits_across_turns(tiny):
    results, hits = {}, {}
    for caching in (False, True):
        engine = Engine(tiny, EngineConfig(prefix_caching=caching, block_size=4))
        engine.start()
        try:
            results[caching] = await asyncio.wait_for(_conversation(engine, tiny, 5), 120)
            # A burst of the same system-prompted question: all but the first hit.
            prompt = tiny.chat_format.render([ChatMessage("user", "Same question")])
            burst = [_generate(engine, prompt, 8, f"b{i}") for i in range(4)]
            results[caching].extend(await asyncio.wait_for(asyncio.gather(*burst), 60))
        finally:
            engine.shutdown()
        hits[caching] = engine.scheduler.prefix_hits
    assert results[True] == results[False]
    assert hits[False] == 0
    # From turn 2 on, everything up to the previous reply is found in the cache.
    assert hits[True] > 0.5 * engine.scheduler.prefix_queries


async def test_the_next_turn_finds_the_previous_one_to_its_last_computed_token(tiny):
    """A reply rarely ends on a block boundary: its last, partial block is cached too, so the
    next turn recomputes only what is new (the reply's last token, which was sampled but
    never fed, and the new message) and still gets the tokens of no cache."""
    prompt = tiny.chat_format.render([ChatMessage("user", "Tell me about topic 3")])
    outputs, hits = {}, {}
    for caching in (False, True):
        engine = Engine(tiny, EngineConfig(prefix_caching=caching, block_size=8))
        engine.start()
        try:
            reply = await asyncio.wait_for(_generate(engine, prompt, 12, "first"), 60)
            computed = len(prompt) + len(reply) - 1
            assert computed % 8, "the test needs a reply that ends mid-block"
            before = engine.scheduler.prefix_hits
            follow = prompt + reply + prompt[-6:]
            outputs[caching] = await asyncio.wait_for(_generate(engine, follow, 6, "next"), 60)
            hits[caching] = engine.scheduler.prefix_hits - before
        finally:
            engine.shutdown()
    assert outputs[True] == outputs[False]
    assert hits == {False: 0, True: computed}


async def test_a_prefix_hit_does_not_evict_other_conversations_for_itself(tiny):
    """A follow-up turn finds its first 15 blocks cached. Caching its own blocks afterwards
    must make room for the new ones only, not for the hit again: in a 64-block pool, which
    holds the follow-up's lane and every cached block of both chats, the other chat (the
    least recently used) stays cached in full. (Making room for the hit's blocks a second
    time evicted a quarter of it in pools of 56 to 69 blocks.)"""
    engine = Engine(tiny, EngineConfig(block_size=4, kv_cache_tokens=64 * 4))
    engine.start()
    try:
        other = tiny.chat_format.render(
            [ChatMessage("user", "Other conversation about gardening and tomatoes")]
        )
        await asyncio.wait_for(_generate(engine, other, 4, "other"), 60)
        first = tiny.chat_format.render(
            [
                ChatMessage(
                    "user",
                    "A long first question about the history of the Roman empire and its "
                    "roads, bridges and aqueducts",
                )
            ]
        )
        reply = await asyncio.wait_for(_generate(engine, first, 12, "first"), 60)
        follow = first + reply + tiny.chat_format.render([ChatMessage("user", "and then?")])[-8:]
        before = engine.scheduler.prefix_hits
        await asyncio.wait_for(_generate(engine, follow, 4, "follow"), 60)
        assert engine.scheduler.prefix_hits - before == (len(first) + len(reply) - 1) // 4 * 4
        before = engine.scheduler.prefix_hits
        await asyncio.wait_for(_generate(engine, other, 4, "other again"), 60)
        assert engine.scheduler.prefix_hits - before == (len(other) - 1) // 4 * 4
        assert engine.scheduler.num_preemptions == 0
    finally:
        engine.shutdown()


async def test_preemption_storm_keeps_every_token(tiny):
    """A pool so small that 12 concurrent requests preempt each other over and over: every
    reply still equals its solo run, token for token."""
    prompts = [
        tiny.chat_format.render([ChatMessage("user", f"Question {i} " * (1 + i % 3))])
        for i in range(12)
    ]
    engine = Engine(tiny, EngineConfig(kv_cache_tokens=640, block_size=16, prefix_caching=False))
    engine.start()
    try:
        solo = [await _generate(engine, p, 150, f"s{i}") for i, p in enumerate(prompts)]
        together = await asyncio.wait_for(
            asyncio.gather(*(_generate(engine, p, 150, f"c{i}") for i, p in enumerate(prompts))),
            120,
        )
    finally:
        engine.shutdown()
    assert together == solo
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv.used_blocks() == 0


async def test_watchdog_ends_streams_when_a_step_hangs(tiny):
    engine = Engine(tiny, EngineConfig(step_timeout=0.3))
    died: list[str] = []
    engine.on_dead = died.append
    forward = engine.runner.forward

    def hanging_forward(*args, **kwargs):
        time.sleep(2.0)
        return forward(*args, **kwargs)

    engine.runner.forward = hanging_forward  # type: ignore[method-assign]
    engine.start()
    try:
        prompt = tiny.chat_format.render([ChatMessage("user", "hang")])
        t0 = time.monotonic()
        outs = [o async for o in engine.submit(GenerationRequest("h", prompt, SamplingParams(4)))]
        assert isinstance(outs[-1].error, EngineDeadError)
        assert time.monotonic() - t0 < 2.0  # ended by the watchdog, not by the step finishing
        assert died and "step" in died[0]
        with pytest.raises(EngineDeadError):
            engine.submit(GenerationRequest("after", prompt, SamplingParams(4)))
    finally:
        engine.shutdown()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_watchdog_ends_streams_when_the_engine_thread_dies(tiny):
    engine = Engine(tiny, EngineConfig(step_timeout=30))
    died: list[str] = []
    engine.on_dead = died.append

    def fatal(*args, **kwargs):
        raise SystemExit("simulated fatal error in the engine thread")

    engine.runner.forward = fatal  # type: ignore[method-assign]
    engine.start()
    try:
        prompt = tiny.chat_format.render([ChatMessage("user", "die")])
        outs = await asyncio.wait_for(
            _collect(engine.submit(GenerationRequest("d", prompt, SamplingParams(4)))), 10
        )
        assert isinstance(outs[-1].error, EngineDeadError)
        assert died == ["the engine thread died"]
    finally:
        engine.shutdown()


async def _collect(stream) -> list:  # noqa: ANN001
    return [o async for o in stream]


async def test_a_loop_failure_ends_every_request_instead_of_hanging(tiny):
    """A bug outside any forward (here: admission raising every time) must not leave queued
    requests waiting forever: they end with an error, and the engine keeps running."""
    engine = Engine(tiny, EngineConfig())
    admit = engine.scheduler.admit
    broken = {"on": True}

    def flaky_admit():
        if broken["on"]:
            raise RuntimeError("admission bug")
        return admit()

    engine.scheduler.admit = flaky_admit  # type: ignore[method-assign]
    engine.start()
    try:
        prompt = tiny.chat_format.render([ChatMessage("user", "hello")])
        outs = await asyncio.wait_for(
            _collect(engine.submit(GenerationRequest("x", prompt, SamplingParams(4)))), 10
        )
        assert outs[-1].error is not None
        broken["on"] = False
        assert len(await asyncio.wait_for(_generate(engine, prompt, 4, "y"), 10)) == 4
    finally:
        engine.shutdown()


async def test_streams_that_stall_together_pause_and_resume_exactly(tiny):
    """Six streams in one lane whose consumers stop reading at once are paused together (one
    lane copy for all of them) and, read again, give exactly their uninterrupted tokens,
    sampled rows included (the same generator state)."""
    prompts = [
        tiny.chat_format.render([ChatMessage("user", f"Stall {i} " * (1 + i % 3))])
        for i in range(6)
    ]

    def params(i: int) -> SamplingParams:
        if i % 2:
            return SamplingParams(max_tokens=60, temperature=0.9, seed=i, ignore_eos=True)
        return SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)

    async def read(stream) -> list[int]:  # noqa: ANN001 - a RequestStream
        ids: list[int] = []
        async for out in stream:
            assert out.error is None, out.error
            ids += out.token_ids
        return ids

    engine = Engine(tiny, EngineConfig(block_size=4, max_stream_backlog=4))
    engine.start()
    try:
        solo = []
        for i, p in enumerate(prompts):
            solo.append(await read(engine.submit(GenerationRequest(f"s{i}", p, params(i)))))
        streams = [
            engine.submit(GenerationRequest(f"c{i}", p, params(i))) for i, p in enumerate(prompts)
        ]
        deadline = time.monotonic() + 60
        # Nobody reads yet: every stream is paused and its lane row is gone.
        while len(engine.scheduler.paused) < len(prompts) or engine.kv.lanes:
            assert time.monotonic() < deadline, "the stalled streams were not all paused"
            await asyncio.sleep(0.01)
        together = await asyncio.wait_for(asyncio.gather(*(read(s) for s in streams)), 120)
    finally:
        engine.shutdown()
    assert together == solo
    assert engine.scheduler.num_pauses >= len(prompts)
