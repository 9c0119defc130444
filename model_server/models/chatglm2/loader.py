"""``load_chatglm2``: a ChatGLM2/3 folder → a ``LoadedModel`` on transformers' ``GlmForCausalLM``.

No file of the checkpoint other than ``config.json``, ``tokenizer_config.json`` (read as JSON,
to tell ChatGLM3 from ChatGLM2), the weights and ``tokenizer.model`` is ever read; its
``*.py`` remote code is ignored and ``trust_remote_code`` is never passed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import GlmForCausalLM

from model_server.models.base import LoadedModel, ModelLoadError
from model_server.models.chatglm2.chat_format import ChatGLM2ChatFormat
from model_server.models.chatglm2.chatglm3 import ChatGLM3ChatFormat
from model_server.models.chatglm2.config import ChatGLM2Config, read_config_json
from model_server.models.chatglm2.family import detect_family
from model_server.models.chatglm2.placement import Plan, device_of, plan_for
from model_server.models.chatglm2.tokenizer import ChatGLM2Tokenizer
from model_server.models.chatglm2.weights import checkpoint_shards, load_weights, quantize_linears
from model_server.models.quant import QuantLinear

log = logging.getLogger(__name__)

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


def _init_rotary(model: GlmForCausalLM, device: torch.device, position_scale: float) -> None:
    """Recompute the rotary ``inv_freq`` buffers (non-persistent, so not in any checkpoint).

    ChatGLM2-32k divides positions by ``rope_ratio``; angles are ``position * inv_freq``, so
    dividing ``inv_freq`` instead gives the same rotation.
    """
    rotary = model.model.rotary_emb
    # No ``device=`` argument: some transformers 5.x releases deprecate it.
    inv_freq, _ = rotary.compute_default_rope_parameters(model.config)
    inv_freq = inv_freq.to(device) / position_scale
    rotary.inv_freq = inv_freq
    rotary.original_inv_freq = inv_freq.clone()


def load_chatglm2(
    path: str,
    device: torch.device,
    dtype: torch.dtype | None,
    max_model_len: int | None,
    quantize: int | None = None,
    device_map: str | Plan | None = None,
) -> LoadedModel:
    """Load a ChatGLM2/3 checkpoint folder natively; ModelLoadError says what is wrong.

    ``quantize`` (4 or 8, ``--quantize``) quantizes an fp checkpoint's linears at load.
    ``device_map`` (``--device-map`` policy, or an explicit module → device plan) spreads
    the blocks over the visible GPUs (``placement.py``); ``device`` is then the fallback.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"{path}: not a directory")
    raw = read_config_json(folder)
    if raw is None:
        raise ModelLoadError(f"{path}: config.json is missing or not valid JSON")
    family = detect_family(folder, raw)
    cfg = ChatGLM2Config.from_dict(raw, source=str(folder / "config.json"), family=family)
    if quantize and cfg.quantization_bit and quantize != cfg.quantization_bit:
        raise ModelLoadError(
            f"{path}: the checkpoint is already int{cfg.quantization_bit}; "
            f"--quantize int{quantize} cannot re-quantize it"
        )
    bits = cfg.quantization_bit or quantize
    tokenizer = ChatGLM2Tokenizer(folder / "tokenizer.model", role_tokens=family == "chatglm3")
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

    if isinstance(device_map, str):
        device_map = plan_for(cfg.num_layers, device_map, device)
    plan = device_map or {"": str(device)}
    if any(torch.device(d).type not in ("cpu", "cuda") for d in plan.values()):
        raise ModelLoadError(f"--device-map: only cpu and cuda devices can hold layers: {plan}")

    model = build_empty_model(cfg)
    if bits:
        quantize_linears(model, bits, dtype)
    load_weights(model, shards, cfg, lambda name: device_of(plan, name), dtype)
    _init_rotary(model, device_of(plan, "model.rotary_emb"), cfg.position_scale)
    if len(set(plan.values())) > 1:
        from accelerate import dispatch_model

        # Hooks move hidden states (and the rotary table) to each block's device.
        dispatch_model(model, device_map=plan)
        log.info("layers placed: %s", sorted(set(plan.values())))
    if any(torch.device(d).type == "cuda" for d in plan.values()):
        # Packing int4 leaves freed staging blocks in torch's cache: give them back, so the
        # memory at rest is the model's (and the KV pool sized after us sees it free).
        torch.cuda.empty_cache()
    leftovers = [n for n, b in model.named_buffers() if b.is_meta]
    if leftovers:  # pragma: no cover - would mean transformers added a buffer we don't know
        raise ModelLoadError(f"uninitialised buffers after loading: {leftovers}")
    model.config.dtype = dtype
    model.eval()

    chat_format: ChatGLM2ChatFormat | ChatGLM3ChatFormat
    if family == "chatglm3":
        chat_format = ChatGLM3ChatFormat(tokenizer)
        # A turn ends at eos or where the next role would start: the user's or a tool result.
        roles = tokenizer.role_token_ids
        stop_ids = {cfg.eos_token_id, roles["user"], roles["observation"]}
    else:
        chat_format, stop_ids = ChatGLM2ChatFormat(tokenizer), {cfg.eos_token_id}
    limit = cfg.seq_length if max_model_len is None else min(cfg.seq_length, max_model_len)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        chat_format=chat_format,
        eos_token_ids=frozenset(stop_ids),
        max_model_len=limit,
        architecture="chatglm3" if family == "chatglm3" else "chatglm",
        source=str(folder),
        default_temperature=DEFAULT_TEMPERATURE,
        default_top_p=DEFAULT_TOP_P,
        nan_guard_token_id=NAN_GUARD_TOKEN_ID,
        quantization=_describe_quantization(model, bits),
    )


def _describe_quantization(model: torch.nn.Module, bits: int | None) -> str | None:
    """``int4 (tinygemm)`` and the like, for the ready log line and /v1/models."""
    if not bits:
        return None
    kernels = sorted({m.kernel for m in model.modules() if isinstance(m, QuantLinear)})
    return f"int{bits} ({', '.join(kernels)})"
