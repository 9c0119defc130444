"""Tool calling: ChatRequest.tools / tool_choice → prompt messages, a grammar, a reply parser.

Two ways, chosen per model (docs/bridge.md#tools):

- **Native**: the chat format has a tool-call parser (``ChatFormat.tool_call_parser()``, e.g.
  transformers templates with Hermes ``<tool_call>`` tags, ChatGLM3). With ``auto`` the tools
  are rendered by the format and the model's own calls are parsed out of its reply.
- **Generic** (the embedded SmolLM2, ChatGLM2, any template without tools), as llama.cpp does
  for such templates: the tools are described in the system turn and the reply is constrained
  to one JSON object, ``{"response": "<text>"}`` or ``{"tool_calls": [{"name", "arguments"}]}``,
  which the server unwraps (the text streams as it is decoded).

``required`` and a named function are forced on every model the generic way: decoding is
constrained to ``{"tool_calls": [...]}`` whose items are valid calls (name plus arguments that
match the tool's schema); a native model still sees the tools rendered its own way.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from glmserve.v1 import chat_pb2

from .models.base import ChatMessage, ToolCall, ToolSpec, arguments_json
from .models.call_stream import CallDelta, CallStream
from .validation import InvalidArgument

if TYPE_CHECKING:
    from .engine.grammar import Grammars

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MODES = {
    chat_pb2.TOOL_CHOICE_MODE_NONE: "none",
    chat_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    chat_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
    chat_pb2.TOOL_CHOICE_MODE_FUNCTION: "function",
}


@dataclass
class ToolPlan:
    """How one request uses tools. ``tools`` is None when the model must not see any."""

    mode: str  # none, auto, required, function
    native: bool
    tools: list[ToolSpec] | None
    messages: list[ChatMessage]
    schema: dict[str, Any] | None = None  # the generic JSON the reply is constrained to
    parser: Any = field(default=None)  # a fresh base.ToolCallParser for the reply, or None
    specs: list[ToolSpec] = field(default_factory=list)  # the request's tools, in order


def tool_specs(request: chat_pb2.ChatRequest) -> list[ToolSpec]:
    if len(request.tools) > MAX_TOOLS:
        raise InvalidArgument("tools", f"at most {MAX_TOOLS} tools (got {len(request.tools)})")
    specs, seen = [], set()
    for i, t in enumerate(request.tools):
        if not _NAME.match(t.name):
            raise InvalidArgument(f"tools[{i}].name", "1 to 64 characters of [A-Za-z0-9_-]")
        if t.name in seen:
            raise InvalidArgument(f"tools[{i}].name", f"{t.name!r} is defined twice")
        seen.add(t.name)
        try:
            params = json.loads(t.parameters) if t.parameters else {"type": "object"}
        except ValueError as exc:
            raise InvalidArgument(f"tools[{i}].parameters", f"not valid JSON: {exc}") from None
        if not isinstance(params, dict):
            raise InvalidArgument(f"tools[{i}].parameters", "must be a JSON schema object")
        specs.append(ToolSpec(t.name, t.description, params))
    return specs


def mode_of(request: chat_pb2.ChatRequest, specs: list[ToolSpec]) -> str:
    mode = _MODES.get(request.tool_choice, "auto" if specs else "none")
    if mode in ("required", "function") and not specs:
        raise InvalidArgument("tool_choice", f"{mode} needs tools")
    if mode == "function" and request.tool_choice_function not in {s.name for s in specs}:
        raise InvalidArgument(
            "tool_choice_function", f"{request.tool_choice_function!r} is not one of the tools"
        )
    return mode


def plan(
    request: chat_pb2.ChatRequest | chat_pb2.TokenizeRequest,
    messages: list[ChatMessage],
    chat_format: Any,
) -> ToolPlan:
    """Decide prompt, grammar and parser for a request's tools (no model work yet)."""
    specs = tool_specs(request)
    mode = mode_of(request, specs)
    make_parser = getattr(chat_format, "tool_call_parser", None)
    native = make_parser is not None and make_parser() is not None
    if mode == "none":
        msgs = messages if native else generic_history(messages)
        return ToolPlan(mode, native, None, msgs)
    if isinstance(request, chat_pb2.ChatRequest) and request.HasField("structured_output"):
        raise InvalidArgument("structured_output", "cannot be combined with tools")
    if native and mode == "auto":
        return ToolPlan(mode, True, specs, messages, parser=make_parser())
    if mode == "function":
        specs_called = [s for s in specs if s.name == request.tool_choice_function]
    else:
        specs_called = specs
    single = isinstance(request, chat_pb2.ChatRequest) and (
        request.HasField("parallel_tool_calls") and not request.parallel_tool_calls
    )
    schema = reply_schema(specs_called, "function" if single and mode != "auto" else mode, single)
    if native:
        return ToolPlan(mode, True, specs, messages, schema, GenericReplyParser(), specs)
    msgs = with_tool_prompt(generic_history(messages), specs, mode, request.tool_choice_function)
    return ToolPlan(mode, False, None, msgs, schema, GenericReplyParser(), specs)


def grammar_for(grammars: Grammars, plan_: ToolPlan) -> str | None:
    """The plan's grammar, checked; a bad tool schema is named by its index."""
    if plan_.schema is None:
        return None
    try:
        return grammars.json_schema(plan_.schema, "tools")
    except InvalidArgument:
        for i, spec in enumerate(plan_.specs):
            grammars.json_schema(spec.parameters, f"tools[{i}].parameters")
        raise


# ---- the generic format ---------------------------------------------------------------------


def call_schema(spec: ToolSpec) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": spec.name}, "arguments": spec.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def reply_schema(specs: list[ToolSpec], mode: str, single: bool = False) -> dict[str, Any]:
    items = call_schema(specs[0]) if len(specs) == 1 else {"anyOf": [call_schema(s) for s in specs]}
    calls: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if mode == "function" or single:
        calls["maxItems"] = 1
    forced = {
        "type": "object",
        "properties": {"tool_calls": calls},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    if mode != "auto":
        return forced
    answer = {
        "type": "object",
        "properties": {"response": {"type": "string"}},
        "required": ["response"],
        "additionalProperties": False,
    }
    return {"anyOf": [answer, forced]}


def tool_prompt(specs: list[ToolSpec], mode: str, function: str) -> str:
    listing = json.dumps(
        [{"name": s.name, "description": s.description, "parameters": s.parameters} for s in specs],
        ensure_ascii=False,
    )
    call = '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}'
    if mode == "auto":
        how = (
            'Reply with one JSON object: {"response": "<your reply to the user>"}, or, to call '
            f"one or more tools, {call}."
        )
    elif mode == "function":
        how = f"Call the tool {function!r} now. Reply with one JSON object: {call}."
    else:
        how = f"Call one or more tools now. Reply with one JSON object: {call}."
    return f"You can call these tools:\n{listing}\n\n{how}"


def with_tool_prompt(
    messages: list[ChatMessage], specs: list[ToolSpec], mode: str, function: str
) -> list[ChatMessage]:
    text = tool_prompt(specs, mode, function)
    if messages and messages[0].role == "system":
        first = messages[0]
        return [ChatMessage("system", f"{first.content}\n\n{text}"), *messages[1:]]
    return [ChatMessage("system", text), *messages]


def generic_history(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Tool turns in the generic format: an assistant's calls as the JSON it would have
    written, tool results as a user turn (consecutive results in one)."""
    names = {c.id: c.name for m in messages for c in m.tool_calls}
    out: list[ChatMessage] = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            calls = [{"name": c.name, "arguments": _loads(c.arguments)} for c in m.tool_calls]
            out.append(ChatMessage("assistant", json.dumps({"tool_calls": calls})))
        elif m.role == "tool":
            result = {
                "tool_result": {
                    "name": m.name or names.get(m.tool_call_id, ""),
                    "id": m.tool_call_id,
                    "content": m.content,
                }
            }
            text = json.dumps(result, ensure_ascii=False)
            if out and out[-1].role == "user" and out[-1].content.startswith('{"tool_result"'):
                text = f"{out.pop().content}\n{text}"
            out.append(ChatMessage("user", text))
        else:
            out.append(m)
    return out


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class GenericReplyParser:
    """Unwraps the generic JSON reply. ``{"response": "..."}``: the string's content streams
    as it is decoded (escapes resolved); ``{"tool_calls": [...]}``: each call's name and
    arguments stream as they are generated (``take_deltas``), and each call's arguments are
    its raw JSON text as written, so the fragments join into it exactly. A reply cut short
    (max_tokens) keeps the calls already named, with the arguments written so far. Anything
    else comes out as written."""

    _ANSWER = '{"response":"'

    def __init__(self) -> None:
        self._raw = ""
        self._sent = 0  # characters of the string's body already decoded and sent
        self._closed = False
        self._calls = CallStream("tool_calls")
        self._deltas: list[CallDelta] = []

    def take_deltas(self) -> list[CallDelta]:
        """The call pieces found since the last call (see ``CallStream``)."""
        out, self._deltas = self._deltas, []
        return out

    def feed(self, text: str) -> str:
        self._raw += text
        self._deltas += self._calls.feed(text)
        if not self._raw.startswith(self._ANSWER) or self._closed:
            return ""
        body = self._raw[len(self._ANSWER) :]
        out, used, closed = _decode_partial(body, self._sent)
        self._sent = used
        self._closed = closed
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        raw = self._raw
        if raw.startswith(self._ANSWER):
            return ("", []) if self._closed else (raw[len(self._ANSWER) + self._sent :], [])
        named = [c for c in self._calls.calls if c.name is not None]
        try:
            obj = json.loads(raw)
        except ValueError:  # cut short: the calls already announced, as far as they got
            calls = [ToolCall("", c.name or "", c.arguments) for c in named]
            return ("", calls) if calls else (raw, [])
        calls = obj.get("tool_calls") if isinstance(obj, dict) else None
        if not isinstance(calls, list):
            return raw, []
        out = []
        for k, c in enumerate(calls):
            if isinstance(c, dict) and isinstance(c.get("name"), str):
                args = self._calls.arguments(k)
                if args is None:
                    args = arguments_json(c.get("arguments", {}))
                out.append(ToolCall("", c["name"], args))
        return ("", out) if out else (raw, [])


_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _decode_partial(body: str, start: int) -> tuple[str, int, bool]:
    """Decodes a JSON string body from ``start``: (text, position reached, closing quote seen).
    Stops before an escape that is not complete yet."""
    out: list[str] = []
    i = start
    while i < len(body):
        c = body[i]
        if c == '"':
            return "".join(out), i + 1, True
        if c != "\\":
            out.append(c)
            i += 1
            continue
        if i + 1 >= len(body):
            break
        e = body[i + 1]
        if e != "u":
            out.append(_ESCAPES.get(e, e))
            i += 2
            continue
        if i + 6 > len(body):
            break
        code = int(body[i + 2 : i + 6], 16)
        if 0xD800 <= code < 0xDC00:  # a surrogate pair: wait for the low half
            if i + 12 > len(body):
                break
            low = int(body[i + 8 : i + 12], 16) if body[i + 6 : i + 8] == "\\u" else -1
            if 0xDC00 <= low < 0xE000:
                out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                i += 12
                continue
        # A lone surrogate is not text (and protobuf refuses it): U+FFFD, as decoders do.
        out.append("\ufffd" if 0xD800 <= code < 0xE000 else chr(code))
        i += 6
    return "".join(out), i, False


def new_call_id() -> str:
    """OpenAI's shape: ``call_`` + 24 characters."""
    return f"call_{uuid.uuid4().hex[:24]}"


def with_ids(calls: list[ToolCall], known: dict[int, str] | None = None) -> list[ToolCall]:
    """Calls the server made get unique ids; ``known``: the ids already streamed, by index."""
    known = known or {}
    return [
        c if c.id else ToolCall(known.get(k) or new_call_id(), c.name, c.arguments)
        for k, c in enumerate(calls)
    ]
