"""Hermes-style tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

The format of the transformers chat templates that take ``tools`` (Qwen2.5, Hermes 2/3,
SmolLM3...). Text outside the tags streams as it comes, minus a tail that could still be
the start of ``<tool_call>``; a call's JSON is collected and parsed at the end. A call that
does not parse stays in the reply as text, so nothing the model wrote is lost.
"""

from __future__ import annotations

import json

from .base import ToolCall, arguments_json

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


def _held_tail(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def parse_call(body: str) -> ToolCall | None:
    """``{"name": str, "arguments": object}`` (``parameters`` also seen) → ToolCall."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall("", obj["name"], arguments_json(args))


class HermesToolParser:
    """A :class:`~model_server.models.base.ToolCallParser` for ``<tool_call>`` tags."""

    def __init__(self) -> None:
        self._pending = ""  # text not yet sent (a possible tag start, or a call's body)
        self._in_call = False
        self._bodies: list[str] = []
        self._raw: list[str] = []  # calls as written, in case they do not parse

    def feed(self, text: str) -> str:
        self._pending += text
        out: list[str] = []
        while True:
            if self._in_call:
                end = self._pending.find(CLOSE)
                if end < 0:
                    return "".join(out)
                self._bodies.append(self._pending[:end])
                self._raw.append(OPEN + self._pending[: end + len(CLOSE)])
                self._pending = self._pending[end + len(CLOSE) :]
                self._in_call = False
                continue
            start = self._pending.find(OPEN)
            if start < 0:
                keep = _held_tail(self._pending, OPEN)
                cut = len(self._pending) - keep
                out.append(self._pending[:cut])
                self._pending = self._pending[cut:]
                return "".join(out)
            out.append(self._pending[:start])
            self._pending = self._pending[start + len(OPEN) :]
            self._in_call = True

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest = self._pending
        if self._in_call:  # the reply ended (eos) before the closing tag
            self._bodies.append(rest)
            self._raw.append(OPEN + rest)
            rest = ""
        calls: list[ToolCall] = []
        text = rest
        for body, raw in zip(self._bodies, self._raw, strict=True):
            call = parse_call(body.strip())
            if call is None:
                text += raw
            else:
                calls.append(call)
        return text.strip() if calls else text, calls
