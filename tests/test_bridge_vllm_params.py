"""vLLM's request fields and context overflow, over real processes: the tiny random model
server → http-bridge (uvicorn) → the openai SDK (``extra_body``, as vLLM's docs send them).

A constraint (``guided_*``, ``structured_outputs``) travels as the proto's StructuredOutput, so
even a random model's reply matches it; a field glmserve cannot honour is a 400 naming it,
except at vLLM's default; a prompt past the context is OpenAI's ``context_length_exceeded``.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from procs import Proc

from http_bridge.routes.chat import regex_literal

HI = [{"role": "user", "content": "Pick one."}]
SHORT = {"type": "object", "properties": {"k": {"type": "string", "maxLength": 6},
         "n": {"type": "integer", "minimum": 0, "maximum": 99}},
         "required": ["k", "n"], "additionalProperties": False}  # fmt: skip
# Characters the regex dialect gives a meaning, and ones Python's re.escape escapes needlessly.
CHOICES = ["a.b", "c++ (x|y)", "[z]^$", "dash-ed & #1 ~", "two words", "line\nbreak", "é?"]
LONG_PROMPT = "word " * 700  # past the tiny model's 512-token context


@pytest.fixture(scope="module")
def bridge(api_stack: tuple[Proc, Proc]) -> Proc:
    return api_stack[1]


@pytest.fixture(scope="module")
def client(bridge: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=bridge.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def chat(client: openai.OpenAI, model: str, seed: int = 0, **extra_body: object) -> str:
    out = client.chat.completions.create(
        model=model, messages=HI, max_tokens=60, temperature=1.0, seed=seed, extra_body=extra_body
    )
    assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
    return out.choices[0].message.content or ""


# ---- constraints ---------------------------------------------------------------------------


def test_guided_json(client: openai.OpenAI, model: str) -> None:
    for seed in range(3):
        jsonschema.validate(json.loads(chat(client, model, seed, guided_json=SHORT)), SHORT)
    # The schema as JSON text, as vLLM also takes it.
    jsonschema.validate(json.loads(chat(client, model, guided_json=json.dumps(SHORT))), SHORT)


def test_guided_regex_and_grammar(client: openai.OpenAI, model: str) -> None:
    for seed in range(3):
        reply = chat(client, model, seed, guided_regex="[A-Z]{3}-[0-9]{2,4}")
        assert re.fullmatch(r"[A-Z]{3}-[0-9]{2,4}", reply), reply
    lark = 'start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]{1,2}/'
    reply = chat(client, model, guided_grammar=lark)
    assert re.fullmatch(r"yes|no|maybe [0-9]{1,2}", reply), reply


def test_guided_choice_is_matched_exactly(client: openai.OpenAI, model: str) -> None:
    assert all(re.fullmatch(regex_literal(c), c) for c in CHOICES)  # Python agrees too
    replies = {chat(client, model, seed, guided_choice=CHOICES) for seed in range(8)}
    assert replies <= set(CHOICES), replies
    stream = client.chat.completions.create(
        model=model, messages=HI, stream=True, seed=1, temperature=1.0,
        extra_body={"guided_choice": ["left", "right"]},
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text in ("left", "right")


def test_structured_outputs_object(client: openai.OpenAI, model: str) -> None:
    """vLLM's newer spelling: one object, one kind."""
    reply = chat(client, model, structured_outputs={"choice": ["red", "green", "blue"]})
    assert reply in ("red", "green", "blue")
    reply = chat(client, model, structured_outputs={"regex": "[0-9]{4}"})
    assert re.fullmatch("[0-9]{4}", reply), reply
    options = {"json": SHORT, "disable_any_whitespace": True, "disable_fallback": False}
    jsonschema.validate(json.loads(chat(client, model, structured_outputs=options)), SHORT)


def test_guided_on_completions(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(
        model=model, prompt="The answer is", max_tokens=20, temperature=1.0, seed=2,
        extra_body={"guided_choice": ["yes", "no"]},
    )  # fmt: skip
    assert out.choices[0].text in ("yes", "no")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_json": SHORT, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "guided_choice": ["a"]},
         "guided_choice"),
        ({"guided_json": SHORT, "guided_whitespace_pattern": " +"}, "guided_whitespace_pattern"),
        # Refused by the model server's grammar engine; the param is the field that set it.
        ({"guided_regex": "(?=a)b"}, "guided_regex"),
        ({"structured_outputs": {"grammar": "start: nope"}}, "structured_outputs.grammar"),
        ({"guided_json": "{not json"}, "guided_json"),
    ],
)  # fmt: skip
def test_constraint_conflicts_and_errors_name_the_field(
    client: openai.OpenAI, model: str, extra: dict, param: str
) -> None:
    body = {k: v for k, v in extra.items() if k not in ("response_format", "tools")}
    kwargs = {k: v for k, v in extra.items() if k in ("response_format", "tools")}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model, messages=HI, max_tokens=5, extra_body=body, **kwargs
        )
    assert err.value.param == param, err.value.message
    assert err.value.type == "invalid_request_error"


# ---- fields glmserve cannot honour ---------------------------------------------------------

NEUTRAL = {
    "skip_special_tokens": True, "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False, "add_generation_prompt": True,
    "continue_final_message": False, "echo": False, "best_of": 1, "use_beam_search": False,
    "stop_token_ids": [], "bad_words": [], "allowed_token_ids": [], "chat_template": None,
    "chat_template_kwargs": {}, "truncate_prompt_tokens": None, "prompt_logprobs": None,
    # Change nothing here: accepted, ignored and named in the header.
    "length_penalty": 0.8, "guided_decoding_backend": "xgrammar",
    "guided_whitespace_pattern": r"[ \n]*",
}  # fmt: skip
NOT_NEUTRAL = [
    ("skip_special_tokens", False), ("spaces_between_special_tokens", False),
    ("include_stop_str_in_output", True), ("add_generation_prompt", False),
    ("continue_final_message", True), ("echo", True), ("best_of", 2), ("use_beam_search", True),
    ("stop_token_ids", [2]), ("bad_words", ["x"]), ("allowed_token_ids", [5, 6]),
    ("chat_template", "{{ messages }}"), ("chat_template_kwargs", {"enable_thinking": False}),
    ("truncate_prompt_tokens", 100), ("prompt_logprobs", 0),
]  # fmt: skip


def test_neutral_values_pass(bridge: Proc, model: str) -> None:
    body = {"model": model, "messages": HI, "max_tokens": 3, **NEUTRAL}
    r = httpx.post(bridge.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    ignored = r.headers["x-glmserve-ignored-params"].split(", ")
    assert ignored == ["guided_decoding_backend", "guided_whitespace_pattern", "length_penalty"]
    chat_only = ("add_generation_prompt", "continue_final_message", "chat_template",
                 "chat_template_kwargs", "echo")  # fmt: skip
    completion = {"model": model, "prompt": "Hi", "max_tokens": 3,
                  **{k: v for k, v in NEUTRAL.items() if k not in chat_only}}  # fmt: skip
    r = httpx.post(bridge.url + "/v1/completions", json=completion, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("field", "value"), NOT_NEUTRAL, ids=[f for f, _ in NOT_NEUTRAL])
def test_other_values_are_a_400_naming_the_field(
    client: openai.OpenAI, model: str, field: str, value: object
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model, messages=HI, max_tokens=3, extra_body={field: value}
        )
    assert (err.value.param, err.value.code) == (field, "unsupported_parameter")
    assert err.value.type == "invalid_request_error"
    assert field in err.value.message


def test_completions_refuse_them_too(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(
            model=model, prompt="Hi", max_tokens=3, extra_body={"stop_token_ids": [7]}
        )
    assert (err.value.param, err.value.code) == ("stop_token_ids", "unsupported_parameter")


# ---- context overflow ----------------------------------------------------------------------

OPENAI_PREFIX = "This model's maximum context length is 512 tokens. However, "


def message(err: pytest.ExceptionInfo[openai.BadRequestError]) -> str:
    """The envelope's message as sent (the exception's own text starts with "Error code")."""
    return err.value.body["message"]  # type: ignore[index]


def test_prompt_past_the_context(client: openai.OpenAI, model: str) -> None:
    for stream in (False, True):  # a stream fails before its 200: the same status
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": LONG_PROMPT}], stream=stream
            )
        assert err.value.code == "context_length_exceeded"
        assert err.value.param == "messages" and err.value.type == "invalid_request_error"
        assert message(err).startswith("This model's maximum context length is")
        assert re.match(
            OPENAI_PREFIX + r"your messages resulted in (\d+) tokens\. Please reduce the length "
            r"of the messages\.$", message(err),
        ), message(err)  # fmt: skip


def test_max_tokens_past_the_context(client: openai.OpenAI, model: str) -> None:
    """OpenAI's full wording, with the model server's real numbers (the prompt's tokens are
    the usage of the same conversation); param names the field the client sent."""
    prompt = client.chat.completions.create(model=model, messages=HI, max_tokens=1)
    p = prompt.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=HI, max_completion_tokens=600)
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "max_completion_tokens")
    assert message(err) == (
        f"{OPENAI_PREFIX}you requested {p + 600} tokens ({p} in the messages, 600 in the "
        "completion). Please reduce the length of the messages or completion."
    )


def test_completions_prompt_past_the_context(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=LONG_PROMPT, max_tokens=5)
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "prompt")
    assert message(err).startswith(OPENAI_PREFIX + "your prompt resulted in ")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=[1, 2, 3], max_tokens=510)
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "max_tokens")
    assert message(err).startswith(OPENAI_PREFIX + "you requested 513 tokens (3 in the prompt")
