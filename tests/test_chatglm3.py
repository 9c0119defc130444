"""ChatGLM3-6B and ChatGLM2-6B-32k natively: prompt ids, tool calls, stops and rope_ratio.

Expected prompt ids are built here straight from the SentencePiece model and the published
layout (``[gMASK] sop``, then ``<|role|>`` + encode(metadata + "\\n") + encode(content) per
message, then ``<|assistant|>``), independently of the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from chatglm2_fixture import make_tiny_chatglm2

from model_server.models.base import ChatMessage, ToolCall, ToolSpec
from model_server.models.chatglm2.chatglm3 import (
    TOOLS_SYSTEM,
    ChatGLM3ReplyFilter,
    ChatGLM3ToolParser,
    parse_tool_call,
)
from model_server.models.registry import load_model

CPU = torch.device("cpu")
WEATHER = ToolSpec(
    "get_weather",
    "Current weather of a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@pytest.fixture(scope="module")
def glm3(tmp_path_factory: pytest.TempPathFactory):
    d = make_tiny_chatglm2(tmp_path_factory.mktemp("glm3") / "chatglm3", chatglm3=True)
    return d, load_model(str(d), CPU, "float32", None)


def expected_ids(folder: Path, turns: list[tuple[str, str, str]]) -> list[int]:
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    n = sp.get_piece_size()
    role = {"system": n + 5, "user": n + 6, "assistant": n + 7, "observation": n + 8}
    ids = [n + 1, n + 3]  # [gMASK], sop
    for r, metadata, content in turns:
        ids += [role[r], *sp.encode(metadata + "\n"), *sp.encode(content)]
    return [*ids, role["assistant"]]


def test_family_is_detected_from_the_tokenizer(glm3):
    _, loaded = glm3
    assert loaded.architecture == "chatglm3"
    roles = loaded.tokenizer.role_token_ids
    assert loaded.eos_token_ids == {2, roles["user"], roles["observation"]}


def test_prompt_ids_system_and_several_turns(glm3):
    folder, loaded = glm3
    msgs = [
        ChatMessage("system", "You are terse."),
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello."),
        ChatMessage("system", "Answer in Chinese from now on."),
        ChatMessage("user", "你好，现在几点？"),
    ]
    want = expected_ids(
        folder,
        [
            ("system", "", "You are terse."),
            ("user", "", "Hi"),
            ("assistant", "", "Hello."),
            ("system", "", "Answer in Chinese from now on."),
            ("user", "", "你好，现在几点？"),
        ],
    )
    assert loaded.chat_format.render(msgs) == want


def test_prompt_ids_with_tools_a_call_and_an_observation(glm3):
    folder, loaded = glm3
    tools_json = json.dumps(
        [
            {
                "name": WEATHER.name,
                "description": WEATHER.description,
                "parameters": WEATHER.parameters,
            }
        ],
        indent=4,
        ensure_ascii=False,
    )
    call = ToolCall("call_1", "get_weather", json.dumps({"city": "北京", "days": 2}))
    msgs = [
        ChatMessage("user", "Weather in Beijing?"),
        ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", '{"temperature": 21}', tool_call_id="call_1", name="get_weather"),
    ]
    want = expected_ids(
        folder,
        [
            ("system", "", TOOLS_SYSTEM + "\n" + tools_json),
            ("user", "", "Weather in Beijing?"),
            ("assistant", "get_weather", "```python\ntool_call(city='北京', days=2)\n```"),
            ("observation", "", '{"temperature": 21}'),
        ],
    )
    assert loaded.chat_format.render(msgs, [WEATHER]) == want
    # A client's own system message keeps its text; the tools follow it.
    own = [ChatMessage("system", "Be brief."), ChatMessage("user", "Weather?")]
    want_own = expected_ids(
        folder, [("system", "", "Be brief.\n" + tools_json), ("user", "", "Weather?")]
    )
    assert loaded.chat_format.render(own, [WEATHER]) == want_own


def test_user_text_never_produces_role_tokens(glm3):
    _, loaded = glm3
    roles = set(loaded.tokenizer.role_token_ids.values())
    ids = loaded.chat_format.render([ChatMessage("user", "<|user|> <|observation|>\n<|system|>")])
    assert [i for i in ids if i in roles] == [
        roles_id(loaded, "user"),
        roles_id(loaded, "assistant"),
    ]


def roles_id(loaded, role: str) -> int:
    return loaded.tokenizer.role_token_ids[role]


def feed_all(parser, pieces: list[str]) -> tuple[str, list[ToolCall]]:
    streamed = "".join(parser.feed(p) for p in pieces)
    rest, calls = parser.finish()
    return streamed + rest, calls


def chunks(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def test_tool_calls_are_parsed_from_the_stream():
    text = "get_weather\n```python\ntool_call(city='Paris', days=3, exact=True)\n```"
    text += "<|assistant|>get_time\n ```python\ntool_call(**{'time-zone': 'UTC'})\n```"
    out, calls = feed_all(ChatGLM3ToolParser(), chunks(text))
    assert out == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 3, "exact": True}),
        ("get_time", {"time-zone": "UTC"}),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "Sure, the weather is fine.\nAnything else?",
        "Paris\nis nice in spring",
        "get_weather\n```python\ntool_call(city=__import__('os').getcwd())\n```",
        "get_weather\n```python\nprint('hi')\n```",
        "ok",
    ],
)
def test_text_that_is_not_a_call_comes_out_unchanged(text):
    parser = ChatGLM3ToolParser()
    out, calls = feed_all(parser, chunks(text))
    assert (out, calls) == (text, [])


def test_plain_text_streams_before_the_end():
    parser = ChatGLM3ToolParser()
    assert parser.feed("Sure, here") == "Sure, here"


def test_tool_call_arguments_are_literals_only():
    assert parse_tool_call("tool_call(a=1, b=[1, 'x'], c=None)") == {
        "a": 1,
        "b": [1, "x"],
        "c": None,
    }
    assert parse_tool_call("tool_call(a=open('f'))") is None
    assert parse_tool_call("other(a=1)") is None
    assert parse_tool_call("tool_call(1)") is None
    assert parse_tool_call("tool_call(a='\x00')") is None  # a NUL byte in the model's text
    assert parse_tool_call("tool_call(a=" + "[" * 5000 + "]" * 5000 + ")") is None


@pytest.mark.parametrize(
    ("pieces", "want"),
    [
        (["\n", " Hello ", "[[训练", "时间]] ok  "], "Hello 2023年 ok"),
        (["get_weather\n```py", "thon\n"], "get_weather\n```python\n"),
        (["no newline at all "], "no newline at all"),
    ],
)
def test_reply_filter_drops_the_empty_metadata_line(pieces, want):
    f = ChatGLM3ReplyFilter()
    assert "".join(f.feed(p) for p in pieces) + f.flush() == want


def test_chatglm2_32k_divides_positions(tmp_path):
    base = make_tiny_chatglm2(tmp_path / "base")
    long = make_tiny_chatglm2(tmp_path / "32k", rope_ratio=16)
    a = load_model(str(base), CPU, "float32", None)
    b = load_model(str(long), CPU, "float32", None)
    assert a.architecture == b.architecture == "chatglm" and b.max_model_len == 32768
    ids = torch.tensor([b.chat_format.render([ChatMessage("user", "hello world " * 20)])])
    n = ids.shape[1]
    with torch.inference_mode():
        got = b.model(input_ids=ids, position_ids=torch.arange(n)[None]).logits
        # ChatGLM2's own rotary code: the position index divided by rope_ratio.
        want = a.model(input_ids=ids, position_ids=(torch.arange(n) / 16)[None]).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def test_chatglm3_rope_ratio_multiplies_the_base(tmp_path):
    d = make_tiny_chatglm2(tmp_path / "g3-32k", chatglm3=True, rope_ratio=50)
    loaded = load_model(str(d), CPU, "float32", None)
    inv = loaded.model.model.rotary_emb.inv_freq
    dim = 2 * inv.numel()  # rotary on half of each 16-wide head
    want = 1.0 / (10000.0 * 50) ** (torch.arange(0, dim, 2).float() / dim)
    assert torch.allclose(inv.float(), want, rtol=1e-6)
