"""Prefix hits assembled into slabs (layers sharing one allocation), and host pages kept for
reuse: the KV the model reads is unchanged, the accounting counts real memory once, and a
freed buffer's pages are reused instead of faulted in again."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model_server.engine import hostmem, kv
from model_server.engine.engine import Engine, EngineConfig
from model_server.engine.types import GenerationRequest, SamplingParams
from model_server.models.base import ChatMessage
from model_server.models.registry import load_model

LAYERS, HEADS, BS, DIM = 5, 2, 4, 8


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_slabs_hold_the_blocks_and_count_once(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    blocks = [torch.randn(LAYERS, 2, HEADS, BS, DIM) for _ in range(3)]
    spare = 5
    capacity = 3 * BS + spare
    layer_bytes = 2 * HEADS * capacity * DIM * 4
    monkeypatch.setattr(kv, "SLAB_BYTES", 2 * layer_bytes)  # slabs of layers 0-1, 2-3, 4
    cache = kv.cache_from_blocks(blocks, spare=spare)
    for li, layer in enumerate(cache.layers):
        for i, t in enumerate((layer.keys, layer.values)):
            assert torch.equal(t[0], torch.cat([b[li, i] for b in blocks], dim=1)), (li, i)
        assert layer._k.shape == (1, HEADS, capacity, DIM)
        assert layer.get_seq_length() == 3 * BS
    slabs = [_storage(layer._k) for layer in cache.layers]
    assert slabs[0] == slabs[1] != slabs[2] == slabs[3] != slabs[4]
    assert all(_storage(layer._v) == s for layer, s in zip(cache.layers, slabs))
    assert kv.nbytes(cache) == LAYERS * layer_bytes  # each slab once, not once per view

    # A prompt longer than the spare room: layer 0 grows into buffers of its own; layer 1
    # still reads the slab, which stays allocated (and counted) until layer 1 moves too.
    new_k, new_v = torch.randn(1, HEADS, spare + 1, DIM), torch.randn(1, HEADS, spare + 1, DIM)
    keys, values = cache.layers[0].update(new_k, new_v)
    assert torch.equal(keys[0], torch.cat([*(b[0, 0] for b in blocks), new_k[0]], dim=1))
    assert torch.equal(values[0, :, -(spare + 1) :], new_v[0])
    assert _storage(cache.layers[0]._k) != slabs[0] == _storage(cache.layers[1]._k)
    grown = kv.nbytes(cache)
    own = 2 * cache.layers[0]._k.untyped_storage().nbytes()
    assert grown == LAYERS * layer_bytes + own
    cache.layers[1].update(new_k, new_v)
    assert kv.nbytes(cache) == grown - 2 * layer_bytes + own  # the first slab is gone


async def _conversation(engine: Engine, loaded, turns: int) -> list[list[int]]:  # noqa: ANN001
    history: list[ChatMessage] = []
    replies = []
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    for turn in range(turns):
        history.append(ChatMessage("user", f"Turn {turn}: and what about {turn * 11}?"))
        ids: list[int] = []
        prompt = loaded.chat_format.render(history)
        async for out in engine.submit(GenerationRequest(f"t{turn}", prompt, params)):
            assert out.error is None, out.error
            ids += out.token_ids
        replies.append(ids)
        history.append(ChatMessage("assistant", loaded.tokenizer.decode(ids)))
    return replies


async def test_one_layer_slabs_give_the_greedy_tokens_of_no_cache(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every layer of every hit in a slab of its own (the default puts the tiny model's two
    layers in one): replies over a cached conversation are those computed without a cache."""
    loaded = load_model(str(tiny_model_dir), torch.device("cpu"), "float32", None)
    monkeypatch.setattr(kv, "SLAB_BYTES", 1)
    replies, hits = {}, {}
    for caching in (False, True):
        engine = Engine(loaded, EngineConfig(prefix_caching=caching, block_size=4))
        engine.start()
        try:
            replies[caching] = await asyncio.wait_for(_conversation(engine, loaded, 4), 120)
        finally:
            engine.shutdown()
        hits[caching] = engine.scheduler.prefix_hits
    assert hits[True] > 0 and hits[False] == 0
    assert replies[True] == replies[False]


# In a thread (as the engine's), touches a 16 MiB buffer and frees it, then touches an 8 MiB
# one (a prefix hit after a longer turn's lane) and prints the page faults that second touch
# took. glibc's default unmaps the first (its size is over the starting mmap threshold) and
# takes fresh pages from its heap for the second.
_REUSE = textwrap.dedent(
    """
    import resource, sys, threading
    import torch
    from model_server.engine import hostmem
    if sys.argv[1] == "keep":
        assert hostmem.keep_freed_pages()
    out = []
    def work():
        for mib in (16, 8):
            t = torch.empty(mib * 2**20 // 4)
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            t.fill_(1.0)
            out.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
            del t
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    print(out[-1])
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_pages_are_reused_without_faults() -> None:
    if not hostmem.keep_freed_pages():
        pytest.skip("no glibc mallopt")

    def faults(mode: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", _REUSE, mode], capture_output=True, text=True, check=True
        )
        return int(run.stdout.split()[-1])

    # 8 MiB is 2,048 pages: one fault each, or fewer where the kernel maps several at once.
    assert faults("keep") < 32  # the freed buffer's pages, reused
    assert faults("default") >= 128  # glibc's default: fresh pages, faulted in again


def test_slab_layers_take_in_place_writes_in_any_grad_mode() -> None:
    """Built under no_grad, written by a forward with grad enabled: allowed, as for a layer
    with buffers of its own (an autograd view of the slab would refuse it)."""
    blocks = [torch.randn(LAYERS, 2, HEADS, BS, DIM) for _ in range(2)]
    with torch.no_grad():
        cache = kv.cache_from_blocks(blocks, spare=3)
    new = torch.randn(1, HEADS, 1, DIM, requires_grad=True) * 1.0
    keys, _ = cache.layers[0].update(new, new)
    assert torch.equal(keys[0, :, -1].detach(), new[0, :, 0].detach())
