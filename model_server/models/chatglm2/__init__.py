"""Native ChatGLM2 support: transformers' ``GlmForCausalLM`` + a SentencePiece tokenizer.

glmserve never imports or runs a checkpoint's own Python files, and never passes
``trust_remote_code``. See ``docs/chatglm2.md``.
"""

from __future__ import annotations

from pathlib import Path

from model_server.models.chatglm2.chat_format import ChatGLM2ChatFormat, ReplyFilter
from model_server.models.chatglm2.config import CHATGLM_MODEL_TYPE, read_config_json
from model_server.models.chatglm2.loader import load_chatglm2
from model_server.models.chatglm2.tokenizer import ChatGLM2Tokenizer

__all__ = [
    "ChatGLM2ChatFormat",
    "ChatGLM2Tokenizer",
    "ReplyFilter",
    "is_chatglm_dir",
    "load_chatglm2",
    "remote_code_error",
]


def is_chatglm_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder whose config.json says ``model_type: chatglm``."""
    raw = read_config_json(path)
    return raw is not None and raw.get("model_type") == CHATGLM_MODEL_TYPE


def remote_code_error(path: str | Path) -> str | None:
    """A refusal message for checkpoints that only load with their own Python code, else None.

    That is: config.json has ``auto_map`` and a ``model_type`` transformers does not know
    (ChatGLM is handled natively, so it is never refused here).
    """
    raw = read_config_json(path)
    if raw is None or not raw.get("auto_map"):
        return None
    model_type = raw.get("model_type")
    if model_type == CHATGLM_MODEL_TYPE:
        return None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES:
        return None
    return (
        f"{path}: model_type {model_type!r} is not supported by transformers and this checkpoint "
        "ships its own Python code (auto_map). glmserve never runs code from a checkpoint "
        "(no trust_remote_code); use a model transformers supports natively, or ChatGLM2"
    )
