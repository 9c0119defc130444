"""SDPA attention that never copies the KV cache for grouped-query attention on the CPU.

transformers' ``sdpa`` attention repeats every key/value head ``heads / kv_heads`` times
(``repeat_kv``: a copy of the whole cache, per layer, per forward) whenever it passes a mask,
because CUDA's fused kernels reject a mask together with ``enable_gqa``. The engine always
passes a mask when a prompt meets cached KV (a prefix-cache hit, a chunked prompt, a padded
group), so on the CPU a 180-token turn over 3,500 cached positions of SmolLM2 (9 query, 3 KV
heads) spent ~120 ms of its ~750 ms forward copying caches. torch's CPU flash kernel takes the
mask and ``enable_gqa`` together and gives bit-identical results; elsewhere (CUDA, decode,
models without grouped heads) this is transformers' own ``sdpa`` path, unchanged.

The mask is also made additive (0 / -inf floats) once per forward on the CPU: SDPA converts a
boolean mask exactly so, but in every layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "glmserve_sdpa"


def sdpa_gqa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``sdpa_attention_forward`` with the masked multi-token CPU case done by the kernel's
    own grouped-query support instead of ``repeat_kv``."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        query.device.type != "cpu"
        or attention_mask is None  # transformers already uses enable_gqa (or is_causal)
        or query.shape[2] == 1  # decode: transformers packs the query heads, no copy
        or groups == 1
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


def sdpa_float_mask(*args: Any, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Any:
    """``sdpa_mask``, with a boolean CPU mask turned into the additive float mask SDPA would
    build from it in each layer (same values, so the same results)."""
    mask = sdpa_mask(*args, dtype=dtype, **kwargs)
    if mask is None or mask.dtype != torch.bool or mask.device.type != "cpu":
        return mask
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))


def use_gqa_sdpa(model: torch.nn.Module) -> None:
    """Switches a transformers model that runs ``sdpa`` attention to :func:`sdpa_gqa_attention`
    and :func:`sdpa_float_mask`; any other implementation is left alone."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(NAME, sdpa_gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_float_mask)
    model.set_attn_implementation(NAME)
