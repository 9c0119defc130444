"""Any transformers causal LM that ships a chat template."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from .base import (
    ChatMessage,
    ConversationError,
    LoadedModel,
    ModelLoadError,
    TextFilter,
    ToolCallParser,
    ToolSpec,
    fold_late_system,
)
from .hermes import HermesToolParser
from .vocab import token_bytes_table

log = logging.getLogger(__name__)


class HFTokenizer:
    """Adapts a transformers tokenizer to the engine's Tokenizer protocol."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001 - any transformers tokenizer
        self._tok = tokenizer
        self._bytes: list[bytes] | None = None

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def hf(self):  # noqa: ANN201 - the transformers tokenizer (grammar engines build on it)
        return self._tok

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (see vocab.py); built once, on first use."""
        if self._bytes is None:
            specials = frozenset(self._tok.all_special_ids) | frozenset(
                i for i, t in self._tok.added_tokens_decoder.items() if t.special
            )
            decoder = getattr(getattr(self._tok, "backend_tokenizer", None), "decoder", None)
            byte_level = "ByteLevel" in type(decoder).__name__ or "ByteLevel" in repr(decoder)
            pieces = self._tok.convert_ids_to_tokens(list(range(len(self._tok))))
            self._bytes = token_bytes_table(pieces, byte_level, specials.__contains__)
        if 0 <= token_id < len(self._bytes):
            return self._bytes[token_id]
        return b""

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


class TemplateChatFormat:
    """The model's own Jinja chat template; only the template's markup yields special tokens.

    The template is rendered and tokenized as it always was (so prompts, and the engine's
    prefix cache, are unchanged), then checked: a special token whose text came from a
    message's content (``<|im_start|>`` typed by a user) is re-tokenized as plain text.
    """

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError("the tokenizer has no chat template; glmserve serves chat models")
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError(
                "the tokenizer has no fast (tokenizers) version; glmserve needs one to keep "
                "special tokens out of message content"
            )
        self._tok = tokenizer
        self._special_ids = frozenset(
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special
        )
        self._special_texts = frozenset(
            t.content for t in tokenizer.added_tokens_decoder.values() if t.special
        )
        template = tokenizer.chat_template
        template = template if isinstance(template, str) else json.dumps(template)
        # A template that takes a `tools` list and spells calls as <tool_call> JSON.
        self.native_tools = "tools" in template and "<tool_call>" in template
        # A private copy that always spells special-token names as text. Not the shared
        # tokenizer's split_special_tokens flag: that is state on the shared Rust object, and
        # renders run on several threads.
        self._plain = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._plain.encode_special_tokens = True

    def render(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] | None = None
    ) -> list[int]:
        if not messages:
            raise ConversationError("messages: at least one message is required")
        if messages[-1].role == "assistant":
            raise ConversationError(
                "messages: the last message must be from the user, system or tool (got assistant)"
            )
        self._check_no_specials(messages, tools)
        try:
            text = self._apply(messages, [m.content for m in messages], tools)
        except ConversationError:
            folded = fold_late_system(messages)
            if len(folded) == len(messages) and all(
                a is b for a, b in zip(folded, messages, strict=True)
            ):
                raise
            # The template refuses a system turn after the first: merge it (see base.py).
            messages = folded
            text = self._apply(messages, [m.content for m in messages], tools)
        contents = [m.content for m in messages]
        # Same conversation with each content replaced by a marker: the template's markup alone.
        markers = [f"{_MARKER}{i}{_MARKER}" for i in range(len(messages))]
        skeleton = self._apply(messages, markers, tools)
        enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = list(enc["input_ids"])
        spans = _content_spans(skeleton, markers, contents, text)
        if spans is None:
            # The template rewrites content (trims it, say): positions are unknown, but the
            # markup's specials are those of the skeleton, so any extra one came from content.
            markup = self._tok.encode(skeleton, add_special_tokens=False)
            if Counter(i for i in ids if i in self._special_ids) != Counter(
                i for i in markup if i in self._special_ids
            ):
                raise ConversationError(
                    "messages: the content contains a special token of this model, which its "
                    "chat template does not allow to be kept as plain text"
                )
            return ids
        kept: list[tuple[int, int, int]] = []  # (start, end, id) of the markup's specials
        injected = False
        for token_id, (start, end) in zip(ids, enc["offset_mapping"], strict=True):
            if token_id not in self._special_ids:
                continue
            if any(start < c_end and c_start < end for c_start, c_end in spans):
                injected = True
            else:
                kept.append((start, end, token_id))
        if not injected:
            return ids
        out: list[int] = []
        pos = 0
        for start, end, token_id in [*kept, (len(text), len(text), -1)]:
            if start > pos:
                out += self._plain.encode(text[pos:start], add_special_tokens=False).ids
            if token_id >= 0:
                out.append(token_id)
            pos = end
        return out

    def _apply(
        self,
        messages: Sequence[ChatMessage],
        contents: Sequence[str],
        tools: Sequence[ToolSpec] | None,
    ) -> str:
        turns = [_turn(m, c) for m, c in zip(messages, contents, strict=True)]
        kwargs = {"tools": [t.openai() for t in tools]} if tools else {}
        try:
            return self._tok.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=True, **kwargs
            )
        except Exception as exc:  # jinja's raise_exception() in templates that check roles
            raise ConversationError(f"messages: the chat template rejected them: {exc}") from exc

    def _check_no_specials(
        self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] | None
    ) -> None:
        """Tool definitions and calls are rendered as markup, so the content check below
        cannot see a special token typed into them: refuse those outright."""
        texts = [json.dumps(t.openai(), ensure_ascii=False) for t in tools or ()]
        texts += [f"{c.id}{c.name}{c.arguments}" for m in messages for c in m.tool_calls]
        texts += [m.tool_call_id + m.name for m in messages]
        for text in texts:
            if any(special in text for special in self._special_texts):
                raise ConversationError(
                    "messages: a tool name, call or definition contains a special token of "
                    "this model"
                )

    def reply_filter(self) -> TextFilter | None:
        return None

    def tool_call_parser(self) -> ToolCallParser | None:
        """Hermes-style ``<tool_call>{json}</tool_call>`` for templates that take ``tools``
        and spell calls that way (Qwen2.5, Hermes, ...); None otherwise (generic format)."""
        return HermesToolParser() if self.native_tools else None


def _turn(m: ChatMessage, content: str) -> dict[str, Any]:
    """A message as transformers chat templates take it (arguments as an object)."""
    turn: dict[str, Any] = {"role": m.role, "content": content}
    if m.tool_calls:
        turn["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": _arguments(c.arguments)},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id:
        turn["tool_call_id"] = m.tool_call_id
    if m.name:
        turn["name"] = m.name
    return turn


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# Stands for a message's content while the template renders: private-use characters, so no
# special token, no whitespace for a template to trim, and nothing a real message would hold.
_MARKER = "\ue000"


def _content_spans(
    skeleton: str, markers: Sequence[str], contents: Sequence[str], text: str
) -> list[tuple[int, int]] | None:
    """Where each content sits in ``text``, or None unless the template copied it verbatim."""
    spans: list[tuple[int, int]] = []
    rebuilt: list[str] = []
    rest = skeleton
    start = 0
    for marker, content in zip(markers, contents, strict=True):
        head, found, rest = rest.partition(marker)
        if not found or _MARKER in head:  # missing, out of order or repeated: not verbatim
            return None
        start += len(head)
        spans.append((start, start + len(content)))
        start += len(content)
        rebuilt += (head, content)
    rebuilt.append(rest)
    return spans if _MARKER not in rest and "".join(rebuilt) == text else None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 (fp16 where bf16 is missing) on CUDA, fp32 on CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if name not in table:
        raise ModelLoadError(f"--dtype {name!r}: expected auto, float32, float16 or bfloat16")
    return table[name]


def context_length(config, requested: int | None) -> int:  # noqa: ANN001
    """The model's context window, optionally lowered by --max-model-len."""
    native = None
    for attr in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        native = getattr(config, attr, None)
        if native:
            break
    native = int(native or 2048)
    if requested is None:
        return native
    if requested > native:
        raise ModelLoadError(f"--max-model-len {requested} exceeds the model's context of {native}")
    return requested


def load_hf(
    path: str,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int | None,
    *,
    source: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    **from_pretrained_kwargs: object,
) -> LoadedModel:
    """Loads a local transformers checkpoint (never remote code).

    ``device_map`` (``--device-map``) hands placement to accelerate: the layers are spread
    over the visible GPUs (one model larger than one GPU) and its hooks move activations
    between them; ``device`` is then unused. The engine's KV cache follows each layer's
    device by itself (kv.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("loading tokenizer from %s", path)
    tokenizer = AutoTokenizer.from_pretrained(
        path, trust_remote_code=False, **from_pretrained_kwargs
    )
    where = f"device map {device_map}" if device_map else str(device)
    log.info("loading weights from %s (%s on %s)", path, dtype, where)
    placement = {"device_map": device_map} if device_map else {}
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        trust_remote_code=False,
        low_cpu_mem_usage=True,
        **placement,
        **from_pretrained_kwargs,
    )
    if device_map:
        one = {"": str(next(model.parameters()).device)}  # unset when all went to one device
        placed = getattr(model, "hf_device_map", one)
        log.info("layers placed: %s", sorted(set(map(str, placed.values()))))
        model.eval()
    else:
        model.to(device).eval()
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    gen = model.generation_config
    return LoadedModel(
        model=model,
        tokenizer=HFTokenizer(tokenizer),
        chat_format=TemplateChatFormat(tokenizer),
        eos_token_ids=eos_ids,
        max_model_len=context_length(model.config, max_model_len),
        architecture=str(model.config.model_type),
        source=source or str(Path(path)),
        default_temperature=float(gen.temperature or 1.0) if gen.do_sample else 1.0,
        default_top_p=float(gen.top_p or 1.0) if gen.do_sample else 1.0,
    )
