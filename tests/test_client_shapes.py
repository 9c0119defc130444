"""The request shapes real clients send, replayed against the real bridge and model server
(tiny random model): every one is answered 200, except image parts on a text-only model, which
get a clear 400 naming the part.

The bodies follow what each client builds in its source (field names, value types, where
options go); ``max_tokens`` is kept small so the test stays fast. Streams are read to
``[DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from procs import Proc

CHAT = "/v1/chat/completions"
HISTORY = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
]
FUNCTION = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read a file from the workspace",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string", "description": "relative path"}},
            "required": ["path"],
        },
    },
}

SHAPES: list[tuple[str, dict]] = [
    # NextChat: chat, and its history compression (the instruction as a system message, last).
    ("nextchat", {"messages": HISTORY, "stream": True, "temperature": 0.5, "presence_penalty": 0,
                  "frequency_penalty": 0, "top_p": 1, "max_tokens": 4}),
    ("nextchat-compress", {"messages": [*HISTORY, {"role": "system", "content":
        "Summarize the conversation above in under 200 words."}], "stream": True,
        "temperature": 0.5, "max_tokens": 4}),
    ("nextchat-plugins", {"messages": HISTORY, "stream": True, "tools": [FUNCTION],
                          "max_tokens": 4}),
    # Open WebUI: user options forwarded top-level, user as an object, min_p.
    ("open-webui", {"messages": HISTORY, "stream": True, "num_ctx": 4096, "keep_alive": "5m",
                    "min_p": 0.05, "user": {"name": "Ada", "id": "u1", "email": "a@b.c",
                    "role": "user"}, "max_tokens": 4, "stream_options": {"include_usage": True}}),
    # LobeChat: always sends user; penalties and top_p.
    ("lobechat", {"messages": HISTORY, "stream": True, "temperature": 1, "top_p": 1,
                  "frequency_penalty": 0, "presence_penalty": 0, "user": "lobe-user-1",
                  "max_tokens": 4}),
    # LibreChat.
    ("librechat", {"messages": HISTORY, "stream": True, "temperature": 1, "top_p": 1,
                   "presence_penalty": 0, "frequency_penalty": 0, "user": "6543a1b2",
                   "max_tokens": 4}),
    # Chatbox.
    ("chatbox", {"messages": HISTORY, "max_tokens": 4, "temperature": 0.7, "top_p": 1,
                 "stream": True}),
    # Continue: chat with stop sequences, and agent mode with tools.
    ("continue", {"messages": HISTORY, "max_tokens": 4, "temperature": 0, "stream": True,
                  "stop": ["<|im_end|>"]}),
    ("continue-agent", {"messages": HISTORY, "max_tokens": 4, "stream": True,
                        "tools": [FUNCTION]}),
    # Roo Code: tools, usage in the stream, parallel_tool_calls.
    ("roo-code", {"messages": HISTORY, "stream": True, "stream_options": {"include_usage": True},
                  "temperature": 0, "tools": [FUNCTION], "tool_choice": "auto",
                  "parallel_tool_calls": False, "max_completion_tokens": 4}),
    # LangChain ChatOpenAI: bind_tools and with_structured_output.
    ("langchain-tools", {"messages": HISTORY, "stream": False, "n": 1, "temperature": 0.7,
                         "tools": [FUNCTION], "max_completion_tokens": 4}),
    ("langchain-structured", {"messages": HISTORY, "stream": False, "temperature": 0.7,
        "response_format": {"type": "json_schema", "json_schema": {"name": "Joke", "strict": True,
        "schema": {"type": "object", "properties": {"setup": {"type": "string", "maxLength": 8},
        "punchline": {"type": "string", "maxLength": 8}}, "required": ["setup", "punchline"],
        "additionalProperties": False}}}, "max_completion_tokens": 60}),
    # LiteLLM's OpenAI-compatible provider, and the openai SDK defaults.
    ("litellm", {"messages": HISTORY, "stream": False, "max_tokens": 4, "temperature": 0.2,
                 "extra_body": {}, "metadata": {"trace": "x"}}),
    ("openai-sdk", {"messages": HISTORY, "max_completion_tokens": 4, "logprobs": True,
                    "top_logprobs": 2, "store": False, "service_tier": "auto"}),
]  # fmt: skip


@pytest.fixture(scope="module")
def http(api_stack: tuple[Proc, Proc]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_stack[1].url, timeout=120) as client:
        yield client


@pytest.mark.parametrize(("client", "body"), SHAPES, ids=[s[0] for s in SHAPES])
def test_client_shape_is_answered(http: httpx.Client, client: str, body: dict) -> None:
    body = {"model": "", **body}
    if not body.get("stream"):
        r = http.post(CHAT, json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] in ("stop", "length", "tool_calls")
        if "response_format" in body:
            json.loads(choice["message"]["content"])
        return
    with http.stream("POST", CHAT, json=body) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert not any('"error"' in line for line in lines)


def test_image_parts_get_a_clear_400(http: httpx.Client) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    body = {"model": "", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"}, image]}]}  # fmt: skip
    r = http.post(CHAT, json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages[0].content" and "image_url" in error["message"]
