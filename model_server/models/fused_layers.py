"""Fewer kernel launches per layer: RMSNorm as one fused op, ChatGLM's rotary without copies.

On a GPU a decode step of a small batch is bound by the host, not the device: an H100 spent
28-33 ms of wall time per step of the ChatGLM2-6B-shaped model against 7-8 ms of GPU time, and
py-spy put 30 % of the engine thread in transformers' GLM rotary code and 25 % in its RMSNorm
(docs/engine.md, "GPU"). Both are a handful of tiny elementwise kernels per layer, each paying a
launch from Python:

- **RMSNorm, on CUDA.** transformers' standard RMSNorm (Llama, GLM, Qwen2, Mistral, ...) runs
  six ops (cast, square, mean, add, rsqrt, two multiplies). ``torch.nn.functional.rms_norm`` is
  one fused kernel on CUDA. fp32 results are bit-identical; in bf16/fp16 the fused op rounds
  once where transformers rounds the normalised value before the weight multiply, so results
  differ by at most one unit in the last place (the fused one is the more exact). On the CPU
  torch's ``rms_norm`` is the same ops again, and the bench's 16 streams on the default model
  ran 217-249 tok/s with it against 250-253 without (docs/engine.md): the loader asks for it
  on CUDA only.
- **GLM's rotary.** transformers' ``apply_rotary_pos_emb`` for GLM re-interleaves cos/sin in
  every layer (two ``repeat_interleave``), rotates a sliced half with a negate and a stack, and
  concatenates the pass-through half back, for queries and keys: ~20 launches per layer. Here
  cos/sin are interleaved once per forward into full-head-width tables (cos padded with ones,
  sin signed and padded with zeros, so the pass-through half is ``x * 1 + y * 0``), and a layer
  applies ``x * cos + swap_pairs(x) * sin``: four ops per tensor, bit-identical to
  transformers' result in every dtype (``tests/test_fused_layers.py``).

Measured on an H200 (docs/engine.md, "Fused RMSNorm and rotary"): 1.34-1.64x the tokens per
second at one stream, 1.38-1.52x at 16, 1.09x at 64. ``--no-fused-layers`` keeps transformers'
own modules. Modules that carry accelerate hooks (``--device-map`` over several GPUs) are left
as they are: the hook holds the original ``forward``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.glm.modeling_glm import GlmAttention, eager_attention_forward
from transformers.models.llama.modeling_llama import LlamaRMSNorm

log = logging.getLogger(__name__)

__all__ = ["FusedRMSNorm", "GlmFusedRotaryAttention", "fuse_layers"]


class FusedRMSNorm(nn.Module):
    """transformers' standard RMSNorm as one ``F.rms_norm`` call, sharing the weight."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps
        self._shape = (weight.shape[-1],)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype != self.weight.dtype:
            # transformers' result takes the promoted dtype: run its own (identical) forward.
            return LlamaRMSNorm.forward(self, hidden_states)  # type: ignore[arg-type]
        return F.rms_norm(hidden_states, self._shape, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, fused"


_Tables = tuple[torch.Tensor, torch.Tensor]  # full-width cos, signed sin


class _RotaryTables:
    """Full-head-width interleaved cos / signed sin, built once per forward.

    Every layer of one forward receives the same ``(cos, sin)`` tensors from the model's rotary
    module; the first layer converts them and the others reuse the result (the tensors are held,
    so a later forward's tensors can never be mistaken for them).
    """

    def __init__(self, head_dim: int) -> None:
        self.head_dim = head_dim
        # The latest forward's (cos, sin) and their tables.
        self._last: tuple[torch.Tensor, torch.Tensor, _Tables] | None = None
        # (-1, 1) per device and dtype, made once: a tensor from a Python list is a host copy,
        # which a CUDA graph capture (engine/graphs.py) does not allow.
        self._signs: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, cos: torch.Tensor, sin: torch.Tensor) -> _Tables:
        last = self._last
        if last is None or last[0] is not cos or last[1] is not sin:
            last = self._last = (cos, sin, self._build(cos, sin))
        return last[2]

    def _build(self, cos: torch.Tensor, sin: torch.Tensor) -> _Tables:
        # transformers' GLM: cos/sin hold rotary_dim / 2 distinct angles (twice), and the
        # rotation pairs neighbouring channels (2i, 2i + 1) of the first rotary_dim channels.
        half = cos.shape[-1] // 2
        c = cos[..., :half].repeat_interleave(2, dim=-1)
        s = sin[..., :half].repeat_interleave(2, dim=-1)
        sign = self._signs.get((s.device, s.dtype))
        if sign is None:
            sign = self._signs[(s.device, s.dtype)] = torch.tensor(
                [-1.0, 1.0], dtype=s.dtype, device=s.device
            )
        s = (s.unflatten(-1, (-1, 2)) * sign).flatten(-2)
        rest = self.head_dim - c.shape[-1]
        if rest:
            c = torch.cat([c, c.new_ones(*c.shape[:-1], rest)], dim=-1)
            s = torch.cat([s, s.new_zeros(*s.shape[:-1], rest)], dim=-1)
        return c.unsqueeze(1), s.unsqueeze(1)  # [B, 1, L, head_dim]: broadcast over heads


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + swap_pairs(x) * sin``: with sin signed ``(-s, s)`` per pair this is
    transformers' ``x * cos + rotate_half(x) * sin``, the same roundings in the same order."""
    # One copy (a stack of the odd and even channels): ``flip`` on the pair axis is 2x slower
    # on the CPU at 64 rows (``python -m bench.fused_layers``).
    swapped = torch.stack((x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return x * cos + swapped * sin


class GlmFusedRotaryAttention(GlmAttention):
    """transformers' ``GlmAttention`` with the rotary applied from per-forward tables."""

    _rotary: _RotaryTables

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: object | None = None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = kwargs.pop("past_key_values", cache)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        assert position_embeddings is not None
        cos, sin = self._rotary.get(*position_embeddings)
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)

        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)  # type: ignore[attr-defined]

        attention: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = (
            ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        )
        out, weights = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0,
            scaling=self.scaling,
            **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


def _hooked(module: nn.Module) -> bool:
    return hasattr(module, "_hf_hook")


def _source(function: object) -> str | None:
    try:
        return inspect.getsource(function)  # type: ignore[arg-type]
    except (OSError, TypeError):  # built-in or generated code: not the standard RMSNorm
        return None


def fuse_layers(model: nn.Module, rmsnorm: bool = True) -> dict[str, int]:
    """Swaps in :class:`GlmFusedRotaryAttention`, and :class:`FusedRMSNorm` when ``rmsnorm``,
    where they compute the same thing; returns how many modules of each kind changed."""
    standard = inspect.getsource(LlamaRMSNorm.forward)
    norms = 0
    for parent in list(model.modules()) if rmsnorm else []:
        for name, child in list(parent.named_children()):
            if (
                not _hooked(child)
                and isinstance(getattr(child, "weight", None), nn.Parameter)
                and hasattr(child, "variance_epsilon")
                and _source(type(child).forward) == standard
            ):
                setattr(parent, name, FusedRMSNorm(child.weight, child.variance_epsilon))
                norms += 1
    rotary = 0
    tables: _RotaryTables | None = None
    for module in model.modules():
        if type(module) is GlmAttention and not _hooked(module):
            tables = tables or _RotaryTables(module.head_dim)
            module.__class__ = GlmFusedRotaryAttention
            module._rotary = tables  # type: ignore[attr-defined]
            rotary += 1
    if norms or rotary:
        log.info("fused layers: %d RMSNorms, %d GLM rotary attentions", norms, rotary)
    return {"rmsnorm": norms, "rotary": rotary}
