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

**Prompts over cached KV run as two oneDNN matmuls** when the model's linears run on oneDNN
(``--cpu-linear``, :func:`use_gqa_sdpa` with ``onednn=True``). A turn-16 prompt of ~180
tokens over ~3,700 cached positions spent ~70% of its forward in torch's CPU flash kernel,
whose blocks go through MKL's sgemm (~150 GFLOP/s on the AMD CI box: MKL's generic path).
Per row and KV head, the query heads sharing that KV head are stacked into one matrix; scores
``q·Kᵀ``, the mask added to the columns it does not leave at 0, an exact softmax, then ``P·V``,
both products by ``torch.ops.mkldnn._linear_pointwise`` on the cache's own memory (no reorder,
~440 GFLOP/s; ``P·V`` by MKL's sgemm where the CPU's best is AVX2: ``VALUES_BY_SGEMM``), in
blocks of query rows whose scores stay under ``SCORE_BYTES``; the softmax
runs in place over the scores. Columns no query of a row reads (its left padding) are skipped.
The mask function finds those columns once per forward; a mask with a query row that reads
nothing (a padded group's padding) keeps the flash kernel, whose handling of such rows the
engine was built on. Attention 1.7x faster at that shape (docs/engine.md, "Prompts over cached
KV on oneDNN"); the result differs from the flash kernel's in the last bits (another summation
order), as a row's attention already does between a solo and a padded batch.

**On CUDA, SDPA runs without cuDNN's attention** (:func:`sdpa_backends`). torch picks cuDNN
first on Hopper, and cuDNN builds an execution plan for every new shape; a decode step's key
length is new at every step, so each step paid 28 plan builds. On an H100 one decode step's
SDPA calls (28 layers, 16 rows, ~600 keys, a mask) took 45-63 ms (up to 0.9 s) with the default
choice and 2.8 ms without cuDNN. cuDNN is faster only on a shape it has planned already (1.9
ms), and the engine's shapes change at every step. The 6B-shaped model with 8 layers served
5.8-7.3x the tokens at one stream and 4.5-4.8x at 16 (docs/engine.md, "GPU").
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "glmserve_sdpa"
# The same attention with prompts over cached KV as oneDNN matmuls (its mask function marks them).
NAME_ONEDNN = "glmserve_sdpa_onednn"
# The attribute of a multi-token additive mask that holds, per row, the columns no query of the
# row reads (skipped) and the first column from which the mask is not all 0 (see above).
PREFILL_COLUMNS = "glmserve_prefill_columns"
# The most bytes of attention scores one block of query rows holds: a turn's ~180 tokens over
# ~3,900 positions in one block (blocks of 64 rows were 6 % slower), and under hostmem's mmap
# threshold, so the scores are reused heap memory, not fresh pages.
SCORE_BYTES = 8 * 2**20
# Where the values product (probabilities x V) of a prompt over cached KV runs: oneDNN's
# matmul on the AVX-512 box (~430 GFLOP/s, MKL's generic path ~150), MKL's sgemm
# (``torch.mm``) on a CPU whose best is AVX2, where oneDNN's reached ~57 GFLOP/s at turn 16's
# shape and MKL's ~100 (docs/engine.md, "Prompts over cached KV on oneDNN").
VALUES_BY_SGEMM = torch.backends.cpu.get_cpu_capability() == "AVX2"
# The attribute of a decode step's additive mask that holds its runs of rows (see above).
RUNS = "glmserve_decode_runs"
# SDPA's backends on CUDA: all but cuDNN's, which plans each new key length anew (see above).
CUDA_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
# What one more SDPA call per layer costs, in KV positions read (~15 us against ~90 ns a row
# position for SmolLM2 on the 2-core CPU; the order of magnitude is what matters).
RUN_CALL_POSITIONS = 192
# Row boundaries the split of a decode step considers at most (its cost grows as the square).
RUN_CANDIDATES = 32


def sdpa_backends(device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """The context a forward on ``device`` runs in: SDPA limited to ``CUDA_BACKENDS`` on CUDA,
    torch's own choice elsewhere."""
    if device.type != "cuda":
        return contextlib.nullcontext
    return functools.partial(sdpa_kernel, list(CUDA_BACKENDS))


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
    columns = getattr(attention_mask, PREFILL_COLUMNS, None)
    if (
        columns is not None
        and len(columns) == query.shape[0]  # one mask row per batch row, not broadcast
        and attention_mask.shape[-1] == key.shape[2]  # a mask column per key, none beyond
        and query.shape[2] > 1
        and query.dtype == torch.float32
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and not dropout
    ):
        return _prefill_onednn(query, key, value, attention_mask, columns, groups, scaling), None
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


def sdpa_float_mask_onednn(*args: Any, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Any:
    """:func:`sdpa_float_mask`, with a CPU mask over several query tokens marked for
    :func:`_prefill_onednn` by its columns (see ``prefill_columns``)."""
    mask = sdpa_float_mask(*args, dtype=dtype, **kwargs)
    if mask is None or mask.device.type != "cpu" or mask.dtype != torch.float32:
        return mask
    if mask.shape[2] > 1:
        columns = prefill_columns(mask)
        if columns is not None:
            setattr(mask, PREFILL_COLUMNS, columns)
    return mask


def prefill_columns(mask: torch.Tensor) -> list[tuple[int, int]] | None:
    """Per row of an additive ``[rows, 1, queries, columns]`` mask: ``(first, zero_until)``,
    where no query reads a column before ``first`` and the mask is 0 for every query from
    ``first`` to ``zero_until``. None when some query reads no column at all."""
    m = mask[:, 0]
    read = m > float("-inf")
    if not bool(read.any(dim=-1).all()):
        return None
    columns = []
    width = m.shape[-1]
    for r in range(m.shape[0]):
        first = int(read[r].any(dim=0).int().argmax())
        nonzero = (m[r, :, first:] != 0).any(dim=0)
        zero_until = first + int(nonzero.int().argmax()) if bool(nonzero.any()) else width
        columns.append((first, zero_until))
    return columns


def _prefill_onednn(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    columns: list[tuple[int, int]],
    groups: int,
    scaling: float | None,
) -> torch.Tensor:
    """Attention of several query tokens per row as oneDNN matmuls, per row and KV head (the
    ``groups`` query heads sharing it stacked), in blocks of query rows; returns
    ``[rows, queries, heads, dim]`` as transformers' attention functions do."""
    rows, heads, n, dim = query.shape
    scale = dim**-0.5 if scaling is None else scaling
    q = (query * scale).contiguous()
    out = query.new_empty(rows, n, heads, value.shape[-1])
    matmul = torch.ops.mkldnn._linear_pointwise
    for r, (first, zero_until) in enumerate(columns):
        width = key.shape[2] - first
        block = max(1, SCORE_BYTES // (4 * groups * width))
        for h in range(heads // groups):
            keys = key[r, h, first:]
            values = value[r, h, first:]
            heads_of_h = slice(h * groups, (h + 1) * groups)
            for a in range(0, n, block):
                b = min(n, a + block)
                x = q[r, heads_of_h, a:b].reshape(groups * (b - a), dim)
                scores = matmul(x, keys, None, "none", [], "")
                if zero_until < key.shape[2]:
                    scores.view(groups, b - a, width)[:, :, zero_until - first :] += mask[
                        r, 0, a:b, zero_until:
                    ]
                torch.ops.aten._softmax.out(scores, -1, False, out=scores)  # in place
                if VALUES_BY_SGEMM:
                    o = torch.mm(scores, values)
                else:  # values.t(): a view, oneDNN reads it strided
                    o = matmul(scores, values.t(), None, "none", [], "")
                out[r, a:b, heads_of_h] = o.view(groups, b - a, -1).transpose(0, 1)
    return out


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


def use_gqa_sdpa(model: torch.nn.Module, onednn: bool = False) -> None:
    """Switches a transformers model that runs ``sdpa`` attention to :func:`sdpa_gqa_attention`
    and :func:`sdpa_float_mask`, with prompts over cached KV as oneDNN matmuls when ``onednn``
    (the model's linears run on oneDNN); any other implementation is left alone."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return
    name, mask_fn = (NAME_ONEDNN, sdpa_float_mask_onednn) if onednn else (NAME, sdpa_float_mask)
    AttentionInterface.register(name, sdpa_gqa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_fn)
    model.set_attn_implementation(name)
