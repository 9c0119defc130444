"""Which member of the ChatGLM family a ``model_type: chatglm`` folder holds.

ChatGLM2 and ChatGLM3 share ``config.json`` fields, tensors and the SentencePiece model, and
both may carry ``rope_ratio`` (with opposite meanings). What tells them apart is the
tokenizer: ChatGLM3's has the role tokens ``<|system|>`` … ``<|observation|>``, which the
published ``tokenizer_config.json`` lists (``added_tokens_decoder`` / its chat template). The
checkpoint's name is the fallback. The file is only read as JSON; no code from it runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model_server.models.base import ModelLoadError
from model_server.models.chatglm2.config import Family

_ROLE_TOKENS = ("<|user|>", "<|assistant|>", "<|observation|>")


def _names(raw: dict[str, Any], tokenizer_cfg: dict[str, Any]) -> str:
    keys = ("_name_or_path", "name_or_path")
    found = [str(d.get(k) or "") for d in (raw, tokenizer_cfg) for k in keys]
    return " ".join(found).lower()


def read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` as a dict ({} when absent or not a JSON object)."""
    try:
        data = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def detect_family(folder: Path, raw: dict[str, Any]) -> Family:
    """``chatglm3`` when the tokenizer has ChatGLM3's role tokens (or the name says so)."""
    tokenizer_cfg = read_tokenizer_config(folder)
    names = _names(raw, tokenizer_cfg)
    if "glm-4" in names or "glm4" in names:
        raise ModelLoadError(
            f"{folder}: this looks like GLM-4 (name {names.strip()!r}); its tiktoken tokenizer "
            "is not supported natively (ChatGLM2 and ChatGLM3 are)"
        )
    text = json.dumps(tokenizer_cfg, ensure_ascii=False)
    if any(token in text for token in _ROLE_TOKENS) or "chatglm3" in names:
        return "chatglm3"
    return "chatglm2"
