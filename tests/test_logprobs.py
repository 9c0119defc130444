"""logprobs / top_logprobs, min_p, system messages anywhere and the extra-field policy, on real
processes: the tiny random Llama behind model-server → http-bridge → the openai SDK (and the
gRPC API directly where token ids matter).

The reference for logprobs is a plain transformers forward of the same checkpoint over the
same tokens (fp32): the served values must match it within 1e-3.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
import torch
from procs import Proc

from glmserve.v1 import chat_pb2, chat_pb2_grpc

HI = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def server(api_stack: tuple[Proc, Proc]) -> Proc:
    return api_stack[0]


@pytest.fixture(scope="module")
def bridge(api_stack: tuple[Proc, Proc]) -> Proc:
    return api_stack[1]


@pytest.fixture(scope="module")
def client(bridge: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=bridge.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def stub(server: Proc) -> Iterator[chat_pb2_grpc.ChatServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


def test_logprobs_match_a_transformers_forward(
    stub: chat_pb2_grpc.ChatServiceStub, tiny_model_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    messages = [chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Tell me about the sea.")]
    # Sampled (temperature 1.3, top_k 5): the values must still be the *raw* logits'.
    request = chat_pb2.ChatRequest(
        messages=messages, max_tokens=12, temperature=1.3, top_k=5, seed=7, logprobs=4,
        ignore_eos=True, repetition_penalty=1.3,
    )  # fmt: skip
    replies = list(stub.Chat(request))
    ids = [t for r in replies for t in r.token_ids]
    positions = [p for r in replies for p in r.logprobs]
    assert len(ids) == len(positions) == 12
    prompt = list(stub.Tokenize(chat_pb2.TokenizeRequest(messages=messages)).token_ids)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0].float()
    reference = logits[len(prompt) - 1 : -1].log_softmax(-1)
    for step, (token, pos) in enumerate(zip(ids, positions, strict=True)):
        assert pos.chosen.token_id == token
        assert abs(pos.chosen.logprob - float(reference[step, token])) < 1e-3, step
        values, order = reference[step].topk(4)
        assert [t.token_id for t in pos.top] == order.tolist()
        for t, v in zip(pos.top, values.tolist(), strict=True):
            assert abs(t.logprob - v) < 1e-3
    # Different from the sampling distribution: temperature and top_k changed what was drawn.
    assert any(abs(p.chosen.logprob) > 1e-3 for p in positions)


def test_logprobs_through_the_sdk_stream_equals_non_stream(
    client: openai.OpenAI, bridge: Proc
) -> None:
    model = client.models.list().data[0].id
    args = dict(model=model, messages=HI, max_tokens=10, temperature=0, logprobs=True,
                top_logprobs=3, extra_body={"ignore_eos": True})  # fmt: skip
    full = client.chat.completions.create(**args)
    content = full.choices[0].logprobs.content
    assert len(content) == 10
    for item in content:
        assert len(item.top_logprobs) == 3 and item.logprob <= 0
        assert item.bytes == list(item.token.encode()) or "\ufffd" in item.token
        # Greedy: the chosen token is the most likely one.
        assert abs(item.logprob - item.top_logprobs[0].logprob) < 1e-6
    joined = b"".join(bytes(item.bytes) for item in content)
    assert joined.decode("utf-8", errors="replace") == full.choices[0].message.content

    streamed = []
    for chunk in client.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed += choice.logprobs.content
    assert [(s.token, s.bytes) for s in streamed] == [(c.token, c.bytes) for c in content]
    assert all(abs(s.logprob - c.logprob) < 1e-5 for s, c in zip(streamed, content, strict=True))

    plain = client.chat.completions.create(model=model, messages=HI, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_min_p_one_is_greedy(client: openai.OpenAI) -> None:
    """min_p = 1 keeps only the most likely token: sampling at temperature 1 becomes greedy."""
    model = client.models.list().data[0].id
    common = dict(model=model, messages=HI, max_tokens=16)

    def reply(min_p: float | None = None, **kw: object) -> str:
        extra = {"ignore_eos": True, **({"min_p": min_p} if min_p is not None else {})}
        out = client.chat.completions.create(**common, **kw, extra_body=extra)
        return out.choices[0].message.content

    greedy = reply(temperature=0)
    assert reply(temperature=1.0, seed=1, min_p=1.0) == greedy
    assert reply(temperature=1.0, seed=2, min_p=1.0) == greedy
    assert reply(temperature=1.0, seed=1) != greedy  # without it, sampling differs


def test_system_messages_anywhere(
    client: openai.OpenAI, stub: chat_pb2_grpc.ChatServiceStub, tiny_model_dir: Path
) -> None:
    model = client.models.list().data[0].id
    # NextChat's history compression: the instruction comes last, as a system message.
    conversations = [
        [*HI, {"role": "assistant", "content": "Blue."}, {"role": "system", "content": "Sum up."}],
        [{"role": "system", "content": "A"}, *HI, {"role": "system", "content": "B"}, *HI],
    ]
    for messages in conversations:
        out = client.chat.completions.create(model=model, messages=messages, max_tokens=2)
        assert out.choices[0].finish_reason in ("stop", "length")
    # SmolLM2's template takes a system turn anywhere: it is rendered where it was sent.
    last = stub.Tokenize(chat_pb2.TokenizeRequest(messages=[
        chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi"),
        chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content="Sum up."),
    ]))  # fmt: skip
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(tiny_model_dir).decode(last.token_ids)
    assert text.index("hi") < text.index("system\nSum up.")


def test_extra_fields_are_ignored_and_named(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=HI,
        max_tokens=2,
        store=True,
        extra_body={"num_ctx": 4096, "user": {"id": "u1", "name": "x"}, "keep_alive": "5m"},
    )
    assert raw.http_response.status_code == 200
    assert raw.headers["x-glmserve-ignored-params"] == "keep_alive, num_ctx, store, user"
    plain = client.chat.completions.with_raw_response.create(model=model, messages=HI, max_tokens=1)
    assert "x-glmserve-ignored-params" not in plain.headers
    # Known fields stay strict.
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=HI, extra_body={"min_p": 2})
    assert err.value.param == "min_p"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=HI, user="x" * 300)
    assert err.value.param == "user"
