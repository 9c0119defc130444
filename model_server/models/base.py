"""What the engine needs from a model, whatever its family.

A loader (``hf.py``, ``gguf.py``, ``chatglm2/``) turns ``--model`` into a :class:`LoadedModel`.
The engine only ever calls a transformers-style causal LM forward
(``input_ids, attention_mask, position_ids, past_key_values, use_cache``) and the small
protocols below, so every family batches the same way.
"""

from __future__ import annotations

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


class TextFilter(Protocol):
    """Streaming post-processing of the reply (e.g. ChatGLM2's strip/replace).

    ``feed`` gets each new piece of reply text and returns what may be sent now; ``flush`` is
    called once at the end and returns whatever was held back (already transformed).
    """

    def feed(self, text: str) -> str: ...

    def flush(self) -> str: ...


class ChatFormat(Protocol):
    """Turns a conversation into prompt token ids, the way this model was trained."""

    def render(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Prompt ids ending where the assistant's reply starts. Raises ConversationError."""
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
    # ChatGLM2's guard: if any logit is NaN/inf, all become 0 and this token id gets 5e4.
    nan_guard_token_id: int | None = None
    # How the weights are quantized (e.g. "int4 (tinygemm)"), None for full precision.
    quantization: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype
