"""Tool calls while they are generated: an incremental JSON scanner over a model's reply.

The OpenAI stream sends a call's id, type and name first, then its ``arguments`` in fragments
as they are generated. ``CallStream`` is fed the reply's JSON text piece by piece. It finds
each call object's ``"name"`` string and the raw text of its ``"arguments"`` object, and
returns them as :class:`CallDelta` items. A call is announced once its name is complete;
argument text seen before that is held back until then. The raw text is what the final call
carries as well (:attr:`CallStream.arguments`), so the fragments always join into the final
result exactly.

Where the calls sit: ``array_key=None``: the text is one call object (a Hermes
``<tool_call>`` body); ``array_key="tool_calls"``: the calls are the items of the top-level
object's ``tool_calls`` array (glmserve's generic format). Only an ``arguments`` value that
is an object is streamed. Any other value (a double-encoded string, say) is left to the
format's own parsing at the end. Text that is not JSON stops the scan: nothing more is
announced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_WS = " \t\r\n"
_ARGUMENTS = ("arguments", "parameters")  # Hermes-style models write either


@dataclass
class CallDelta:
    """A piece of call ``index``: its name on the first piece only, then argument text."""

    index: int
    name: str | None
    arguments: str


@dataclass
class _Frame:
    kind: str  # "o" object, "a" array
    key: str | None = None  # the object's current key
    items: int = 0  # the array's items started so far
    want_key: bool = True  # the object expects a key next (else a value)


@dataclass(eq=False)
class _Call:
    name: str | None = None
    held: str = ""  # argument text seen before the name was complete
    arguments: str = ""  # raw argument text, sent or held
    complete: bool = False  # the arguments value was closed
    streamed: bool = False  # the value is an object (its text is streamed)


class CallStream:
    def __init__(self, array_key: str | None = None, first_index: int = 0) -> None:
        self._array_key = array_key
        self._first = first_index
        self._stack: list[_Frame] = []
        self._in_string = False
        self._escape = False
        self._string = ""  # the string being read, when it is a key or a name
        self._keep_string = False
        self._string_role = ""  # "key" or "name"
        self._in_scalar = False  # a number, true, false or null
        self._capture: _Call | None = None  # the call whose arguments are being read
        self._capture_depth = 0
        self._broken = False
        self._done = False  # the top-level value is closed
        self.calls: list[_Call] = []
        self._out: list[CallDelta] = []

    # ---- results -------------------------------------------------------------------------

    @property
    def announced(self) -> int:
        """Calls whose name was complete (announced), in order."""
        return sum(1 for c in self.calls if c.name is not None)

    def arguments(self, k: int) -> str | None:
        """Call ``k``'s raw arguments text when it was streamed and is complete, else None."""
        call = self.calls[k] if k < len(self.calls) else None
        if call is None or not call.streamed or not call.complete:
            return None
        return call.arguments

    # ---- scanning ------------------------------------------------------------------------

    def feed(self, text: str) -> list[CallDelta]:
        for c in text:
            if self._broken or self._done:
                break
            self._char(c)
        out, self._out = _merged(self._out), []
        return out

    def _call_frame(self) -> bool:
        """The innermost frame is a call object."""
        st = self._stack
        if self._array_key is None:
            return len(st) == 1 and st[0].kind == "o"
        return (
            len(st) == 3
            and st[0].kind == "o"
            and st[0].key == self._array_key
            and st[1].kind == "a"
            and st[2].kind == "o"
        )

    def _index(self) -> int:
        if self._array_key is None:
            return self._first
        return self._first + self._stack[1].items - 1

    def _call(self) -> _Call:
        k = self._index() - self._first
        while len(self.calls) <= k:
            self.calls.append(_Call())
        return self.calls[k]

    def _emit(self, call: _Call, text: str) -> None:
        call.arguments += text
        if call.name is None:
            call.held += text
        else:
            self._out.append(CallDelta(self._position(call), None, text))

    def _position(self, call: _Call) -> int:
        return self._first + next(i for i, c in enumerate(self.calls) if c is call)

    def _char(self, c: str) -> None:
        if self._capture is not None and self._capture.streamed:
            self._emit(self._capture, c)
        if self._in_string:
            self._string_char(c)
            return
        if self._in_scalar:
            if c not in _WS and c not in ",}]":
                return
            self._in_scalar = False
        if c in _WS:
            return
        frame = self._stack[-1] if self._stack else None
        if frame is not None and frame.kind == "o" and frame.want_key:
            if c == '"':
                self._start_string("key")
            elif c == "}":
                self._close()
            elif c != ",":
                self._broken = True
            return
        if c == ":":
            if frame is None or frame.kind != "o":
                self._broken = True
            return
        if c == ",":
            if frame is not None and frame.kind == "o":
                frame.want_key = True
            return
        if c in "}]":
            self._close()
            return
        self._value_start(c)

    def _value_start(self, c: str) -> None:
        """The first character of a value (not a key)."""
        frame = self._stack[-1] if self._stack else None
        if frame is None and c != "{":
            self._broken = True  # a call (or the generic reply) is an object
            return
        if frame is not None and frame.kind == "a":
            frame.items += 1
        key = frame.key if frame is not None and frame.kind == "o" else None
        if self._capture is None and key in _ARGUMENTS and self._call_frame():
            call = self._call()
            if c == "{":
                call.streamed = True
                self._capture, self._capture_depth = call, len(self._stack)
                self._emit(call, c)
        if c in "{[":
            self._stack.append(_Frame("o" if c == "{" else "a"))
        elif c == '"':
            role = "name" if key == "name" and self._call_frame() else ""
            self._start_string(role)
        else:
            self._in_scalar = True

    def _start_string(self, role: str) -> None:
        self._in_string = True
        self._escape = False
        self._string_role = role
        self._keep_string = bool(role)
        self._string = ""

    def _string_char(self, c: str) -> None:
        if self._escape:
            self._escape = False
        elif c == "\\":
            self._escape = True
        elif c == '"':
            self._in_string = False
            self._string_done()
            return
        if self._keep_string:
            self._string += c

    def _string_done(self) -> None:
        try:
            value = json.loads(f'"{self._string}"') if self._keep_string else ""
        except ValueError:
            self._broken = True
            return
        frame = self._stack[-1]
        if self._string_role == "key":
            frame.key, frame.want_key = value, False
            return
        if self._string_role == "name":
            call = self._call()
            if call.name is None:
                call.name = value
                self._out.append(CallDelta(self._position(call), value, call.held))
                call.held = ""

    def _close(self) -> None:
        if not self._stack:
            self._broken = True
            return
        self._stack.pop()
        if self._capture is not None and len(self._stack) < self._capture_depth + 1:
            self._capture.complete = True
            self._capture = None
        if not self._stack:
            self._done = True


def _merged(deltas: list[CallDelta]) -> list[CallDelta]:
    """Consecutive argument pieces of one call become one delta."""
    out: list[CallDelta] = []
    for d in deltas:
        if out and out[-1].index == d.index and d.name is None:
            out[-1].arguments += d.arguments
        else:
            out.append(d)
    return out
