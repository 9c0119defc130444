"""Stream a ChatGLM2 checkpoint, shard by shard, into a ``GlmForCausalLM`` built on ``meta``.

Each tensor is copied once, straight into the target dtype and device, and the shard's
memory map is released before the next shard is opened. Peak host RAM is therefore the
model (when it lives on the CPU) plus at most one shard's pages, never two full copies.

Linears replaced by :class:`QuantLinear` (an int4/int8 checkpoint, or ``--quantize``) take
their ``weight`` + ``weight_scale`` pair instead; an fp weight is quantized on the way in,
one tensor at a time, so the full-precision model never exists in memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from model_server.models.base import ModelLoadError
from model_server.models.chatglm2 import pages
from model_server.models.chatglm2.config import ChatGLM2Config
from model_server.models.quant import QuantLinear, quantize_rows

_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
_IGNORED = {"transformer.rotary_pos_emb.inv_freq"}
_TOP_LEVEL = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_IN_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}


def checkpoint_shards(path: Path) -> list[Path]:
    """The weight files of a checkpoint folder, in index order (safetensors preferred)."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise ModelLoadError(f"{index}: unreadable index ({exc})") from exc
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise ModelLoadError(
                    f"{path}: shards listed in {index_name} are missing: {missing}"
                )
            return [path / f for f in files]
        if (path / single).is_file():
            return [path / single]
    raise ModelLoadError(
        f"{path}: no weights found (expected pytorch_model.bin.index.json + shards, "
        "pytorch_model.bin, model.safetensors.index.json + shards, or model.safetensors)"
    )


def iter_shard(file: Path) -> Iterator[tuple[str, torch.Tensor, list[tuple[int, int]]]]:
    """(name, tensor, file mappings) of one shard, memory-mapped: nothing is read before use.

    The mappings (address ranges mapping this shard file, empty when not memory-mapped) let
    the caller give a tensor's pages back once copied, see ``pages.release``.
    """
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                yield name, f.get_tensor(name), []
        return
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        mappings = pages.file_mappings(file)
    except RuntimeError:
        # Legacy (pre-zip) pickles cannot be memory-mapped; they load whole, one shard at a time.
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"{file}: cannot read weights ({exc})") from exc
        mappings = []
    except Exception as exc:  # any unpickling failure means a bad checkpoint
        raise ModelLoadError(f"{file}: cannot read weights ({exc})") from exc
    # Popping drops each tensor (and, with the last one, the shard's memory map) as soon as
    # the caller has copied it.
    while state:
        name = next(iter(state))
        yield name, state.pop(name), mappings


def convert(name: str, tensor: torch.Tensor, cfg: ChatGLM2Config) -> list[tuple[str, torch.Tensor]]:
    """One ChatGLM2 tensor → its ``GlmForCausalLM`` tensor(s); [] for tensors to ignore."""
    if name in _IGNORED:
        return []
    if name in _TOP_LEVEL:
        return [(_TOP_LEVEL[name], tensor)]
    m = _LAYER.match(name)
    if m is None:
        raise ModelLoadError(f"unexpected tensor {name!r} in a ChatGLM2 checkpoint")
    i, rest = int(m.group(1)), m.group(2)
    if i >= cfg.num_layers:
        raise ModelLoadError(f"tensor {name!r} is past num_layers={cfg.num_layers}")
    prefix = f"model.layers.{i}."
    if rest in _IN_LAYER:
        return [(prefix + _IN_LAYER[rest], tensor)]
    # A quantized linear's per-row scales sit next to its weight: ``<linear>.weight_scale``.
    if rest.endswith(".weight_scale") and rest[: -len("_scale")] in _IN_LAYER:
        return [(prefix + _IN_LAYER[rest[: -len("_scale")]] + "_scale", tensor)]
    if rest in (
        "self_attention.query_key_value.weight",
        "self_attention.query_key_value.bias",
        "self_attention.query_key_value.weight_scale",
    ):
        kind = rest.rsplit(".", 1)[1]
        sizes = cfg.qkv_sizes
        if tensor.shape[0] != sum(sizes):
            raise ModelLoadError(
                f"{name}: {tensor.shape[0]} rows, expected {sum(sizes)} = q {sizes[0]} + "
                f"k {sizes[1]} + v {sizes[2]}"
            )
        q, k, v = torch.split(tensor, sizes, dim=0)
        return [
            (f"{prefix}self_attn.q_proj.{kind}", q),
            (f"{prefix}self_attn.k_proj.{kind}", k),
            (f"{prefix}self_attn.v_proj.{kind}", v),
        ]
    raise ModelLoadError(f"unexpected tensor {name!r} in a ChatGLM2 checkpoint")


def quantize_linears(model: nn.Module, bits: int, dtype: torch.dtype) -> None:
    """Swap every decoder linear for an empty :class:`QuantLinear` (ChatGLM's choice: qkv,
    dense and both MLP linears; embeddings, norms and the output layer stay full precision)."""
    for layer in model.model.layers:
        for owner, names in (
            (layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (layer.mlp, ("gate_up_proj", "down_proj")),
        ):
            for name in names:
                linear = getattr(owner, name)
                setattr(owner, name, QuantLinear.like(linear, bits, dtype, torch.device("meta")))


class _QuantPending:
    """Halves of quantized pairs seen so far (weight and scale may sit in different shards)."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, torch.Tensor]] = {}

    def add(
        self, module_name: str, leaf: str, value: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        parts = self.parts.setdefault(module_name, {})
        parts[leaf] = value
        if {"weight", "weight_scale"} <= parts.keys():
            return self.parts.pop(module_name)
        return None


def _load_quant_part(
    module: QuantLinear,
    module_name: str,
    leaf: str,
    value: torch.Tensor,
    mappings: list[tuple[int, int]],
    pending: _QuantPending,
    device: torch.device,
) -> None:
    if leaf == "weight" and value.is_floating_point():
        # --quantize: an fp weight, quantized on the target device (fast on a GPU).
        q, scale = quantize_rows(value.to(device), module.bits)
        module.set_weight(q, scale, device)
        return
    staged = torch.empty(value.shape, dtype=value.dtype)
    pages.copy_releasing(staged, value, mappings)
    pair = pending.add(module_name, leaf, staged)
    if pair is not None:
        module.set_weight(pair["weight"], pair["weight_scale"], device)


def load_weights(
    model: nn.Module,
    shards: list[Path],
    cfg: ChatGLM2Config,
    device: torch.device | Callable[[str], torch.device],
    dtype: torch.dtype,
) -> None:
    """Replace every meta tensor of ``model`` with the checkpoint's, each copied once.

    ``device`` may be a function of the module name (``--device-map``: layers on several
    GPUs), so each tensor goes straight to its own device.
    """
    where = device if callable(device) else (lambda _name, d=device: d)
    expected = dict(model.named_parameters())
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for module_name in quant:
        expected[f"{module_name}.weight"] = expected[f"{module_name}.weight_scale"] = None
    loaded: set[str] = set()
    pending = _QuantPending()
    for shard in shards:
        for name, tensor, mappings in iter_shard(shard):
            for new_name, value in convert(name, tensor, cfg):
                if new_name not in expected:
                    raise ModelLoadError(f"{shard.name}: {name} maps to unknown {new_name!r}")
                if new_name in loaded:
                    raise ModelLoadError(f"{shard.name}: {name} appears twice")
                module_name, _, leaf = new_name.rpartition(".")
                target = expected[new_name]
                if target is None:  # one half of a quantized linear
                    if leaf == "weight_scale" and not cfg.quantization_bit:
                        raise ModelLoadError(
                            f"{shard.name}: {name} is quantized but config.json has no "
                            "quantization_bit"
                        )
                    try:
                        _load_quant_part(
                            quant[module_name],
                            module_name,
                            leaf,
                            value,
                            mappings,
                            pending,
                            where(module_name),
                        )
                    except ValueError as exc:
                        raise ModelLoadError(f"{shard.name}: {name}: {exc}") from exc
                    loaded.add(new_name)
                    continue
                if tuple(value.shape) != tuple(target.shape):
                    raise ModelLoadError(
                        f"{shard.name}: {name} has shape {tuple(value.shape)}, "
                        f"expected {tuple(target.shape)} for {new_name}"
                    )
                # A fresh tensor, never an alias of the shard's memory map (its pages are
                # given back chunk by chunk as they are copied).
                data = torch.empty(value.shape, dtype=dtype, device=where(module_name))
                pages.copy_releasing(data, value, mappings)
                module = model.get_submodule(module_name)
                module._parameters[leaf] = nn.Parameter(data, requires_grad=False)
                loaded.add(new_name)
            del tensor
    if quant and not cfg.quantization_bit:
        # --quantize on an fp checkpoint: no weight_scale tensors exist; the scales came
        # from quantizing each weight.
        loaded.update(f"{m}.weight_scale" for m in quant if f"{m}.weight" in loaded)
    missing = sorted(set(expected) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint lacks {len(missing)} tensor(s): {shown}")
