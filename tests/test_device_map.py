"""``--device-map``: one model's layers placed by accelerate, the KV cache following each layer.

The test machines have no GPUs, so the split cannot be real here: the model is dispatched by
accelerate with one layer offloaded to disk (hooks move it in for each forward, as they move
activations between GPUs) and must serve exactly the tokens of the plain load, prefix-cache
hits included; and a cache rebuilt from prefix blocks must put each layer on the device given
for it (``meta`` standing in for a second GPU). On a multi-GPU machine ``--device-map auto``
spreads the layers for real.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from test_engine_inprocess import _conversation

from model_server.engine import kv
from model_server.engine.engine import Engine, EngineConfig
from model_server.models.hf import load_hf
from model_server.models.registry import load_model
from model_server.settings import CLI


def test_flag() -> None:
    assert CLI.parse(["--device-map", "auto"], env={}).device_map == "auto"
    assert CLI.parse([], env={"GLMSERVE_DEVICE_MAP": "balanced"}).device_map == "balanced"
    assert CLI.parse([], env={}).device_map is None
    with pytest.raises(SystemExit):
        CLI.parse(["--device-map", "everywhere"], env={})


async def _replies(loaded) -> list[list[int]]:  # noqa: ANN001
    engine = Engine(loaded, EngineConfig(prefix_caching=True, block_size=4))
    engine.start()
    try:
        replies = await asyncio.wait_for(_conversation(engine, loaded, 3), 120)
    finally:
        engine.shutdown()
    assert engine.scheduler.prefix_hits > 0  # the hit path (cache_from_blocks) ran
    return replies


def test_device_map_serves_the_same_tokens(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Layer 1 offloaded to disk: accelerate's hooks run it (the dispatch a multi-GPU map
    uses), and greedy replies over a prefix-cached conversation match the plain load."""
    cpu = torch.device("cpu")
    plain = load_model(str(tiny_model_dir), cpu, "float32", None)
    split = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    split |= {"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapped = load_hf(
        str(tiny_model_dir), cpu, torch.float32, None, device_map=split, offload_folder=tmp_path
    )
    assert mapped.model.hf_device_map == split
    assert hasattr(mapped.model.model.layers[1], "_hf_hook")
    assert asyncio.run(_replies(mapped)) == asyncio.run(_replies(plain))
    # --device-map itself goes through load_model to transformers.
    auto = load_model(str(tiny_model_dir), cpu, "float32", None, device_map="auto")
    assert auto.device == cpu


def test_prefix_hit_puts_each_layer_on_its_device() -> None:
    layers, heads, bs, dim = 2, 2, 4, 8
    blocks = [torch.randn(layers, 2, heads, bs, dim) for _ in range(3)]
    devices = [torch.device("cpu"), torch.device("meta")]  # meta: a stand-in second GPU
    cache = kv.cache_from_blocks(blocks, spare=5, devices=devices)
    assert kv.layer_devices(cache) == devices
    assert cache.layers[1]._k.shape == (1, heads, 3 * bs + 5, dim)
    # Layer 0 holds the blocks' contents, in order.
    keys = cache.layers[0].keys[0]  # [heads, 3*bs, dim]
    assert torch.equal(keys, torch.cat([b[0, 0] for b in blocks], dim=1))
    # Without devices: everything on the blocks' device, as before.
    assert kv.layer_devices(kv.cache_from_blocks(blocks)) == [torch.device("cpu")] * layers
