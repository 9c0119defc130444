"""Hermes-style tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

The format of the transformers chat templates that take ``tools`` (Qwen2.5, Hermes 2/3,
SmolLM3...). Text outside the tags streams as it comes, minus a tail that could still be
the start of ``<tool_call>``. Inside a tag the call's name and then its ``arguments`` object
stream as they are generated (``take_deltas``, see ``call_stream``); such a call's arguments
are its raw JSON text, so the fragments join into it exactly, and a call once named stays a
call. A call that was never named and does not parse stays in the reply as text, so nothing
the model wrote is lost.
"""

from __future__ import annotations

import json

from .base import ToolCall, arguments_json
from .call_stream import CallDelta, CallStream

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
        self._streams: list[CallStream] = []  # one per call tag
        self._scanned = 0  # characters of the open call's pending text already scanned
        self._deltas: list[CallDelta] = []

    def take_deltas(self) -> list[CallDelta]:
        """The call pieces found since the last call (see ``CallStream``)."""
        out, self._deltas = self._deltas, []
        return out

    def feed(self, text: str) -> str:
        self._pending += text
        out: list[str] = []
        while True:
            if self._in_call:
                # Scanned up to the closing tag at most (the scan ignores what follows the
                # call's object; a body that is not JSON stops it).
                self._deltas += self._streams[-1].feed(self._pending[self._scanned :])
                self._scanned = len(self._pending)
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
            self._scanned = 0
            named = sum(s.announced for s in self._streams)
            self._streams.append(CallStream(first_index=named))

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest = self._pending
        if self._in_call:  # the reply ended (eos) before the closing tag
            self._bodies.append(rest)
            self._raw.append(OPEN + rest)
            rest = ""
        calls: list[ToolCall] = []
        text = rest
        for body, raw, stream in zip(self._bodies, self._raw, self._streams, strict=True):
            call = parse_call(body.strip())
            if stream.announced:  # named while streaming: a call, whatever follows
                c = stream.calls[0]
                args = c.arguments if c.streamed else call.arguments if call else "{}"
                calls.append(ToolCall("", c.name or "", args))
            elif call is None:
                text += raw
            else:
                calls.append(call)
        return text.strip() if calls else text, calls
