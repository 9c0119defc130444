"""The engine's SDPA attention (model_server/models/attention.py) gives exactly the bits of
transformers' own ``sdpa`` in every shape the engine runs: a prompt meeting cached KV, a
left-padded group, decode steps with padding; on a Llama-shaped and a ChatGLM2 tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_server.engine import kv
from model_server.engine.runner import ModelRunner
from model_server.models.attention import NAME, use_gqa_sdpa
from model_server.models.registry import load_model


def _forwards(runner: ModelRunner, vocab: int) -> list[torch.Tensor]:
    """Logits of each forward and the final KV of both caches."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 120), generator=gen)
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


@pytest.mark.parametrize("which", ["llama", "chatglm2"])
def test_engine_attention_is_bit_identical_to_sdpa(
    which: str, tiny_model_dir: Path, tiny_chatglm2_dir: Path
) -> None:
    folder = tiny_model_dir if which == "llama" else tiny_chatglm2_dir
    loaded = load_model(str(folder), torch.device("cpu"), "float32", None)
    model = loaded.model
    assert model.config._attn_implementation == "sdpa"
    assert model.model.layers[0].self_attn.num_key_value_groups > 1  # the case it changes
    runner = ModelRunner(loaded)  # switches the model to the engine's attention
    assert model.config._attn_implementation == NAME
    with torch.inference_mode():
        ours = _forwards(runner, runner.vocab)
        model.set_attn_implementation("sdpa")
        stock = _forwards(runner, runner.vocab)
    assert len(ours) == len(stock)
    for a, b in zip(ours, stock):
        assert torch.equal(a, b)
    use_gqa_sdpa(model)
    assert model.config._attn_implementation == NAME
