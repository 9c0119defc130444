"""Prompt log-probabilities (``echo`` + ``logprobs`` on /v1/completions, ChatRequest
.prompt_logprobs), on the tiny random Llama, against a plain transformers forward of the same
checkpoint over the same tokens (fp32, within 1e-3):

- the engine in-process with a small prefill chunk: a prompt scored over several chunks, prompts
  scored in one left-padded group beside unscored ones, max_tokens 0 (never decoded), and a
  prompt whose prefix is in the prefix cache (every position is still computed);
- real processes: the official openai SDK through the bridge (prompt scoring with
  ``echo=True, logprobs=1, max_tokens=0``, text and token-id prompts, streamed too; lm-eval's
  ``local-completions`` loglikelihood request, ``max_tokens=1`` over token-id batches) and the
  gRPC API directly (prompt_token_ids, echo's prompt_text).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
import torch
from procs import Proc

from glmserve.v1 import chat_pb2, chat_pb2_grpc
from model_server.engine.engine import Engine, EngineConfig
from model_server.engine.sequence import Sequence
from model_server.engine.types import GenerationRequest, SamplingParams, StepOutput
from model_server.models.registry import load_model

TOL = 1e-3
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the woods."


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_model(str(tiny_model_dir), torch.device("cpu"), "float32", None)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    """ids → [len(ids), V] log-softmax of a plain transformers forward (row j predicts j+1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def forward(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    return forward


def check_scores(ids: list[int], scores: list, k: int, ref: torch.Tensor) -> None:
    """Engine TokenLogprobs for ids[1:] against the reference (value and top-k order)."""
    assert len(scores) == len(ids) - 1
    for j, (token, lp) in enumerate(zip(ids[1:], scores, strict=True)):
        assert abs(lp.logprob - float(ref[j, token])) < TOL, j
        values, order = ref[j].topk(k)
        assert [t for t, _ in lp.top] == order.tolist(), j
        assert all(abs(v - w) < TOL for (_, v), w in zip(lp.top, values.tolist(), strict=True))


async def _run(engine: Engine, ids: list[int], max_tokens: int, k: int | None, rid: str):
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, prompt_logprobs=k
    )
    outs: list[StepOutput] = []
    async for out in engine.submit(GenerationRequest(rid, ids, params)):
        assert out.error is None, out.error
        outs.append(out)
    return outs


async def test_engine_scores_every_prompt_position_chunked_grouped_and_cached(tiny, reference):
    tok = tiny.tokenizer
    long_ids = tok.encode(TEXT * 2)  # ~40 tokens: 3 chunks of 16, then the rest
    assert len(long_ids) > 32
    shorts = [tok.encode(f"Short prompt number {i} about {w}.") for i, w in
              enumerate(["cats", "the sea", "a very long and winding road"])]  # fmt: skip
    engine = Engine(tiny, EngineConfig(prefill_chunk_tokens=16, block_size=4))
    engine.start()
    try:
        # Chunked, max_tokens 0: one output, no token, finish length, never decoded.
        (out,) = await asyncio.wait_for(_run(engine, long_ids, 0, 3, "long"), 60)
        assert out.token_ids == [] and out.finish_reason == "length"
        assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(long_ids)
        check_scores(long_ids, out.prompt_logprobs, 3, reference(long_ids))

        # One left-padded group: scored rows (generating and not) beside an unscored one.
        runs = [
            _run(engine, shorts[0], 0, 2, "g0"),
            _run(engine, shorts[1], 3, 0, "g1"),
            _run(engine, shorts[2], 3, None, "g2"),
        ]
        g0, g1, g2 = await asyncio.wait_for(asyncio.gather(*runs), 60)
        check_scores(shorts[0], g0[0].prompt_logprobs, 2, reference(shorts[0]))
        ref1 = reference(shorts[1])
        check_scores(shorts[1], g1[0].prompt_logprobs, 0, ref1)
        assert all(o.prompt_logprobs is None for o in g1[1:] + g2)  # first output only
        generated = [t for o in g1 for t in o.token_ids]
        assert len(generated) == 3 and generated[0] == int(ref1[-1].argmax())

        # The prompt's blocks are cached now (the runs above cached them): a scored request
        # still computes every position, and gets the same values.
        hits = engine.scheduler.prefix_hits
        await asyncio.wait_for(_run(engine, long_ids, 2, None, "warm"), 60)
        assert engine.scheduler.prefix_hits > hits  # the cache serves the unscored request
        hits = engine.scheduler.prefix_hits
        again = await asyncio.wait_for(_run(engine, long_ids, 1, 3, "cached"), 60)
        assert engine.scheduler.prefix_hits == hits
        check_scores(long_ids, again[0].prompt_logprobs, 3, reference(long_ids))
    finally:
        engine.shutdown()


async def test_preempted_scoring_keeps_every_position(tiny, reference, monkeypatch):
    """A pool so small that scored prompts (prefilled in chunks) and long replies preempt each
    other: every prompt's values and every reply still equal their solo runs (a scored request
    preempted after its first output is recomputed, not scored again)."""
    scored = []  # preempted requests that asked for prompt logprobs
    reset = Sequence.reset_for_recompute

    def watched(seq: Sequence) -> None:
        scored.append(seq.params.prompt_logprobs is not None)
        reset(seq)

    monkeypatch.setattr(Sequence, "reset_for_recompute", watched)
    prompts = [tiny.tokenizer.encode(f"Request {i}: " + TEXT * (1 + i % 2)) for i in range(6)]
    engine = Engine(tiny, EngineConfig(kv_cache_tokens=320, block_size=16,
                                       prefill_chunk_tokens=16))  # fmt: skip
    engine.start()
    try:
        solo = [await _run(engine, p, 60, 1, f"s{i}") for i, p in enumerate(prompts)]
        together = await asyncio.wait_for(
            asyncio.gather(*(_run(engine, p, 60, 1, f"c{i}") for i, p in enumerate(prompts))), 120
        )
    finally:
        engine.shutdown()
    assert engine.scheduler.num_preemptions > 0 and any(scored)
    for ids, alone, mixed in zip(prompts, solo, together, strict=True):
        assert [t for o in mixed for t in o.token_ids] == [t for o in alone for t in o.token_ids]
        check_scores(ids, mixed[0].prompt_logprobs, 1, reference(ids))
        assert all(o.prompt_logprobs is None for o in mixed[1:])


# ---- real processes ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(api_stack: tuple[Proc, Proc]) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_stack[1].url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def stub(api_stack: tuple[Proc, Proc]) -> Iterator[chat_pb2_grpc.ChatServiceStub]:
    with grpc.insecure_channel(api_stack[0].target) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


def test_sdk_prompt_scoring_and_lm_eval_loglikelihood(
    client: openai.OpenAI, model: str, tiny_model_dir: Path, reference
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.encode(TEXT, add_special_tokens=False)
    ref = reference(ids)
    for prompt in (TEXT, ids):
        out = client.completions.create(
            model=model, prompt=prompt, echo=True, logprobs=1, max_tokens=0, temperature=0
        )
        choice = out.choices[0]
        assert choice.finish_reason == "length" and out.usage.completion_tokens == 0
        assert out.usage.prompt_tokens == len(ids)
        assert choice.text == tok.decode(ids)  # the echo: as sent, or the ids decoded
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert "".join(lp.tokens) == tok.decode(ids)
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        for j in range(1, len(ids)):
            assert abs(lp.token_logprobs[j] - float(ref[j - 1, ids[j]])) < TOL, j
            ((best, value),) = lp.top_logprobs[j].items()
            assert best == tok.decode([int(ref[j - 1].argmax())])
            assert abs(value - float(ref[j - 1].max())) < TOL

    # Echo + logprobs with a reply: the prompt's entries, then the generated tokens'.
    args = dict(model=model, prompt=TEXT, echo=True, logprobs=2, max_tokens=4, temperature=0,
                extra_body={"ignore_eos": True})  # fmt: skip
    full = client.completions.create(**args).choices[0]
    assert full.text.startswith(TEXT) and len(full.logprobs.tokens) == len(ids) + 4
    assert full.logprobs.text_offset[len(ids)] == len(TEXT)
    assert abs(full.logprobs.token_logprobs[len(ids)] - float(ref[-1].max())) < TOL  # greedy
    # Streamed: the echo chunk carries the prompt's logprobs; the whole equals the reply.
    text, tokens, values = "", [], []
    for chunk in client.completions.create(**args, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs
    assert text == full.text and tokens == full.logprobs.tokens
    assert values[0] is None and all(
        abs(a - b) < 1e-5 for a, b in zip(values[1:], full.logprobs.token_logprobs[1:], strict=True)
    )

    # A cached prefix does not shorten the answer: the same request again, every position.
    again = client.completions.create(
        model=model, prompt=TEXT, echo=True, logprobs=1, max_tokens=0
    ).choices[0]
    assert again.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)

    # lm-eval batches its contexts as token-id lists (max_tokens 1, the last entry dropped) and
    # calls a continuation greedy when each token's logprob equals its top-1's exactly.
    batch = [ids, ids[:7]]
    out = client.completions.create(
        model=model, prompt=batch, echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    assert [len(c.logprobs.tokens) for c in out.choices] == [len(ids) + 1, 8]
    for choice, prompt in zip(out.choices, batch, strict=True):
        lp, best = choice.logprobs, reference(prompt).argmax(-1).tolist()
        for j in range(1, len(prompt)):
            greedy = prompt[j] == best[j - 1]
            assert (lp.token_logprobs[j] == max(lp.top_logprobs[j].values())) == greedy


def test_sdk_clear_400s(client: openai.OpenAI, model: str) -> None:
    cases = [
        {"prompt": "x", "max_tokens": 0},  # nothing to return
        {"prompt": "x", "max_tokens": 0, "echo": True},
        {"prompt": "x", "max_tokens": 0, "logprobs": 1},
        {"prompt": "x", "max_tokens": -1},
    ]
    for body in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=model, **body)
        assert err.value.param == "max_tokens", (body, err.value.message)


def test_grpc_prompt_logprobs_and_echo(
    stub: chat_pb2_grpc.ChatServiceStub, tiny_model_dir: Path, reference
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.encode("Once upon a time, there was a tiny model.", add_special_tokens=False)
    request = chat_pb2.ChatRequest(
        prompt_token_ids=ids, prompt_logprobs=4, max_tokens=0, echo=True
    )
    (reply,) = list(stub.Chat(request))
    assert reply.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert reply.prompt_text == tok.decode(ids)
    assert [p.chosen.token_id for p in reply.prompt_logprobs] == ids
    head = reply.prompt_logprobs[0]
    assert head.chosen.logprob == 0 and not head.top
    ref = reference(ids)
    for j, p in enumerate(reply.prompt_logprobs[1:]):
        assert abs(p.chosen.logprob - float(ref[j, ids[j + 1]])) < TOL
        assert [t.token_id for t in p.top] == ref[j].topk(4).indices.tolist()
    # With a reply: only the first message carries them.
    request.max_tokens = 3
    request.ignore_eos = True
    replies = list(stub.Chat(request))
    assert len(replies[0].prompt_logprobs) == len(ids) and replies[0].prompt_text
    assert all(not r.prompt_logprobs and not r.prompt_text for r in replies[1:])

    bad = [
        (chat_pb2.ChatRequest(prompt="x", max_tokens=0), "max_tokens"),
        (chat_pb2.ChatRequest(prompt="x", prompt_logprobs=21), "prompt_logprobs"),
        (chat_pb2.ChatRequest(messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="x")],
                              prompt_logprobs=1), "prompt_logprobs"),  # fmt: skip
        (chat_pb2.ChatRequest(messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="x")],
                              echo=True), "echo"),  # fmt: skip
    ]
    for req, field in bad:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Chat(req))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(field), err.value.details()
