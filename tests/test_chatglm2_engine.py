"""The engine serves the tiny ChatGLM2 exactly like a solo greedy loop (integration check)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from model_server.engine.engine import Engine, EngineConfig
from model_server.engine.types import GenerationRequest, SamplingParams
from model_server.models.base import ChatMessage
from model_server.models.chatglm2 import load_chatglm2
from model_server.models.chatglm2.chat_format import process_response


def solo_greedy(model: torch.nn.Module, ids: list[int], n: int, eos: int) -> list[int]:
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
            if out[-1] == eos:
                break
    return out


async def test_engine_batch_equals_solo_greedy(tiny_chatglm2_dir: Path):
    lm = load_chatglm2(str(tiny_chatglm2_dir), torch.device("cpu"), torch.float32, None)
    questions = ["hi", "你好 please answer the question about time", "问 答 world 123"]
    prompts = [lm.chat_format.render([ChatMessage("user", q)]) for q in questions]
    engine = Engine(lm, EngineConfig(prefill_chunk_tokens=7))
    engine.start()
    try:
        params = SamplingParams(max_tokens=10, temperature=0.0)
        streams = [
            engine.submit(GenerationRequest(f"r{i}", p, params)) for i, p in enumerate(prompts)
        ]

        async def collect(stream) -> tuple[str, list[int]]:
            text, ids = "", []
            async for out in stream:
                assert out.error is None
                text += out.text
                ids += out.token_ids
            return text, ids

        results = await asyncio.wait_for(asyncio.gather(*map(collect, streams)), 60)
    finally:
        engine.shutdown()
    for prompt, (text, ids) in zip(prompts, results, strict=True):
        assert ids == solo_greedy(lm.model, prompt, 10, eos=2)
        assert text == process_response(lm.tokenizer.decode(ids))
