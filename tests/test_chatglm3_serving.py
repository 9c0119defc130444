"""A tiny ChatGLM3 checkpoint served end to end: model server → bridge → openai SDK, with tools.

The prompt side is checked exactly: the server's ``prompt_tokens`` for a conversation with
tools, an assistant tool call and a tool result equals the length of the ids ChatGLM3's layout
gives (pinned in tests/test_chatglm3.py). A forced call (``tool_choice: required``) must come
back as a valid OpenAI ``tool_calls`` entry from the random model (constrained decoding), and
``auto`` must answer 200 whatever the model writes. The parser itself is tested in
tests/test_chatglm3.py (a random model never writes ChatGLM3's call syntax).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
import torch
from chatglm2_fixture import make_tiny_chatglm2
from procs import start_bridge, start_model_server

from model_server.models.base import ChatMessage, ToolCall, ToolSpec
from model_server.models.registry import load_model

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": CITY}}]  # fmt: skip


@pytest.fixture(scope="module")
def glm3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_chatglm2(tmp_path_factory.mktemp("glm3srv") / "chatglm3-tiny", chatglm3=True)


@pytest.fixture(scope="module")
def client(glm3_dir: Path) -> Iterator[openai.OpenAI]:
    with (
        start_model_server(str(glm3_dir), "--served-model-name", "chatglm3-tiny") as server,
        start_bridge("--backend", server.target, "--no-ui") as bridge,
    ):
        yield openai.OpenAI(base_url=bridge.url + "/v1", api_key="unused", max_retries=0)


def test_tool_conversation_reaches_the_model_in_chatglm3_layout(client, glm3_dir: Path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    out = client.chat.completions.create(
        model="chatglm3-tiny", messages=messages, tools=TOOLS, max_tokens=4, temperature=0
    )
    loaded = load_model(str(glm3_dir), torch.device("cpu"), "float32", None)
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    want = loaded.chat_format.render(
        [
            ChatMessage("system", "Be brief."),
            ChatMessage("user", "Weather in Paris?"),
            ChatMessage("assistant", "", tool_calls=(call,)),
            ChatMessage("tool", '{"temp_c": 21}', tool_call_id="call_1"),
        ],
        [ToolSpec("get_weather", "Weather now", CITY)],
    )
    assert out.usage.prompt_tokens == len(want)


def test_forced_call_is_a_valid_tool_call(client):
    out = client.chat.completions.create(
        model="chatglm3-tiny",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=200,
        seed=1,
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), CITY)


def test_auto_answers_whatever_the_model_writes(client):
    for stream in (False, True):
        out = client.chat.completions.create(
            model="chatglm3-tiny",
            messages=[{"role": "user", "content": "hi"}],
            tools=TOOLS,
            max_tokens=12,
            seed=3,
            stream=stream,
        )
        if stream:
            assert [c for c in out]  # a complete stream, no error chunk
        else:
            assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
