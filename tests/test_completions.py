"""POST /v1/completions on real processes (tiny random Llama → model-server → http-bridge) with
the openai SDK's ``client.completions``: no chat template, text and token-id prompts, batches,
``n``, ``echo`` (with logprobs: test_prompt_logprobs.py), ``logprobs`` (int), ``stop``,
``seed``, streaming, and the clear 400s."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from procs import Proc


@pytest.fixture(scope="module")
def client(api_stack: tuple[Proc, Proc]) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_stack[1].url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_raw_prompt_no_chat_template(
    client: openai.OpenAI, model: str, tiny_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = "The capital of France is"
    out = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    # Exactly the prompt's own tokens: no template markup around it.
    assert out.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    # The same prompt as token ids gives the same greedy text.
    ids = tok.encode(prompt, add_special_tokens=False)
    again = client.completions.create(model=model, prompt=ids, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})  # fmt: skip
    assert again.choices[0].text == out.choices[0].text
    echoed = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0,
                                       echo=True, extra_body={"ignore_eos": True})  # fmt: skip
    assert echoed.choices[0].text == prompt + out.choices[0].text
    # Token ids echo as the server decodes them.
    echoed_ids = client.completions.create(model=model, prompt=ids, max_tokens=5, temperature=0,
                                           echo=True, extra_body={"ignore_eos": True})  # fmt: skip
    assert echoed_ids.choices[0].text == tok.decode(ids) + out.choices[0].text


def test_batch_n_seed_logprobs_and_stream(client: openai.OpenAI, model: str) -> None:
    args = dict(model=model, prompt=["Once upon", "In a galaxy"], n=2, max_tokens=6, seed=5,
                logprobs=3, extra_body={"ignore_eos": True})  # fmt: skip
    out = client.completions.create(**args)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]  # prompt 0 × 2, then prompt 1 × 2
    assert out.choices[0].text != out.choices[1].text  # seed + i per choice
    for choice in out.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
        assert all(len(top) == 3 for top in lp.top_logprobs)
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert client.completions.create(**args).choices[2].text == out.choices[2].text  # seeded

    texts = ["", "", "", ""]
    finishes = [None] * 4
    usage = None
    for chunk in client.completions.create(**args, stream=True,
                                           stream_options={"include_usage": True}):  # fmt: skip
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] += c.text
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert texts == [c.text for c in out.choices]
    assert finishes == ["length"] * 4
    assert usage.completion_tokens == 24 and usage.prompt_tokens == out.usage.prompt_tokens


def test_stop_string(client: openai.OpenAI, model: str) -> None:
    base = dict(model=model, prompt="Count: one, two,", max_tokens=12, temperature=0,
                extra_body={"ignore_eos": True})  # fmt: skip
    full = client.completions.create(**base).choices[0].text
    cut = full[3:5]
    out = client.completions.create(**base, stop=[cut]).choices[0]
    assert out.finish_reason == "stop" and out.text == full[: full.index(cut)]


def test_clear_400s(client: openai.OpenAI, model: str) -> None:
    cases = [
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", [1]]}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),  # checked by the server: beyond the vocabulary
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
    ]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=model, max_tokens=2, **body)
        assert err.value.param == param, (body, err.value.message)


def test_extra_fields_named(client: openai.OpenAI, model: str) -> None:
    raw = client.completions.with_raw_response.create(
        model=model, prompt="x", max_tokens=1, extra_body={"num_ctx": 2048}
    )
    assert raw.headers["x-glmserve-ignored-params"] == "num_ctx"
