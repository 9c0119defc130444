"""Plain-transformers baselines, run in their own process: ``python -m bench.baselines``.

Loads the model as the server does (``model_server.models.registry.load_model``: for the
embedded default the same converted checkpoint, dtype and device) but with torch's own linears
(``cpu_linear="torch"``, what plain transformers runs; the server packs them for oneDNN),
renders the same prompts with the same chat format, and measures, greedy and fixed-length
(``min_new_tokens = max_new_tokens``; for continuous batching EOS is disabled):

- ``prefill_longest``: one forward over the longest prompt (median of 3);
- ``hf_sequential``: ``model.generate`` one request at a time (the original ChatGLM2 demo's way);
- ``hf_static_batch``: ``model.generate`` on left-padded batches of ``--batch-size``;
- ``hf_continuous``: transformers' own continuous batching (``model.generate_batch``, paged
  attention), unless ``--no-hf-continuous``; a failure is recorded as its error text.

torch keeps its default thread count, as the server does. The last stdout line is
``BENCH_JSON {...}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from model_server.models import DEFAULT_MODEL
from model_server.models.base import ChatMessage, LoadedModel
from model_server.models.registry import load_model, resolve_device

from .load import percentile
from .prompts import longest, prompts
from .report import MARKER


class StepClock(LogitsProcessor):
    """Records the time of every generation step (called once per step, after the forward)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def _row(
    name: str, requests: int, tokens: int, wall: float, ttfts: list[float], itls: list[float]
) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "hf",
        "requests": requests,
        "errors": 0,
        "completion_tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p95": percentile(ttfts, 95),
        "itl_p50": percentile(itls, 50),
        "itl_p95": percentile(itls, 95),
    }


def _generate(
    loaded: LoadedModel, rows: Sequence[list[int]], max_new: int
) -> tuple[torch.Tensor, StepClock, float]:
    """Greedy fixed-length ``generate`` on left-padded ``rows``; (output, clock, start time)."""
    pad = min(loaded.eos_token_ids) if loaded.eos_token_ids else 0
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    clock = StepClock()
    config = GenerationConfig(
        max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, pad_token_id=pad
    )
    config.eos_token_id = sorted(loaded.eos_token_ids) or None
    start = time.perf_counter()
    out = loaded.model.generate(
        input_ids=ids.to(loaded.device),
        attention_mask=mask.to(loaded.device),
        generation_config=config,
        logits_processor=LogitsProcessorList([clock]),
    )
    return out, clock, start


def hf_sequential(loaded: LoadedModel, rows: list[list[int]], max_new: int) -> dict[str, Any]:
    ttfts: list[float] = []
    itls: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    for r in rows:
        out, clock, start = _generate(loaded, [r], max_new)
        tokens += out.shape[1] - len(r)
        ttfts.append(clock.times[0] - start)
        itls += [b - a for a, b in zip(clock.times, clock.times[1:])]
    wall = time.perf_counter() - t0
    return _row("HF sequential", len(rows), tokens, wall, ttfts, itls)


def hf_static_batch(
    loaded: LoadedModel, rows: list[list[int]], max_new: int, batch_size: int
) -> dict[str, Any]:
    ttfts: list[float] = []
    itls: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        group = rows[i : i + batch_size]
        out, clock, start = _generate(loaded, group, max_new)
        tokens += (out.shape[1] - max(len(r) for r in group)) * len(group)
        ttfts += [clock.times[0] - start] * len(group)
        itls += [b - a for a, b in zip(clock.times, clock.times[1:]) for _ in group]
    wall = time.perf_counter() - t0
    row = _row(f"HF static batch {batch_size}", len(rows), tokens, wall, ttfts, itls)
    row["batch_size"] = batch_size
    return row


def hf_continuous(loaded: LoadedModel, rows: list[list[int]], max_new: int) -> dict[str, Any]:
    """transformers' ContinuousBatchingManager via ``generate_batch``; wall time from the first
    request's arrival to the last token (manager setup and warmup are reported apart)."""
    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=-1)
    call_start = time.perf_counter()
    outputs = loaded.model.generate_batch(
        inputs=rows, generation_config=config, record_timestamps=True
    )
    call_s = time.perf_counter() - call_start
    done = [o for o in outputs.values() if o.error is None and o.timestamps]
    errors = len(rows) - len(done)
    if not done:
        raise RuntimeError(f"generate_batch returned no finished request ({errors} failed)")
    first = min(o.created_time for o in done)
    last = max(o.timestamps[-1] for o in done)
    tokens = sum(len(o.generated_tokens) for o in done)
    ttfts = [o.timestamps[0] - o.created_time for o in done]
    itls = [b - a for o in done for a, b in zip(o.timestamps, o.timestamps[1:])]
    row = _row("HF continuous batching", len(rows), tokens, last - first, ttfts, itls)
    row["errors"] = errors
    row["call_s"] = call_s
    row["attn_implementation"] = str(getattr(loaded.model.config, "_attn_implementation", ""))
    return row


def prefill_seconds(loaded: LoadedModel, ids: list[int], repeats: int = 3) -> float:
    """Median time of one forward over ``ids`` (a fresh cache each time)."""
    x = torch.tensor([ids], device=loaded.device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loaded.model(input_ids=x, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--sequential", type=int, default=8, help="prompts for HF sequential")
    p.add_argument("--batch-prompts", type=int, default=32, help="prompts for the batched runs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--hf-continuous", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    cpu_linear = "torch"  # plain transformers: no oneDNN packing
    loaded = load_model(args.model, resolve_device("cpu"), "auto", None, cpu_linear=cpu_linear)
    torch.set_grad_enabled(False)
    render = loaded.chat_format.render
    result: dict[str, Any] = {
        "load_s": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_linear": cpu_linear,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": str(loaded.device),
        "source": loaded.source,
        "rows": [],
    }
    seq_rows = [render([ChatMessage("user", q)]) for q in prompts(args.sequential)]
    batch_rows = [render([ChatMessage("user", q)]) for q in prompts(args.batch_prompts)]
    result["prompt_tokens_sequential"] = [len(r) for r in seq_rows]
    result["prompt_tokens_batch"] = [len(r) for r in batch_rows]
    longest_ids = render([ChatMessage("user", longest())])
    _generate(loaded, [seq_rows[0]], 4)  # warm-up: first-call allocations and kernel choice
    result["prefill_longest"] = {
        "prompt_tokens": len(longest_ids),
        "seconds": prefill_seconds(loaded, longest_ids),
    }
    log = sys.stderr
    print(f"baselines: HF sequential, {len(seq_rows)} prompts", file=log, flush=True)
    result["rows"].append(hf_sequential(loaded, seq_rows, args.max_tokens))
    print(f"baselines: HF static batch {args.batch_size}", file=log, flush=True)
    result["rows"].append(hf_static_batch(loaded, batch_rows, args.max_tokens, args.batch_size))
    if args.hf_continuous:
        print("baselines: HF continuous batching (generate_batch)", file=log, flush=True)
        try:
            result["rows"].append(hf_continuous(loaded, batch_rows, args.max_tokens))
        except Exception as exc:  # noqa: BLE001 - recorded, the other rows still count
            traceback.print_exc()
            result["rows"].append(
                {"name": "HF continuous batching", "kind": "hf", "error": f"{exc!r}"[:1000]}
            )
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
