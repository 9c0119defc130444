"""Agent loops send the SDK's own reply objects back: the bridge takes them as they are.

Real processes (the tiny random model behind a bridge) and the official openai SDK. Each test
gets a reply the way an agent does (``parse()``, or the ``.stream()`` helper's final
completion), appends that message object to the conversation, and asks again. The SDK serializes
the object with the keys it added (``parsed``, ``tool_calls[].function.parsed_arguments``,
``tool_calls[].index``), checked on the wire, and the bridge answers 200.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import openai
import pydantic
import pytest
from procs import Proc

ASK = [{"role": "user", "content": "Is it warm in Paris?"}]
# The SDK's ParsedChatCompletionMessage warns when it dumps its own `parsed` (its type says None).
pytestmark = pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")


class Verdict(pydantic.BaseModel):
    warm: bool


class Forecast(pydantic.BaseModel):
    unit: Literal["celsius", "fahrenheit"]


TOOL = openai.pydantic_function_tool(Forecast)  # strict: what parse() and .stream() require
FORCED: dict[str, Any] = {
    "tools": [TOOL],
    "tool_choice": "required",
    "parallel_tool_calls": False,  # a random model would otherwise call until max_tokens
}


@pytest.fixture(scope="module")
def sent() -> list[httpx.Request]:
    """Every request the client sent, in order."""
    return []


@pytest.fixture(scope="module")
def client(api_stack: tuple[Proc, Proc], sent: list[httpx.Request]) -> Iterator[openai.OpenAI]:
    with httpx.Client(event_hooks={"request": [sent.append]}) as http:
        yield openai.OpenAI(
            base_url=api_stack[1].url + "/v1", api_key="unused", max_retries=0, http_client=http
        )


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def replay(client: openai.OpenAI, model: str, sent: list[httpx.Request], history: list) -> dict:
    """Asks again with ``history`` (SDK objects included); the reply's status must be 200
    (the SDK raises otherwise). Returns the messages as the SDK put them on the wire."""
    client.chat.completions.create(model=model, messages=history, max_tokens=4, seed=1)
    return json.loads(sent[-1].content)["messages"]


def tool_results(message: Any) -> list[dict[str, str]]:
    return [{"role": "tool", "tool_call_id": c.id, "content": "21"} for c in message.tool_calls]


def test_parse_reply_with_parsed_content_goes_back(
    client: openai.OpenAI, model: str, sent: list[httpx.Request]
) -> None:
    out = client.chat.completions.parse(
        model=model, messages=ASK, response_format=Verdict, max_tokens=20, seed=1
    )
    message = out.choices[0].message
    assert isinstance(message.parsed, Verdict)
    wire = replay(client, model, sent, [*ASK, message, {"role": "user", "content": "Sure?"}])
    assert wire[1]["parsed"] == message.parsed.model_dump()


def test_parse_tool_calls_with_parsed_arguments_go_back(
    client: openai.OpenAI, model: str, sent: list[httpx.Request]
) -> None:
    out = client.chat.completions.parse(model=model, messages=ASK, max_tokens=40, seed=1, **FORCED)
    message = out.choices[0].message
    assert isinstance(message.tool_calls[0].function.parsed_arguments, Forecast)
    wire = replay(client, model, sent, [*ASK, message, *tool_results(message)])
    assert "parsed_arguments" in wire[1]["tool_calls"][0]["function"]


def test_stream_helper_final_message_goes_back(
    client: openai.OpenAI, model: str, sent: list[httpx.Request]
) -> None:
    with client.chat.completions.stream(
        model=model, messages=ASK, max_tokens=40, seed=1, **FORCED
    ) as stream:
        for _event in stream:
            pass
        message = stream.get_final_completion().choices[0].message
    wire = replay(client, model, sent, [*ASK, message, *tool_results(message)])
    call = wire[1]["tool_calls"][0]
    assert call["index"] == 0 and "parsed_arguments" in call["function"]


def test_model_dump_and_reasoning_content_go_back(
    client: openai.OpenAI, model: str, sent: list[httpx.Request]
) -> None:
    """``message.model_dump()`` (every key, None or not), and a DeepSeek-style reply."""
    out = client.chat.completions.parse(
        model=model, messages=ASK, response_format=Verdict, max_tokens=20, seed=1
    )
    dumped = out.choices[0].message.model_dump()
    deepseek = {"role": "assistant", "content": "Yes.", "reasoning_content": "Paris, June."}
    follow_up = {"role": "user", "content": "Sure?"}
    replay(client, model, sent, [*ASK, dumped, follow_up, deepseek, follow_up])


def test_unknown_message_keys_are_still_refused(client: openai.OpenAI, model: str) -> None:
    odd = {"role": "assistant", "content": "Yes.", "thoughts": "none"}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=[*ASK, odd, *ASK], max_tokens=4)
    assert info.value.body["param"] == "messages[1].thoughts"
