"""Tool calls on real processes, through the bridge with the openai SDK.

- The generic format (SmolLM2's template knows no tools): the tiny *random* model, so forced
  calls (``required``, a named function) are valid only because decoding is constrained, and
  ``auto`` replies are unwrapped from the generic JSON.
- The native format: a scripted model (greedy reply fixed by its weights) whose chat template
  takes ``tools`` and spells calls as Hermes ``<tool_call>`` JSON; the server parses them.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import jsonschema
import openai
import pytest
from procs import Proc, start_bridge, start_model_server

from glmserve.v1 import chat_pb2, chat_pb2_grpc
from model_server.models.hermes import HermesToolParser

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}},
]  # fmt: skip
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these tools: {{ tools | tojson }}\n"
    'Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{% endif %}'
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>"
    '{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}</tool_call>'
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SCRIPT = '<tool_call>{"name":"lookup", "arguments": {"q" :7}}'  # tokens all distinct


@pytest.fixture(scope="module")
def server(api_stack: tuple[Proc, Proc]) -> Proc:
    return api_stack[0]


@pytest.fixture(scope="module")
def client(api_stack: tuple[Proc, Proc]) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_stack[1].url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def check_calls(calls: list) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert isinstance(call.function.arguments, str)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def streamed_calls(chunks: Iterator, pieces: dict | None = None) -> tuple[list[dict], str | None]:
    """Reassembles streamed tool-call deltas the way clients do (by index); ``pieces`` counts
    each call's non-empty argument fragments."""
    calls: dict[int, dict] = {}
    finish = None
    pieces = {} if pieces is None else pieces
    for chunk in chunks:
        for choice in chunk.choices:
            assert finish is None or not choice.delta.tool_calls  # nothing after the end
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                if d.id:  # the first delta of a call: id, type and name
                    assert d.type == "function" and d.function.name and d.index not in calls
                    calls[d.index] = {"name": d.function.name, "arguments": ""}
                calls[d.index]["arguments"] += d.function.arguments or ""
                pieces[d.index] = pieces.get(d.index, 0) + bool(d.function.arguments)
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "add"}}], ids=["req", "named"]
)
def test_forced_calls_are_valid_and_streams_reassemble(
    client: openai.OpenAI, model: str, choice: object
) -> None:
    # One call per reply: a random model would otherwise go on calling until max_tokens.
    args = dict(model=model, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=250,
                temperature=0.8, parallel_tool_calls=False)  # fmt: skip
    for seed in range(2):
        out = client.chat.completions.create(**args, seed=seed)
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls" and message.content is None
        check_calls(message.tool_calls)
        if isinstance(choice, dict):
            assert [c.function.name for c in message.tool_calls] == ["add"]
        pieces: dict[int, int] = {}
        stream = client.chat.completions.create(**args, seed=seed, stream=True)
        calls, finish = streamed_calls(stream, pieces)
        assert finish == "tool_calls"
        assert calls == [
            {"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls
        ]
        assert pieces[0] > 2  # the arguments streamed as they were generated, not whole


def test_call_cut_short_by_max_tokens(client: openai.OpenAI, model: str) -> None:
    """max_tokens ends a forced call mid-arguments: the call comes back as far as it got with
    finish_reason "length" (as OpenAI does), the same streamed and not."""
    args = dict(model=model, messages=ASK, tools=TOOLS, max_tokens=20, temperature=0,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})  # fmt: skip
    out = client.chat.completions.create(**args)
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments.startswith("{")
    with pytest.raises(ValueError):  # really cut: not a whole JSON object yet
        json.loads(call.function.arguments)
    calls, finish = streamed_calls(client.chat.completions.create(**args, stream=True))
    assert finish == "length"
    assert calls == [{"name": "get_weather", "arguments": call.function.arguments}]


def test_auto_generic_format_unwraps(client: openai.OpenAI, model: str) -> None:
    """Agents send tools with no tool_choice to every model: never a 400; the reply is a
    plain answer or valid calls, never the generic JSON wrapper."""
    for seed in range(2):
        out = client.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, max_tokens=40, temperature=1.0, seed=seed
        )
        choice = out.choices[0]
        if choice.message.tool_calls and choice.finish_reason == "length":
            # Cut mid-call by max_tokens: the calls as far as they got (as OpenAI does; see
            # test_call_cut_short_by_max_tokens), still named, never the wrapper.
            assert all(c.function.name in SCHEMAS for c in choice.message.tool_calls)
        elif choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            check_calls(choice.message.tool_calls)
        else:
            assert not choice.message.content.startswith('{"response"')
        streamed = client.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, max_tokens=40, temperature=1.0, seed=seed,
            stream=True,
        )  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        if not choice.message.tool_calls:
            assert text == choice.message.content


def test_tool_history_is_accepted(
    client: openai.OpenAI, model: str, server: Proc, tiny_model_dir: Path
) -> None:
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"},
    ]  # fmt: skip
    out = client.chat.completions.create(model=model, messages=history, tools=TOOLS, max_tokens=5)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The generic format shows the call and its result to the model as JSON turns.
    with grpc.insecure_channel(server.target) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        tokens = stub.Tokenize(chat_pb2.TokenizeRequest(messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content="hi"),
            chat_pb2.Message(role=chat_pb2.ROLE_ASSISTANT, tool_calls=[
                chat_pb2.ToolCall(id="c1", name="add", arguments='{"a": 1, "b": 2}')]),
            chat_pb2.Message(role=chat_pb2.ROLE_TOOL, tool_call_id="c1", content="3"),
        ]))  # fmt: skip
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(tiny_model_dir).decode(tokens.token_ids)
    assert '{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}' in text
    assert '{"tool_result": {"name": "add", "id": "c1", "content": "3"}}' in text


def test_tool_errors(client: openai.OpenAI, model: str) -> None:
    lookbehind = {"type": "string", "pattern": "(?<=a)b"}
    bad = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": lookbehind}}}}]  # fmt: skip
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=ASK, tools=bad, tool_choice="required")
    assert err.value.param == "tools[0].function.parameters"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model, messages=ASK, tools=TOOLS, response_format={"type": "json_object"}
        )
    assert err.value.status_code == 400


# ---- native (Hermes) format -----------------------------------------------------------------


def test_hermes_parser_streams_text_and_finds_calls() -> None:
    reply = 'Let me check. <tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    for cut in range(1, len(reply)):
        parser = HermesToolParser()
        text = parser.feed(reply[:cut]) + parser.feed(reply[cut:])
        rest, calls = parser.finish()
        assert (text + rest).strip() == "Let me check."
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1})]
    parser = HermesToolParser()
    sent = parser.feed("a <tool_") + parser.feed("nope>")
    assert sent + parser.finish()[0] == "a <tool_nope>"  # held back, then released unchanged
    parser = HermesToolParser()
    parser.feed("<tool_call>not json</tool_call>")
    assert parser.finish() == ("<tool_call>not json</tool_call>", [])


def replay(parser, reply: str) -> tuple[str, list, dict[int, list], int]:  # noqa: ANN001
    """Feeds ``reply`` one character at a time: (text, final calls, each call's deltas as
    [name, arguments joined], how many argument characters the deltas carried)."""
    text, deltas, early = "", {}, 0
    for c in reply:
        text += parser.feed(c)
        for d in parser.take_deltas():
            if d.name is not None:
                assert d.index not in deltas
                deltas[d.index] = [d.name, ""]
            deltas[d.index][1] += d.arguments
            early += len(d.arguments)
    rest, calls = parser.finish()
    assert parser.take_deltas() == []
    return text + rest, calls, deltas, early


def test_calls_stream_as_generated_and_join_into_the_final_call() -> None:
    from model_server.tools import GenericReplyParser

    generic = ('{"tool_calls":[{"name":"get_weather","arguments":{"city":"Pa\\"ris}",'
               '"n":[1,{"x":null}]}},{"name":"add","arguments":{"a":1,"b":-2.5e3}}]}')  # fmt: skip
    hermes = ('Sure. <tool_call>\n{"arguments": {"x": [1, "}"]}, "name": "f"}\n</tool_call>'
              '<tool_call>{"name": "g", "parameters": {}}</tool_call>'
              '<tool_call>{"name": "h", "arguments": "{\\"y\\": 2}"}</tool_call>')  # fmt: skip
    for parser, reply, names in ((GenericReplyParser(), generic, ["get_weather", "add"]),
                                 (HermesToolParser(), hermes, ["f", "g", "h"])):  # fmt: skip
        text, calls, deltas, early = replay(parser, reply)
        assert [c.name for c in calls] == names and text.strip() in ("", "Sure.")
        for k, call in enumerate(calls):
            json.loads(call.arguments)  # always JSON text
            name, streamed = deltas[k]
            # Every object streamed whole before the reply ended; a double-encoded one ("h")
            # is parsed at the end, and sent then.
            assert name == call.name and streamed == ("" if name == "h" else call.arguments)
        assert early == sum(len(deltas[k][1]) for k in deltas)
    assert json.loads(calls[2].arguments) == {"y": 2}

    # Cut short by max_tokens: the calls already named stay calls, as far as they got.
    text, calls, deltas, _ = replay(GenericReplyParser(), generic[:60])
    assert text == "" and [c.name for c in calls] == ["get_weather"]
    assert calls[0].arguments == deltas[0][1] == generic[generic.index('{"city"') : 60]


@pytest.fixture(scope="module")
def hermes_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer: Path) -> Path:
    from tiny_models import make_scripted_llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer)
    tok.chat_template = HERMES_TEMPLATE
    tok_dir = tmp_path_factory.mktemp("hermes-tok")
    tok.save_pretrained(tok_dir)
    return make_scripted_llama(tmp_path_factory.mktemp("hermes") / "model", tok_dir, SCRIPT)


def test_native_hermes_calls_are_parsed(hermes_model_dir: Path) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    with (
        start_model_server(str(hermes_model_dir)) as server,
        start_bridge("--backend", server.target, "--no-ui") as bridge,
    ):
        client = openai.OpenAI(base_url=bridge.url + "/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        out = client.chat.completions.create(
            model=model, messages=ASK, tools=tools, temperature=0, max_tokens=50
        )
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        [call] = choice.message.tool_calls
        assert call.function.name == "lookup" and json.loads(call.function.arguments) == {"q": 7}
        pieces: dict[int, int] = {}
        calls, finish = streamed_calls(client.chat.completions.create(
            model=model, messages=ASK, tools=tools, temperature=0, max_tokens=50, stream=True
        ), pieces)  # fmt: skip
        assert finish == "tool_calls"
        assert calls == [{"name": "lookup", "arguments": call.function.arguments}]
        assert pieces[0] > 1  # streamed as generated
        # Without tools the same reply is plain text: nothing is parsed.
        plain = client.chat.completions.create(model=model, messages=ASK, temperature=0,
                                               max_tokens=50)  # fmt: skip
        assert plain.choices[0].message.content == SCRIPT
        server.stop(signal.SIGKILL)


def test_langchain_bind_tools_and_structured_output(client: openai.OpenAI, model: str) -> None:
    """LangChain's ChatOpenAI as agents use it: bind_tools (named and auto) and
    with_structured_output (json_schema), against the tiny random model."""
    from typing import Literal

    import pydantic
    from langchain_openai import ChatOpenAI

    # extra="forbid": additionalProperties false, or a random model may add properties forever.
    class GetWeather(pydantic.BaseModel, extra="forbid"):
        """The weather in a city now."""

        city: str = pydantic.Field(max_length=12)
        unit: Literal["celsius", "fahrenheit"]

    class Person(pydantic.BaseModel, extra="forbid"):
        name: str = pydantic.Field(max_length=12)
        age: int

    llm = ChatOpenAI(base_url=str(client.base_url), api_key="unused", model=model,
                     max_retries=0, temperature=0.7, max_tokens=200, seed=1)  # fmt: skip
    forced = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("Weather in Paris?")
    [call] = forced.tool_calls
    assert call["name"] == "GetWeather" and call["id"].startswith("call_")
    GetWeather(**call["args"])
    # Streamed (same seed): LangChain's chunks add up to the same call, arguments in pieces.
    forcing = llm.bind_tools([GetWeather], tool_choice="GetWeather")
    chunks = list(forcing.stream("Weather in Paris?"))
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert [(c["name"], c["args"]) for c in total.tool_calls] == [(call["name"], call["args"])]
    assert sum(bool(c.tool_call_chunks and c.tool_call_chunks[0]["args"]) for c in chunks) > 2
    auto = llm.bind_tools([GetWeather]).invoke("Hi!")  # no tool_choice: auto, never a 400
    for call in auto.tool_calls:
        GetWeather(**call["args"])
    person = llm.with_structured_output(Person).invoke("Describe someone.")
    assert isinstance(person, Person)


def test_forced_call_on_chatglm2(tiny_chatglm2_dir: Path) -> None:
    """ChatGLM2 has no tool format and a SentencePiece vocabulary: the generic format's
    constrained call is still valid (the grammar engine reads its tokens' own bytes)."""
    with start_model_server(str(tiny_chatglm2_dir)) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            for seed in range(2):
                request = chat_pb2.ChatRequest(
                    messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content="Paris?")],
                    tools=[chat_pb2.Tool(name="get_weather", parameters=json.dumps(WEATHER))],
                    tool_choice=chat_pb2.TOOL_CHOICE_MODE_REQUIRED, parallel_tool_calls=False,
                    max_tokens=120, temperature=0.8, seed=seed,
                )  # fmt: skip
                last = list(stub.Chat(request))[-1]
                assert last.finish_reason == chat_pb2.FINISH_REASON_TOOL_CALLS
                [call] = last.tool_calls
                assert call.name == "get_weather" and call.id.startswith("call_")
                jsonschema.validate(json.loads(call.arguments), WEATHER)
        server.stop(signal.SIGKILL)


def test_generic_reply_streams_the_decoded_answer() -> None:
    """{"response": "..."} arrives token by token: every split gives the same decoded text."""
    from model_server.tools import GenericReplyParser

    reply = r'{"response":"Hi \"you\"\n\u00e9\ud83d\ude00 \udc00!"}'
    want = 'Hi "you"\né😀 \ufffd!'
    for cut in range(1, len(reply)):
        parser = GenericReplyParser()
        text = parser.feed(reply[:cut]) + parser.feed(reply[cut:])
        assert text + parser.finish()[0] == want, cut


def test_template_that_refuses_a_late_system_turn_gets_it_merged(smollm_tokenizer: Path) -> None:
    from transformers import AutoTokenizer

    from model_server.models.base import ChatMessage
    from model_server.models.hf import TemplateChatFormat

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
        "{{ raise_exception('system only first') }}{% endif %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n"
    )
    fmt = TemplateChatFormat(tok)
    text = tok.decode(fmt.render([
        ChatMessage("system", "S"), ChatMessage("user", "q"), ChatMessage("assistant", "a"),
        ChatMessage("system", "Sum up."),
    ]))  # fmt: skip
    assert text.endswith("<|im_start|>user\nSum up.<|im_end|>\n<|im_start|>assistant")
    assert text.startswith("<|im_start|>system\nS<|im_end|>")
