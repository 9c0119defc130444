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

**Decode steps skip the lane's left padding** on the CPU. A lane's rows are left-padded to its
widest row, and reading that padding was half of a c=16 decode step's attention (the KV comes
from memory; a masked column costs as much as a real one). Once per forward, the mask's rows
are split into runs of consecutive rows (the store keeps a lane's rows sorted longest first, so
rows of similar length sit together), each starting at the first column any of its rows uses,
choosing the runs that read the fewest positions, counting one more SDPA call as
``RUN_CALL_POSITIONS`` positions (over at most ``RUN_CANDIDATES`` boundaries, so the choice
costs ~0.1 ms a step at any batch size). Each layer then runs one SDPA call per run over its columns
only. A row sees the same keys with fewer masked ones, so the result is its own attention in
the last bits, as a row's attention already differs between a solo and a padded batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "glmserve_sdpa"
# The attribute of a decode step's additive mask that holds its runs of rows (see above).
RUNS = "glmserve_decode_runs"
# What one more SDPA call per layer costs, in KV positions read (~15 us against ~90 ns a row
# position for SmolLM2 on the 2-core CPU; the order of magnitude is what matters).
RUN_CALL_POSITIONS = 192
# Row boundaries the split of a decode step considers at most (its cost grows as the square).
RUN_CANDIDATES = 32


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
    own grouped-query support instead of ``repeat_kv``, and a CPU decode step whose mask
    carries runs of rows done one run at a time."""
    groups = getattr(module, "num_key_value_groups", 1)
    runs = getattr(attention_mask, RUNS, None)
    if (
        runs is not None
        and query.shape[2] == 1
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None  # left to transformers, which refuses it
    ):
        return _decode_by_runs(query, key, value, attention_mask, runs, groups, scaling), None
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
    additive = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
    if mask.shape[0] > 1 and mask.shape[2] == 1:  # a decode step of several rows
        starts = mask[:, 0, 0, :].int().argmax(dim=-1).tolist()  # each row's first column
        runs = decode_runs(starts, mask.shape[-1])
        if runs != [(0, len(starts), 0)]:  # else the one batched call, as transformers makes
            setattr(additive, RUNS, runs)
    return additive


def decode_runs(starts: list[int], width: int) -> list[tuple[int, int, int]]:
    """``(first row, end row, first column)`` runs of consecutive rows covering all rows,
    reading the fewest ``rows x columns`` positions plus ``RUN_CALL_POSITIONS`` per run: an
    exact split by dynamic programming over at most ``RUN_CANDIDATES`` row boundaries (every
    row up to that many rows; beyond, evenly spaced ones: the lane is sorted, so little is
    lost, and the per-step cost stays fixed however many rows run)."""
    n = len(starts)
    step = -(-n // RUN_CANDIDATES)
    edges = [*range(0, n, step), n]
    lows = [min(starts[a:b]) for a, b in zip(edges, edges[1:])]
    best = [0] * len(edges)
    cut = [0] * len(edges)
    for end in range(1, len(edges)):
        first = lows[end - 1]
        best[end] = -1
        for begin in range(end - 1, -1, -1):
            first = min(first, lows[begin])
            cost = best[begin] + (edges[end] - edges[begin]) * (width - first)
            if best[end] < 0 or cost + RUN_CALL_POSITIONS < best[end]:
                best[end], cut[end] = cost + RUN_CALL_POSITIONS, begin
    runs = []
    end = len(edges) - 1
    while end:
        begin = cut[end]
        runs.append((edges[begin], edges[end], min(lows[begin:end])))
        end = begin
    return runs[::-1]


def _decode_by_runs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    runs: list[tuple[int, int, int]],
    groups: int,
    scaling: float | None,
) -> torch.Tensor:
    """One decode step's attention, one SDPA call per run of rows over its own columns
    (query heads packed per KV head, as transformers does for one query token)."""
    rows, heads, _, dim = query.shape
    packed = query.reshape(rows, heads // groups, groups, dim)
    parts = [
        F.scaled_dot_product_attention(
            packed[a:b],
            key[a:b, :, first:],
            value[a:b, :, first:],
            attn_mask=mask[a:b, :, :, first:],
            scale=scaling,
        )
        for a, b, first in runs
    ]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.reshape(rows, 1, heads, dim)


def use_gqa_sdpa(model: torch.nn.Module) -> None:
    """Switches a transformers model that runs ``sdpa`` attention to :func:`sdpa_gqa_attention`
    and :func:`sdpa_float_mask`; any other implementation is left alone."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(NAME, sdpa_gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_float_mask)
    model.set_attn_implementation(NAME)
