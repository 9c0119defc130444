"""Resolves ``--model`` to a :class:`LoadedModel`: the embedded default, ChatGLM2, or any
transformers causal LM with a chat template. Nothing here runs code from a checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .base import LoadedModel, ModelLoadError
from .cpu_linear import onednn_available, pack_linears, packs_by_default
from .fused_layers import fuse_layers
from .gguf import DEFAULT_MODEL, load_default
from .hf import load_hf, resolve_dtype

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {name}: CUDA is not available on this machine")
    return device


def load_model(
    model: str,
    device: torch.device,
    dtype_name: str,
    max_model_len: int | None,
    quantize: str | None = None,
    device_map: str | None = None,
    cpu_linear: str = "auto",
    fused_layers: bool = True,
    cache_dir: str | None = None,
) -> LoadedModel:
    """``quantize`` (``int4``/``int8``): quantize a ChatGLM checkpoint's linears at load.
    ``device_map`` (``--device-map``: ``auto``, ``balanced``, ...): accelerate spreads the
    layers over the visible GPUs instead of putting the model on ``device``.
    ``cpu_linear`` (``--cpu-linear``): ``onednn`` packs an fp32 CPU model's linears for oneDNN
    (:mod:`.cpu_linear`), ``auto`` does on x86-64, ``torch`` leaves them as they are.
    ``fused_layers`` (``--fused-layers``): the GLM rotary, and on CUDA the standard RMSNorms,
    become :mod:`.fused_layers`' (fewer kernel launches; bit-identical in fp32).
    ``cache_dir`` (``--cache-dir``): where the embedded default's conversion is kept (None:
    the XDG cache directory, :func:`.gguf.cache_root`)."""
    loaded = _load(model, device, dtype_name, max_model_len, quantize, device_map, cache_dir)
    if fused_layers:
        fuse_layers(loaded.model, rmsnorm=loaded.device.type == "cuda")
    wanted = cpu_linear == "onednn" or (cpu_linear == "auto" and packs_by_default())
    if wanted and loaded.device.type == "cpu" and loaded.dtype == torch.float32:
        if onednn_available():
            count = pack_linears(loaded.model)
            log.info("packed %d linears for oneDNN (--cpu-linear %s)", count, cpu_linear)
        elif cpu_linear == "onednn":
            raise ModelLoadError("--cpu-linear onednn: this torch build has no oneDNN")
    return loaded


def _load(
    model: str,
    device: torch.device,
    dtype_name: str,
    max_model_len: int | None,
    quantize: str | None,
    device_map: str | None,
    cache_dir: str | None,
) -> LoadedModel:
    dtype = resolve_dtype(dtype_name, device)
    placement = {"device_map": device_map} if device_map else {}
    bits = {None: None, "int4": 4, "int8": 8}[quantize]
    not_chatglm = ModelLoadError(
        f"--quantize {quantize}: only ChatGLM checkpoints can be quantized at load "
        f"(--model {model} is not one)"
    )
    if bits and model == DEFAULT_MODEL:
        raise not_chatglm
    if model == DEFAULT_MODEL:
        return load_default(device, dtype, max_model_len, cache_dir=cache_dir, **placement)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"--model {model!r}: not {DEFAULT_MODEL!r} and not a local checkpoint directory "
            "(glmserve cannot download from a model hub)"
        )
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"--model {model}: no config.json in that directory")
    config = json.loads(config_file.read_text())
    if bits and config.get("model_type") != "chatglm":
        raise not_chatglm
    if config.get("model_type") == "chatglm":
        from .chatglm2 import load_chatglm2

        return load_chatglm2(
            str(path),
            device,
            None if dtype_name == "auto" else dtype,
            max_model_len,
            bits,
            **placement,
        )
    _refuse_remote_code(config, model)
    return load_hf(str(path), device, dtype, max_model_len, **placement)


def _refuse_remote_code(config: dict, model: str) -> None:
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        hint = (
            " (its config.json points at remote code via auto_map)" if "auto_map" in config else ""
        )
        raise ModelLoadError(
            f"--model {model}: model_type {model_type!r} is not supported natively by "
            f"transformers{hint}; glmserve never runs code shipped in a checkpoint"
        )
