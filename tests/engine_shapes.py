"""The shapes the engine runs a model in, for tests that compare two versions of a model."""

from __future__ import annotations

import torch

from model_server.engine import kv
from model_server.engine.runner import ModelRunner


def engine_forwards(runner: ModelRunner) -> list[torch.Tensor]:
    """Logits of each forward and the final KV of both caches: a prompt, a prompt over its
    cached KV (a prefix-cache hit's shape), a left-padded group in two chunks, decode steps."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, runner.vocab, (2, 120), generator=gen)
    outs = []
    one = kv.new_cache()  # 64 positions, then 24 more over them (a prefix-cache hit's shape)
    outs.append(
        runner.forward(
            ids[:1, :64], torch.ones(1, 64, dtype=torch.long), torch.arange(64)[None], one
        )
    )
    outs.append(
        runner.forward(
            ids[:1, 64:88], torch.ones(1, 88, dtype=torch.long), torch.arange(64, 88)[None], one
        )
    )
    two = kv.new_cache()  # a left-padded group, a second chunk, then decode steps
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[1, :20] = 0
    positions = torch.stack([torch.arange(48), (torch.arange(48) - 20).clamp(min=0)])
    outs.append(runner.forward(ids[:, :48], mask, positions, two))
    mask = torch.cat([mask, torch.ones(2, 16, dtype=torch.long)], dim=1)
    positions = torch.stack([torch.arange(48, 64), torch.arange(28, 44)])
    outs.append(runner.forward(ids[:, 48:64], mask, positions, two))
    for step in range(3):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        positions = torch.tensor([[64 + step], [44 + step]])
        outs.append(runner.forward(ids[:, 64 + step : 65 + step], mask, positions, two))
    for cache in (one, two):
        outs += [t.clone() for layer in cache.layers for t in (layer.keys, layer.values)]
    return outs
