"""Any transformers causal LM that ships a chat template."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from .base import ChatMessage, ConversationError, LoadedModel, ModelLoadError, TextFilter

log = logging.getLogger(__name__)


class HFTokenizer:
    """Adapts a transformers tokenizer to the engine's Tokenizer protocol."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001 - any transformers tokenizer
        self._tok = tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


class TemplateChatFormat:
    """The model's own Jinja chat template, rendered then tokenized without extra specials."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError("the tokenizer has no chat template; glmserve serves chat models")
        self._tok = tokenizer

    def render(self, messages: Sequence[ChatMessage]) -> list[int]:
        if not messages:
            raise ConversationError("messages: at least one message is required")
        if messages[-1].role != "user":
            raise ConversationError(
                f"messages: the last message must be from the user (got {messages[-1].role})"
            )
        try:
            text = self._tok.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as exc:  # jinja's raise_exception() in templates that check roles
            raise ConversationError(f"messages: the chat template rejected them: {exc}") from exc
        return list(self._tok.encode(text, add_special_tokens=False))

    def reply_filter(self) -> TextFilter | None:
        return None


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
    **from_pretrained_kwargs: object,
) -> LoadedModel:
    """Loads a local transformers checkpoint (never remote code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("loading tokenizer from %s", path)
    tokenizer = AutoTokenizer.from_pretrained(
        path, trust_remote_code=False, **from_pretrained_kwargs
    )
    log.info("loading weights from %s (%s on %s)", path, dtype, device)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        trust_remote_code=False,
        low_cpu_mem_usage=True,
        **from_pretrained_kwargs,
    )
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
