"""Native ChatGLM2 support: transformers' ``GlmForCausalLM`` + a SentencePiece tokenizer.

glmserve never imports or runs a checkpoint's own Python files, and never passes
``trust_remote_code``. See ``docs/chatglm2.md``.
"""

from __future__ import annotations

from model_server.models.chatglm2.chat_format import ChatGLM2ChatFormat, ReplyFilter
from model_server.models.chatglm2.loader import load_chatglm2
from model_server.models.chatglm2.tokenizer import ChatGLM2Tokenizer

__all__ = [
    "ChatGLM2ChatFormat",
    "ChatGLM2Tokenizer",
    "ReplyFilter",
    "load_chatglm2",
]
