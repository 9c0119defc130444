"""What the engine needs from a model, whatever its family.

A loader (``hf.py``, ``gguf.py``, ``chatglm2/``) turns ``--model`` into a :class:`LoadedModel`.
The engine only ever calls a transformers-style causal LM forward
(``input_ids, attention_mask, position_ids, past_key_values, use_cache``) and the small
protocols below, so every family batches the same way.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:  # torch is imported by the loaders, not by the servicer's import chain
    import torch

RoleName = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ToolCall:
    """A function call in OpenAI's shape: ``arguments`` is JSON text of an object."""

    id: str
    name: str
    arguments: str


def arguments_json(arguments: Any) -> str:
    """A call's arguments as JSON text: UTF-8 as written, unless a ``\\uD800``-style escape
    decoded to a lone surrogate (protobuf strings must be valid UTF-8): then ASCII escapes."""
    text = json.dumps(arguments, ensure_ascii=False)
    if any("\ud800" <= c <= "\udfff" for c in text):
        return json.dumps(arguments)
    return text


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call. ``parameters`` is the arguments' JSON Schema (a dict;
    ``{"type": "object"}`` when the client gave none)."""

    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        """The OpenAI ``tools`` item, which is what transformers chat templates expect."""
        function = {"name": self.name, "description": self.description}
        return {"type": "function", "function": {**function, "parameters": self.parameters}}


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation, independent of gRPC.

    ``tool_calls``: an assistant turn's calls. ``tool_call_id`` (+ ``name``, the function):
    a ``tool`` turn, which carries that call's result in ``content``.
    """

    role: RoleName
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""


def fold_late_system(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """For formats with a system turn only at the start: the leading system messages stay;
    a later one is merged into the next user message (``system + "\n\n" + user``), or, when
    no user message follows (NextChat sends its summary instruction last), becomes a user
    message there (joined to a user message right before it)."""
    out: list[ChatMessage] = []
    pending: list[str] = []
    leading = True
    for m in messages:
        if m.role == "system" and leading:
            out.append(m)
            continue
        leading = False
        if m.role == "system":
            pending.append(m.content)
        elif m.role == "user" and pending:
            out.append(ChatMessage("user", "\n\n".join([*pending, m.content]), name=m.name))
            pending = []
        else:
            out.append(m)
    if pending:
        text = "\n\n".join(pending)
        if out and out[-1].role == "user":
            text = out[-1].content + "\n\n" + text
            out.pop()
        out.append(ChatMessage("user", text))
    return out


class ConversationError(ValueError):
    """The chat format cannot express this conversation (→ INVALID_ARGUMENT)."""


class ModelLoadError(RuntimeError):
    """``--model`` names something glmserve cannot load; the message says why."""


class Tokenizer(Protocol):
    """Token ids ↔ text. ``decode`` must drop special/control tokens (bos, eos, pad...)."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Plain text → ids, without any special tokens."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Ids → text, special tokens skipped. Incomplete UTF-8 at the end shows as U+FFFD."""
        ...

    # Optional: ``token_bytes(token_id) -> bytes``, the raw bytes one token stands for (part of
    # a UTF-8 character, say). Logprobs and grammar engines use it; without it they fall back
    # to ``decode([token_id])`` (see :func:`token_bytes`). Optional too: ``encode_raw(text)``,
    # ids that spell ``text`` exactly (no SentencePiece dummy-prefix space), for the grammar
    # engine's forced bytes; ``encode`` otherwise.


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes of one token: the tokenizer's ``token_bytes`` when it has one."""
    exact = getattr(tokenizer, "token_bytes", None)
    if exact is not None:
        return exact(token_id)
    return tokenizer.decode([token_id]).encode()


class TextFilter(Protocol):
    """Streaming post-processing of the reply (e.g. ChatGLM2's strip/replace).

    ``feed`` gets each new piece of reply text and returns what may be sent now; ``flush`` is
    called once at the end and returns whatever was held back (already transformed).
    """

    def feed(self, text: str) -> str: ...

    def flush(self) -> str: ...


class ToolCallParser(Protocol):
    """Finds a model's own tool calls in its reply (e.g. ChatGLM3's, Hermes' ``<tool_call>``).

    Stateful, one per request, fed the reply's text as it streams (after ``reply_filter``):
    ``feed`` returns the text that may go to the client now (never any part of a call; it may
    hold text back while it could still be the start of one), ``finish`` is called once at the
    end and returns the rest of the plain text and the calls found (ids may be empty: the
    server makes them). A reply that is not a call must come out unchanged, joined.

    Optional: ``take_deltas() -> list[call_stream.CallDelta]``, the calls' pieces found by the
    feeds since the last take (a call's name first, then argument fragments), for streaming.
    A parser that has it must return every announced call from ``finish``, at the same index,
    with arguments that begin with the fragments it gave.
    """

    def feed(self, text: str) -> str: ...

    def finish(self) -> tuple[str, list[ToolCall]]: ...


class ChatFormat(Protocol):
    """Turns a conversation into prompt token ids, the way this model was trained.

    Tools: ``render(messages, tools)`` gets the tools the model may call (None or empty: no
    tools; the format must then render as before). A format that knows a native tool format
    renders them as the model was trained to see them (ChatGLM3: in the system turn;
    transformers templates: their ``tools`` variable), renders assistant ``tool_calls`` and
    ``tool`` results the same way, and returns a parser from ``tool_call_parser()``. A format
    whose ``tool_call_parser()`` returns None (or that lacks the method) has no native tool
    format: the server then uses its generic one (``model_server/tools.py``): the tools are
    described in a system message, the reply is constrained to JSON, and the calls are read
    from it. Such a format gets ``tools=None`` and never sees a ``tool`` message.
    """

    def render(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] | None = None
    ) -> list[int]:
        """Prompt ids ending where the assistant's reply starts. Raises ConversationError."""
        ...

    def tool_call_parser(self) -> ToolCallParser | None:
        """A fresh parser for one reply, or None when the model has no native tool format."""
        ...

    def reply_filter(self) -> TextFilter | None:
        """A fresh per-request post-processor, or None when the reply is sent as generated."""
        ...


@dataclass
class LoadedModel:
    """A model ready to serve. ``model`` is a transformers ``PreTrainedModel`` in eval mode."""

    model: torch.nn.Module  # noqa: F821
    tokenizer: Tokenizer
    chat_format: ChatFormat
    eos_token_ids: frozenset[int]
    max_model_len: int
    architecture: str
    source: str
    default_temperature: float = 1.0
    default_top_p: float = 1.0
    # ChatGLM2's guard: if any logit is NaN or +inf, all become 0 and this token id gets 5e4.
    nan_guard_token_id: int | None = None
    # How the weights are quantized (e.g. "int4 (tinygemm)"), None for full precision.
    quantization: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
