"""ChatGLM3's role-tagged chat format, its tool calls, and its reply post-processing.

The layout, from the published tokenizer and chat code (facts, not code):

- the prompt is ``[gMASK] sop`` and then, per message, ``<|role|>`` + encode(metadata + "\\n")
  + encode(content), ending with ``<|assistant|>``; roles are system, user, assistant and
  observation (a tool's result). Role tokens are ids, never produced by encoding text;
- tools are given as a JSON list of function definitions (``name``, ``description``,
  ``parameters``) after the system text: ``content + "\\n" + json.dumps(tools, indent=4,
  ensure_ascii=False)``. The original OpenAI demo adds the system message "Answer the
  following questions as best as you can. You have access to the following tools:" for them;
  here a client's own first system message keeps its text and gets the tools appended;
- the model answers after ``<|assistant|>`` with a metadata line then the content. An empty
  metadata line is a plain reply; a tool name there is a call, whose content is
  ``\\`\\`\\`python\\ntool_call(arg=value, ...)\\n\\`\\`\\```; several calls are separated by
  ``<|assistant|>``. Generation stops at ``<|user|>`` and ``<|observation|>`` (and eos);
- a plain reply is stripped and ``[[训练时间]]`` becomes ``2023年``, as for ChatGLM2.

Tool-call arguments are read with ``ast`` (literals only), never evaluated.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from typing import Any

from model_server.models.base import ChatMessage, ConversationError, ToolCall, ToolSpec
from model_server.models.chatglm2.chat_format import ReplyFilter
from model_server.models.chatglm2.tokenizer import ChatGLM2Tokenizer

TOOLS_SYSTEM = (
    "Answer the following questions as best as you can. You have access to the following tools:"
)
CALL_START = "```python\ntool_call("
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")
_CALL = re.compile(r"\A\s*```python\s*\n(.*?)\n?\s*```\s*\Z", re.DOTALL)
_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "observation"}


def tool_call_text(call: ToolCall) -> str:
    """An assistant tool call as ChatGLM3 writes it: ``tool_call(key=value, ...)`` in a fence."""
    try:
        args = json.loads(call.arguments or "{}")
    except ValueError as exc:
        raise ConversationError(
            f"tool call {call.name!r}: arguments are not valid JSON ({exc})"
        ) from exc
    if not isinstance(args, dict):
        raise ConversationError(f"tool call {call.name!r}: arguments must be a JSON object")
    if all(isinstance(k, str) and k.isidentifier() for k in args):
        inner = ", ".join(f"{k}={v!r}" for k, v in args.items())
    else:
        inner = f"**{args!r}"
    return f"{CALL_START}{inner})\n```"


def parse_tool_call(code: str) -> dict[str, Any] | None:
    """``tool_call(a=1, b='x')`` (or ``**{...}``) → its arguments; None unless all literals."""
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # NUL bytes, deep nesting
        return None
    call = tree.body
    if not (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "tool_call"
        and not call.args
    ):
        return None
    args: dict[str, Any] = {}
    try:
        for kw in call.keywords:
            value = ast.literal_eval(kw.value)
            if kw.arg is not None:
                args[kw.arg] = value
            elif isinstance(value, dict) and all(isinstance(k, str) for k in value):
                args.update(value)
            else:
                return None
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None
    try:
        json.dumps(args)
    except (TypeError, ValueError):  # tuples are fine (lists in JSON); sets, bytes are not
        return None
    return args


class ChatGLM3ReplyFilter:
    """Drops the empty metadata line of a plain reply and post-processes it like ChatGLM2.

    A reply whose metadata line is not empty (a tool name) passes through unchanged, for the
    tool-call parser. The first line is held back until it ends.
    """

    def __init__(self) -> None:
        self._head = ""
        self._mode: str | None = None  # None: undecided, "plain" or "raw"
        self._plain = ReplyFilter()

    def feed(self, text: str) -> str:
        if self._mode == "raw":
            return text
        if self._mode == "plain":
            return self._plain.feed(text)
        self._head += text
        metadata, newline, rest = self._head.partition("\n")
        if not newline:
            return ""
        self._head = ""
        if metadata.strip():
            self._mode = "raw"
            return metadata + "\n" + rest
        self._mode = "plain"
        return self._plain.feed(rest)

    def flush(self) -> str:
        if self._mode is None:  # never a newline: all of it is the reply
            self._mode = "plain"
            return self._plain.feed(self._head) + self._plain.flush()
        return self._plain.flush() if self._mode == "plain" else ""


class ChatGLM3ToolParser:
    """A ``base.ToolCallParser`` for ChatGLM3's ``name\\n```python\\ntool_call(...)```" calls.

    Text streams through as soon as it cannot be a call: a first line that is not a bare
    name, or a second line that does not open ``tool_call(``. A call that does not parse is
    returned as text, so nothing the model wrote is lost.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._mode: str | None = None  # None: undecided, "text" or "call"

    def _decide(self) -> None:
        name, newline, rest = self._buf.partition("\n")
        if not _NAME.fullmatch(name.strip() or "x"):
            self._mode = "text"
        elif newline:
            rest = rest.lstrip(" ")
            if rest.startswith(CALL_START):
                self._mode = "call"
            elif not CALL_START.startswith(rest):
                self._mode = "text"

    def feed(self, text: str) -> str:
        if self._mode == "text":
            return text
        self._buf += text
        if self._mode is None:
            self._decide()
            if self._mode == "text":
                out, self._buf = self._buf, ""
                return out
        return ""

    def finish(self) -> tuple[str, list[ToolCall]]:
        text, self._buf = self._buf, ""
        if self._mode != "call":
            return text, []
        calls: list[ToolCall] = []
        for part in text.split("<|assistant|>"):
            name, _, content = part.partition("\n")
            match = _CALL.match(content)
            args = parse_tool_call(match.group(1)) if match else None
            if not _NAME.fullmatch(name.strip()) or args is None:
                return text, []
            calls.append(ToolCall("", name.strip(), json.dumps(args, ensure_ascii=False)))
        return "", calls


class ChatGLM3ChatFormat:
    """Implements ``base.ChatFormat`` for ChatGLM3 (system anywhere, tools, observations)."""

    def __init__(self, tokenizer: ChatGLM2Tokenizer) -> None:
        if "observation" not in tokenizer.role_token_ids:
            raise ValueError("ChatGLM3ChatFormat needs a tokenizer with role tokens")
        self.tokenizer = tokenizer

    def _message(self, role: str, metadata: str, content: str) -> list[int]:
        tok = self.tokenizer
        return [tok.role_token_ids[role], *tok.encode(metadata + "\n"), *tok.encode(content)]

    def messages(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] | None = None
    ) -> list[tuple[str, str, str]]:
        """(role, metadata, content) triples, tools folded into the system turn."""
        if not messages:
            raise ConversationError("the conversation needs at least one message")
        out: list[tuple[str, str, str]] = []
        tools_json = ""
        if tools:
            functions = [
                {"name": t.name, "description": t.description, "parameters": t.parameters}
                for t in tools
            ]
            tools_json = json.dumps(functions, indent=4, ensure_ascii=False)
            if messages[0].role != "system":
                out.append(("system", "", TOOLS_SYSTEM + "\n" + tools_json))
        for idx, m in enumerate(messages):
            role = _ROLES.get(m.role)
            if role is None:  # pragma: no cover - RoleName is a Literal
                raise ConversationError(f"messages[{idx}]: unknown role {m.role!r}")
            if idx == 0 and role == "system" and tools_json:
                out.append(("system", "", m.content + "\n" + tools_json))
            elif role == "assistant" and m.tool_calls:
                if m.content.strip():
                    out.append(("assistant", "", m.content))
                out.extend(("assistant", c.name, tool_call_text(c)) for c in m.tool_calls)
            else:
                out.append((role, "", m.content))
        return out

    def render(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] | None = None
    ) -> list[int]:
        """``[gMASK] sop``, each message, then ``<|assistant|>``. Raises ConversationError."""
        ids = list(self.tokenizer.prompt_prefix)
        for role, metadata, content in self.messages(messages, tools):
            ids += self._message(role, metadata, content)
        return [*ids, self.tokenizer.role_token_ids["assistant"]]

    def tool_call_parser(self) -> ChatGLM3ToolParser:
        return ChatGLM3ToolParser()

    def reply_filter(self) -> ChatGLM3ReplyFilter:
        return ChatGLM3ReplyFilter()
