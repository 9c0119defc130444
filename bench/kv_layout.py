"""``python -m bench.kv_layout``: dense lanes vs paged KV with a gather, one decode step.

The engine keeps each lane of the running batch as a dense left-padded cache and uses blocks
for accounting and prefix reuse. The alternative is true paged storage: every layer's KV in a
pool of blocks, gathered into a dense ``[B, heads, T, dim]`` tensor for attention each step
(transformers' continuous batching does this on the CPU; a paged-attention kernel avoids the
gather but there is none for the CPU in torch). This measures both on the same model, batch
and context: the model's real decode forward, with the cache filled with random KV (values do
not change the cost). Prints a table and a ``BENCH_JSON`` line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from model_server.engine import kv
from model_server.models.registry import load_model, resolve_device


class _PagedLayer(DynamicLayer):
    """Keys/values in a pool ``[heads, slots, dim]``; ``update`` writes the new token into
    each row's next slot and returns the rows' slots gathered into a dense tensor."""

    def __init__(self, pool_k: torch.Tensor, pool_v: torch.Tensor, slots: torch.Tensor) -> None:
        super().__init__()
        self.pool_k, self.pool_v, self.slots = pool_k, pool_v, slots  # slots: [B, T]
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.slots.shape[1] - 1  # before this step's token

    def update(self, key_states, value_states, *args, **kwargs):  # noqa: ANN001, ANN002
        b, h, _, d = key_states.shape
        new = self.slots[:, -1]  # the step's slot per row (pre-assigned)
        self.pool_k[:, new] = key_states[:, :, 0].transpose(0, 1)
        self.pool_v[:, new] = value_states[:, :, 0].transpose(0, 1)
        flat = self.slots.reshape(-1)
        t = self.slots.shape[1]
        k = self.pool_k.index_select(1, flat).view(h, b, t, d).transpose(0, 1)
        v = self.pool_v.index_select(1, flat).view(h, b, t, d).transpose(0, 1)
        return k, v


def _shapes(model: torch.nn.Module) -> tuple[int, int, int]:
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, head_dim


def _time(step, repeats: int) -> float:  # noqa: ANN001
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model: torch.nn.Module, batch: int, context: int, repeats: int) -> dict[str, float]:
    layers, heads, dim = _shapes(model)
    dtype = next(model.parameters()).dtype
    ids = torch.ones(batch, 1, dtype=torch.long)
    positions = torch.full((batch, 1), context, dtype=torch.long)
    mask = torch.ones(batch, context + 1, dtype=torch.long)

    def dense() -> None:
        per_layer = []
        for _ in range(layers):
            k = torch.randn(batch, heads, context + kv.GROW_TOKENS, dim, dtype=dtype)
            v = torch.randn_like(k)
            layer = kv.GrowableLayer()
            layer.lazy_initialization(k, v)
            layer.set_buffers(k, v, context)
            per_layer.append(layer)
        return kv.GrowableCache(per_layer)

    def paged() -> Cache:
        slots = torch.randperm(batch * (context + 1)).view(batch, context + 1)
        cache = DynamicCache()
        cache.layers = [
            _PagedLayer(
                torch.randn(heads, batch * (context + 1), dim, dtype=dtype),
                torch.randn(heads, batch * (context + 1), dim, dtype=dtype),
                slots,
            )
            for _ in range(layers)
        ]
        return cache

    out = {}
    for name, make in (("dense", dense), ("paged_gather", paged)):
        caches = [make() for _ in range(repeats + 1)]  # a fresh cache per step: same length

        def step(caches=caches) -> None:  # noqa: ANN001
            cache = caches.pop()
            with torch.inference_mode():
                model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )

        out[name] = _time(step, repeats - 1)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    loaded = load_model(args.model, resolve_device("cpu"), "auto", None)
    rows = []
    print("| batch | context | dense ms | paged+gather ms | ratio |\n|---:|---:|---:|---:|---:|")
    for b in (int(x) for x in args.batches.split(",")):
        r = measure(loaded.model, b, args.context, args.repeats)
        rows.append({"batch": b, "context": args.context, **r})
        print(
            f"| {b} | {args.context} | {r['dense'] * 1e3:.1f} | {r['paged_gather'] * 1e3:.1f} "
            f"| {r['paged_gather'] / r['dense']:.2f} |",
            flush=True,
        )
    print("BENCH_JSON " + json.dumps({"kv_layout": rows}))


if __name__ == "__main__":
    main()
