"""``load_chatglm2``: a ChatGLM2 folder → a ``LoadedModel`` on transformers' ``GlmForCausalLM``.

No file of the checkpoint other than ``config.json``, the weights and ``tokenizer.model`` is
ever read; its ``*.py`` remote code is ignored and ``trust_remote_code`` is never passed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GlmForCausalLM

from model_server.models.base import LoadedModel, ModelLoadError
from model_server.models.chatglm2.chat_format import ChatGLM2ChatFormat
from model_server.models.chatglm2.config import ChatGLM2Config, read_config_json
from model_server.models.chatglm2.tokenizer import ChatGLM2Tokenizer
from model_server.models.chatglm2.weights import checkpoint_shards, load_weights

# How the original chat samples and guards (see the spec's "Generation" section).
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.8
NAN_GUARD_TOKEN_ID = 5


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA when supported, else fp16; fp32 elsewhere (CPU half matmuls are slow)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def build_empty_model(cfg: ChatGLM2Config) -> GlmForCausalLM:
    """A ``GlmForCausalLM`` whose tensors live on ``meta``: no memory, no random init."""
    with torch.device("meta"):
        model = GlmForCausalLM(cfg.to_glm_config())
    return model


def _init_rotary(model: GlmForCausalLM, device: torch.device) -> None:
    """Recompute the rotary ``inv_freq`` buffers (non-persistent, so not in any checkpoint)."""
    rotary = model.model.rotary_emb
    inv_freq, _ = rotary.compute_default_rope_parameters(model.config, device=device)
    rotary.inv_freq = inv_freq
    rotary.original_inv_freq = inv_freq.clone()


def load_chatglm2(
    path: str,
    device: torch.device,
    dtype: torch.dtype | None,
    max_model_len: int | None,
) -> LoadedModel:
    """Load a ChatGLM2 checkpoint folder natively; ModelLoadError says what is wrong."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"{path}: not a directory")
    raw = read_config_json(folder)
    if raw is None:
        raise ModelLoadError(f"{path}: config.json is missing or not valid JSON")
    cfg = ChatGLM2Config.from_dict(raw, source=str(folder / "config.json"))
    tokenizer = ChatGLM2Tokenizer(folder / "tokenizer.model")
    if tokenizer.vocab_size > cfg.padded_vocab_size:
        raise ModelLoadError(
            f"{path}: tokenizer has {tokenizer.vocab_size} ids but padded_vocab_size is "
            f"{cfg.padded_vocab_size}"
        )
    if max_model_len is not None and max_model_len <= 0:
        raise ModelLoadError(f"max_model_len must be positive, got {max_model_len}")
    shards = checkpoint_shards(folder)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)

    model = build_empty_model(cfg)
    load_weights(model, shards, cfg, device, dtype)
    _init_rotary(model, device)
    leftovers = [n for n, b in model.named_buffers() if b.is_meta]
    if leftovers:  # pragma: no cover - would mean transformers added a buffer we don't know
        raise ModelLoadError(f"uninitialised buffers after loading: {leftovers}")
    model.config.dtype = dtype
    model.eval()

    limit = cfg.seq_length if max_model_len is None else min(cfg.seq_length, max_model_len)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        chat_format=ChatGLM2ChatFormat(tokenizer),
        eos_token_ids=frozenset({cfg.eos_token_id}),
        max_model_len=limit,
        architecture="chatglm",
        source=str(folder),
        default_temperature=DEFAULT_TEMPERATURE,
        default_top_p=DEFAULT_TOP_P,
        nan_guard_token_id=NAN_GUARD_TOKEN_ID,
    )
