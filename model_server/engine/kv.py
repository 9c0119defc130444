"""Batch surgery on a transformers ``DynamicCache``: the rows of the running batch.

The running batch is one left-padded cache ``[B, heads, T, head_dim]`` per layer plus a 2-D
attention mask. Requests join (rows appended after left-padding to a common length) and leave
(rows selected away, then the all-padding columns on the left trimmed). transformers' attention
masks handle the padding, so the model forward is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def new_cache() -> DynamicCache:
    return DynamicCache()


def cache_len(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def _pad_left(t: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(t, (0, 0, pad, 0)) if pad else t


def concat(
    caches: Sequence[DynamicCache], masks: Sequence[torch.Tensor]
) -> tuple[DynamicCache, torch.Tensor]:
    """Stacks several batches into one, left-padding each to the longest."""
    length = max(m.shape[1] for m in masks)
    data = []
    for per_layer in zip(*(c.layers for c in caches)):
        pads = [length - m.shape[1] for m in masks]
        keys = torch.cat([_pad_left(layer.keys, p) for layer, p in zip(per_layer, pads)])
        vals = torch.cat([_pad_left(layer.values, p) for layer, p in zip(per_layer, pads)])
        data.append((keys, vals))
    mask = torch.cat([F.pad(m, (length - m.shape[1], 0)) for m in masks])
    return DynamicCache(ddp_cache_data=data), mask


def select(
    cache: DynamicCache, mask: torch.Tensor, keep: torch.Tensor
) -> tuple[DynamicCache, torch.Tensor]:
    """Keeps rows ``keep``; drops leading columns that are padding in every kept row."""
    mask = mask[keep]
    real = mask.any(dim=0).nonzero()
    start = int(real[0]) if real.numel() else mask.shape[1]
    for layer in cache.layers:
        layer.keys = layer.keys[keep, :, start:]
        layer.values = layer.values[keep, :, start:]
    return cache, mask[:, start:]
